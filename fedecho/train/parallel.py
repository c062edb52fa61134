"""Data-parallel training over a site's devices: one process per device, launched by fedecho.

`launch(job, devices)` runs `job(group)` in `devices` fresh interpreters joined in one process group (NCCL on
GPUs, gloo on CPUs), and returns what rank 0's job returned. One device runs the job in this process, with the
single-process `Group`, so there is one training code path, not two.

What stays the same as on one device (`fedecho.train.loader.TrainBatches`, `fedecho.train.engine.Trainer`): every
rank draws the same global batches from the same seeds and trains on its share of each, the masks and clips of a
global batch are drawn as one device draws them, and gradients are averaged weighted by each rank's share, so the
step is the one device's step on the global batch (up to the order floating-point sums are taken in). Stochastic
depth (`drop_path` > 0) draws per rank: the same in distribution, not bit for bit.

Who can reach the process group: the ranks meet through a file store in a private temporary folder (mode 0700),
and gloo's and NCCL's sockets are bound to the loopback interface, so only processes on this machine take part;
nothing listens on another interface. A rank that fails ends the others (`launch` terminates them) and its
exception is raised here, unchanged, so a refusal or a bad batch reads as on one device; a rank whose launcher is
gone ends itself.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")

# Rank 0 evaluates and checkpoints between epochs while the others wait: patience for that, not for a dead rank
# (a rank that dies ends the job at once through the process context).
GROUP_TIMEOUT = timedelta(hours=6)


class ParallelError(RuntimeError):
    """A rank ended without an exception of its own to raise (killed, out of memory, ...)."""


@dataclass(frozen=True)
class Group:
    """This process's place among the ranks that train together (rank 0 of 1 on a single device)."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"  # this rank's device, e.g. "cuda:1"

    @property
    def main(self) -> bool:
        """Whether this rank writes what the job leaves behind (checkpoints, metrics)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def all_sum(self, values: list[float]) -> list[float]:
        """Sums over the ranks (float64), identical on every rank."""
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)  # NCCL reduces GPU tensors only
        torch.distributed.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


SINGLE = Group()
# What a rank's interpreter runs: argv is (folder, world, device, threads, rank)
RANK_MAIN = "import sys; from fedecho.train.parallel import _rank_main; _rank_main(*sys.argv[1:])"


def check_devices(devices: int, device: str) -> None:
    """Fail before anything starts when `devices` cannot be granted on `device` ("cpu" or "cuda")."""
    if devices < 1:
        raise ValueError(f"devices must be at least 1, not {devices}")
    if device == "cuda" and devices > torch.cuda.device_count():
        raise ValueError(f"devices = {devices} but {torch.cuda.device_count()} CUDA device(s) are visible")


def launch(job: Callable[[Group], T], devices: int, device: str, threads: int | None = None) -> T:
    """job(group) on `devices` ranks of `device` ("cpu" or "cuda"); returns rank 0's result.

    job must pickle (a dataclass of tensors, datasets and settings): it crosses into fresh interpreters (never by
    re-running the caller's main module, as multiprocessing's spawn would). threads: torch threads per CPU rank
    (default: this process's threads split over the ranks)."""
    device = torch.device(device).type
    check_devices(devices, device)
    if devices == 1:
        return job(Group(0, 1, "cuda:0" if device == "cuda" else "cpu"))
    threads = threads or max(1, torch.get_num_threads() // devices)
    with tempfile.TemporaryDirectory(prefix="fedecho-ddp-") as tmp:
        folder = Path(tmp)  # mkdtemp: mode 0700, only this user reaches the store
        (folder / "job.pkl").write_bytes(pickle.dumps(job))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # what the job's classes need
        command = [sys.executable, "-c", RANK_MAIN, str(folder), str(devices), device, str(threads)]
        ranks = [subprocess.Popen([*command, str(rank)], env=env) for rank in range(devices)]
        failed = _wait(ranks)
        if failed is not None:
            error = _rank_error(folder / f"error-{failed}.pkl")  # the first to fail: the others followed it
            if error is not None:
                raise error
            raise ParallelError(
                f"data-parallel rank {failed} of {devices} ended with exit status {ranks[failed].returncode}"
            )
        return pickle.loads((folder / "result.pkl").read_bytes())  # type: ignore[no-any-return]


def _wait(ranks: list[subprocess.Popen[bytes]]) -> int | None:
    """Wait for every rank; when one fails, end the others (they would wait for it) and return its number."""
    try:
        while True:
            codes = [p.poll() for p in ranks]
            failed = next((r for r, code in enumerate(codes) if code not in (None, 0)), None)
            if failed is not None:
                return failed
            if all(code == 0 for code in codes):
                return None
            time.sleep(0.1)
    finally:
        for p in ranks:
            if p.poll() is None:
                p.terminate()
        for p in ranks:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _rank_error(path: Path) -> BaseException | None:
    try:
        return pickle.loads(path.read_bytes())  # type: ignore[no-any-return]
    except Exception:  # none left (killed), or one that does not unpickle: the rank's exit status says it failed
        return None


def _watch_parent(parent: int) -> None:
    """End this rank when the process that launched it is gone (nobody would collect its result)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _rank_main(folder: str, world_size: str, device: str, threads_per_rank: str, rank_number: str) -> None:
    """One rank: join the group, run the job, leave rank 0's result (or this rank's exception) in the folder."""
    out, world, threads, rank = Path(folder), int(world_size), int(threads_per_rank), int(rank_number)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    os.environ["GLOO_SOCKET_IFNAME"] = os.environ["NCCL_SOCKET_IFNAME"] = _loopback_interface()  # never the network
    torch.set_num_threads(threads)
    try:
        if device == "cuda":
            torch.cuda.set_device(rank)
        torch.distributed.init_process_group(
            "nccl" if device == "cuda" else "gloo", init_method=f"file://{out / 'store'}", rank=rank,
            world_size=world, timeout=GROUP_TIMEOUT,
        )  # fmt: skip
        try:
            job = pickle.loads((out / "job.pkl").read_bytes())
            result = job(Group(rank, world, f"cuda:{rank}" if device == "cuda" else "cpu"))
            if rank == 0:
                _write(out / "result.pkl", pickle.dumps(result))
        finally:
            torch.distributed.destroy_process_group()
    except BaseException as e:
        try:
            _write(out / f"error-{rank}.pkl", pickle.dumps(e))
        except Exception:  # an exception that does not pickle: its text, as a plain error
            _write(out / f"error-{rank}.pkl", pickle.dumps(ParallelError(f"rank {rank}: {traceback.format_exc()}")))
        raise SystemExit(1) from None


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _loopback_interface() -> str:
    """The loopback interface's name (lo on Linux, lo0 on macOS)."""
    try:
        return next(name for _, name in socket.if_nameindex() if name.startswith("lo"))
    except (StopIteration, OSError):
        return "lo"


__all__ = ["SINGLE", "Group", "ParallelError", "check_devices", "launch"]
