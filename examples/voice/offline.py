"""An offline voice stack for LiveKit Agents: espeak-ng TTS, PocketSphinx STT, Silero VAD, a voice caller.

It stands in for the real providers (the OpenAI, Deepgram or Cartesia plugins) so that a voice
scenario runs in CI with no API key, no network and no model download at run time: every piece
is a plain ``livekit.agents`` ``tts.TTS`` / ``stt.STT`` / ``vad.VAD``, so swapping a real plugin
in changes the constructor call and nothing else::

    vad = load_vad()                          # silero.VAD.load(), as with a real provider
    session = AgentSession(
        vad=vad,
        stt=offline_stt(PHRASES, vad=vad),    # deepgram.STT()
        tts=EspeakTTS(TRIAGE_VOICE),          # cartesia.TTS()
        llm=...,
    )

What it needs on the machine: the ``espeak-ng`` binary (Debian package ``espeak-ng``), and the
``pocketsphinx`` and ``livekit-plugins-silero`` wheels, which carry their models.

The STT decodes with a JSGF grammar made of the scenario's phrases, not a language model: with
synthetic speech and a closed set of utterances that is exact and fast, but there is no "out of
grammar" answer: speech that is not one of the phrases comes back as the nearest phrase (or the
start of one, with confidence 0.5), so it recognises scripted callers, not free speech.

``VoiceCaller`` is the other end, for tests: a participant that speaks phrases into the room and
records when each agent was audible, so a test can assert turn-taking (who spoke after whom,
whether two agents talked over each other) from what actually reached the room.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import re
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Never

import numpy as np
import pocketsphinx
from livekit import rtc
from livekit.agents import (
    DEFAULT_API_CONNECT_OPTIONS,
    NOT_GIVEN,
    APIConnectOptions,
    APIError,
    LanguageCode,
    NotGivenOr,
    stt,
    tts,
    utils,
)
from livekit.agents.vad import VAD
from livekit.plugins import silero

__all__ = [
    "BILLING_VOICE",
    "CALLER_VOICE",
    "ESPEAK_SAMPLE_RATE",
    "STT_SAMPLE_RATE",
    "TRIAGE_VOICE",
    "VOICED_RMS_THRESHOLD",
    "EspeakTTS",
    "EspeakVoice",
    "SphinxSTT",
    "VoiceCaller",
    "espeak_available",
    "espeak_pcm",
    "load_vad",
    "normalize_phrase",
    "offline_stt",
]

#: espeak-ng's own voices all render at 22050 Hz; the TTS declares it rather than resampling, and
#: AgentSession's audio output resamples to the room's rate as it does for any provider.
ESPEAK_SAMPLE_RATE = 22050
#: PocketSphinx's en-us acoustic model is trained on 16 kHz audio.
STT_SAMPLE_RATE = 16000
#: RMS (int16) above which a 10 ms frame counts as voiced. espeak-ng writes exact digital silence
#: (RMS 0) between words and before/after a phrase, and the median 10 ms frame of its speech is
#: ~1400 (25th percentile ~500, for en-us, en-gb+f3, en-us+m3); after Opus a silent track stays
#: under ~50. 300 sits well clear of silence and only drops the quietest edges of words, which
#: the span merging (MERGE_GAP_S) bridges anyway.
VOICED_RMS_THRESHOLD = 300.0


@dataclass(frozen=True)
class EspeakVoice:
    """An espeak-ng voice: ``name`` is ``-v`` (``en-us``, ``en-gb+f3``: a language plus a variant),
    ``pitch`` is ``-p`` (0-99), ``speed`` is ``-s`` (words per minute)."""

    name: str = "en-us"
    pitch: int = 50
    speed: int = 150


# One voice per role, different enough in timbre and pitch that a person listening to a recording
# (or a spectrogram) can tell the agents and the caller apart.
TRIAGE_VOICE = EspeakVoice("en-us", pitch=50)
BILLING_VOICE = EspeakVoice("en-gb+f3", pitch=70)
CALLER_VOICE = EspeakVoice("en-us+m3", pitch=35)


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def _wav_pcm(wav: bytes) -> tuple[bytes, int]:
    """The PCM payload and sample rate of espeak-ng's WAV.

    With ``--stdout`` espeak-ng cannot seek back to fill in the RIFF and data sizes, so they hold
    a placeholder (0x7ffff024): the payload is everything after the data chunk's header, whatever
    its declared size, which rules out the ``wave`` module.
    """
    if wav[:4] != b"RIFF" or wav[8:12] != b"WAVE":
        raise ValueError("espeak-ng did not write a WAV")
    pos, rate = 12, 0
    while pos + 8 <= len(wav):
        chunk, size = wav[pos : pos + 4], int.from_bytes(wav[pos + 4 : pos + 8], "little")
        if chunk == b"fmt ":
            fmt, channels = int.from_bytes(wav[pos + 8 : pos + 10], "little"), wav[pos + 10]
            bits = int.from_bytes(wav[pos + 22 : pos + 24], "little")
            if (fmt, channels, bits) != (1, 1, 16):
                raise ValueError(f"espeak-ng WAV is not 16-bit mono PCM: {(fmt, channels, bits)}")
            rate = int.from_bytes(wav[pos + 12 : pos + 16], "little")
        elif chunk == b"data":
            pcm = wav[pos + 8 :]
            return pcm[: len(pcm) - len(pcm) % 2], rate
        pos += 8 + size
    raise ValueError("espeak-ng WAV has no data chunk")


def _resample(pcm: bytes, from_rate: int, to_rate: int) -> bytes:
    if from_rate == to_rate or not pcm:
        return pcm
    resampler = rtc.AudioResampler(from_rate, to_rate, quality=rtc.AudioResamplerQuality.HIGH)
    frames = resampler.push(bytearray(pcm)) + resampler.flush()
    return b"".join(bytes(f.data) for f in frames)


async def espeak_pcm(text: str, voice: EspeakVoice, *, sample_rate: int = ESPEAK_SAMPLE_RATE) -> bytes:
    """Render ``text`` with espeak-ng: 16-bit mono PCM at ``sample_rate``."""
    proc = await asyncio.create_subprocess_exec(
        # The text goes on stdin, not argv: a phrase starting with "-" would be read as an option.
        "espeak-ng", "--stdout", "-v", voice.name, "-p", str(voice.pitch), "-s", str(voice.speed),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        wav, err = await proc.communicate(text.encode())
    finally:
        # Cancelled mid-synthesis (the user interrupted the agent): do not leave the process behind.
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise APIError(f"espeak-ng exited {proc.returncode}: {err.decode(errors='replace').strip()}",
                       retryable=False)
    pcm, rate = _wav_pcm(wav)
    # mbrola voices (mb-us1, ...) render at 16 kHz: resample so the declared rate always holds.
    return _resample(pcm, rate, sample_rate)


# --- TTS -------------------------------------------------------------------------------------------


class EspeakTTS(tts.TTS[Never]):  # Never: no events beyond the base class's
    """Non-streaming TTS on the espeak-ng binary; AgentSession wraps it in a tts.StreamAdapter
    (sentence by sentence) as it does any non-streaming provider."""

    def __init__(self, voice: EspeakVoice | str = TRIAGE_VOICE) -> None:
        super().__init__(capabilities=tts.TTSCapabilities(streaming=False),
                         sample_rate=ESPEAK_SAMPLE_RATE, num_channels=1)
        self._voice = EspeakVoice(voice) if isinstance(voice, str) else voice

    @property
    def voice(self) -> EspeakVoice:
        return self._voice

    @property
    def model(self) -> str:
        return self._voice.name

    @property
    def provider(self) -> str:
        return "espeak-ng"

    def synthesize(
        self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> EspeakChunkedStream:
        return EspeakChunkedStream(tts=self, input_text=text, conn_options=conn_options)


class EspeakChunkedStream(tts.ChunkedStream):
    def __init__(self, *, tts: EspeakTTS, input_text: str, conn_options: APIConnectOptions) -> None:
        super().__init__(tts=tts, input_text=input_text, conn_options=conn_options)
        self._espeak = tts

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        pcm = await espeak_pcm(self._input_text, self._espeak.voice, sample_rate=self._espeak.sample_rate)
        output_emitter.initialize(request_id=utils.shortuuid(), sample_rate=self._espeak.sample_rate,
                                  num_channels=1, mime_type="audio/pcm")
        output_emitter.push(pcm)
        output_emitter.flush()


# --- STT -------------------------------------------------------------------------------------------


def normalize_phrase(text: str) -> str:
    """Lowercase words as CMUdict spells them: punctuation dropped, apostrophes kept (don't, it's)."""
    return " ".join(re.sub(r"[^a-z' ]+", " ", text.lower().replace("-", " ")).split())


class SphinxSTT(stt.STT[Never]):
    """Non-streaming STT on PocketSphinx, decoding with a JSGF grammar of the scenario's phrases.

    The decoder (acoustic model + dictionary, ~0.1 s to load) is built once, here, and reused for
    every utterance under a lock: a PocketSphinx decoder is a single stateful utterance at a time.
    Every word of every phrase must be in CMUdict; an unknown one raises ValueError here rather
    than as a decoding failure mid-call.
    """

    def __init__(self, phrases: Sequence[str], *, language: str = "en-US") -> None:
        super().__init__(capabilities=stt.STTCapabilities(streaming=False, interim_results=False))
        self._language = language
        # The transcript is the phrase as the scenario wrote it (case, punctuation), as a real
        # provider would punctuate it; the grammar only sees the normalized words.
        self._phrases = {normalize_phrase(p): p for p in phrases if normalize_phrase(p)}
        if not self._phrases:
            raise ValueError("SphinxSTT needs at least one phrase")
        model = pocketsphinx.get_model_path()
        # Tuned on the 7 test phrases x 9 espeak-ng voices (63/63 exact; defaults gave 48/63):
        # - cmn="batch": normalize each utterance on its own; the default live CMN carries state
        #   from one utterance into the next, and agents and caller speak with different voices.
        # - bestpath=False: the lattice rescoring after the FSG search returned prefixes of
        #   phrases ("what is", "no") where the FSG search had the whole phrase.
        # - wide beams: with pauses at commas, the right path got pruned and no final state was
        #   reached (empty hypothesis). A grammar of a few phrases is cheap to search wide.
        self._decoder = pocketsphinx.Decoder(
            hmm=os.path.join(model, "en-us", "en-us"),
            dict=os.path.join(model, "en-us", "cmudict-en-us.dict"),
            lm=None, samprate=STT_SAMPLE_RATE, loglevel="FATAL",
            cmn="batch", bestpath=False, beam=1e-80, wbeam=1e-60, pbeam=1e-80,
        )
        unknown = sorted({w for p in self._phrases for w in p.split()
                          if self._decoder.lookup_word(w) is None})
        if unknown:
            raise ValueError(f"words not in the pocketsphinx dictionary: {unknown}")
        alternatives = " | ".join(f"( {p} )" for p in self._phrases)
        self._decoder.add_jsgf_string("scenario", f"#JSGF V1.0;\ngrammar scenario;\npublic <utt> = {alternatives};\n")
        self._decoder.activate_search("scenario")
        self._lock = threading.Lock()

    @property
    def model(self) -> str:
        return "pocketsphinx-en-us-jsgf"

    @property
    def provider(self) -> str:
        return "pocketsphinx"

    def _decode(self, pcm16k: bytes) -> tuple[str, float]:
        with self._lock:
            self._decoder.start_utt()
            # full_utt: the whole utterance at once, which batch CMN needs.
            self._decoder.process_raw(pcm16k, full_utt=True)
            self._decoder.end_utt()
            hyp = self._decoder.hyp()
        text: str = hyp.hypstr if hyp is not None else ""
        # Without the lattice pass (bestpath=False) PocketSphinx computes no posterior (hyp.prob
        # is always 1), so the confidence says what the grammar can: the best path reached the
        # end of a phrase (1.0), stopped inside one (0.5), or matched nothing (0.0).
        if not text:
            return "", 0.0
        return text, 1.0 if text in self._phrases else 0.5

    async def _recognize_impl(
        self,
        buffer: utils.AudioBuffer,
        *,
        language: NotGivenOr[str] = NOT_GIVEN,
        conn_options: APIConnectOptions,
    ) -> stt.SpeechEvent:
        frames = [f for f in (buffer if isinstance(buffer, list) else [buffer]) if f.samples_per_channel]
        text, confidence = "", 0.0
        if frames:
            frame = rtc.combine_audio_frames(frames)
            samples = np.frombuffer(frame.data, dtype=np.int16)
            if frame.num_channels > 1:
                samples = samples.reshape(-1, frame.num_channels).mean(axis=1).astype(np.int16)
            # Resampling is a few ms of native work on the loop; decoding is ~1-2 % of real time
            # but still CPU-bound for tens of ms, so it goes to a thread.
            pcm = _resample(samples.tobytes(), frame.sample_rate, STT_SAMPLE_RATE)
            text, confidence = await asyncio.to_thread(self._decode, pcm)
        return stt.SpeechEvent(
            type=stt.SpeechEventType.FINAL_TRANSCRIPT,
            request_id=utils.shortuuid(),
            # An empty text is what StreamAdapter skips (no phrase matched at all).
            alternatives=[stt.SpeechData(language=LanguageCode(language if language else self._language),
                                         text=self._phrases.get(text, text), confidence=confidence)],
        )


# --- VAD -------------------------------------------------------------------------------------------


def load_vad(*, min_silence_duration: float = 0.4, activation_threshold: float = 0.5) -> VAD:
    """Silero VAD (its ONNX model ships in the wheel: nothing is downloaded).

    espeak-ng leaves ~0.1-0.2 s of digital silence between words and ends a phrase cleanly, so
    0.4 s of silence (the default is 0.55) ends a turn without splitting one; blocking (~0.1 s):
    call it once, in a worker's prewarm.
    """
    return silero.VAD.load(min_silence_duration=min_silence_duration,
                           activation_threshold=activation_threshold, prefix_padding_duration=0.3)


def offline_stt(phrases: Sequence[str], *, vad: VAD | None = None) -> stt.StreamAdapter:
    """A streaming STT for AgentSession: Silero VAD cuts utterances, SphinxSTT recognises each."""
    return stt.StreamAdapter(stt=SphinxSTT(phrases), vad=vad if vad is not None else load_vad())


# --- the caller ------------------------------------------------------------------------------------


class VoiceCaller:
    """A participant for tests: speaks phrases into the room and records who was audible when.

    It publishes a microphone track and subscribes to every remote audio track. Per remote
    identity it keeps the wall-clock receive time (``time.time()``) of each voiced 10 ms frame
    (RMS above ``VOICED_RMS_THRESHOLD``): frames are received as the jitter buffer plays them, so
    those times are when a listener would have heard the agent.

    Use ``await VoiceCaller.create(room)`` (or ``async with``) on a connected ``rtc.Room``.
    """

    FRAME_MS = 10
    #: Gaps shorter than this inside a span are pauses between words, not turns.
    MERGE_GAP_S = 0.3

    def __init__(self, room: rtc.Room, *, voice: EspeakVoice = CALLER_VOICE, sample_rate: int = 48000,
                 threshold: float = VOICED_RMS_THRESHOLD) -> None:
        self._room = room
        self._voice = voice
        self._threshold = threshold
        self._source = rtc.AudioSource(sample_rate, 1)
        self._track = rtc.LocalAudioTrack.create_audio_track("caller-mic", self._source)
        self._voiced: dict[str, list[float]] = {}
        self._readers: dict[str, asyncio.Task[None]] = {}
        self._say_lock = asyncio.Lock()
        self._published = False

    @classmethod
    async def create(cls, room: rtc.Room, *, voice: EspeakVoice = CALLER_VOICE, sample_rate: int = 48000,
                     threshold: float = VOICED_RMS_THRESHOLD) -> VoiceCaller:
        caller = cls(room, voice=voice, sample_rate=sample_rate, threshold=threshold)
        await caller.start()
        return caller

    async def start(self) -> None:
        if self._published:  # create() already started it: `async with await VoiceCaller.create(room)`
            return
        self._room.on("track_subscribed", self._on_track_subscribed)
        self._room.on("track_unsubscribed", self._on_track_unsubscribed)
        # Tracks subscribed before we started listening never raise the event again.
        for participant in self._room.remote_participants.values():
            for publication in participant.track_publications.values():
                if publication.track is not None and publication.subscribed:
                    self._on_track_subscribed(publication.track, publication, participant)
        await self._room.local_participant.publish_track(
            self._track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE))
        self._published = True

    async def __aenter__(self) -> VoiceCaller:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    # -- speaking

    async def say(self, text: str) -> tuple[float, float]:
        """Speak ``text`` in real time, then ~0.5 s of silence (what lets the agents' VAD end the
        turn). Returns the wall-clock (start, end) of the speech itself, without the silence."""
        rate = self._source.sample_rate
        pcm = await espeak_pcm(text, self._voice, sample_rate=rate)
        samples_per_frame = rate * self.FRAME_MS // 1000
        step = samples_per_frame * 2
        async with self._say_lock:
            started = time.time()
            for i in range(0, len(pcm), step):
                chunk = pcm[i : i + step].ljust(step, b"\0")
                await self._source.capture_frame(rtc.AudioFrame(chunk, rate, 1, samples_per_frame))
            # capture_frame returns once the frame is queued (up to 1 s ahead): the speech has been
            # sent when the queue has played out.
            await self._source.wait_for_playout()
            ended = time.time()
            silence = rtc.AudioFrame(bytes(step), rate, 1, samples_per_frame)
            for _ in range(500 // self.FRAME_MS):
                await self._source.capture_frame(silence)
            await self._source.wait_for_playout()
        return started, ended

    # -- listening

    def _on_track_subscribed(self, track: rtc.Track, publication: rtc.RemoteTrackPublication,
                             participant: rtc.RemoteParticipant) -> None:
        if track.kind != rtc.TrackKind.KIND_AUDIO or track.sid in self._readers:
            return
        self._voiced.setdefault(participant.identity, [])
        self._readers[track.sid] = asyncio.create_task(
            self._read(participant.identity, track), name=f"VoiceCaller.read:{participant.identity}")

    def _on_track_unsubscribed(self, track: rtc.Track, publication: rtc.RemoteTrackPublication,
                               participant: rtc.RemoteParticipant) -> None:
        task = self._readers.pop(track.sid, None)
        if task is not None:
            task.cancel()

    async def _read(self, identity: str, track: rtc.Track) -> None:
        stream = rtc.AudioStream.from_track(track=track, sample_rate=48000, num_channels=1,
                                            frame_size_ms=self.FRAME_MS)
        voiced = self._voiced[identity]
        try:
            async for event in stream:
                samples = np.frombuffer(event.frame.data, dtype=np.int16).astype(np.float64)
                if samples.size and float(np.sqrt(np.mean(samples * samples))) > self._threshold:
                    # insort: two tracks of one identity interleave; readers keep the list sorted.
                    bisect.insort(voiced, time.time())
        finally:
            await stream.aclose()

    def identities(self) -> list[str]:
        """Every participant heard so far (also those who have left since)."""
        return list(self._voiced)

    def voiced_times(self, identity: str) -> list[float]:
        """Receive times of every voiced 10 ms frame from ``identity``, sorted."""
        return list(self._voiced.get(identity, []))

    def voiced_spans(self, identity: str) -> list[tuple[float, float]]:
        """(start, end) of each run of voiced frames, merging gaps under ``MERGE_GAP_S``; ``end``
        is the last voiced frame's receive time plus its 10 ms."""
        spans: list[tuple[float, float]] = []
        frame_s = self.FRAME_MS / 1000
        for t in self._voiced.get(identity, []):
            if spans and t - spans[-1][1] < self.MERGE_GAP_S:
                spans[-1] = (spans[-1][0], t + frame_s)
            else:
                spans.append((t, t + frame_s))
        return spans

    def first_voiced_after(self, identity: str, t: float) -> float | None:
        """Receive time of the first voiced frame of ``identity`` at or after ``t``."""
        times = self._voiced.get(identity, [])
        i = bisect.bisect_left(times, t)
        return times[i] if i < len(times) else None

    def last_voiced_before(self, identity: str, t: float) -> float | None:
        """Receive time of the last voiced frame of ``identity`` at or before ``t``."""
        times = self._voiced.get(identity, [])
        i = bisect.bisect_right(times, t)
        return times[i - 1] if i else None

    def overlap_ms(self, a: str, b: str) -> int:
        """Milliseconds in which both ``a`` and ``b`` were voiced, on 10 ms wall-clock bins.

        Raw frames, not merged spans: pauses between words are not talking. Two streams' frames
        arrive with independent jitter, so a true overlap can read a bin or two short.
        """
        bin_s = self.FRAME_MS / 1000

        def bins(identity: str) -> set[int]:
            return {int(t / bin_s) for t in self._voiced.get(identity, [])}

        return len(bins(a) & bins(b)) * self.FRAME_MS

    async def aclose(self) -> None:
        self._room.off("track_subscribed", self._on_track_subscribed)
        self._room.off("track_unsubscribed", self._on_track_unsubscribed)
        readers, self._readers = list(self._readers.values()), {}
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        if self._published and self._room.isconnected():
            with contextlib.suppress(Exception):
                await self._room.local_participant.unpublish_track(self._track.sid)
        self._published = False
        await self._source.aclose()
