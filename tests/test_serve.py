"""`vitqc serve` (issue 18): the real server (the console command, uvicorn on 127.0.0.1,
a free port) serving a model fitted in the session, called over HTTP like a line PC."""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from PIL import Image

from vitqc.bundle import load_bundle, save_bundle
from vitqc.data.layouts import load_dataset
from vitqc.data.synth import png_bomb
from vitqc.export import export_bundle
from vitqc.pipeline import FitOptions, fit, predict_images
from vitqc.runtime import ExportedModel
from vitqc.serve.config import ServeConfig
from vitqc.serve.service import InferenceService

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

KEY = "test-key-0123"
AUTH = {"X-API-Key": KEY}


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log
        self.decisions: list[str] = []  # sha256 of every image answered with a decision

    def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 60.0,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
        finally:
            conn.close()

    def predict(self, data: bytes, name: str = "part.png", query: str = "", raw: bool = False):
        """POST /predict (multipart, or the raw body); returns (status, JSON)."""
        if raw:
            body, ctype = data, "image/png"
        else:
            body, ctype = multipart([("file", name, data)])
        status, _, out = self.call(
            "POST", f"/predict{query}", body, {**AUTH, "Content-Type": ctype}
        )
        answer = json.loads(out)
        if status == 200:
            self.decisions.append(answer["sha256"])
        return status, answer

    def rss_mb(self) -> float:
        return psutil.Process(self.proc.pid).memory_info().rss / 2**20


def multipart(parts: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    boundary = "vitqc-test-boundary-7d1f"
    chunks = []
    for field, name, data in parts:
        chunks.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
            f'filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
            + data
            + b"\r\n"
        )
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png_bytes(path: Path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(synth_root, tmp_path_factory):
    """A small gaussian model fitted here, served by `vitqc serve BUNDLE` (which exports
    it to ONNX itself, meanwhile this process exports it for the reference runtime) with
    the key from the environment, a results log, 2 workers and a queue of 2. Yields the
    server, the bundle, the torch model, the runtime and a few test images."""
    out = tmp_path_factory.mktemp("serve-model")
    dataset = load_dataset(synth_root, category="tile", seed=0)
    options = FitOptions(
        head="gaussian", statistics="position", folds=0, epochs=1, patience=1, progress=False
    )
    model, report = fit(dataset, options)
    bundle = out / "model"
    save_bundle(model, bundle, {"fit": report.to_dict()})

    log = out / "decisions.jsonl"
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VITQC_API_KEY": KEY}
    args = ["--port", str(port), "--workers", "2", "--max-queue", "2", "--threads", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "vitqc.cli", "serve", str(bundle), *args, "--log-results", str(log)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    srv = Server(proc, port, log)
    try:
        runtime = ExportedModel(export_bundle(bundle, out / "model.onnx"), threads=1)
        loaded, _ = load_bundle(bundle)
        good = [Path(s.path) for s in dataset.test if s.label == 0][:2]
        bad = [Path(s.path) for s in dataset.test if s.label == 1][:2]
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vitqc serve exited with {proc.returncode}: {proc.stdout.read()}")
            try:
                if srv.call("GET", "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("vitqc serve did not answer /health within 120 s")
            time.sleep(0.2)
        yield srv, bundle, loaded, runtime, good + bad
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(served) -> Server:
    return served[0]


@pytest.fixture(scope="module")
def fitted(served):
    """(bundle, torch model, runtime, image files)"""
    return served[1:]


def test_health_model_and_docs(server, fitted):
    _, model, runtime, _ = fitted
    status, _, body = server.call("GET", "/health")  # no key needed
    assert status == 200 and json.loads(body)["model"] == runtime.info["model_id"]
    assert server.call("GET", "/model")[0] == 401
    status, _, body = server.call("GET", "/model", headers=AUTH)
    assert status == 200
    info = json.loads(body)
    assert info["model"] == runtime.info["model_id"]
    assert info["calibration"] == runtime.info["calibration"]
    assert {"fpr_interval", "min_area", "expected_fpr"} <= set(info["calibration"])
    assert info["threshold"] == pytest.approx(float(model.threshold))
    assert info["input_size"] == list(model.input_size)
    assert info["backbone"]["name"] == model.extractor.name
    assert info["head"]["name"] == "gaussian"
    assert info["validation"]["image_auroc"] == runtime.info["validation"]["image_auroc"]
    assert info["limits"]["workers"] == 2 and info["limits"]["api_key_required"] is True
    status, _, body = server.call("GET", "/openapi.json")
    assert status == 200 and "/predict/batch" in json.loads(body)["paths"]
    assert server.call("GET", "/docs")[0] == 200


def test_predict_matches_runtime_and_vitqc_predict(server, fitted, tmp_path):
    _, model, runtime, files = fitted
    expected = list(runtime.score_files(files))
    predicted = predict_images(model, files, tmp_path / "predict")
    for path, row, ref in zip(files, expected, predicted, strict=True):
        data = path.read_bytes()
        status, answer = server.predict(data, name=path.name)
        assert status == 200, answer
        assert answer["score"] == pytest.approx(row["score"], rel=1e-6)
        assert answer["normalized_score"] == pytest.approx(row["normalized_score"], abs=1e-6)
        assert answer["defective"] == row["defective"] == ref["defective"]
        assert answer["threshold"] == row["threshold"] == ref["threshold"]
        assert answer["score"] == pytest.approx(ref["score"], rel=1e-4)
        assert answer["model"] == runtime.info["model_id"]
        assert answer["file"] == path.name and answer["sha256"] == hashlib.sha256(data).hexdigest()
        assert answer["latency_ms"] > 0 and "map_png" not in answer
        # the same image as the raw body
        status, again = server.predict(data, raw=True)
        assert status == 200 and again["score"] == answer["score"] and again["file"] == "body"
    assert {r["defective"] for r in expected} == {True, False}  # both kinds were sent


def test_threshold_override_and_heat_map(server, fitted):
    _, _, runtime, files = fitted
    data = files[-1].read_bytes()
    score = runtime.score_files([files[-1]]).__next__()["score"]
    status, low = server.predict(data, query=f"?threshold={score - 1e-3}&map=true")
    assert status == 200 and low["defective"] is True and low["normalized_score"] > 0.5
    overlay = Image.open(io.BytesIO(base64.b64decode(low["map_png"])))
    assert overlay.format == "PNG" and overlay.mode == "RGB"
    assert overlay.size == Image.open(files[-1]).size
    status, high = server.predict(data, query="?threshold=1e9")
    assert status == 200 and high["defective"] is False and high["threshold"] == 1e9
    status, answer = server.predict(data, query=f"?threshold={runtime.map_low - 1}")
    assert status == 422 and "map_low" in answer["detail"]
    for bad in ("nan", "inf", "abc"):
        status, answer = server.predict(data, query=f"?threshold={bad}")
        assert status == 422 and "threshold" in answer["detail"]


def test_batch_answers_in_order(server, fitted):
    _, _, runtime, files = fitted
    body, ctype = multipart([("files", p.name, p.read_bytes()) for p in files])
    status, _, out = server.call("POST", "/predict/batch", body, {**AUTH, "Content-Type": ctype})
    assert status == 200, out
    results = json.loads(out)["results"]
    assert [r["file"] for r in results] == [p.name for p in files]
    for r, ref in zip(results, runtime.score_files(files), strict=True):
        assert r["score"] == pytest.approx(ref["score"], rel=1e-6)
        assert r["defective"] == ref["defective"]
    server.decisions.extend(r["sha256"] for r in results)
    # one bad file refuses the whole batch, before any decision
    body, ctype = multipart([("files", "a.png", files[0].read_bytes()), ("files", "b.png", b"x")])
    status, _, out = server.call("POST", "/predict/batch", body, {**AUTH, "Content-Type": ctype})
    assert status == 415 and "b.png" in json.loads(out)["detail"]


def _one_line_error(out: bytes) -> str:
    text = out.decode()
    assert "\n" not in text.strip(), text
    return json.loads(text)["detail"]


def mono12_png() -> bytes:
    """A 12-bit camera image saved as 16-bit PNG: refused, never clipped at 255."""
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32), 4000, np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def test_hostile_uploads_are_refused_quickly(server, fitted):
    _, _, _, files = fitted
    before = server.rss_mb()
    png = png_bytes(files[0])
    bomb = png_bomb()
    assert len(bomb) < 100_000
    cases = [
        ("garbage", os.urandom(4096), "image/png", 415),
        ("truncated", png[: len(png) // 2], "image/png", 422),
        ("bomb", bomb, "image/png", 413),
        ("30 MB", b"\0" * (30 << 20), "image/png", 413),
        ("empty", b"", "image/png", 422),
        ("text", b"hello", "text/plain", 415),
        ("12-bit", mono12_png(), "image/png", 415),
    ]
    for name, body, ctype, expected in cases:
        start = time.perf_counter()
        status, _, out = server.call("POST", "/predict", body, {**AUTH, "Content-Type": ctype})
        elapsed = time.perf_counter() - start
        assert status == expected, (name, status, out)
        assert _one_line_error(out), name
        assert elapsed < 5.0, (name, elapsed)
    # the bomb as a multipart upload too
    body, ctype = multipart([("file", "bomb.png", bomb)])
    status, _, out = server.call("POST", "/predict", body, {**AUTH, "Content-Type": ctype})
    assert status == 413 and "bomb.png" in _one_line_error(out)
    assert server.call("GET", "/health")[0] == 200
    assert server.rss_mb() - before < 146  # the bomb was never decoded


def test_api_key_is_required(server, fitted):
    _, _, _, files = fitted
    data = files[0].read_bytes()
    for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
        status, _, out = server.call(
            "POST", "/predict", data, {**headers, "Content-Type": "image/png"}
        )
        assert status == 401 and "API key" in _one_line_error(out)
    status, _, out = server.call(
        "POST", "/predict", data, {"Authorization": f"Bearer {KEY}", "Content-Type": "image/png"}
    )
    assert status == 200
    server.decisions.append(json.loads(out)["sha256"])


def test_load_from_16_threads_is_bounded(server, fitted):
    """200 requests at once against 2 workers and a queue of 2: each one answered, 200 or
    503 with Retry-After, none lost, none hung."""
    _, _, _, files = fitted
    payloads = [p.read_bytes() for p in files]

    def one(i: int) -> tuple[int, dict[str, str], Any]:
        status, headers, out = server.call(
            "POST", "/predict", payloads[i % len(payloads)], {**AUTH, "Content-Type": "image/png"}
        )
        return status, headers, json.loads(out)

    start = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(200)))
    elapsed = time.perf_counter() - start
    statuses = [a[0] for a in answers]
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    assert statuses.count(200) >= 4, statuses.count(200)
    for status, headers, answer in answers:
        if status == 503:
            assert headers.get("retry-after") == "1" and "busy" in answer["detail"]
        else:
            server.decisions.append(answer["sha256"])
    assert elapsed < 60, elapsed
    assert server.call("GET", "/health")[0] == 200


def test_every_decision_is_one_complete_log_line(server, fitted):
    """Runs last: the results log holds one JSON line per decision answered above."""
    _, _, runtime, _ = fitted
    raw = server.log.read_bytes()
    assert raw.endswith(b"\n")
    records = [json.loads(line) for line in raw.decode().splitlines()]
    assert len(records) == len(server.decisions) > 200 // 10
    assert sorted(r["sha256"] for r in records) == sorted(server.decisions)
    for r in records:
        assert {"time", "sha256", "score", "defective", "decision", "threshold"} <= set(r)
        assert r["model"] == runtime.info["model_id"]
        assert r["decision"] == ("defective" if r["defective"] else "good")


def test_bad_command_lines_are_one_line_errors(fitted, tmp_path):
    bundle, *_ = fitted
    cases = [
        ([str(tmp_path / "missing.onnx")], "model not found"),
        ([str(bundle), "--workers", "0"], "--workers"),
        ([str(bundle), "--log-results", str(tmp_path / "no" / "log.jsonl")], "does not exist"),
    ]
    for args, needle in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "vitqc.cli", "serve", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        err = proc.stderr.strip()
        assert proc.returncode == 2 and len(err.splitlines()) == 1, (args, err)
        assert err.startswith("error: ") and needle in err, err


def test_warm_up_readies_the_batch_path_before_the_first_request(fitted):
    """The warm-up runs a blank batch as well as a blank image: the graph is split and
    its call sizes are chosen before a client's first batch would wait for them, and the
    parts replace the whole graph's session (constants held once). With a batch limit
    of one image the graph stays whole."""
    _, _, runtime, _ = fitted
    service = InferenceService(ServeConfig(model=runtime.path, threads=1))
    try:
        service.warm_up()
        model = service.model
        assert model.session is None and model.features
        assert model._micro_batch is not None and model._head_batch is not None
    finally:
        service.close()
    single = InferenceService(ServeConfig(model=runtime.path, threads=1, max_batch=1))
    try:
        single.warm_up()
        assert single.model.session is not None and single.model._split is None
    finally:
        single.close()
