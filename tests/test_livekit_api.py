"""One factory from settings to LiveKit's server API (ledger.livekit_api)."""

from __future__ import annotations

import pytest

from room_ledger.errors import SettingsError
from room_ledger.livekit_api import http_url, livekit_credentials
from room_ledger.settings import Settings


@pytest.mark.parametrize(("url", "expected"), [
    ("ws://lk:7880", "http://lk:7880"), ("wss://lk.example.com", "https://lk.example.com"),
    ("http://lk:7880", "http://lk:7880"), ("https://lk.example.com/", "https://lk.example.com/"),
])
def test_the_server_api_speaks_http_at_the_clients_url(url: str, expected: str) -> None:
    assert http_url(url) == expected


def test_a_missing_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SettingsError, match="LIVEKIT_API_KEY, LIVEKIT_API_SECRET not set: a dispatch needs"):
        livekit_credentials(Settings(livekit_url="ws://lk:7880"), needed_for="a dispatch")
    monkeypatch.setenv("LIVEKIT_API_KEY", "k")
    monkeypatch.setenv("LIVEKIT_API_SECRET", "s")
    assert livekit_credentials(Settings(livekit_url="ws://lk:7880")) == ("ws://lk:7880", "k", "s")

