"""Run configuration (TOML): [model], [data], [pretrain], [finetune].

Every section maps onto a dataclass; an unknown key or a value of the wrong type is an error
that names the file, the section and the field.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedecho._toml import ConfigError, check_sections, unknown_keys

RUN_SECTIONS = ("model", "data", "pretrain", "finetune")  # a local run file's; a federated one adds its own


@dataclass
class DataSection:
    """Where the data is and how clips are drawn (frame size and count come from the model)."""

    root: str = ""
    source: str = "auto"
    labels: str = ""  # DICOM archives: the site's labels CSV
    cache: str = ""  # default: ~/.cache/fedecho/frames
    period: int = 0  # 0: frames spread evenly over the video (the paper); k: every k-th frame
    max_test_clips: int = 8  # test-time averaging: at most this many clips per video (0: all)
    label_fraction: float = 1.0  # fine-tune on this fraction of the labelled training videos
    augment: bool = True
    # DataLoader worker processes per training process; "auto": from the CPU cores it was granted and whether it
    # trains on a GPU (`fedecho.train.loader.auto_workers`)
    num_workers: int | Literal["auto"] = "auto"


@dataclass
class PhaseSection:
    """One training phase's optimisation settings."""

    epochs: int = 10
    batch_size: int = 8
    accumulate: int = 1  # gradient accumulation steps
    optimizer: Literal["adamw", "sgd"] = "adamw"  # sgd: heavy-ball momentum 0.9 (the local step under FedAdam)
    lr: float = 1e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    warmup_epochs: float = 1.0
    layer_decay: float = 1.0  # < 1: layer-wise LR decay over encoder blocks (VideoMAE fine-tuning: 0.75)
    seed: int = 0
    eval_every: int = 1  # epochs between evaluations (fine-tuning)
    tasks: list[str] = field(default_factory=lambda: ["ef"])
    freeze_encoder: bool = False  # linear probing (STF-Net and heads still train)
    init: str = ""  # checkpoint to start from (fine-tuning: the pre-trained encoder)
    # LoRA (fine-tuning, `fedecho.models.lora`): rank-r adapters beside the encoder blocks' linear layers train
    # instead of the encoder itself; alpha scales them (alpha / rank); targets name the layers (timm's names).
    lora_rank: int = 0  # 0: off
    lora_alpha: float = 0.0  # 0: the rank (scaling 1)
    lora_targets: list[str] = field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"])


@dataclass
class RunConfig:
    model: dict[str, Any]
    data: DataSection
    pretrain: PhaseSection
    finetune: PhaseSection
    path: Path | None = None

    @property
    def model_name(self) -> str:
        return str(self.model.get("name", "echo_vit_tiny"))

    @property
    def model_overrides(self) -> dict[str, Any]:
        return {k: v for k, v in self.model.items() if k != "name"}

    def with_data(self, **changes: Any) -> RunConfig:
        """A copy whose [data] differs (a site's or the server's own cache and labels): one run file is
        shared by every site of a run and by the server, so nobody changes it in place."""
        return dataclasses.replace(self, data=dataclasses.replace(self.data, **changes))


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    hint = typing.get_origin(annotation) or annotation
    if hint is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{where} must be one of {', '.join(map(repr, choices))}, not {value!r}")
        return value
    if isinstance(annotation, types.UnionType) or hint is typing.Union:
        args = typing.get_args(annotation)
        words = [w for a in args if typing.get_origin(a) is Literal for w in typing.get_args(a)]
        others = [a for a in args if typing.get_origin(a) is not Literal]
        if words and value in words:
            return value
        if words and len(others) == 1:  # a number or a word ("auto"): say both in the error
            try:
                return _check_type(value, others[0], where)
            except ConfigError as e:
                choices = " or ".join(map(repr, words))
                raise ConfigError(f"{str(e).split(', not ')[0]} or {choices}, not {value!r}") from None
        hint = tuple(args)
    if annotation is float or hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, not {value!r}")
        return float(value)
    if annotation is int or hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, not {value!r}")
        return value
    if annotation is bool or hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, not {value!r}")
        return value
    if annotation is str or hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, not {value!r}")
        return value
    if hint is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, not {value!r}")
        (inner,) = typing.get_args(annotation)
        return [_check_type(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def section(cls: type, raw: dict[str, Any], where: str) -> Any:
    """Build a section dataclass from a TOML table, naming the field on any mistake."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    hints = typing.get_type_hints(cls)
    error = unknown_keys(raw, (f.name for f in dataclasses.fields(cls)), where)
    if error is not None:
        raise error
    values = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in raw.items()}
    return cls(**values)


def parse_sections(
    raw: dict[str, Any], where: str, phase_cls: type[PhaseSection] = PhaseSection, extra: frozenset[str] = frozenset()
) -> RunConfig:
    """[model], [data], [pretrain], [finetune] of a parsed run file (local or federated: `extra`
    names the sections the caller reads itself), with the model checked before any data is read."""
    check_sections(raw, where, {*RUN_SECTIONS, *extra})
    model = raw.get("model", {})
    if not isinstance(model, dict):
        raise ConfigError(f"{where}: [model] must be a table")
    from fedecho.models import ModelConfig

    error = unknown_keys(model, ["name", *(f.name for f in dataclasses.fields(ModelConfig))], f"{where}: [model]")
    if error is not None:
        raise error
    cfg = RunConfig(
        model=model,
        data=section(DataSection, raw.get("data", {}), f"{where}: [data]"),
        pretrain=section(phase_cls, raw.get("pretrain", {}), f"{where}: [pretrain]"),
        finetune=section(phase_cls, raw.get("finetune", {}), f"{where}: [finetune]"),
    )
    from fedecho.models import model_config

    try:
        model_config(cfg.model_name, **cfg.model_overrides)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: [model] {e}") from e
    return cfg


def load_run_config(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from e
    cfg = parse_sections(raw, str(path))
    from fedecho.models.lora import check_lora

    check_lora(cfg, str(path))
    cfg.path = path
    return cfg
