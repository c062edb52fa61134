"""Shared fixtures: small phantom datasets generated once per session, torch on 2 threads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pg import pg_url, postgres  # noqa: F401  (fixtures: a throwaway PostgreSQL server)

os.environ.setdefault("FEDECHO_THREADS", "2")

import torch

from fedecho.synth import synthesize

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def echonet_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One site, 8 short videos in the EchoNet-Dynamic layout."""
    out = tmp_path_factory.mktemp("echonet")
    synthesize(out, videos=8, sites=1, fmt="echonet", seed=7, max_frames=40, progress=False)
    return out


@pytest.fixture(scope="session")
def dicom_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two sites (one JPEG, one uncompressed vendor would need 3; both JPEG here), 6 cines."""
    out = tmp_path_factory.mktemp("dicom")
    synthesize(out, videos=6, sites=2, fmt="dicom", seed=3, max_frames=24, progress=False)
    return out


@pytest.fixture()
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def federated_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two sites (site01/, site02/), 14 short videos in all: enough for every split at each site."""
    out = tmp_path_factory.mktemp("federated")
    synthesize(out, videos=14, sites=2, fmt="echonet", seed=5, max_frames=24, progress=False)
    return out
