"""Shared fixtures: real nats-server and PostgreSQL, started by the product's own embedded code.

Servers start once per test session in a temporary LEDGER_HOME; each test uses its own room
names (``room`` fixture), so tests never see each other's data.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from room_ledger import embedded
from room_ledger.client import Ledger
from room_ledger.settings import Settings

if importlib.util.find_spec("tests.livekit.plugin") is not None:
    pytest_plugins = ["tests.livekit.plugin"]


def fresh_home(label: str) -> Path:
    """A LEDGER_HOME outside pytest's temporary root.

    pytest keeps its root at mode 0700 (and resets it whenever another pytest session starts),
    but the embedded PostgreSQL runs as an unprivileged user that must traverse to its data.
    """
    return Path(tempfile.mkdtemp(prefix=f"ledger-{label}-"))


@pytest.fixture(scope="session")
def servers_home() -> Iterator[Path]:
    path = fresh_home("session")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def nats_server(servers_home: Path) -> Iterator[embedded.ServerInfo]:
    info = embedded.ensure_nats(servers_home)
    yield info
    embedded.stop_nats(servers_home)


@pytest.fixture(scope="session")
def postgres_server(servers_home: Path, nats_server: embedded.ServerInfo) -> Iterator[embedded.ServerInfo]:
    # Depends on nats_server only so teardown order is fixed: PostgreSQL stops first.
    info = embedded.ensure_postgres(servers_home)
    yield info
    embedded.stop_postgres(servers_home)


@pytest.fixture(scope="session")
def settings(nats_server: embedded.ServerInfo, servers_home: Path) -> Settings:
    """Settings pointing at the session's NATS (no PostgreSQL)."""
    return Settings(nats_urls=(nats_server.url,), home=servers_home)


@pytest.fixture(scope="session")
def pg_settings(settings: Settings, postgres_server: embedded.ServerInfo) -> Settings:
    """Settings pointing at the session's NATS and PostgreSQL."""
    return settings.replace(database_url=postgres_server.url)


@pytest.fixture
async def ledger(settings: Settings) -> AsyncIterator[Ledger]:
    async with Ledger(settings) as client:
        yield client


@pytest.fixture
def room() -> str:
    """A room name no other test uses."""
    return f"test-{uuid.uuid4().hex[:12]}"
