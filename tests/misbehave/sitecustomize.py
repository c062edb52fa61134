"""Test-only: makes a deployed site misbehave. On PYTHONPATH (with tests/) for one site's processes only, it
waits for `fedecho.client.app` to be imported (by the site's ClientApp runner) and replaces its `app` with
`tamper.misbehaving(app, plan)`, the plan read from $FEDECHO_TEST_TAMPER. Other modules load untouched."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from types import ModuleType
from typing import Any

TARGET = "fedecho.client.app"


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        import tamper

        plan = tamper.parse_plan(os.environ.get(tamper.PLAN_ENV, ""))
        module.app = tamper.misbehaving(module.app, plan, os.environ.get(tamper.SITE_ENV, ""))


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader)
                return spec
        return None


if os.environ.get("FEDECHO_TEST_TAMPER"):
    sys.meta_path.insert(0, _Finder())
