"""Alembic environment (async, asyncpg) for the projection schema.

Two ways in:
- ``ledger migrate`` / :func:`projections.migrate.upgrade` passes an open connection in
  ``config.attributes["connection"]`` (the URL is resolved the product's way, embedded included);
- ``alembic -c room_ledger/migrations/alembic.ini upgrade head`` reads ``sqlalchemy.url`` or LEDGER_DATABASE_URL.

Either way the run holds a transaction-scoped advisory lock, so concurrent starts
(``ledger project`` on several workers) apply each migration once.
"""

from __future__ import annotations

import asyncio
import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import pool, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from room_ledger.db import sqlalchemy_url
from room_ledger.projections.tables import metadata

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = metadata

#: pg_advisory_xact_lock key: "room-ledger migrate".
MIGRATION_LOCK_KEY = 0x6C6564676572


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("LEDGER_DATABASE_URL")
    if not url:
        raise SystemExit("set LEDGER_DATABASE_URL (or sqlalchemy.url), or run `ledger migrate`")
    return sqlalchemy_url(url)


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True,
                      dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
    with context.begin_transaction():
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        context.run_migrations()


async def run_async_migrations() -> None:
    engine = create_async_engine(_url(), poolclass=pool.NullPool)
    async with engine.connect() as connection:
        await connection.run_sync(do_run_migrations)
        await connection.commit()
    await engine.dispose()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        do_run_migrations(connection)
    else:
        asyncio.run(run_async_migrations())


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
