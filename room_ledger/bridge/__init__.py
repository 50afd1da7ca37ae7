"""The bridge: every data-channel event and transcript of every LiveKit room into the ledger.

* :mod:`bridge.ingest` - room observations -> events (no WebRTC needed; ``ledger demo`` uses it)
* :mod:`bridge.writer` - the single ordered, batched writer with memory + disk buffering
* :mod:`bridge.room` - the ``livekit.rtc`` glue; :mod:`bridge.worker` - the AgentServer entry
* :mod:`bridge.stats` - counters, and the JSON file ``ledger doctor`` reads
"""
