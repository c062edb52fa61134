"""Aggregation strategies by name: Flower's own strategy classes, configured from the run file.

fedecho does not rewrite aggregation. It picks one of Flower's strategies and drives it from its
own round loop (`fedecho.server.rounds`), which adds what Flower lacks: persistence and resume.
For resume, a strategy's server-side optimiser state (FedAdam/FedYogi moments, FedAvgM momentum)
is read out of and written back into the Flower object (`strategy_state`, `load_strategy_state`).
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from fedecho.train.config import ConfigError

STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedavgm": FedAvgM,
    "fedtrimmedavg": FedTrimmedAvg,
    "fedmedian": FedMedian,
    "krum": Krum,
}

# Central DP: Flower's server-side wrappers around the chosen strategy ([strategy] central_dp = "fixed" | "adaptive").
CENTRAL_DP: dict[str, type[Strategy]] = {
    "fixed": DifferentialPrivacyServerSideFixedClipping,
    "adaptive": DifferentialPrivacyServerSideAdaptiveClipping,
}

# Set by fedecho from [run] (sampling, minimum replies) or fixed by the exchange format.
_OWNED = {
    "fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes", "min_available_nodes",
    "weighted_by_key", "arrayrecord_key", "configrecord_key", "train_metrics_aggr_fn", "evaluate_metrics_aggr_fn",
}  # fmt: skip


def strategy_parameters(name: str) -> dict[str, Any]:
    """The parameters a strategy takes from [strategy], with their defaults."""
    cls = STRATEGIES[name]
    params: dict[str, Any] = {}
    for klass in cls.__mro__:  # FedMedian & co. take **kwargs and pass them to FedAvg
        if klass is object or not hasattr(klass, "__init__"):
            continue
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in _OWNED:
                params.setdefault(p.name, p.default)
    return params


def central_dp_parameters(kind: str) -> dict[str, Any]:
    """The parameters a central-DP wrapper takes from [strategy] (beside central_dp), with their defaults."""
    sig = inspect.signature(CENTRAL_DP[kind].__init__)
    return {
        p.name: p.default
        for p in sig.parameters.values()
        if p.name not in ("self", "strategy", "accountant") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def split_strategy_params(
    params: dict[str, Any], where: str = "run file"
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """[strategy] parameters -> (central_dp kind or "", the strategy's own, the DP wrapper's)."""
    kind = params.get("central_dp", "")
    if not isinstance(kind, str) or kind not in ("", *CENTRAL_DP):
        raise ConfigError(f"{where}: [strategy].central_dp must be one of {', '.join(map(repr, CENTRAL_DP))}")
    dp_keys = set(central_dp_parameters(kind)) if kind else set()
    own = {k: v for k, v in params.items() if k != "central_dp" and k not in dp_keys}
    wrapper = {k: v for k, v in params.items() if k in dp_keys}
    return kind, own, wrapper


def check_strategy(name: str, params: dict[str, Any], where: str = "run file") -> None:
    if name not in STRATEGIES:
        raise ConfigError(f"{where}: [strategy].name {name!r} is not one of {', '.join(STRATEGIES)}")
    kind, params, wrapper = split_strategy_params(params, where)
    known = strategy_parameters(name)
    for key, value in params.items():
        if key not in known:
            hint = f" (known: {', '.join(sorted(known))})" if known else " (it takes no parameters)"
            raise ConfigError(f"{where}: [strategy].{key} is not a parameter of {name}{hint}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: [strategy].{key} must be a number, not {value!r}")
    if kind:
        for key, default in central_dp_parameters(kind).items():
            if key not in wrapper and default is inspect.Parameter.empty:
                raise ConfigError(f"{where}: [strategy].{key} is required with central_dp = {kind!r}")
        for key, value in wrapper.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{where}: [strategy].{key} must be a number, not {value!r}")


class StrategyWrapper(Strategy):
    """A Flower strategy around another, as Flower's DP wrappers are: everything it does not change goes to the
    wrapped strategy (`strategy`). Subclasses override what they add to."""

    def __init__(self, strategy: Strategy):
        self.strategy = strategy

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()


class OuterOptimizer(StrategyWrapper):
    """DiLoCo's outer step around any averaging strategy: the round's aggregate minus the global model is
    a pseudo-gradient, and the global model steps along it with (Nesterov) momentum at rate `lr`.

    With lr = 1 and momentum 0 this is the inner strategy itself. The momentum is the server's state
    (`strategy_state`), checkpointed every round, so a resumed run steps exactly as before."""

    def __init__(self, strategy: Strategy, lr: float, momentum: float = 0.0, nesterov: bool = True):
        self.strategy, self.lr, self.momentum, self.nesterov = strategy, lr, momentum, nesterov
        self.outer_momentum: dict[str, np.ndarray] = {}
        self._current: ArrayRecord | None = None

    def __repr__(self) -> str:
        kind = "Nesterov" if self.nesterov else "heavy-ball"
        return f"OuterOptimizer({self.strategy!r}, lr={self.lr}, momentum={self.momentum}, {kind})"

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._current = arrays  # the global model the round starts from
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        aggregate, metrics = self.strategy.aggregate_train(server_round, replies)
        if aggregate is None or self._current is None:
            return aggregate, metrics
        stepped = ArrayRecord()
        for k in aggregate:
            x = self._current[k].numpy().astype(np.float32)
            step = x - aggregate[k].numpy().astype(np.float32)  # the pseudo-gradient
            m = self.momentum * self.outer_momentum.get(k, np.zeros_like(x)) + step
            self.outer_momentum[k] = m
            direction = step + self.momentum * m if self.nesterov else m
            stepped[k] = Array(x - self.lr * direction)
        return stepped, metrics


def build_strategy(
    name: str,
    params: dict[str, Any],
    *,
    fraction: float,
    min_sites: int,
    outer: tuple[float, float, bool] | None = None,
) -> Strategy:
    """A Flower strategy that samples `fraction` of the connected sites (at least min_sites) and
    needs min_sites of them connected; fedecho runs federated evaluation itself. `outer`: (lr, momentum,
    nesterov) of an outer optimiser around it (`OuterOptimizer`), outside any central-DP wrapper, so it
    steps along the already private aggregate."""
    check_strategy(name, params)
    kind, params, wrapper = split_strategy_params(params)
    sampling = {
        "fraction_train": fraction,
        "fraction_evaluate": fraction,
        "min_train_nodes": min_sites,
        "min_evaluate_nodes": min_sites,
        "min_available_nodes": min_sites,
    }
    strategy = STRATEGIES[name](**sampling, **params)
    if kind:
        try:
            strategy = CENTRAL_DP[kind](strategy, **wrapper)
        except ValueError as e:  # Flower checks the DP parameters against each other
            raise ConfigError(f"[strategy] central_dp = {kind!r}: {e}") from e
    return OuterOptimizer(strategy, *outer) if outer is not None and outer[0] > 0 else strategy


def seed_sampling(seed: int) -> None:
    """Flower samples sites with the `random` module: seed it so a resumed run samples the same."""
    random.seed(seed)


def server_optimizer_params(name: str, params: dict[str, Any]) -> dict[str, Any] | None:
    """[strategy] over the defaults when the strategy is a server optimiser (it takes `eta`: FedAdam,
    FedYogi), None for one that only averages or votes."""
    merged = {**strategy_parameters(name), **params}
    return merged if "eta" in merged else None


def schedule_server_lr(strategy: Strategy, peak: float | None, factor: float) -> None:
    """A server optimiser (FedAdam, FedYogi) steps the global model by eta: it follows the phase's
    warm-up and cosine like the local learning rate does (eta from [strategy] is the peak), because
    one local SGD step's size no longer matters once the server normalises the update."""
    inner = _inner(strategy)
    if peak is not None and hasattr(inner, "eta"):
        inner.eta = peak * factor  # type: ignore[attr-defined]


def server_peak_lr(strategy: Strategy) -> float | None:
    """The configured eta of a server optimiser, None for a strategy that only averages."""
    eta = getattr(_inner(strategy), "eta", None)
    return None if eta is None else float(eta)


_STATE_ATTRS = ("m_t", "v_t", "momentum_vector")


def _unwrap_outer(strategy: Strategy) -> Strategy:
    return strategy.strategy if isinstance(strategy, OuterOptimizer) else strategy


def _inner(strategy: Strategy) -> Strategy:
    """The aggregating strategy inside an outer optimiser and a central-DP wrapper (the strategy itself otherwise)."""
    strategy = _unwrap_outer(strategy)
    return getattr(strategy, "strategy", strategy) if type(strategy) in CENTRAL_DP.values() else strategy


def strategy_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """The strategy's optimiser state as flat arrays ("attr/tensor name" -> array): an outer optimiser's
    momentum, the strategy's own moments, and under central DP the wrapper's current clipping norm (adaptive
    clipping moves it every round)."""
    out: dict[str, np.ndarray] = {}
    if isinstance(strategy, OuterOptimizer):
        out.update({f"outer_momentum/{k}": np.ascontiguousarray(v) for k, v in strategy.outer_momentum.items()})
        strategy = strategy.strategy
    if strategy is not _inner(strategy):
        out["clipping_norm/value"] = np.array([float(strategy.clipping_norm)])  # type: ignore[attr-defined]
    strategy = _inner(strategy)
    for attr in _STATE_ATTRS:
        value = getattr(strategy, attr, None)
        if isinstance(value, list):  # FedAvgM keeps a list in parameter order
            value = {f"#{i:05d}": v for i, v in enumerate(value)}
        if isinstance(value, dict):
            for k, v in value.items():
                out[f"{attr}/{k}"] = np.ascontiguousarray(v)
    return out


def load_strategy_state(strategy: Strategy, state: dict[str, np.ndarray]) -> None:
    if isinstance(strategy, OuterOptimizer):
        prefix = "outer_momentum/"
        strategy.outer_momentum = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        strategy = strategy.strategy
    if "clipping_norm/value" in state and strategy is not _inner(strategy):
        strategy.clipping_norm = float(state["clipping_norm/value"][0])  # type: ignore[attr-defined]
    strategy = _inner(strategy)
    for attr in _STATE_ATTRS:
        prefix = f"{attr}/"
        part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if part:
            if not hasattr(strategy, attr):
                raise ValueError(f"saved state has {attr} but {type(strategy).__name__} keeps none")
            is_list = all(k.startswith("#") for k in part)
            setattr(strategy, attr, [part[k] for k in sorted(part)] if is_list else part)
