"""Local training: metrics against scikit-learn, loss goes down, determinism, resume, configs, CLI."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn import metrics as skm
from typer.testing import CliRunner

from fedecho.cli import app
from fedecho.train import ConfigError, load_run_config, read_metrics, train_phase
from fedecho.train import run as run_module
from fedecho.train.metrics import binary, multiclass, regression

runner = CliRunner()


def test_metrics_match_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    y = rng.normal(55, 12, 200)
    pred = y + rng.normal(0, 5, 200)
    r = regression(y, pred)
    assert r["mae"] == pytest.approx(skm.mean_absolute_error(y, pred))
    assert r["rmse"] == pytest.approx(np.sqrt(skm.mean_squared_error(y, pred)))
    assert r["r2"] == pytest.approx(skm.r2_score(y, pred))
    yb = (rng.random(300) < 0.7).astype(int)
    prob = np.round(np.clip(yb * 0.3 + rng.random(300) * 0.7, 0, 1), 1)  # rounded: many ties
    b = binary(yb, prob)
    assert b["accuracy"] == pytest.approx(skm.accuracy_score(yb, prob >= 0.5))
    assert b["f1"] == pytest.approx(skm.f1_score(yb, prob >= 0.5))
    assert b["auroc"] == pytest.approx(skm.roc_auc_score(yb, prob))
    yc = rng.integers(0, 5, 400)
    logits = rng.normal(size=(400, 5)) + 1.5 * np.eye(5)[yc]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = multiclass(yc, probs)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(yc, probs.argmax(1)))
    assert m["f1"] == pytest.approx(skm.f1_score(yc, probs.argmax(1), average="macro"))
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(yc, probs, multi_class="ovr", average="macro"))


@pytest.fixture()
def run_config(tmp_path: Path, echonet_phantom: Path) -> Path:
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        f"""
[model]
name = "echo_vit_tiny"
[data]
root = "{echonet_phantom}"
cache = "{tmp_path / "cache"}"
max_test_clips = 2
[pretrain]
epochs = 6
batch_size = 3
lr = 2e-3
warmup_epochs = 1
[finetune]
epochs = 3
batch_size = 3
lr = 1e-3
tasks = ["ef", "ef_class"]
"""
    )
    return cfg


@pytest.mark.slow
def test_short_pretraining_lowers_the_loss(run_config: Path, tmp_path: Path) -> None:
    last = train_phase(load_run_config(run_config), "pretrain", tmp_path / "pre", progress=False)
    losses = [r["train_loss"] for r in read_metrics(tmp_path / "pre")]
    assert len(losses) == 6 and last["epoch"] == 6
    assert np.mean(losses[-2:]) < 0.95 * np.mean(losses[:2])
    assert "val_loss" in last and (tmp_path / "pre" / "model.safetensors").is_file()


@pytest.mark.slow
def test_finetune_is_deterministic_and_reports_test_metrics(run_config: Path, tmp_path: Path) -> None:
    cfg = load_run_config(run_config)
    a = train_phase(cfg, "finetune", tmp_path / "a", progress=False)
    b = train_phase(cfg, "finetune", tmp_path / "b", progress=False)
    assert a["phase"] == "test" and {"ef_mae", "ef_rmse", "ef_r2", "ef_class_accuracy", "ef_class_auroc"} <= set(a)
    np.testing.assert_equal(a, b)  # NaN-aware: one test video has no AUROC
    wa, wb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_resume_equals_an_uninterrupted_run(run_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_run_config(run_config)
    cfg.pretrain.epochs = 3
    train_phase(cfg, "pretrain", tmp_path / "whole", progress=False)
    saves = {"n": 0}
    real = run_module._save_state

    def dying_save(out: Path, trainer) -> None:
        real(out, trainer)
        saves["n"] += 1
        if saves["n"] == 2:
            raise KeyboardInterrupt  # the process is stopped after epoch 2's checkpoint

    monkeypatch.setattr(run_module, "_save_state", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train_phase(cfg, "pretrain", tmp_path / "cut", progress=False)
    monkeypatch.setattr(run_module, "_save_state", real)
    assert [r["epoch"] for r in read_metrics(tmp_path / "cut")] == [1, 2]
    train_phase(cfg, "pretrain", tmp_path / "cut", resume=True, progress=False)
    whole, cut = (
        load_file(str(tmp_path / "whole" / "model.safetensors")),
        load_file(str(tmp_path / "cut" / "model.safetensors")),
    )
    assert all(torch.equal(whole[k], cut[k]) for k in whole)
    assert [r["train_loss"] for r in read_metrics(tmp_path / "cut")] == [
        r["train_loss"] for r in read_metrics(tmp_path / "whole")
    ]


def test_frozen_encoder_and_pretrained_init(run_config: Path, tmp_path: Path) -> None:
    cfg = load_run_config(run_config)
    cfg.pretrain.epochs = 1
    train_phase(cfg, "pretrain", tmp_path / "pre", progress=False)
    probe = copy.deepcopy(cfg)
    probe.finetune.freeze_encoder = True
    probe.finetune.epochs = 1
    train_phase(probe, "finetune", tmp_path / "probe", init=tmp_path / "pre" / "model.safetensors", progress=False)
    pre = load_file(str(tmp_path / "pre" / "model.safetensors"))
    ft = load_file(str(tmp_path / "probe" / "model.safetensors"))
    enc = [k for k in ft if k.startswith("encoder.")]
    assert enc and all(torch.equal(pre[k], ft[k]) for k in enc)  # started from it, never moved
    assert "fusion.joint.body.0.weight" in ft and "decoder.head.weight" not in ft


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[pretrain]\nepoch = 3\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: \[pretrain\]: unknown field\(s\) epoch"):
        load_run_config(bad)
    bad.write_text('[finetune]\nlr = "fast"\n')
    with pytest.raises(ConfigError, match=r"\[finetune\]\.lr must be a number"):
        load_run_config(bad)
    bad.write_text('[model]\nname = "echo_vit_tiny"\nmask_type = "checkerboard"\n')
    with pytest.raises(ConfigError, match=r"\[model\] invalid model config: mask_type"):
        load_run_config(bad)
    bad.write_text("[optimiser]\n")
    with pytest.raises(ConfigError, match="unknown section"):
        load_run_config(bad)


def test_shipped_configs_load() -> None:
    root = Path(__file__).resolve().parents[1] / "configs"
    for name in ("phantom_tiny.toml", "paper_echonet.toml"):
        load_run_config(root / name)


@pytest.mark.slow
def test_cli_train_evaluate_predict(
    run_config: Path, tmp_path: Path, echonet_phantom: Path, dicom_phantom: Path
) -> None:
    out = tmp_path / "ft"
    res = runner.invoke(app, ["train", "finetune", "--config", str(run_config), "--out", str(out)])
    assert res.exit_code == 0, res.output
    ckpt = out / "model.safetensors"
    res = runner.invoke(
        app, ["train", "evaluate", "--config", str(run_config), "--checkpoint", str(ckpt), "--split", "val"]
    )
    assert res.exit_code == 0 and "ef_mae" in res.output
    video = sorted((echonet_phantom / "Videos").glob("*.avi"))[0]
    res = runner.invoke(app, ["predict", str(video), "--checkpoint", str(ckpt)], env={"COLUMNS": "160"})
    assert res.exit_code == 0 and "% (LVEF)" in res.output and "P(EF >= threshold)" in res.output
    cine = sorted((dicom_phantom / "site01").rglob("*_0001.dcm"))[0]
    res = runner.invoke(app, ["predict", str(cine), "--checkpoint", str(ckpt)], env={"COLUMNS": "160"})
    assert res.exit_code == 0 and "% (LVEF)" in res.output
    res = runner.invoke(app, ["train", "pretrain", "--config", str(tmp_path / "missing.toml")])
    assert res.exit_code == 2


def test_gradient_accumulation_counts_updates(run_config: Path, tmp_path: Path) -> None:
    cfg = load_run_config(run_config)
    cfg.pretrain.epochs, cfg.pretrain.batch_size, cfg.pretrain.accumulate = 1, 2, 2
    train_phase(cfg, "pretrain", tmp_path / "acc", progress=False)
    state = torch.load(tmp_path / "acc" / run_module.STATE_FILE, weights_only=False)
    n_train = read_metrics(tmp_path / "acc")[0]["examples"]
    assert state["updates"] == math.ceil(math.ceil(n_train / 2) / 2)  # ceil(ceil(n / batch) / accumulate)


def test_sgd_step_is_the_scaled_gradient() -> None:
    """optimizer = "sgd": a site's one local step sends lr x gradient, which a server optimiser (FedAdam) normalises."""
    from fedecho.models import create_model
    from fedecho.train import Trainer
    from fedecho.train.config import PhaseSection

    torch.manual_seed(0)
    model = create_model("echo_vit_tiny", decoder=False, tasks=["ef"], num_frames=8, stf_norm="group")
    cfg = PhaseSection(optimizer="sgd", lr=0.5, min_lr=0.5, warmup_epochs=0.0, weight_decay=0.0, epochs=1)
    torch.nn.init.normal_(model.heads["ef"].weight, std=0.02)  # zero at init: no gradient would reach the encoder
    trainer = Trainer(model, "finetune", cfg, steps_per_epoch=1, device=torch.device("cpu"))
    video = torch.rand(2, 3, 8, 112, 112)
    info = {"frame_index": torch.arange(8).repeat(2, 1), "ef": torch.tensor([40.0, 60.0])}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.loss(video, info, torch.Generator()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    trainer.train_epoch([(video, info)])
    for n, g in grads.items():
        torch.testing.assert_close(model.state_dict()[n] - before[n], -0.5 * g, rtol=1e-3, atol=1e-7, msg=n)
    assert sum(float(g.abs().sum()) for n, g in grads.items() if n.startswith("encoder.blocks")) > 0
