"""Apply the projection schema's Alembic migrations (``ledger migrate``).

The migration scripts ship inside the wheel (the ``migrations`` package), so this works from
an install with no alembic.ini on disk. Idempotent, and safe to run from several processes at
once (the environment holds an advisory lock while it migrates).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from room_ledger import db, migrations
from room_ledger.errors import ConnectError
from room_ledger.settings import Settings


def script_location() -> Path:
    return Path(migrations.__file__).resolve().parent


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config pointing at the shipped scripts (no ini file needed)."""
    location = script_location()
    ini = location / "alembic.ini"
    cfg = Config(str(ini)) if ini.exists() else Config()
    cfg.set_main_option("script_location", str(location))
    cfg.attributes["configure_logger"] = False
    if url:
        cfg.set_main_option("sqlalchemy.url", db.sqlalchemy_url(url).replace("%", "%%"))
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


async def _with_connection(settings: Settings, fn: Any, *args: Any) -> Any:
    url = await db.database_url(settings)
    engine = await db.create_engine(settings, url=url, poolclass=NullPool, pool_pre_ping=False)
    try:
        async with engine.begin() as conn:
            return await conn.run_sync(fn, *args)
    except (OSError, TimeoutError, sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
        # SQLAlchemy wraps the driver's error (exc.orig, an adapter whose cause is asyncpg's): the
        # mapping is by that error's class and SQLSTATE, like every other PostgreSQL boundary.
        orig = getattr(exc, "orig", None)
        driver = getattr(orig, "__cause__", None) or orig or exc
        if isinstance(exc, sa_exc.DBAPIError) and not exc.connection_invalidated and not db.is_transient(driver):
            raise
        raise db.unreachable(url, settings, driver) from exc
    finally:
        await engine.dispose()


def _upgrade_sync(connection: Connection, revision: str) -> None:
    cfg = alembic_config()
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, revision)


def _current_sync(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


#: Alembic keeps its context in module globals: one migration at a time per process.
_lock: asyncio.Lock | None = None


async def upgrade(settings: Settings, revision: str = "head") -> None:
    """Bring the database to ``revision`` (default: the newest). Does nothing when already there."""
    global _lock
    if _lock is None:
        _lock = asyncio.Lock()
    async with _lock:
        await _with_connection(settings, _upgrade_sync, revision)


async def current_revision(settings: Settings) -> str | None:
    """The database's revision (None: never migrated)."""
    result: str | None = await _with_connection(settings, _current_sync)
    return result


async def is_current(settings: Settings) -> bool:
    try:
        return await current_revision(settings) == head_revision()
    except ConnectError:
        return False
