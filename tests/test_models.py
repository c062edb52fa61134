"""Models: sizes of every config, masking, the MAE loss, STF-Net pathways, import, checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import VideoMAEConfig, VideoMAEForPreTraining, VideoMAEModel
from typer.testing import CliRunner

from fedecho.cli import app
from fedecho.models import CheckpointError, create_model, load_checkpoint, model_config, save_checkpoint
from fedecho.models.convert import import_weights
from fedecho.models.heads import TASKS
from fedecho.models.stfnet import STFNet
from fedecho.models.videomae import normalized_targets, patchify, random_mask, reconstruction_loss, tube_mask

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 1, 3, 1, 1)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    ("name", "tokens", "dim", "enc_millions"),
    [
        ("echo_vit_tiny", 392, 128, (0.9, 1.1)),
        ("echo_vit_small", 392, 384, (21.5, 22.5)),
        ("echo_vit_base", 1568, 768, (85.5, 87.0)),
    ],
)
def test_config_sizes(name: str, tokens: int, dim: int, enc_millions: tuple[float, float]) -> None:
    with torch.device("meta"):
        m = create_model(name, tasks=["ef"])
    assert m.cfg.num_tokens == tokens and m.cfg.embed_dim == dim and m.cfg.mask_ratio == 0.85
    assert enc_millions[0] < count(m.encoder) / 1e6 < enc_millions[1]
    assert m.fusion.out_dim == 2 * dim
    if name == "echo_vit_base":  # the paper's: ViT-B/16, 224 px, 16 frames, decoder 384 x 4
        c = m.cfg
        assert (c.img_size, c.num_frames, c.patch_size, c.tubelet_size, c.depth, c.num_heads) == (
            224,
            16,
            16,
            2,
            12,
            12,
        )
        assert (c.decoder_dim, c.decoder_depth, c.decoder_heads) == (384, 4, 6)


def test_tiny_forward_shapes() -> None:
    m = create_model("echo_vit_tiny", tasks=["ef", "esv", "ef_class", "as_class"]).eval()
    v = torch.rand(2, 3, 16, 112, 112)
    assert m.forward_features(v).shape == (2, 392, 128)
    loss, pred, mask = m.forward_pretrain(v)
    assert pred.shape == (2, int(mask[0].sum()), 2 * 16 * 16 * 3) and loss.ndim == 0
    out = m(v, torch.arange(16).expand(2, -1))
    assert {k: tuple(o.shape) for k, o in out.items()} == {
        "ef": (2, 1),
        "esv": (2, 1),
        "ef_class": (2, 1),
        "as_class": (2, 5),
    }
    with pytest.raises(ValueError, match="expected video"):
        m.forward_features(torch.rand(2, 3, 8, 112, 112))


def test_tube_and_random_masks() -> None:
    grid = (8, 7, 7)
    tube = tube_mask(3, grid, 0.85, torch.Generator().manual_seed(0)).view(3, 8, 49)
    assert (tube.sum(-1) == round(0.85 * 49)).all()
    assert (tube == tube[:, :1]).all()  # the same spatial mask in every time slot
    assert not torch.equal(tube[0], tube[1])
    rnd = random_mask(3, grid, 0.9, torch.Generator().manual_seed(0))
    assert (rnd.sum(-1) == round(0.9 * 392)).all()
    assert not (rnd.view(3, 8, 49) == rnd.view(3, 8, 49)[:, :1]).all()
    m = create_model("echo_vit_tiny", mask_type="random", mask_ratio=0.5)
    assert m.make_mask(2).sum(-1).tolist() == [196, 196]


def test_encoder_sees_only_visible_and_loss_only_masked_tokens() -> None:
    torch.manual_seed(0)
    m = create_model("echo_vit_tiny").eval()
    cfg = m.cfg
    v = torch.rand(1, 3, 16, 112, 112)
    mask = m.make_mask(1, torch.Generator().manual_seed(1))
    # Pixels of masked tubelets, changed: the encoder's output on visible tokens does not move.
    tm = mask.view(8, 7, 7)[None, None].repeat_interleave(2, 2).repeat_interleave(16, 3).repeat_interleave(16, 4)
    v2 = torch.where(tm.expand_as(v), torch.rand_like(v), v)
    with torch.no_grad():
        assert torch.allclose(m.encoder(v, mask), m.encoder(v2, mask), atol=1e-6)
        # The loss compares against masked tokens only: visible pixels do not enter it.
        pred = torch.randn(1, int(mask.sum()), cfg.patch_dim)
        v3 = torch.where(tm.expand_as(v), v, torch.rand_like(v))
        assert torch.allclose(reconstruction_loss(pred, v, mask, cfg), reconstruction_loss(pred, v3, mask, cfg))
        target = normalized_targets(v, 2, 16, 3)[mask].view(1, -1, cfg.patch_dim)
        assert torch.allclose(reconstruction_loss(pred, v, mask, cfg), ((pred - target) ** 2).mean())


def test_per_patch_normalised_targets() -> None:
    v = torch.rand(2, 3, 4, 32, 32) * 0.3 + 0.5
    t = normalized_targets(v, 2, 16, 3).view(2, 8, 2 * 16 * 16, 3)
    assert torch.allclose(t.mean(2), torch.zeros(2, 8, 3), atol=1e-5)
    assert torch.allclose(t.std(2), torch.ones(2, 8, 3), atol=1e-3)
    p = patchify(v, 2, 16)
    assert torch.equal(p[0, 0].view(2, 16, 16, 3)[1, 2, 3], v[0, :, 1, 2, 3])  # (ts, ps, ps, C) order


def test_stfnet_pathways_and_baseline() -> None:
    torch.manual_seed(0)
    stf = STFNet(32, (4, 3, 3), hidden=16, tubelet=2, num_frames=8).eval()
    tokens = torch.randn(2, 36, 32)
    with torch.no_grad():
        a = stf(tokens, torch.arange(8).expand(2, -1))
        b = stf(tokens, (torch.arange(8) * 5).expand(2, -1))
        assert a.shape == (2, 64)
        assert torch.allclose(a[:, :32], b[:, :32])  # joint path: no frame indices
        assert not torch.allclose(a[:, 32:], b[:, 32:])  # separate path: temporal code
        # Shuffling positions inside a time slice changes the joint 3-D path (it sees the grid).
        perm = tokens.view(2, 4, 9, 32)[:, :, torch.randperm(9)].reshape(2, 36, 32)
        assert not torch.allclose(stf(perm)[:, :32], stf(tokens)[:, :32])
    base = create_model("echo_vit_tiny", tasks=["ef"], fusion="max")
    assert base.fusion.out_dim == 128
    v = torch.rand(1, 3, 16, 112, 112)
    with torch.no_grad():
        assert torch.allclose(base.fusion(base.forward_features(v)), base.forward_features(v).amax(1))


def test_task_targets() -> None:
    ef, esv = TASKS["ef"], TASKS["esv"]
    assert torch.allclose(ef.decode(ef.encode(torch.tensor([55.0]))[:, None]), torch.tensor([55.0]))
    assert torch.allclose(esv.decode(esv.encode(torch.tensor([42.0]))[:, None]), torch.tensor([42.0]))
    assert TASKS["as_class"].outputs == 5
    assert TASKS["ef_class"].loss(torch.zeros(4, 1), torch.ones(4)).item() == pytest.approx(0.6931, abs=1e-4)


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


SMALL_HF = {
    "image_size": 32, "num_frames": 4, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
    "intermediate_size": 256, "decoder_hidden_size": 32, "decoder_num_hidden_layers": 2,
    "decoder_num_attention_heads": 2, "decoder_intermediate_size": 128, "norm_pix_loss": True,
}  # fmt: skip


def _hf_input(v: torch.Tensor) -> torch.Tensor:
    return (v.permute(0, 2, 1, 3, 4) - IMAGENET_MEAN) / IMAGENET_STD


def test_import_transformers_pretraining_matches(tmp_path: Path) -> None:
    torch.manual_seed(0)
    hf = _randomised(VideoMAEForPreTraining(VideoMAEConfig(**SMALL_HF, use_mean_pooling=False)))
    hf.save_pretrained(tmp_path / "hf")
    res = CliRunner().invoke(app, ["model", "import", str(tmp_path / "hf"), "--out", str(tmp_path / "fm.safetensors")])
    assert res.exit_code == 0, res.output
    m = load_checkpoint(tmp_path / "fm.safetensors").eval()
    v = torch.rand(2, 3, 4, 32, 32)
    mask = m.make_mask(2, torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref_tokens = hf.videomae(_hf_input(v)).last_hidden_state
        ref = hf(_hf_input(v), bool_masked_pos=mask)
        loss, pred, _ = m.forward_pretrain(v, mask)
        assert (m.forward_features(v) - ref_tokens).abs().max() < 1e-4
        assert (pred - ref.logits).abs().max() < 1e-4
        assert abs(loss.item() - ref.loss.item()) < 1e-4


def test_import_videomae_model_and_bare_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(1)
    hf = _randomised(VideoMAEModel(VideoMAEConfig(**SMALL_HF, use_mean_pooling=True)))
    hf.save_pretrained(tmp_path / "enc", safe_serialization=False)  # pytorch_model.bin
    m = import_weights(tmp_path / "enc").eval()
    assert m.decoder is None
    v = torch.rand(1, 3, 4, 32, 32)
    with torch.no_grad():
        ref = hf(_hf_input(v)).last_hidden_state
        assert (m.forward_features(v) - ref).abs().max() < 1e-4
    torch.save(hf.state_dict(), tmp_path / "bare.pt")
    bare = import_weights(tmp_path / "bare.pt", img_size=32, num_frames=4, num_heads=2, norm_eps=1e-12).eval()
    with torch.no_grad():
        assert (bare.forward_features(v) - ref).abs().max() < 1e-4
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        import_weights(tmp_path)


def test_checkpoint_round_trip_and_mismatch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = create_model("echo_vit_tiny", tasks=["ef"], decoder=False).eval()
    path = save_checkpoint(m, tmp_path / "ckpt.safetensors")
    back = load_checkpoint(path).eval()
    v = torch.rand(1, 3, 16, 112, 112)
    with torch.no_grad():
        assert torch.equal(m(v)["ef"], back(v)["ef"])
    meta = json.loads((tmp_path / "ckpt.json").read_text())
    meta["config"]["embed_dim"] = 192
    meta["config"]["num_heads"] = 4
    (tmp_path / "ckpt.json").write_text(json.dumps(meta))
    with pytest.raises(
        CheckpointError,
        match=r"does not fit.*shape mismatch: encoder.blocks.0.attn.proj.bias: checkpoint \(128,\) vs model \(192,\)",
    ):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="unknown model config field"):
        model_config("echo_vit_tiny", embed_dims=3)


def test_attention_variants_agree() -> None:
    """The written-out softmax(QK^T)V path is the same model as SDPA's fused kernels."""
    torch.manual_seed(0)
    fused = create_model("echo_vit_tiny").eval()
    explicit = create_model("echo_vit_tiny", attention="explicit").eval()
    explicit.load_state_dict(fused.state_dict())
    assert not explicit.encoder.blocks[0].attn.fused_attn
    v = torch.rand(1, 3, 16, 112, 112)
    with torch.no_grad():
        assert (fused.forward_features(v) - explicit.forward_features(v)).abs().max() < 1e-5
    with pytest.raises(ValueError, match="attention"):
        create_model("echo_vit_tiny", attention="flash")
