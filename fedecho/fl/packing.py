"""One Array per record on the wire: why a round cost 20-60 s of transport in a deployment.

Flower 1.42 moves a message as a tree of objects (the message, its records, every Array, every 5 MB chunk
of an Array), and every object is one HTTP request on every hop: ServerApp -> SuperLink -> SuperNode ->
ClientApp and back, each stored (the SuperLink in its SQLite database) and deleted one by one. fedecho's
records hold one Array per tensor, two on the int8 wire (values and scales): 300-700 objects per message,
measured at 20-60 s of a round against 1-10 s of training. `pack` turns a record into one Array (an index
of the original arrays, then their bytes back to back), so a message is a handful of objects; `unpack`
gives back the very same Arrays (names, dtypes, shapes, stypes, bytes), so everything that reads a record
(`fedecho.fl.exchange.decode`, byte counts, audit digests) sees what was sent. Both are pure data
transformations without torch, for the site's ClientApp runner (`fedecho.client.runtime`) too.

A record that is not packed passes `unpack` unchanged; a malformed packed record raises ValueError (the
caller then keeps it as it came: `decode` rejects its unexpected name).
"""

from __future__ import annotations

import contextlib
import json
import struct
from typing import Any

from flwr.app import Array, ArrayRecord, Message, RecordDict

from fedecho.fl.flower_patches import message_with

PACKED = ".packed"  # the one entry of a packed record (state-dict keys never start with ".")
STYPE = "fedecho.packed/v1"
_HEAD = struct.Struct("<Q")  # byte length of the JSON index that follows


def pack(record: ArrayRecord) -> ArrayRecord:
    """The record as one Array: an index [name, dtype, shape, stype, nbytes] per entry, then the bytes."""
    index: list[list[Any]] = []
    parts: list[bytes] = []
    for name, a in record.items():
        index.append([name, a.dtype, list(a.shape), a.stype, len(a.data)])
        parts.append(a.data)
    head = json.dumps(index).encode()
    data = b"".join([_HEAD.pack(len(head)), head, *parts])
    return ArrayRecord({PACKED: Array(dtype="uint8", shape=(len(data),), stype=STYPE, data=data)})


def is_packed(record: ArrayRecord) -> bool:
    return list(record.keys()) == [PACKED] and record[PACKED].stype == STYPE


def unpack(record: ArrayRecord) -> ArrayRecord:
    """The record `pack` was given; a record that is not packed is returned as is."""
    if not is_packed(record):
        return record
    data = memoryview(record[PACKED].data)
    if len(data) < _HEAD.size:
        raise ValueError("packed record: shorter than its header")
    (n,) = _HEAD.unpack_from(data)
    start = _HEAD.size + n
    if start > len(data):
        raise ValueError("packed record: index longer than the record")
    index = json.loads(bytes(data[_HEAD.size : start]))
    if not isinstance(index, list):
        raise ValueError("packed record: the index is not a list")
    out = ArrayRecord()
    for entry in index:
        if not (isinstance(entry, list) and len(entry) == 5):
            raise ValueError("packed record: malformed index entry")
        name, dtype, shape, stype, size = entry
        ok = isinstance(name, str) and isinstance(dtype, str) and isinstance(stype, str) and isinstance(size, int)
        if not ok or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError("packed record: malformed index entry")
        if name in out or size < 0 or start + size > len(data):
            raise ValueError(f"packed record: entry {name!r} repeated or beyond the record")
        out[name] = Array(dtype=dtype, shape=tuple(shape), stype=stype, data=bytes(data[start : start + size]))
        start += size
    if start != len(data):
        raise ValueError("packed record: bytes left after the last entry")
    return out


def _array_keys(msg: Message) -> list[str]:
    """The message's array records (the model, and any other: SCAFFOLD's control variate)."""
    return [k for k, v in msg.content.items() if isinstance(v, ArrayRecord)] if msg.has_content() else []


def pack_message(msg: Message, cache: dict[int, ArrayRecord] | None = None) -> Message:
    """A copy of msg (same metadata, same other records) whose array records travel packed; msg is left as it
    is. `cache` (record id -> packed) packs a record that several messages share only once."""
    keys = [k for k in _array_keys(msg) if not is_packed(msg.content[k])]
    if not keys:
        return msg
    content = dict(msg.content.items())
    for key in keys:
        record = msg.content[key]
        packed = cache.get(id(record)) if cache is not None else None
        if packed is None:
            packed = pack(record)
            if cache is not None:
                cache[id(record)] = packed
        content[key] = packed
    return message_with(msg, RecordDict(content))  # its own copy of the metadata


def pack_in_place(msg: Message) -> Message:
    """msg with its array records packed (a reply about to leave the site, no longer read by anyone)."""
    for key in _array_keys(msg):
        if not is_packed(msg.content[key]):
            msg.content[key] = pack(msg.content[key])
    return msg


def unpack_message(msg: Message) -> Message:
    """msg with its array records unpacked in place; a malformed packed record is left for the caller's check."""
    for key in _array_keys(msg):
        # anything wrong (a malformed index, JSON nested too deep) leaves the record as it came: the server's
        # checks reject such a reply, which must not stop the pull of the others
        with contextlib.suppress(Exception):
            msg.content[key] = unpack(msg.content[key])
    return msg
