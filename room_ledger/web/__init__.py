"""The web wing: what the ledger serves over HTTP, beside the bridge and the projections.

It holds ``ledger serve`` (the live, read-only view of every room: its pages, their assets in
``static/``, the JSON and event-stream API, one follower per watched room fanned out to every
browser) and the HTML and SVG a room is drawn with (``ledger replay --html`` writes the same page
offline); the receiver of observability data will live here too. Like every service it imports the
core only, never ``bridge``, ``projections`` or ``cli``; the command line starts it.
"""
