"""timm-style registry: a name maps to a function returning a ModelConfig; create_model builds."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fedecho.models.config import ModelConfig

if TYPE_CHECKING:
    from fedecho.models.echo_vision_fm import EchoVisionFM

_REGISTRY: dict[str, Callable[..., ModelConfig]] = {}


def register_model(fn: Callable[..., ModelConfig]) -> Callable[..., ModelConfig]:
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    _load()
    return sorted(_REGISTRY)


def model_config(name: str, **overrides: Any) -> ModelConfig:
    _load()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**overrides)


def create_model(name: str | ModelConfig, decoder: bool = True, **overrides: Any) -> EchoVisionFM:
    """Build a registered model (e.g. create_model("echo_vit_tiny", tasks=["ef"], fusion="stf"))."""
    from fedecho.models.echo_vision_fm import EchoVisionFM

    cfg = name.replace(**overrides) if isinstance(name, ModelConfig) else model_config(name, **overrides)
    return EchoVisionFM(cfg, decoder=decoder)


def _load() -> None:
    import fedecho.models.echo_vision_fm  # noqa: F401  (registers the family)
