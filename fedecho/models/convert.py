"""Import published VideoMAE weights (Echo-Vision-FM released transformers format).

Sources: a transformers `save_pretrained` folder (config.json + model.safetensors or
pytorch_model.bin) of VideoMAEForPreTraining or VideoMAEModel, or a bare state-dict file with
either transformers keys or the original VideoMAE repository's keys. Weights are only read
from the files given: nothing is downloaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from fedecho.models.checkpoint import CheckpointError, load_state
from fedecho.models.config import ModelConfig
from fedecho.models.echo_vision_fm import EchoVisionFM


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "module", "state_dict", "model_state"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return obj


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.cat([q, k, v], dim=0)


def _qkv_bias(q_bias: torch.Tensor | None, v_bias: torch.Tensor | None, dim: int) -> torch.Tensor:
    zeros = torch.zeros(dim)
    return torch.cat([q_bias if q_bias is not None else zeros, zeros, v_bias if v_bias is not None else zeros])


def from_transformers_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers VideoMAE(ForPreTraining|Model) keys -> fedecho keys."""
    sd = {k.removeprefix("videomae."): v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}
    out["encoder.patch_embed.proj.weight"] = sd["embeddings.patch_embeddings.projection.weight"]
    out["encoder.patch_embed.proj.bias"] = sd["embeddings.patch_embeddings.projection.bias"]
    if "layernorm.weight" in sd:
        out["encoder.norm.weight"], out["encoder.norm.bias"] = sd["layernorm.weight"], sd["layernorm.bias"]

    def layers(src: str, dst: str) -> None:
        ids = sorted({int(m.group(1)) for k in sd if (m := re.match(rf"{re.escape(src)}\.(\d+)\.", k))})
        for i in ids:
            p, q = f"{src}.{i}.", f"{dst}.{i}."
            a = p + "attention.attention."
            dim = sd[a + "query.weight"].shape[0]
            out[q + "attn.qkv.weight"] = _fuse_qkv(sd[a + "query.weight"], sd[a + "key.weight"], sd[a + "value.weight"])
            qb = sd.get(a + "query.bias", sd.get(a + "q_bias"))
            vb = sd.get(a + "value.bias", sd.get(a + "v_bias"))
            out[q + "attn.qkv.bias"] = _qkv_bias(qb, vb, dim)
            for s, d in (
                ("attention.output.dense", "attn.proj"),
                ("layernorm_before", "norm1"),
                ("layernorm_after", "norm2"),
                ("intermediate.dense", "mlp.fc1"),
                ("output.dense", "mlp.fc2"),
            ):
                out[q + d + ".weight"], out[q + d + ".bias"] = sd[p + s + ".weight"], sd[p + s + ".bias"]

    layers("encoder.layer", "encoder.blocks")
    if "encoder_to_decoder.weight" in sd:
        out["decoder.encoder_to_decoder.weight"] = sd["encoder_to_decoder.weight"]
        out["decoder.mask_token"] = sd["mask_token"]
        layers("decoder.decoder_layers", "decoder.blocks")
        for n in ("norm", "head"):
            out[f"decoder.{n}.weight"], out[f"decoder.{n}.bias"] = sd[f"decoder.{n}.weight"], sd[f"decoder.{n}.bias"]
    return out


def from_original_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original VideoMAE repository's keys (encoder.blocks.N.attn.qkv, q_bias, v_bias, ...)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k in ("encoder_to_decoder.weight", "mask_token"):
            out[f"decoder.{k}"] = v
        elif k.endswith(".attn.q_bias"):
            base = k.removesuffix("q_bias")
            out[base + "qkv.bias"] = _qkv_bias(v, sd.get(base + "v_bias"), v.shape[0])
        elif k.endswith(".attn.v_bias") or k.startswith("encoder.pos_embed") or k.startswith("decoder.pos_embed"):
            continue
        else:
            out[k] = v
    return out


def infer_config(sd: dict[str, torch.Tensor], **given: Any) -> ModelConfig:
    """Architecture from fedecho-keyed tensor shapes; heads assume VideoMAE's head width of 64."""
    w = sd["encoder.patch_embed.proj.weight"]  # (D, C, ts, ps, ps)
    dim, chans, ts, ps = w.shape[0], w.shape[1], w.shape[2], w.shape[3]
    depth = len({k.split(".")[2] for k in sd if k.startswith("encoder.blocks.")})
    has_dec = "decoder.head.weight" in sd
    ddim = sd["decoder.encoder_to_decoder.weight"].shape[0] if has_dec else 384
    ddepth = len({k.split(".")[2] for k in sd if k.startswith("decoder.blocks.")}) if has_dec else 4
    mlp = sd["encoder.blocks.0.mlp.fc1.weight"].shape[0] / dim
    fields: dict[str, Any] = {
        "embed_dim": dim, "in_chans": chans, "tubelet_size": ts, "patch_size": ps, "depth": depth,
        "num_heads": max(1, dim // 64), "decoder_dim": ddim, "decoder_depth": ddepth,
        "decoder_heads": max(1, ddim // 64), "mlp_ratio": mlp, "encoder_norm": "encoder.norm.weight" in sd,
    }  # fmt: skip
    fields.update({k: v for k, v in given.items() if v is not None})
    return ModelConfig(name="imported", **fields)


def config_from_transformers(cfg: dict[str, Any]) -> dict[str, Any]:
    eps = float(cfg.get("layer_norm_eps", 1e-12))
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"unsupported hidden_act {cfg.get('hidden_act')!r} (fedecho's blocks use exact GELU)")
    return {
        "img_size": int(cfg.get("image_size", 224)),
        "num_frames": int(cfg.get("num_frames", 16)),
        "patch_size": int(cfg.get("patch_size", 16)),
        "tubelet_size": int(cfg.get("tubelet_size", 2)),
        "in_chans": int(cfg.get("num_channels", 3)),
        "embed_dim": int(cfg.get("hidden_size", 768)),
        "depth": int(cfg.get("num_hidden_layers", 12)),
        "num_heads": int(cfg.get("num_attention_heads", 12)),
        "mlp_ratio": int(cfg.get("intermediate_size", 3072)) / int(cfg.get("hidden_size", 768)),
        "decoder_dim": int(cfg.get("decoder_hidden_size", 384)),
        "decoder_depth": int(cfg.get("decoder_num_hidden_layers", 4)),
        "decoder_heads": int(cfg.get("decoder_num_attention_heads", 6)),
        "norm_eps": eps,
        "decoder_norm_eps": 1e-5,  # transformers' decoder norm uses LayerNorm's default
        "encoder_norm": not bool(cfg.get("use_mean_pooling", True)),
        "norm_pix_loss": bool(cfg.get("norm_pix_loss", True)),
        "qkv_bias": bool(cfg.get("qv_bias", True)),
    }


def import_weights(source: str | Path, **given: Any) -> EchoVisionFM:
    """Build a fedecho model holding the weights of a published VideoMAE checkpoint."""
    source = Path(source)
    if source.is_dir():
        cfg_file = source / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{source}: no config.json (expected a transformers save_pretrained folder)")
        hf = json.loads(cfg_file.read_text())
        weights = next((source / n for n in ("model.safetensors", "pytorch_model.bin") if (source / n).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{source}: neither model.safetensors nor pytorch_model.bin found")
        sd = from_transformers_keys(read_state_dict(weights))
        fields = config_from_transformers(hf)
        fields.update({k: v for k, v in given.items() if v is not None})
        cfg = ModelConfig(name="imported", **fields)
    elif source.is_file():
        raw = read_state_dict(source)
        transformers_keys = any(k.startswith(("videomae.", "embeddings.")) for k in raw)
        sd = from_transformers_keys(raw) if transformers_keys else from_original_keys(raw)
        eps = {} if transformers_keys else {"norm_eps": 1e-6, "decoder_norm_eps": 1e-6}
        cfg = infer_config(sd, **{**eps, **given})
    else:
        raise CheckpointError(f"{source}: no such file or folder")
    model = EchoVisionFM(cfg, decoder="decoder.head.weight" in sd)
    load_state(model, sd, str(source))
    return model
