"""The site's cross-cutting concerns as Flower ClientApp mods, composed around small handlers.

Every message (train, evaluate, query) passes, outermost first:
- `site_mod(resolve)`: finds this site (its site.toml, or the simulation's table) and reads the request
  (the run file, the phase) into the message's `Exchange`; a site configuration it cannot load is a failure
  whose details stay in the site's log;
- `outcome_mod`: turns what happens below into the reply and the audit row: a refusal (policy, privacy
  budget) is ERROR_REFUSED, a malformed request ERROR_BAD_MESSAGE, anything else ERROR_FAILED with only the
  exception's type leaving the site; every decision but a malformed request is written to the site's log;
- `wire_mod`: unpacks and decodes the tensors the server sent (fedecho.fl.packing, fedecho.fl.exchange)
  and encodes the update the handler leaves in the exchange, in the run's wire dtype;
- `policy_mod`: the site's policy decides before any data is read, and the data manifest is taken.
The handlers only compute. The `Exchange` travels with the message in a context variable: Flower passes
mods the message and the context only.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flwr.app import Context, Message

from fedecho._env import set_torch_threads
from fedecho.client.audit import audit_message, manifest_sha256
from fedecho.client.site import Site
from fedecho.fl.exchange import UpdateError, decode, encode
from fedecho.fl.methods import CONTROL
from fedecho.fl.packing import unpack
from fedecho.fl.protocol import (
    ERROR_BAD_MESSAGE,
    ERROR_FAILED,
    ERROR_MISSING_FROZEN,
    ERROR_REFUSED,
    PHASE,
    MissingFrozen,
    Refused,
    error_reply,
)
from fedecho.privacy.dp_policy import PrivacyRefused

if TYPE_CHECKING:
    import torch

    from fedecho.client.site import SiteResolver
    from fedecho.fl.config import FedRunConfig

log = logging.getLogger("fedecho.client")

CallNext = Callable[[Message, Context], Message]


class BadRequest(ValueError):
    """The message itself is malformed (a missing key, an unknown question, tensors that do not decode)."""


@dataclass
class Exchange:
    """One message at the site, as the mods and the handler share it."""

    site: Site
    kind: str  # train | evaluate | query.<question>: the message type the site's log records
    options: dict[str, Any]
    cfg: FedRunConfig
    phase: str
    allowed: str = ""  # why the site's policy allowed it
    manifest: str | None = None  # the data manifest's sha256, once the policy allowed the message
    received: dict[str, torch.Tensor] = field(default_factory=dict)  # the global tensors, decoded
    control: dict[str, torch.Tensor] | None = None  # SCAFFOLD: the server's control variate, decoded
    update: dict[str, torch.Tensor] | None = None  # what the handler sends back, encoded by wire_mod
    change: dict[str, torch.Tensor] | None = None  # SCAFFOLD: the site's control change, encoded by wire_mod


_EXCHANGE: ContextVar[Exchange] = ContextVar("fedecho_exchange")


def exchange() -> Exchange:
    """The message being handled (inside `site_mod`)."""
    return _EXCHANGE.get()


@contextlib.contextmanager
def _handling(ex: Exchange) -> Iterator[Exchange]:
    token = _EXCHANGE.set(ex)
    try:
        yield ex
    finally:
        _EXCHANGE.reset(token)


def _request(msg: Message, site: Site) -> Exchange:
    from fedecho.fl.config import parse_run_config
    from fedecho.fl.statistics import QUERIES, QUERY

    try:
        options = dict(msg.content["config"])
        cfg = parse_run_config(str(options["run-toml"]), "the run file sent by the server")
        phase = str(options[PHASE])
        kind = str(msg.metadata.message_type)
        if kind == "query":
            question = str(options[QUERY])
            if question not in QUERIES:
                raise ValueError(f"unknown query {question!r} (known: {', '.join(QUERIES)})")
            if phase != "finetune":
                raise ValueError(f"query {question} applies to fine-tuning, not {phase}")
            kind = f"query.{question}"
    except (KeyError, ValueError) as e:
        raise BadRequest(str(e)) from e
    return Exchange(site, kind, options, cfg, phase)


def site_mod(resolve: SiteResolver) -> Callable[[Message, Context, CallNext], Message]:
    def mod(msg: Message, context: Context, call_next: CallNext) -> Message:
        try:
            site = resolve(context)
        except (KeyError, ValueError, OSError) as e:  # the site's own configuration: details stay in its log
            log.error("site configuration: %s", e)
            reason = f"the site's configuration is invalid ({type(e).__name__}; see its log)"
            return error_reply(msg, ERROR_FAILED, reason)
        set_torch_threads()  # after resolve: the site's `threads` setting applies
        try:
            ex = _request(msg, site)
        except BadRequest as e:
            return error_reply(msg, ERROR_BAD_MESSAGE, f"bad request: {e}")
        with _handling(ex):
            return call_next(msg, context)

    return mod


def outcome_mod(msg: Message, context: Context, call_next: CallNext) -> Message:
    ex = exchange()
    site, options = ex.site, ex.options

    def audit(decision: str, reason: str, **kwargs: Any) -> None:
        audit_message(site, msg, options, decision, reason, manifest=ex.manifest, message_type=ex.kind, **kwargs)

    try:
        reply = call_next(msg, context)
    except BadRequest as e:
        return error_reply(msg, ERROR_BAD_MESSAGE, f"bad request: {e}")
    except (Refused, PrivacyRefused) as e:  # the site policy, code approval or privacy budget says no
        log.warning("site %s refused %s: %s", site.name, ex.kind, e)
        with contextlib.suppress(Exception):  # the refusal goes out even if the log cannot be written
            audit("refused", str(e))
        return error_reply(msg, ERROR_REFUSED, f"refused by site {site.name}: {e}")
    except MissingFrozen as e:
        with contextlib.suppress(Exception):
            audit("failed", str(e))
        return error_reply(msg, ERROR_MISSING_FROZEN, str(e))
    except Exception as e:
        log.exception("site %s: %s failed", site.name, ex.kind)
        with contextlib.suppress(Exception):
            audit("failed", f"{type(e).__name__}: {e}")
        # Only the exception's type leaves the site: its message may name local files or records.
        return error_reply(msg, ERROR_FAILED, f"site {site.name}: {type(e).__name__} (details in the site's log)")
    content = reply.content
    arrays = content.get("arrays")
    epsilon = content["metrics"].get("epsilon") if "metrics" in content else None
    audit("allowed", ex.allowed, epsilon=epsilon, update=arrays, sent=content if ex.kind == "train" else None)
    return reply


def wire_mod(msg: Message, context: Context, call_next: CallNext) -> Message:
    from fedecho.fl.config import round_seed

    ex = exchange()
    try:
        dtype = str(ex.options["wire-dtype"])
        # packed by the server (fedecho.fl.packing); the site's runner has already unpacked it, Flower's own not
        if "arrays" in msg.content:
            ex.received = decode(unpack(msg.content["arrays"]), dtype)
        if CONTROL in msg.content:  # SCAFFOLD: the server's control variate
            ex.control = decode(unpack(msg.content[CONTROL]), dtype)
    except (KeyError, ValueError, UpdateError) as e:
        raise BadRequest(str(e)) from e
    reply = call_next(msg, context)
    seed = int(ex.options.get("seed", 0))
    if ex.update is not None:  # int8's stochastic rounding, seeded per site and phase
        wire_seed = round_seed(seed, ex.phase, 0, f"{ex.site.name}/wire")
        reply.content["arrays"] = encode(ex.update, dtype, seed=wire_seed)
    if ex.change is not None:
        control_seed = round_seed(seed, ex.phase, 0, f"{ex.site.name}/control")
        reply.content[CONTROL] = encode(ex.change, dtype, seed=control_seed)
    return reply


def policy_mod(msg: Message, context: Context, call_next: CallNext) -> Message:
    ex = exchange()
    ex.allowed = ex.site.enforce(ex.cfg, ex.phase, train=ex.kind == "train")  # before any data access
    ex.manifest = manifest_sha256(ex.site.data, ex.site.labels)
    return call_next(msg, context)


def site_mods(resolve: SiteResolver) -> list[Callable[[Message, Context, CallNext], Message]]:
    """The mods of fedecho's ClientApp, outermost first."""
    return [site_mod(resolve), outcome_mod, wire_mod, policy_mod]
