"""What the coordinator and the sites agree on, in one place both import: the error codes of a site's
replies, the refusal a site-side check raises, the message keys both read, and how a run file becomes
the model both ends hold (the same architecture, or the exchanged tensors would not fit).

Light on purpose: the site's runner imports it without loading torch (the model is built lazily).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flwr.app import Message

    from fedecho.fl.config import FedRunConfig
    from fedecho.models import EchoVisionFM

# Error codes of fedecho's refusals and failures (Flower reserves small numbers for its own).
ERROR_FAILED = 100
ERROR_MISSING_FROZEN = 101
ERROR_BAD_MESSAGE = 102
ERROR_REFUSED = 103  # the site's policy or privacy budget says no: the server records a refusal

# Config keys of a train / evaluate / query message.
PHASE = "phase"  # pretrain | finetune
SERVER_ROUND = "server-round"  # Flower's own key for the round number


class Refused(Exception):
    """Raised by a site-side check (policy, privacy budget, code approval) before any data is touched."""


class MissingFrozen(RuntimeError):
    """The site lacks the frozen tensors this round needs (ERROR_MISSING_FROZEN: the server sends them next time)."""


def error_reply(msg: Message, code: int, reason: str) -> Message:
    """A site's reply that carries one of the codes above and its reason instead of content."""
    from flwr.app import Error, Message

    return Message(Error(code=code, reason=reason), reply_to=msg)


def build_model(cfg: FedRunConfig, phase: str) -> EchoVisionFM:
    """The phase's model as the run file defines it: the decoder for pre-training, the heads (and LoRA
    adapters, when the run file asks for them) for fine-tuning."""
    from fedecho.models import create_model
    from fedecho.models.lora import apply_lora, phase_spec

    local = cfg.local
    if phase == "pretrain":
        return create_model(local.model_name, decoder=True, **local.model_overrides)
    tasks = list(cfg.phase("finetune").tasks)
    model = create_model(local.model_name, decoder=False, **{**local.model_overrides, "tasks": tasks})
    return apply_lora(model, phase_spec(cfg.phase("finetune")))  # unchanged unless [finetune] lora_rank > 0
