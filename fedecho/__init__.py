"""fedecho: federated echocardiography video foundation models on Flower."""

from fedecho import _env as _env

__version__ = "0.1.0"
