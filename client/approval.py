"""Code approval: which Flower app bundles (FABs) this site runs.

The site judges each bundle before it is installed, in its own runner (`fedecho.client.runtime`), never
inside the bundle; `fedecho.fl.bundle` reads a bundle as data and gives its code hash. A bundle runs when
- it is the code-less bundle that `fedecho server run` generates, for the fedecho version installed here; or
- the site approved its code hash with `fedecho client approve HASH`.
"""

from __future__ import annotations

from dataclasses import dataclass

import fedecho
from fedecho.fl.bundle import DEFAULT_COMPONENTS, Bundle, BundleError, app_dir_bundle, read_bundle


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str


def judge(bundle: Bundle, approved: bool) -> Verdict:
    """Allowed (default fedecho bundle, or approved hash) or refused with the command that would approve it."""
    if bundle.default_fedecho():
        return Verdict(True, f"the fedecho {fedecho.__version__} bundle (code-less, installed package)")
    if approved:
        return Verdict(True, f"bundle {bundle.sha256} approved at this site")
    return Verdict(
        False,
        f"app bundle {bundle.sha256} is not approved at this site ({bundle.describe()}); after reviewing it, "
        f"`fedecho client approve {bundle.sha256} --site SITE.toml` allows it",
    )


__all__ = ["DEFAULT_COMPONENTS", "Bundle", "BundleError", "Verdict", "app_dir_bundle", "judge", "read_bundle"]
