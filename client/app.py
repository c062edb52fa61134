"""The fedecho ClientApp: one hospital's side of a federated round, on Flower's Message API.

A train message carries the global tensors (in the run's wire precision) and a config record:
the run file's text, the phase, the round's learning rate and seed. The reply carries the site's
update (local - received) in the same precision (int8: stochastic rounding seeded from the round's
seed and the site's name, so a resumed run sends the same bytes), its example count and metrics,
and the site's name. The site's concerns (finding the site, its policy, the wire format, refusals and the
audit row) are Flower mods (`fedecho.client.mods`); the handlers here only compute. `app` serves
`fedecho client start` (the site is read from the SuperNode's node config); `build_client_app` lets the
simulation place virtual sites instead.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedecho.client.local import site_evaluate, site_train
from fedecho.client.mods import exchange, site_mods
from fedecho.client.site import Site

if TYPE_CHECKING:
    from fedecho.client.site import SiteResolver

log = logging.getLogger("fedecho.client")


def site_from_node_config(context: Context) -> Site:
    """A deployed site: the SuperNode's node config names the site's TOML file."""
    from fedecho.client.config import load_site_config

    path = context.node_config.get("site-config")
    if not path:
        raise ValueError("the SuperNode was started without node config site-config (use `fedecho client start`)")
    s = load_site_config(Path(str(path)))
    if s.threads:
        os.environ["FEDECHO_THREADS"] = str(s.threads)
    device = s.device
    return Site(
        name=s.name,
        data=Path(s.data),
        cache=Path(s.cache),
        state=Path(s.state),
        labels=str(s.labels or ""),
        device=None if device in ("", "auto") else device,
        devices=s.devices,
        policy=s.policy,
        privacy=s.privacy,
    )


def build_client_app(resolve: SiteResolver) -> ClientApp:
    """fedecho's ClientApp: the site's concerns are mods (fedecho.client.mods), the handlers only compute."""
    app = ClientApp(mods=site_mods(resolve))

    def info() -> RecordDict:
        return RecordDict({"info": ConfigRecord({"site": exchange().site.name})})

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        ex = exchange()
        ex.update, metrics, ex.change = site_train(ex.cfg, ex.phase, ex.received, ex.site, ex.options, ex.control)
        content = info()
        content["metrics"] = MetricRecord(metrics)
        return Message(content, reply_to=msg)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        ex = exchange()
        content = info()
        content["metrics"] = MetricRecord(site_evaluate(ex.cfg, ex.phase, ex.received, ex.site, ex.options))
        return Message(content, reply_to=msg)

    @app.query()
    def _query(msg: Message, context: Context) -> Message:  # statistics for the heads (fedecho.fl.statistics)
        from fedecho.client.statistics import site_query

        ex = exchange()
        arrays, metrics = site_query(ex.cfg, ex.phase, ex.received, ex.site, ex.options)
        content = info()
        content["arrays"], content["metrics"] = arrays, MetricRecord(metrics)
        return Message(content, reply_to=msg)

    return app


app = build_client_app(site_from_node_config)

__all__ = ["app", "build_client_app", "site_from_node_config"]
