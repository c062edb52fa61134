"""The decoded-frame cache: decode once, content-addressed, no partial entries after a crash."""

from __future__ import annotations

import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedecho.data import FrameCache, open_source
from fedecho.data.echonet import EchoNetSource
from fedecho.data.records import VideoRecord


class CountingEchoNet(EchoNetSource):
    """The real EchoNet source, counting how often it decodes."""

    kind = "echonet"
    decodes = 0

    def frames(self, record: VideoRecord) -> Iterator[np.ndarray]:
        CountingEchoNet.decodes += 1
        yield from super().frames(record)


def test_decodes_once_and_memory_maps(echonet_phantom: Path, cache_dir: Path) -> None:
    src = CountingEchoNet(echonet_phantom)
    rec = src.scan().records[0]
    CountingEchoNet.decodes = 0
    cache = FrameCache(cache_dir)
    first = cache.load(src, rec, 64)
    again = FrameCache(cache_dir).load(src, rec, 64)  # a new process would see the same
    assert CountingEchoNet.decodes == 1
    assert isinstance(again, np.memmap) and np.array_equal(first, again) and first.shape[1:] == (64, 64)
    cache.load(src, rec, 32)  # another size is another entry
    assert CountingEchoNet.decodes == 2


def test_a_pickled_cache_carries_no_frames(echonet_phantom: Path, cache_dir: Path) -> None:
    """A cache crosses into data-parallel ranks and loader workers by pickle: the entries it has mapped stay here."""
    src = EchoNetSource(echonet_phantom)
    cache = FrameCache(cache_dir)
    frames = [cache.load(src, r, 64) for r in src.scan().records[:4]]
    copy = pickle.loads(pickle.dumps(cache))
    assert len(pickle.dumps(cache)) < sum(f.nbytes for f in frames) / 10
    assert np.array_equal(copy.load(src, src.scan().records[0], 64), frames[0])  # and reads them itself


def test_keyed_by_content_not_path(echonet_phantom: Path, tmp_path: Path, cache_dir: Path) -> None:
    root = tmp_path / "moved"
    shutil.copytree(echonet_phantom, root)
    a, b = open_source(echonet_phantom), open_source(root)
    ra, rb = a.scan().records[0], b.scan().records[0]
    cache = FrameCache(cache_dir)
    assert cache.key(a, ra, 112) == cache.key(b, rb, 112)
    with open(rb.files[0], "ab") as f:
        f.write(b"\x00")  # edited file: new content, new key
    assert FrameCache(cache_dir).key(b, rb, 112) != cache.key(a, ra, 112)


def test_crash_mid_write_leaves_no_entry(
    echonet_phantom: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = open_source(echonet_phantom)
    rec = src.scan().records[1]
    cache = FrameCache(cache_dir)

    def crash(f, arr) -> None:  # writes half the bytes, then the process "dies"
        f.write(b"\x93NUMPY" + b"\x00" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        cache.load(src, rec, 112)
    monkeypatch.undo()
    entry = cache.path(cache.key(src, rec, 112))
    assert not entry.exists()
    assert not list(entry.parent.glob(".*"))  # no temporary left behind
    assert cache.load(src, rec, 112).shape[1:] == (112, 112)
