"""What travels between the server and the sites, in which precision, and how it is checked.

- Only the tensors a phase trains travel (`exchanged_keys`): in frozen-encoder fine-tuning that is
  STF-Net and the heads, in LoRA fine-tuning also the encoder's adapters; the frozen encoder (its own
  weights, under LoRA) reaches a site once and is kept there (`FrozenStore`).
- Tensors travel as float32, float16, bfloat16 or int8 (`encode`/`decode`); numpy has no bfloat16, so
  bfloat16 travels as its raw 16-bit pattern. Both sides keep fp32 masters: the server sends the
  global weights, a site trains in fp32 and sends back its update (local - received), and the
  server adds the decoded update to its fp32 master, so wire rounding never accumulates.
- int8: symmetric quantisation with one float32 scale per output row (the first dimension; a 0-d or
  1-d tensor has one scale), scale = max|row| / 127, value = int8 * scale. A tensor `name` travels as
  int8 under `name` and its scales under `SCALE_PREFIX + name` in the same record: state-dict keys
  never start with "." (PyTorch refuses empty and dotted module/parameter names), so the two cannot
  collide. The server's downlink rounds to nearest; a site's update uses stochastic rounding
  (unbiased) from a seed the site derives from the round's seed, so a resumed run replays bit for bit.
- Every incoming update is checked (names, shapes, dtype -- for int8 also its scales' presence,
  shape and finiteness --, finite values, optional norm bound) before anything aggregates it; a bad
  one raises UpdateError naming the tensor. The server then compares the round's update norms
  (`adaptive_norm_bound`) and checks each reply's metrics and claimed example count
  (`reply_metrics`, `claimed_examples`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from safetensors.torch import load_file, save_file

from fedecho.models import EchoVisionFM
from fedecho.models.lora import frozen_base_keys, has_lora
from fedecho.storage.files import atomic_path

WIRE_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}
WIRE_NUMPY = {"float32": "float32", "float16": "float16", "bfloat16": "int16", "int8": "int8"}  # bf16: its bits
SCALE_PREFIX = ".scale/"  # int8: the record entry holding tensor `name`'s per-row scales is SCALE_PREFIX + name
INT8_MAX = 127


class UpdateError(ValueError):
    """An update that must not reach the global model."""


def exchanged_keys(model: EchoVisionFM, phase: str, freeze_encoder: bool = False) -> list[str]:
    """State-dict entries that train in this phase, hence travel each round (float tensors only:
    BatchNorm's counters stay local). A model with LoRA adapters (`fedecho.models.lora`, detected from its
    tensors) fine-tunes them instead of the encoder: of the encoder only the adapters travel."""
    if phase == "pretrain":
        prefixes: tuple[str, ...] = ("encoder.", "decoder.")
    else:
        prefixes = ("fusion.", "heads.") if freeze_encoder else ("encoder.", "fusion.", "heads.")
    state = model.state_dict()
    base = set(frozen_base_keys(model)) if phase == "finetune" and has_lora(model) else set()
    return [k for k, v in state.items() if k.startswith(prefixes) and v.is_floating_point() and k not in base]


def frozen_keys(model: EchoVisionFM, phase: str, freeze_encoder: bool = False) -> list[str]:
    """Tensors a site needs but does not train: the encoder during frozen-encoder fine-tuning, its own
    weights (all but the adapters) during LoRA fine-tuning."""
    if phase == "finetune" and freeze_encoder:
        return [k for k in model.state_dict() if k.startswith("encoder.")]
    if phase == "finetune" and has_lora(model):
        return frozen_base_keys(model)
    return []


def encode(state: dict[str, torch.Tensor], wire_dtype: str, *, seed: int | None = None) -> ArrayRecord:
    """float32 tensors -> an ArrayRecord in the wire precision.

    int8 rounds to nearest unless `seed` is given: then stochastic rounding (unbiased), drawn from a
    generator seeded with `seed` (what a site uses for its update). `seed` is ignored by the float wires.
    """
    record = ArrayRecord()
    if wire_dtype == "int8":
        gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        for k, v in state.items():
            if k.startswith(SCALE_PREFIX):
                raise ValueError(f"tensor {k}: the name is reserved for int8 scales")
            q, scale = quantize_int8(v, gen)
            record[k] = Array(q.numpy())
            record[SCALE_PREFIX + k] = Array(scale.numpy())
        return record
    dtype = WIRE_TORCH[wire_dtype]
    for k, v in state.items():
        t = v.detach().to("cpu", dtype).contiguous()
        arr = t.view(torch.int16).numpy() if dtype is torch.bfloat16 else t.numpy()
        record[k] = Array(arr)
    return record


def _rows(t: torch.Tensor) -> torch.Tensor:
    """The tensor as (rows, rest): rows along the first dimension; a 0-d or 1-d tensor is one row."""
    return t.reshape(1, -1) if t.dim() < 2 else t.reshape(t.shape[0], -1)


def quantize_int8(t: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 per-row scales) of a tensor; nearest rounding, or stochastic with `generator`."""
    rows = _rows(t.detach().to("cpu", torch.float32))
    scale = rows.abs().amax(dim=1) / INT8_MAX if rows.numel() else torch.zeros(rows.shape[0])
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    x = rows / safe[:, None]
    # stochastic: floor(x + u) with u ~ U[0, 1) lands on one of x's two neighbours, in expectation on x
    x = torch.round(x) if generator is None else torch.floor(x + torch.rand(x.shape, generator=generator))
    q = x.clamp_(-INT8_MAX, INT8_MAX).to(torch.int8).reshape(t.shape)
    return q.contiguous(), scale.contiguous()


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (_rows(q).float() * scale[:, None]).reshape(q.shape)


def scale_shape(shape: tuple[int, ...]) -> tuple[int]:
    """The shape of the int8 scales of a tensor of this shape."""
    return (1,) if len(shape) < 2 else (shape[0],)


def wire_round(state: dict[str, torch.Tensor], wire_dtype: str) -> dict[str, torch.Tensor]:
    """What a site holds after the trip: the tensors rounded to the wire precision, back in fp32
    (for int8, bit for bit what `decode` gives for the server's round-to-nearest encoding)."""
    if wire_dtype == "int8":
        return {k: dequantize_int8(*quantize_int8(v)) for k, v in state.items()}
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


def decode_int8(record: ArrayRecord, name: str) -> torch.Tensor:
    """Tensor `name` of an int8 record, its scales checked (present, float32, one per row, finite, >= 0)."""
    array = record[name]
    if array.dtype != "int8":
        raise UpdateError(f"tensor {name}: dtype {array.dtype}, expected int8 on the wire")
    q = torch.from_numpy(np.array(array.numpy(), copy=True))
    key = SCALE_PREFIX + name
    if key not in record:
        raise UpdateError(f"tensor {name}: its int8 scales ({key}) are missing")
    sarr = record[key]
    if sarr.dtype != "float32":
        raise UpdateError(f"tensor {name}: int8 scales of dtype {sarr.dtype}, expected float32")
    want = scale_shape(tuple(q.shape))
    if tuple(sarr.shape) != want:
        raise UpdateError(f"tensor {name}: int8 scales of shape {tuple(sarr.shape)}, expected {want}")
    scale = torch.from_numpy(np.array(sarr.numpy(), copy=True))
    if not torch.isfinite(scale).all() or (scale < 0).any():
        raise UpdateError(f"tensor {name}: int8 scales hold NaN, infinite or negative values")
    return dequantize_int8(q, scale)


def decode(
    record: ArrayRecord,
    wire_dtype: str,
    expected: dict[str, torch.Size] | None = None,
    max_norm: float = 0.0,
) -> dict[str, torch.Tensor]:
    """An ArrayRecord back to fp32 tensors, checked against the expected names and shapes (int8: and
    every tensor's scales; scales travel only on the int8 wire and only for a tensor the record holds)."""
    keys = list(record.keys())  # an ArrayRecord, not a dict
    names = [k for k in keys if not k.startswith(SCALE_PREFIX)]
    for k in keys:
        if k.startswith(SCALE_PREFIX):
            name = k[len(SCALE_PREFIX) :]
            if wire_dtype != "int8":
                raise UpdateError(f"tensor {name}: int8 scales ({k}) on a {wire_dtype} wire")
            if name not in record:
                raise UpdateError(f"tensor {name}: int8 scales ({k}) without the tensor")
    if expected is not None:
        missing = sorted(set(expected) - set(names))
        extra = sorted(set(names) - set(expected))
        if missing or extra:
            parts = ([f"missing {', '.join(missing[:4])}"] if missing else []) + (
                [f"unexpected {', '.join(extra[:4])}"] if extra else []
            )
            raise UpdateError("tensor names differ from the model's: " + "; ".join(parts))
    out: dict[str, torch.Tensor] = {}
    for k in names:
        t = decode_int8(record, k) if wire_dtype == "int8" else decode_array(record[k], wire_dtype, k)
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


def adaptive_norm_bound(norms: Iterable[float], factor: float) -> float | None:
    """`factor` x the lower median of this round's non-zero update norms; None when off (factor 0) or when no
    update moved anything.

    The lower median (sorted norms[(n - 1) // 2]) rather than the mean or the plain median: with two sites the
    plain median averages both norms, so one update scaled by 1e6 would raise its own bound far enough to pass;
    the lower median is the smaller of the two, which one inflated update cannot move. With n sites, fewer than
    half of them inflating their updates cannot raise the reference. Exactly-zero norms (a site whose update moves
    nothing) are left out, or they would make every other update fail; one update alone is its own reference.
    Known limit: a site that sends a tiny non-zero update lowers the reference, and with two sites can then get
    the honest site's update rejected (a denial of service, not a corruption of the global model).
    """
    if factor <= 0:
        return None
    ordered = sorted(n for n in norms if n > 0)
    if not ordered:
        return None
    return factor * ordered[(len(ordered) - 1) // 2]


def reply_metrics(record: Mapping[str, Any], undefined: bool = False) -> dict[str, float]:
    """A reply's metrics as floats; a value that is not a finite number (NaN, infinite, a list, text) raises
    UpdateError naming the metric: such a value would reach the strategy's weighted means and the store.

    undefined: NaN is allowed (not for num-examples), as an evaluation's way of saying a score is undefined
    (fedecho's R2 of a single video, AUROC of one class); the caller leaves it out of its means."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UpdateError(f"metric {key!r} is not a number: {value!r:.60}")
        number = float(value)
        if not math.isfinite(number) and not (undefined and math.isnan(number) and key != "num-examples"):
            raise UpdateError(f"metric {key!r} is not finite: {number}")
        out[str(key)] = number
    return out


def claimed_examples(metrics: Mapping[str, float], cap: int, minimum: int = 1) -> int:
    """The reply's `num-examples`, checked: a whole number from `minimum` to `cap` (what the coordinator lets
    this site claim). FedAvg weights each update by this count, so one site claiming 10^9 examples would make
    the global model its own update."""
    if "num-examples" not in metrics:
        raise UpdateError("the reply does not report num-examples")
    value = metrics["num-examples"]
    if not math.isfinite(value) or not float(value).is_integer():
        raise UpdateError(f"num-examples {value} is not a whole number")
    if value < minimum:
        raise UpdateError(f"num-examples {value:.0f} is below {minimum}")
    if value > cap:
        raise UpdateError(f"num-examples {value:.0f} exceeds what this site may claim ({cap})")
    return int(value)


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


def record_bytes(content: Mapping[str, Any]) -> int:
    """Bytes of every array record a message carries (the model, and SCAFFOLD's control variate), as Flower
    counts them: what the server records per site and direction, and what a site's audit log says it sent."""
    return sum(r.count_bytes() for r in content.values() if isinstance(r, ArrayRecord))


def arrays_sha256(record: ArrayRecord) -> str:
    """Digest of a record as it travels (names, dtypes, shapes, serialized bytes): the site computes it on the
    update it sends and the server on the reply it receives, so both audit logs name the same update."""
    h = hashlib.sha256()
    for name in sorted(record.keys()):
        array = record[name]
        h.update(f"{name}\0{array.dtype}\0{tuple(array.shape)}\0".encode())
        h.update(hashlib.sha256(array.data).digest())
    return h.hexdigest()
