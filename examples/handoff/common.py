"""What both workers of the handoff example share: the userdata, a scripted LLM, text-only I/O, the runner.

The scripted LLM stands in for a real one so the example runs with no network and no key: it
answers from a script (a function of the chat context) with canned text or tool calls, exactly
as a provider plugin streams them. With ``HANDOFF_TRACE`` set to a folder, every request it gets
is appended to ``<folder>/<agent>.jsonl`` (what the test reads to see what the LLM was given).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, make_dataclass
from pathlib import Path
from typing import Any, Never

from livekit.agents import (
    DEFAULT_API_CONNECT_OPTIONS,
    NOT_GIVEN,
    AgentServer,
    APIConnectOptions,
    JobContext,
    JobExecutorType,
    NotGivenOr,
    llm,
    room_io,
)

log = logging.getLogger("handoff-example")

#: Text only: the caller types on lk.chat, agents answer on lk.transcription; no audio either way.
TEXT_ONLY = room_io.RoomOptions(audio_input=False, audio_output=False, text_input=True, text_output=True)
#: By voice (HANDOFF_VOICE=1): the caller speaks, the agents hear (VAD + STT) and speak (TTS).
VOICE = os.environ.get("HANDOFF_VOICE") == "1"
VOICE_IO = room_io.RoomOptions(audio_input=True, audio_output=True, text_input=True, text_output=True)
#: What the caller says by voice (the offline recogniser's grammar: dictionary words only).
VOICE_PHRASES = (
    "hello", "my account is seven", "i have a question about my bill", "are you there",
    "why was i charged twice", "please refund it", "back to triage please", "transfer me to nobody",
)
ROOM_OPTIONS = VOICE_IO if VOICE else TEXT_ONLY
_NUMBERS = {w: str(i) for i, w in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])}


def spoken_numbers(text: str) -> str:
    """"my account is seven" -> "my account is 7" (a recogniser writes numbers as words)."""
    return " ".join(_NUMBERS.get(word, word) for word in text.split())


_voice_stack: dict[str, Any] = {}


def voice_stack() -> None:
    """Load the voice pipeline's models before the worker registers (the prewarm): a job never
    waits for an import or a model. Also the ledger's own imports a job's first LedgerLink needs."""
    import nats.js.api  # noqa: F401, PLC0415 - loaded now, not on a job's event loop

    import room_ledger.embedded  # noqa: F401, PLC0415 - loaded now, not on a job's event loop

    if not VOICE or _voice_stack:
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from examples.voice.offline import load_vad, offline_stt  # noqa: PLC0415 - voice mode only

    vad = load_vad()
    _voice_stack.update(vad=vad, stt=offline_stt(VOICE_PHRASES, vad=vad))


def session_io(voice: Any = None) -> dict[str, Any]:
    """The ``AgentSession`` keyword arguments of the mode: none by text; VAD, STT, TTS by voice
    (the offline stack here; a real provider's plugins go in the same three places)."""
    if not VOICE:
        return {}
    voice_stack()
    from examples.voice.offline import EspeakTTS  # noqa: PLC0415 - voice mode only

    return {"vad": _voice_stack["vad"], "stt": _voice_stack["stt"],
            "tts": EspeakTTS(voice) if voice is not None else EspeakTTS()}

TRIAGE = os.environ.get("HANDOFF_TRIAGE_AGENT", "triage")
BILLING = os.environ.get("HANDOFF_BILLING_AGENT", "billing")
#: Seconds the target has to take the floor before a handoff fails and triage keeps the caller.
HANDOFF_TIMEOUT_S = float(os.environ.get("HANDOFF_TIMEOUT_S", "10"))
#: Seconds of waiting before the caller hears "I'm still connecting you" (the product's default: 4).
HANDOFF_PROGRESS_S = float(os.environ.get("HANDOFF_PROGRESS_S", "4"))


# --- the shared session state: ~120 fields, as in seed 001 ---------------------------------------


@dataclass
class CallBase:
    caller: str = ""
    account_id: str = ""
    verified: bool = False
    tier: str = ""
    balance_cents: int = 0
    steps: list[str] | None = None
    facility: dict[str, Any] | None = None
    language: str = "en"
    #: A runtime object (an API client, a closure): never published, never handed over.
    api_client: Any = None


#: 112 workflow fields more, 120 JSON fields in all (the api_client is skipped).
CallData: type[CallBase] = make_dataclass(
    "CallData", [(f"field_{i:03d}", str, "") for i in range(1, 113)], bases=(CallBase,))


def fill_account(data: CallBase, account_id: str) -> None:
    """What a real account lookup would fill in: every one of the 120 fields."""
    data.caller = "Ana"
    data.account_id = account_id
    data.verified = True
    data.tier = "gold"
    data.balance_cents = 12_345
    data.steps = ["identified", "verified"]
    data.facility = {"id": 42, "city": "Lisbon"}
    data.language = "pt"
    for i in range(1, 113):
        setattr(data, f"field_{i:03d}", f"value {i} of account {account_id}")
    data.api_client = lambda: None  # not JSON: left out of the published session


# --- the scripted LLM ---------------------------------------------------------------------------


@dataclass
class Say:
    text: str


@dataclass
class Call:
    name: str
    arguments: dict[str, Any]


Step = Say | Call
Script = Callable[[llm.ChatContext], Step]


class ScriptedLLM(llm.LLM[Never]):
    """A ``livekit.agents.llm.LLM`` that answers from a script: no network, same streaming path."""

    def __init__(self, agent: str, script: Script) -> None:
        super().__init__()
        self.agent = agent
        self.script = script
        self.requests = 0
        trace = os.environ.get("HANDOFF_TRACE")
        self.trace = Path(trace) / f"{agent}.jsonl" if trace else None
        #: Seconds before each answer starts: a real LLM's time to first token.
        self.delay_s = float(os.environ.get("HANDOFF_LLM_DELAY_S", "0") or 0)

    @property
    def model(self) -> str:
        return "scripted"

    def chat(self, *, chat_ctx: llm.ChatContext, tools: list[llm.Tool] | None = None,
             conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
             parallel_tool_calls: NotGivenOr[bool] = NOT_GIVEN,
             tool_choice: NotGivenOr[llm.ToolChoice] = NOT_GIVEN,
             extra_kwargs: NotGivenOr[dict[str, Any]] = NOT_GIVEN) -> llm.LLMStream:
        self.requests += 1
        if self.trace is not None:
            entry = {"agent": self.agent, "request": self.requests,
                     "items": chat_ctx.to_dict(exclude_timestamp=False)["items"],
                     "tools": [t.info.name for t in tools or [] if hasattr(t, "info")]}
            with self.trace.open("a") as out:
                out.write(json.dumps(entry) + "\n")
        return _ScriptedStream(self, chat_ctx=chat_ctx, tools=tools or [], conn_options=conn_options)


class _ScriptedStream(llm.LLMStream):
    async def _run(self) -> None:
        assert isinstance(self._llm, ScriptedLLM)
        if self._llm.delay_s:
            await asyncio.sleep(self._llm.delay_s)  # the model "thinking"
        step = self._llm.script(self._chat_ctx)
        chunk_id = f"scripted_{uuid.uuid4().hex[:8]}"
        if isinstance(step, Say):
            delta = llm.ChoiceDelta(role="assistant", content=step.text)
        else:
            delta = llm.ChoiceDelta(role="assistant", tool_calls=[llm.FunctionToolCall(
                name=step.name, arguments=json.dumps(step.arguments), call_id=f"call_{uuid.uuid4().hex[:10]}")])
        self._event_ch.send_nowait(llm.ChatChunk(id=chunk_id, delta=delta))


def last_item(chat_ctx: llm.ChatContext) -> Any:
    """The newest item that is not instructions (what the script answers)."""
    for item in reversed(chat_ctx.items):
        if item.type == "message" and item.role in ("system", "developer"):
            continue
        if item.type == "agent_config_update":
            continue
        return item
    return None


def text_of(item: Any) -> str:
    return " ".join(c for c in item.content if isinstance(c, str)) if item is not None and item.type == "message" \
        else ""


# --- running a worker ---------------------------------------------------------------------------


def serve(agent_name: str, entrypoint: Callable[[JobContext], Awaitable[None]]) -> None:
    """Register an AgentServer under ``agent_name`` (LIVEKIT_URL/_API_KEY/_API_SECRET) until SIGTERM."""
    voice_stack()
    logging.basicConfig(level=os.environ.get("HANDOFF_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("ledger").setLevel(os.environ.get("HANDOFF_LEDGER_LOG_LEVEL", "INFO"))
    # HANDOFF_EXECUTOR=thread (the default here): jobs run in this process, so the worker *is* the
    # agent's process, warm once registered. =process: LiveKit's default for production, each job
    # in a child process, one kept idle and warm.
    in_processes = os.environ.get("HANDOFF_EXECUTOR", "thread") == "process"
    server = AgentServer(
        job_executor_type=JobExecutorType.PROCESS if in_processes else JobExecutorType.THREAD,
        num_idle_processes=1 if in_processes else 0, port=0,
        # Load counts jobs, not the host's CPU: a busy host would refuse dispatches otherwise,
        # and LiveKit does not offer a refused job again.
        load_fnc=lambda server: min(len(server.active_jobs) / 50, 1.0), load_threshold=1.0,
    )
    server.rtc_session(entrypoint, agent_name=agent_name)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        run = asyncio.create_task(server.run(devmode=False))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({run, stopped}, return_when=asyncio.FIRST_COMPLETED)
        with contextlib.suppress(Exception):
            await server.aclose()
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await run
        if run.done() and not run.cancelled() and run.exception() is not None and not stop.is_set():
            raise SystemExit(f"{agent_name}: the worker stopped: {run.exception()}")

    asyncio.run(main())
