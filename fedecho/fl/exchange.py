"""What travels between the server and the sites, in which precision, and how it is checked.

- Only the tensors a phase trains travel (`exchanged_keys`): in frozen-encoder fine-tuning that is
  STF-Net and the heads; the frozen encoder reaches a site once and is kept there (`FrozenStore`).
- Tensors travel as float32, float16 or bfloat16 (`encode`/`decode`); numpy has no bfloat16, so
  bfloat16 travels as its raw 16-bit pattern. Both sides keep fp32 masters: the server sends the
  global weights, a site trains in fp32 and sends back its update (local - received), and the
  server adds the decoded update to its fp32 master, so wire rounding never accumulates.
- Every incoming update is checked (names, shapes, dtype, finite values, optional norm bound)
  before anything aggregates it; a bad one raises UpdateError naming the tensor.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from safetensors.torch import load_file, save_file

from fedecho.models import EchoVisionFM
from fedecho.storage.files import atomic_path

WIRE_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WIRE_NUMPY = {"float32": "float32", "float16": "float16", "bfloat16": "int16"}  # bf16 as its bit pattern


class UpdateError(ValueError):
    """An update that must not reach the global model."""


def exchanged_keys(model: EchoVisionFM, phase: str, freeze_encoder: bool = False) -> list[str]:
    """State-dict entries that train in this phase, hence travel each round (float tensors only:
    BatchNorm's counters stay local)."""
    if phase == "pretrain":
        prefixes: tuple[str, ...] = ("encoder.", "decoder.")
    else:
        prefixes = ("fusion.", "heads.") if freeze_encoder else ("encoder.", "fusion.", "heads.")
    return [k for k, v in model.state_dict().items() if k.startswith(prefixes) and v.is_floating_point()]


def frozen_keys(model: EchoVisionFM, phase: str, freeze_encoder: bool = False) -> list[str]:
    """Tensors a site needs but does not train: the encoder during frozen-encoder fine-tuning."""
    if phase == "finetune" and freeze_encoder:
        return [k for k in model.state_dict() if k.startswith("encoder.")]
    return []


def encode(state: dict[str, torch.Tensor], wire_dtype: str) -> ArrayRecord:
    """float32 tensors -> an ArrayRecord in the wire precision."""
    record = ArrayRecord()
    dtype = WIRE_TORCH[wire_dtype]
    for k, v in state.items():
        t = v.detach().to("cpu", dtype).contiguous()
        arr = t.view(torch.int16).numpy() if dtype is torch.bfloat16 else t.numpy()
        record[k] = Array(arr)
    return record


def wire_round(state: dict[str, torch.Tensor], wire_dtype: str) -> dict[str, torch.Tensor]:
    """What a site holds after the trip: the tensors rounded to the wire precision, back in fp32."""
    dtype = WIRE_TORCH[wire_dtype]
    return {k: v.detach().to(dtype).float() for k, v in state.items()}


def decode_array(array: Array, wire_dtype: str, name: str) -> torch.Tensor:
    if array.dtype != WIRE_NUMPY[wire_dtype]:
        raise UpdateError(f"tensor {name}: dtype {array.dtype}, expected {wire_dtype} on the wire")
    arr = array.numpy()
    t = torch.from_numpy(np.array(arr, copy=True))
    if wire_dtype == "bfloat16":
        t = t.view(torch.bfloat16)
    return t.float()


def decode(
    record: ArrayRecord,
    wire_dtype: str,
    expected: dict[str, torch.Size] | None = None,
    max_norm: float = 0.0,
) -> dict[str, torch.Tensor]:
    """An ArrayRecord back to fp32 tensors, checked against the expected names and shapes."""
    if expected is not None:
        missing = sorted(set(expected) - set(record.keys()))
        extra = sorted(set(record.keys()) - set(expected))
        if missing or extra:
            parts = ([f"missing {', '.join(missing[:4])}"] if missing else []) + (
                [f"unexpected {', '.join(extra[:4])}"] if extra else []
            )
            raise UpdateError("tensor names differ from the model's: " + "; ".join(parts))
    out: dict[str, torch.Tensor] = {}
    for k in list(record.keys()):  # an ArrayRecord, not a dict
        t = decode_array(record[k], wire_dtype, k)
        if expected is not None and t.shape != expected[k]:
            raise UpdateError(f"tensor {k}: shape {tuple(t.shape)}, expected {tuple(expected[k])}")
        if not torch.isfinite(t).all():
            raise UpdateError(f"tensor {k}: holds NaN or infinite values")
        out[k] = t
    if max_norm > 0:
        norm = update_norm(out)
        if norm > max_norm:
            raise UpdateError(f"update norm {norm:.4g} exceeds the bound {max_norm:.4g}")
    return out


def update_norm(update: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((v.double() ** 2).sum() for v in update.values())))  # type: ignore[arg-type]


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """Content hash of tensors (names, shapes, values), independent of file format."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(k.encode() + str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class FrozenStore:
    """A site's copy of the frozen tensors (the encoder during frozen fine-tuning), by content hash."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def path(self, digest: str) -> Path:
        return self.folder / f"{digest}.safetensors"

    def put(self, state: dict[str, torch.Tensor]) -> str:
        digest = state_hash(state)
        path = self.path(digest)
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        return digest

    def get(self, digest: str) -> dict[str, torch.Tensor] | None:
        path = self.path(digest)
        if not path.is_file():
            return None
        state = load_file(str(path))
        return state if state_hash(state) == digest else None


def arrays_sha256(record: ArrayRecord) -> str:
    """Digest of a record as it travels (names, dtypes, shapes, serialized bytes): the site computes it on the
    update it sends and the server on the reply it receives, so both audit logs name the same update."""
    h = hashlib.sha256()
    for name in sorted(record.keys()):
        array = record[name]
        h.update(f"{name}\0{array.dtype}\0{tuple(array.shape)}\0".encode())
        h.update(hashlib.sha256(array.data).digest())
    return h.hexdigest()
