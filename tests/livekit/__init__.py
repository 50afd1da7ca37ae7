"""The real livekit-server for tests, in a private network namespace; see tests/README.md."""

from .events import Events, sees
from .server import LocalLiveKit, RemoteLiveKit, mint_token

__all__ = ["Events", "LocalLiveKit", "RemoteLiveKit", "mint_token", "sees"]
