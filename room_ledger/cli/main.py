"""The ``ledger`` command. Each command parses its options and calls one core function.

Errors are one line on stderr and exit code 1; ``ledger --debug …`` adds the traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

from room_ledger.cli import common
from room_ledger.cli.common import (
    GlobalOptions,
    ImportedWhenUsed,
    guard,
    print_error,
    run,
    set_global_options,
    settings_from,
)

if TYPE_CHECKING:
    from importlib import metadata

    from room_ledger import metrics
    from room_ledger.cli import dispatches as dispatches_cli
    from room_ledger.cli import export as export_cli
    from room_ledger.cli import livekit_commands, read_commands, replay_command, server_commands
    from room_ledger.cli import webhooks as webhooks_cli
    from room_ledger.web import serve as web_serve
else:
    metadata = ImportedWhenUsed("importlib.metadata")
    metrics = ImportedWhenUsed("room_ledger.metrics")
    dispatches_cli = ImportedWhenUsed("room_ledger.cli.dispatches")
    export_cli = ImportedWhenUsed("room_ledger.cli.export")
    livekit_commands = ImportedWhenUsed("room_ledger.cli.livekit_commands")
    read_commands = ImportedWhenUsed("room_ledger.cli.read_commands")
    replay_command = ImportedWhenUsed("room_ledger.cli.replay_command")
    server_commands = ImportedWhenUsed("room_ledger.cli.server_commands")
    webhooks_cli = ImportedWhenUsed("room_ledger.cli.webhooks")
    web_serve = ImportedWhenUsed("room_ledger.web.serve")


def _click_base(name: str) -> Any:
    """Click's ``name`` exception class, found from typer's public ``BadParameter``: typer 0.12 uses
    click itself, newer typers a copy of it inside (a private module), and both have this class.
    (Any: which module's class it is depends on the installed typer.)"""
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == name)


UsageError = _click_base("UsageError")
ClickException = _click_base("ClickException")


class _Group(TyperGroup):
    """Usage errors too are one line on stderr and exit code 1, like every other error."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, windows_expand_args: bool = True,
             **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        try:
            result = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        except UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # `ledger` alone, or a group alone
                typer.echo(exc.format_message())
                sys.exit(0)
            if not exc.format_message().strip():
                sys.exit(0)  # the help was shown
            where = exc.ctx.command_path if exc.ctx is not None else "ledger"
            print_error(f"{exc.format_message()} (see `{where} --help`)")
            sys.exit(1)
        except ClickException as exc:
            print_error(exc.format_message())
            sys.exit(1)
        except typer.Abort:
            common.err_console.print("aborted")
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(
    cls=_Group,
    name="ledger",
    help=(
        "room-ledger: an event-sourced ledger of LiveKit room state on NATS JetStream.\n\n"
        "Start with `ledger demo`, then `ledger replay <room>` to read a room's history. "
        "With LEDGER_NATS_URL / LEDGER_DATABASE_URL unset, an embedded NATS and PostgreSQL start on demand "
        "under LEDGER_HOME (./.ledger)."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Click's plain help: rich's (markdown and panels) is 80 ms of every `ledger --help`.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        try:
            typer.echo(f"ledger {metadata.version('room-ledger')}")
        except metadata.PackageNotFoundError:
            typer.echo("ledger (not installed)")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the traceback of an error.", envvar="LEDGER_DEBUG")
    ] = False,
    nats_url: Annotated[
        str | None,
        typer.Option("--nats-url", help="NATS URL(s), comma-separated; unset: the embedded server.",
                     envvar="LEDGER_NATS_URL", show_envvar=True),
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option("--database-url", help="PostgreSQL URL; unset: the embedded PostgreSQL.",
                     envvar="LEDGER_DATABASE_URL", show_envvar=True),
    ] = None,
    home: Annotated[
        Path | None,
        typer.Option("--home", help="Data folder of the embedded servers (default ./.ledger).",
                     envvar="LEDGER_HOME", show_envvar=True),
    ] = None,
    stream: Annotated[
        str | None, typer.Option("--stream", help="JetStream stream name (default ROOMS).", envvar="LEDGER_STREAM")
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", callback=_version, is_eager=True)
    ] = False,
) -> None:
    options = GlobalOptions(debug=debug, nats_url=nats_url, database_url=database_url, home=home, stream=stream)
    ctx.obj = options
    set_global_options(options)


# --- shared option types ------------------------------------------------------------------------

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts and jq) instead of tables.")]
RoomArg = Annotated[str, typer.Argument(help="The LiveKit room name.", show_default=False)]
MetricsOpt = Annotated[
    str | None,
    typer.Option("--metrics-port", help="Serve Prometheus metrics on [HOST:]PORT/metrics (HOST defaults to "
                 "127.0.0.1; 0.0.0.0:9100 for a scraper elsewhere).", envvar="LEDGER_METRICS_PORT",
                 show_envvar=True, show_default=False, metavar="[HOST:]PORT"),
]


def _serve_metrics(address: str | None, settings: Any, role: str) -> None:
    """Start the /metrics endpoint of a long-running command (a thread of its own); `ledger doctor`
    on this machine finds it through LEDGER_HOME."""
    if not address:
        return
    host, port = guard(lambda: metrics.serve(address, home=settings.home, role=role))
    common.err_console.print(f"metrics: http://{host}:{port}/metrics")


# --- replay -------------------------------------------------------------------------------------


@app.command()
def replay(
    room: RoomArg,
    since: Annotated[
        str | None,
        typer.Option("--since", help="Start at a sequence (120), an ISO time (2024-05-01T10:00:00Z) or a time "
                     "ago (5m, 2h).", show_default=False),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option("--until", help="Stop after a sequence, an ISO time or a time ago.", show_default=False),
    ] = None,
    types: Annotated[
        list[str] | None,
        typer.Option("--type", "-t", help="Only these event types (glob, repeatable): 'floor.*', transcript.",
                     show_default=False),
    ] = None,
    senders: Annotated[
        list[str] | None,
        typer.Option("--sender", "-s", help="Only events sent by these identities (glob, repeatable).",
                     show_default=False),
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing live events; Ctrl-C ends.")
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="NDJSON: one event per line, its own fields plus seq, subject and time "
                     "(stored); with --at, --floor or --handoffs one JSON document."),
    ] = False,
    at: Annotated[
        str | None,
        typer.Option("--at", help="Show the room's state at a sequence or time: floor, participants, session, "
                     "latest conversation.", show_default=False),
    ] = None,
    floor: Annotated[
        bool, typer.Option("--floor", help="Draw the floor timeline: a lane per agent, who held it when, the queue.")
    ] = False,
    handoffs: Annotated[
        bool, typer.Option("--handoffs", help="List handoffs with their dead air.")
    ] = False,
    html: Annotated[
        Path | None,
        typer.Option("--html", help="Write a self-contained HTML page (floor, participants, conversation, "
                     "session) to FILE.", metavar="FILE", show_default=False),
    ] = None,
) -> None:
    """Replay a room's history: a readable timeline, NDJSON, its state at a point, floor lanes or handoffs.

    Examples:

      ledger replay support-42

      ledger replay support-42 --since 5m --type 'floor.*' --sender triage

      ledger replay support-42 --json | jq -r 'select(.type=="transcript") | .body.text'

      ledger replay support-42 --follow

      ledger replay support-42 --at 1200        (or --at 2024-05-01T10:02:00Z)

      ledger replay support-42 --floor

      ledger replay support-42 --handoffs

      ledger replay support-42 --html room.html
    """
    request = guard(
        lambda: replay_command.replay_request(
            room, since=since, until=until, types=types or [], senders=senders or [], follow=follow,
            as_json=as_json, at=at, floor=floor, handoffs=handoffs, html=html,
        )
    )
    run(lambda: replay_command.replay(request), interrupt_ok=follow)


# --- operations ---------------------------------------------------------------------------------


@app.command()
def state(room: RoomArg, as_json: JsonOpt = False) -> None:
    """The room's state now: floor holder and queue, participants, session fields, latest conversation.

    Examples:

      ledger state support-42

      ledger state support-42 --json | jq .floor.holder
    """
    settings = guard(settings_from)
    run(lambda: read_commands.state(settings, room, as_json=as_json))


@app.command()
def rooms(as_json: JsonOpt = False) -> None:
    """Every room in the log: events, first and last activity, participants present, bridge gaps.

    Examples:

      ledger rooms

      ledger rooms --json | jq -r '.[].room'
    """
    settings = guard(settings_from)
    run(lambda: read_commands.rooms(settings, as_json=as_json))


@app.command()
def purge(
    room: RoomArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove a room's events from the stream and its rows from every projection (asks first).

    Examples:

      ledger purge test-room

      ledger purge test-room --yes --json
    """
    settings = guard(settings_from)
    run(lambda: server_commands.purge(settings, room, yes=yes, as_json=as_json))


@app.command()
def payload(
    room: RoomArg,
    seq: Annotated[int, typer.Argument(help="The event's stream sequence (as `ledger replay` shows it).", min=1)],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the bytes to this file.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The exact bytes of an event's payload, to stdout (or --out FILE); --json: where it is stored.

    Payloads above LEDGER_INLINE_LIMIT come from the Object Store bucket beside the stream.

    Examples:

      ledger payload support-42 1234 > upload.bin

      ledger payload support-42 1234 --out patch.json

      ledger payload support-42 1234 --json
    """
    settings = guard(settings_from)
    run(lambda: read_commands.payload(settings, room, seq, out=out, as_json=as_json))


@app.command()
def doctor(
    as_json: JsonOpt = False,
    monitor_url: Annotated[
        str | None,
        typer.Option("--monitor-url", help="The NATS monitoring endpoint, to check fsync on a server you run "
                     "(default: http://<nats host>:8222).", envvar="LEDGER_NATS_MONITOR_URL", show_default=False),
    ] = None,
) -> None:
    """Check what the ledger connects to: servers and versions, the stream's configuration, problems.

    Starts nothing and changes nothing. Exit code 1 when a problem is an error (e.g. NATS unreachable).

    Examples:

      ledger doctor

      LEDGER_NATS_URL=nats://nats.internal:4222 ledger doctor --json | jq .problems
    """
    settings = guard(settings_from)
    run(lambda: server_commands.doctor(settings, as_json=as_json, monitor_url=monitor_url))


@app.command()
def up(
    as_json: JsonOpt = False,
    leave_running: Annotated[
        bool, typer.Option("--leave-running", help="Do not stop the servers when up ends.")
    ] = False,
) -> None:
    """Run the embedded NATS and PostgreSQL in the foreground until Ctrl-C (then stop them).

    Other ledger processes on this machine (bridge, projector, replay) find them through LEDGER_HOME.

    Examples:

      ledger up

      LEDGER_HOME=/var/lib/ledger ledger up --json
    """
    settings = guard(settings_from)
    run(lambda: server_commands.up(settings, as_json=as_json, leave_running=leave_running), interrupt_ok=True)


@app.command()
def down(as_json: JsonOpt = False) -> None:
    """Stop this home's embedded NATS and PostgreSQL (LEDGER_HOME), by the pids in their state files.

    Servers named by LEDGER_NATS_URL / LEDGER_DATABASE_URL are never touched. Data stays.

    Examples:

      ledger down

      LEDGER_HOME=/var/lib/ledger ledger down --json
    """
    settings = guard(settings_from)
    run(lambda: server_commands.down(settings, as_json=as_json))


@app.command()
def migrate(as_json: JsonOpt = False) -> None:
    """Create or upgrade the projection tables in PostgreSQL (idempotent).

    Example:

      LEDGER_DATABASE_URL=postgresql://ledger@db/ledger ledger migrate
    """
    settings = guard(settings_from)
    run(lambda: server_commands.migrate(settings, as_json=as_json))


@app.command()
def demo(
    keep: Annotated[bool, typer.Option("--keep", help="Keep the demo's rooms and projection rows afterwards.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show the whole product in seconds on the embedded default: agents taking turns, a handoff, replay.

    Drives a scripted session through the bridge's ingest path (no WebRTC), runs the projector, prints
    the replay timeline, the floor timeline and what a late-joining agent hydrates, with timings.

    Examples:

      ledger demo

      ledger demo --keep && ledger rooms

      ledger demo --json | jq .timings
    """
    settings = guard(settings_from)
    run(lambda: livekit_commands.demo(settings, keep=keep, as_json=as_json))


@app.command()
def bridge(
    room: Annotated[
        str | None, typer.Option("--room", help="Join only this room (default: rooms dispatched to the bridge).",
                                 show_default=False)
    ] = None,
    metrics_port: MetricsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run the bridge: record LiveKit rooms into the ledger until Ctrl-C (needs LIVEKIT_URL and keys).

    It prints "bridge: registered as 'NAME'" on stderr once LiveKit has registered it:
    dispatch rooms to it from then on (LiveKit offers a job only to workers registered at that
    moment). With --json, each such moment is also one JSON line on stdout.

    Examples:

      ledger bridge

      ledger bridge --json | grep -m1 registered     # wait until rooms can dispatch it

      ledger bridge --room support-42
    """
    settings = guard(settings_from)
    _serve_metrics(metrics_port, settings, "bridge")
    run(lambda: livekit_commands.bridge(settings, room=room, as_json=as_json), interrupt_ok=True)


@app.command()
def dispatch(
    room: RoomArg,
    agent_name: Annotated[
        str | None, typer.Option("--agent-name", help="The agent name to dispatch (default: the bridge's, "
                                 "LEDGER_BRIDGE_AGENT_NAME).", show_default=False)
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Dispatch the bridge (or another agent) into a LiveKit room.

    Example:

      ledger dispatch support-42
    """
    settings = guard(settings_from)
    run(lambda: livekit_commands.dispatch(settings, room, agent_name=agent_name, as_json=as_json))


@app.command()
def project(
    once: Annotated[bool, typer.Option("--once", help="Catch up with the log and stop instead of following it.")] = False,
    partition: Annotated[
        int, typer.Option("--partition", min=0, help="This worker's share of the rooms (0 … partitions-1).")
    ] = 0,
    partitions: Annotated[
        int, typer.Option("--partitions", min=1, help="How many workers split the rooms between them.")
    ] = 1,
    as_json: JsonOpt = False,
    metrics_port: MetricsOpt = None,
) -> None:
    """Run the projector: fold the log into PostgreSQL tables, following it until Ctrl-C.

    Several workers split the rooms by a stable hash of the room (each room stays with one
    worker, in order): run one per partition.

    Examples:

      ledger project

      ledger project --once --json

      ledger project --partition 0 --partitions 3   # and 1, 2 on other machines
    """
    settings = guard(settings_from)
    if partition >= partitions:
        print_error(f"--partition {partition} is not below --partitions {partitions}: use 0 … {partitions - 1}")
        raise typer.Exit(1)
    _serve_metrics(metrics_port, settings, f"projector {partition}/{partitions}")
    run(
        lambda: server_commands.project(
            settings, once=once, as_json=as_json, partition=partition, partitions=partitions
        ),
        interrupt_ok=True,
    )


@app.command()
def rebuild(
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    projection: Annotated[str, typer.Option("--projection", help="The projection to rebuild.")] = "rooms",
    as_json: JsonOpt = False,
) -> None:
    """Fold the whole log again into fresh tables, swapped in atomically when done.

    Hydration and the live projector keep working meanwhile; a progress bar shows events/s and
    the time left.

    Example:

      ledger rebuild --yes

      ledger rebuild --projection rooms --yes --json
    """
    settings = guard(settings_from)
    run(lambda: server_commands.rebuild(settings, yes=yes, as_json=as_json, projection=projection))


# --- conversation export (issue 17) -------------------------------------------------------------


@app.command("export")
def export_(
    room: Annotated[str | None, typer.Argument(help="One room (default: every room, or --prefix).",
                                               show_default=False)] = None,
    prefix: Annotated[str | None, typer.Option("--prefix", help="Rooms whose name starts with this.",
                                               show_default=False)] = None,
    since: Annotated[str | None, typer.Option("--since", help="Rooms active at or after this ISO time or time "
                                              "ago (5m, 2h).", show_default=False)] = None,
    until: Annotated[str | None, typer.Option("--until", help="Rooms active at or before this time.",
                                              show_default=False)] = None,
    livekit: Annotated[bool, typer.Option("--livekit", help="LiveKit's ChatContext.to_dict() shape ({\"items\": "
                                          "[...]}, loads with ChatContext.from_dict) instead of OpenAI messages.")
                       ] = False,
    bare: Annotated[bool, typer.Option("--bare", help="Only messages (or items) per line, no room, turns or "
                                       "participants.")] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the JSON Lines to FILE (default stdout).",
                                             show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary (needs --out).")] = False,
) -> None:
    """Export conversations as JSON Lines, one conversation per line: OpenAI messages or (--livekit) a ChatContext.

    Each line also carries the turns (role, speaker identity and kind, text, times, log sequence, tool
    calls and outputs, handoffs). Agent-to-agent rooms give one line per agent, from its side.

    Examples:

      ledger export support-42

      ledger export --prefix support- --since 1d --out calls.jsonl

      ledger export --livekit --bare --out ctx.jsonl --json
    """
    settings = guard(settings_from)
    chosen = guard(lambda: export_cli.selection(room, prefix, since, until))
    run(lambda: export_cli.export(settings, chosen, shape="livekit" if livekit else "openai", bare=bare, out=out,
                                  as_json=as_json))


@app.command()
def serve(
    host: Annotated[str, typer.Option("--host", help="Address to listen on (loopback by default; the view is "
                                      "read-only but shows everything rooms say).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port (0: any free one).")] = 8790,
    token: Annotated[
        str | None,
        typer.Option("--token", help="Require this bearer token (header 'Authorization: Bearer …', or open "
                     "/?token=… once in a browser).", envvar="LEDGER_SERVE_TOKEN", show_default=False),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print where it serves as one JSON line.")] = False,
    metrics_port: MetricsOpt = None,
) -> None:
    """Serve a live web view of every room: timelines, floor lanes, handoffs, session, time travel, search.

    Read-only; no external assets (works offline). Ctrl-C stops.

    Examples:

      ledger serve                      (then open http://127.0.0.1:8790/)

      LEDGER_SERVE_TOKEN=s3cret ledger serve --host 0.0.0.0
    """
    settings = guard(settings_from)
    _serve_metrics(metrics_port, settings, "serve")
    run(lambda: web_serve.serve(settings, host=host, port=port, token=token or None, as_json=as_json),
        interrupt_ok=True)


# --- the server's own view: webhooks (issue 17) -------------------------------------------------


@app.command()
def webhooks(
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to listen on (0: any free one).")
                    ] = 7890,
    as_json: Annotated[bool, typer.Option("--json", help="NDJSON: the address, then one line per webhook stored."
                                          )] = False,
) -> None:
    """Receive livekit-server's webhooks: verify each signature, append it to the room's log as server.*.

    Configure the server with webhook: {api_key: <LIVEKIT_API_KEY>, urls: [http://HOST:PORT/]}. A
    redelivered webhook is stored once; a request that is not signed with the key gets 401.

    Examples:

      LIVEKIT_API_KEY=devkey LIVEKIT_API_SECRET=... ledger webhooks --host 0.0.0.0 --port 7890

      ledger replay support-42 --type 'server.*'
    """
    settings = guard(settings_from)
    run(lambda: webhooks_cli.webhooks(settings, host=host, port=port, as_json=as_json), interrupt_ok=True)


@app.command()
def dispatches(room: RoomArg, as_json: JsonOpt = False) -> None:
    """Which agent got this room: its dispatches (LiveKit's AgentDispatch API, and those `ledger dispatch`
    recorded) beside the agent that joined for each, when, and how long after the dispatch.

    Examples:

      ledger dispatches support-42

      ledger dispatches support-42 --json | jq '.dispatches[] | {agent_name, after_s}'
    """
    settings = guard(settings_from)
    run(lambda: dispatches_cli.dispatches(settings, room, as_json=as_json))


if __name__ == "__main__":  # pragma: no cover
    app()
