"""A misbehaving site for the tests: its ClientApp trains (or evaluates) honestly, then tampers with the reply.

A plan says what to do in which round: "train:1=scale,train:2=count:1e9,evaluate:3=count:nan,train:5=name:site01"
(kind:round=attack). Attacks:
- `scale`: every tensor of the update times 1e6;
- `count:X`: `num-examples` set to float(X) (1e9, nan, inf, 3.5, ...);
- `metric:KEY:X`: metric KEY set to float(X);
- `name:SITE`: the reply names SITE as its site;
- `corrupt`: the first tensor's bytes cut to 5;
- `garbage`: arrays and metrics replaced by records of the wrong kind (text where numbers belong).
The round is read from the message itself: the server's `seed` is `round_seed(run seed, phase, round)`.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from fedecho.fl.config import round_seed

PLAN_ENV = "FEDECHO_TEST_TAMPER"  # the plan, for a deployed site (tests/misbehave/sitecustomize.py)
SITE_ENV = "FEDECHO_TEST_TAMPER_SITE"  # only this site misbehaves ("" or unset: every site of the process)

Plan = dict[tuple[str, int], str]


def parse_plan(text: str) -> Plan:
    plan: Plan = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        where, attack = item.split("=", 1)
        kind, number = where.split(":")
        plan[(kind, int(number))] = attack
    return plan


def server_round(msg: Message) -> int:
    """The round a server message belongs to, from its seed (0 when no round up to 1000 matches)."""
    config = msg.content["config"]
    seed = int(tomllib.loads(str(config["run-toml"])).get("run", {}).get("seed", 0))
    phase, sent = str(config["phase"]), int(config["seed"])
    return next((r for r in range(1, 1001) if round_seed(seed, phase, r) == sent), 0)


def tamper(reply: Message, attack: str) -> Message:
    """The reply with the attack applied (in place)."""
    content = reply.content
    name, _, arg = attack.partition(":")
    if name == "scale":
        record = content["arrays"]
        content["arrays"] = ArrayRecord({k: Array(np.asarray(a.numpy() * 1e6)) for k, a in record.items()})
    elif name == "count":
        metrics = dict(content["metrics"])
        metrics["num-examples"] = float(arg)
        content["metrics"] = MetricRecord(metrics)
    elif name == "metric":
        key, value = arg.split(":")
        metrics = dict(content["metrics"])
        metrics[key] = float(value)
        content["metrics"] = MetricRecord(metrics)
    elif name == "name":
        content["info"] = ConfigRecord({"site": arg})
    elif name == "corrupt":
        record = content["arrays"]
        first = next(iter(record.keys()))
        a = record[first]
        content["arrays"][first] = Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=a.data[:5])
    elif name == "garbage":
        if "arrays" in content:
            content["arrays"] = ConfigRecord({"encoder.weight": "not a tensor"})
        content["metrics"] = ConfigRecord({"num-examples": "many"})
    else:
        raise ValueError(f"unknown attack {attack!r}")
    return reply


def misbehaving(app: ClientApp, plan: Plan, site: str = "") -> ClientApp:
    """A ClientApp that runs `app` and tampers with the replies `plan` names (of `site` only, when given)."""
    outer = ClientApp()

    def handler(kind: str) -> Callable[[Message, Context], Message]:
        def handle(msg: Message, context: Context) -> Message:
            reply = app(msg, context)
            attack = plan.get((kind, server_round(msg)))
            own = reply.has_content() and "info" in reply.content and reply.content["info"].get("site") == site
            if attack and reply.has_content() and (not site or own):
                return tamper(reply, attack)
            return reply

        return handle

    outer.train()(handler("train"))
    outer.evaluate()(handler("evaluate"))
    return outer
