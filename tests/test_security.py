"""Security, tested for real: NATS auth and TLS through Settings, bridge token claims, hostile room names.

- NATS with user/password, with an nkey, and with mutual TLS on certificates made here: a real
  nats-server per case (``tests.natscluster``), the Ledger configured only through ``Settings``;
  it appends and reads back. Wrong credentials or a certificate the server does not trust fail
  fast with a :class:`ConnectError` that says what was refused.
- Bridge tokens: hidden, subscribe and data only, no publish (``livekit.api.TokenVerifier``).
- Room names off the network (quotes, SQL metacharacters, subject wildcards, dots, Unicode) reach
  neither a subject nor a query unencoded: append -> projection -> hydrate returns them untouched,
  and the stored subject is one plain token.
"""

from __future__ import annotations

import datetime
import importlib.util
import ipaddress
import os
import time
import uuid
from pathlib import Path

import pytest

from room_ledger import events as ev
from room_ledger.client import Ledger
from room_ledger.errors import ConnectError
from room_ledger.hydrate import hydrate
from room_ledger.settings import Settings
from tests.natscluster import NatsServer, jetstream_block, single_server

# --- helpers -------------------------------------------------------------------------------


async def _append_and_read(settings: Settings) -> None:
    room = f"sec-{uuid.uuid4().hex[:10]}"
    events = [ev.make_event(room, ev.FloorRequest(agent_id=f"agent-{i}"), id=f"{room}-{i}") for i in range(20)]
    async with Ledger(settings, name="security-test") as ledger:
        positions = await ledger.append_many(events)
        assert [p.seq for p in positions] == list(range(positions[0].seq, positions[0].seq + 20))
        single = await ledger.append(ev.make_event(room, ev.FloorRelease(agent_id="agent-0"), id=f"{room}-x"))
        got = [r.event.id async for r in ledger.read(room)]
    assert got == [e.id for e in events] + [f"{room}-x"]
    assert single.seq == positions[-1].seq + 1


async def _refused(settings: Settings, *words: str) -> ConnectError:
    """Connecting fails quickly, with a ConnectError naming what was refused."""
    started = time.monotonic()
    with pytest.raises(ConnectError) as caught:
        async with Ledger(settings, name="security-test-refused"):
            pass
    elapsed = time.monotonic() - started
    message = str(caught.value).lower()
    assert any(w in message for w in words), f"unclear error: {caught.value}"
    assert elapsed < 5, f"a refusal is an answer, not an outage: took {elapsed:.1f}s to report {caught.value}"
    return caught.value


# --- user and password ---------------------------------------------------------------------

USER_PASSWORD_CONF = """
authorization {
  users = [
    { user: "ledger", password: "s3cret \\"quoted\\" pass" }
  ]
}
"""


async def test_user_password(tmp_path: Path) -> None:
    with single_server(tmp_path, USER_PASSWORD_CONF, name="userpass") as server:
        base = Settings(nats_urls=(server.url,), home=tmp_path, stream=f"SEC_{uuid.uuid4().hex[:8]}")
        ok = Settings.from_env(
            {"LEDGER_NATS_USER": "ledger", "LEDGER_NATS_PASSWORD": 's3cret "quoted" pass'},
            nats_urls=base.nats_urls, home=tmp_path, stream=base.stream,
        )
        await _append_and_read(ok)
        # The password never shows in what doctor prints.
        assert 's3cret "quoted" pass' not in repr(ok.describe())
        await _refused(base.replace(nats_user="ledger", nats_password="wrong"), "authoriz", "credential", "refused")
        await _refused(base, "authoriz", "credential", "refused")


# --- nkeys ---------------------------------------------------------------------------------


async def test_nkey_seed(tmp_path: Path) -> None:
    if importlib.util.find_spec("nkeys") is None:
        pytest.skip("the nkeys package is not installed (nats-py needs it to sign with an nkey seed)")
    import nkeys

    def new_user() -> tuple[bytes, str]:
        seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
        public = nkeys.from_seed(bytearray(seed)).public_key.decode()
        assert public.startswith("U")
        return seed, public

    seed, public = new_user()
    stranger_seed, _ = new_user()
    conf = f'authorization {{\n  users = [ {{ nkey: "{public}" }} ]\n}}\n'
    seed_file = tmp_path / "user.nk"
    seed_file.write_bytes(seed)
    seed_file.chmod(0o600)
    stranger_file = tmp_path / "stranger.nk"
    stranger_file.write_bytes(stranger_seed)
    with single_server(tmp_path, conf, name="nkeys") as server:
        ok = Settings.from_env(
            {"LEDGER_NATS_NKEY_SEED": str(seed_file)},
            nats_urls=(server.url,), home=tmp_path, stream=f"SEC_{uuid.uuid4().hex[:8]}",
        )
        await _append_and_read(ok)
        await _refused(ok.replace(nats_nkey_seed=stranger_file), "authoriz", "credential", "refused")


# --- TLS -----------------------------------------------------------------------------------


def _write_pki(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1, a client certificate, and a CA nobody trusts."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    paths: dict[str, Path] = {}

    def save_key(name: str, key: ec.EllipticCurvePrivateKey) -> None:
        path = directory / f"{name}-key.pem"
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        path.chmod(0o600)
        paths[f"{name}_key"] = path

    def save_cert(name: str, cert: x509.Certificate) -> None:
        path = directory / f"{name}.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[name] = path

    def make_ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                    key_encipherment=False, data_encipherment=False, key_agreement=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return key, cert

    def make_leaf(
        name: str, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, usage: x509.ObjectIdentifier
    ) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        save_key(name, key)
        save_cert(name, cert)

    ca_key, ca_cert = make_ca("room-ledger test CA")
    save_cert("ca", ca_cert)
    make_leaf("server", ca_key, ca_cert, ExtendedKeyUsageOID.SERVER_AUTH)
    make_leaf("client", ca_key, ca_cert, ExtendedKeyUsageOID.CLIENT_AUTH)
    rogue_key, rogue_cert = make_ca("someone else's CA")
    save_cert("rogue_ca", rogue_cert)
    make_leaf("rogue_client", rogue_key, rogue_cert, ExtendedKeyUsageOID.CLIENT_AUTH)
    return paths


async def test_mutual_tls(tmp_path: Path) -> None:
    pki = _write_pki(tmp_path)
    conf = (
        "tls {\n"
        f'  cert_file: "{pki["server"]}"\n'
        f'  key_file: "{pki["server_key"]}"\n'
        f'  ca_file: "{pki["ca"]}"\n'
        "  verify: true\n"
        "  timeout: 2\n"
        "}\n"
    )
    with single_server(tmp_path, conf, name="tls", scheme="tls") as server:
        ok = Settings.from_env(
            {
                "LEDGER_NATS_URL": server.url,
                "LEDGER_NATS_TLS_CA": str(pki["ca"]),
                "LEDGER_NATS_TLS_CERT": str(pki["client"]),
                "LEDGER_NATS_TLS_KEY": str(pki["client_key"]),
            },
            home=tmp_path,
            stream=f"SEC_{uuid.uuid4().hex[:8]}",
        )
        assert server.url.startswith("tls://")
        await _append_and_read(ok)
        # A client whose certificate the server's CA did not sign is turned away ...
        await _refused(
            ok.replace(nats_tls_cert=pki["rogue_client"], nats_tls_key=pki["rogue_client_key"]),
            "tls", "certificate", "ssl", "handshake",
        )
        # ... and a client that does not trust the server's certificate does not talk to it.
        await _refused(ok.replace(nats_tls_ca=pki["rogue_ca"]), "tls", "certificate", "ssl", "verify")


async def test_plain_client_cannot_reach_a_tls_only_server(tmp_path: Path) -> None:
    """No TLS settings against a TLS-only server: a clear refusal, not a silent plaintext session."""
    pki = _write_pki(tmp_path)
    conf = f'tls {{\n  cert_file: "{pki["server"]}"\n  key_file: "{pki["server_key"]}"\n  timeout: 2\n}}\n'
    server = NatsServer(tmp_path / "srv", "tls-only", jetstream_block(tmp_path / "srv" / "js") + conf)
    with server:
        server.wait_healthy()
        plain = Settings(nats_urls=(f"nats://127.0.0.1:{server.port}",), home=tmp_path)
        await _refused(plain, "tls", "certificate", "ssl", "secure")


# --- bridge tokens -------------------------------------------------------------------------


def test_bridge_token_is_hidden_and_cannot_publish() -> None:
    from livekit import api

    from room_ledger.bridge.tokens import bridge_identity, bridge_token

    key, secret = "APIsecuritytest", "s" * 40
    settings = Settings(livekit_url="ws://127.0.0.1:7880", livekit_api_key=key, livekit_api_secret=secret)
    room = "support-'42'; DROP TABLE room_state;--"
    identity = bridge_identity("b1")
    token = bridge_token(settings, room, identity)
    claims = api.TokenVerifier(key, secret).verify(token)
    video = claims.video
    assert video is not None
    assert claims.identity == identity
    assert video.room_join is True and video.room == room
    assert video.hidden is True, "the bridge must not show up as a participant"
    assert video.can_subscribe is True, "the bridge receives data and streams"
    assert video.can_publish is False, "the bridge publishes no tracks"
    assert video.can_publish_data is False, "the bridge sends no data packets"
    assert not video.can_publish_sources, "no publish sources"
    assert not video.room_admin and not video.room_create and not video.room_record and not video.room_list
    assert not video.can_update_own_metadata
    # Short-lived enough to matter, and signed with the secret: a forged signature is refused.
    import jwt

    raw = jwt.decode(token, options={"verify_signature": False})
    assert 0 < raw["exp"] - raw["nbf"] <= 24 * 3600
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, "another-secret-another-secret-12345", algorithms=["HS256"])


# --- hostile room names: bound parameters and encoded subjects ----------------------------

HOSTILE = "'; DROP TABLE room_state; --"
HOSTILE_ROOMS = [
    f"o'brien\"s room {HOSTILE}",
    "ledger.*.> all rooms",
    "a.b.c",
    "*",
    ">",
    "$1 %s %(room)s {room} \\ ` \" ' ;",
    "café ☕ 会议 — réunion",
    "tab\tand\nnewline",
    "100% _under_score_ LIKE '%'",
]


async def test_hostile_room_names_round_trip_untouched(pg_settings: Settings) -> None:
    from room_ledger.hydrate import close
    from room_ledger.projections.projector import Projector
    from room_ledger.subjects import room_from_token

    suffix = uuid.uuid4().hex[:8]
    rooms = [f"{name} {suffix}" for name in HOSTILE_ROOMS]
    agent = ev.Sender(f"agent {HOSTILE}", "agent")
    async with Ledger(pg_settings, name="security-hostile") as ledger:
        for room in rooms:
            events = [
                ev.make_event(room, ev.ParticipantJoined(identity=f"caller {HOSTILE}", kind="sip")),
                ev.make_event(room, ev.FloorRequest(agent_id=agent.identity, task=HOSTILE), sender=agent),
                ev.make_event(room, ev.SessionPatch(patch={HOSTILE: {"$1": HOSTILE, "*": ">"}}), sender=agent),
                ev.make_event(
                    room,
                    ev.ConversationItem(item_id=f"item_{HOSTILE}", role="assistant", text=HOSTILE,
                                        speaker=agent.identity),
                    sender=agent,
                ),
            ]
            positions = await ledger.append_many(events)
            # Stored under one plain subject token per room: no wildcard, no extra dots.
            records = [r async for r in ledger.read(room)]
            assert [r.seq for r in records] == [p.seq for p in positions]
            for record in records:
                prefix, token, category = record.subject.split(".")
                assert prefix == pg_settings.subject_prefix and category in ("participant", "floor", "session",
                                                                             "conversation")
                assert not set(token) & set("*> .\t\n'\";%$") and room_from_token(token) == room
                assert record.event.room == room
            # A wildcard room reads only itself.
            assert {r.event.room for r in records} == {room}
        head = await ledger.head()

        async with Projector(pg_settings) as projector:
            await projector.catch_up(until=head)

        import asyncpg

        from room_ledger.db import asyncpg_dsn

        conn = await asyncpg.connect(asyncpg_dsn(pg_settings.database_url or ""))
        try:
            assert await conn.fetchval("SELECT to_regclass('room_state') IS NOT NULL"), "room_state was dropped"
            for room in rooms:
                row = await conn.fetchrow("SELECT room, floor_holder FROM room_state WHERE room = $1", room)
                assert row is not None, f"no projection row for {room!r}"
                assert row["room"] == room and row["floor_holder"] == agent.identity
                items = await conn.fetch("SELECT item_id, item FROM conversation_items WHERE room = $1", room)
                assert [r["item_id"] for r in items] == [f"item_{HOSTILE}"]
        finally:
            await conn.close()

        try:
            for room in rooms:
                snapshot = await hydrate(ledger, room, full_conversation=True)
                assert snapshot.room == room and snapshot.source == "projection+log"
                assert snapshot.floor.holder == agent.identity
                assert snapshot.session == {HOSTILE: {"$1": HOSTILE, "*": ">"}}
                assert [i.text for i in snapshot.conversation] == [HOSTILE]
                assert f"caller {HOSTILE}" in snapshot.participants
        finally:
            await close(ledger)
