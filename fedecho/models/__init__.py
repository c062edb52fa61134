"""Models: the Echo-Vision-FM family behind a timm-style registry.

from fedecho.models import create_model, load_checkpoint
model = create_model("echo_vit_tiny", tasks=["ef"])      # fusion="stf" | "max"
tokens = model.forward_features(video)                    # (B, N, C), video (B, 3, T, H, W) in [0, 1]
"""

from fedecho.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fedecho.models.config import ModelConfig
from fedecho.models.echo_vision_fm import EchoVisionFM
from fedecho.models.heads import TASKS, Task, get_task
from fedecho.models.registry import create_model, list_models, model_config, register_model

__all__ = [
    "TASKS",
    "CheckpointError",
    "EchoVisionFM",
    "ModelConfig",
    "Task",
    "create_model",
    "get_task",
    "list_models",
    "load_checkpoint",
    "model_config",
    "register_model",
    "save_checkpoint",
]
