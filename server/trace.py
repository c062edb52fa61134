"""Message trace: every message the server sends and every reply it receives, kept on disk as they were.

A privacy officer's inspection tool. With `trace_messages = true` in server.toml the ServerApp writes, per
message, into `STATE/trace/run-NNNN/`:
- `NNNNNN-sent|received-TYPE-nodeID.pb`: the whole message in Flower's own protobuf serialization
  (`flwr.common.serde.message_to_proto`): metadata, every config and metric record, every array's bytes,
  or the error a site returned. Read one back with
  `message_from_proto(flwr.proto.message_pb2.Message.FromString(path.read_bytes()))`.
- the same name with `.json`: a readable summary (metadata, config and metric records verbatim, each
  array's dtype, shape, size and sha256, the error's code and reason).
Off by default: a trace holds every model tensor of the run, so it grows by the model's size per site per
round.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Message
from flwr.common.serde import message_to_proto

METADATA = (
    "run_id", "message_id", "src_node_id", "dst_node_id", "reply_to_message_id", "group_id", "created_at", "ttl",
    "message_type",
)  # fmt: skip


def _plain(value: Any) -> Any:
    """A record value as JSON: bytes as hex, lists element by element."""
    if isinstance(value, bytes):
        return {"hex": value.hex()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def summary(msg: Message) -> dict[str, Any]:
    """The message as a JSON-able dict; arrays by dtype, shape, size and sha256 (their bytes are in the .pb)."""
    out: dict[str, Any] = {"metadata": {k: getattr(msg.metadata, k) for k in METADATA}}
    if msg.has_error():
        out["error"] = {"code": msg.error.code, "reason": msg.error.reason}
    if msg.has_content():
        records: dict[str, Any] = {}
        for name, record in msg.content.items():
            if isinstance(record, ArrayRecord):
                records[name] = {
                    k: {"dtype": a.dtype, "shape": list(a.shape), "bytes": len(a.data),
                        "sha256": hashlib.sha256(a.data).hexdigest()}
                    for k, a in record.items()
                }  # fmt: skip
            else:
                records[name] = {k: _plain(v) for k, v in record.items()}
        out["content"] = records
    return out


class MessageTrace:
    """Writes each traced message to `folder`, numbered in the order the server saw them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.count = len(list(folder.glob("*.pb")))  # a resumed run goes on numbering after the first attempt

    def record(self, direction: str, msg: Message) -> Path:
        """Write msg (direction: "sent" or "received"); returns the .pb file."""
        self.count += 1
        md = msg.metadata
        peer = md.dst_node_id if direction == "sent" else md.src_node_id
        stem = f"{self.count:06d}-{direction}-{md.message_type}-node{peer}"
        path = self.folder / f"{stem}.pb"
        path.write_bytes(message_to_proto(msg).SerializeToString())
        (self.folder / f"{stem}.json").write_text(json.dumps(summary(msg), indent=1, sort_keys=True) + "\n")
        return path
