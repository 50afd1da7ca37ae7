#!/usr/bin/env python
"""``bench/handoff.py --voice`` as an entry of its own in ``bench/run``: handoff dead air heard in audio.

    .venv/bin/python bench/handoff_voice.py [--handoffs 20] [--quick]
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.argv = [str(Path(__file__).with_name("handoff.py")), "--voice", *sys.argv[1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
