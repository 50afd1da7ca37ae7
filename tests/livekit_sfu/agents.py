"""LiveKit's agent protocol for the loopback SFU: worker registration and explicit dispatch.

What a ``livekit-agents`` worker (``AgentServer``, 1.8.x) needs to register, be offered a job
for an explicit dispatch, and join the room.  Modelled on livekit/livekit ``pkg/agent/worker.go``
(``HandleRegister``, ``AssignJob``, ``TerminateJob``) and ``pkg/rtc/room.go`` (dispatches), and
on the client side of ``livekit/agents/worker.py``:

* the worker opens ``GET /agent`` (WebSocket, ``Authorization: Bearer <jwt with agent grant>``)
  and sends ``WorkerMessage.register``; the first answer is ``ServerMessage.register``
  (``worker_id`` ``AW_…``, server info);
* a dispatch (``CreateDispatch``, or ``CreateRoom`` with ``agents``) makes one ``JT_ROOM`` job
  (``AJ_…``) per dispatch: the server offers it to an available worker registered under the
  dispatch's agent name (and deployment) with ``AvailabilityRequest``; the worker answers
  ``AvailabilityResponse`` (its participant identity, name, metadata, attributes); the server
  then sends ``JobAssignment`` with a room token built from the worker's *registered*
  permissions (``kind=agent``, attribute ``lk.agent_name``) and an empty ``url`` (the worker
  uses its own);
* the worker reports ``UpdateJobStatus`` and ``UpdateWorkerStatus`` (load, available/full);
  ``WorkerPing`` is answered with ``WorkerPong``;
* deleting a dispatch (or its room) sends ``JobTermination`` for its jobs and removes the job's
  participant if it has not left within 3 s.

Not implemented: ``JT_PUBLISHER``/``JT_PARTICIPANT`` jobs, dispatches in tokens' room
configuration, job migration/resume, ``SimulateJob``, namespaces, restart policies.  A
dispatch that no worker accepts is offered again when a matching worker registers or reports
itself available (LiveKit itself gives up after its retries; leniency for test start-up order).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import WSMsgType, web
from livekit import api
from livekit.protocol import agent, agent_dispatch, models

if TYPE_CHECKING:
    from .server import LoopbackSFU, Room

log = logging.getLogger("tests.livekit_sfu.agents")

#: Attribute LiveKit sets on a job's participant: the agent name it was dispatched by.
AGENT_NAME_ATTRIBUTE = "lk.agent_name"
#: How long a worker has to answer an availability request (LiveKit: ``AssignJobTimeout``).
AVAILABILITY_TIMEOUT = 10.0
#: How long a terminated job's participant may stay before it is removed.
LEAVE_TIMEOUT = 3.0


def _id(prefix: str) -> str:
    from .server import _sid

    return _sid(prefix)


@dataclass(eq=False)
class Worker:
    """One registered worker connection."""

    id: str
    agent_name: str
    deployment: str
    job_type: agent.JobType.ValueType
    permissions: models.ParticipantPermission
    version: str
    outbox: asyncio.Queue[agent.ServerMessage | None] = field(default_factory=asyncio.Queue)
    status: agent.WorkerStatus.ValueType = agent.WS_AVAILABLE
    load: float = 0.0
    jobs: dict[str, agent.Job] = field(default_factory=dict)
    answers: dict[str, asyncio.Future[agent.AvailabilityResponse]] = field(default_factory=dict)
    closed: bool = False

    def send(self, msg: agent.ServerMessage) -> None:
        if not self.closed:
            self.outbox.put_nowait(msg)


@dataclass(eq=False)
class Dispatch:
    """An explicit dispatch of an agent into a room, with the jobs it launched."""

    proto: agent_dispatch.AgentDispatch
    launching: bool = False

    @property
    def jobs(self) -> list[agent.Job]:
        return list(self.proto.state.jobs)


class AgentService:
    """Workers, dispatches and jobs; every method runs on the SFU's loop."""

    def __init__(self, sfu: LoopbackSFU) -> None:
        self.sfu = sfu
        self.workers: dict[str, Worker] = {}
        #: room name -> dispatch id -> dispatch
        self.dispatches: dict[str, dict[str, Dispatch]] = {}

    # ---- queries (for tests, via LoopbackSFU.wait_until) -------------------------------------

    def registered(self, agent_name: str) -> list[Worker]:
        """The open workers registered under ``agent_name``."""
        return [w for w in self.workers.values() if w.agent_name == agent_name and not w.closed]

    def jobs(self, room: str) -> list[agent.Job]:
        return [job for d in self.dispatches.get(room, {}).values() for job in d.jobs]

    # ---- the worker WebSocket ----------------------------------------------------------------

    async def handle_worker(self, request: web.Request) -> web.StreamResponse:
        claims = self.sfu._claims(request)
        if claims is None or claims.video is None or not claims.video.agent:
            return web.Response(status=401, text="invalid token: needs the agent grant")
        ws = web.WebSocketResponse(heartbeat=None, max_msg_size=0)
        await ws.prepare(request)

        first = await ws.receive()
        if first.type != WSMsgType.BINARY:
            await ws.close()
            return ws
        msg = agent.WorkerMessage.FromString(first.data)
        if not msg.HasField("register"):
            await ws.close(message=b"expected register")
            return ws
        reg = msg.register
        permissions = models.ParticipantPermission()
        if reg.HasField("allowed_permissions"):
            permissions.CopyFrom(reg.allowed_permissions)
        else:  # LiveKit's default for a worker that names none
            permissions = models.ParticipantPermission(
                can_subscribe=True, can_publish=True, can_publish_data=True, can_update_metadata=True)
        worker = Worker(id=_id("AW_"), agent_name=reg.agent_name, deployment=reg.deployment,
                        job_type=reg.type, permissions=permissions, version=reg.version)
        await ws.send_bytes(agent.ServerMessage(register=agent.RegisterWorkerResponse(
            worker_id=worker.id, server_info=self.sfu.server_info())).SerializeToString())
        self.workers[worker.id] = worker
        log.info("worker %s registered as %r", worker.id, worker.agent_name)
        self.sfu._notify()
        writer = asyncio.ensure_future(self._write(worker, ws))
        self._retry_pending(worker)
        try:
            async for frame in ws:
                if frame.type == WSMsgType.BINARY:
                    self._on_message(worker, agent.WorkerMessage.FromString(frame.data))
        except Exception:
            log.exception("worker %s failed", worker.id)
        finally:
            worker.closed = True
            worker.outbox.put_nowait(None)
            await writer
            for answer in worker.answers.values():
                answer.cancel()
            del self.workers[worker.id]
            log.info("worker %s gone", worker.id)
            self.sfu._notify()
        return ws

    async def _write(self, worker: Worker, ws: web.WebSocketResponse) -> None:
        while (msg := await worker.outbox.get()) is not None:
            try:
                await ws.send_bytes(msg.SerializeToString())
            except Exception:
                return

    def _on_message(self, worker: Worker, msg: agent.WorkerMessage) -> None:
        which = msg.WhichOneof("message")
        if which == "availability":
            answer = worker.answers.pop(msg.availability.job_id, None)
            if answer is not None and not answer.done():
                answer.set_result(msg.availability)
        elif which == "update_job":
            self._update_job(worker, msg.update_job)
        elif which == "update_worker":
            worker.load = msg.update_worker.load
            worker.status = msg.update_worker.status
            if worker.status == agent.WS_AVAILABLE:
                self._retry_pending(worker)
        elif which == "ping":
            worker.send(agent.ServerMessage(pong=agent.WorkerPong(
                last_timestamp=msg.ping.timestamp, timestamp=int(time.time() * 1000))))
        else:  # migrate_job, simulate_job: not implemented
            log.debug("ignoring %s from worker %s", which, worker.id)
        self.sfu._notify()

    def _update_job(self, worker: Worker, update: agent.UpdateJobStatus) -> None:
        job = worker.jobs.get(update.job_id)
        if job is None:
            return
        now = time.time_ns()
        job.state.status = update.status
        job.state.error = update.error
        job.state.updated_at = now
        if update.status in (agent.JS_SUCCESS, agent.JS_FAILED):
            job.state.ended_at = now
            del worker.jobs[update.job_id]
        self._store_job(job)

    def _store_job(self, job: agent.Job) -> None:
        """Copy a job's state into its dispatch (``ListDispatch`` shows it)."""
        dispatch = self.dispatches.get(job.room.name, {}).get(job.dispatch_id)
        if dispatch is None:
            return
        for stored in dispatch.proto.state.jobs:
            if stored.id == job.id:
                stored.CopyFrom(job)
                return
        dispatch.proto.state.jobs.append(job)

    # ---- dispatches --------------------------------------------------------------------------

    def create_dispatch(self, req: agent_dispatch.CreateAgentDispatchRequest) -> agent_dispatch.AgentDispatch:
        self.sfu._room(req.room)  # dispatching into a room creates it, as LiveKit's auto-create
        proto = agent_dispatch.AgentDispatch(
            id=_id("AD_"), agent_name=req.agent_name, room=req.room, metadata=req.metadata,
            deployment=req.deployment, attributes=req.attributes,
            state=agent_dispatch.AgentDispatchState(created_at=time.time_ns()))
        dispatch = Dispatch(proto)
        self.dispatches.setdefault(req.room, {})[proto.id] = dispatch
        self.sfu._spawn(self._launch(dispatch))
        self.sfu._notify()
        return proto

    def list_dispatch(self, req: agent_dispatch.ListAgentDispatchRequest) -> list[agent_dispatch.AgentDispatch]:
        found = self.dispatches.get(req.room, {})
        return [d.proto for d in found.values() if not req.dispatch_id or d.proto.id == req.dispatch_id]

    def delete_dispatch(self, req: agent_dispatch.DeleteAgentDispatchRequest) -> agent_dispatch.AgentDispatch | None:
        dispatch = self.dispatches.get(req.room, {}).pop(req.dispatch_id, None)
        if dispatch is None:
            return None
        dispatch.proto.state.deleted_at = time.time_ns()
        for job in dispatch.jobs:
            self.sfu._spawn(self._terminate(job))
        self.sfu._notify()
        return dispatch.proto

    def room_deleted(self, room: str) -> None:
        """The room is gone: its jobs are terminated and its dispatches forgotten."""
        for dispatch in self.dispatches.pop(room, {}).values():
            for job in dispatch.jobs:
                self.sfu._spawn(self._terminate(job, remove=False))

    async def _launch(self, dispatch: Dispatch) -> None:
        """Offer one job for ``dispatch`` to the matching workers, least loaded first."""
        if dispatch.launching or dispatch.jobs:
            return
        dispatch.launching = True
        try:
            room = self.sfu.rooms.get(dispatch.proto.room)
            if room is None or dispatch.proto.id not in self.dispatches.get(room.name, {}):
                return
            job = agent.Job(
                id=_id("AJ_"), dispatch_id=dispatch.proto.id, type=agent.JT_ROOM, room=room.info(),
                metadata=dispatch.proto.metadata, agent_name=dispatch.proto.agent_name,
                deployment=dispatch.proto.deployment, attributes=dispatch.proto.attributes)
            for worker in self._candidates(dispatch):
                if await self._assign(worker, job, room):
                    return
            log.info("no worker took dispatch %s (%r) yet", dispatch.proto.id, dispatch.proto.agent_name)
        finally:
            dispatch.launching = False
            self.sfu._notify()

    def _candidates(self, dispatch: Dispatch) -> list[Worker]:
        return sorted(
            (w for w in self.workers.values()
             if not w.closed and w.status == agent.WS_AVAILABLE and w.job_type == agent.JT_ROOM
             and w.agent_name == dispatch.proto.agent_name and w.deployment == dispatch.proto.deployment),
            key=lambda w: (w.load, len(w.jobs)))

    def _retry_pending(self, worker: Worker) -> None:
        for by_id in self.dispatches.values():
            for dispatch in by_id.values():
                if (not dispatch.jobs and not dispatch.launching and worker.agent_name == dispatch.proto.agent_name
                        and worker.deployment == dispatch.proto.deployment):
                    self.sfu._spawn(self._launch(dispatch))

    async def _assign(self, worker: Worker, job: agent.Job, room: Room) -> bool:
        now = time.time_ns()
        job.state.CopyFrom(agent.JobState(status=agent.JS_RUNNING, worker_id=worker.id,
                                          started_at=now, updated_at=now))
        answer: asyncio.Future[agent.AvailabilityResponse] = asyncio.get_running_loop().create_future()
        worker.answers[job.id] = answer
        worker.send(agent.ServerMessage(availability=agent.AvailabilityRequest(job=job)))
        try:
            res = await asyncio.wait_for(answer, AVAILABILITY_TIMEOUT)
        except (TimeoutError, asyncio.CancelledError):
            worker.answers.pop(job.id, None)
            return False
        if res.terminate:
            job.state.status = agent.JS_SUCCESS
            job.state.ended_at = time.time_ns()
            self._store_job(job)
            return True
        if not res.available or worker.closed:
            return False
        job.state.participant_identity = res.participant_identity
        attributes = dict(res.participant_attributes)
        attributes[AGENT_NAME_ATTRIBUTE] = worker.agent_name
        token = self.job_token(worker, room.name, res, attributes)
        worker.jobs[job.id] = job
        self._store_job(job)
        worker.send(agent.ServerMessage(assignment=agent.JobAssignment(job=job, token=token)))
        log.info("job %s for room %r assigned to worker %s", job.id, room.name, worker.id)
        return True

    def job_token(self, worker: Worker, room: str, res: agent.AvailabilityResponse,
                  attributes: dict[str, str]) -> str:
        """The job's room token: the worker's registered permissions (``BuildAgentToken``)."""
        p = worker.permissions
        grants = api.VideoGrants(
            room_join=True, room=room, can_publish=p.can_publish, can_subscribe=p.can_subscribe,
            can_publish_data=p.can_publish_data, can_update_own_metadata=p.can_update_metadata,
            hidden=p.hidden, agent=True,
            can_publish_sources=[models.TrackSource.Name(s).lower() for s in p.can_publish_sources] or None)
        token = (api.AccessToken(self.sfu.api_key, self.sfu.api_secret)
                 .with_identity(res.participant_identity).with_kind("agent").with_grants(grants)
                 .with_attributes(attributes).with_ttl(datetime.timedelta(hours=6)))
        if res.participant_name:
            token = token.with_name(res.participant_name)
        if res.participant_metadata:
            token = token.with_metadata(res.participant_metadata)
        return token.to_jwt()

    async def _terminate(self, job: agent.Job, *, remove: bool = True) -> None:
        """Tell the job's worker to end it; remove its participant if it has not left in time."""
        worker = self.workers.get(job.state.worker_id)
        if worker is not None and job.id in worker.jobs:
            worker.send(agent.ServerMessage(termination=agent.JobTermination(job_id=job.id)))
        identity = job.state.participant_identity
        if not remove or not identity:
            return

        def still_there() -> bool:
            room = self.sfu.rooms.get(job.room.name)
            return room is not None and identity in room.participants

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LEAVE_TIMEOUT):
                while still_there():
                    await self.sfu._changed.wait()
        if still_there():
            await self.sfu._remove_participant(job.room.name, identity, models.PARTICIPANT_REMOVED)
