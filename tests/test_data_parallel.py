"""Data-parallel training at a site: two gloo processes on the CPU train as one device does on the same global batch,
with and without DP-SGD, through `fedecho train --devices` and a federated round at a site with `[site] devices`.

Fine-tuning is compared under SGD with momentum: Adam divides each gradient by its own running magnitude, so a
parameter whose gradient is float noise (about 1e-9) takes a learning-rate-sized step whose sign is that noise's;
pre-training's gradients carry no such parameters and are compared under AdamW.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict
from safetensors.torch import load_file
from typer.testing import CliRunner

from builders import TINY_DATA, tiny_run
from fedecho.cli import app as cli
from fedecho.client.app import site_from_node_config
from fedecho.client.config import ConfigError, load_site_config, settings_in_force
from fedecho.client.local import RoundMethods, site_train
from fedecho.client.site import Site
from fedecho.data import Augment, ClipSampler, EchoVideoDataset, FrameCache, open_source
from fedecho.fl.config import parse_run_config
from fedecho.models import EchoVisionFM, create_model
from fedecho.privacy.dp_policy import DPPlan, PrivacyPolicy
from fedecho.privacy.ledger import PrivacyLedger
from fedecho.server.submit import submit_run
from fedecho.sim.loopback import make_deployment
from fedecho.storage import Store
from fedecho.storage.store import store_url
from fedecho.synth import synthesize
from fedecho.train import JobResult, TrainingJob
from fedecho.train.config import PhaseSection
from fedecho.train.loader import auto_workers, share, train_batches
from fedecho.train.parallel import Group, launch


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("parallel")
    synthesize(root / "phantom", videos=14, sites=1, seed=0, max_frames=24, progress=False)
    return root


@pytest.fixture(scope="module")
def train_set(phantom: Path) -> EchoVideoDataset:
    """The phantom's 10 training videos: random 8-frame clips, augmented, as training reads them."""
    ds = EchoVideoDataset(
        open_source(phantom / "phantom"), "train", targets=("ef",), sampler=ClipSampler(8), size=112,
        cache=FrameCache(phantom / "cache"), augment=Augment(),
    )  # fmt: skip
    ds.prepare(progress=False)
    assert len(ds) == 10
    return ds


def _model(phase: str) -> EchoVisionFM:
    torch.manual_seed(0)
    if phase == "pretrain":
        return create_model("echo_vit_tiny", decoder=True, num_frames=8, stf_norm="group")
    return create_model("echo_vit_tiny", decoder=False, num_frames=8, tasks=["ef"], stf_norm="group", head="mlp")


def _one_and_two(job: TrainingJob) -> tuple[JobResult, JobResult]:
    one = dataclasses.replace(job, model=copy.deepcopy(job.model)).run(1)
    two = dataclasses.replace(job, model=copy.deepcopy(job.model)).run(2)
    return one, two


def _assert_same_training(one: JobResult, two: JobResult, start: EchoVisionFM, tolerance: float = 1e-5) -> None:
    moved = max((one.state[k].float() - v.float()).abs().max().item() for k, v in start.state_dict().items())
    diff = max((one.state[k].float() - two.state[k].float()).abs().max().item() for k in one.state)
    assert moved > 100 * tolerance, f"training barely moved the model ({moved}): the comparison would be empty"
    assert diff < tolerance, f"2 processes differ from 1 by {diff} (training moved the weights by {moved})"
    assert [(r.steps, r.examples) for r in one.epochs] == [(r.steps, r.examples) for r in two.epochs]
    assert [r.loss for r in one.epochs] == pytest.approx([r.loss for r in two.epochs], rel=1e-5)
    assert one.updates == two.updates


def test_each_rank_loads_its_share_of_the_global_batch() -> None:
    batch = [[4], [7], [1]]
    shares = [share(batch, 2, Group(r, 2), pad=True) for r in range(2)]
    assert shares == [[(2, 4, 0, 3), (2, 7, 1, 3)], [(2, 1, 2, 3)]]
    # a last batch smaller than the ranks: the rank without an item runs a padding item that counts zero
    assert share([[5]], 0, Group(1, 2), pad=True) == [(0, 5, -1, 1)]
    assert share([[5]], 0, Group(1, 2), pad=False) == [(0, -1, -1, 1)]
    # a privacy unit's videos stay on one rank
    units = [[0, 1], [2], [3, 4, 5]]
    assert [a[1] for a in share(units, 0, Group(0, 2), pad=False)] == [0, 1, 2]
    assert [a[1:3] for a in share(units, 0, Group(1, 2), pad=False)] == [(3, 3), (4, 4), (5, 5)]


def test_loader_workers_persist_between_epochs_and_change_nothing(train_set: EchoVideoDataset) -> None:
    """The same clips with 0 or 2 workers, every epoch; a worker kept from epoch 0 still draws epoch 1's clips."""
    plain, workers = train_batches(train_set, 4, seed=1), train_batches(train_set, 4, seed=1, workers=2)
    assert workers.loader.persistent_workers and not workers.loader.pin_memory  # pinned on CUDA only
    epochs = []
    for epoch in (0, 1):
        a, b = list(plain.epoch(epoch)), list(workers.epoch(epoch))
        assert len(a) == len(b) == 3
        for (va, ia), (vb, ib) in zip(a, b, strict=True):
            assert torch.equal(va, vb) and torch.equal(ia["frame_index"], ib["frame_index"])
        epochs.append(torch.cat([v for v, _ in b]))
    assert not torch.equal(epochs[0], epochs[1])  # another epoch: other order, clips and augmentation
    assert auto_workers("cpu", 2) == 0 and auto_workers("cpu", 16) == 4 and auto_workers("cuda", 16) == 8
    assert auto_workers("cuda", 2) == 1
    with pytest.raises(ValueError, match="batch_size 1 is smaller than the 2 devices"):
        train_batches(train_set, 1, seed=0, group=Group(0, 2))


@pytest.mark.slow
def test_pretraining_on_two_processes_steps_as_one_device(train_set: EchoVideoDataset) -> None:
    # batch 3 over 10 videos: shares of 2 and 1, and a last batch of one video, which leaves a rank only padding
    cfg = PhaseSection(epochs=2, batch_size=3, lr=1e-3, warmup_epochs=0)
    model = _model("pretrain")
    one, two = _one_and_two(TrainingJob(model, "pretrain", cfg, train_set, seed=3, device="cpu"))
    assert [r.steps for r in one.epochs] == [4, 4] and one.examples == 20
    _assert_same_training(one, two, model)


@pytest.mark.slow
def test_fine_tuning_with_accumulation_and_fedprox_on_two_processes(train_set: EchoVideoDataset) -> None:
    cfg = PhaseSection(optimizer="sgd", epochs=2, batch_size=4, accumulate=2, lr=1e-2, warmup_epochs=0, tasks=["ef"])
    model = _model("finetune")
    anchors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    methods = RoundMethods(lr=1e-2, mu=0.5, anchors=anchors)
    job = TrainingJob(model, "finetune", cfg, train_set, seed=5, device="cpu", setup=methods)
    _assert_same_training(*_one_and_two(job), model)


@pytest.mark.slow
def test_dp_sgd_on_two_processes_is_the_one_device_mechanism(train_set: EchoVideoDataset) -> None:
    """Patient-level DP-SGD: the same Poisson draws and the same noise from the round's secret seed; each rank clips
    its patients, rank 0 adds the noise, and the average is the one-device step's."""
    cfg = PhaseSection(optimizer="sgd", epochs=1, batch_size=4, lr=1e-2, warmup_epochs=0, tasks=["ef"])
    units = ((0, 1), (2,), (3, 4, 5), (6,), (7, 8), (9,))
    plan = DPPlan(1.0, 1.0, 0.6, 4, 4, units, "patient", 1e-5)  # type: ignore[arg-type]
    model = _model("finetune")
    job = TrainingJob(model, "finetune", cfg, train_set, seed=3, device="cpu", plan=plan, dp_seed=12345)
    one, two = _one_and_two(job)
    _assert_same_training(one, two, model)
    # another secret seed: other draws and noise (the seed is what makes the two runs equal, not a fixed output)
    other = dataclasses.replace(job, model=copy.deepcopy(model), dp_seed=54321).run(1)
    assert max((other.state[k] - one.state[k]).abs().max().item() for k in one.state) > 1e-4


@dataclasses.dataclass
class ListeningSockets:
    """A job that reports where its rank listens, once the process group is up (the gloo pairs included)."""

    def __call__(self, group: Group) -> list[tuple[str, list[str], str]]:
        import os
        import stat

        import psutil

        torch.distributed.all_reduce(torch.ones(1))  # every pair connected
        bound = [c.laddr.ip for c in psutil.Process().net_connections("inet") if c.status == psutil.CONN_LISTEN]
        store = Path(os.environ.get("TMPDIR", "/tmp"))
        folders = [p for p in store.glob("fedecho-ddp-*") if (p / "job.pkl").exists()]
        modes = sorted({oct(stat.S_IMODE(p.stat().st_mode)) for p in folders})
        gathered: list[object] = [None] * group.world
        torch.distributed.all_gather_object(gathered, (str(group.rank), bound, ",".join(modes)))
        return gathered  # type: ignore[return-value]


@pytest.mark.slow
def test_the_process_group_listens_on_loopback_only() -> None:
    """As an outsider on the network sees a site training on two devices: nothing of the group listens on
    another interface, and the store the ranks meet through is the site user's alone."""
    ranks = launch(ListeningSockets(), 2, "cpu")
    assert [r[0] for r in ranks] == ["0", "1"]
    for _, bound, modes in ranks:
        assert bound, "gloo opened no listening socket: the check would be empty"
        assert all(ip in ("127.0.0.1", "::1") for ip in bound), bound
        assert modes == "0o700"


@pytest.mark.slow
def test_a_failing_rank_raises_its_own_error(train_set: EchoVideoDataset) -> None:
    model = create_model("echo_vit_tiny", decoder=False, num_frames=8, tasks=["ef"], stf_norm="batch", head="mlp")
    cfg = PhaseSection(epochs=1, batch_size=4, tasks=["ef"])
    job = TrainingJob(model, "finetune", cfg, train_set, seed=0, device="cpu")
    with pytest.raises(ValueError, match=r"cannot share BatchNorm statistics.*stf_norm = \"group\""):
        job.run(2)


RUN = """
[model]
name = "echo_vit_tiny"
num_frames = 8
stf_norm = "group"

[data]
root = "{data}"
cache = "{cache}"
max_test_clips = 1

[pretrain]
epochs = 2
batch_size = 3
lr = 1e-3
warmup_epochs = 0
"""


@pytest.mark.slow
def test_fedecho_train_devices_2_checkpoints_what_one_device_trains(phantom: Path, tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(RUN.format(data=phantom / "phantom", cache=phantom / "cache"))
    runner = CliRunner()
    for devices in (1, 2):
        args = ["train", "pretrain", "-c", str(config), "--out", str(tmp_path / f"d{devices}"), "--device", "cpu"]
        res = runner.invoke(cli, [*args, "--devices", str(devices)])
        assert res.exit_code == 0, res.output
    assert "data-parallel over 2 cpu devices, global batch 3" in res.output
    one, two = (load_file(str(tmp_path / f"d{d}" / "model.safetensors")) for d in (1, 2))
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    records = [json.loads(line) for line in (tmp_path / "d2" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["examples"]) for r in records] == [(1, 10), (2, 10)]  # written once, by rank 0
    assert all("val_loss" in r for r in records)
    res = runner.invoke(cli, ["train", "pretrain", "-c", str(config), "--out", str(tmp_path / "x"), "--devices", "0"])
    assert res.exit_code == 2


@pytest.mark.slow
def test_a_site_round_on_two_devices_sends_the_one_device_update_and_accounts_the_global_batch(
    phantom: Path, tmp_path: Path
) -> None:
    text = tiny_run().replace("steps = 1\nbatch_size = 2", 'steps = 3\nbatch_size = 3\noptimizer = "sgd"', 1)
    cfg = parse_run_config(text)
    model = _model("pretrain")
    received = {k: v.float() for k, v in model.state_dict().items()}
    options = {"seed": 1, "lr": 0.1, "server-round": 1, "run-id": 7}
    updates = {}
    for devices in (1, 2):
        site = Site("site01", phantom / "phantom", phantom / "cache", tmp_path / f"s{devices}", policy=TINY_DATA,
                    devices=devices)  # fmt: skip
        updates[devices], metrics, _ = site_train(cfg, "pretrain", received, site, options)
        assert metrics["steps"] == 3.0
    assert max(updates[1][k].abs().max().item() for k in updates[1]) > 1e-3
    assert max((updates[1][k] - updates[2][k]).abs().max().item() for k in updates[1]) < 1e-5
    # DP-SGD at a site with two devices: one reservation, spent once, for the global batch's sample rate
    dp = PrivacyPolicy(dp="required", min_noise_multiplier=1.0, unit="video")
    site = Site("site01", phantom / "phantom", phantom / "cache", tmp_path / "dp", policy=TINY_DATA, privacy=dp,
                devices=2)  # fmt: skip
    update, metrics, _ = site_train(cfg, "pretrain", received, site, options)
    assert all(torch.isfinite(v).all() for v in update.values())
    with PrivacyLedger(site.state) as ledger:
        (entry,) = ledger.entries()
    assert entry.status == "spent" and entry.steps == 3
    assert entry.sample_rate == pytest.approx(3 / 10) == metrics["dp_sample_rate"]


def test_site_toml_devices_must_be_granted(phantom: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = f'[site]\nname = "s"\ndata = "{phantom / "phantom"}"\ncache = "c"\nstate = "s"\n'
    path = tmp_path / "site.toml"
    path.write_text(base + 'threads = 1\ndevice = "cpu"\ndevices = 2\n')
    with pytest.raises(ConfigError, match=r"\[site\]\.devices.*2 CPU processes but \[site\] threads = 1"):
        load_site_config(path)
    if not torch.cuda.is_available():
        path.write_text(base + 'device = "cuda"\ndevices = 2\n')
        with pytest.raises(ConfigError, match=r"devices.*is 2 but 0 CUDA device\(s\) are visible"):
            load_site_config(path)
    path.write_text(base + 'threads = 2\ndevice = "cpu"\ndevices = 2\n')
    cfg = load_site_config(path)
    assert cfg.devices == 2
    assert "training: cpu, data-parallel over 2 devices; 2 CPU threads" in settings_in_force(cfg)
    # what the deployed ClientApp makes of it: the site it trains as (it sets the site's threads for this process)
    monkeypatch.setenv("FEDECHO_THREADS", "0")
    context = Context(run_id=1, node_id=1, node_config={"site-config": str(path)}, state=RecordDict(), run_config={})
    site = site_from_node_config(context)
    assert (site.device, site.devices) == ("cpu", 2)


def _ranks_in_group(pgid: int) -> int:
    """Data-parallel ranks running in a SuperNode's process group (its ClientApp's children)."""
    out = subprocess.run(["ps", "-ww", "-eo", "pgid,args"], capture_output=True, text=True, check=True).stdout
    return sum(1 for line in out.splitlines()[1:] if int(line.split(None, 1)[0]) == pgid and "_rank_main" in line)


@pytest.mark.slow
def test_a_deployed_site_trains_its_rounds_on_two_devices_under_dp(phantom: Path, tmp_path: Path) -> None:
    """A real SuperLink and SuperNode on loopback; the site's site.toml says devices = 2 and DP-SGD is required:
    its ClientApp runs every round's local steps on two ranks, and the site's ledger accounts one round each."""
    dep = make_deployment(tmp_path / "deploy", min_sites=1)
    dp = '[privacy]\ndp = "required"\nmin_noise_multiplier = 1.0\nunit = "video"\n'
    try:
        dep.add_site("alpha", phantom / "phantom", devices=2, extra=dp)
        dep.start_all()
        seen, done = [0], threading.Event()

        def watch() -> None:
            while not done.is_set():
                seen[0] = max(seen[0], _ranks_in_group(dep.supernodes["alpha"].pid))
                time.sleep(0.2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        run_toml = tmp_path / "tiny.toml"
        run_toml.write_text(tiny_run(pretrain_rounds=2, finetune_rounds=0))
        lines: list[str] = []
        sub = submit_run(dep.server, run_toml, echo=lines.append)
        done.set()
        watcher.join()
        assert sub.returncode == 0 and sub.status == "finished:completed", "\n".join(lines)
        assert seen[0] == 2, f"saw {seen[0]} data-parallel ranks at the site"
        with PrivacyLedger(dep.sites["alpha"].state) as ledger:
            entries = ledger.entries()
        assert [(e.round, e.status) for e in entries] == [(1, "spent"), (2, "spent")]
        with Store(store_url(dep.server.state)) as store:
            (run,) = [r for r in store.list_runs() if r.flower_run_id == sub.flower_run_id]
            rounds = store.rounds(run.id)
        assert [r.sites_replied for r in rounds] == [1, 1]
    finally:
        dep.close()
