"""Federated run files (TOML in `configs/`): [run], [strategy], [model], [data], [pretrain], [finetune], [dp].

A federated run file is the local run config (`fedecho.train.config`) plus what federation adds:
the run's name, seed and wire precision, the strategy by name with its parameters, and per phase
the number of rounds and the local work per round. Mistakes are errors that name the field.

    [pretrain]
    rounds = 3          # federated rounds of masked-autoencoder pre-training (0: skip the phase)
    epochs = 1          # local epochs per round ...
    steps = 0           # ... or, when > 0, local steps (batches) per round instead
    warmup_rounds = 1   # the learning rate warms up, then decays by a cosine over rounds
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedecho._toml import check_sections, did_you_mean
from fedecho.privacy.dp_policy import DPSection
from fedecho.train.config import RUN_SECTIONS, ConfigError, PhaseSection, RunConfig, parse_sections, section

PHASES = ("pretrain", "finetune")
FED_SECTIONS = ("run", "strategy", "dp", *RUN_SECTIONS)
WIRE_DTYPES = ("float32", "float16", "bfloat16", "int8")


@dataclass
class RunSection:
    """The run as a whole."""

    name: str = "fedecho"
    seed: int = 0
    wire_dtype: str = "float32"  # on the wire: float32, float16, bfloat16 or int8 (per-row scales); fp32 masters
    fraction: float = 1.0  # fraction of connected sites asked to train each round
    min_sites: int = 0  # replies needed for a round to count (0: the server's setting)
    round_timeout: float = 0.0  # seconds to wait for replies (0: the server's setting)
    max_update_norm: float = 0.0  # reject an update whose L2 norm exceeds this (0: no bound)
    # reject an update whose L2 norm exceeds norm_factor x the lower median of the round's update norms (0: off;
    # fedecho.fl.exchange.adaptive_norm_bound says why the lower median)
    norm_factor: float = 10.0
    keep_checkpoints: int = 3  # newest round checkpoints the server keeps per phase (0: every round's)


@dataclass
class FedPhaseSection(PhaseSection):
    """One federated phase: PhaseSection's optimiser settings, applied per round at each site."""

    rounds: int = 0
    steps: int = 0  # local steps per round (0: `epochs` local epochs per round)
    warmup_rounds: int = 0
    eval_every: int = 1  # rounds between federated evaluations (0: only after the last round)
    epochs: int = 1  # local epochs per round
    # How the sites' local work becomes the next global model (`fedecho.fl.methods` says why each exists):
    scaffold: bool = False  # SCAFFOLD control variates correct each site's drift; each site keeps its own
    outer_lr: float = 0.0  # > 0: an outer optimiser steps the global model along the round's averaged update
    outer_momentum: float = 0.0  # its momentum (DiLoCo: lr 0.7, momentum 0.9, Nesterov)
    outer_nesterov: bool = True  # Nesterov momentum (false: heavy-ball)
    keep_optimizer: bool = False  # each site keeps its local optimiser's state (AdamW moments) from round to round
    # Label shift (fine-tuning): the regression heads learn on federated statistics, not on one site's
    target_stats: bool = False  # regression targets standardised by the federation's mean and spread
    refit: Literal["off", "end", "every"] = "off"  # federated ridge refit of the regression heads' last layer
    ridge: float = 0.1  # the refit's L2 penalty, relative to the features' mean square (fedecho.fl.statistics)


@dataclass
class FedRunConfig:
    run: RunSection
    strategy: dict[str, Any]
    local: RunConfig  # [model], [data], [pretrain], [finetune] as the local engine reads them
    text: str = ""  # the file's text: it travels to the sites with every round
    path: Path | None = None
    dp: DPSection = field(default_factory=DPSection)

    @property
    def strategy_name(self) -> str:
        return str(self.strategy.get("name", "fedavg")).lower()

    @property
    def strategy_params(self) -> dict[str, Any]:
        return {k: v for k, v in self.strategy.items() if k != "name"}

    def phase(self, name: str) -> FedPhaseSection:
        return getattr(self.local, name)  # type: ignore[no-any-return]

    @property
    def phases(self) -> list[str]:
        """Phases with at least one round, in order."""
        return [p for p in PHASES if self.phase(p).rounds > 0]


def parse_run_config(text: str, where: str = "run file") -> FedRunConfig:
    """Parse a federated run file's text (the ServerApp and the ClientApp both call this)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML ({e})") from e
    check_sections(raw, where, FED_SECTIONS)
    for name in ("pretrain", "finetune"):
        if "warmup_epochs" in raw.get(name, {}):
            raise ConfigError(f"{where}: [{name}].warmup_epochs does not apply to a federated run; use warmup_rounds")
    run = section(RunSection, raw.get("run", {}), f"{where}: [run]")
    if run.wire_dtype not in WIRE_DTYPES:
        raise ConfigError(f"{where}: [run].wire_dtype must be one of {', '.join(WIRE_DTYPES)}, not {run.wire_dtype!r}")
    if not 0 < run.fraction <= 1:
        raise ConfigError(f"{where}: [run].fraction must be in (0, 1], not {run.fraction}")
    for key in ("max_update_norm", "norm_factor"):
        if not getattr(run, key) >= 0:  # also NaN
            raise ConfigError(f"{where}: [run].{key} must be >= 0 (0: off), not {getattr(run, key)}")
    if run.keep_checkpoints < 0:
        raise ConfigError(f"{where}: [run].keep_checkpoints must be >= 0 (0: keep all), not {run.keep_checkpoints}")
    strategy = raw.get("strategy", {"name": "fedavg"})
    if not isinstance(strategy, dict):
        raise ConfigError(f"{where}: [strategy] must be a table")
    if "name" in strategy and not isinstance(strategy["name"], str):
        raise ConfigError(f"{where}: [strategy].name must be a string, not {strategy['name']!r}")
    local = parse_sections(raw, where, FedPhaseSection, frozenset({"run", "strategy", "dp"}))
    dp = section(DPSection, raw.get("dp", {}), f"{where}: [dp]")
    cfg = FedRunConfig(run=run, strategy=strategy, local=local, text=text, dp=dp)
    for name in PHASES:
        p = cfg.phase(name)
        for key in ("rounds", "steps", "warmup_rounds", "epochs"):
            if getattr(p, key) < 0:
                raise ConfigError(f"{where}: [{name}].{key} must be >= 0")
        if p.rounds and not (p.epochs or p.steps):
            raise ConfigError(f"{where}: [{name}] needs epochs or steps > 0 per round")
    if not cfg.phases:
        raise ConfigError(f"{where}: no phase has rounds > 0 (set [pretrain].rounds or [finetune].rounds)")
    check_dp(cfg, where)
    from fedecho.fl.strategies import check_strategy

    _check_strategy_keys(cfg, where)
    check_strategy(cfg.strategy_name, cfg.strategy_params, where)
    check_server_optimizer(cfg, where)
    for name in PHASES:
        check_methods(cfg, name, where)
    from fedecho.models.lora import check_lora

    check_lora(cfg.local, where)
    return cfg


def _check_strategy_keys(cfg: FedRunConfig, where: str) -> None:
    """An unknown [strategy] parameter, named with the closest one the strategy (or its central-DP wrapper)
    takes; the values themselves are `check_strategy`'s."""
    from fedecho.fl.strategies import (
        CENTRAL_DP,
        STRATEGIES,
        central_dp_parameters,
        split_strategy_params,
        strategy_parameters,
    )

    if cfg.strategy_name not in STRATEGIES:
        raise ConfigError(
            f"{where}: [strategy].name {cfg.strategy_name!r} is not one of {', '.join(STRATEGIES)}"
            + did_you_mean(cfg.strategy_name, STRATEGIES)
        )
    own = split_strategy_params(cfg.strategy_params, where)[1]
    known = set(strategy_parameters(cfg.strategy_name))
    hints = known | {"name", "central_dp"} | {k for c in CENTRAL_DP for k in central_dp_parameters(c)}
    for key in sorted(set(own) - known):
        raise ConfigError(
            f"{where}: [strategy].{key} is not a parameter of {cfg.strategy_name}{did_you_mean(key, hints)}; "
            f"known: {', '.join(sorted(known)) or 'none'}"
        )


def check_methods(cfg: FedRunConfig, name: str, where: str) -> None:
    """The round's combination methods of one phase, against each other and the strategy."""
    from fedecho.fl.strategies import server_optimizer_params

    p = cfg.phase(name)
    if not p.outer_lr >= 0:  # also NaN
        raise ConfigError(f"{where}: [{name}].outer_lr must be >= 0 (0: no outer optimiser), not {p.outer_lr}")
    if not 0 <= p.outer_momentum < 1:
        raise ConfigError(f"{where}: [{name}].outer_momentum must be in [0, 1), not {p.outer_momentum}")
    for key, off in (("outer_momentum", 0.0), ("outer_nesterov", True)):  # set without the optimiser: ignored
        if getattr(p, key) != off and not p.outer_lr:
            raise ConfigError(f"{where}: [{name}].{key} needs [{name}].outer_lr > 0 (the outer optimiser)")
    if p.outer_lr and server_optimizer_params(cfg.strategy_name, cfg.strategy_params):
        raise ConfigError(
            f"{where}: [{name}].outer_lr is an outer optimiser, and [strategy].name = {cfg.strategy_name!r} "
            "already steps the global model with its own; use an averaging strategy (fedavg, fedprox, ...)"
        )
    if name == "pretrain":
        for key, off in (("target_stats", False), ("refit", "off")):
            if getattr(p, key) != off:
                raise ConfigError(f"{where}: [pretrain].{key} applies to fine-tuning only (the heads' targets)")
        return
    if not p.ridge > 0:
        raise ConfigError(f"{where}: [finetune].ridge must be > 0, not {p.ridge}")
    from fedecho.models import get_task

    if p.ridge != FedPhaseSection.ridge and p.refit == "off":
        raise ConfigError(f'{where}: [finetune].ridge is the refit\'s penalty, and [finetune].refit = "off"')
    if (p.target_stats or p.refit != "off") and not any(get_task(t).kind == "regression" for t in p.tasks):
        key = "target_stats" if p.target_stats else "refit"
        raise ConfigError(f"{where}: [finetune].{key} needs a regression task (ef, esv, edv) in [finetune].tasks")


def check_dp(cfg: FedRunConfig, where: str) -> None:
    """[dp] values, and a fine-tuned model DP-SGD can train (no BatchNorm: per-sample gradients need none)."""
    dp = cfg.dp
    if dp.noise_multiplier <= 0:
        raise ConfigError(f"{where}: [dp].noise_multiplier must be > 0, not {dp.noise_multiplier}")
    if dp.max_grad_norm <= 0:
        raise ConfigError(f"{where}: [dp].max_grad_norm must be > 0, not {dp.max_grad_norm}")
    if not dp.enabled:
        return
    for name in cfg.phases:
        if cfg.phase(name).accumulate != 1:
            raise ConfigError(f"{where}: [{name}].accumulate must be 1 with [dp] enabled (DP-SGD clips per step)")
    if _batchnorm_in_finetuning(cfg):
        raise ConfigError(
            f'{where}: [model].stf_norm must be "group" with [dp] enabled: BatchNorm in STF-Net or the MLP '
            "head mixes the samples of a batch, so per-sample gradients (DP-SGD) do not exist"
        )


def check_server_optimizer(cfg: FedRunConfig, where: str) -> None:
    """A server optimiser (FedAdam, FedYogi) steps every exchanged tensor by its adaptive rule, so
    BatchNorm's running statistics would move by eta a round instead of tracking the features."""
    from fedecho.fl.strategies import server_optimizer_params

    if server_optimizer_params(cfg.strategy_name, cfg.strategy_params) and _batchnorm_in_finetuning(cfg):
        raise ConfigError(
            f'{where}: [model].stf_norm must be "group" with [strategy].name = "{cfg.strategy_name}": its server '
            "optimiser would step BatchNorm's running statistics like weights"
        )


def _batchnorm_in_finetuning(cfg: FedRunConfig) -> bool:
    """Whether the fine-tuned model has BatchNorm (STF-Net or the MLP head with stf_norm = "batch")."""
    if "finetune" not in cfg.phases:
        return False
    from fedecho.models import model_config

    mc = model_config(cfg.local.model_name, **cfg.local.model_overrides)
    return mc.stf_norm == "batch" and (mc.fusion == "stf" or mc.head == "mlp")


def load_fed_run_config(path: str | Path) -> FedRunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such run file")
    cfg = parse_run_config(path.read_text(), str(path))
    cfg.path = path
    return cfg


def round_lr(phase: FedPhaseSection, server_round: int) -> float:
    """Learning rate for a round: linear warm-up over warmup_rounds, then cosine to min_lr."""
    import math

    if phase.warmup_rounds and server_round <= phase.warmup_rounds:
        return phase.min_lr + (phase.lr - phase.min_lr) * server_round / (phase.warmup_rounds + 1)
    span = max(1, phase.rounds - phase.warmup_rounds)
    t = (server_round - phase.warmup_rounds - 1) / span
    return phase.min_lr + 0.5 * (phase.lr - phase.min_lr) * (1 + math.cos(math.pi * t))


def round_seed(seed: int, phase: str, server_round: int, site: str = "") -> int:
    """A seed that depends only on the run, phase, round and site: resumed runs replay exactly."""
    import hashlib

    digest = hashlib.sha256(f"{seed}/{phase}/{server_round}/{site}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


__all__ = [
    "PHASES",
    "WIRE_DTYPES",
    "ConfigError",
    "DPSection",
    "FedPhaseSection",
    "FedRunConfig",
    "RunSection",
    "load_fed_run_config",
    "parse_run_config",
    "round_lr",
    "round_seed",
]
