"""The training input pipeline: one DataLoader per training run, its workers kept between epochs.

Each epoch's global batches are drawn in the main process from the run's seed and the epoch (shuffled batches of
the training set, or DP-SGD's Poisson-sampled privacy units), the same on every rank of a data-parallel group
(`fedecho.train.parallel`); each rank loads only its share of each global batch. An item is addressed by (epoch,
index, position in the global batch, global batch size), so a worker that persists between epochs still draws the
clip and augmentation of the right epoch (`EchoVideoDataset.item`), and the trainer can draw the global batch's
masks as one device would and take its rows. Draws depend on (seed, epoch, index) only: the batches are the same
with any number of workers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate

from fedecho.train.parallel import SINGLE, Group

Address = tuple[int, int, int, int]  # (epoch, dataset index or -1: none, position in the global batch or -1, total)
# A global batch: groups of dataset indices that go to one rank together (a privacy unit; else one index each).
GlobalBatch = Sequence[Sequence[int]]

# DataLoader workers when the site says "auto": a training process on a GPU leaves the CPU cores it was granted to
# decode and augment (one for itself), one on the CPU needs them for the model (a worker from 4 granted cores on).
MAX_AUTO_WORKERS = 8


def auto_workers(device: torch.device | str, cores: int) -> int:
    """Loader workers for a training process that was granted `cores` CPU cores."""
    if torch.device(device).type == "cuda":
        return max(1, min(MAX_AUTO_WORKERS, cores - 1))
    return min(MAX_AUTO_WORKERS, cores // 4)


def loader_workers(setting: int | str, device: torch.device | str, group: Group = SINGLE) -> int:
    """[data] num_workers in force for one rank: a number as set, or "auto" from the cores this rank was granted
    (torch's threads, which follow the site's `threads`, split over its ranks)."""
    if setting != "auto":
        return int(setting)
    cores = torch.get_num_threads() if group.distributed else int(os.environ.get("FEDECHO_THREADS", "0") or 0)
    return auto_workers(device, cores or torch.get_num_threads())


class _Items(Dataset):
    """The training set's items by address, with their place in the global batch (and index, for DP-SGD)."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, address: Address) -> tuple[torch.Tensor | None, Any]:
        epoch, index, position, total = address
        if index < 0:  # this rank has no share of the global batch
            return None, total
        # EchoVideoDataset draws by epoch; any other map-style dataset gives the same item every epoch
        video, info = self.dataset.item(index, epoch) if hasattr(self.dataset, "item") else self.dataset[index]
        return video, {**info, "dataset_index": index, "batch_position": position, "batch_total": total}


def _collate(batch: list[tuple[torch.Tensor | None, Any]]) -> tuple[torch.Tensor, dict[str, Any]]:
    items = [b for b in batch if b[0] is not None]
    if not items:  # an empty share (DP-SGD: Poisson sampling can draw nobody): the step still happens
        return torch.zeros(0), {"batch_total": torch.tensor([int(batch[0][1])])}
    return default_collate(items)  # type: ignore[no-any-return]


class _Shares(Sampler[list[Address]]):
    """Each global batch of the current epoch, as this rank's share of addresses."""

    def __init__(self, draw: Callable[[int], Iterable[GlobalBatch]], steps: int, group: Group, pad: bool):
        self.draw, self.steps, self.group, self.pad = draw, steps, group, pad
        self.epoch = 0

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[Address]]:
        for batch in self.draw(self.epoch):
            yield share(batch, self.epoch, self.group, self.pad)


def share(batch: GlobalBatch, epoch: int, group: Group, pad: bool) -> list[Address]:
    """This rank's addresses of a global batch: its groups split into contiguous, near-equal runs over the ranks.

    A rank left without items (a last batch smaller than the ranks) gets one padding item when `pad` (its loss
    counts zero: every rank must run a forward and backward for the gradients to be averaged), else none."""
    total = sum(len(g) for g in batch)
    world, rank = group.world, group.rank
    per, extra = divmod(len(batch), world)
    start = rank * per + min(rank, extra)
    end = start + per + (rank < extra)
    position = sum(len(g) for g in batch[:start])
    mine: list[Address] = []
    for g in batch[start:end]:
        for index in g:
            mine.append((epoch, index, position, total))
            position += 1
    if not mine:
        first = batch[0][0] if batch and pad else -1
        mine = [(epoch, first, -1, total)]
    return mine


class TrainBatches:
    """The global batches of every epoch, this rank's share of each, through one DataLoader.

    `epoch(e)` is what a Trainer iterates for epoch e. draw(e) gives epoch e's global batches (`shuffled` or
    DP-SGD's Poisson batches); `steps` how many it gives."""

    def __init__(
        self,
        dataset: Any,
        draw: Callable[[int], Iterable[GlobalBatch]],
        steps: int,
        *,
        group: Group = SINGLE,
        workers: int = 0,
        pin_memory: bool = False,
        pad: bool = True,
    ):
        self.shares = _Shares(draw, steps, group, pad)
        self.loader = DataLoader(
            _Items(dataset), batch_sampler=self.shares, collate_fn=_collate, num_workers=workers,
            pin_memory=pin_memory, persistent_workers=workers > 0,
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self.shares)

    def epoch(self, epoch: int) -> DataLoader:
        self.shares.epoch = epoch
        return self.loader


def shuffled(n: int, batch_size: int, seed: int) -> Callable[[int], list[GlobalBatch]]:
    """Epoch e's batches: a permutation of the n items drawn from (seed, e), cut into batches (the last one short)."""

    def draw(epoch: int) -> list[GlobalBatch]:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
        return [[[i] for i in order[k : k + batch_size]] for k in range(0, n, batch_size)]

    return draw


def train_batches(
    dataset: Any, batch_size: int, seed: int, group: Group = SINGLE, workers: int = 0, device: str = "cpu"
) -> TrainBatches:
    """Shuffled training batches of `batch_size` items (the global batch, over all ranks) for every epoch."""
    if group.distributed and batch_size < group.world:
        raise ValueError(f"batch_size {batch_size} is smaller than the {group.world} devices it is split over")
    steps = (len(dataset) + batch_size - 1) // batch_size
    pin = torch.device(device).type == "cuda"
    return TrainBatches(
        dataset, shuffled(len(dataset), batch_size, seed), steps, group=group, workers=workers, pin_memory=pin
    )


__all__ = ["TrainBatches", "auto_workers", "loader_workers", "share", "shuffled", "train_batches"]
