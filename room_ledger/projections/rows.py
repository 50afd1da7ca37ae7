"""The projection's row encoding: a room's folded state and its conversation items as JSONB.

The state itself and its reducers are the core's (:mod:`room_ledger.state`); this module only says
how they are stored in PostgreSQL. NUL characters, which PostgreSQL refuses, are replaced by
:func:`room_ledger.db.pg_json` / :func:`room_ledger.db.pg_text` (hydration reads rows with the same rules).
"""

from __future__ import annotations

from typing import Final

import msgspec

from room_ledger.db import pg_json, pg_text
from room_ledger.state import ConversationItem, RoomState

__all__ = ["decode_item", "decode_state", "encode_item", "encode_state", "pg_json", "pg_text"]

_state_encoder: Final = msgspec.json.Encoder()
_state_decoder: Final = msgspec.json.Decoder(RoomState)
_item_encoder: Final = msgspec.json.Encoder()
_item_decoder: Final = msgspec.json.Decoder(ConversationItem)


def encode_state(state: RoomState) -> bytes:
    """The state without its conversation (stored apart, one row per item) as JSON."""
    return pg_json(_state_encoder.encode(msgspec.structs.replace(state, conversation=[], positions={})))


def decode_state(data: bytes | str) -> RoomState:
    return _state_decoder.decode(data)


def encode_item(item: ConversationItem) -> bytes:
    return pg_json(_item_encoder.encode(item))


def decode_item(data: bytes | str) -> ConversationItem:
    return _item_decoder.decode(data)
