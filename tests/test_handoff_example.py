"""examples/handoff on the real livekit-server: two AgentServer workers in separate processes, real
``AgentSession``s in text mode driven by a scripted LLM, a real dispatch from triage to billing.

The caller types on ``lk.chat``; the agents answer on ``lk.transcription``. The bridge (in this
process) records the room, and the conversation in the log comes from the sessions' own
``lk.agent.session`` feed. Billing's LLM's first request must hold the whole earlier
conversation (the caller's messages, triage's replies, the tool calls and their outputs, with
timestamps) and the 120 userdata fields triage filled in; no message is answered by two agents.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from room_ledger import events as ev
from room_ledger.client import Ledger, Record
from room_ledger.handoff import FAILED_PREFIX, standing_by
from room_ledger.settings import Settings
from room_ledger.state import fold
from room_ledger.timeline import handoffs as replay_handoffs
from room_ledger.watch import RoomWatch as Log
from room_ledger.watch import watch
from tests.handoff_example import ExampleWorkers, Replies, Reply, workers  # noqa: F401
from tests.test_bridge_livekit import body_of, lk_settings, running_bridge  # noqa: F401

pytestmark = pytest.mark.livekit


def left(log: Log, identity: str) -> bool:
    return any(r.type == "participant.left" and body_of(r).identity == identity for r in log.records)


def handoffs(log: Log) -> list[ev.Handoff]:
    return [body_of(r) for r in log.of("handoff")]


async def say(user: Any, text: str) -> None:
    await user.local_participant.send_text(text, topic="lk.chat")


async def triage_answers(workers: ExampleWorkers, room: str, replies: Replies, log: Log) -> Reply:
    """Dispatch triage into the call; its greeting, once it has attached (published its userdata,
    claimed the floor), so what the caller types next is triage's to answer."""
    await workers.dispatch(room, workers.triage)
    greeting = await replies.next()
    assert greeting.agent == workers.triage, greeting
    await log.until(lambda rs: any(r.type == "floor.request" and body_of(r).agent_id == workers.triage
                                   for r in rs), what="triage's floor request")
    return greeting


# thread: the example's default, jobs in the worker's process; process: LiveKit's production
# default, each job in a child process (the handoff's ledger connections made there).
@pytest.mark.parametrize("executor", ["thread", "process"])
async def test_triage_hands_the_caller_to_billing(lk_settings: Settings, ledger: Ledger, room: str,
                                                  livekit_connect: Any, workers: ExampleWorkers,
                                                  executor: str) -> None:
    log = Log(ledger, room)
    await workers.start("triage", HANDOFF_EXECUTOR=executor)
    await workers.start("billing", HANDOFF_EXECUTOR=executor)
    # the bridge joins just before the caller: a room with only a hidden participant in it is closed
    # by the server after its empty_timeout, and starting workers can take that long
    async with running_bridge(lk_settings, room):
        user = await livekit_connect("caller", room)
        replies = Replies(user)
        greeting = await triage_answers(workers, room, replies, log)
        await say(user, "Hi, I'm Ana, my account is 7")
        found = await replies.next()
        assert found.text == "Thanks Ana, I found your account." and found.identity == greeting.identity
        # the end of that turn publishes what its tool changed in the userdata: no hand call
        await log.until(lambda rs: len(log.of("session.patch")) >= 2)
        await say(user, "I have a question about my bill")
        transferring = await replies.next()
        assert transferring.text == "One moment, I'm transferring you now." and transferring.identity == greeting.identity
        hello = await replies.next(timeout=40)
        assert hello.agent == workers.billing, hello
        assert hello.text == "Hi Ana, billing here. I have your account and the 2 things you told triage."
        await say(user, "Why was I charged twice?")
        answer = await replies.next()
        assert answer.identity == hello.identity and "charged twice" in answer.text
        await log.until(lambda rs: left(log, greeting.identity), timeout=30)  # triage left the call

    # every message answered by one agent: triage three times, then billing twice, nothing else
    assert [(r.agent, r.text) for r in replies.all] == [
        (workers.triage, greeting.text), (workers.triage, found.text), (workers.triage, transferring.text),
        (workers.billing, hello.text), (workers.billing, answer.text)]

    # billing's LLM's first request: the whole earlier conversation and the 120 userdata fields
    first = workers.trace("billing")[0]["items"]
    messages = [(i["role"], i["content"][0]) for i in first if i["type"] == "message"]
    assert ("user", "Hi, I'm Ana, my account is 7") in messages
    assert ("user", "I have a question about my bill") in messages
    assert ("assistant", greeting.text) in messages and ("assistant", found.text) in messages
    calls = {i["name"]: i for i in first if i["type"] == "function_call"}
    outputs = {i["name"]: i for i in first if i["type"] == "function_call_output"}
    assert set(calls) == {"look_up_account", "transfer_to"} == set(outputs)
    assert json.loads(calls["look_up_account"]["arguments"]) == {"account_id": "7"}
    assert json.loads(calls["transfer_to"]["arguments"])["agent_name"] == workers.billing
    assert outputs["look_up_account"]["output"] == "account 7: Ana, gold tier, verified"
    assert all(outputs[n]["call_id"] == calls[n]["call_id"] for n in calls)
    stamped = [i["created_at"] for i in first if i["type"] != "message" or i["role"] in ("user", "assistant")]
    assert all(isinstance(t, float) and t > 1.7e9 for t in stamped) and stamped == sorted(stamped)
    (instructions,) = [i["content"][0] for i in first if i["type"] == "message" and i["role"] == "system"]
    facts = json.loads(instructions.split("What we know about the caller: ", 1)[1])
    assert len(facts) == 120 and facts["caller"] == "Ana" and facts["field_112"] == "value 112 of account 7"
    assert "api_client" not in facts

    # the log: the sessions' own feed, the handoff, the floor passed from triage to billing
    records: list[Record] = [r async for r in ledger.read(room)]
    items = [r for r in records if r.type == "conversation.item"]
    assert {r.event.sender.identity for r in items} == {greeting.identity, hello.identity}
    assert {body_of(r).item_type for r in items} >= {"message", "function_call", "function_call_output"}
    (handoff,) = [r for r in records if r.type == "handoff"]
    assert isinstance(handoff.event, ev.HandoffEvent)
    assert (handoff.event.body.from_agent, handoff.event.body.to_agent) == (workers.triage, workers.billing)
    state = fold(records)
    tenures = [(t.holder, t.end_reason) for t in state.floor.history]
    assert tenures[:2] == [(workers.triage, "handoff"), (workers.billing, None)]
    # 120 fields, and the runtime object's slot: None while it holds none (a value, null), left out
    # when it holds a client (not JSON)
    assert len(state.session) == 121 and state.session["api_client"] is None
    # userdata went out per turn, with no hand call: the defaults when triage attached, then one
    # merge patch at the end of the turn whose tool filled the account in (before the next message)
    # (by position, not sender: a participant's packets that reach the bridge before the server has
    # announced it are recorded with no sender identity; see the report on issue 14)
    patches = [r for r in records if r.type == "session.patch" and r.seq < handoff.seq]
    bill = next(r.seq for r in records if r.type == "chat.message" and "bill" in body_of(r).text)
    first_patch, turn_patch = (body_of(p).patch for p in patches[:2])
    assert len(first_patch) == 118 and first_patch["caller"] == ""
    # steps, facility: None, stored as null (a merge patch's null would delete them)
    assert body_of(patches[0]).set_values == {"/steps": None, "/facility": None, "/api_client": None}
    assert patches[1].seq < bill and turn_patch["caller"] == "Ana" and len(turn_patch) == 121
    assert turn_patch["api_client"] is None  # it holds a client now, which is not JSON: out of the record
    assert len(patches) == 2

    # `ledger replay --handoffs` sees the same handoff, and the dead air the caller saw: from the
    # end of triage's last reply to the start of billing's first, on the caller's clock
    rows = await replay_handoffs(ledger, room)
    (row,) = rows
    assert (row.from_agent, row.to_agent, row.outcome) == (workers.triage, workers.billing, "ok")
    seen = hello.started - transferring.ended
    assert row.dead_air_s is not None and abs(row.dead_air_s - seen) < 0.1, (row.to_builtins(), seen)
    await log.close()


async def test_billing_hands_the_caller_back_to_triage(lk_settings: Settings, ledger: Ledger, room: str,
                                                      livekit_connect: Any, workers: ExampleWorkers) -> None:
    """A round trip across three processes' jobs (seed 004's bidirectional pattern): triage -> billing,
    which changes the userdata, -> triage again, dispatched anew, resuming with all of it."""
    log = Log(ledger, room)
    await workers.start("triage")
    await workers.start("billing")
    async with running_bridge(lk_settings, room):
        user = await livekit_connect("caller", room)
        replies = Replies(user)
        greeting = await triage_answers(workers, room, replies, log)
        await say(user, "Hi, I'm Ana, my account is 7")
        await replies.next()
        await log.until(lambda rs: len(log.of("session.patch")) >= 2)
        await say(user, "I have a question about my bill")
        await replies.next()  # "One moment, I'm transferring you now."
        hello = await replies.next(timeout=40)
        assert hello.agent == workers.billing, hello
        await say(user, "Please refund the double charge")
        refunded = await replies.next()
        assert (refunded.identity, refunded.text) == (hello.identity, "Done: I refunded the duplicate charge.")
        await say(user, "Thanks, back to triage please")
        sending = await replies.next()
        assert (sending.identity, sending.text) == (hello.identity, "I'm sending you back to triage now.")
        welcome = await replies.next(timeout=40)
        await log.until(lambda rs: left(log, hello.identity), timeout=30)  # billing left the call
    # a new triage job (a new participant), with the userdata billing changed
    assert welcome.agent == workers.triage and welcome.identity not in (greeting.identity, hello.identity)
    assert welcome.text == "Welcome back Ana, triage here. So far: identified, verified, refunded."
    assert [(h.from_agent, h.to_agent) for h in handoffs(log)] == [(workers.triage, workers.billing),
                                                                  (workers.billing, workers.triage)]
    assert [t.holder for t in fold(log.records).floor.history] == [workers.triage, workers.billing, workers.triage]
    # the resumed triage's LLM's first request: both agents' turns and tool calls, in time order
    first = [t for t in workers.trace("triage") if t["request"] == 1][-1]["items"]
    messages = [(i["role"], i["content"][0]) for i in first if i["type"] == "message" and i["role"] != "system"]
    assert ("user", "Please refund the double charge") in messages and ("assistant", refunded.text) in messages
    assert ("assistant", hello.text) in messages and ("assistant", greeting.text) in messages
    calls = [i["name"] for i in first if i["type"] == "function_call"]
    assert calls == ["look_up_account", "transfer_to", "refund_duplicate", "transfer_to"]
    stamped = [i["created_at"] for i in first if i["type"] != "message" or i["role"] != "system"]
    assert stamped == sorted(stamped)
    await log.close()


# slow-llm: triage's model takes 1.5 s to start each answer, so its "One moment, I'm transferring
# you" comes long after the transfer tool returned; the standby (which takes over in tens of ms)
# must still speak only after it, not over it.
@pytest.mark.parametrize("triage_llm_delay", ["0", "1.5"], ids=["instant-llm", "slow-llm"])
async def test_warm_standby_takes_over_without_a_dispatch(lk_settings: Settings, ledger: Ledger, room: str,
                                                          livekit_connect: Any, livekit_server: Any,
                                                          workers: ExampleWorkers, triage_llm_delay: str) -> None:
    log = Log(ledger, room)
    await workers.start("triage", HANDOFF_WARM="1", HANDOFF_LLM_DELAY_S=triage_llm_delay)
    await workers.start("billing")
    # the bridge joins just before the caller: a room with only a hidden participant in it is closed
    # by the server after its empty_timeout, and starting workers can take that long
    async with running_bridge(lk_settings, room):
        user = await livekit_connect("caller", room)
        replies = Replies(user)
        await workers.dispatch(room, workers.triage)
        greeting = await replies.next()
        # billing is in the room before any handoff, standing by, silent
        await log.until(lambda rs: any(r.type == "agent.status" and body_of(r).agent_id == workers.billing
                                       and body_of(r).task == "standby" for r in rs))
        await say(user, "Hi, I'm Ana, my account is 7")
        found = await replies.next()
        await say(user, "I have a question about my bill")
        transferring = await replies.next()
        hello = await replies.next()
        assert hello.agent == workers.billing, hello
        assert hello.text == "Hi Ana, billing here. I have your account and the 2 things you told triage."
        await say(user, "Why was I charged twice?")
        answer = await replies.next()
        assert answer.identity == hello.identity and "charged twice" in answer.text
        await log.until(lambda rs: left(log, greeting.identity), timeout=30)
        async with livekit_server.api() as lk:
            dispatches = [d for d in await lk.agent_dispatch.list_dispatch(room) if d.agent_name == workers.billing]
    # one dispatch of billing: the standby's, made when the call started; none at the handoff
    assert [json.loads(d.metadata).get("standby") for d in dispatches] == [True]
    assert [(r.agent, r.text) for r in replies.all] == [
        (workers.triage, greeting.text), (workers.triage, found.text), (workers.triage, transferring.text),
        (workers.billing, hello.text), (workers.billing, answer.text)]
    first = next(t for t in workers.trace("billing"))["items"]
    calls = {i["name"] for i in first if i["type"] == "function_call"}
    assert calls == {"look_up_account", "transfer_to"}
    (instructions,) = [i["content"][0] for i in first if i["type"] == "message" and i["role"] == "system"]
    facts = json.loads(instructions.split("What we know about the caller: ", 1)[1])
    assert len(facts) == 120 and facts["field_112"] == "value 112 of account 7"
    state = fold(log.records)
    assert [(t.holder, t.end_reason) for t in state.floor.history][:2] == [(workers.triage, "handoff"),
                                                                           (workers.billing, None)]
    await log.close()


async def test_a_dead_standby_is_replaced_by_a_dispatch(lk_settings: Settings, ledger: Ledger, room: str,
                                                        livekit_connect: Any, workers: ExampleWorkers) -> None:
    """The standby announced itself, then its process died: the source waits STANDBY_GRACE_S for it
    to take the floor, then dispatches billing (another worker takes the job) and the call goes on."""
    await workers.start("triage", HANDOFF_WARM="1")
    await workers.start("billing", key="billing-1")  # the only billing worker: it gets the standby job
    async with running_bridge(lk_settings, room):
        user = await livekit_connect("caller", room)
        replies = Replies(user)
        await workers.dispatch(room, workers.triage)
        await replies.next()
        async with watch(ledger, room) as log:
            await log.until(lambda rs: standing_by(fold(rs), workers.billing), 30, what="billing's standby")
        standby = "billing-1"
        workers.procs[standby].kill()
        await workers.procs[standby].wait()
        # a second billing worker, registered before the handoff, takes the fallback dispatch
        await workers.start("billing", key="billing-2")
        await say(user, "I have a question about my bill")
        assert (await replies.next()).text == "One moment, I'm transferring you now."
        hello = await replies.next(timeout=40)
        assert hello.agent == workers.billing and hello.text.startswith("Hi Ana, billing here")
    other = "billing-2" if standby == "billing-1" else "billing-1"
    assert "standing by" not in workers.output(other)  # the dispatched job took over cold
    records = [r async for r in ledger.read(room)]
    assert [body_of(r).to_agent for r in records if r.type == "handoff"] == [workers.billing]
    assert fold(records).floor.holder == workers.billing


@pytest.mark.parametrize("typed_meanwhile", [False, True])
async def test_no_worker_for_the_target_keeps_the_caller(lk_settings: Settings, ledger: Ledger, room: str,
                                                         livekit_connect: Any, workers: ExampleWorkers,
                                                         typed_meanwhile: bool) -> None:
    """The caller hears a progress line while waiting, then the failure notice, and only then the
    answer to what they typed meanwhile; the notice is in triage's own history."""
    log = Log(ledger, room)
    await workers.start("triage", HANDOFF_TIMEOUT_S="4", HANDOFF_PROGRESS_S="1.5")
    # the bridge joins just before the caller: a room with only a hidden participant in it is closed
    # by the server after its empty_timeout, and starting workers can take that long
    async with running_bridge(lk_settings, room):
        user = await livekit_connect("caller", room)
        replies = Replies(user)
        await workers.dispatch(room, workers.triage)
        triage = (await replies.next()).identity
        await say(user, "transfer me to nobody-here")
        moment = await replies.next()
        assert moment.text == "One moment, I'm transferring you now."
        if typed_meanwhile:
            await say(user, "are you still there?")
        progress = await replies.next(timeout=20)
        assert progress.identity == triage and progress.text.startswith("I'm still connecting you to nobody-here")
        sorry = await replies.next(timeout=20)
        assert sorry.identity == triage and "could not reach nobody-here" in sorry.text
        if not typed_meanwhile:
            await say(user, "are you still there?")
        still = await replies.next()
        assert still.identity == triage and "are you still there?" in still.text
        await log.until(lambda rs: len(log.of("handoff")) == 2)
    first, back = handoffs(log)
    assert (first.from_agent, first.to_agent) == (workers.triage, "nobody-here")
    assert (back.from_agent, back.to_agent) == ("nobody-here", workers.triage)
    assert back.reason is not None and back.reason.startswith(FAILED_PREFIX + "no worker registered as 'nobody-here'")
    assert fold(log.records).floor.holder == workers.triage
    # the notice is in triage's own history: the request answering the held message holds it
    answering = next(r["items"] for r in workers.trace("triage")
                     if any(i["type"] == "message" and "are you still there?" in i["content"][0] for i in r["items"]))
    said = [i["content"][0] for i in answering if i["type"] == "message" and i["role"] == "assistant"]
    assert any("could not reach nobody-here" in text for text in said), said
    # `ledger replay --handoffs`: one row, failed, and what the caller waited until the progress line
    (row,) = await replay_handoffs(ledger, room)
    assert row.outcome == "failed" and row.error is not None and row.error.startswith("no worker registered")
    waited = progress.started - moment.ended
    assert row.waited_s is not None and abs(row.waited_s - waited) < 0.1, (row.to_builtins(), waited)
    await log.close()


async def test_target_crashing_after_hydrating_is_a_recorded_failure(
        lk_settings: Settings, ledger: Ledger, room: str, livekit_connect: Any,
        workers: ExampleWorkers) -> None:
    log = Log(ledger, room)
    await workers.start("triage", HANDOFF_TIMEOUT_S="6")
    await workers.start("billing", HANDOFF_CRASH_AFTER_HYDRATE="1")
    # the bridge joins just before the caller: a room with only a hidden participant in it is closed
    # by the server after its empty_timeout, and starting workers can take that long
    async with running_bridge(lk_settings, room):
        user = await livekit_connect("caller", room)
        replies = Replies(user)
        await workers.dispatch(room, workers.triage)
        triage = (await replies.next()).identity
        await say(user, "I have a question about my bill")
        assert (await replies.next()).text == "One moment, I'm transferring you now."
        progress = await replies.next(timeout=30)  # 4 s into the wait (the default)
        assert progress.identity == triage and progress.text.startswith("I'm still connecting you")
        sorry = await replies.next(timeout=30)
        assert sorry.identity == triage and "could not reach" in sorry.text
        await log.until(lambda rs: len(log.of("handoff")) == 2)
    assert await asyncio.wait_for(workers.procs["billing"].wait(), 10) == 70  # it did crash, after hydrating
    back = handoffs(log)[1]
    assert back.reason is not None and back.reason.startswith(FAILED_PREFIX + f"'{workers.billing}' got the job")
    assert fold(log.records).floor.holder == workers.triage
    await log.close()
