"""Transcribe files, folders and manifests with any model source (base, adapter, merged, CTranslate2).

Inputs: audio files; folders (searched recursively for :data:`AUDIO_SUFFIXES`); JSONL manifests
(each row is one input, its ``id`` naming it, ``offset``/``end`` honoured). Unreadable inputs are
reported on stderr and skipped; the rest are still transcribed.

Pieces: with voice activity detection (the default; Silero VAD, :mod:`asr_lora.vad`) a file of any
length is cut at its speech boundaries into pieces of at most the longest input the model was trained
on (``trained_on.max_seconds`` in its settings file, :mod:`asr_lora.settings`; at most 30 s, and 30 s
when not recorded), and for a model trained on single utterances only (``trained_on.max_utterances``
1) into one speech span a piece: such a model stops after the first sentence of a longer piece. The pieces between speech are not decoded (their text is empty, ``skip_reason``
"no_speech_vad").

Completeness guard (with VAD, for a model whose settings record its training rows' speaking rate): a
decoded piece whose text is far shorter than its speech predicts (:func:`incomplete`) is decoded
again split at its inner VAD spans, and the parts replace it when they hold more text; their
segments say ``"redecoded": "incomplete"`` in ``json``. With ``vad=False`` a file of
at most 30 s is one piece, and a longer one is cut in one of two ways (``split``; "auto" picks
"pauses" for a model with the trimmed audio context, "windows" otherwise):

- ``windows``: windows of 25-30 s, each cut placed at the quietest 200 ms (lowest mean energy)
  between 25 s and 30 s after the window's start, so words are rarely split; the last window is
  whatever is left (at most 30 s), and a cut is never placed less than 5 s before the end of the
  file. The fewest windows: the choice when every window costs a full 30 s encoder pass.
- ``pauses``: a cut in the middle of every pause of at least 0.4 s (frames within 10 dB of the
  file's noise floor or 35 dB below its speech level, and at least 15 dB below it), pieces under 2 s
  joined to the one before, and any piece over 30 s cut as in ``windows``. Utterance-sized
  segments: subtitle-sized cues, and the short inputs a trimmed-context model was trained on (its
  encoder then costs only the piece's length).

Segment timestamps are the piece boundaries: monotonic, contiguous, covering the whole file. A piece
that is digital silence (peak below -60 dBFS) or shorter than 0.1 s is not decoded and its text is
empty (Whisper would invent a sentence for it). A decoded piece that Whisper itself judges silent
(:mod:`asr_lora.backends`: no-speech probability, average log-probability, repetition) is empty too.
In ``json`` every segment says why it is empty (``skip_reason``) and carries ``no_speech_prob``,
``avg_logprob`` and ``compression_ratio`` when it was decoded.

With ``DecodeOptions.timestamps`` (``--timestamps``) a decoded piece becomes the cues of the model's
own timestamp tokens inside it (:attr:`~asr_lora.backends.Hypothesis.segments`), offset by the
piece's start: finer cues than the pieces, within each piece, in order. ``DecodeOptions.prompt``
(``--prompt``) goes before every piece; ``condition_on_previous_text`` adds the text of a file's
previous piece after it (openai/whisper's option; pieces of a file are then decoded one after the
other, and a piece that needed a temperature above 0.5 starts the chain afresh). It is off by
default: one wrong or looping piece is fed to the next, and errors propagate.

Output formats: ``txt`` (the whole text), ``srt`` and ``vtt`` (one cue per non-empty piece),
``json`` (text and segments), ``tsv`` (one row per segment: path, start, end, text).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, TextIO

import numpy as np

from .audio import AUDIO_SUFFIXES, SAMPLE_RATE, AudioError, load_audio
from .backends import DecodeOptions
from .defaults import DEFAULT_MODEL, TRANSCRIBE_BATCH_SIZE
from .errors import UserError
from .sources import ModelSource

FORMATS = ("txt", "srt", "vtt", "json", "tsv")
MANIFEST_SUFFIXES = frozenset({".jsonl", ".ndjson"})
TSV_NAME = "transcripts.tsv"

MIN_WINDOW = 25.0  # seconds: earliest cut after a window's start
MAX_WINDOW = 30.0  # seconds: Whisper's input
MIN_TAIL = 5.0  # seconds: never leave a last window shorter than this
ENERGY_FRAME = 0.02  # seconds per energy frame
QUIET_SPAN = 0.2  # seconds averaged when looking for the quietest point
MIN_PAUSE = 0.4  # seconds of quiet that end a segment ("pauses")
MIN_SEGMENT = 2.0  # seconds: a shorter piece joins the one before ("pauses")
SPLITS = ("auto", "pauses", "windows")
# Pieces with nothing to hear are not decoded (their text is empty): Whisper invents a sentence for
# digital silence and for slivers too short to hold a syllable.
SILENT_PEAK = 1e-3  # max |sample| below -60 dBFS
MIN_AUDIBLE = 0.1  # seconds
# Completeness guard: a decoded piece with fewer non-space characters than this share of what its
# speech seconds predict at the training rows' slow speaking rate is decoded again, split at its VAD spans.
GUARD_FRACTION = 0.5


# --------------------------------------------------------------------------- inputs


@dataclass
class Item:
    """One thing to transcribe: a file, or a manifest row."""

    name: str  # printed and used for the output file name: the path, or the manifest row id
    audio: str
    offset: float | None = None
    end: float | None = None
    from_manifest: bool = False


@dataclass
class Failure:
    name: str
    reason: str


def expand_inputs(paths: list[str]) -> tuple[list[Item], list[Failure]]:
    """Files as given, folders walked recursively (sorted), manifests row by row."""
    from .data.manifest import read_rows

    items, failures = [], []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
            if not found:
                failures.append(Failure(raw, f"no audio files ({', '.join(sorted(AUDIO_SUFFIXES))}) in this folder"))
            items += [Item(str(p), str(p)) for p in found]
        elif path.suffix.lower() in MANIFEST_SUFFIXES and path.is_file():
            try:
                rows, bad = read_rows(path, strict=False)
            except UserError as e:
                failures.append(Failure(raw, str(e)))
                continue
            failures += [Failure(f"{raw}:{b.line}", f"{b.reason} {b.detail}".strip()) for b in bad]
            items += [Item(row.id, row.audio, row.offset, row.end, True) for row in rows]
        elif not path.exists():
            failures.append(Failure(raw, "no such file or folder"))
        else:
            items.append(Item(raw, raw))
    return items, failures


# --------------------------------------------------------------------------- long audio


def split_points(audio: np.ndarray, sr: int = SAMPLE_RATE) -> list[int]:
    """Sample indices of window boundaries, from 0 to ``len(audio)`` (see the module docstring)."""
    n = len(audio)
    bounds = [0]
    max_len, min_len, min_tail = int(MAX_WINDOW * sr), int(MIN_WINDOW * sr), int(MIN_TAIL * sr)
    frame = int(ENERGY_FRAME * sr)
    while n - bounds[-1] > max_len:
        start = bounds[-1]
        lo, hi = start + min_len, min(start + max_len, n - min_tail)
        segment = audio[lo:hi]
        n_frames = len(segment) // frame
        if n_frames < 1:
            bounds.append(hi)
            continue
        energy = (segment[: n_frames * frame].reshape(n_frames, frame).astype(np.float64) ** 2).mean(axis=1)
        span = max(1, int(QUIET_SPAN / ENERGY_FRAME))
        smooth = np.convolve(energy, np.ones(span) / span, mode="same")
        bounds.append(lo + int(np.argmin(smooth)) * frame + frame // 2)
    bounds.append(n)
    return bounds


def pause_points(audio: np.ndarray, sr: int = SAMPLE_RATE) -> list[int]:
    """Sample indices of segment boundaries at pauses, from 0 to ``len(audio)`` (see the module docstring)."""
    n = len(audio)
    frame = int(ENERGY_FRAME * sr)
    n_frames = n // frame
    if n <= int(MAX_WINDOW * sr):
        return [0, n]
    energy = (audio[: n_frames * frame].reshape(n_frames, frame).astype(np.float64) ** 2).mean(axis=1)
    db = 10 * np.log10(np.maximum(energy, 1e-10))
    floor, speech = np.percentile(db, 2), np.percentile(db, 95)
    # near the noise floor or far below speech, but never within 15 dB of speech (no pauses: windows)
    quiet = db < min(max(floor + 10.0, speech - 35.0), speech - 15.0)
    min_run = int(round(MIN_PAUSE / ENERGY_FRAME))
    cuts, i = [], 0
    while i < n_frames:  # the middle of each interior run of quiet frames long enough
        if not quiet[i]:
            i += 1
            continue
        j = i
        while j < n_frames and quiet[j]:
            j += 1
        if j - i >= min_run and i > 0 and j < n_frames:
            cuts.append((i + j) // 2 * frame)
        i = j
    min_piece = int(MIN_SEGMENT * sr)
    bounds = [0]
    for cut in cuts:
        if cut - bounds[-1] >= min_piece:
            bounds.append(cut)
    if len(bounds) > 1 and n - bounds[-1] < min_piece:
        bounds.pop()
    bounds.append(n)
    out = [0]
    for a, b in zip(bounds[:-1], bounds[1:]):  # pieces over 30 s: cut as in "windows"
        out += [a + x for x in split_points(audio[a:b], sr)[1:]]
    return out


def segment_bounds(audio: np.ndarray, split: str, sr: int = SAMPLE_RATE) -> list[int]:
    """Boundaries of the pieces to transcribe without VAD: ``split`` is "pauses" or "windows"."""
    return pause_points(audio, sr) if split == "pauses" else split_points(audio, sr)


class Cut(NamedTuple):
    """A piece of a file: ``start``/``end`` samples, why it is not decoded (None: it is), and, with VAD,
    the speech spans inside it (samples), where the completeness guard may split it."""

    start: int
    end: int
    skip_reason: str | None
    spans: tuple[tuple[int, int], ...] = ()

    def segment(self, **extra) -> dict:
        """Its segment before decoding: start, end (seconds), empty text, the skip reason if any."""
        out = {"start": round(self.start / SAMPLE_RATE, 3), "end": round(self.end / SAMPLE_RATE, 3), "text": ""}
        return {**out, **({"skip_reason": self.skip_reason} if self.skip_reason else {}), **extra}


def pieces(audio: np.ndarray, split: str, vad: bool, max_piece_s: float = MAX_WINDOW,
           max_spans: int | None = None) -> list[Cut]:
    """:class:`Cut` s covering ``audio``; a piece with a skip reason is not decoded: "no_speech_vad" (VAD
    found no speech), "silence" (digital silence), "too_short". With VAD, speech pieces are at most
    ``max_piece_s`` long and hold at most ``max_spans`` speech spans (:func:`piece_limits` of the model)."""
    if vad:
        from .vad import speech_pieces

        cuts = [Cut(p.start, p.end, None if p.speech else "no_speech_vad", p.spans)
                for p in speech_pieces(audio, max_piece_s, max_spans=max_spans)]
    else:
        bounds = segment_bounds(audio, split)
        cuts = [Cut(a, b, None) for a, b in zip(bounds[:-1], bounds[1:])]
    return [c._replace(skip_reason=c.skip_reason or inaudible(audio[c.start:c.end])) for c in cuts]


# --------------------------------------------------------------------------- completeness guard


def speech_seconds(cut: Cut) -> float:
    """Seconds of speech VAD found in a piece (its spans, padding included)."""
    return sum(b - a for a, b in cut.spans) / SAMPLE_RATE


def incomplete(text: str, cut: Cut, trained_on) -> bool:
    """Whether a decoded piece's text is far shorter than its speech predicts: fewer non-space characters
    than :data:`GUARD_FRACTION` of what the slow end of the training rows' speaking rate
    (``trained_on.chars_per_second_low``) gives for the piece's speech seconds. Needs the model's
    :class:`~asr_lora.settings.TrainedOn` record and the piece's VAD spans; never for an empty text
    (a piece Whisper judged silent keeps the silence rule)."""
    if trained_on is None or not cut.spans or not text:
        return False
    return len("".join(text.split())) < GUARD_FRACTION * trained_on.chars_per_second_low * speech_seconds(cut)


def inner_cuts(cut: Cut) -> list[Cut]:
    """A piece split at its inner VAD span boundaries (the middle of each gap between spans), one
    speech span a part; ``[]`` for a piece of one span."""
    if len(cut.spans) < 2:
        return []
    bounds = [cut.start] + [(a_end + b_start) // 2 for (_, a_end), (b_start, _) in zip(cut.spans, cut.spans[1:])]
    bounds.append(cut.end)
    return [Cut(a, b, None, (span,)) for a, b, span in zip(bounds[:-1], bounds[1:], cut.spans)]


def complete(decoded: list[tuple[Cut, np.ndarray, object]], decode: Callable[[list[np.ndarray]], list],
             trained_on) -> list[list[tuple[Cut, object, str | None]]]:
    """The completeness guard over decoded pieces ``(cut, piece audio, hypothesis)``: each piece whose text
    is :func:`incomplete` is decoded again split at its inner VAD spans (:func:`inner_cuts`, all such
    parts in one ``decode`` call), and the parts replace it when they hold more text. Returns, per piece,
    its ``(cut, hypothesis, why)`` parts: the piece itself (why None) or its parts (why "incomplete")."""
    out: list[list[tuple[Cut, object, str | None]]] = [[(cut, hyp, None)] for cut, _, hyp in decoded]
    retry = [(k, inner_cuts(cut)) for k, (cut, _, hyp) in enumerate(decoded) if incomplete(hyp.text, cut, trained_on)]
    retry = [(k, parts) for k, parts in retry if parts]
    if not retry:
        return out
    audios = [decoded[k][1][p.start - decoded[k][0].start:p.end - decoded[k][0].start] for k, parts in retry
              for p in parts]
    hyps = iter(decode(audios))
    for k, parts in retry:
        redone = [(p, next(hyps), "incomplete") for p in parts]
        if sum(len("".join(h.text.split())) for _, h, _ in redone) > len("".join(decoded[k][2].text.split())):
            out[k] = redone
    return out


def decoded_segments(parts: list[tuple[Cut, object, str | None]]) -> list[dict]:
    """The segments of one decoded piece from :func:`complete`'s parts (with their cues)."""
    return [cue for cut, hyp, why in parts
            for cue in with_cues(cut.segment(**({"redecoded": why} if why else {})), hyp)]


# --------------------------------------------------------------------------- output formats


@dataclass
class Transcript:
    item: Item
    duration: float
    segments: list[dict] = field(default_factory=list)  # {"start", "end", "text"}
    windows_left: int = 0  # pieces still to decode

    @property
    def text(self) -> str:
        return " ".join(s["text"] for s in self.segments if s["text"]).strip()


def _timestamp(seconds: float, sep: str) -> str:
    ms = int(round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def to_srt(t: Transcript) -> str:
    cues = [s for s in t.segments if s["text"]]
    return "".join(f"{i}\n{_timestamp(s['start'], ',')} --> {_timestamp(s['end'], ',')}\n{s['text']}\n\n"
                   for i, s in enumerate(cues, start=1))


def to_vtt(t: Transcript) -> str:
    cues = [s for s in t.segments if s["text"]]
    return "WEBVTT\n\n" + "".join(f"{_timestamp(s['start'], '.')} --> {_timestamp(s['end'], '.')}\n{s['text']}\n\n"
                                  for s in cues)


def to_json(t: Transcript, language: str) -> dict:
    return {"path": t.item.audio, "id": t.item.name if t.item.from_manifest else None,
            "duration": round(t.duration, 3), "language": language, "text": t.text, "segments": t.segments}


def _tsv_cell(text: str) -> str:
    return " ".join(text.split())


def tsv_rows(t: Transcript) -> list[str]:
    return [f"{t.item.name}\t{s['start']:.3f}\t{s['end']:.3f}\t{_tsv_cell(s['text'])}" for s in t.segments]


TSV_HEADER = "path\tstart\tend\ttext"


class Writer:
    """Writes each finished transcript: to stdout without ``out``, else one file per input
    (``<stem>.<fmt>``; ``tsv``: one ``transcripts.tsv``)."""

    def __init__(self, fmt: str, out: Path | None, language: str, stdout: TextIO):
        if fmt not in FORMATS:
            raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        self.fmt, self.out, self.language, self.stdout = fmt, out, language, stdout
        self.used: set[str] = set()
        self.written: list[Path] = []
        self.tsv = None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            if fmt == "tsv":
                self.tsv = open(out / TSV_NAME, "w", encoding="utf-8")
                self.tsv.write(TSV_HEADER + "\n")
                self.written.append(out / TSV_NAME)
        elif fmt == "tsv":
            self.stdout.write(TSV_HEADER + "\n")

    def _stem(self, item: Item) -> str:
        base = item.name if item.from_manifest else Path(item.name).stem
        base = "".join(c if c.isalnum() or c in "-_." else "_" for c in base) or "audio"
        stem, k = base, 1
        while stem in self.used:  # two inputs with one stem: a.flac, a-2.flac
            k += 1
            stem = f"{base}-{k}"
        self.used.add(stem)
        return stem

    def write(self, t: Transcript) -> None:
        if self.fmt == "tsv":
            lines = "".join(row + "\n" for row in tsv_rows(t))
            (self.tsv or self.stdout).write(lines)
            (self.tsv or self.stdout).flush()
            return
        if self.fmt == "txt":
            body = t.text + "\n" if self.out else f"{t.item.name}\t{t.text}\n"
        elif self.fmt == "json":
            body = json.dumps(to_json(t, self.language), ensure_ascii=False, indent=2 if self.out else None) + "\n"
        else:
            body = to_srt(t) if self.fmt == "srt" else to_vtt(t)
        if self.out is None:
            self.stdout.write(body)
            self.stdout.flush()
            return
        path = self.out / f"{self._stem(t.item)}.{self.fmt}"
        path.write_text(body, encoding="utf-8")
        self.written.append(path)

    def close(self) -> None:
        if self.tsv:
            self.tsv.close()


# --------------------------------------------------------------------------- the job


def inaudible(piece: np.ndarray, sr: int = SAMPLE_RATE) -> str | None:
    """Why a piece is not worth decoding ("too_short" under :data:`MIN_AUDIBLE`, "silence" for digital
    silence), or None."""
    if len(piece) < MIN_AUDIBLE * sr:
        return "too_short"
    return "silence" if float(np.abs(piece).max()) < SILENT_PEAK else None


def with_cues(segment: dict, hyp) -> list[dict]:
    """A decoded piece's segment filled from its hypothesis: itself, or with timestamps
    (``hyp.segments``) one segment per cue, offset by the piece's start, each with the piece's signals."""
    segment = {**segment, "text": hyp.text, **hyp.to_json()}
    if hyp.segments is None or not hyp.text:
        return [segment]
    start = segment["start"]
    return [{**segment, "start": round(start + c["start"], 3), "end": round(start + c["end"], 3), "text": c["text"]}
            for c in hyp.segments] or [segment]


def expand_cues(segments: list[dict]) -> list[dict]:
    """Segments with each piece that carries ``cues`` (from :func:`with_cues`) replaced by them."""
    return [c for s in segments for c in (s.pop("cues") if "cues" in s else [s])]


def transcribe_audio(audio: np.ndarray, decode: Callable[[list[np.ndarray]], list], split: str,
                     vad: bool = True, settings=None) -> list[dict]:
    """Segments (``start``, ``end``, ``text``, and the decode signals or a ``skip_reason``) of one 16 kHz
    waveform, cut as :func:`pieces` cuts it for a model of ``settings`` (its ``ModelSettings``: the
    longest piece, the completeness guard's speaking rate; None: 30 s pieces, no guard); ``decode`` (a
    transcriber's, or the server's batching queue) gets the pieces to decode in one call and returns
    their :class:`~asr_lora.backends.Hypothesis`."""
    cuts = pieces(audio, split, vad, *piece_limits(settings))
    segments = [c.segment() for c in cuts]
    todo = [k for k, c in enumerate(cuts) if c.skip_reason is None]
    hyps = decode([audio[cuts[k].start:cuts[k].end] for k in todo]) if todo else []
    decoded = [(cuts[k], audio[cuts[k].start:cuts[k].end], hyp) for k, hyp in zip(todo, hyps)]
    for k, parts in zip(todo, complete(decoded, decode, getattr(settings, "trained_on", None))):
        segments[k]["cues"] = decoded_segments(parts)
    return expand_cues(segments)


def piece_limits(settings) -> tuple[float, int | None]:
    """``(longest piece in seconds, most VAD speech spans a piece)`` for a model of ``settings``
    (``ModelSettings``; None: 30 s, any number): the longest input it was trained on, and one span a
    piece for a model trained on single utterances only."""
    if settings is None:
        return MAX_WINDOW, None
    return settings.max_input_seconds, 1 if settings.single_utterance else None


def _load(item: Item, failures: list[Failure]) -> np.ndarray | None:
    try:
        return load_audio(item.audio, offset=item.offset, end=item.end)
    except AudioError as e:
        failures.append(Failure(item.name, e.reason or str(e)))
        print(f"skipped {item.name}: {e.reason or e}", file=sys.stderr)
        return None


def resolve_split(split: str, settings) -> str:
    """``split`` checked, with "auto" resolved for a model of ``settings``: "pauses" for the trimmed audio
    context, "windows" otherwise."""
    if split not in SPLITS:
        raise UserError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == "auto":
        return "pauses" if settings.audio_context == "trimmed" else "windows"
    return split


def transcribe_items(transcriber, items: list[Item], writer: Writer, *, batch_size: int = TRANSCRIBE_BATCH_SIZE,
                     progress: bool = True, split: str = "auto", vad: bool = True,
                     condition_on_previous_text: bool = False) -> list[Failure]:
    """Transcribe ``items`` piece by piece in batches (pieces of several files share a batch),
    writing each transcript as soon as its last piece is done, in input order; returns the
    items that could not be read (each reported on stderr). ``split``, ``vad``,
    ``condition_on_previous_text``: see the module docstring."""
    split = resolve_split(split, transcriber.settings)
    from tqdm import tqdm

    failures: list[Failure] = []
    bar = tqdm(total=len(items), desc="transcribe", unit="file", disable=not progress, leave=False)
    pending: list[tuple[Transcript, int, np.ndarray, Cut]] = []  # (transcript, segment index, piece audio, cut)
    unfinished: list[Transcript] = []  # in input order
    settings = transcriber.settings

    def flush() -> None:
        if pending:
            hyps = transcriber.decode([audio for _, _, audio, _ in pending])
            decoded = [(cut, audio, hyp) for (_, _, audio, cut), hyp in zip(pending, hyps)]
            for (transcript, k, _, _), parts in zip(pending, complete(decoded, transcriber.decode,
                                                                      settings.trained_on)):
                transcript.segments[k]["cues"] = decoded_segments(parts)
                transcript.windows_left -= 1
            pending.clear()
        while unfinished and unfinished[0].windows_left == 0:
            done = unfinished.pop(0)
            done.segments = expand_cues(done.segments)
            writer.write(done)
            bar.update(1)

    for item in items:
        audio = _load(item, failures)
        if audio is None:
            bar.update(1)
            continue
        cuts = pieces(audio, split, vad, *piece_limits(settings))
        transcript = Transcript(item, len(audio) / SAMPLE_RATE, windows_left=sum(c.skip_reason is None for c in cuts))
        unfinished.append(transcript)
        if condition_on_previous_text:
            decode_in_order(transcriber, transcript, audio, cuts)
            flush()
            continue
        for k, cut in enumerate(cuts):
            transcript.segments.append(cut.segment())
            if cut.skip_reason is not None:
                continue
            pending.append((transcript, k, audio[cut.start:cut.end], cut))
            if len(pending) >= batch_size:
                flush()
    flush()
    bar.close()
    return failures


def decode_in_order(transcriber, transcript: Transcript, audio: np.ndarray, cuts: list) -> None:
    """Decode a file's pieces one after the other, each prompted with the options' prompt and the
    previous piece's text (condition_on_previous_text); the chain restarts after a piece decoded at a
    temperature above 0.5 or left empty (openai/whisper's rule)."""
    previous = ""
    for cut in cuts:
        segment = cut.segment()
        if cut.skip_reason is not None:
            transcript.segments.append(segment)
            continue
        prompt = " ".join(p for p in (transcriber.options.prompt, previous) if p) or None

        def decode(audios: list[np.ndarray]) -> list:
            return transcriber.decode(audios, prompts=[prompt] * len(audios))

        piece = audio[cut.start:cut.end]
        (parts,) = complete([(cut, piece, decode([piece])[0])], decode, transcriber.settings.trained_on)
        transcript.segments.append({**segment, "cues": decoded_segments(parts)})
        transcript.windows_left -= 1
        last = parts[-1][1]
        previous = " ".join(h.text for _, h, _ in parts if h.text) if last.text and last.temperature <= 0.5 else ""


def transcribe_paths(paths: list[str], source: ModelSource | None = None, options: DecodeOptions | None = None, *,
                     fmt: str = "txt", out: str | Path | None = None, batch_size: int = TRANSCRIBE_BATCH_SIZE,
                     progress: bool = True, stdout: TextIO | None = None, split: str = "auto",
                     vad: bool = True, condition_on_previous_text: bool = False) -> list[Failure]:
    """Transcribe files, folders and manifests (see the module docstring) with ``source`` (default:
    the bundled base); return the failures, each already reported on stderr."""
    from .sources import load_transcriber

    source = source or ModelSource("model", DEFAULT_MODEL)
    stdout = stdout or sys.stdout
    out = Path(out) if out else None
    items, failures = expand_inputs(paths)
    for f in failures:
        print(f"skipped {f.name}: {f.reason}", file=sys.stderr)
    if out is None and fmt in ("srt", "vtt") and len(items) > 1:
        raise UserError(f"--format {fmt} with {len(items)} inputs needs --out DIR (one file per input)")
    n_unreadable = 0
    if items:
        transcriber = load_transcriber(source, options)
        writer = Writer(fmt, out, transcriber.language, stdout)
        try:
            unreadable = transcribe_items(transcriber, items, writer, batch_size=batch_size, progress=progress,
                                          split=split, vad=vad, condition_on_previous_text=condition_on_previous_text)
        finally:
            writer.close()
        failures += unreadable
        n_unreadable = len(unreadable)
        if out is not None:
            print(f"wrote {len(writer.written)} file(s) to {out}", file=sys.stderr)
    total = len(items) + len(failures) - n_unreadable
    if failures:
        print(f"{len(failures)} of {total} input(s) failed", file=sys.stderr)
    return failures
