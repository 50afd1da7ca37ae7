"""One readable line per event on a terminal: time, sequence, sender, type, and what happened.

What an event says comes from :mod:`room_ledger.words` (the web view says it the same way).
``TimelinePrinter`` prints records as they come, colours them by type, and makes gaps stand out:
a ``bridge.gap`` event in red, and a quiet spell longer than a minute as a separator line.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Final

from rich.cells import cell_len, set_cell_size
from rich.console import Console
from rich.style import Style
from rich.text import Text

from room_ledger import events as ev
from room_ledger.client import Record
from room_ledger.ownership import Rejection
from room_ledger.settings import format_duration
from room_ledger.words import clean, clip, event_time, sender_label, summary

#: Style of each event category (the first segment of its type).
CATEGORY_STYLES: Final[dict[str, str]] = {
    "participant": "cyan",
    "room": "cyan",
    "agent": "magenta",
    "floor": "bold yellow",
    "transcript": "green",
    "chat": "bright_green",
    "conversation": "blue",
    "tool": "bright_cyan",
    "handoff": "bold bright_magenta",
    "session": "bright_blue",
    "context": "bright_black",
    "data": "bright_black",
    "bridge": "red",
}
GAP_STYLE: Final = "bold white on red"
#: A write the fold rejected (a superseded epoch's): shown, struck through, with why.
REJECTED_STYLE: Final = "strike bright_black"
REJECTED_MARK_STYLE: Final = "bold red"
#: A quiet spell longer than this between two shown events gets a separator line.
QUIET_GAP_S: Final = 60.0


def category_style(event_type: str) -> str:
    if event_type == "bridge.gap":
        return GAP_STYLE
    return CATEGORY_STYLES.get(event_type.split(".", 1)[0], "white")


class TimelinePrinter:
    """Print records as they come; keeps only the previous time (streams any number of events).

    Lines are composed directly (styles pre-rendered to ANSI once, cropped to the terminal's
    width), not laid out by rich one by one: a 100k-event room prints in seconds, not minutes.
    """

    def __init__(self, console: Console, *, quiet_gap_s: float = QUIET_GAP_S) -> None:
        self.console = console
        self.quiet_gap_s = quiet_gap_s
        self.count = 0
        self.gaps = 0
        #: Writes shown as rejected by the fence.
        self.rejected = 0
        self._last_time: datetime | None = None
        self._last_date: date | None = None
        self._styles: dict[str, tuple[str, str]] = {}
        self._color = console.color_system is not None and not console.no_color
        self._crop = console.is_terminal

    def _paint(self, text: str, style: str) -> str:
        if not self._color or not style:
            return text
        codes = self._styles.get(style)
        if codes is None:
            rendered = Style.parse(style).render("\0", color_system=self.console._color_system)
            before, _, after = rendered.partition("\0")
            codes = self._styles[style] = (before, after)
        return f"{codes[0]}{text}{codes[1]}"

    def compose(self, record: Record, rejection: Rejection | None = None) -> str:
        """The record's line, with ANSI styles when the console has colour; a rejected write's
        line says so first (the cropping keeps that, and cuts the event's own words)."""
        event = record.event
        name = ev.event_type(event)
        when = event_time(record)
        style = category_style(name)
        head = f"{when:%H:%M:%S.%f}"[:12] + f" {record.seq:>7} "
        sender = f"{clip(sender_label(event), 28):<28} "
        kind = f"{clean(name):<22} "
        mark = f"REJECTED ({clean(rejection.reason)}) " if rejection is not None else ""
        text = summary(event)
        if self._crop:
            room = self.console.width - len(head) - cell_len(sender) - len(kind) - cell_len(mark)
            if cell_len(text) > room:
                text = set_cell_size(text, max(room - 1, 0)) + "…"
        if rejection is not None:
            return (
                self._paint(head, "bright_black")
                + self._paint(sender, "bold" if event.sender.kind == "agent" else "")
                + self._paint(kind, REJECTED_STYLE)
                + self._paint(mark, REJECTED_MARK_STYLE)
                + self._paint(text, REJECTED_STYLE)
            )
        return (
            self._paint(head, "bright_black")
            + self._paint(sender, "bold" if event.sender.kind == "agent" else "")
            + self._paint(kind, style)
            + self._paint(text, GAP_STYLE if name == "bridge.gap" else "")
        )

    def print(self, record: Record, rejection: Rejection | None = None) -> None:
        when = event_time(record)
        local_date = when.date()
        if self._last_date != local_date:
            self.console.print(Text(f"── {local_date.isoformat()} (UTC) ──", style="bold bright_black"))
            self._last_date = local_date
        elif self._last_time is not None:
            quiet = (when - self._last_time).total_seconds()
            if quiet >= self.quiet_gap_s:
                self.console.print(
                    Text(f"   ┄┄ {format_duration(quiet)} with no events ┄┄", style="italic yellow")
                )
        self._last_time = when
        if ev.event_type(record.event) == "bridge.gap":
            self.gaps += 1
        if rejection is not None:
            self.rejected += 1
        self.console.file.write(self.compose(record, rejection) + "\n")
        self.count += 1
