"""Packaging: every package folder is installed, the roles under the fedecho namespace."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_and_roles_are_namespaced() -> None:
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    mapping = tool["package-dir"]
    found = set()
    for prefix, folder in mapping.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base).parts
            if not any(p.startswith(".") or p == "__pycache__" for p in rel):
                found.add(".".join((prefix, *rel)))
    assert found <= listed, f"package folders missing from pyproject [tool.setuptools] packages: {found - listed}"
    assert all(p == "fedecho" or p.startswith("fedecho.") for p in listed)
    assert {mapping[r] for r in ("fedecho.server", "fedecho.client", "fedecho.sim")} == {"server", "client", "sim"}


def test_roles_import_from_their_folders() -> None:
    import fedecho.client
    import fedecho.server
    import fedecho.sim

    for module, folder in ((fedecho.server, "server"), (fedecho.client, "client"), (fedecho.sim, "sim")):
        assert Path(module.__file__).parent.name == folder
