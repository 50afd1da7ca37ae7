"""Run a command inside a private network namespace where libwebrtc can talk to livekit-server.

libwebrtc ignores loopback adapters when it gathers ICE candidates, so a client on ``lo`` alone
has no candidate at all.  The namespace gets ``lo`` up plus a veth pair carrying
``127.0.0.2/32``: libwebrtc gathers on the veth, livekit-server (``rtc.node_ip``) answers on the same
address, and every packet stays inside 127.0.0.0/8 of a namespace nothing else can reach.  Servers that other
fixtures start on 127.0.0.1 (NATS, Postgres) live in the same namespace, since the whole pytest
process runs there.

Needs ``unshare`` and ``ip`` (util-linux, iproute2) and either root or unprivileged user
namespaces.  :func:`probe` says which ``unshare`` invocation works here, or why none does.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

#: Set to ``1`` in the environment of a process running inside the namespace.  Setting it
#: yourself means "this process's network already suits libwebrtc: do not re-exec".
INSIDE_ENV = "LIVEKIT_TESTS_NETNS"
#: Address of the veth end libwebrtc gathers its host candidate on.
VETH_ADDRESS = "127.0.0.2/32"

_SETUP = (
    "{ip} link set lo up"
    " && {ip} link add lk0 type veth peer name lk1"
    " && {ip} addr add {addr} dev lk0"
    " && {ip} link set lk0 up && {ip} link set lk1 up"
)


def inside() -> bool:
    """True in a process started by :func:`command` (or told so by the user)."""
    return os.environ.get(INSIDE_ENV) == "1"


def _setup_script() -> str | None:
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    ip = shutil.which("ip", path=search)
    return _SETUP.format(ip=ip, addr=VETH_ADDRESS) if ip else None


def _candidates() -> list[list[str]]:
    user_ns = [
        # Keeps our uid (Postgres refuses to run as root) and, with --keep-caps, CAP_NET_ADMIN.
        ["unshare", "--user", "--map-current-user", "--keep-caps", "--net"],
        ["unshare", "--user", "--map-root-user", "--net"],
    ]
    return ([["unshare", "--net"]] if os.geteuid() == 0 else []) + user_ns


@functools.cache
def probe() -> tuple[list[str] | None, str]:
    """``(unshare prefix, "")`` if a namespace can be set up here, else ``(None, reason)``."""
    script = _setup_script()
    if shutil.which("unshare") is None:
        return None, "`unshare` (util-linux) is not installed"
    if script is None:
        return None, "`ip` (iproute2) is not installed: apt-get install -y iproute2"
    errors = []
    for prefix in _candidates():
        try:
            done = subprocess.run(
                [*prefix, "sh", "-c", script], capture_output=True, text=True, timeout=20, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            errors.append(f"{' '.join(prefix)}: {exc}")
            continue
        if done.returncode == 0:
            return prefix, ""
        lines = (done.stderr or done.stdout).strip().splitlines()
        errors.append(f"{' '.join(prefix)}: {lines[-1] if lines else f'exit {done.returncode}'}")
    return None, "no network namespace available (needs root or user namespaces): " + "; ".join(errors)


def command(argv: list[str]) -> list[str]:
    """``argv`` wrapped to run inside a fresh namespace; raises if :func:`probe` failed."""
    prefix, reason = probe()
    script = _setup_script()
    if prefix is None or script is None:
        raise RuntimeError(reason)
    return [*prefix, "sh", "-c", script + ' && exec "$@"', "livekit-netns", *argv]
