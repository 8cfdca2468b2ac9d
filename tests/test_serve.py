"""`asr-lora serve` against the official `openai` client: a live server on 127.0.0.1 (a subprocess on a
free port), two tiny adapters trained to say different things on one base, every response format, media
uploads, auth, limits, errors, batching under concurrency, and a graceful SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from asr_lora.audio import SAMPLE_RATE, load_audio

from .conftest import ASSETS, REPO
from .test_audio import encode_media, long_clip

openai = pytest.importorskip("openai")

API_KEY = "test-key-123"
TEXTS = {"A": "사과 나무", "B": "바다 물결"}  # what each adapter is trained to say
MAX_NEW_TOKENS = 8


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def adapters(tiny_whisper, tmp_path_factory) -> dict[str, Path]:
    """Two LoRA adapters on the tiny base, each trained by `asr_lora.train` until it says its text."""
    from asr_lora.config import load_recipe
    from asr_lora.train import run_training

    folder = tmp_path_factory.mktemp("adapters")
    clips = [str(ASSETS / name) for name in ("ko_finetune.flac", "en_fox.flac")]
    out = {}
    for name, text in TEXTS.items():
        manifest = folder / f"{name}.jsonl"
        manifest.write_text("".join(json.dumps({"id": f"{name}{i}", "audio": c, "text": text}, ensure_ascii=False)
                                    + "\n" for i, c in enumerate(clips)), encoding="utf-8")
        cfg = load_recipe(None, [
            f"model.name={tiny_whisper}", "model.gradient_checkpointing=false", "model.audio_context=trimmed",
            "lora.r=8", "lora.alpha=16", "lora.dropout=0.0", "lora.target_modules=[q_proj,v_proj,out_proj,fc1,fc2]",
            f"data.train={manifest}", f"data.dev={manifest}", f"train.output_dir={folder / name}", "train.lr=1e-2",
            "train.warmup_steps=0", "train.max_steps=40", "train.eval_every=40", "train.save_every=40",
            "train.batch_size=2", "eval.max_new_tokens=4", "eval.batch_size=2",
        ])
        run_training(cfg, resume=False, progress=False)
        out[name] = folder / name / "final"
    return out


@pytest.fixture(scope="module")
def shipped(adapters, tmp_path_factory) -> dict[str, Path]:
    """Adapter B merged ("Bm") and exported to CTranslate2 float32 ("Bc"), parity-checked by asr-lora."""
    from asr_lora.export import export_ct2, merge_adapter

    folder = tmp_path_factory.mktemp("shipped")
    data = adapters["B"].parents[1] / "B.jsonl"
    merge_adapter(adapters["B"], folder / "merged", data=data, max_new_tokens=4, log=lambda *a: None)
    export_ct2(folder / "merged", folder / "ct2", quantization="float32", data=data, max_new_tokens=4,
               log=lambda *a: None)
    return {"Bm": folder / "merged", "Bc": folder / "ct2"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`asr-lora serve ARGS` as a subprocess of this worktree's package, on a free port of 127.0.0.1."""

    def __init__(self, args: list[str], tmp: Path, env: dict | None = None):
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp.parent / f"server-{self.port}.log", "w+")
        environ = {k: v for k, v in os.environ.items() if k != "ASR_LORA_API_KEY"}
        environ.update({"PYTHONPATH": str(REPO), "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1", **(env or {})})
        self.proc = subprocess.Popen([sys.executable, "-m", "asr_lora.cli", "serve", "--port", str(self.port), *args],
                                     cwd=REPO, env=environ, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server not ready in 180 s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def client(self, api_key: str = API_KEY):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(tiny_whisper, adapters, shipped, tmp_path_factory):
    """The tiny base (as "tiny") with adapters A and B on it, B merged and in CTranslate2, an API key and
    small limits."""
    tmp = tmp_path_factory.mktemp("serve") / "tmp"
    srv = Server(["--model", f"tiny={tiny_whisper}", "--adapter", f"A={adapters['A']}", "--adapter",
                  f"B={adapters['B']}", "--merged", f"Bm={shipped['Bm']}", "--ct2", f"Bc={shipped['Bc']}",
                  "--api-key", API_KEY, "--max-upload-mb", "2", "--max-audio-seconds", "60",
                  "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-wait-ms", "50", "--no-vad", "--no-fallback"], tmp)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def reference(tiny_whisper, adapters, shipped):
    """Each model loaded alone, as `asr-lora transcribe` loads it: model name -> transcriber."""
    from asr_lora.sources import ModelSource, load_transcriber

    def load(kind, path):
        return load_transcriber(ModelSource(kind, str(path)), greedy())

    return {"tiny": load("model", tiny_whisper), **{name: load("adapter", path) for name, path in adapters.items()},
            "Bm": load("merged", shipped["Bm"]), "Bc": load("ct2", shipped["Bc"])}


def greedy(**kwargs):
    """How the test servers decode (--no-fallback): greedily once, so batched and alone agree."""
    from asr_lora.backends import DecodeOptions

    return DecodeOptions(max_new_tokens=MAX_NEW_TOKENS, temperatures=(0.0,), **kwargs)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    """Three different 2.5 s clips (equal lengths: a trimmed batch of them has no padding, so batched
    and alone decode the same numbers)."""
    folder = tmp_path_factory.mktemp("clips")
    out = {}
    for name in ("ko_finetune", "en_fox", "en_callback"):
        audio = load_audio(ASSETS / f"{name}.flac")[: 5 * SAMPLE_RATE // 2]
        assert len(audio) == 5 * SAMPLE_RATE // 2
        sf.write(folder / f"{name}.wav", audio, SAMPLE_RATE)
        out[name] = folder / f"{name}.wav"
    return out


def transcribe(client, model: str, path: Path, **kwargs):
    with open(path, "rb") as f:
        return client.audio.transcriptions.create(model=model, file=(path.name, f.read()), **kwargs)


def error_of(excinfo) -> dict:
    """The OpenAI error object of a failed call, checked for OpenAI's shape."""
    body = excinfo.value.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


# --------------------------------------------------------------------------- the command line


def test_command_line_errors_are_one_line(tmp_path, capsys):
    from asr_lora.cli import main

    for argv, message in [
        (["--adapter", str(tmp_path)], "give NAME=DIR"),
        (["--adapter", f"A={tmp_path / 'nowhere'}"], "no such folder"),
        (["--adapter", f"A={tmp_path}", "--ct2", f"A={tmp_path}"], "two models would be served as 'A'"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--max-upload-mb", "0"], "must be positive"),
        (["--language", "klingon"], "--language: unsupported language 'klingon'"),
    ]:
        assert main(["serve", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("asr-lora serve: error: ") and message in err and err.count("\n") == 1


# --------------------------------------------------------------------------- models


def test_models_health_and_the_adapters_differ(server, reference, clips):
    health = httpx.get(f"{server.url}/health").json()  # no key needed
    assert health["status"] == "ok" and health["models"] == ["tiny", "A", "B", "Bm", "Bc"]
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny", "A", "B", "Bm", "Bc"]
    kinds = {m.id: m.model_dump()["kind"] for m in models.data}
    assert kinds == {"tiny": "model", "A": "adapter", "B": "adapter", "Bm": "merged", "Bc": "ct2"}
    assert {m.id: m.model_dump()["audio_context"] for m in models.data}["Bc"] == "trimmed"  # travels with B
    audio = load_audio(clips["ko_finetune"])
    alone = {name: t.transcribe_batch([audio])[0] for name, t in reference.items()}
    assert alone["A"].startswith(TEXTS["A"]) and alone["B"].startswith(TEXTS["B"])  # trained to differ
    assert alone["Bm"].startswith(TEXTS["B"]) and alone["Bc"].startswith(TEXTS["B"])
    assert not alone["tiny"].startswith((TEXTS["A"], TEXTS["B"]))


def test_two_adapters_and_the_base_under_concurrency(server, reference, clips):
    """Requests for A, B, the base they share, and the merged and CTranslate2 models at the same moment
    each get their own model's transcript (the one the model gives loaded alone), while the server
    batches them."""
    expected = {(m, c): t.transcribe_batch([load_audio(p)])[0]
                for m, t in reference.items() for c, p in clips.items()}
    assert len({expected[m, "ko_finetune"] for m in ("A", "B", "tiny")}) == 3
    before = httpx.get(f"{server.url}/health").json()
    jobs = [(m, c) for _ in range(2) for m in ("A", "B", "tiny", "A", "B", "Bm", "Bc") for c in clips]  # 42, mixed
    client = server.client()
    with ThreadPoolExecutor(max_workers=12) as pool:
        got = list(pool.map(lambda job: transcribe(client, job[0], clips[job[1]]).text, jobs))
    wrong = [(job, text, expected[job]) for job, text in zip(jobs, got) if text != expected[job]]
    assert not wrong
    after = httpx.get(f"{server.url}/health").json()
    assert after["pieces"] - before["pieces"] == len(jobs)
    assert after["batches"] - before["batches"] < len(jobs)  # some requests shared a batch
    assert after["largest_batch"] > 1


# --------------------------------------------------------------------------- formats and media


@pytest.fixture(scope="module")
def long_flac(tmp_path_factory) -> Path:
    """40 s of speech (over 30 s: the server cuts it as `asr-lora transcribe` does)."""
    audio = np.concatenate([long_clip()] * 3 + [long_clip()[: 2 * SAMPLE_RATE]])
    path = tmp_path_factory.mktemp("long") / "meeting.flac"
    sf.write(path, audio, SAMPLE_RATE)
    return path


def test_every_response_format(server, adapters, long_flac, capsys):
    from asr_lora.transcribe import transcribe_paths

    client = server.client()
    verbose = transcribe(client, "B", long_flac, response_format="verbose_json", timestamp_granularities=["segment"])
    data = verbose.model_dump()
    assert data["task"] == "transcribe" and data["language"] == "korean"
    assert data["duration"] == pytest.approx(40.0, abs=0.1)
    segments = data["segments"]
    assert len(segments) >= 2 and [s["id"] for s in segments] == list(range(len(segments)))
    assert segments[0]["start"] == 0.0 and segments[-1]["end"] == pytest.approx(data["duration"], abs=1e-3)
    for s in segments:
        assert s["end"] > s["start"] and s["text"] and set(s) >= {"seek", "tokens", "temperature", "avg_logprob",
                                                                   "compression_ratio", "no_speech_prob"}
    for a, b in zip(segments[:-1], segments[1:]):
        assert a["end"] == b["start"]
    # the pieces and their texts are those of `asr-lora transcribe` with the same adapter
    from asr_lora.sources import ModelSource

    transcribe_paths([str(long_flac)], ModelSource("adapter", str(adapters["B"])), greedy(), fmt="json",
                     progress=False, vad=False)
    offline = json.loads(capsys.readouterr().out)
    assert [(s["start"], s["end"], s["text"]) for s in segments] == \
        [(s["start"], s["end"], s["text"]) for s in offline["segments"] if s["text"]]
    assert data["text"] == offline["text"]

    assert transcribe(client, "B", long_flac).text == data["text"]  # json
    assert transcribe(client, "B", long_flac, response_format="text").strip() == data["text"]
    srt = transcribe(client, "B", long_flac, response_format="srt")
    cues = [c.splitlines() for c in srt.strip().split("\n\n")]
    assert [c[0] for c in cues] == [str(i) for i in range(1, len(segments) + 1)]
    assert cues[0][1].startswith("00:00:00,000 --> ") and [c[2] for c in cues] == [s["text"] for s in segments]
    vtt = transcribe(client, "B", long_flac, response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> ") and vtt.count(" --> ") == len(segments)

    with pytest.raises(openai.BadRequestError) as err:
        transcribe(client, "B", long_flac, response_format="verbose_json", timestamp_granularities=["word"])
    assert error_of(err)["param"] == "timestamp_granularities[]"
    with pytest.raises(openai.BadRequestError) as err:
        transcribe(client, "B", long_flac, response_format="tsv")
    assert error_of(err)["param"] == "response_format"


def test_m4a_and_webm_uploads(server, reference, tmp_path):
    source = load_audio(ASSETS / "ko_finetune.flac")
    client = server.client()
    for name, codec, rate in (("phone.m4a", "aac", 16000), ("meeting.webm", "libopus", 48000)):
        path = encode_media(source, tmp_path / name, codec, rate)
        for model in ("A", "B"):
            want = reference[model].transcribe_batch([load_audio(path)])[0]
            assert want.startswith(TEXTS[model])
            assert transcribe(client, model, path).text == want


def test_request_language_is_forced(server, clips, tiny_whisper, shipped):
    from asr_lora.sources import ModelSource, load_transcriber

    client = server.client()
    audio = load_audio(clips["en_fox"])
    for name, source in (("tiny", ModelSource("model", str(tiny_whisper))), ("Bc", ModelSource("ct2", str(shipped["Bc"])))):
        english = transcribe(client, name, clips["en_fox"], language="en", response_format="verbose_json")
        assert english.model_dump()["language"] == "english"
        alone = load_transcriber(source, greedy(language="en"))
        assert english.text == alone.transcribe_batch([audio])[0]
        korean = transcribe(client, name, clips["en_fox"], language="korean")  # a name works too, and it resets
        assert korean.text == transcribe(client, name, clips["en_fox"]).text
    with pytest.raises(openai.BadRequestError) as err:
        transcribe(client, "tiny", clips["en_fox"], language="xx")
    assert error_of(err)["param"] == "language"


def test_request_prompt_is_the_initial_prompt(server, clips, tiny_whisper, shipped):
    """The request's ``prompt`` is decoded as ``asr-lora transcribe --prompt`` decodes it (HF and CT2)."""
    from asr_lora.sources import ModelSource, load_transcriber

    client, prompt = server.client(), "카메라를 새로 샀어요"
    audio = load_audio(clips["ko_finetune"])
    for name, source in (("tiny", ModelSource("model", str(tiny_whisper))), ("Bc", ModelSource("ct2", str(shipped["Bc"])))):
        prompted = transcribe(client, name, clips["ko_finetune"], prompt=prompt)
        assert prompted.text == load_transcriber(source, greedy(prompt=prompt)).transcribe_batch([audio])[0]
        assert prompted.text != transcribe(client, name, clips["ko_finetune"]).text


# --------------------------------------------------------------------------- safety


def test_api_key(server, clips):
    with pytest.raises(openai.AuthenticationError) as err:
        transcribe(server.client(api_key="wrong"), "A", clips["en_fox"])
    assert error_of(err)["code"] == "invalid_api_key"
    with open(clips["en_fox"], "rb") as f:
        bare = httpx.post(f"{server.url}/v1/audio/transcriptions", files={"file": f}, data={"model": "A"})
    assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_limits_answer_413(server, tmp_path):
    client = server.client()
    big = tmp_path / "big.wav"
    sf.write(big, np.zeros(80 * SAMPLE_RATE, np.float32), SAMPLE_RATE, subtype="PCM_16")  # 2.4 MB > 2 MB
    with pytest.raises(openai.APIStatusError) as err:
        transcribe(client, "A", big)
    assert err.value.status_code == 413 and error_of(err)["code"] == "file_too_large"

    def chunks():  # no Content-Length: counted as it streams in
        boundary = b"--xyz"
        yield boundary + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\nA\r\n'
        yield boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n\r\n'
        for _ in range(30):
            yield bytes(100_000)
        yield b"\r\n" + boundary + b"--\r\n"

    chunked = httpx.post(f"{server.url}/v1/audio/transcriptions", content=chunks(),
                         headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "multipart/form-data; boundary=xyz"})
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "file_too_large"

    speech = np.concatenate([long_clip()] * 6)  # 76 s in a small webm
    long_webm = encode_media(speech, tmp_path / "long.webm", "libopus", 48000)
    assert long_webm.stat().st_size < 2 * 2**20
    with pytest.raises(openai.APIStatusError) as err:
        transcribe(client, "A", long_webm)
    assert err.value.status_code == 413 and error_of(err)["code"] == "audio_too_long"


def test_unknown_model_404_lists_the_names(server, clips):
    with pytest.raises(openai.NotFoundError) as err:
        transcribe(server.client(), "whisper-1", clips["en_fox"])
    error = error_of(err)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "'whisper-1'" in error["message"] and "tiny, A, B, Bm, Bc" in error["message"]


def test_bad_uploads_never_take_the_server_down(server, clips, tmp_path):
    client = server.client()
    garbage = tmp_path / "voice.m4a"
    garbage.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(openai.BadRequestError) as err:
        transcribe(client, "A", garbage)
    error = error_of(err)
    assert error["code"] == "invalid_audio" and error["param"] == "file"
    assert error["message"].startswith("voice.m4a: cannot decode") and "PyAV" in error["message"]
    assert str(tmp_path) not in error["message"]
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(openai.BadRequestError):
        transcribe(client, "A", empty)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    no_file = httpx.post(f"{server.url}/v1/audio/transcriptions", data={"model": "A"}, headers=auth)
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"
    with socket.create_connection(("127.0.0.1", server.port)) as s:  # a body cut off mid-upload
        s.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode()
                  + b"\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n"
                  b'Content-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF')
    assert httpx.get(f"{server.url}/nope").json()["error"]["code"] == "not_found"
    # and the next good request is answered
    assert transcribe(client, "A", clips["ko_finetune"]).text.startswith(TEXTS["A"])


def test_uploads_leave_no_temporary_files(server, clips):
    transcribe(server.client(), "A", clips["en_fox"])
    (folder,) = server.tmp.iterdir()  # the server's upload folder, and nothing else
    assert folder.name.startswith("asr-lora-serve-") and list(folder.iterdir()) == []


def test_sigterm_lets_in_flight_requests_finish(tiny_whisper, clips, reference, tmp_path):
    """A request waiting in a batch when SIGTERM arrives is answered; then the server exits, stops
    listening and removes its upload folder. The key comes from ASR_LORA_API_KEY here."""
    srv = Server(["--model", f"tiny={tiny_whisper}", "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-wait-ms",
                  "2000", "--no-vad", "--no-fallback"], tmp_path / "tmp", env={"ASR_LORA_API_KEY": "from-env"})
    try:
        assert httpx.get(f"{srv.url}/v1/models").status_code == 401
        result = {}

        def request():
            result["text"] = transcribe(srv.client(api_key="from-env"), "tiny", clips["en_fox"]).text

        thread = threading.Thread(target=request)
        thread.start()
        deadline = time.monotonic() + 30
        while httpx.get(f"{srv.url}/health").json()["queued"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)  # until the request is in the engine's queue, its batch waiting for more pieces
        srv.proc.send_signal(signal.SIGTERM)
        thread.join(timeout=60)
        assert result["text"] == reference["tiny"].transcribe_batch([load_audio(clips["en_fox"])])[0]
        assert srv.proc.wait(timeout=60) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{srv.url}/health", timeout=2)
        assert list((tmp_path / "tmp").iterdir()) == []
        assert "Waiting for application shutdown" in srv.output()
    finally:
        srv.stop()


def test_vad_pieces_stay_within_what_the_served_model_was_trained_on(adapters, tmp_path):
    """A model whose asr_lora.json says it was trained on inputs of at most 6 s is given VAD pieces of at
    most 6 s, by the server as by transcribe; a long upload still comes back whole, piece after piece."""
    import shutil

    from .conftest import DEMO, demo_rows

    short = tmp_path / "short"
    shutil.copytree(adapters["B"], short)
    settings = json.loads((short / "asr_lora.json").read_text())
    settings["trained_on"] = {"min_seconds": 1.0, "max_seconds": 6.0, "chars_per_second": 4.5,
                              "chars_per_second_low": 3.6}
    (short / "asr_lora.json").write_text(json.dumps(settings))
    gap = np.zeros(SAMPLE_RATE // 2, dtype=np.float32)
    audio = np.concatenate([x for r in demo_rows("test", 6) for x in (load_audio(DEMO / r["audio"]), gap)])
    sf.write(tmp_path / "six.wav", audio, SAMPLE_RATE)
    srv = Server(["--adapter", f"S={short}", "--max-new-tokens", "4", "--no-fallback"], tmp_path / "tmp")
    try:
        verbose = transcribe(srv.client(api_key="none"), "S", tmp_path / "six.wav", response_format="verbose_json")
    finally:
        srv.stop()
    pieces = [(s.start, s.end) for s in verbose.segments]
    assert len(pieces) >= 3 and all(b - a <= 6.0 + 1e-3 for a, b in pieces)
    assert pieces[-1][1] > len(audio) / SAMPLE_RATE - 2.0  # the last sentence is decoded too
