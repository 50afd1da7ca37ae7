"""A room's conversation as a LiveKit Agents ``llm.ChatContext``: the one mapping.

Hydration (``Snapshot.chat_ctx()``: the room as any agent resumes it), the handoff (which
resumes from a snapshot) and ``ledger export`` (one side of an agent-to-agent conversation) all
go through :func:`chat_items`:

- **the room's view** (``perspective=None``): user messages -> ``user``, the agents' speech ->
  ``assistant`` (speaker in ``extra["speaker"]``), every function call, output and handoff;
- **one agent's view** (``perspective="agent-id"``): that agent's speech -> ``assistant``, every
  other speaker's -> ``user``; only its own function calls and outputs (``owners``: item id ->
  the identity whose session published it), and handoffs to it. The other agents' hearings of
  its speech (user messages in their feeds) repeat what its own items hold and are left out.

System and developer messages and agent config updates (instructions) are left out of both;
timestamps are kept in ``created_at``, and the items are in the sessions' own time order, as a
``ChatContext`` is kept (:func:`in_time_order`).

A function call with no output (its tool was still running when the log was read, or its
process died before the tool returned) is mapped as it is: LiveKit Agents leaves such a call
out of what it sends the LLM. A resumed agent that must not lose it asks for
``close_open_calls=INTERRUPTED_OUTPUT``: each open call in view then gets a synthetic
``function_call_output`` right after it, marked as an error, with that text and the id
``interrupted:<call id>`` (the call itself gets ``extra["interrupted"]``), so the LLM sees that
the call was made and that its outcome is unknown: it neither repeats it blindly nor believes it
ran.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, TypeVar

if TYPE_CHECKING:
    from livekit.agents.llm import ChatContext

    from room_ledger.state import ConversationItem, RoomState


#: The output a resumed agent's LLM sees for a call whose tool never returned (``close_open_calls``).
INTERRUPTED_OUTPUT: Final = "interrupted: outcome unknown"
#: The id prefix of such a synthetic output (then the call id).
INTERRUPTED_OUTPUT_ID_PREFIX: Final = "interrupted:"


class SnapshotLike(Protocol):
    """What the mapping reads of a ``room_ledger.hydrate.Snapshot`` (a protocol: the hydration imports
    this module, not the other way round)."""

    @property
    def conversation(self) -> list[ConversationItem]: ...

    @property
    def state(self) -> RoomState: ...

    @property
    def full_conversation(self) -> bool: ...


class _Stamped(Protocol):
    @property
    def created_at(self) -> float: ...


ChatItemT = TypeVar("ChatItemT", bound=_Stamped)


def in_time_order(items: list[ChatItemT]) -> list[ChatItemT]:
    """Chat items sorted by ``created_at`` (stable: equal times keep log order).

    A ``ChatContext`` is kept in that order by LiveKit Agents (``insert``, ``merge`` and
    ``find_insertion_index`` assume it). The log's order is the order packets reached the bridge,
    and different participants' packets race through the SFU: an agent's feed item can reach the
    log after a chat message the caller typed once it had seen that reply.
    """
    return sorted(items, key=lambda item: item.created_at)


def chat_items(conversation: Iterable[ConversationItem], *, perspective: str | None = None,
               owners: Mapping[str, str] | None = None, close_open_calls: str | None = None) -> list[Any]:
    """The conversation's items as ``llm`` chat items, in time order (see the module docstring).

    ``close_open_calls``: the text of the synthetic output each function call in view without
    one gets (``INTERRUPTED_OUTPUT``); None maps the calls as they are.
    """
    from livekit.agents import llm  # noqa: PLC0415 - livekit-agents: optional and heavy, loaded by those who map

    owners = owners or {}
    items: list[Any] = []
    for item in conversation:
        created_at = item.created_at if item.created_at is not None else item.time.timestamp()
        if item.type == "message":
            role: Literal["user", "assistant"]
            if perspective is not None:
                if item.role != "assistant" or not item.speaker:
                    continue  # a hearing of an agent's speech, which that agent's own item holds
                role = "assistant" if item.speaker == perspective else "user"
            elif item.role in ("user", "assistant"):
                role = "user" if item.role == "user" else "assistant"
            else:
                continue
            extra: dict[str, Any] = {"ledger_seq": item.seq}
            if item.speaker:
                extra["speaker"] = item.speaker
            items.append(llm.ChatMessage(id=item.item_id, role=role, content=[item.text],
                                         interrupted=item.interrupted, created_at=created_at, extra=extra))
            continue
        owner = item.speaker or owners.get(item.item_id)
        mine = perspective is None or owner == perspective
        if item.type == "function_call" and mine:
            items.append(llm.FunctionCall(id=item.item_id, call_id=item.call_id or item.item_id, name=item.name or "",
                                          arguments=item.arguments or "", created_at=created_at,
                                          extra={"ledger_seq": item.seq}))
        elif item.type == "function_call_output" and mine:
            items.append(llm.FunctionCallOutput(id=item.item_id, call_id=item.call_id or "", name=item.name or "",
                                                output=item.output if item.output is not None else item.text,
                                                is_error=item.is_error, created_at=created_at))
        elif item.type == "agent_handoff" and item.new_agent_id and (
                perspective is None or owner in (None, perspective)):
            items.append(llm.AgentHandoff(id=item.item_id, old_agent_id=item.old_agent_id,
                                          new_agent_id=item.new_agent_id, created_at=created_at))
    if close_open_calls is not None:
        items.extend(_close_open_calls(items, close_open_calls))
    return in_time_order(items)


def _close_open_calls(items: list[Any], text: str) -> list[Any]:
    """A synthetic output, marked interrupted, for each function call among ``items`` with none."""
    from livekit.agents import llm  # noqa: PLC0415 - livekit-agents: optional and heavy, loaded by those who map

    answered = {item.call_id for item in items if isinstance(item, llm.FunctionCallOutput)}
    closing: list[Any] = []
    for call in items:
        if not isinstance(call, llm.FunctionCall) or call.call_id in answered:
            continue
        answered.add(call.call_id)
        call.extra["interrupted"] = True
        # Just after its call: an output is read as the answer to the call before it.
        closing.append(llm.FunctionCallOutput(
            id=f"{INTERRUPTED_OUTPUT_ID_PREFIX}{call.call_id}", call_id=call.call_id, name=call.name,
            output=text, is_error=True, created_at=call.created_at + 1e-6))
    return closing


def snapshot_chat_ctx(snapshot: SnapshotLike, *, close_open_calls: str | None = None) -> ChatContext:
    """A snapshot's conversation as a LiveKit Agents ``llm.ChatContext`` (``Snapshot.chat_ctx()``).

    User messages -> ``user``; the agents' speech -> ``assistant`` (speaker in
    ``extra["speaker"]``); function calls, their outputs and agent handoffs kept; system and
    developer messages and agent config updates (instructions) left out; timestamps kept in
    ``created_at``. When the snapshot starts at a summary, the summary comes first as an
    assistant message marked ``extra["is_summary"]`` (as LiveKit's own summarization does).
    ``close_open_calls``: see :func:`chat_items` (None, the default: calls mapped as they are).
    """
    from livekit.agents import llm  # noqa: PLC0415 - livekit-agents: optional and heavy, loaded by those who map

    items = chat_items(snapshot.conversation, close_open_calls=close_open_calls)
    summary = snapshot.state.summary
    if summary is not None and not snapshot.full_conversation:
        # Just before the first item it did not cover, as LiveKit's own summarization stamps it.
        created_at = items[0].created_at - 1e-6 if items else summary.time.timestamp()
        items.insert(0, llm.ChatMessage(
            id=f"summary_{summary.seq}",
            role="assistant",
            content=[f"<chat_history_summary>\n{summary.text}\n</chat_history_summary>"],
            created_at=created_at,
            extra={"is_summary": True, "covers_seq": summary.covers_seq, "ledger_seq": summary.seq},
        ))
    return llm.ChatContext(items)


__all__ = ["INTERRUPTED_OUTPUT", "INTERRUPTED_OUTPUT_ID_PREFIX", "SnapshotLike", "chat_items", "in_time_order",
           "snapshot_chat_ctx"]
