"""Aggregation strategies by name: Flower's own strategy classes, configured from the run file.

fedecho does not rewrite aggregation. It picks one of Flower's strategies and drives it from its
own round loop (`fedecho.server.rounds`), which adds what Flower lacks: persistence and resume.
For resume, a strategy's server-side optimiser state (FedAdam/FedYogi moments, FedAvgM momentum)
is read out of and written back into the Flower object (`strategy_state`, `load_strategy_state`).
"""

from __future__ import annotations

import inspect
import random
from typing import Any

import numpy as np
from flwr.serverapp.strategy import (
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


def check_strategy(name: str, params: dict[str, Any], where: str = "run file") -> None:
    if name not in STRATEGIES:
        raise ConfigError(f"{where}: [strategy].name {name!r} is not one of {', '.join(STRATEGIES)}")
    known = strategy_parameters(name)
    for key, value in params.items():
        if key not in known:
            hint = f" (known: {', '.join(sorted(known))})" if known else " (it takes no parameters)"
            raise ConfigError(f"{where}: [strategy].{key} is not a parameter of {name}{hint}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: [strategy].{key} must be a number, not {value!r}")


def build_strategy(name: str, params: dict[str, Any], *, fraction: float, min_sites: int) -> Strategy:
    """A Flower strategy that samples `fraction` of the connected sites (at least min_sites) and
    needs min_sites of them connected; fedecho runs federated evaluation itself."""
    check_strategy(name, params)
    sampling = {
        "fraction_train": fraction,
        "fraction_evaluate": fraction,
        "min_train_nodes": min_sites,
        "min_evaluate_nodes": min_sites,
        "min_available_nodes": min_sites,
    }
    return STRATEGIES[name](**sampling, **params)


def seed_sampling(seed: int) -> None:
    """Flower samples sites with the `random` module: seed it so a resumed run samples the same."""
    random.seed(seed)


_STATE_ATTRS = ("m_t", "v_t", "momentum_vector")


def strategy_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """The strategy's optimiser state as flat arrays ("attr/tensor name" -> array)."""
    out: dict[str, np.ndarray] = {}
    for attr in _STATE_ATTRS:
        value = getattr(strategy, attr, None)
        if isinstance(value, list):  # FedAvgM keeps a list in parameter order
            value = {f"#{i:05d}": v for i, v in enumerate(value)}
        if isinstance(value, dict):
            for k, v in value.items():
                out[f"{attr}/{k}"] = np.ascontiguousarray(v)
    return out


def load_strategy_state(strategy: Strategy, state: dict[str, np.ndarray]) -> None:
    for attr in _STATE_ATTRS:
        prefix = f"{attr}/"
        part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if part:
            if not hasattr(strategy, attr):
                raise ValueError(f"saved state has {attr} but {type(strategy).__name__} keeps none")
            is_list = all(k.startswith("#") for k in part)
            setattr(strategy, attr, [part[k] for k in sorted(part)] if is_list else part)
