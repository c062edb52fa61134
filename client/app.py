"""The fedecho ClientApp: one hospital's side of a federated round, on Flower's Message API.

A train message carries the global tensors (in the run's wire precision) and a config record:
the run file's text, the phase, the round's learning rate and seed. The reply carries the site's
update (local - received) in the same precision (int8: stochastic rounding seeded from the round's
seed and the site's name, so a resumed run sends the same bytes), its example count and metrics,
and the site's name. `app` serves `fedecho client start` (the site is read from the SuperNode's node config);
`build_client_app` lets the simulation place virtual sites instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedecho._env import set_torch_threads
from fedecho.client.audit import audit_message, manifest_sha256
from fedecho.client.local import MissingFrozen, site_evaluate, site_train
from fedecho.client.site import Site
from fedecho.fl.config import parse_run_config, round_seed
from fedecho.fl.exchange import UpdateError, decode, encode
from fedecho.fl.methods import CONTROL
from fedecho.fl.packing import unpack
from fedecho.fl.protocol import (
    ERROR_BAD_MESSAGE,
    ERROR_FAILED,
    ERROR_MISSING_FROZEN,
    ERROR_REFUSED,
    Refused,
    error_reply,
)
from fedecho.privacy.dp_policy import PrivacyRefused

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
    threads = getattr(s, "threads", 0)
    if threads:
        os.environ["FEDECHO_THREADS"] = str(threads)
    device = getattr(s, "device", "auto")
    return Site(
        name=s.name,
        data=Path(s.data),
        cache=Path(s.cache),
        state=Path(s.state),
        labels=str(getattr(s, "labels", "") or ""),
        device=None if device in ("", "auto") else device,
        policy=s.policy,
        privacy=s.privacy,
    )


def _options(msg: Message) -> dict[str, Any]:
    return dict(msg.content["config"])


def build_client_app(resolve: SiteResolver) -> ClientApp:
    app = ClientApp()

    def handle(msg: Message, context: Context, train: bool) -> Message:
        try:
            site = resolve(context)
        except (KeyError, ValueError, OSError) as e:  # the site's own configuration: details stay in its log
            log.error("site configuration: %s", e)
            return error_reply(
                msg, ERROR_FAILED, f"the site's configuration is invalid ({type(e).__name__}; see its log)"
            )
        set_torch_threads()  # after resolve: the site's `threads` setting applies
        try:
            options = _options(msg)
            cfg = parse_run_config(str(options["run-toml"]), "the run file sent by the server")
            phase = str(options["phase"])
            # packed by the server (fedecho.fl.packing); the site's runner has already unpacked it, Flower's own not
            received = decode(unpack(msg.content["arrays"]), str(options["wire-dtype"]))
            control = None
            if CONTROL in msg.content:  # SCAFFOLD: the server's control variate
                control = decode(unpack(msg.content[CONTROL]), str(options["wire-dtype"]))
        except (KeyError, ValueError, UpdateError) as e:
            return error_reply(msg, ERROR_BAD_MESSAGE, f"bad request: {e}")
        info = ConfigRecord({"site": site.name})
        manifest = None
        try:
            allowed = site.enforce(cfg, phase, train)  # the site's policy, before any data access
            manifest = manifest_sha256(site.data, site.labels)
            if train:
                update, metrics, change = site_train(cfg, phase, received, site, options, control)
                rounding = round_seed(int(options["seed"]), phase, 0, f"{site.name}/wire")  # int8's stochastic rounding
                content = RecordDict(
                    {
                        "arrays": encode(update, str(options["wire-dtype"]), seed=rounding),
                        "metrics": MetricRecord(metrics),
                        "info": info,
                    }
                )
                if change is not None:
                    control_seed = round_seed(int(options["seed"]), phase, 0, f"{site.name}/control")
                    content[CONTROL] = encode(change, str(options["wire-dtype"]), seed=control_seed)
            else:
                metrics = site_evaluate(cfg, phase, received, site, options)
                content = RecordDict({"metrics": MetricRecord(metrics), "info": info})
            eps = metrics.get("epsilon")
            audit_message(site, msg, options, "allowed", allowed, manifest=manifest, epsilon=eps,
                          update=content["arrays"] if train else None, sent=content if train else None)  # fmt: skip
        except (Refused, PrivacyRefused) as e:  # the site policy, code approval or privacy budget says no
            log.warning("site %s refused: %s", site.name, e)
            with contextlib.suppress(Exception):  # the refusal goes out even if the log cannot be written
                audit_message(site, msg, options, "refused", str(e), manifest=manifest)
            return error_reply(msg, ERROR_REFUSED, f"refused by site {site.name}: {e}")
        except MissingFrozen as e:
            with contextlib.suppress(Exception):
                audit_message(site, msg, options, "failed", str(e), manifest=manifest)
            return error_reply(msg, ERROR_MISSING_FROZEN, str(e))
        except Exception as e:
            log.exception("site %s: %s failed", site.name, "training" if train else "evaluation")
            with contextlib.suppress(Exception):
                audit_message(site, msg, options, "failed", f"{type(e).__name__}: {e}", manifest=manifest)
            # Only the exception's type leaves the site: its message may name local files or records.
            return error_reply(msg, ERROR_FAILED, f"site {site.name}: {type(e).__name__} (details in the site's log)")
        return Message(content, reply_to=msg)

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return handle(msg, context, train=True)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return handle(msg, context, train=False)

    @app.query()
    def _query(msg: Message, context: Context) -> Message:  # statistics for the heads (fedecho.fl.statistics)
        from fedecho.client.statistics import handle_query

        return handle_query(msg, context, resolve)

    return app


app = build_client_app(site_from_node_config)

__all__ = ["app", "build_client_app", "site_from_node_config"]
