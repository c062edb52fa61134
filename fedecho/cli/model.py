"""`fedecho model list|import`: the model zoo and published-weight import."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="The model zoo and import of published VideoMAE / Echo-Vision-FM weights.", no_args_is_help=True)


@app.command("list")
def list_cmd() -> None:
    """Registered configurations with their sizes.

    Example: fedecho model list
    """
    from fedecho.models import create_model, list_models

    table = Table(title="fedecho model zoo")
    for col in ("name", "input", "encoder", "decoder", "tokens", "encoder params", "STF-Net params (EF head)"):
        table.add_column(col, justify="right" if col != "name" else "left")
    for name in list_models():
        m = create_model(name, tasks=["ef"])
        c = m.cfg
        count = lambda mod: f"{sum(p.numel() for p in mod.parameters()) / 1e6:.1f} M"  # noqa: E731
        table.add_row(
            name, f"{c.num_frames}x{c.img_size}x{c.img_size}", f"{c.embed_dim}/{c.depth}/{c.num_heads}",
            f"{c.decoder_dim}/{c.decoder_depth}/{c.decoder_heads}", str(c.num_tokens),
            count(m.encoder), count(m.fusion) if m.fusion is not None else "-",
        )  # fmt: skip
    Console().print(table)


@app.command("import")
def import_cmd(
    source: Path = typer.Argument(..., exists=True, help="transformers save_pretrained folder, or a state-dict file."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .safetensors (its config goes to OUT.json)."),
    img_size: int | None = typer.Option(None, "--image-size", help="Bare state dicts: input size (default 224)."),
    frames: int | None = typer.Option(None, "--frames", help="Bare state dicts: frames (default 16)."),
    heads: int | None = typer.Option(None, "--heads", help="Bare state dicts: attention heads (default width/64)."),
) -> None:
    """Import VideoMAE weights (VideoMAEForPreTraining / VideoMAEModel, as Echo-Vision-FM released them).

    Example: fedecho model import ./echo-vision-fm-weights --out weights/echo_vision_fm.safetensors
    """
    from fedecho.models import CheckpointError, save_checkpoint
    from fedecho.models.convert import import_weights

    try:
        model = import_weights(source, img_size=img_size, num_frames=frames, num_heads=heads)
    except (CheckpointError, KeyError, ValueError) as e:
        Console(stderr=True).print(f"[red]error:[/] {source}: cannot import ({type(e).__name__}: {e})")
        raise typer.Exit(2) from e
    save_checkpoint(model, out, {"imported_from": source.name})
    c = model.cfg
    Console().print(
        f"[green]imported[/] {source} -> {out}: encoder {c.embed_dim}/{c.depth}/{c.num_heads}, "
        f"{c.num_frames}x{c.img_size}px, decoder {'yes' if model.decoder is not None else 'no'}"
    )
