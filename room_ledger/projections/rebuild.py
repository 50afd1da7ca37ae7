"""Rebuild the projection from sequence 0 (``ledger rebuild``), swapped in atomically at the end.

The rebuild projects into the ``*_next`` twins of the live tables under its own checkpoint
(``rooms.rebuild``) while the live projector and hydration keep using the live tables. At the
end, in one transaction that holds the live checkpoint rows (so no live batch commits
meanwhile), the tables are renamed (live <-> next, indexes too) and the live checkpoints set to
the rebuild's sequence; a live projector notices its checkpoint moved and reloads from there.
The old tables, now the twins, are emptied for the next rebuild.
"""

from __future__ import annotations

import logging
from typing import Any

from room_ledger import db
from room_ledger.projections.migrate import upgrade
from room_ledger.projections.projector import DEFAULT_BATCH, Progress, Projector
from room_ledger.projections.tables import ROOMS, ROOMS_REBUILD, SWAPPABLE
from room_ledger.settings import Settings

log = logging.getLogger("projections.rebuild")

PROJECTIONS = (ROOMS,)


async def rebuild(settings: Settings, *, projection: str = ROOMS, progress: Progress | None = None,
                  batch_size: int = DEFAULT_BATCH, max_rounds: int = 10) -> int:
    """Rebuild ``projection`` from the start of the log; returns the sequence it is current to."""
    if projection not in PROJECTIONS:
        raise ValueError(f"unknown projection {projection!r}: expected one of {', '.join(PROJECTIONS)}")
    await upgrade(settings)
    conn = await db.connect(settings)
    try:
        await conn.execute(f"TRUNCATE {', '.join(SWAPPABLE.values())}")
        await conn.execute("DELETE FROM projection_checkpoints WHERE projection = $1", ROOMS_REBUILD)
        async with Projector(settings, projection=ROOMS_REBUILD, target="next", migrate=False, tune_gc=True,
                             batch_size=batch_size) as worker:
            await worker.catch_up(progress=progress)
            for _ in range(max_rounds):
                live = await conn.fetchval(
                    "SELECT max(seq) FROM projection_checkpoints WHERE projection = $1", ROOMS
                )
                if live is not None and live > worker.checkpoint:
                    await worker.catch_up(until=int(live))
                if await _swap(conn, worker.checkpoint):
                    break
            else:
                raise RuntimeError("the live projector kept moving ahead of the rebuild; try again")
            seq = worker.checkpoint
        await conn.execute(f"TRUNCATE {', '.join(SWAPPABLE.values())}")
        return seq
    finally:
        await conn.close()


async def _swap(conn: Any, seq: int) -> bool:
    async with conn.transaction():
        rows = await conn.fetch(
            "SELECT partition, seq FROM projection_checkpoints WHERE projection = $1 FOR UPDATE", ROOMS
        )
        if any(int(r["seq"]) > seq for r in rows):
            return False  # the live projector got ahead: catch up and try again
        for live, nxt in SWAPPABLE.items():
            await _rename(conn, live, f"{live}_swap")
            await _rename(conn, nxt, live)
            await _rename(conn, f"{live}_swap", nxt)
        if rows:
            await conn.execute(
                "UPDATE projection_checkpoints SET seq = $2, updated_at = now() WHERE projection = $1", ROOMS, seq
            )
        else:
            await conn.execute(
                "INSERT INTO projection_checkpoints (projection, partition, partitions, seq) VALUES ($1, 0, 1, $2)",
                ROOMS, seq,
            )
        await conn.execute("DELETE FROM projection_checkpoints WHERE projection = $1", ROOMS_REBUILD)
    log.info("rebuild swapped in at sequence %d", seq)
    return True


async def _rename(conn: Any, table: str, new: str) -> None:
    """Rename a table and the indexes named after it (pk_<table>, ix_<table>_…)."""
    indexes = await conn.fetch("SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() "
                               "AND tablename = $1", table)
    await conn.execute(f'ALTER TABLE "{table}" RENAME TO "{new}"')
    for row in indexes:
        name: str = row["indexname"]
        for prefix in ("pk_", "ix_"):
            stem = prefix + table
            rest = name[len(stem):]
            if name.startswith(stem) and (rest == "" or rest.startswith("_")):
                await conn.execute(f'ALTER INDEX "{name}" RENAME TO "{prefix}{new}{rest}"')
                break
