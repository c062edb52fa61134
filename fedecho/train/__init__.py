"""Local training: pre-training, fine-tuning and evaluation, the engine the ClientApp calls."""

from fedecho.train.config import ConfigError, DataSection, PhaseSection, RunConfig, load_run_config
from fedecho.train.engine import Trainer, evaluate, pick_device, predict_clips, pretrain_loss
from fedecho.train.job import JobResult, TrainingJob
from fedecho.train.run import evaluate_checkpoint, make_datasets, read_metrics, train_phase

__all__ = [
    "ConfigError",
    "DataSection",
    "JobResult",
    "PhaseSection",
    "RunConfig",
    "Trainer",
    "TrainingJob",
    "evaluate",
    "evaluate_checkpoint",
    "load_run_config",
    "make_datasets",
    "pick_device",
    "predict_clips",
    "pretrain_loss",
    "read_metrics",
    "train_phase",
]
