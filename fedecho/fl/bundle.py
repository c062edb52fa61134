"""A Flower app bundle (FAB) read as data: its code hash and whether it is fedecho's own code-less submission.

A FAB is a zip of the app's files that the SuperLink hands to the ServerApp runner and to every SuperNode;
the process that runs it installs it and imports its components with the bundle's folder first on the import
path, so a bundle can ship any Python code, including a module named `fedecho` that shadows the installed
package. Both ends therefore judge a bundle before it is installed, from what this module reads without
extracting or importing anything: the coordinator runs only fedecho's code-less submission
(`fedecho.server.runtime`), a site that or a bundle it approved by hash (`fedecho.client.approval`).

The bundle's code hash is a sha256 over its files' names and contents (Flower's `.info/` manifest left out),
with pyproject.toml hashed without `[tool.flwr.app.config]`: that table is the run's configuration (the run
file's text, the coordinator's settings), data handed to the code, which changes with every submission. The
same code thus keeps its hash from run to run, and one approval covers it.

fedecho's code-less submission (what `fedecho server run` generates): only pyproject.toml and Markdown files,
no dependencies, components exactly `fedecho.server.app:app` and `fedecho.client.app:app`, and
`project.version` equal to the fedecho version installed here (so what runs is the installed fedecho).
"""

from __future__ import annotations

import hashlib
import io
import json
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fedecho

DEFAULT_COMPONENTS = {"serverapp": "fedecho.server.app:app", "clientapp": "fedecho.client.app:app"}
FLOWER_META = ".info/"


class BundleError(ValueError):
    """The bundle is not a readable FAB (not a zip, no pyproject.toml, bad TOML)."""


@dataclass(frozen=True)
class Bundle:
    """What the site knows of a FAB before running any of it."""

    sha256: str  # code hash (see the module docstring)
    files: tuple[str, ...]
    pyproject: dict[str, Any]

    @property
    def components(self) -> dict[str, str]:
        app = self.pyproject.get("tool", {}).get("flwr", {}).get("app", {})
        return dict(app.get("components", {}))

    @property
    def version(self) -> str:
        return str(self.pyproject.get("project", {}).get("version", ""))

    def describe(self) -> str:
        """What a reviewer needs to see of a bundle that was not allowed."""
        return f"components {self.components}, version {self.version!r}, files {', '.join(self.files)}"

    def default_fedecho(self) -> bool:
        """True for the code-less bundle `fedecho server run` generates for this site's fedecho version."""
        project = self.pyproject.get("project", {})
        return (
            all(f == "pyproject.toml" or (f.endswith(".md") and "/" not in f) for f in self.files)
            and not project.get("dependencies")
            and self.components == DEFAULT_COMPONENTS
            and self.version == fedecho.__version__
        )


def _without_run_config(pyproject: dict[str, Any]) -> dict[str, Any]:
    doc = json.loads(json.dumps(pyproject, default=str))
    doc.get("tool", {}).get("flwr", {}).get("app", {}).pop("config", None)
    return doc


def read_bundle(fab: bytes) -> Bundle:
    """Hash a FAB's code without extracting or importing anything."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as z:
            members = {i.filename: z.read(i) for i in z.infolist() if not i.is_dir()}
    except (zipfile.BadZipFile, OSError) as e:
        raise BundleError(f"the app bundle is not a valid zip: {e}") from e
    if "pyproject.toml" not in members:
        raise BundleError("the app bundle has no pyproject.toml")
    try:
        pyproject = tomllib.loads(members["pyproject.toml"].decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"the app bundle's pyproject.toml is not valid TOML: {e}") from e
    files = tuple(sorted(n for n in members if not n.startswith(FLOWER_META)))
    h = hashlib.sha256()
    for name in files:
        content = members[name]
        if name == "pyproject.toml":
            content = json.dumps(_without_run_config(pyproject), sort_keys=True).encode()
        h.update(f"{name}\0{hashlib.sha256(content).hexdigest()}\n".encode())
    return Bundle(h.hexdigest(), files, pyproject)


def app_dir_bundle(app_dir: Path) -> Bundle:
    """The bundle Flower builds from an app folder (`flwr run` / `flwr build`): what a site reviews and approves."""
    from flwr.cli.build import build_fab_from_disk

    return read_bundle(build_fab_from_disk(Path(app_dir)))


__all__ = ["DEFAULT_COMPONENTS", "Bundle", "BundleError", "app_dir_bundle", "read_bundle"]
