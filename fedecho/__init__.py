"""fedecho: federated echocardiography video foundation models on Flower."""

from fedecho import _env as _env  # noqa: F401  (privacy: telemetry off before any library loads)

__version__ = "0.1.0"
