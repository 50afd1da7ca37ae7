"""What every command shares: settings from flags, the error boundary, consoles, and time parsing.

Points in a log and durations as people write them are the core's (:mod:`room_ledger.window`,
:mod:`room_ledger.settings`, shared with the web view); the commands take them from here.

Commands stay thin: they parse their options, build :class:`~room_ledger.settings.Settings` with
:func:`settings_from`, and hand one coroutine to :func:`run`, which turns a domain error into one
line on stderr and exit code 1 (a traceback only with ``ledger --debug``).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

import msgspec
import typer

from room_ledger.errors import LedgerError
from room_ledger.settings import Settings
from room_ledger.settings import format_duration as format_duration
from room_ledger.window import Point as Point
from room_ledger.window import parse_point as parse_point

if TYPE_CHECKING:
    from asyncio import AbstractEventLoop, Event

    from rich.console import Console

T = TypeVar("T")


#: Human output. ``highlight`` off: rich would otherwise colour numbers and quotes inside summaries.
#: Markup off: room names and transcripts must print as they are, never as rich markup.
_CONSOLES: Final[dict[str, dict[str, Any]]] = {
    "console": {
        "highlight": False,
        "markup": False,
        "soft_wrap": False,
        # Piped or captured output keeps whole lines (rich would otherwise assume 80 columns).
        "width": None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160,
    },
    "err_console": {"stderr": True, "highlight": False, "markup": False, "soft_wrap": True},
}

if TYPE_CHECKING:
    console: Console
    err_console: Console


def __getattr__(name: str) -> Any:
    """``console`` and ``err_console``, made on first import (PEP 562): rich and asyncio are
    about half of a bare ``ledger`` start (``--help``, option errors), which prints through
    neither, so they load with the first command that prints."""
    if name not in _CONSOLES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from rich.console import Console  # noqa: PLC0415 - the point of this function

    made = globals()[name] = Console(**_CONSOLES[name])
    return made


def _stderr() -> Console:
    return cast("Console", globals().get("err_console") or __getattr__("err_console"))


def print_error(message: str) -> None:
    """``error: <message>`` on stderr, one line."""
    _stderr().print("error: ", style="bold red", end="")
    _stderr().print(message)


class CliError(LedgerError):
    """A bad argument or a refused operation, reported like any other domain error (exit 1)."""


@dataclass
class GlobalOptions:
    """Options given before the command (``ledger --debug replay …``)."""

    debug: bool = False
    nats_url: str | None = None
    database_url: str | None = None
    home: Path | None = None
    stream: str | None = None


_options = GlobalOptions()


def set_global_options(options: GlobalOptions) -> None:
    """Called by the top-level callback on every invocation (so each run starts from its own flags)."""
    global _options
    _options = options


def global_options() -> GlobalOptions:
    return _options


def settings_from(options: GlobalOptions | None = None) -> Settings:
    """Settings from the environment, with the global flags applied (validated the same way)."""
    options = options or global_options()
    environ = dict(os.environ)
    for variable, value in (
        ("LEDGER_NATS_URL", options.nats_url),
        ("LEDGER_DATABASE_URL", options.database_url),
        ("LEDGER_HOME", str(options.home) if options.home else None),
        ("LEDGER_STREAM", options.stream),
    ):
        if value:
            environ[variable] = value
    return Settings.from_env(environ)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else text
    if len(lines) > 1:
        first += " (more with `ledger --debug …`)"
    return first


def _is_domain_error(exc: BaseException) -> bool:
    return isinstance(exc, LedgerError)


def fail(exc: BaseException) -> typer.Exit:
    """Report ``exc`` the CLI way and return the exit to raise."""
    if global_options().debug:
        _stderr().print("".join(traceback.format_exception(exc)), markup=False, highlight=False)
    if _is_domain_error(exc):
        print_error(_one_line(exc))
    else:
        print_error(f"unexpected {type(exc).__name__}: {_one_line(exc)} (run `ledger --debug …` for the traceback)")
    return typer.Exit(1)


def run(
    factory: Callable[[], Coroutine[Any, Any, T]] | Callable[[], Awaitable[T]],
    *,
    interrupt_ok: bool = False,
) -> T:
    """Run one command's coroutine: domain errors -> one line and exit 1; Ctrl-C -> a clean end."""
    import asyncio  # noqa: PLC0415 - as the consoles above: a bare `ledger` start does without it

    try:
        return asyncio.run(_await(factory))
    except KeyboardInterrupt:
        sys.stdout.flush()
        if interrupt_ok:
            raise typer.Exit(0) from None
        _stderr().print("interrupted")
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except BrokenPipeError:
        # `ledger replay … | head`: the reader left; that is not an error of ours.
        _silence_stdout()
        raise typer.Exit(0) from None
    except Exception as exc:
        raise fail(exc) from None


async def _await(factory: Callable[[], Awaitable[T]]) -> T:
    return await factory()


def guard(call: Callable[[], T]) -> T:
    """The error boundary for synchronous work (settings, argument parsing)."""
    try:
        return call()
    except typer.Exit:
        raise
    except Exception as exc:
        raise fail(exc) from None


def _silence_stdout() -> None:
    # Python flushes stdout at exit; on a closed pipe that would print a second BrokenPipeError.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def write_json(data: Any) -> None:
    """One JSON document on stdout (``--json``)."""

    sys.stdout.write(msgspec.json.encode(data).decode() + "\n")
    sys.stdout.flush()


def stop_on_signals(loop: AbstractEventLoop, stop: Event) -> None:
    """Set ``stop`` on SIGINT or SIGTERM (a long-running command's clean end)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


class ImportedWhenUsed:
    """A module imported on its first attribute: the command line's one way of loading lazily.
    Each command loads only the modules of its own work, and a view's renderer loads only when
    that view is asked for; ``ledger --help`` and option parsing load none of them. Declare the
    real module under ``TYPE_CHECKING`` beside it, for the type checker."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(importlib.import_module(self._name), attribute)
