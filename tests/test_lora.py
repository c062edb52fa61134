"""LoRA fine-tuning (peft adapters in the encoder): what trains, what travels, loading a pre-trained encoder,
checkpoints, DP-SGD, a local `fedecho train` run with `fedecho predict` on its checkpoint, a federated
simulation, and run files with LoRA mistakes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from builders import TINY_DATA, TinyVideos, tiny_run
from fedecho.cli import app
from fedecho.fl.config import parse_run_config
from fedecho.fl.exchange import encode, exchanged_keys, frozen_keys
from fedecho.models import EchoVisionFM, create_model, load_checkpoint, save_checkpoint
from fedecho.models.checkpoint import read_meta
from fedecho.models.lora import (
    LoraSpec,
    apply_lora,
    has_lora,
    is_adapter_key,
    lora_key_map,
    lora_spec,
    merge_lora,
    to_lora_state,
    to_plain_state,
)
from fedecho.privacy.dp_policy import DPPlan
from fedecho.sim.run import simulate
from fedecho.storage import Store
from fedecho.train import ConfigError, Trainer, load_run_config, read_metrics, train_phase
from fedecho.train.config import PhaseSection
from fedecho.train.dp import PrivateTraining
from fedecho.train.run import init_encoder

TINY = {"decoder": False, "num_frames": 8, "tasks": ["ef"]}


def _lora_model(rank: int = 4, seed: int = 0, **overrides: object) -> EchoVisionFM:
    torch.manual_seed(seed)
    return apply_lora(create_model("echo_vit_tiny", **{**TINY, **overrides}), LoraSpec(rank))


def _random_heads(model: EchoVisionFM) -> EchoVisionFM:
    """Heads start at zero weights (a constant output); random ones make outputs show the encoder's."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _clips() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 8, 112, 112, generator=g), torch.arange(8).repeat(2, 1)


@pytest.mark.slow
def test_lora_trains_only_adapters_fusion_and_heads() -> None:
    model = _lora_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = PhaseSection(epochs=6, batch_size=3, lr=3e-4, warmup_epochs=0, tasks=["ef"], weight_decay=0.0)
    trainer = Trainer(model, "finetune", cfg, steps_per_epoch=1, device=torch.device("cpu"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(is_adapter_key(n) or n.startswith(("fusion.", "heads.")) for n in trainable)
    assert any(n.startswith("encoder.") for n in trainable) and any(n.startswith("fusion.") for n in trainable)
    data = TinyVideos()
    losses = [trainer.train_epoch(torch.utils.data.DataLoader(data, batch_size=3)).loss for _ in range(6)]
    assert losses[-1] < 0.5 * losses[0]  # measured: 0.029 -> 0.007
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    # nothing outside the adapters, fusion and heads moved (STF-Net's BatchNorm statistics are buffers)
    assert changed and all(k in trainable or k.startswith(("fusion.", "heads.")) for k in changed)
    assert any(".lora_B." in k for k in changed) and any(k.startswith("heads.") for k in changed)
    for k in after:  # the pre-trained encoder itself, bit for bit
        if k.startswith("encoder.") and not is_adapter_key(k):
            assert torch.equal(after[k], before[k]), k


def test_lora_exchanges_adapters_fusion_and_heads_with_far_fewer_bytes() -> None:
    """A site gets the encoder once (frozen) and each round exchanges only the adapters, fusion and heads. With
    max-pool fusion (a tiny fusion) and rank 8, that is 6.6 % of full fine-tuning's bytes on echo_vit_tiny; with
    STF-Net (about 1 M parameters here, 126 M on echo_vit_base) STF-Net dominates and it is 55 %."""
    for fusion, bound in (("max", 0.08), ("stf", 0.6)):
        plain = create_model("echo_vit_tiny", **{**TINY, "fusion": fusion})
        model = _lora_model(8, fusion=fusion)
        keys, frozen = exchanged_keys(model, "finetune"), frozen_keys(model, "finetune")
        assert not set(keys) & set(frozen)
        floats = {k for k, v in model.state_dict().items() if v.is_floating_point()}
        assert set(keys) | set(frozen) == floats
        assert all(is_adapter_key(k) or k.startswith(("fusion.", "heads.")) for k in keys)
        assert all(k.startswith("encoder.") and not is_adapter_key(k) for k in frozen)
        assert sum(".base_layer." in k for k in frozen) == 4 * 4 * 2  # 4 blocks x qkv, proj, fc1, fc2 x (w, b)
        state, full_state = model.state_dict(), plain.state_dict()
        lora_bytes = encode({k: state[k] for k in keys}, "float32").count_bytes()
        full_keys = exchanged_keys(plain, "finetune")
        full_bytes = encode({k: full_state[k] for k in full_keys}, "float32").count_bytes()
        assert lora_bytes < bound * full_bytes, (fusion, lora_bytes / full_bytes)


@pytest.mark.slow
def test_pretrained_encoder_loads_through_the_mapping_and_lora_starts_as_identity(tmp_path: Path) -> None:
    torch.manual_seed(5)
    pre = create_model("echo_vit_tiny", decoder=True, num_frames=8)
    save_checkpoint(pre, tmp_path / "pre.safetensors", {"phase": "pretrain"})
    torch.manual_seed(0)
    plain = create_model("echo_vit_tiny", **TINY)
    init_encoder(plain, tmp_path / "pre.safetensors")
    model = _lora_model(seed=0)  # same seed: the same fusion and heads as `plain`
    init_encoder(model, tmp_path / "pre.safetensors")
    mapping = lora_key_map(model)
    assert mapping["encoder.blocks.0.attn.qkv.weight"] == "encoder.blocks.0.attn.qkv.base_layer.weight"
    assert len(mapping) == 4 * 4 * 2 and "encoder.patch_embed.proj.weight" not in mapping  # the tubelet conv stays
    pre_state = pre.state_dict()
    for plain_key, lora_key in mapping.items():
        assert torch.equal(model.state_dict()[lora_key], pre_state[plain_key])
    assert to_lora_state(pre_state, plain) == pre_state  # a plain model: the mapping changes nothing
    x, fi = _clips()
    _random_heads(model).eval(), _random_heads(plain).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), plain.forward_features(x), rtol=0, atol=0)
        torch.testing.assert_close(model(x, fi)["ef"], plain(x, fi)["ef"], rtol=0, atol=0)
        other = create_model("echo_vit_tiny", **TINY).eval()  # a different encoder: a different output
        assert not torch.allclose(other.forward_features(x), plain.forward_features(x), atol=1e-3)


@pytest.mark.slow
def test_checkpoint_round_trip_and_merge(tmp_path: Path) -> None:
    model = _random_heads(_lora_model(rank=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05)  # as after training: the adapters now change the output
    path = save_checkpoint(model, tmp_path / "lora.safetensors", {"phase": "finetune"})
    assert read_meta(path)["lora"] == {"rank": 4, "alpha": 0.0, "targets": ["qkv", "proj", "fc1", "fc2"]}
    back = load_checkpoint(path)
    assert has_lora(back) and lora_spec(back) == LoraSpec(4)
    x, fi = _clips()
    with torch.no_grad():
        want = model.eval()(x, fi)["ef"]
        torch.testing.assert_close(back.eval()(x, fi)["ef"], want, rtol=0, atol=0)
        torch.testing.assert_close(back.forward_features(x), model.forward_features(x), rtol=0, atol=0)
        unadapted = create_model("echo_vit_tiny", **TINY).eval()
        unadapted.load_state_dict(to_plain_state(model.state_dict()))
        assert not torch.allclose(unadapted(x, fi)["ef"], want, atol=1e-4)  # the adapters matter
        merged = merge_lora(model)
        assert not has_lora(merged)
        torch.testing.assert_close(merged.eval()(x, fi)["ef"], want, rtol=1e-4, atol=1e-4)
    # a LoRA checkpoint can start a later fine-tuning: its encoder comes with the adapters folded in
    fresh = create_model("echo_vit_tiny", **TINY)
    init_encoder(fresh, path)
    torch.testing.assert_close(fresh.state_dict()["encoder.blocks.1.mlp.fc1.weight"], merged.state_dict()[
        "encoder.blocks.1.mlp.fc1.weight"])  # fmt: skip


@pytest.mark.slow
def test_dp_sgd_with_lora_computes_per_sample_gradients_only_for_what_trains() -> None:
    model = _lora_model(head="mlp", stf_norm="group")
    cfg = PhaseSection(batch_size=3, lr=1e-3, warmup_epochs=0, tasks=["ef"], weight_decay=0.0)
    trainer = Trainer(model, "finetune", cfg, steps_per_epoch=1, device=torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = DPPlan(1.0, 1.0, 1.0, 1, 3, ((0,), (1,), (2,)), "video", 1e-5)
    seen: dict[str, tuple[int, ...]] = {}
    with PrivateTraining(trainer, plan) as private:

        def look(opt) -> None:  # type: ignore[no-untyped-def]
            for p in opt.params:
                if p.grad_sample is not None:
                    seen[names[id(p)]] = tuple(p.grad_sample.shape)

        private.optimizer.attach_step_hook(look)
        res = trainer.train_epoch(private.loader(TinyVideos()))
    assert res.steps == 1 and set(seen) == trainable
    assert any(is_adapter_key(n) for n in seen)
    assert all(shape[0] == res.examples for shape in seen.values())  # one gradient per sampled video
    for n, p in model.named_parameters():
        assert not hasattr(p, "grad_sample") or p.grad_sample is None, n  # Opacus cleaned up
    after = model.state_dict()
    for k in after:
        if k.startswith("encoder.") and not is_adapter_key(k):
            assert torch.equal(after[k], before[k]), k
    assert any(not torch.equal(after[k], before[k]) for k in after if ".lora_" in k)


@pytest.mark.slow
def test_local_lora_fine_tuning_and_predict(echonet_phantom: Path, tmp_path: Path) -> None:
    """`fedecho train finetune` with [finetune] lora_rank from a pre-trained checkpoint, then `fedecho predict`."""
    torch.manual_seed(2)
    save_checkpoint(create_model("echo_vit_tiny", decoder=True), tmp_path / "pre.safetensors")
    run = tmp_path / "run.toml"
    run.write_text(
        f"""
[model]
name = "echo_vit_tiny"
fusion = "max"
[data]
root = "{echonet_phantom}"
cache = "{tmp_path / "cache"}"
max_test_clips = 1
[finetune]
epochs = 1
batch_size = 4
lr = 1e-3
tasks = ["ef"]
init = "{tmp_path / "pre.safetensors"}"
lora_rank = 2
lora_alpha = 4
lora_targets = ["qkv", "mlp.fc2"]
"""
    )
    train_phase(load_run_config(run), "finetune", tmp_path / "ft", progress=False)
    assert [r["phase"] for r in read_metrics(tmp_path / "ft")] == ["finetune", "test"]
    ckpt = tmp_path / "ft" / "model.safetensors"
    assert json.loads(ckpt.with_suffix(".json").read_text())["lora"] == {
        "rank": 2, "alpha": 4.0, "targets": ["qkv", "mlp.fc2"]
    }  # fmt: skip
    state, pre = load_file(str(ckpt)), load_file(str(tmp_path / "pre.safetensors"))
    assert torch.equal(state["encoder.blocks.3.mlp.fc2.base_layer.weight"], pre["encoder.blocks.3.mlp.fc2.weight"])
    assert torch.equal(state["encoder.blocks.3.mlp.fc1.weight"], pre["encoder.blocks.3.mlp.fc1.weight"])  # no adapter
    assert state["encoder.blocks.0.attn.qkv.lora_A.default.weight"].shape == (2, 128)
    assert load_checkpoint(ckpt).encoder.blocks[0].attn.qkv.scaling == {"default": 2.0}
    video = sorted((echonet_phantom / "Videos").glob("*.avi"))[0]
    res = CliRunner().invoke(app, ["predict", str(video), "--checkpoint", str(ckpt)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "LVEF" in res.output


def _lora_run() -> str:
    text = tiny_run(pretrain_rounds=1, finetune_rounds=1, freeze=False)
    text = text.replace("num_frames = 8", 'num_frames = 8\nfusion = "max"')
    # two local steps: the heads start at zero weights, so the first step's gradient reaches only them
    text = text.replace("[finetune]\nrounds = 1\nsteps = 1", "[finetune]\nrounds = 1\nsteps = 2")
    return text.replace('tasks = ["ef"]', 'tasks = ["ef"]\nlora_rank = 4')


FEDERATED_ONLY = ("[run]", "[strategy]", 'name = "tiny"', 'name = "fedavg"', "seed =", "wire_dtype =", "rounds =")
FEDERATED_ONLY += ("steps =",)


def _local(federated: str) -> str:
    """A federated run file less its federated sections and fields: a local run file."""
    return "\n".join(line for line in federated.splitlines() if not line.startswith(FEDERATED_ONLY))


@pytest.mark.slow
def test_federated_lora_run(federated_phantom: Path, tmp_path: Path) -> None:
    cfg = parse_run_config(_lora_run(), "tiny")
    run_id = simulate(cfg, federated_phantom, tmp_path / "state", default_policy=TINY_DATA)
    store = Store(f"sqlite:///{tmp_path / 'state' / 'fedecho.db'}")
    assert store.get_run(run_id).status == "finished"
    train = [r for r in store.site_results(run_id) if r.kind == "train"]
    assert {(r.phase, r.status) for r in train} == {("pretrain", "ok"), ("finetune", "ok")}
    pre = next(r for r in train if r.phase == "pretrain")
    fine = next(r for r in train if r.phase == "finetune")
    # up: adapters and head only; down, in the first round: also the frozen encoder, once
    assert fine.bytes_up < 0.15 * pre.bytes_up and fine.bytes_down > 5 * fine.bytes_up
    pre_ck = next(c.path for c in store.checkpoints(run_id) if c.phase == "pretrain")
    fine_ck = next(c.path for c in store.checkpoints(run_id) if c.phase == "finetune")
    model = load_checkpoint(fine_ck)
    assert lora_spec(model) == LoraSpec(4)
    pre_state, state = load_file(pre_ck), model.state_dict()
    torch.testing.assert_close(
        state["encoder.blocks.2.attn.proj.base_layer.weight"], pre_state["encoder.blocks.2.attn.proj.weight"]
    )  # the federated pre-training's encoder, kept
    assert any(v.abs().sum() > 0 for k, v in state.items() if ".lora_B." in k)  # the adapters trained


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("lora_rank = 4", "lora_rank = -1"), "[finetune].lora_rank must be >= 0"),
        (("lora_rank = 4", "lora_rank = 4\nlora_alpha = -2.0"), "[finetune].lora_alpha must be >= 0"),
        (("lora_rank = 4", "lora_rank = 4\nfreeze_encoder = true"), "[finetune].lora_rank = 4 contradicts"),
        (("lora_rank = 4", 'lora_rank = 4\nlora_targets = ["qkv", "fc3"]'), "[finetune].lora_targets[1] 'fc3'"),
        (("lora_rank = 4", 'lora_rank = 4\nlora_targets = ["norm1"]'), "[finetune].lora_targets[0] 'norm1'"),
        (("lora_rank = 4", "lora_rank = 4\nlora_targets = []"), "[finetune].lora_targets must name"),
        (("lr = 1e-3\n\n[finetune]", "lr = 1e-3\nlora_rank = 2\n\n[finetune]"), "[pretrain].lora_rank applies to"),
        (("lora_rank = 4", 'lora_rank = "four"'), "[finetune].lora_rank must be an integer"),
    ],
)
def test_bad_lora_settings_name_the_field(edit: tuple[str, str], message: str, tmp_path: Path) -> None:
    text = _lora_run()
    assert edit[0] in text
    text = text.replace(edit[0], edit[1], 1).replace("freeze_encoder = false\n", "")
    with pytest.raises(ConfigError) as e:
        parse_run_config(text, "configs/x.toml")
    assert message in str(e.value) and "configs/x.toml" in str(e.value)
    path = tmp_path / "run.toml"  # the same mistake in a local run file
    path.write_text(_local(text))
    with pytest.raises(ConfigError) as e:
        load_run_config(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_suggests_the_closest_target_name() -> None:
    text = _lora_run().replace("lora_rank = 4", 'lora_rank = 4\nlora_targets = ["qkvv"]')
    with pytest.raises(ConfigError, match=r"did you mean 'qkv'\?.*fc1, fc2, proj, qkv"):
        parse_run_config(text, "x")
