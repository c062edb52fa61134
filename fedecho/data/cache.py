"""Decoded-frame cache: each video is decoded and resized once, then memory-mapped.

Entries are uint8 `.npy` arrays (T, S, S) for grayscale echo or (T, S, S, 3) for colour,
keyed by the sha256 of the video's file contents plus the decoding parameters, so a renamed
file hits and an edited one misses. Entries are written to a temporary file, fsynced and
renamed: a crash half-way leaves no partial entry. File hashes are remembered per
(path, size, mtime) so an unchanged archive is not re-hashed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from fedecho.data.clips import fit_square, gray_frames, to_uint8_gray_or_rgb
from fedecho.data.records import BadFile, Reason, VideoRecord
from fedecho.data.source import EchoSource
from fedecho.storage.files import atomic_path, atomic_write_bytes, file_sha256

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fedecho" / "frames"


def decode_video(source: EchoSource, record: VideoRecord, size: int | None) -> np.ndarray:
    """Decode a record through its source and fit every frame to size x size (uint8);
    size None keeps the native resolution (site ingest stores that)."""
    out = []
    try:
        for frame in source.frames(record):
            if frame.dtype != np.uint8:
                raise BadFile(Reason.UNREADABLE, f"decoder returned {frame.dtype}, expected uint8")
            out.append(fit_square(frame, size) if size else frame)
    except BadFile:
        raise
    except Exception as e:  # any decoder failure is this file's problem, not the pass's
        raise BadFile(Reason.UNREADABLE, f"{type(e).__name__}: {e}") from e
    if not out:
        raise BadFile(Reason.UNREADABLE, "no frames decoded")
    if len({f.shape[:2] for f in out}) > 1:
        raise BadFile(Reason.BAD_DIMENSIONS, "frames differ in size")
    if len({f.shape for f in out}) > 1:
        out = [f if f.ndim == 3 else np.repeat(f[..., None], 3, -1) for f in out]
    if out[0].ndim == 3 and out[0].shape[2] == 3:  # grayscale in RGB clothing: tested and converted unstacked
        gray = gray_frames(out)
        return np.stack(out) if gray is None else gray
    return to_uint8_gray_or_rgb(np.stack(out))


class FrameCache:
    MAX_MAPPED = 256

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else DEFAULT_CACHE
        (self.root / "frames").mkdir(parents=True, exist_ok=True)
        (self.root / "hashes").mkdir(parents=True, exist_ok=True)
        self._keys: dict[tuple[str, str, int], str] = {}
        # Entries already mapped, most recent last: training reads every video each epoch, and opening one
        # (stat, header parse, mmap) costs as much as augmenting a clip. Bounded: each holds a descriptor.
        self._mapped: OrderedDict[Path, np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        """Another process (a data-parallel rank, a loader worker) maps what it reads itself: the entries mapped
        here would otherwise be copied into the pickle in full."""
        return {**self.__dict__, "_mapped": OrderedDict()}

    def file_hash(self, path: Path) -> str:
        st = path.stat()
        ident = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
        memo = self.root / "hashes" / ident
        try:
            digest = memo.read_text().strip()
            if len(digest) == 64:
                return digest
        except FileNotFoundError:
            pass
        digest = file_sha256(path)
        atomic_write_bytes(memo, digest.encode())
        return digest

    def key(self, source: EchoSource, record: VideoRecord, size: int) -> str:
        memo = (source.kind, record.key, size)
        if memo not in self._keys:
            try:
                hashes = [self.file_hash(p) for p in record.files]
            except OSError as e:
                raise BadFile(Reason.UNREADABLE, f"cannot read: {e.strerror or e}") from e
            params: dict[str, Any] = {**source.cache_params(), "size": size, "files": hashes}
            self._keys[memo] = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
        return self._keys[memo]

    def path(self, key: str) -> Path:
        return self.root / "frames" / key[:2] / f"{key}.npy"

    def load(self, source: EchoSource, record: VideoRecord, size: int, _retry: bool = True) -> np.ndarray:
        """Memory-mapped frames of the record, decoding (once) on a miss."""
        path = self.path(self.key(source, record, size))
        if path in self._mapped:
            self._mapped.move_to_end(path)
            return self._mapped[path]
        if not path.exists():
            frames = decode_video(source, record, size)
            with atomic_path(path, suffix=".npy.tmp") as tmp, open(tmp, "wb") as f:
                np.save(f, frames)
        try:
            frames = np.load(path, mmap_mode="r")
        except (ValueError, OSError):  # damaged entry (disk trouble): drop it and decode again
            path.unlink(missing_ok=True)
            if not _retry:
                raise
            return self.load(source, record, size, _retry=False)
        self._mapped[path] = frames
        if len(self._mapped) > self.MAX_MAPPED:
            self._mapped.popitem(last=False)
        return frames

    def contains(self, source: EchoSource, record: VideoRecord, size: int) -> bool:
        return self.path(self.key(source, record, size)).exists()
