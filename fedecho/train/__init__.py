"""Local training: pre-training, fine-tuning and evaluation, the engine the ClientApp calls."""

from fedecho.train.config import ConfigError, DataSection, PhaseSection, RunConfig, load_run_config
from fedecho.train.engine import Trainer, evaluate, make_loader, pick_device, predict_clips, pretrain_loss
from fedecho.train.run import evaluate_checkpoint, make_datasets, read_metrics, train_phase

__all__ = [
    "ConfigError",
    "DataSection",
    "PhaseSection",
    "RunConfig",
    "Trainer",
    "evaluate",
    "evaluate_checkpoint",
    "load_run_config",
    "make_datasets",
    "make_loader",
    "pick_device",
    "predict_clips",
    "pretrain_loss",
    "read_metrics",
    "train_phase",
]
