"""Imported by command modules before anything that imports nats-py: see
:func:`cli._start_without_aiohttp` (nats-py then loads without aiohttp, 0.3-0.45 s of a start).
``ledger --help`` and the parsing of every command import neither."""

from room_ledger.cli import _start_without_aiohttp

_start_without_aiohttp()
