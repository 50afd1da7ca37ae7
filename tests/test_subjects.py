"""Room names as subject tokens: reversible, collision-free, always valid."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from room_ledger.errors import InvalidRoomName
from room_ledger.subjects import MAX_ROOM_NAME_CHARS, Subjects, room_from_token, room_token

room_names = st.text(min_size=1, max_size=MAX_ROOM_NAME_CHARS)


def is_valid_token(token: str) -> bool:
    # A NATS subject token: non-empty, printable ASCII here, no separators or wildcards.
    return bool(token) and all(33 <= ord(ch) < 127 for ch in token) and not any(c in token for c in ".*>")


@given(room_names)
def test_round_trip(name: str) -> None:
    assert room_from_token(room_token(name)) == name


@given(room_names)
def test_token_is_one_valid_subject_token(name: str) -> None:
    assert is_valid_token(room_token(name))


@given(room_names, room_names)
def test_no_collisions(a: str, b: str) -> None:
    if a != b:
        assert room_token(a) != room_token(b)


@given(st.text(alphabet="abcXYZ019_-", min_size=1, max_size=40))
def test_ordinary_names_stay_readable(name: str) -> None:
    assert room_token(name) == name


@pytest.mark.parametrize(
    ("name", "token"),
    [("a.b", "a~2Eb"), ("*", "~2A"), (">", "~3E"), ("a b", "a~20b"), ("~", "~7E"), ("é", "~C3~A9")],
)
def test_examples(name: str, token: str) -> None:
    assert room_token(name) == token


def test_empty_name_is_rejected_clearly() -> None:
    with pytest.raises(InvalidRoomName, match="cannot be empty"):
        room_token("")


def test_too_long_name_is_rejected() -> None:
    with pytest.raises(InvalidRoomName, match="at most 256"):
        room_token("x" * 257)


def test_longest_name_fits_a_publish_line() -> None:
    token = room_token("\U0001f600" * MAX_ROOM_NAME_CHARS)
    assert len(Subjects("ledger").event("\U0001f600" * MAX_ROOM_NAME_CHARS, "conversation.item")) < 3200
    assert room_from_token(token) == "\U0001f600" * MAX_ROOM_NAME_CHARS


def test_lone_surrogate_round_trips() -> None:
    assert room_from_token(room_token("a\ud800b")) == "a\ud800b"


@pytest.mark.parametrize("bad", ["", "a.b", "~zz", "a~2", "~2a"])
def test_bad_tokens_are_rejected(bad: str) -> None:
    with pytest.raises(InvalidRoomName):
        room_from_token(bad)


def test_subject_layout_with_dotted_prefix() -> None:
    subjects = Subjects("acme.ledger")
    subject = subjects.event("room.1", "floor.request")
    assert subject == "acme.ledger.room~2E1.floor"
    assert subjects.parse(subject) == ("room.1", "floor")
    assert subjects.room("room.1") == "acme.ledger.room~2E1.>"
