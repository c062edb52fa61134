"""The torch dataset every consumer reads through (local training, ClientApp, simulation).

A plain dataset in the spirit of EchoNet-Dynamic's `Echo`: pick a source and a split, choose
targets and the clip convention, and get (clip, targets) pairs. With `test_time=True` each item
holds every clip of the video, so predictions can be averaged over clips.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import Dataset

from fedecho.data.cache import FrameCache
from fedecho.data.clips import Augment, ClipSampler, channel_stats, clip_tensor, normalize, test_time_clips
from fedecho.data.records import TARGETS, BadFile, Problem, Reason, ScanResult, VideoRecord
from fedecho.data.source import EchoSource

Item = tuple[torch.Tensor, dict[str, torch.Tensor]]


class EchoVideoDataset(Dataset[Item]):
    """Clips of one split of one source.

    Items: clip (3, length, size, size) float in [0, 1] (or normalised when mean/std are set),
    and a dict of float target tensors. With test_time=True the clip gains a leading clips axis.
    """

    def __init__(
        self,
        source: EchoSource,
        split: str | Sequence[str] | None = "train",
        targets: Sequence[str] = ("ef",),
        sampler: ClipSampler | None = None,
        size: int = 112,
        cache: FrameCache | str | Path | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        augment: Augment | None = None,
        test_time: bool = False,
        max_clips: int | None = None,
        seed: int = 0,
        scan: ScanResult | None = None,
    ):
        unknown = [t for t in targets if t not in TARGETS]
        if unknown:
            raise ValueError(f"unknown target(s) {unknown}; known: {', '.join(TARGETS)}")
        self.source = source
        self.targets = tuple(targets)
        self.sampler = sampler or ClipSampler()
        self.size = size
        self.cache = cache if isinstance(cache, FrameCache) else FrameCache(cache)
        self.mean = torch.tensor(mean, dtype=torch.float32) if mean is not None else None
        self.std = torch.tensor(std, dtype=torch.float32) if std is not None else None
        self.augment = augment
        self.test_time = test_time
        self.max_clips = max_clips
        self.seed = seed
        self.epoch = 0
        scan = scan or source.scan()
        splits = {split} if isinstance(split, str) else set(split) if split is not None else None
        self.problems: list[Problem] = list(scan.problems)
        self.records: list[VideoRecord] = []
        for r in scan.records:
            if splits is not None and r.split not in splits:
                continue
            missing = [t for t in self.targets if t not in r.targets]
            if missing:
                self.problems.append(Problem(r.key, Reason.MISSING_LABEL, f"no {', '.join(missing)}"))
                continue
            self.records.append(r)

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Training draws depend on (seed, epoch, index): deterministic, worker-independent."""
        self.epoch = epoch

    def prepare(self, progress: bool = True, min_frames: int = 1) -> list[Problem]:
        """Decode every video into the cache once; drop and report those that fail."""
        kept, new = [], []
        columns = (
            TextColumn("[bold]decode[/] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, disable=not progress) as bar:
            task = bar.add_task(self.source.kind, total=len(self.records))
            for r in self.records:
                try:
                    frames = self.cache.load(self.source, r, self.size)
                    if len(frames) < min_frames:
                        raise BadFile(Reason.TOO_FEW_FRAMES, f"{len(frames)} frames < {min_frames}")
                    kept.append(r)
                except BadFile as e:
                    new.append(Problem(r.key, e.reason, e.detail))
                bar.advance(task)
        self.records = kept
        self.problems.extend(new)
        return new

    def frames(self, index: int) -> np.ndarray:
        record = self.records[index]
        try:
            return self.cache.load(self.source, record, self.size)
        except BadFile as e:
            raise BadFile(e.reason, f"{record.key}: {e.detail}") from e

    def target_tensor(self, record: VideoRecord) -> dict[str, torch.Tensor]:
        return {t: torch.tensor(record.targets[t], dtype=torch.float32) for t in self.targets}

    def __getitem__(self, index: int) -> Item:
        """(clip, info): info holds the float targets and "frame_index", the sampled frames."""
        return self.item(index, self.epoch)

    def item(self, index: int, epoch: int) -> Item:
        """Item `index` as epoch `epoch` draws it: a loader worker that lives across epochs asks for its epoch."""
        record = self.records[index]
        frames = self.frames(index)
        n = len(frames)
        info = self.target_tensor(record)
        if self.test_time:
            video, info["frame_index"] = test_time_clips(frames, self.sampler, self.max_clips, self.mean, self.std)
            return video, info
        rng = np.random.default_rng([self.seed, epoch, index])
        idx = self.sampler.indices(n, self.sampler.random_clip(n, rng))
        clip = clip_tensor(frames, idx)
        if self.augment is not None:
            clip = self.augment(clip, rng)
        info["frame_index"] = torch.from_numpy(idx)
        return normalize(clip, self.mean, self.std), info

    def limit(self, fraction: float, seed: int = 0) -> None:
        """Keep a deterministic fraction (at least one) of the videos: few-label experiments."""
        if not 0 < fraction <= 1:
            raise ValueError(f"label fraction must be in (0, 1], not {fraction}")
        if fraction < 1:
            keep = max(1, round(fraction * len(self.records)))
            order = np.random.default_rng(seed).permutation(len(self.records))[:keep]
            self.records = [self.records[i] for i in sorted(order)]

    def normalization(self, max_videos: int = 128) -> tuple[list[float], list[float]]:
        """Per-channel mean/std over (up to max_videos of) this dataset's videos, in [0, 1]."""
        rng = np.random.default_rng(self.seed)
        idx = rng.permutation(len(self.records))[:max_videos]
        mean, std = channel_stats(self.frames(int(i)) for i in idx)
        return mean.tolist(), std.tolist()


def average_over_clips(
    predict: Callable[[torch.Tensor], torch.Tensor], clips: torch.Tensor, batch_size: int = 8
) -> torch.Tensor:
    """Test-time averaging: run predict on every clip (N, C, T, H, W) in batches, mean over N."""
    outs = [predict(clips[i : i + batch_size]) for i in range(0, len(clips), batch_size)]
    return torch.cat(outs).mean(dim=0)
