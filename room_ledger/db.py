"""PostgreSQL connections: resolve the URL, open engines and raw asyncpg connections.

``LEDGER_DATABASE_URL`` when set, else the embedded PostgreSQL under ``LEDGER_HOME`` (started
on demand by :func:`database_url`, or only found, never started, by :func:`running_url`).
Driver errors become :class:`room_ledger.errors.ConnectError` with a message that says what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

from room_ledger import embedded
from room_ledger.errors import ConnectError, DatabaseUnavailable
from room_ledger.settings import Settings

if TYPE_CHECKING:
    import asyncpg
    from sqlalchemy.ext.asyncio import AsyncEngine

#: How long a first connection may take before we call the server unreachable.
CONNECT_TIMEOUT_S = 5.0

_SCHEME_RE = re.compile(r"^postgres(?:ql)?(?:\+[a-z0-9_]+)?://", re.IGNORECASE)


# PostgreSQL cannot hold NUL in text or JSONB. The log keeps the exact bytes; the projection
# stores U+FFFD instead (an escaped backslash before "u0000" is left alone). The projector writes
# with these and hydration looks rows up with them, so both live here, beside the connections.
_JSON_NUL: Final = re.compile(rb"(?<!\\)((?:\\\\)*)\\u0000")


def pg_json(data: bytes) -> bytes:
    """JSON that PostgreSQL's JSONB accepts: NUL characters replaced by U+FFFD."""
    if b"\\u0000" not in data:
        return data
    return _JSON_NUL.sub(rb"\1\\ufffd", data)


def pg_text(value: str) -> str:
    """Text that PostgreSQL accepts: NUL characters replaced by U+FFFD."""
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def asyncpg_dsn(url: str) -> str:
    """``postgresql://…`` for asyncpg, whatever driver suffix the URL carries."""
    return _SCHEME_RE.sub("postgresql://", url, count=1)


def sqlalchemy_url(url: str) -> str:
    """``postgresql+asyncpg://…`` for SQLAlchemy's async engine."""
    return _SCHEME_RE.sub("postgresql+asyncpg://", url, count=1)


def masked(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


async def database_url(settings: Settings) -> str:
    """The database URL: the configured one, or the embedded PostgreSQL (started if needed)."""
    if settings.database_url:
        return settings.database_url

    try:
        info = await asyncio.to_thread(embedded.ensure_postgres, settings.home)
    except Exception as exc:
        raise ConnectError(
            f"cannot start the embedded PostgreSQL under {settings.home}: {exc}; "
            "set LEDGER_DATABASE_URL to a PostgreSQL of your own, or run `ledger up` to see why",
            server="PostgreSQL",
        ) from exc
    return info.url


def running_url(settings: Settings) -> str | None:
    """The database URL if one is configured or the embedded one is already running (starts nothing)."""
    if settings.database_url:
        return settings.database_url

    try:
        info = embedded.status(settings.home).get("postgres")
    except Exception:
        return None
    return info.url if info is not None else None


#: SQLSTATE classes and codes after which the same statement can succeed later: connection
#: exception (08), insufficient resources (53), operator intervention (57: shutdown, cannot connect
#: now, query cancelled), system error (58), serialization failure and deadlock (40001, 40P01).
TRANSIENT_SQLSTATE_CLASSES: Final = frozenset({"08", "53", "57", "58"})
TRANSIENT_SQLSTATES: Final = frozenset({"40001", "40P01"})


def is_transient(exc: BaseException) -> bool:
    """Whether a driver error from PostgreSQL (or the way to it) is worth retrying, by its type."""
    # asyncpg takes 50 ms to import: `import ledger` (the CLI's start) goes without it.
    import asyncpg  # noqa: PLC0415 - asyncpg/SQLAlchemy take 50+ ms to import: `import ledger` (the CLI's start) goes without
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = str(exc.sqlstate or "")
        return sqlstate[:2] in TRANSIENT_SQLSTATE_CLASSES or sqlstate in TRANSIENT_SQLSTATES
    if isinstance(exc, asyncpg.ClientConfigurationError | asyncpg.exceptions.UnsupportedClientFeatureError):
        return False
    # InterfaceError: the connection is closed or busy; InternalClientError: "cannot switch to
    # state …; another operation is in progress" when a transaction starts on a connection
    # PostgreSQL has just dropped; OSError / TimeoutError: the socket.
    return isinstance(exc, asyncpg.InterfaceError | asyncpg.InternalClientError | OSError | TimeoutError)


@contextlib.contextmanager
def database_errors(what: str) -> Iterator[None]:
    """The PostgreSQL boundary: a transient driver error inside becomes :class:`DatabaseUnavailable`
    (``raise … from`` the driver's); anything else passes unchanged. Only PostgreSQL work goes inside."""
    try:
        yield
    except DatabaseUnavailable:
        raise
    except Exception as exc:
        if is_transient(exc):
            raise DatabaseUnavailable(f"PostgreSQL is unavailable while {what} ({type(exc).__name__}: {exc}); "
                                      "retrying can succeed once it is back") from exc
        raise


def unreachable(url: str, settings: Settings, exc: BaseException) -> ConnectError:
    detail = str(exc) or type(exc).__name__
    cls = DatabaseUnavailable if is_transient(exc) else ConnectError
    if settings.database_url:
        return cls(
            f"cannot reach PostgreSQL at {masked(url)} ({detail}): start it, check LEDGER_DATABASE_URL, "
            "or unset LEDGER_DATABASE_URL to use the embedded PostgreSQL", server="PostgreSQL"
        )
    return cls(
        f"cannot reach the embedded PostgreSQL at {masked(url)} ({detail}): run `ledger up`, or remove "
        f"the stale state under {settings.home}", server="PostgreSQL"
    )


async def connect(settings: Settings, *, url: str | None = None, connect_timeout: float = CONNECT_TIMEOUT_S,
                  server_settings: dict[str, str] | None = None) -> asyncpg.Connection[Any]:
    """One raw asyncpg connection (fast paths: the projector, COPY)."""
    import asyncpg  # noqa: PLC0415 - asyncpg/SQLAlchemy take 50+ ms to import: `import ledger` (the CLI's start) goes without

    resolved = url or await database_url(settings)
    try:
        conn: asyncpg.Connection[Any] = await asyncpg.connect(asyncpg_dsn(resolved), timeout=connect_timeout,
                                                              server_settings=server_settings)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise unreachable(resolved, settings, exc) from exc
    return conn


async def create_pool(settings: Settings, *, url: str | None = None, min_size: int = 1, max_size: int = 4,
                      connect_timeout: float = CONNECT_TIMEOUT_S,
                      server_settings: dict[str, str] | None = None,
                      reset_sessions: bool = True) -> asyncpg.Pool[Any]:
    """A connection pool. ``reset_sessions=False`` skips the reset query asyncpg sends each time a
    connection goes back to the pool (a round trip per use); only for pools whose users leave no
    session state behind (no SET, LISTEN, advisory locks or open cursors; an open transaction is
    still rolled back)."""
    import asyncpg  # noqa: PLC0415 - asyncpg/SQLAlchemy take 50+ ms to import: `import ledger` (the CLI's start) goes without

    resolved = url or await database_url(settings)
    try:
        pool: asyncpg.Pool[Any] = await asyncpg.create_pool(
            asyncpg_dsn(resolved), min_size=min_size, max_size=max_size, timeout=connect_timeout,
            server_settings=server_settings, reset=None if reset_sessions else _keep_session,
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise unreachable(resolved, settings, exc) from exc
    return pool


async def _keep_session(connection: Any) -> None:
    return None


async def create_engine(settings: Settings, *, url: str | None = None, **kwargs: Any) -> AsyncEngine:
    """An SQLAlchemy async engine on asyncpg (no connection is made yet)."""
    from sqlalchemy.ext.asyncio import create_async_engine  # noqa: PLC0415 - asyncpg/SQLAlchemy take 50+ ms to import: `import ledger` (the CLI's start) goes without

    resolved = url or await database_url(settings)
    options: dict[str, Any] = {"pool_pre_ping": True, "connect_args": {"timeout": CONNECT_TIMEOUT_S}}
    options.update(kwargs)
    return create_async_engine(sqlalchemy_url(resolved), **options)
