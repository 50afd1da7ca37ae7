"""``ledger replay`` and the CLI's error handling, with CliRunner against a real nats-server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from room_ledger import events as ev
from room_ledger.cli.common import format_duration, parse_point
from room_ledger.cli.main import app
from room_ledger.client import Record
from room_ledger.errors import SettingsError
from room_ledger.settings import Settings
from room_ledger.timeline import ndjson_line
from tests.test_cli_helpers import T0, at, env_for, invoke, json_of, ok, seed

COMMANDS = ["replay", "state", "rooms", "purge", "doctor", "up", "migrate", "demo", "bridge", "dispatch",
            "project", "rebuild", "payload"]


# --- help and errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(settings: Settings, command: str) -> None:
    result = ok(settings, [command, "--help"])
    assert "Example" in result.stdout, result.stdout
    assert "ledger " + command in result.stdout


def test_top_level_help_lists_every_command(settings: Settings) -> None:
    result = ok(settings, ["--help"])
    for command in COMMANDS:
        assert command in result.stdout


def test_unknown_room_is_one_line_with_close_names(settings: Settings, room: str) -> None:
    seed(settings, room)
    result = invoke(settings, ["replay", room[:-1] + "x"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "no events for room" in lines[0] and repr(room) in lines[0]
    assert "Traceback" not in result.output


def test_unreachable_nats_is_one_line_naming_the_url(settings: Settings, room: str) -> None:
    for args in (["replay", room], ["rooms"], ["state", room], ["purge", room, "--yes"]):
        result = invoke(settings, args, LEDGER_NATS_URL="nats://127.0.0.1:1")
        assert result.exit_code == 1, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "nats://127.0.0.1:1" in lines[0] and "LEDGER_NATS_URL" in lines[0]
        assert "Traceback" not in result.output


def test_debug_adds_the_traceback(settings: Settings, room: str) -> None:
    result = invoke(settings, ["--debug", "replay", room], LEDGER_NATS_URL="nats://127.0.0.1:1")
    assert result.exit_code == 1
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot reach NATS")


def test_bad_setting_names_the_variable(settings: Settings, room: str) -> None:
    result = invoke(settings, ["replay", room], LEDGER_NATS_URL="http://nope")
    assert result.exit_code == 1
    assert "LEDGER_NATS_URL" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("value", ["yesterday", "5 parsecs", "0", "2024-13-45"])
def test_bad_since_is_one_line(settings: Settings, room: str, value: str) -> None:
    result = invoke(settings, ["replay", room, "--since", value])
    assert result.exit_code == 1
    assert "--since" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_conflicting_views_are_refused(settings: Settings, room: str) -> None:
    for args in (["--floor", "--handoffs"], ["--at", "3", "--type", "floor.*"], ["--follow", "--floor"],
                 ["--floor", "--since", "5m"], ["--html", "x.html", "--since", "3"]):
        result = invoke(settings, ["replay", room, *args])
        assert result.exit_code == 1, args
        assert len(result.stderr.strip().splitlines()) == 1


# --- the timeline ---------------------------------------------------------------------------------


def test_timeline_is_readable_and_gaps_stand_out(settings: Settings, room: str) -> None:
    seqs = seed(settings, room)
    out = ok(settings, ["replay", room]).stdout
    assert "triage: “Hello, how can I help?”" in out
    assert "triage asks for the floor to greet" in out
    assert "billing is processing on refund, holds the action lock" in out
    assert "triage hands the caller to billing: billing question" in out
    assert "set caller_name=Ann" in out
    assert "GAP of 3.0s" in out and "may be missing" in out
    assert f"{len(seqs)} events, #{seqs[0]}–#{seqs[-1]}, 1 bridge gap(s)" in out
    # Each event is one line with time, sequence, sender and type.
    line = next(x for x in out.splitlines() if "floor.request" in x)
    assert line.startswith("10:00:00.500") and str(seqs[3]) in line and "triage (agent)" in line


def test_json_is_ndjson_with_sequence_and_subject(settings: Settings, room: str) -> None:
    seqs = seed(settings, room)
    result = ok(settings, ["replay", room, "--json"])
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["seq"] for r in rows] == seqs
    assert all(r["subject"].startswith(f"ledger.{room}.") for r in rows)
    assert rows[0]["type"] == "participant.joined" and rows[0]["room"] == room
    assert rows[4]["body"] == {"speaker": "triage", "text": "Hello, how can I help?", "segment_id": "s1"}
    assert rows[4]["sender"] == {"identity": "triage", "kind": "agent"}
    assert datetime.fromisoformat(rows[0]["time"]).tzinfo is not None


def test_filters_type_sender_since_until(settings: Settings, room: str) -> None:
    seqs = seed(settings, room)

    def types(*args: str) -> list[str]:
        return [json.loads(x)["type"] for x in ok(settings, ["replay", room, "--json", *args]).stdout.splitlines()]

    assert types("--type", "floor.*") == ["floor.request", "floor.release"]
    assert types("--type", "floor.*", "--type", "handoff") == ["floor.request", "handoff", "floor.release"]
    assert types("--type", "*.status") == ["agent.status"]
    assert types("--sender", "bill*") == ["participant.joined", "agent.status", "transcript", "floor.release"]
    assert types("--since", str(seqs[8])) == ["handoff", "transcript", "bridge.gap", "floor.release"]
    assert types("--until", str(seqs[1])) == ["participant.joined", "participant.joined"]
    assert types("--since", str(seqs[3]), "--until", str(seqs[4])) == ["floor.request", "transcript"]
    # Times are the stream's: everything was stored within the last hour, nothing in the future.
    assert len(types("--since", "1h")) == len(seqs)
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert types("--since", future) == []
    assert len(types("--until", future)) == len(seqs)
    assert types("--until", "2000-01-01T00:00:00Z") == []


def test_no_match_says_so(settings: Settings, room: str) -> None:
    seed(settings, room)
    out = ok(settings, ["replay", room, "--type", "chat.*"]).stdout
    assert "No events" in out


def test_unknown_types_are_shown(settings: Settings, room: str) -> None:
    seqs = seed(settings, room, [ev.make_event(room, ev.RoomMetadata(metadata="x"))])
    # Publish an event of a type this version does not know, as a newer writer would.
    import asyncio

    import nats

    async def publish() -> None:
        nc = await nats.connect(settings.nats_urls[0] if settings.nats_urls else "")
        js = nc.jetstream()
        await js.publish(f"ledger.{room}.future", json.dumps(
            {"type": "future.thing", "id": "f1", "room": room, "body": {"x": 1}}).encode())
        await nc.close()

    asyncio.run(publish())
    out = ok(settings, ["replay", room]).stdout
    assert "future.thing" in out and "not known to this version" in out
    rows = [json.loads(x) for x in ok(settings, ["replay", room, "--json"]).stdout.splitlines()]
    assert rows[-1]["type"] == "future.thing" and rows[-1]["body"] == {"x": 1} and rows[0]["seq"] == seqs[0]


# --- state at a point, floor, handoffs ------------------------------------------------------------


def test_at_sequence_folds_with_the_reducers(settings: Settings, room: str) -> None:
    seqs = seed(settings, room)
    state = json_of(ok(settings, ["replay", room, "--at", str(seqs[5]), "--json"]))
    assert state["seq"] == seqs[5]
    assert state["floor"]["holder"] == "triage"
    assert [c["agent_id"] for c in state["floor"]["queue"]] == ["billing"]
    after = json_of(ok(settings, ["replay", room, "--at", str(seqs[8]), "--json"]))
    assert after["floor"]["holder"] == "billing" and after["session"] == {"caller_name": "Ann", "account": {"id": 3}}
    out = ok(settings, ["replay", room, "--at", str(seqs[8])]).stdout
    assert "floor: billing" in out and "caller_name" in out and "I was charged twice." in out


def test_at_time(settings: Settings, room: str) -> None:
    seed(settings, room)
    now = datetime.now(UTC).isoformat()
    state = json_of(ok(settings, ["replay", room, "--at", now, "--json"]))
    assert state["floor"]["holder"] is None and state["index"]["events"] == 12
    result = invoke(settings, ["replay", room, "--at", "2000-01-01T00:00:00Z"])
    assert result.exit_code == 1 and "no events at or before" in result.stderr


def test_floor_timeline(settings: Settings, room: str) -> None:
    seqs = seed(settings, room)
    data = json_of(ok(settings, ["replay", room, "--floor", "--json"]))
    assert [(t["holder"], t["start_seq"], t["end_reason"]) for t in data["tenures"]] == [
        ("triage", seqs[3], "handoff"), ("billing", seqs[8], "release")]
    assert data["agents"] == ["triage", "billing"] and data["holder"] is None
    assert any(c["queue"] == ["billing"] for c in data["changes"])
    out = ok(settings, ["replay", room, "--floor"]).stdout
    lanes = {line.split("│")[0].strip(): line.split("│")[1] for line in out.splitlines() if "│" in line}
    assert "█" in lanes["triage"] and "█" in lanes["billing"] and "░" in lanes["billing"]
    assert "who held the floor when" in out


def test_handoffs_with_dead_air(settings: Settings, room: str) -> None:
    seqs = seed(settings, room)
    rows = json_of(ok(settings, ["replay", room, "--handoffs", "--json"]))
    assert len(rows) == 1
    row = rows[0]
    assert (row["from"], row["to"], row["seq"]) == ("triage", "billing", seqs[8])
    assert row["last_speech_seq"] == seqs[4] and row["first_speech_seq"] == seqs[9]
    assert row["dead_air_s"] == pytest.approx(4.5)
    out = ok(settings, ["replay", room, "--handoffs"]).stdout
    assert "4.5s" in out and "billing question" in out


# --- follow ---------------------------------------------------------------------------------------


def test_follow_prints_history_then_live_events(settings: Settings, room: str) -> None:
    seqs = seed(settings, room, [ev.make_event(room, ev.RoomMetadata(metadata="first"))])
    # --until ends a follow when that sequence arrives; the stream is ours alone in this session.
    import asyncio

    from room_ledger.client import Ledger

    async def head() -> int:
        async with Ledger(settings) as ledger:
            return await ledger.head()

    until = asyncio.run(head()) + 2
    results: list[object] = []
    thread = threading.Thread(
        target=lambda: results.append(invoke(settings, ["replay", room, "--follow", "--json", "--until", str(until)]))
    )
    thread.start()
    live = seed(settings, room, [ev.make_event(room, ev.RoomMetadata(metadata=f"live {i}")) for i in range(2)])
    thread.join(timeout=30)
    assert not thread.is_alive()
    result = results[0]
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    rows = [json.loads(x) for x in result.stdout.splitlines()]  # type: ignore[attr-defined]
    assert [r["seq"] for r in rows] == seqs + live
    assert [r["body"]["metadata"] for r in rows] == ["first", "live 0", "live 1"]


def test_follow_ends_cleanly_on_ctrl_c(settings: Settings, room: str, tmp_path: Path) -> None:
    seed(settings, room, [ev.make_event(room, ev.RoomMetadata(metadata="first"))])
    # faulthandler: a process that does not end is made to say where it is (SIGABRT below)
    env = {**os.environ, **env_for(settings), "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "room_ledger.cli.main", "replay", room, "--follow", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
        # Ctrl-C as a terminal sends it: a test run started in the background of a shell script
        # (`make test &`) ignores SIGINT, and its children would inherit that and never see it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())  # blocks until the history line arrives
        assert first["body"]["metadata"] == "first"
        seed(settings, room, [ev.make_event(room, ev.RoomMetadata(metadata="live"))])
        assert json.loads(proc.stdout.readline())["body"]["metadata"] == "live"
        proc.send_signal(signal.SIGINT)
        # communicate, not wait: it drains stderr as the process writes it (a process blocked on a
        # full pipe never exits)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            _, err = proc.communicate(timeout=10)
            raise AssertionError(f"replay --follow did not end on Ctrl-C; where it was:\n{err[-6000:]}") from None
        assert proc.returncode == 0, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()


# --- units ----------------------------------------------------------------------------------------


def test_parse_point() -> None:
    now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert parse_point("120", "--since").seq == 120
    assert parse_point("5m", "--since", now=now).time == now - timedelta(minutes=5)
    assert parse_point("2h", "--until", now=now).time == now - timedelta(hours=2)
    assert parse_point("2024-05-01T10:00:00Z", "--since").time == T0
    assert parse_point("2024-05-01T12:00:00+02:00", "--since").time == T0
    for bad in ("", "abc", "-5", "0", "5 m s"):
        with pytest.raises(SettingsError):
            parse_point(bad, "--since")


def test_format_duration() -> None:
    assert format_duration(0.25) == "250ms"
    assert format_duration(4.5) == "4.5s"
    assert format_duration(75) == "1m15s"
    assert format_duration(7300) == "2h01m"


def test_ndjson_line_keeps_the_event_and_adds_its_position() -> None:
    event = ev.make_event("r", ev.FloorRequest(agent_id="a"), id="e1", at=at(1))
    line = ndjson_line(Record(seq=7, subject="ledger.r.floor", time=T0, event=event))
    data = json.loads(line)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert data["seq"] == 7 and data["subject"] == "ledger.r.floor" and data["id"] == "e1"
    assert data["type"] == "floor.request" and data["body"] == {"agent_id": "a"}
    assert ev.decode(json.dumps({k: v for k, v in data.items() if k not in ("seq", "subject", "time")}).encode()) \
        == event


def test_app_is_the_console_script() -> None:
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["ledger"] == "room_ledger.cli.launch:main"
    assert app.info.name == "ledger"


def test_usage_errors_are_one_line_and_exit_1(settings: Settings) -> None:
    for args, expected in ((["replay"], "Missing argument"), (["replay", "r", "--bogus"], "No such option"),
                           (["bogus"], "No such command")):
        result = invoke(settings, args)
        assert result.exit_code == 1, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0] and "--help" in lines[0]
    assert invoke(settings, []).exit_code == 0  # `ledger` alone shows the help


def test_room_data_cannot_drive_the_terminal(settings: Settings, room: str) -> None:
    seed(settings, room, [ev.make_event(room, ev.Transcript(speaker="x\x1b[2Jy", text="a\x1b]0;pwned\x07b\x9bc"),
                                        sender=ev.Sender("evil\x1b[31m", "agent"))])
    out = ok(settings, ["replay", room]).stdout
    assert "\x1b" not in out and "\x07" not in out and "\x9b" not in out
    assert "x\ufffd[2Jy: “a\ufffd]0;pwned\ufffdb\ufffdc”" in out


def test_global_flags_override_the_environment(settings: Settings, room: str) -> None:
    seed(settings, room)
    url = settings.nats_urls[0] if settings.nats_urls else ""
    result = invoke(settings, ["--nats-url", url, "replay", room, "--json"], LEDGER_NATS_URL="nats://127.0.0.1:1")
    assert result.exit_code == 0, result.output
    bad = invoke(settings, ["--nats-url", "nats://127.0.0.1:1", "replay", room])
    assert bad.exit_code == 1 and "nats://127.0.0.1:1" in bad.stderr


def test_floor_timeline_keeps_every_tenure_of_a_long_room(settings: Settings, room: str) -> None:
    turns = 150  # more than the room state's bounded floor history
    events: list[ev.KnownEvent] = []
    for i in range(turns):
        agent = ("a", "b", "c")[i % 3]
        events.append(ev.make_event(room, ev.FloorRequest(agent_id=agent, task=f"t{i}"), sender=ev.Sender(agent, "agent")))
        events.append(ev.make_event(room, ev.FloorRelease(agent_id=agent), sender=ev.Sender(agent, "agent")))
    seqs = seed(settings, room, events)
    data = json_of(ok(settings, ["replay", room, "--floor", "--json"]))
    assert len(data["tenures"]) == turns
    assert [t["start_seq"] for t in data["tenures"]] == seqs[::2]
    assert all(t["end_reason"] == "release" for t in data["tenures"])
