"""One error tree: every error raised on purpose is a LedgerError, and driver errors are mapped by
type at their boundary — JetStream's by ``err_code`` (against the real nats-server), PostgreSQL's
by asyncpg's classes and SQLSTATE (against the real PostgreSQL)."""

from __future__ import annotations

import ast
import socket
import uuid
from pathlib import Path

import asyncpg
import msgspec
import nats.errors
import pytest

from room_ledger import db
from room_ledger import events as ev
from room_ledger.client import ERR_BATCH_DUPLICATE, Ledger, credentials_refused
from room_ledger.errors import ConnectError, DatabaseUnavailable, LedgerError, LogUnavailable, Unavailable
from room_ledger.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def _exception_classes() -> list[tuple[str, str, list[str]]]:
    """(file, class, bases) of every class in the packages whose name says it is an error."""
    found = []
    for package in ("room_ledger",):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and node.name.endswith(("Error", "Timeout", "Moved", "Lost",
                                                                          "Failed", "Rejected", "Unroutable",
                                                                          "Unavailable", "Exception")):
                    bases = [ast.unparse(b) for b in node.bases]
                    found.append((str(path.relative_to(ROOT)), node.name, bases))
    return found


def test_every_error_is_in_the_tree() -> None:
    import importlib

    outside = []
    classes = _exception_classes()
    assert len(classes) >= 20, "the walk finds the package's errors"
    for file, name, _ in classes:
        module = importlib.import_module(file.removesuffix(".py").removesuffix("/__init__").replace("/", "."))
        cls = getattr(module, name)
        if isinstance(cls, type) and issubclass(cls, BaseException) and not issubclass(cls, LedgerError):
            outside.append(f"{file}: {name}")
    assert outside == []


def test_transient_is_a_type() -> None:
    assert issubclass(DatabaseUnavailable, Unavailable) and issubclass(LogUnavailable, Unavailable)
    assert issubclass(Unavailable, ConnectError)
    assert DatabaseUnavailable("x").server == "PostgreSQL" and LogUnavailable("x").server == "NATS"


# --- JetStream: by err_code ----------------------------------------------------------------------


async def test_atomic_batch_with_a_stored_id_answers_the_duplicate_err_code(ledger: Ledger, room: str) -> None:
    # The code append_many waits for to resend a batch event by event (its duplicates reported).
    stored = ev.make_event(room, ev.AgentStatus(agent_id="a", status="idle"), sender=ev.Sender("a", "agent"))
    await ledger.append(stored)
    fresh = ev.make_event(room, ev.AgentStatus(agent_id="a", status="processing"), sender=ev.Sender("a", "agent"))
    subject = ledger.subjects.event(room, "agent.status")
    batch = uuid.uuid4().hex
    await ledger.connection.nc.publish(subject, ev.encode(stored), headers={
        "Nats-Msg-Id": stored.id, "Nats-Batch-Id": batch, "Nats-Batch-Sequence": "1"})
    reply = await ledger.connection.nc.request(subject, ev.encode(fresh), timeout=5, headers={
        "Nats-Msg-Id": fresh.id, "Nats-Batch-Id": batch, "Nats-Batch-Sequence": "2", "Nats-Batch-Commit": "1"})
    answer = msgspec.json.decode(reply.data)
    assert answer["error"]["err_code"] == ERR_BATCH_DUPLICATE, answer
    # And append_many, meeting it, stores the new event and reports the old one.
    positions = await ledger.append_many([stored, fresh])
    assert [p.duplicate for p in positions] == [True, False]


def test_refused_credentials_are_known_by_type_or_by_the_protocol_error() -> None:
    assert credentials_refused(nats.errors.AuthorizationError())
    # What nats-py raises at connect: the server's -ERR line, untyped.
    assert credentials_refused(nats.errors.Error("nats: 'Authorization Violation'"))
    assert not credentials_refused(nats.errors.Error("nats: 'Maximum Connections Exceeded'"))


async def test_nats_away_is_log_unavailable(settings: Settings) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(LogUnavailable) as caught:
        async with Ledger(settings.replace(nats_urls=(f"nats://127.0.0.1:{port}",))):
            pass
    assert caught.value.server == "NATS"


# --- PostgreSQL: by class and SQLSTATE -----------------------------------------------------------


async def _server_error(pg_settings: Settings, sql: str) -> BaseException:
    conn = await db.connect(pg_settings)
    try:
        await conn.execute(sql)
    except BaseException as exc:
        return exc
    finally:
        if not conn.is_closed():
            await conn.close()
    raise AssertionError(f"{sql!r} did not fail")


async def test_postgres_errors_by_sqlstate(pg_settings: Settings) -> None:
    cancelled = await _server_error(pg_settings, "SET statement_timeout = 10; SELECT pg_sleep(5)")
    assert isinstance(cancelled, asyncpg.QueryCanceledError) and db.is_transient(cancelled)  # 57014
    shut = await _server_error(pg_settings, "SELECT pg_terminate_backend(pg_backend_pid())")
    assert isinstance(shut, asyncpg.AdminShutdownError | asyncpg.ConnectionDoesNotExistError)
    assert db.is_transient(shut)  # 57P01, or the connection gone under it
    missing = await _server_error(pg_settings, "SELECT * FROM no_such_table_here")
    assert isinstance(missing, asyncpg.UndefinedTableError) and not db.is_transient(missing)  # 42P01
    division = await _server_error(pg_settings, "SELECT 1/0")
    assert not db.is_transient(division)  # 22012


async def test_database_errors_maps_only_transient_ones(pg_settings: Settings) -> None:
    conn = await db.connect(pg_settings)
    try:
        with pytest.raises(DatabaseUnavailable) as caught, db.database_errors("testing"):
            await conn.execute("SET statement_timeout = 10; SELECT pg_sleep(5)")
        assert isinstance(caught.value.__cause__, asyncpg.QueryCanceledError)
        with pytest.raises(asyncpg.UndefinedTableError), db.database_errors("testing"):
            await conn.execute("SELECT * FROM no_such_table_here")
    finally:
        await conn.close()


async def test_postgres_away_is_database_unavailable(pg_settings: Settings) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DatabaseUnavailable) as caught:
        await db.connect(pg_settings, url=f"postgresql://ledger@127.0.0.1:{port}/ledger", connect_timeout=2)
    assert caught.value.server == "PostgreSQL"


def test_the_tree_drawn_in_ledger_errors_is_the_classes_that_exist() -> None:
    """Every error raised on purpose is drawn in room_ledger/errors.py's tree, and every name drawn exists."""
    import importlib
    import pkgutil
    import re

    import room_ledger
    from room_ledger import errors

    # Every module of the namespace, wings included (WebhookRejected, CliError); migrations are
    # Alembic's scripts, run by Alembic only.
    for module in pkgutil.walk_packages(room_ledger.__path__, "room_ledger."):
        if not module.name.startswith("room_ledger.migrations"):
            importlib.import_module(module.name)

    def subclasses(cls: type) -> set[type]:
        found: set[type] = set(cls.__subclasses__())
        for sub in list(found):
            found |= subclasses(sub)
        return found

    existing = {c.__name__ for c in subclasses(errors.LedgerError) if not c.__module__.startswith("tests")}
    # "├── Name  what it means" or "├── NameA, NameB  what they mean"
    drawn = {name for names in re.findall(r"[├└]── (\w+(?:, \w+)*)", errors.__doc__ or "")
             for name in names.split(", ")}
    assert existing == drawn, {"not drawn": existing - drawn, "drawn but missing": drawn - existing}
