"""`fedecho train pretrain|finetune|evaluate`: the local training engine from a run config."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fedecho._env import set_torch_threads

app = typer.Typer(help="Train locally: masked-autoencoder pre-training, fine-tuning, evaluation.", no_args_is_help=True)

CONFIG = typer.Option(
    ..., "--config", "-c", exists=True, dir_okay=False, help="Run config (TOML), e.g. configs/phantom_tiny.toml."
)
DATA = typer.Option(None, "--data", help="Data folder (overrides [data] root).")
DEVICE = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available).")
DEVICES = typer.Option(
    1, "--devices", min=1,
    help="Data-parallel over this many GPUs (or CPU processes with --device cpu); the batch size is the global batch.",
)  # fmt: skip


def _fail(e: Exception) -> typer.Exit:
    Console(stderr=True).print(f"[red]error:[/] {e}")
    return typer.Exit(2)


def _out(out: Path | None, config: Path, phase: str) -> Path:
    return out or Path("runs") / config.stem / phase


def _run(
    phase: str,
    config: Path,
    data: Path | None,
    out: Path | None,
    resume: bool,
    init: Path | None,
    device: str | None,
    devices: int = 1,
) -> None:
    from fedecho.data import SourceError
    from fedecho.models import CheckpointError
    from fedecho.train import ConfigError, load_run_config, train_phase

    set_torch_threads()
    try:
        cfg = load_run_config(config)
        folder = _out(out, config, phase)
        last = train_phase(cfg, phase, folder, data, resume, init, device, devices=devices)  # type: ignore[arg-type]
    except (ConfigError, SourceError, CheckpointError, ValueError) as e:
        raise _fail(e) from e
    Console().print(f"[green]done[/]: {folder}/model.safetensors; metrics in {folder}/metrics.jsonl")
    if last.get("phase") == "test":
        _table({k: v for k, v in last.items() if k not in ("phase", "epoch")}, "test split")


def _table(metrics: dict[str, float], title: str) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    Console().print(table)


@app.command()
def pretrain(
    config: Path = CONFIG,
    data: Path | None = DATA,
    out: Path | None = typer.Option(None, "--out", "-o", help="Output folder (default runs/<config>/pretrain)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out from its last epoch."),
    device: str | None = DEVICE,
    devices: int = DEVICES,
) -> None:
    """Masked-autoencoder (VideoMAE) pre-training with the [pretrain] settings.

    Example: fedecho train pretrain --config configs/phantom_tiny.toml --out runs/tiny/pretrain
    """
    _run("pretrain", config, data, out, resume, None, device, devices)


@app.command()
def finetune(
    config: Path = CONFIG,
    data: Path | None = DATA,
    out: Path | None = typer.Option(None, "--out", "-o", help="Output folder (default runs/<config>/finetune)."),
    init: Path | None = typer.Option(None, "--init", help="Pre-trained checkpoint whose encoder to start from."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out from its last epoch."),
    device: str | None = DEVICE,
    devices: int = DEVICES,
) -> None:
    """Fine-tune encoder (or probe it frozen) with STF-Net or max-pool fusion and task heads.

    Example: fedecho train finetune --config configs/phantom_tiny.toml --init runs/tiny/pretrain/model.safetensors
    """
    _run("finetune", config, data, out, resume, init, device, devices)


@app.command("evaluate")
def evaluate_cmd(
    config: Path = CONFIG,
    checkpoint: Path = typer.Option(..., "--checkpoint", exists=True, dir_okay=False, help="Fine-tuned checkpoint."),
    data: Path | None = DATA,
    split: str = typer.Option("test", "--split", help="train, val or test."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the metrics here as JSON."),
    device: str | None = DEVICE,
) -> None:
    """Full-split metrics (MAE, RMSE, R2; accuracy, F1, AUROC), averaging over all clips of each video.

    Example: fedecho train evaluate --config configs/phantom_tiny.toml --checkpoint runs/tiny/finetune/model.safetensors
    """
    from fedecho.data import SourceError
    from fedecho.models import CheckpointError
    from fedecho.train import ConfigError, evaluate_checkpoint, load_run_config

    set_torch_threads()
    if split not in ("train", "val", "test"):
        raise typer.BadParameter("must be train, val or test", param_hint="--split")
    try:
        metrics = evaluate_checkpoint(load_run_config(config), checkpoint, split, data, device)
    except (ConfigError, SourceError, CheckpointError, ValueError) as e:
        raise _fail(e) from e
    _table(metrics, f"{split} split")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(metrics, indent=2) + "\n")
