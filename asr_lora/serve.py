"""``asr-lora serve``: OpenAI's audio transcription API over base, adapter, merged and CTranslate2 models.

Endpoints (the contract every OpenAI SDK speaks): ``POST /v1/audio/transcriptions`` (multipart:
``file``, ``model``, ``language``, ``prompt``, ``response_format`` = json | text | srt | vtt |
verbose_json, ``temperature``, ``timestamp_granularities[]`` = segment), ``GET /v1/models`` and
``GET /health``.

Models: every ``--adapter NAME=DIR`` on one base shares that base, loaded once; peft's multi-adapter
API holds them all and the one decoding thread of that base selects each batch's adapter (and its
audio context, and the base itself with the adapters disabled) right before decoding it, so a batch
only ever runs with its own model's weights. ``--merged`` and ``--ct2`` folders are one model each.

Throughput: requests are decoded and cut into pieces (as ``asr-lora transcribe`` cuts them) in worker
threads; the pieces go to the queue of their model's engine, whose thread collects up to
``batch_size`` pieces of one model and language, waiting at most ``batch_wait_ms`` after the first,
and decodes them as one batch. The event loop only moves bytes.

The request's ``prompt`` is the initial prompt of every piece of that upload (``<|startofprev|>``
tokens, as ``asr-lora transcribe --prompt``); pieces with different prompts may share a batch.

Errors use OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``: 401 without the
API key, 404 for an unknown model (listing the served ones), 413 over ``--max-upload-mb`` or
``--max-audio-seconds``, 400 for an upload that does not decode (with the decoder's reason), 500 for a
failure of ours (the server keeps running). Uploads go to temporary files that are removed when the
request ends; uvicorn's graceful shutdown lets in-flight requests finish on SIGTERM.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from starlette.requests import Request  # at module level: FastAPI resolves the endpoints' annotations here

from .audio import SAMPLE_RATE, AudioError, audio_info, load_audio
from .errors import UserError
from .transcribe import Item, Transcript, resolve_split, to_srt, to_vtt, transcribe_audio

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_UPLOAD_MB = 25.0  # OpenAI's own limit for this endpoint
DEFAULT_MAX_AUDIO_SECONDS = 3600.0
DEFAULT_BATCH_SIZE = 8  # pieces per batch
DEFAULT_BATCH_WAIT_MS = 10.0  # how long a batch waits for more pieces after its first
API_KEY_ENV = "ASR_LORA_API_KEY"
RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
TRANSCRIPTIONS = "/v1/audio/transcriptions"
KINDS = ("model", "adapter", "merged", "ct2")

log = logging.getLogger("asr_lora.serve")


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --------------------------------------------------------------------------- models
# The one place that knows how model sources load (asr_lora.backends, asr_lora.model, peft).


@dataclass
class ModelSpec:
    """One model named on the command line: served as ``name``; ``kind`` is one of :data:`KINDS`."""

    name: str
    kind: str
    path: str


@dataclass
class ServedModel:
    """A name clients ask for, the transcriber that decodes it and the engine whose thread runs it."""

    name: str
    kind: str
    path: str
    transcriber: object  # backends.HFTranscriber or CT2Transcriber
    split: str  # "pauses" or "windows": how audio over 30 s is cut
    engine: Engine = field(repr=False)
    adapter: str | None = None  # peft adapter name inside a shared base; None: the base itself or a plain model
    vad: bool = True  # cut uploads at Silero VAD speech boundaries, as transcribe does
    created: int = field(default_factory=lambda: int(time.time()))

    def describe(self) -> dict:
        t = self.transcriber
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "asr-lora",
                "kind": self.kind, "language": t.language, "audio_context": t.settings.audio_context}


def default_base_name(model: str) -> str:
    """The name a base model is served under when ``--model`` gives none: ``bundled:whisper-base`` ->
    ``whisper-base``, a folder -> its name, a hub id unchanged."""
    if model.startswith("bundled:"):
        return model.split(":", 1)[1]
    return Path(model).name if Path(model).is_dir() else model


def _split_for(transcriber, split: str) -> str:
    return resolve_split(split, transcriber.settings)


def _check_names(names: list[str]) -> None:
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"two models would be served as {', '.join(map(repr, duplicates))}; name them apart "
                        "(--model NAME=MODEL, --adapter NAME=DIR)")
    if not all(names):
        raise UserError("every model needs a name (NAME=DIR)")


def _model_key(name: str) -> str:
    """One key per model, however it is spelled (``bundled:whisper-base`` or its cache folder)."""
    from .bundled import resolve_model

    path = Path(resolve_model(name))
    return str(path.resolve()) if path.is_dir() else name


def load_models(specs: list[ModelSpec], *, options=None, split: str = "auto") -> list[ServedModel]:
    """Load every model in ``specs``, in that order. Adapters are grouped by their base, which is loaded
    once and served too (under the ``--model`` name that names it, else :func:`default_base_name`).
    Every adapter is checked against its base before any weight loads. ``options``: how every model
    decodes (:class:`asr_lora.backends.DecodeOptions`; its language forced unless a request says)."""
    from .backends import DecodeOptions
    from .model import adapter_base_name, check_adapter_matches_base
    from .sources import ModelSource, load_transcriber

    options = options or DecodeOptions()
    _check_names([s.name for s in specs])
    for spec in specs:
        if spec.kind not in KINDS:
            raise UserError(f"unknown model kind {spec.kind!r}; one of {', '.join(KINDS)}")
    bases: dict[str, str] = {}  # key -> base model name
    adapters: dict[str, list[ModelSpec]] = {}
    named: dict[str, ModelSpec] = {}  # key -> the --model spec that names this base
    for spec in specs:
        if spec.kind == "adapter":
            base = adapter_base_name(spec.path)
            check_adapter_matches_base(spec.path, base)
            _check_safetensors(Path(spec.path))
            key = _model_key(base)
            bases.setdefault(key, base)
            adapters.setdefault(key, []).append(spec)
        elif spec.kind == "model":
            key = _model_key(spec.path)
            if key in named:
                raise UserError(f"--model {named[key].name}={named[key].path} and --model {spec.name}={spec.path} "
                                "are the same model")
            bases.setdefault(key, spec.path)
            named[key] = spec

    served: list[ServedModel] = []
    for key, base in bases.items():
        name = named[key].name if key in named else default_base_name(base)
        if key in adapters:
            served += _load_adapter_group(base, name, adapters[key], options, split)
        else:
            t = load_transcriber(ModelSource("model", named[key].path), options)
            served.append(ServedModel(name, "model", named[key].path, t, _split_for(t, split), Engine(name)))
    for spec in specs:
        if spec.kind in ("merged", "ct2"):
            t = load_transcriber(ModelSource(spec.kind, spec.path), options)
            served.append(ServedModel(spec.name, spec.kind, spec.path, t, _split_for(t, split), Engine(spec.name)))
    _check_names([m.name for m in served])  # a base served under its default name may collide
    order = {spec.name: i for i, spec in enumerate(specs)}
    return sorted(served, key=lambda m: order.get(m.name, -1))


def _check_safetensors(folder: Path) -> None:
    from .model import ADAPTER_WEIGHTS

    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise UserError(f"{folder}: no {ADAPTER_WEIGHTS} (only safetensors adapters are served)")


def _load_adapter_group(base: str, base_name: str, adapters: list[ModelSpec], options,
                        split: str) -> list[ServedModel]:
    """One base in full precision, every adapter on it through peft (``PeftModel.from_pretrained`` for
    the first, ``load_adapter`` for the rest), and the base itself served with the adapters disabled."""
    import torch
    from peft import PeftModel

    from .backends import HFTranscriber, column_major_decoder
    from .model import load_base_for_training, load_processor
    from .settings import ModelSettings, read_settings
    from .trimmed import apply_audio_context

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = load_base_for_training(base, "none").to(device).eval()
    peft_model = PeftModel.from_pretrained(hf, adapters[0].path, adapter_name="adapter0", is_trainable=False)
    for i, spec in enumerate(adapters[1:], start=1):
        peft_model.load_adapter(spec.path, adapter_name=f"adapter{i}", is_trainable=False)
    peft_model.eval()
    column_major_decoder(peft_model)  # decoding only from here on
    tokenizer = load_processor(base).tokenizer
    engine = Engine(base_name, peft_model)
    served = []
    for i, spec in enumerate(adapters):
        settings = read_settings(Path(spec.path))
        settings.base_model = settings.base_model or base
        apply_audio_context(peft_model, settings.audio_context)  # as _selected does before each of its batches
        t = HFTranscriber(peft_model, tokenizer, settings, options, f"adapter:{spec.path}")
        served.append(ServedModel(spec.name, "adapter", spec.path, t, _split_for(t, split), engine, f"adapter{i}"))
    settings = read_settings(Path(base)) if Path(base).is_dir() else ModelSettings()
    apply_audio_context(peft_model, settings.audio_context)
    t = HFTranscriber(peft_model, tokenizer, settings, options, f"model:{base}")
    served.append(ServedModel(base_name, "model", base, t, _split_for(t, split), engine))
    return served


@contextlib.contextmanager
def _selected(model: ServedModel):
    """Run ``model``'s batch with its own weights: its adapter active (or all disabled for the base)
    and its audio context applied to the shared encoder. Called on the engine's thread only."""
    from .trimmed import apply_audio_context

    peft_model = model.engine.peft_model
    if peft_model is None:
        yield
        return
    if model.adapter is None:
        with peft_model.disable_adapter():
            apply_audio_context(peft_model, model.transcriber.settings.audio_context)
            yield
    else:
        peft_model.set_adapter(model.adapter, inference_mode=True)
        apply_audio_context(peft_model, model.transcriber.settings.audio_context)
        yield


@contextlib.contextmanager
def _forced_language(transcriber, language: str | None):
    """Decode with ``language`` forced instead of the model's own, for one batch."""
    if not language or language == transcriber.language:
        yield
        return
    own, own_prompt = transcriber.language, getattr(transcriber, "prompt", None)
    transcriber.language = language
    if own_prompt is not None:  # CTranslate2: the prompt tokens are built once
        transcriber.prompt = [*own_prompt[:1], transcriber.tokenizer.token_to_id(f"<|{language}|>"), *own_prompt[2:]]
    try:
        yield
    finally:
        transcriber.language = own
        if own_prompt is not None:
            transcriber.prompt = own_prompt


def knows_language(transcriber, language: str) -> bool:
    """Whether the model's tokenizer has the language token."""
    token = f"<|{language}|>"
    tokenizer = transcriber.tokenizer
    if hasattr(tokenizer, "token_to_id"):  # tokenizers.Tokenizer (CTranslate2)
        return tokenizer.token_to_id(token) is not None
    return tokenizer.convert_tokens_to_ids(token) not in (None, tokenizer.unk_token_id)


# --------------------------------------------------------------------------- batching


@dataclass
class _Piece:
    model: ServedModel
    language: str | None
    audio: np.ndarray
    future: Future
    prompt: str | None = None  # the request's initial prompt


class Engine:
    """One loaded model (a base with its adapters, a merged model, a CT2 export) and its decoding thread.

    Pieces wait in one queue; the thread takes the oldest piece's model and language, collects up to
    ``batch_size`` pieces of that model and language (waiting at most ``batch_wait`` seconds after the
    oldest arrived) and decodes them in one batch. Only this thread touches the model, so switching
    adapters and audio contexts between batches needs no other lock.
    """

    def __init__(self, name: str, peft_model=None):
        self.name = name
        self.peft_model = peft_model
        self.batch_size, self.batch_wait = DEFAULT_BATCH_SIZE, DEFAULT_BATCH_WAIT_MS / 1000
        self.stats = {"batches": 0, "pieces": 0, "largest_batch": 0}
        self._queue: deque[_Piece] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def start(self, batch_size: int, batch_wait_ms: float) -> None:
        if self._thread is None:
            self.batch_size, self.batch_wait = batch_size, batch_wait_ms / 1000
            self._thread = threading.Thread(target=self._run, name=f"decode-{self.name}", daemon=True)
            self._thread.start()

    def decode(self, model: ServedModel, language: str | None, pieces: list[np.ndarray],
               prompt: str | None = None) -> list[str]:
        """Transcripts of ``pieces`` (each at most 30 s), decoded in batches on the engine's thread;
        blocks the calling (worker) thread until they are done."""
        futures = []
        with self._cond:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            for audio in pieces:
                futures.append(Future())
                self._queue.append(_Piece(model, language, audio, futures[-1], prompt))
            self._cond.notify()
        return [f.result() for f in futures]

    def close(self) -> None:
        """Stop the thread once the queue is empty."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def _next_batch(self) -> list[_Piece] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            first = self._queue[0]
            deadline = time.monotonic() + self.batch_wait

            def same(p: _Piece) -> bool:
                return p.model is first.model and p.language == first.language

            while sum(map(same, self._queue)) < self.batch_size and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch = [p for p in self._queue if same(p)][: self.batch_size]
            for p in batch:
                self._queue.remove(p)
            return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            model, language = batch[0].model, batch[0].language
            try:
                with _selected(model), _forced_language(model.transcriber, language):
                    prompts = [p.prompt or model.transcriber.options.prompt for p in batch]
                    texts = model.transcriber.decode([p.audio for p in batch], prompts=prompts)  # Hypothesis per piece
            except BaseException as e:  # the batch's requests fail; the thread and the server go on
                log.exception("decoding a batch of %d piece(s) for %s failed", len(batch), model.name)
                for p in batch:
                    p.future.set_exception(e)
                continue
            self.stats["batches"] += 1
            self.stats["pieces"] += len(batch)
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
            for p, text in zip(batch, texts):
                p.future.set_result(text)


# --------------------------------------------------------------------------- responses


def _language_name(code: str) -> str:
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    return LANGUAGES.get(code, code)


def _language_code(value: str) -> str:
    """ISO code (``ko``) or Whisper's English name (``korean``) -> code; ApiError if unknown."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    from .backends import language_code

    code = language_code(value).strip().lower()
    if code in LANGUAGES:
        return code
    raise ApiError(400, f"unsupported language {code!r}; give an ISO-639-1 code such as 'ko' or 'en'",
                   "unsupported_language", "language")


def verbose_json(segments: list[dict], duration: float, language: str) -> dict:
    """OpenAI's ``verbose_json``: one segment per decoded piece with text, with the signals that judged
    it (``no_speech_prob``, ``avg_logprob``, ``compression_ratio``, ``temperature``; ``redecoded`` when the
    completeness guard split its piece); ``tokens`` empty."""
    spoken = [s for s in segments if s["text"]]
    return {
        "task": "transcribe", "language": _language_name(language), "duration": round(duration, 3),
        "text": " ".join(s["text"] for s in spoken).strip(),
        "segments": [{"id": i, "seek": int(round(s["start"] * 100)), "start": s["start"], "end": s["end"],
                      "text": s["text"], "tokens": [], "temperature": s.get("temperature", 0.0),
                      "avg_logprob": s.get("avg_logprob"), "compression_ratio": s.get("compression_ratio"),
                      "no_speech_prob": s.get("no_speech_prob"),
                      **({"redecoded": s["redecoded"]} if s.get("redecoded") else {})}
                     for i, s in enumerate(spoken)],
    }


def render(segments: list[dict], duration: float, language: str, response_format: str, filename: str):
    """The response body for ``response_format``: (content, media type)."""
    transcript = Transcript(Item(filename, filename), duration, segments)
    if response_format == "json":
        return {"text": transcript.text}, "application/json"
    if response_format == "verbose_json":
        return verbose_json(segments, duration, language), "application/json"
    if response_format == "text":
        return transcript.text + "\n", "text/plain"
    if response_format == "srt":
        return to_srt(transcript), "text/plain"
    return to_vtt(transcript), "text/vtt"


# --------------------------------------------------------------------------- the app


@dataclass
class ServerOptions:
    api_key: str | None = None
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS
    batch_size: int = DEFAULT_BATCH_SIZE
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS
    tmp_dir: str | None = None  # parent of the upload folder (default: the system's)


class _BodyTooLarge(Exception):
    pass


class _Guard:
    """ASGI middleware in front of everything: the API key on /v1/*, and the upload size (refused from
    its Content-Length before reading, else counted while it streams in)."""

    def __init__(self, app, api_key: str | None, max_bytes: int):
        self.app, self.api_key, self.max_bytes = app, api_key, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key and scope["path"].startswith("/v1/"):
            given = headers.get("authorization", "")
            token = given[7:].strip() if given[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                await _drain(receive)
                return await _send_error(send, ApiError(401, "missing or incorrect API key: send "
                                                        "'Authorization: Bearer <key>'", "invalid_api_key"))
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            await _drain(receive)
            return await _send_error(send, _too_large(self.max_bytes))
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                if message.get("more_body"):
                    await _drain(receive)
                raise _BodyTooLarge
            return message

        return await self.app(scope, counted, send)


async def _drain(receive) -> None:
    """Read a request body to its end, keeping nothing: a client still sending it would otherwise
    see a broken connection instead of the answer."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"upload larger than the server's limit of {max_bytes / 2**20:g} MB (--max-upload-mb)",
                    "file_too_large", "file")


async def _send_error(send, error: ApiError) -> None:
    import json

    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def create_app(models: list[ServedModel], options: ServerOptions):
    """The FastAPI app serving ``models``; the engines' threads start and stop with its lifespan."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException

    by_name = {m.name: m for m in models}
    engines = list({id(m.engine): m.engine for m in models}.values())
    max_bytes = int(options.max_upload_mb * 2**20)
    uploads: dict[str, Path] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        folder = Path(tempfile.mkdtemp(prefix="asr-lora-serve-", dir=options.tmp_dir))
        uploads["dir"] = folder
        for engine in engines:
            engine.start(options.batch_size, options.batch_wait_ms)
        try:
            yield
        finally:
            for engine in engines:
                await run_in_threadpool(engine.close)
            shutil.rmtree(folder, ignore_errors=True)

    app = FastAPI(title="asr-lora", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def error_response(error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(ApiError)
    async def _api_error(request, error: ApiError):
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def _http_error(request, error: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return error_response(ApiError(error.status_code, str(error.detail), code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, error: RequestValidationError):
        return error_response(ApiError(400, str(error), "invalid_request"))

    @app.get("/health")
    async def health():
        stats = {k: sum(e.stats[k] for e in engines) for k in ("batches", "pieces")}
        stats["largest_batch"] = max((e.stats["largest_batch"] for e in engines), default=0)
        stats["queued"] = sum(len(e._queue) for e in engines)
        return {"status": "ok", "models": list(by_name), **stats}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [m.describe() for m in models]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        return _find_model(by_name, name).describe()

    @app.post(TRANSCRIPTIONS)
    async def transcriptions(request: Request):
        upload_path = None
        try:
            async with request.form(max_files=1, max_fields=32) as form:
                fields = _parse_fields(form, by_name, UploadFile)
                upload_path = await _save_upload(form["file"], uploads["dir"])
            try:
                audio = await run_in_threadpool(_decode_upload, upload_path, fields["filename"],
                                                options.max_audio_seconds)
            finally:
                upload_path.unlink(missing_ok=True)  # decoded: the file is not needed any more
            model: ServedModel = fields["model"]
            segments = await run_in_threadpool(
                transcribe_audio, audio, partial(model.engine.decode, model, fields["language"],
                                                 prompt=fields["prompt"]), model.split,
                model.vad, model.transcriber.settings)
            content, media_type = render(segments, len(audio) / SAMPLE_RATE,
                                         fields["language"] or model.transcriber.language,
                                         fields["response_format"], fields["filename"])
            if isinstance(content, dict):
                return JSONResponse(content)
            return Response(content, media_type=media_type)
        except ApiError as e:
            return error_response(e)
        except _BodyTooLarge:
            return error_response(_too_large(max_bytes))
        except HTTPException as e:  # malformed multipart
            return error_response(ApiError(e.status_code, f"malformed request: {e.detail}", "invalid_request"))
        except Exception as e:  # a bug of ours: this request fails, the server goes on
            log.exception("transcription failed")
            return error_response(ApiError(500, f"internal error ({type(e).__name__}: {e})", "server_error",
                                           type="server_error"))
        finally:
            if upload_path is not None:  # also when the request failed before decoding
                upload_path.unlink(missing_ok=True)

    return _Guard(app, options.api_key, max_bytes)


def _find_model(by_name: dict, name: str | None) -> ServedModel:
    if not name:
        if len(by_name) == 1:
            return next(iter(by_name.values()))
        raise ApiError(400, f"'model' is required; served models: {', '.join(by_name)}", "missing_model", "model")
    if name not in by_name:
        raise ApiError(404, f"model {name!r} not found; served models: {', '.join(by_name)}", "model_not_found",
                       "model")
    return by_name[name]


def _parse_fields(form, by_name: dict, upload_type) -> dict:
    """The request's OpenAI fields, validated; the upload itself stays in ``form["file"]``."""
    upload = form.get("file")
    if not isinstance(upload, upload_type):
        raise ApiError(400, "no audio file: send it as the multipart field 'file'", "missing_file", "file")
    for key, value in form.multi_items():
        if key != "file" and not isinstance(value, str):
            raise ApiError(400, f"field {key!r} must be text, not a file", "invalid_value", key)
    model = _find_model(by_name, (form.get("model") or "").strip() or None)
    response_format = (form.get("response_format") or "json").strip()
    if response_format not in RESPONSE_FORMATS:
        raise ApiError(400, f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, got {response_format!r}",
                       "invalid_value", "response_format")
    language = form.get("language") or None
    if language:
        language = _language_code(language)
        if not knows_language(model.transcriber, language):
            raise ApiError(400, f"model {model.name!r} has no language token for {language!r}",
                           "unsupported_language", "language")
    temperature = form.get("temperature")
    if temperature not in (None, ""):
        try:
            value = float(temperature)
        except ValueError:
            value = -1.0
        if not 0.0 <= value <= 1.0:
            raise ApiError(400, f"temperature must be a number in [0, 1], got {temperature!r}", "invalid_value",
                           "temperature")
    granularities = form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")
    unsupported = sorted(set(granularities) - {"segment"})
    if unsupported:
        raise ApiError(400, f"timestamp_granularities: only 'segment' is supported, got {', '.join(unsupported)}",
                       "invalid_value", "timestamp_granularities[]")
    filename = Path(upload.filename or "upload").name or "upload"
    prompt = (form.get("prompt") or "").strip() or None
    return {"model": model, "response_format": response_format, "language": language, "filename": filename,
            "prompt": prompt}


async def _save_upload(upload, folder: Path) -> Path:
    """Copy the upload into a temporary file of ``folder`` keeping its suffix (a decoder hint); the
    caller removes it."""
    suffix = Path(upload.filename or "").suffix.lower()
    suffix = suffix if suffix[1:].isalnum() and len(suffix) <= 8 else ""
    fd, name = tempfile.mkstemp(suffix=suffix, dir=folder)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := await upload.read(1 << 20):
                out.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _decode_upload(path: Path, filename: str, max_seconds: float) -> np.ndarray:
    """16 kHz mono samples of an upload; 400 if it does not decode, 413 if longer than ``max_seconds``
    (refused from the header when it has one; never more than that is decoded when it has none)."""
    too_long = ApiError(413, f"audio longer than the server's limit of {max_seconds:g} s (--max-audio-seconds)",
                        "audio_too_long", "file")
    try:
        duration = audio_info(path)[0]
    except AudioError:
        duration = None
    if duration is not None and duration > max_seconds + 0.5:
        raise too_long
    try:
        audio = load_audio(path, end=None if duration is not None else max_seconds + 1.0)
    except AudioError as e:
        raise ApiError(400, f"{filename}: {e.reason or 'cannot decode'}", "invalid_audio", "file") from None
    if len(audio) > max_seconds * SAMPLE_RATE:
        raise too_long
    return audio


# --------------------------------------------------------------------------- running


def serve(specs: list[ModelSpec], *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          options: ServerOptions | None = None, decode=None, split: str = "auto", vad: bool = True,
          log_level: str = "info") -> None:
    """Load the models, then serve them with uvicorn until SIGINT/SIGTERM (in-flight requests finish)."""
    import sys

    import uvicorn

    options = options or ServerOptions()
    if options.max_upload_mb <= 0 or options.max_audio_seconds <= 0:
        raise UserError("--max-upload-mb and --max-audio-seconds must be positive")
    if options.batch_size < 1 or options.batch_wait_ms < 0:
        raise UserError("--batch-size must be at least 1 and --batch-wait-ms at least 0")
    from .backends import DecodeOptions

    decode = decode or DecodeOptions()
    if decode.language:
        decode.language = _language_code_or_user_error(decode.language)
    models = load_models(specs, options=decode, split=split)
    for m in models:
        m.vad = vad
        t = m.transcriber
        print(f"serving {m.name!r}: {m.kind} {m.path} (language {t.language}, audio context "
              f"{t.settings.audio_context}, {'VAD' if vad else f'no VAD, split {m.split}'})", file=sys.stderr)
    batching = (f"batches of up to {options.batch_size} pieces, waiting up to {options.batch_wait_ms:g} ms"
                if options.batch_size > 1 else "batching off")
    print(f"{batching}; API key {'required' if options.api_key else 'not required'}; "
          f"http://{host}:{port}{TRANSCRIPTIONS}", file=sys.stderr, flush=True)
    if not options.api_key and host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host} without an API key: anyone who reaches this port can use it "
              f"(set --api-key or {API_KEY_ENV})", file=sys.stderr, flush=True)
    app = create_app(models, options)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on")).run()


def _language_code_or_user_error(value: str) -> str:
    try:
        return _language_code(value)
    except ApiError as e:
        raise UserError(f"--language: {e.message}") from None
