"""The ``ledger`` executable's entry point (``[project.scripts]``)."""

from __future__ import annotations

import importlib.util
import sys

SERVER_EXTRA_MISSING = (
    "ledger: the command line is part of the server extra, which is not installed here "
    "(it has only the agent side). Install it with: pip install 'room-ledger[server]'"
)


def main() -> None:
    """The ``ledger`` executable: says what to install where only the agent side is installed,
    instead of a traceback. (Alembic stands for the extra: Typer itself comes with livekit-agents.)"""
    if importlib.util.find_spec("alembic") is None:
        sys.stderr.write(SERVER_EXTRA_MISSING + "\n")
        sys.exit(1)
    from room_ledger.cli.main import app  # noqa: PLC0415 - after the check above, which is the point

    app()
