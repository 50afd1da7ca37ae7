"""A LiveKit-compatible loopback SFU (signalling and data, no media) for tests; see tests/README.md."""

from .events import Events
from .server import LoopbackSFU, mint_token

__all__ = ["Events", "LoopbackSFU", "mint_token"]
