"""Packed records (fedecho.fl.packing): a message's arrays as one Array, given back exactly as they were."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedecho.fl.exchange import arrays_sha256, decode, encode
from fedecho.fl.packing import PACKED, STYPE, is_packed, pack, pack_message, unpack, unpack_message


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(8, 5, generator=g), "a.bias": torch.randn(8, generator=g), "s": torch.tensor(2.0)}


@pytest.mark.parametrize("wire", ["float32", "float16", "bfloat16", "int8"])
def test_unpack_gives_back_the_very_same_arrays(wire: str) -> None:
    record = encode(_state(), wire, seed=1)
    packed = pack(record)
    assert list(packed.keys()) == [PACKED] and is_packed(packed)
    back = unpack(packed)
    assert list(back.keys()) == list(record.keys())
    assert all(back[k].object_id == a.object_id for k, a in record.items())  # dtype, shape, stype, bytes
    assert arrays_sha256(back) == arrays_sha256(record) and back.count_bytes() == record.count_bytes()
    assert decode(back, wire).keys() == _state().keys()


def test_a_record_that_is_not_packed_passes_and_a_malformed_one_is_refused() -> None:
    plain = ArrayRecord({"w": Array(np.arange(3, dtype=np.float32))})
    assert unpack(plain) is plain
    good = pack(plain)[PACKED].data
    for data in (b"\x01", good[:-1], good + b"\x00", b"\x05\x00\x00\x00\x00\x00\x00\x00[1,2]"):
        bad = ArrayRecord({PACKED: Array(dtype="uint8", shape=(len(data),), stype=STYPE, data=data)})
        with pytest.raises(ValueError):
            unpack(bad)


@pytest.mark.slow
def test_pack_message_leaves_the_original_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    for attr in ("_run_id", "_task_id", "_node_id"):  # messages outside a Flower process need an identity
        monkeypatch.setattr(TaskIdentity, attr, 1)
    record = encode(_state(), "int8")
    msg = Message(RecordDict({"arrays": record, "config": ConfigRecord({"phase": "pretrain"})}), 7, MessageType.TRAIN)
    shared: dict[int, ArrayRecord] = {}
    out = pack_message(msg, cache=shared)
    assert is_packed(out.content["arrays"]) and not is_packed(msg.content["arrays"])
    assert out.metadata is not msg.metadata and out.metadata.dst_node_id == 7 and out.content["config"]["phase"]
    assert pack_message(msg, cache=shared).content["arrays"] is out.content["arrays"]  # packed once per record
    assert list(unpack_message(out).content["arrays"].keys()) == list(record.keys())
