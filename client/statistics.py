"""A site's answers to the server's statistics queries (`fedecho.fl.statistics` says what is asked and why).

A query leaves the site like an update does: the site's policy for the phase (`enforce`) before any data
access, its minimum videos and patients on the training set (`enforce_data`, from the data index, and again
after decoding), a row in the site's audit log (message type `query.<question>`, the digest of the arrays
sent), and, where the site trains under DP (its policy requires it or the run's [dp] is on: `plan_round`
decides as for a training round), the Gaussian mechanism on every released sum, reserved in the site's
privacy ledger before any video is decoded and refused when it would exceed the site's budget. The training
set is the one `site_train` uses: the same split, label fraction and decodable videos.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedecho.client.local import load_received, site_datasets
from fedecho.client.site import Site
from fedecho.data import EchoVideoDataset
from fedecho.device import autocast, pick_device
from fedecho.fl.config import FedRunConfig, round_seed
from fedecho.fl.protocol import (
    build_model,
)
from fedecho.fl.statistics import (
    CLIP_SPREADS,
    HEAD_STATS,
    QUERY,
    TARGET_STATS,
    clip_rows,
    feature_clip,
    gaussian_noise,
    head_keys,
    head_sensitivity,
    head_sums,
    regression_tasks,
    target_centre,
    target_keys,
    target_sensitivity,
    target_sums,
)
from fedecho.models import get_task
from fedecho.models.heads import last_linear
from fedecho.privacy.dp_policy import DPPlan, PrivacyRefused, kept_units, plan_round

if TYPE_CHECKING:
    pass

log = logging.getLogger("fedecho.client")


def site_query(
    cfg: FedRunConfig, phase: str, received: dict[str, torch.Tensor], site: Site, options: dict[str, Any]
) -> tuple[ArrayRecord, dict[str, float]]:
    """The answer to one query: float64 arrays (`fedecho.fl.statistics.target_keys` / `head_keys`) and metrics
    (num-examples: the training videos; under DP the site's epsilon after this release, as a training reply)."""
    t0 = time.time()
    question = str(options[QUERY])
    model = build_model(cfg, phase)
    if question == HEAD_STATS:
        load_received(model, cfg, phase, received, site, str(options.get("frozen-sha256", "")))
    train = training_set(cfg, model, phase, site, options)
    release = Release.reserve(cfg, phase, site, train, options)  # before any video is decoded
    planned = {r.key: i for i, r in enumerate(train.records)}
    train.prepare(progress=False)
    if not len(train):
        raise ValueError(f"site {site.name} has no usable training videos for {phase}")
    site.enforce_data("the training set (after dropping videos that do not decode)", train.records)
    weights = np.ones(len(train))
    if release is not None:
        release.keep([planned[r.key] for r in train.records])
        weights = release.weights(len(train))
    tasks = regression_tasks(cfg.phase("finetune").tasks)
    if question == TARGET_STATS:
        arrays, sensitivity = _target_stats(train, tasks, weights, release is not None)
    else:
        arrays, sensitivity = _head_stats(model, cfg, train, tasks, weights, site, release is not None)
    metrics = {"num-examples": float(len(train))}
    if release is not None:
        noisy = [k for k in arrays if not k.endswith("/count")]  # the count leaves exactly, as num-examples does
        metrics.update(release.release(arrays, noisy, sensitivity, site))
    metrics["seconds"] = time.time() - t0
    return ArrayRecord({k: Array(np.array(v, dtype=np.float64, order="C")) for k, v in arrays.items()}), metrics


def training_set(
    cfg: FedRunConfig, model: torch.nn.Module, phase: str, site: Site, options: dict[str, Any]
) -> EchoVideoDataset:
    """The training set `site_train` would use (index only, nothing decoded), checked against the site's policy."""
    seed = round_seed(int(options["seed"]), phase, 0, site.name)
    train = site_datasets(cfg, model, phase, site, seed)["train"]  # type: ignore[arg-type]
    if phase == "finetune" and cfg.local.data.label_fraction < 1:
        train.limit(cfg.local.data.label_fraction, cfg.phase(phase).seed)
    site.enforce_data("the training set", train.records)
    return train


def _target_stats(
    train: EchoVideoDataset, tasks: list[str], weights: np.ndarray, private: bool
) -> tuple[dict[str, np.ndarray], float]:
    """Per task: count, sum and sum of squares of the encoded targets around the task's reference centre."""
    arrays: dict[str, np.ndarray] = {}
    bounds = []
    count = float(round(weights.sum()))
    for t in tasks:
        task = get_task(t)
        centre, spread = task.reference()
        raw = torch.tensor([r.targets[t] for r in train.records], dtype=torch.float32)  # as the dataset gives them
        d = task.encode(raw).double().numpy() - centre
        bound = CLIP_SPREADS * spread
        if private:
            d = np.clip(d, -bound, bound)
        _, s1, s2 = target_sums(d, weights)
        keys = target_keys(t)
        arrays.update({keys[0]: np.array(count), keys[1]: np.array(s1), keys[2]: np.array(s2)})
        bounds.append(bound)
    return arrays, target_sensitivity(bounds)


@torch.no_grad()
def _head_stats(
    model: torch.nn.Module,
    cfg: FedRunConfig,
    train: EchoVideoDataset,
    tasks: list[str],
    weights: np.ndarray,
    site: Site,
    private: bool,
) -> tuple[dict[str, np.ndarray], float]:
    """Per regression head: Phi^T Phi and Phi^T (u - centre) of the test-time averaged features entering its last
    Linear, u the target in the head's standardised units."""
    device = pick_device(site.device)
    model.to(device).eval()
    heads = {t: model.heads[t] for t in tasks}  # type: ignore[index]
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        last_linear(h).register_forward_hook(lambda _m, inputs, _o, t=t: seen.__setitem__(t, inputs[0].detach()))
        for t, h in heads.items()
    ]
    view = copy.copy(train)  # every test clip of each training video, as `evaluate` sees a video
    view.test_time, view.augment, view.max_clips = True, None, cfg.local.data.max_test_clips or None
    batch = cfg.phase("finetune").batch_size
    features = {t: np.zeros((len(view), last_linear(h).in_features)) for t, h in heads.items()}
    targets = {t: np.zeros(len(view)) for t in tasks}
    try:
        for i in range(len(view)):
            clips, info = view[i]
            sums: dict[str, torch.Tensor] = {}
            for j in range(0, len(clips), batch):
                with autocast(device):
                    model(clips[j : j + batch].to(device), info["frame_index"][j : j + batch].to(device))
                for t in tasks:
                    s = seen[t].double().sum(dim=0).cpu()
                    sums[t] = sums[t] + s if t in sums else s
            for t in tasks:
                features[t][i] = (sums[t] / len(clips)).numpy()
                targets[t][i] = float(get_task(t).encode(info[t].float()))
    finally:
        for h in hooks:
            h.remove()
    arrays: dict[str, np.ndarray] = {}
    terms = []
    count = float(round(weights.sum()))
    for t in tasks:
        stats = model.heads.stats(t)  # type: ignore[operator]
        assert stats is not None  # a regression head
        shift, scale = (s.detach().double().cpu().numpy() for s in stats)
        u = (targets[t][:, None] - shift) / scale - target_centre(t, shift, scale)
        x = features[t]
        c, b = feature_clip(x.shape[1]), float(np.max(CLIP_SPREADS * get_task(t).reference()[1] / scale))
        if private:
            x, u = clip_rows(x, c), np.clip(u, -b, b)
        _, gram, moment = head_sums(x, u, weights)
        keys = head_keys(t)
        arrays.update({keys[0]: np.array(count), keys[1]: gram, keys[2]: moment})
        terms.append((c, b))
    return arrays, head_sensitivity(terms)


class Release:
    """A statistics release under DP at one site: planned and reserved before any video is decoded, then noised
    and marked spent."""

    def __init__(self, plan: DPPlan, entry: int, epsilon_max: float):
        self.plan, self.entry, self.epsilon_max = plan, entry, epsilon_max

    @classmethod
    def reserve(
        cls, cfg: FedRunConfig, phase: str, site: Site, train: EchoVideoDataset, options: dict[str, Any]
    ) -> Release | None:
        """None when the site does not train under DP; else the release reserved in the site's ledger (one
        Gaussian mechanism, sample rate 1), or PrivacyRefused when it would exceed the site's budget."""
        pcfg = cfg.phase(phase)
        groups = [r.group for r in train.records]
        plan = plan_round(site.privacy, cfg.dp, groups, pcfg.batch_size, pcfg.steps, pcfg.epochs)
        if plan is None:
            return None
        from fedecho.privacy.ledger import PrivacyLedger  # Opacus' accountant loads only where DP is used

        question = str(options[QUERY])
        mechanism = (plan.noise_multiplier, 1.0, 1)
        with PrivacyLedger(site.state) as ledger:
            before, after = ledger.epsilon(plan.delta), ledger.epsilon(plan.delta, [mechanism])
            cap = site.privacy.epsilon_max
            if cap > 0 and after > cap:
                raise PrivacyRefused(
                    f"privacy budget: releasing the {question} (Gaussian mechanism, noise multiplier "
                    f"{plan.noise_multiplier:g}) would take the site's epsilon from {before:.3f} to {after:.3f} at "
                    f"delta {plan.delta:g}, above its epsilon_max {cap:g}"
                )
            entry, _ = ledger.reserve(
                run=f"{cfg.run.name} (run {options.get('run-id', '?')})", phase=f"{phase}/{question}",
                round=int(options.get("server-round", 0)), noise_multiplier=plan.noise_multiplier, sample_rate=1.0,
                steps=1, delta=plan.delta, epsilon_max=cap, unit=plan.unit,
            )  # fmt: skip
        return cls(plan, entry, cap)

    def keep(self, kept: list[int]) -> None:
        """The videos that decoded (their indices in the planned training set)."""
        self.plan = kept_units(self.plan, kept)

    def weights(self, n: int) -> np.ndarray:
        """Each video's weight: 1 / the videos of its privacy unit (a patient's videos make one contribution)."""
        w = np.zeros(n)
        for unit in self.plan.units:
            w[list(unit)] = 1.0 / len(unit)
        return w

    def release(
        self, arrays: dict[str, np.ndarray], keys: list[str], sensitivity: float, site: Site
    ) -> dict[str, float]:
        """Noise the released sums (std: noise multiplier x sensitivity), mark the reservation spent, and return
        the privacy metrics of a training reply."""
        from fedecho.privacy.ledger import PrivacyLedger

        gaussian_noise(arrays, keys, self.plan.noise_multiplier * sensitivity)
        with PrivacyLedger(site.state) as ledger:
            ledger.spend(self.entry)
            epsilon, per_patient = ledger.epsilon(self.plan.delta), ledger.per_patient()
        return {
            "epsilon": epsilon,
            "delta": self.plan.delta,
            "dp_noise_multiplier": self.plan.noise_multiplier,
            "dp_sample_rate": 1.0,
            "dp_steps": 1.0,
            "dp_per_patient": float(per_patient),
            "dp_sensitivity": sensitivity,
        }


__all__ = ["Release", "site_query", "training_set"]
