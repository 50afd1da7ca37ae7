"""The projection schema as SQLAlchemy Core tables. Created only by migrations (``room_ledger/migrations/``).

One row per room holds the folded state except the conversation (JSONB, loaded in one query),
with a few columns copied out for SQL (``ledger rooms``, dashboards). Conversation items are
one row each, ordered by the sequence of their first appearance. Hydration sends a room's whole
conversation (thousands of items) on every call, so the items are also kept in *pages*: each
run of :data:`PAGE_ITEMS` items, in order, as one text row (their JSON joined by commas),
written once when the run is complete (and again only if one of its items changes). A reader
takes the pages and the items after the last page (fewer than :data:`PAGE_ITEMS`). ``*_next``
tables have the same shape and receive a rebuild, swapped in atomically at its end.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Identity,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

#: The one projection this package maintains (floor, participants, session, conversation, summary, index).
ROOMS = "rooms"
#: Checkpoint name of a rebuild in progress.
ROOMS_REBUILD = "rooms.rebuild"

projection_checkpoints = Table(
    "projection_checkpoints",
    metadata,
    Column("projection", Text, primary_key=True),
    Column("partition", Integer, primary_key=True),
    Column("partitions", Integer, nullable=False, server_default="1"),
    #: Last stream sequence whose effects are committed.
    Column("seq", BigInteger, nullable=False, server_default="0"),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

projection_errors = Table(
    "projection_errors",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("projection", Text, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("room", Text),
    Column("event_type", Text),
    Column("error", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    UniqueConstraint("projection", "seq", name="uq_projection_errors_projection_seq"),
)


def _room_state(name: str) -> Table:
    return Table(
        name,
        metadata,
        Column("room", Text, primary_key=True),
        #: The sequence of the room's last event folded in: the row is the fold up to here.
        Column("seq", BigInteger, nullable=False),
        Column("first_seq", BigInteger),
        Column("last_activity", DateTime(timezone=True)),
        Column("events", BigInteger, nullable=False, server_default="0"),
        Column("floor_holder", Text),
        Column("session_version", BigInteger, nullable=False, server_default="0"),
        Column("summary_covers_seq", BigInteger),
        #: ledger.state.RoomState without its conversation.
        Column("state", JSONB, nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    )


#: Items per conversation page. Pages are sealed by the projector once this many items follow
#: the room's last page; hydration reads ~N/64 page rows plus at most 63 item rows.
PAGE_ITEMS = 64


def _conversation(name: str) -> Table:
    return Table(
        name,
        metadata,
        Column("room", Text, primary_key=True),
        Column("item_id", Text, primary_key=True),
        Column("seq", BigInteger, nullable=False),
        Column("type", Text, nullable=False),
        Column("role", Text),
        Column("speaker", Text),
        #: ledger.state.ConversationItem.
        Column("item", JSONB, nullable=False),
        #: The same JSON as text: what hydration sends (JSONB back to text is slow in bulk).
        Column("item_text", Text, nullable=False),
        Index(f"ix_{name}_room_seq", "room", "seq"),
    )


def _pages(name: str) -> Table:
    return Table(
        name,
        metadata,
        Column("room", Text, primary_key=True),
        #: Sequences of the page's first and last item: the page holds exactly the room's items
        #: in this range (``PAGE_ITEMS`` of them).
        Column("start_seq", BigInteger, primary_key=True),
        Column("end_seq", BigInteger, nullable=False),
        Column("items", Integer, nullable=False),
        #: The items' ``item_text``, in order, joined by commas (a JSON array without brackets).
        Column("body", Text, nullable=False),
    )


room_state = _room_state("room_state")
conversation_items = _conversation("conversation_items")
room_state_next = _room_state("room_state_next")
conversation_items_next = _conversation("conversation_items_next")
conversation_pages = _pages("conversation_pages")
conversation_pages_next = _pages("conversation_pages_next")

#: live table -> its rebuild twin.
SWAPPABLE = {
    "room_state": "room_state_next",
    "conversation_items": "conversation_items_next",
    "conversation_pages": "conversation_pages_next",
}
