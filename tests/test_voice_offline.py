"""examples/voice/offline.py without a server: espeak-ng speaks, PocketSphinx hears it back, Silero loads.

The STT round trip is the point: the phrases a scripted caller says (rendered by the same
espeak-ng the agents use) must come back exactly, or a voice scenario test would fail on the
transcript instead of on what it tests.
"""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest

# What a caller says in the handoff scenario; each word is in CMUdict.
PHRASES = [
    "Hello, I need help with my bill.",
    "Transfer me to billing.",
    "What is my balance?",
    "My account number is one two three four.",
    "Yes, please.",
    "No, thanks.",
    "Goodbye.",
]


@pytest.fixture
def espeak() -> None:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")


async def test_espeak_tts_renders_frames_at_the_declared_rate(espeak: None) -> None:
    from examples.voice.offline import ESPEAK_SAMPLE_RATE, EspeakTTS

    tts = EspeakTTS()
    assert tts.sample_rate == ESPEAK_SAMPLE_RATE and tts.num_channels == 1
    assert not tts.capabilities.streaming
    frames = [ev.frame async for ev in tts.synthesize("Transfer me to billing.")]
    assert frames
    assert {(f.sample_rate, f.num_channels) for f in frames} == {(ESPEAK_SAMPLE_RATE, 1)}
    samples = np.concatenate([np.frombuffer(f.data, dtype=np.int16) for f in frames]).astype(np.float64)
    duration = samples.size / ESPEAK_SAMPLE_RATE
    assert 1.0 < duration < 4.0, duration
    assert float(np.sqrt(np.mean(samples**2))) > 300


async def test_sphinx_stt_recognises_every_scenario_phrase(espeak: None) -> None:
    from examples.voice.offline import BILLING_VOICE, EspeakTTS, SphinxSTT

    stt = SphinxSTT(PHRASES)
    # Another voice than the grammar's "default": the agents and the caller do not share one.
    tts = EspeakTTS(BILLING_VOICE)
    for phrase in PHRASES:
        audio = await tts.synthesize(phrase).collect()
        t0 = time.perf_counter()
        event = await stt.recognize(audio)
        elapsed = time.perf_counter() - t0
        (alt,) = event.alternatives
        print(f"{audio.duration:5.2f} s audio -> {elapsed * 1000:6.1f} ms  {alt.text!r} ({alt.confidence:.2f})")
        assert alt.text == phrase
    await tts.aclose()
    await stt.aclose()


def test_sphinx_stt_rejects_words_outside_the_dictionary() -> None:
    from examples.voice.offline import SphinxSTT

    with pytest.raises(ValueError, match="qwxzy"):
        SphinxSTT(["hello qwxzy"])


async def test_silence_recognises_as_nothing_or_a_phrase(espeak: None) -> None:
    """A grammar has no "out of grammar": silence yields no text (StreamAdapter drops it) or, at
    worst, a phrase; never an error."""
    from livekit import rtc

    from examples.voice.offline import SphinxSTT

    stt = SphinxSTT(PHRASES)
    silence = rtc.AudioFrame(bytes(48000 * 2), 48000, 1, 48000)
    event = await stt.recognize(silence)
    (alt,) = event.alternatives
    assert alt.text in {"", *PHRASES}


def test_silero_vad_loads_offline() -> None:
    from livekit.agents.vad import VAD

    from examples.voice.offline import load_vad

    vad = load_vad()
    assert isinstance(vad, VAD)
    assert vad.capabilities.update_interval > 0


async def test_offline_stt_streams_phrases_cut_by_the_vad(espeak: None) -> None:
    """What AgentSession does with it: frames in, Silero cuts the turns, SphinxSTT transcribes."""
    from livekit import rtc
    from livekit.agents import stt as agents_stt

    from examples.voice.offline import CALLER_VOICE, espeak_pcm, offline_stt

    said = ["Transfer me to billing.", "Goodbye."]
    stream = offline_stt(PHRASES).stream()
    rate, step = 48000, 480
    for phrase in said:
        # Speech then a second of silence: more than the VAD's min_silence_duration ends the turn.
        pcm = await espeak_pcm(phrase, CALLER_VOICE, sample_rate=rate) + bytes(rate * 2)
        for i in range(0, len(pcm) - len(pcm) % (step * 2), step * 2):
            stream.push_frame(rtc.AudioFrame(pcm[i : i + step * 2], rate, 1, step))
    stream.end_input()
    finals = [ev.alternatives[0].text async for ev in stream
              if ev.type == agents_stt.SpeechEventType.FINAL_TRANSCRIPT]
    assert finals == said
