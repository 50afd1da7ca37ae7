"""Loss and delay on one UDP port of ``lo``, for fault tests in the test network namespace.

livekit-server's WebRTC traffic to and from clients in the namespace runs over ``lo`` (client and
server both sit on 127.0.0.2), all of it through the server's single UDP port
(``rtc.udp_port``). Impairing that port only leaves NATS, Postgres and the signal connection
alone.

Two ways, the first this kernel offers:

* ``tc netem`` under a ``prio`` qdisc, u32 filters on the port as source and as destination;
* where the kernel has no netem (some VM kernels build neither ``sch_netem`` nor ``sch_prio``):
  iptables (legacy) sends the port's packets to an NFQUEUE, and a thread here holds each for the
  delay and drops the given share, speaking nfnetlink_queue over a netlink socket itself.

Either way :class:`Impairment` says how many packets it saw, dropped and delayed, so a test can
check the impairment really applied.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import random
import select
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

_SEARCH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


@dataclass
class Impairment:
    method: str
    port: int
    loss: float
    delay_s: float
    seen: int = 0
    dropped: int = 0
    #: per direction: packets to the port, packets from it
    to_port: int = 0
    from_port: int = 0
    notes: list[str] = field(default_factory=list)


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=20)


def why_not() -> str:
    """Why no impairment can be set up here, or ``""``."""
    if os.environ.get("LIVEKIT_TESTS_NETNS") != "1":
        return "impairing lo needs the private test network namespace"
    if _netem_works():
        return ""
    if shutil.which("iptables-legacy", path=_SEARCH) is None:
        return ("this kernel has no tc netem, and iptables-legacy (for the NFQUEUE fallback) is not "
                "installed: apt-get install -y iptables")
    return ""


def _netem_works() -> bool:
    tc = shutil.which("tc", path=_SEARCH)
    if tc is None:
        return False
    probe = "lkprobe0"
    if _run("ip", "link", "add", probe, "type", "dummy").returncode != 0:
        return False
    try:
        ok = _run(tc, "qdisc", "add", "dev", probe, "root", "handle", "1:", "prio").returncode == 0
        return ok and _run(tc, "qdisc", "add", "dev", probe, "parent", "1:3", "handle", "30:", "netem",
                           "delay", "1ms").returncode == 0
    finally:
        _run("ip", "link", "del", probe)


@contextlib.contextmanager
def impaired_udp_port(port: int, *, loss: float, delay_s: float) -> Iterator[Impairment]:
    """Drop ``loss`` of the packets to and from UDP ``port`` on ``lo`` and delay the rest."""
    if reason := why_not():
        raise RuntimeError(reason)
    if _netem_works():
        with _netem(port, loss, delay_s) as impairment:
            yield impairment
    else:
        with _nfqueue(port, loss, delay_s) as impairment:
            yield impairment


# --- tc netem ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _netem(port: int, loss: float, delay_s: float) -> Iterator[Impairment]:
    tc = shutil.which("tc", path=_SEARCH) or "tc"
    impairment = Impairment("tc netem", port, loss, delay_s)
    # Every priority to band 1 (no netem); only the filters below send packets to band 3.
    steps = [
        [tc, "qdisc", "add", "dev", "lo", "root", "handle", "1:", "prio", "bands", "3", "priomap",
         *["1"] * 16],
        [tc, "qdisc", "add", "dev", "lo", "parent", "1:3", "handle", "30:", "netem", "loss",
         f"{loss * 100:g}%", "delay", f"{delay_s * 1000:g}ms"],
        *([tc, "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1", "u32",
           "match", "ip", "protocol", "17", "0xff", "match", "ip", side, str(port), "0xffff", "flowid", "1:3"]
          for side in ("dport", "sport")),
    ]
    try:
        for argv in steps:
            done = _run(*argv)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
        yield impairment
    finally:
        stats = _run(tc, "-s", "qdisc", "show", "dev", "lo").stdout
        impairment.notes.append(stats)
        for line in stats.split("qdisc ")[1:]:
            if line.startswith("netem 30:"):
                sent = line.split(" Sent ", 1)[1].split()
                impairment.seen = int(sent[2])
                impairment.dropped = int(line.split("dropped ", 1)[1].split(",")[0])
                impairment.seen += impairment.dropped
        _run(tc, "qdisc", "del", "dev", "lo", "root")


# --- iptables NFQUEUE + a user-space delay line ------------------------------------------------

_NETLINK_NETFILTER = 12
_NFNL_SUBSYS_QUEUE = 3
_NFQNL_MSG_PACKET, _NFQNL_MSG_VERDICT, _NFQNL_MSG_CONFIG = 0, 1, 2
_NFQA_CFG_CMD, _NFQA_CFG_PARAMS = 1, 2
_NFQA_PACKET_HDR, _NFQA_VERDICT_HDR, _NFQA_PAYLOAD = 1, 2, 10
_NFQNL_CFG_CMD_BIND = 1
_NFQNL_COPY_PACKET = 2
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_NF_DROP, _NF_ACCEPT = 0, 1
_QUEUE = 7


def _attr(kind: int, payload: bytes) -> bytes:
    head = struct.pack("=HH", 4 + len(payload), kind)
    return head + payload + b"\0" * (-len(payload) % 4)


def _message(msg_type: int, queue: int, attrs: bytes, seq: int = 0) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attrs
    return struct.pack("=IHHII", 16 + len(body), (_NFNL_SUBSYS_QUEUE << 8) | msg_type, _NLM_F_REQUEST, seq, 0) + body


def _attrs(data: bytes) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        found[kind & 0x7FFF] = data[offset + 4:offset + length]
        offset += (length + 3) & ~3
    return found


class _DelayLine(threading.Thread):
    """Takes the queue's packets, drops some, gives the verdict on the rest after the delay."""

    def __init__(self, impairment: Impairment, seed: int = 12) -> None:
        super().__init__(daemon=True, name="nfqueue-delay-line")
        self.impairment = impairment
        self.rng = random.Random(seed)
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.stopping = threading.Event()
        self.error = ""
        self._send(_message(_NFQNL_MSG_CONFIG, _QUEUE, _attr(_NFQA_CFG_CMD, struct.pack("!BBH", _NFQNL_CFG_CMD_BIND, 0, 0))))
        # Copy 64 bytes of each packet: enough for its IP and UDP headers (the port: which way).
        self._send(_message(_NFQNL_MSG_CONFIG, _QUEUE, _attr(_NFQA_CFG_PARAMS, struct.pack("!IB", 64, _NFQNL_COPY_PACKET))))

    def _send(self, message: bytes) -> None:
        self.sock.sendto(message, (0, 0))

    def _verdict(self, packet_id: int, verdict: int) -> None:
        self._send(_message(_NFQNL_MSG_VERDICT, _QUEUE, _attr(_NFQA_VERDICT_HDR, struct.pack("!II", verdict, packet_id))))

    def run(self) -> None:
        due: list[tuple[float, int, int]] = []  # (when, order, packet id): FIFO, as a link is
        order = 0
        imp = self.impairment
        try:
            while not self.stopping.is_set():
                now = time.monotonic()
                while due and due[0][0] <= now:
                    self._verdict(heapq.heappop(due)[2], _NF_ACCEPT)
                wait = min(0.05, max(0.0, due[0][0] - now)) if due else 0.05
                readable, _, _ = select.select([self.sock], [], [], wait)
                if not readable:
                    continue
                data = self.sock.recv(1 << 16)
                offset = 0
                while offset + 16 <= len(data):
                    length, msg_type = struct.unpack_from("=IH", data, offset)
                    if length < 16:
                        break
                    if msg_type == _NLMSG_ERROR:
                        code = struct.unpack_from("=i", data, offset + 16)[0]
                        if code != 0:
                            self.error = f"netlink error {code}"
                    elif msg_type == (_NFNL_SUBSYS_QUEUE << 8) | _NFQNL_MSG_PACKET:
                        attrs = _attrs(data[offset + 20:offset + length])
                        packet_id = struct.unpack("!I", attrs[_NFQA_PACKET_HDR][:4])[0]
                        payload = attrs.get(_NFQA_PAYLOAD, b"")
                        if len(payload) >= 24:
                            ihl = (payload[0] & 0x0F) * 4
                            dport = struct.unpack_from("!H", payload, ihl + 2)[0]
                            if dport == imp.port:
                                imp.to_port += 1
                            else:
                                imp.from_port += 1
                        imp.seen += 1
                        if self.rng.random() < imp.loss:
                            imp.dropped += 1
                            self._verdict(packet_id, _NF_DROP)
                        else:
                            order += 1
                            heapq.heappush(due, (time.monotonic() + imp.delay_s, order, packet_id))
                    offset += (length + 3) & ~3
        except Exception as exc:  # surfaced by the context manager
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            for _, _, packet_id in due:
                with contextlib.suppress(OSError):
                    self._verdict(packet_id, _NF_ACCEPT)

    def close(self) -> None:
        self.stopping.set()
        self.join(5)
        self.sock.close()


@contextlib.contextmanager
def _nfqueue(port: int, loss: float, delay_s: float) -> Iterator[Impairment]:
    iptables = shutil.which("iptables-legacy", path=_SEARCH) or "iptables-legacy"
    impairment = Impairment("iptables NFQUEUE + delay line", port, loss, delay_s)
    line = _DelayLine(impairment)
    line.start()
    # Each packet over lo passes OUTPUT once: both directions are caught there.
    rules = [["OUTPUT", "-p", "udp", side, str(port), "-j", "NFQUEUE", "--queue-num", str(_QUEUE)]
             for side in ("--dport", "--sport")]
    added: list[list[str]] = []
    try:
        for rule in rules:
            done = _run(iptables, "-A", *rule)
            if done.returncode != 0:
                raise RuntimeError(f"iptables-legacy -A {' '.join(rule)}: {done.stderr.strip()}")
            added.append(rule)
        yield impairment
    finally:
        for rule in added:
            _run(iptables, "-D", *rule)
        line.close()
    if line.error:
        raise RuntimeError(f"the NFQUEUE delay line failed: {line.error}")
