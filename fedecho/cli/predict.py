"""`fedecho predict VIDEO --checkpoint CKPT`: one AVI or DICOM cine in, the heads' estimates out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from fedecho._env import set_torch_threads
from fedecho.data import AS_CLASSES, BadFile, ClipSampler, VideoRecord, decode_video
from fedecho.data.clips import test_time_clips
from fedecho.models import CheckpointError, load_checkpoint
from fedecho.train import pick_device, predict_clips


def read_video(path: Path, size: int) -> np.ndarray:
    """Decode one file with the matching source's decoder, frames fit to size x size."""
    if path.suffix.lower() == ".avi":
        from fedecho.data.echonet import EchoNetSource as Source
    else:
        import pydicom

        from fedecho.data.dicom import DicomArchiveSource as Source
        from fedecho.data.dicom import check_header

        check_header(pydicom.dcmread(path, stop_before_pixels=False, defer_size=1024), min_frames=2)
    return decode_video(Source(path.parent), VideoRecord(key=path.name, files=(path,), split=""), size)


def predict(
    video: Path = typer.Argument(..., exists=True, dir_okay=False, help="An EchoNet-style .avi or a DICOM cine."),
    checkpoint: Path = typer.Option(..., "--checkpoint", exists=True, dir_okay=False, help="Fine-tuned checkpoint."),
    period: int = typer.Option(
        0, "--period", min=0, help="Clip convention: 0 spreads frames evenly; k takes every k-th."
    ),
    max_clips: int = typer.Option(0, "--max-clips", min=0, help="Average over at most this many clips (0: all)."),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda."),
) -> None:
    """LVEF (and every other head of the checkpoint), averaged over all clips of the video.

    Example: fedecho predict data/phantom/Videos/0X1A2B.avi --checkpoint runs/tiny/finetune/model.safetensors
    """
    set_torch_threads()
    console = Console()
    try:
        model = load_checkpoint(checkpoint).to(pick_device(device))
        if not model.cfg.tasks:
            raise CheckpointError(f"{checkpoint}: has no task heads (a pre-training checkpoint?)")
        frames = read_video(video, model.cfg.img_size)
    except (CheckpointError, BadFile, ValueError) as e:
        Console(stderr=True).print(f"[red]error:[/] {video.name}: {e}")
        raise typer.Exit(2) from e
    clips, frame_index = test_time_clips(frames, ClipSampler(model.cfg.num_frames, period or None), max_clips or None)
    out = predict_clips(model, clips, frame_index)
    table = Table(title=f"{video.name}: {len(frames)} frames, {len(clips)} clips averaged")
    table.add_column("head")
    table.add_column("estimate", justify="right")
    units = {"ef": "% (LVEF)", "esv": "mL", "edv": "mL"}
    for name, value in out.items():
        if name == "ef_class":
            table.add_row(name, f"P(EF >= threshold) = {float(value):.3f}")
        elif name == "as_class":
            table.add_row(name, ", ".join(f"{c} {p:.2f}" for c, p in zip(AS_CLASSES, value, strict=True)))
        else:
            table.add_row(name, f"{float(value):.1f} {units.get(name, '')}")
    console.print(table)
