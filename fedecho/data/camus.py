"""CAMUS (2023 NIfTI release): half sequences, Info_*.cfg and the official split files.

Layout: database_nifti/patientNNNN/patientNNNN_{2CH,4CH}_half_sequence.nii.gz with
Info_{2CH,4CH}.cfg ("ED: 1", "ES: 16", "NbFrame: 16", "EF: 54", "FrameRate: 48.4", ...),
and database_split/subgroup_{training,validation,testing}.txt. ED/ES in the cfg are 1-based.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np

from fedecho.data.records import BadFile, Problem, Reason, ScanResult, VideoRecord, relative
from fedecho.data.source import EchoSource, parse_float, register_source

SPLIT_FILES = {"train": "subgroup_training.txt", "val": "subgroup_validation.txt", "test": "subgroup_testing.txt"}
VIEWS = ("4CH", "2CH")


def read_info(path: Path) -> dict[str, str]:
    """Parse an Info_*.cfg file of 'Key: value' lines."""
    info: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            info[key.strip()] = value.strip()
    return info


@register_source
class CamusSource(EchoSource):
    """Options: views (default both 4CH and 2CH), min_frames (default 8)."""

    kind = "camus"
    ef_threshold = 45.0

    @classmethod
    def detect(cls, root: Path) -> bool:
        return (root / "database_nifti").is_dir()

    def _splits(self) -> dict[str, str]:
        split_dir = self.root / "database_split"
        out: dict[str, str] = {}
        for split, name in SPLIT_FILES.items():
            f = split_dir / name
            if f.is_file():
                for line in f.read_text().split():
                    out[line.strip()] = split
        return out

    def scan(self) -> ScanResult:
        views = tuple(self.options.get("views", VIEWS))
        min_frames = int(self.options.get("min_frames", 8))
        splits = self._splits()
        records: list[VideoRecord] = []
        problems: list[Problem] = []
        for pdir in sorted((self.root / "database_nifti").glob("patient*")):
            if not pdir.is_dir():
                continue
            patient = pdir.name
            for view in views:
                seq = pdir / f"{patient}_{view}_half_sequence.nii.gz"
                cfg = pdir / f"Info_{view}.cfg"
                rel = relative(seq, self.root)
                if not seq.is_file():
                    problems.append(Problem(rel, Reason.UNREADABLE, "half sequence not found"))
                    continue
                if not cfg.is_file():
                    problems.append(Problem(rel, Reason.MISSING_LABEL, f"{cfg.name} not found"))
                    continue
                info = read_info(cfg)
                ef = parse_float(info.get("EF", info.get("LVef", "")))
                if ef is None:
                    problems.append(Problem(rel, Reason.MISSING_LABEL, f"no EF in {cfg.name}"))
                    continue
                n = parse_float(info.get("NbFrame", ""))
                if n is not None and n < min_frames:
                    problems.append(Problem(rel, Reason.TOO_FEW_FRAMES, f"{int(n)} frames < {min_frames}"))
                    continue
                targets = {"ef": ef, "ef_class": self.ef_class(ef)}
                for key, name in (("LVedv", "edv"), ("LVesv", "esv")):
                    if (v := parse_float(info.get(key, ""))) is not None:
                        targets[name] = v
                meta: dict[str, object] = {"view": view, "quality": info.get("ImageQuality", "")}
                for key in ("ED", "ES"):
                    if (v := parse_float(info.get(key, ""))) is not None:
                        meta[f"{key.lower()}_frame"] = int(v) - 1
                records.append(
                    VideoRecord(
                        key=f"{patient}_{view}",
                        files=(seq,),
                        split=splits.get(patient, ""),
                        targets=targets,
                        fps=parse_float(info.get("FrameRate", "")),
                        n_frames=int(n) if n is not None else None,
                        group=patient,
                        meta=meta,
                    )
                )
        return ScanResult(records, problems)

    def frames(self, record: VideoRecord) -> Iterator[np.ndarray]:
        try:
            data = np.asarray(nib.load(str(record.files[0])).dataobj)
        except Exception as e:
            raise BadFile(Reason.UNREADABLE, f"NIfTI: {type(e).__name__}: {e}") from e
        if data.ndim != 3:
            raise BadFile(Reason.UNREADABLE, f"expected a 3-D (x, y, t) sequence, got shape {data.shape}")
        # nibabel gives (x, y, t); frames are (rows=y, cols=x).
        video = np.transpose(data, (2, 1, 0))
        if video.dtype != np.uint8:
            lo, hi = float(video.min()), float(video.max())
            video = np.round((video - lo) / max(hi - lo, 1e-9) * 255.0)
        yield from video.astype(np.uint8)
