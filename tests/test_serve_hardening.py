"""imgfeat serve against bad or hostile clients: cancelled and slow requests, floods, broken models, odd labels,
empty tokens and model files that point outside their folder (docs/serving.md, "Limits")."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import threading
import tracemalloc
from urllib.parse import unquote

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from imgfeat.scoring.classifier import Prediction

LABELS = ["NORMAL", "PNEUMONIA"]
PNG = {"Content-Type": "image/png"}


class Fatal(BaseException):
    """Something no ``except Exception`` catches: it ends the model thread."""


class StubClassifier:
    """The interface the server uses, without a model: every image gets ``probabilities``; ``gate`` (when set)
    holds the model call until released; ``fail`` raises from the next call."""

    def __init__(self, labels=LABELS, probabilities=(0.25, 0.75)):
        self.labels, self.probabilities = list(labels), probabilities
        self.seen: list[bytes] = []
        self.entered = threading.Event()
        self.gate: threading.Event | None = None
        self.fail: BaseException | None = None

    def describe(self):
        return {"backbone": "stub", "engine": "none", "weights_id": "stub-0", "head": "lr", "labels": self.labels,
                "input_size": 32, "precision": "fp32", "run_id": None}

    def load(self, maps=False):
        return self

    def predict(self, contents, explain=False, timings=None):
        self.seen += contents
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(30), "the test never opened the gate"
        if self.fail is not None:
            exc, self.fail = self.fail, None
            raise exc
        proba = dict(zip(self.labels, self.probabilities, strict=True))
        label = max(proba, key=lambda k: proba[k]) if all(math.isfinite(v) for v in proba.values()) else self.labels[0]
        return [Prediction(label=label, probabilities=dict(proba), width=1, height=1, format="PNG",
                           heatmap_png=b"\x89PNG-map" if explain else None, explanation="exact" if explain else None)
                for _ in contents]


def _client(stub, **kwargs):
    from fastapi.testclient import TestClient

    from imgfeat.serve.app import create_app

    return TestClient(create_app(stub, **kwargs), raise_server_exceptions=False)


# ---------------------------------------------------------------------------------------------
# driving the ASGI app directly: a client whose body arrives chunk by chunk, only when the server asks


class Body:
    """A request body served one chunk per ``receive``; ``reads`` counts the chunks the server took. ``stall``:
    after the chunks the client sends nothing more (and never closes)."""

    def __init__(self, chunks, stall=False):
        self._chunks, self.stall, self.reads, self._done = iter(chunks), stall, 0, False

    async def receive(self):
        if not self._done:
            chunk = next(self._chunks, None)
            if chunk is not None:
                self.reads += 1
                return {"type": "http.request", "body": chunk, "more_body": True}
            self._done = True
            if not self.stall:
                return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # nothing more ever comes


async def _call(app, body: Body, headers: dict[str, str], path: str = "/predict") -> tuple[int, dict, dict]:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}
    sent = []

    async def send(message):
        sent.append(message)

    await app(scope, body.receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    content = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, json.loads(content)


def _multipart_head(name: str) -> bytes:
    return (f"--b0undary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()


def _multipart(*files: tuple[str, bytes]) -> list[bytes]:
    """A multipart body as chunks: each file's head, then its bytes; the closing boundary last."""
    chunks = []
    for i, (name, data) in enumerate(files):
        chunks += [(b"\r\n" if i else b"") + _multipart_head(name), data]
    return [*chunks, b"\r\n--b0undary--\r\n"]


MULTIPART = {"Content-Type": "multipart/form-data; boundary=b0undary"}


# ---------------------------------------------------------------------------------------------
# the model thread


def test_a_cancelled_request_is_skipped_and_the_next_one_is_answered():
    from imgfeat.serve.batcher import Batcher

    stub = StubClassifier()
    stub.gate = threading.Event()
    batcher = Batcher(stub, max_batch=4)
    first = batcher.submit([b"first"], False)
    assert stub.entered.wait(10)  # the model holds the first request
    gone = batcher.submit([b"gone"], False)
    assert gone.future.cancel()  # its client left while it waited
    stub.gate.set()
    assert first.future.result(10)[0][0].label == "PNEUMONIA"
    predictions, _ = batcher.submit([b"next"], False).future.result(10)  # the old thread died here: this hung
    assert predictions[0].label == "PNEUMONIA"
    assert stub.seen == [b"first", b"next"] and batcher.alive


def test_a_request_past_its_timeout_gets_504_and_the_model_goes_on():
    stub = StubClassifier()
    stub.gate = threading.Event()
    client = _client(stub, request_timeout_s=0.5)
    stuck = client.post("/predict", content=b"stuck", headers=PNG)  # the model is on it and does not finish
    assert stub.entered.wait(10)
    waiting = client.post("/predict", content=b"waiting", headers=PNG)  # queued behind it, then dropped
    stub.gate.set()
    after = client.post("/predict", content=b"after", headers=PNG)
    for response in (stuck, waiting):
        assert response.status_code == 504 and response.json()["error_class"] == "timeout", response.text
        assert "serve.request_timeout_s" in response.json()["detail"]
    assert after.status_code == 200 and after.json()["predictions"][0]["label"] == "PNEUMONIA"
    assert b"waiting" not in stub.seen  # dropped before the model saw it
    load = client.app.state.service.admission.snapshot()
    assert (load["requests"], load["images"]) == (0, 0)  # every budget given back


def test_a_model_error_fails_its_request_and_the_thread_goes_on():
    stub = StubClassifier()
    stub.fail = RuntimeError("weights exploded at /secret/path")
    client = _client(stub)
    broken = client.post("/predict", content=b"x", headers=PNG)
    assert broken.status_code == 500 and broken.json()["error_class"] == "model_error"
    assert "RuntimeError" in broken.json()["detail"] and "/secret" not in broken.text
    assert client.post("/predict", content=b"x", headers=PNG).status_code == 200
    assert client.get("/health").json()["model_thread"]["alive"] is True


def test_a_dead_model_thread_shows_in_health_and_requests_get_503():
    stub = StubClassifier()
    stub.fail = Fatal()
    client = _client(stub)
    assert client.get("/health").status_code == 200
    dying = client.post("/predict", content=b"x", headers=PNG)  # answered, not left hanging
    assert dying.status_code == 503 and dying.json()["error_class"] == "model_unavailable"
    client.app.state.service.batcher._thread.join(10)
    health = client.get("/health")
    assert health.status_code == 503
    assert health.json()["status"] == "degraded" and health.json()["model_thread"]["alive"] is False
    later = client.post("/predict", content=b"x", headers=PNG)
    assert later.status_code == 503 and later.headers["retry-after"] == "1"
    assert "restart" in later.json()["detail"]


# ---------------------------------------------------------------------------------------------
# admission, body limits


def test_a_full_budget_refuses_a_request_before_reading_its_body():
    from imgfeat.serve.app import create_app

    async def scenario():
        stub = StubClassifier()
        stub.gate = threading.Event()
        app = create_app(stub, max_waiting=0)
        first = asyncio.create_task(_call(app, Body([b"first"]), PNG))
        assert await asyncio.get_running_loop().run_in_executor(None, stub.entered.wait, 10)
        second = Body([b"never", b"read"])
        status, headers, body = await _call(app, second, PNG)
        assert (status, headers["retry-after"], body["error_class"], second.reads) == (503, "1", "busy", 0)
        stub.gate.set()
        assert (await first)[0] == 200

        # In images: a body still arriving holds its image; one more image does not fit, its body stays unread.
        app = create_app(StubClassifier(), max_waiting=4, max_images=2, body_timeout_s=30)
        admission = app.state.service.admission
        slow = asyncio.create_task(_call(app, Body([b"part of an image"], stall=True), PNG))
        while admission.snapshot()["requests"] < 1:
            await asyncio.sleep(0.01)
        two = Body(_multipart(("a.png", b"a"), ("b.png", b"b")))
        status, _, body = await _call(app, two, MULTIPART)
        assert status == 503 and body["error_class"] == "busy" and two.reads < 5  # refused at its second file
        assert (await _call(app, Body([b"later"]), PNG))[0] == 200  # the refused request gave its image back
        slow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await slow
        assert admission.snapshot()["requests"] == 0  # the cancelled one gave its budget back
        status, _, body = await _call(app, Body(_multipart(("a.png", b"a"), ("b.png", b"b"), ("c.png", b"c"))), MULTIPART)
        assert status == 413 and body["error_class"] == "too_many_files"  # could never fit: not 503

    asyncio.run(scenario())


def test_a_trickling_body_gets_408():
    from imgfeat.serve.app import create_app

    stub = StubClassifier()
    app = create_app(stub, body_timeout_s=0.3)
    status, _, body = asyncio.run(_call(app, Body([b"\x89PNG\r\n"], stall=True), PNG))
    assert status == 408 and body["error_class"] == "body_timeout" and "serve.body_timeout_s" in body["detail"]
    status, _, body = asyncio.run(_call(app, Body(_multipart(("a.png", b"abc"))[:2], stall=True), MULTIPART))
    assert status == 408 and body["error_class"] == "body_timeout"
    assert stub.seen == [] and app.state.service.admission.snapshot()["requests"] == 0


def test_multipart_is_parsed_as_it_arrives_with_bounded_memory():
    from imgfeat.serve.app import create_app

    mb = 2**20
    stub = StubClassifier()
    app = create_app(stub, max_upload_bytes=16 * mb)

    def chunks(n):  # a fresh object per chunk, as off the network: what the server keeps adds up
        return (bytes(mb) for _ in range(n))

    def peak_of(chunks, headers):
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            out = asyncio.run(_call(app, Body(chunks), headers))
            return out, (tracemalloc.get_traced_memory()[1] - base) / mb
        finally:
            tracemalloc.stop()

    # 64 MB without a Content-Length: refused once past 16 MB, holding about one chunk at a time (no joined body).
    (status, _, body), peak = peak_of(itertools.chain([_multipart_head("big.png")], chunks(64)), MULTIPART)
    assert status == 413 and "limit" in body["detail"]
    assert peak < 6, f"refusing an oversized upload held {peak:.1f} MB"
    # 12 MB accepted: held once for the model, not as a joined body plus its parts.
    (status, _, body), peak = peak_of(itertools.chain([_multipart_head("ok.png")], chunks(12), [b"\r\n--b0undary--\r\n"]),
                                      MULTIPART)
    assert status == 200 and body["predictions"][0]["filename"] == "ok.png" and len(stub.seen[-1]) == 12 * mb
    assert peak < 18, f"a 12 MB upload held {peak:.1f} MB"


# ---------------------------------------------------------------------------------------------
# what comes back: finite numbers, encodable headers, no paths


def _strict_json(text: str):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))


def test_non_finite_probabilities_are_a_422_with_an_error_class():
    client = _client(StubClassifier(probabilities=(float("nan"), float("inf"))))
    one = client.post("/predict", content=b"x", headers=PNG)
    assert one.status_code == 422
    body = _strict_json(one.text)
    assert body["error_class"] == "non_finite_output" and body["predictions"][0]["label"] is None
    many = client.post("/predict", files=[("file", ("a.png", b"a", "image/png")), ("file", ("b.png", b"b", "image/png"))])
    assert many.status_code == 422 and [p["error_class"] for p in _strict_json(many.text)["predictions"]] == ["non_finite_output"] * 2
    explain = client.post("/explain", content=b"x", headers=PNG)
    assert explain.status_code == 422 and _strict_json(explain.text)["error_class"] == "non_finite_output"


def test_the_classifier_turns_non_finite_scores_into_an_image_error(tmp_path):
    from imgfeat.demo.samples import encode, xray_array
    from imgfeat.scoring.classifier import ImageClassifier

    folder = _classifier_folder(tmp_path, weights=np.full((2, 16), np.nan))
    image = encode(xray_array(np.random.default_rng(0), (40, 40), sick=False), "rgb_png")[0]
    good, junk = ImageClassifier(folder).predict([image, b"junk"], explain=True)
    assert good.label is None and good.error_class == "non_finite_output" and good.heatmap_png is None
    assert junk.error_class == "not_an_image"


def test_a_non_latin1_label_goes_through_explain_percent_encoded():
    labels = ["正常", "Lungenentzündung 100%"]
    client = _client(StubClassifier(labels=labels))
    response = client.post("/explain", content=b"x", headers=PNG)
    assert response.status_code == 200 and response.content.startswith(b"\x89PNG")
    raw = response.headers["x-imgfeat-label"]
    assert raw.isascii() and unquote(raw) == labels[1]
    assert unquote(response.headers["x-imgfeat-explanation"]) == "exact"
    assert client.post("/predict", content=b"x", headers=PNG).json()["predictions"][0]["label"] == labels[1]


@given(st.text())
def test_header_values_are_ascii_and_decode_back(text):
    from imgfeat.serve.app import header_value

    value = header_value(text)
    assert value.isascii() and value.isprintable() and value == value.strip()
    assert unquote(value) == text


def test_health_shows_no_filesystem_path():
    for uri, shown in [("/home/someone/models/pyfunc_model", ".../pyfunc_model"),
                       ("file:///srv/x/pyfunc_model/", "file:.../pyfunc_model"),
                       ("runs:/abc123/pyfunc_model", "runs:/abc123/pyfunc_model")]:
        response = _client(StubClassifier(), model_uri=uri)
        health = response.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        model = health.json()["model"]
        assert model["model_uri"] == shown and "/home" not in health.text and "/srv" not in health.text
        assert {"backbone", "engine", "weights_id", "head", "labels"} <= set(model)  # what the page shows


# ---------------------------------------------------------------------------------------------
# starting: tokens, uvicorn's limits


def test_an_empty_token_is_refused_at_start(monkeypatch, capsys):
    import uvicorn

    from imgfeat.cli import main
    from imgfeat.serve.app import create_app, serve

    stub = StubClassifier()
    for blank in ("", "  ", "\n"):
        with pytest.raises(ValueError, match="token is empty"):
            create_app(stub, token=blank)
        with pytest.raises(ValueError, match="token is empty"):
            serve(stub, host="0.0.0.0", token=blank)
    assert main(["serve", "--model-uri", "runs:/nosuchrun", "--token", ""]) == 2
    assert "token is empty" in capsys.readouterr().err
    monkeypatch.setenv("IMGFEAT_SERVE_TOKEN", " ")
    assert main(["serve", "--model-uri", "runs:/nosuchrun"]) == 2
    assert "token is empty" in capsys.readouterr().err
    ok = _client(stub, token=" s3cret\n")  # surrounding whitespace is not part of it
    assert ok.post("/predict", content=b"x", headers={**PNG, "Authorization": "Bearer s3cret"}).status_code == 200
    assert ok.post("/predict", content=b"x", headers={**PNG, "Authorization": "Bearer "}).status_code == 401
    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(kw))
    serve(stub, token="t", limit_concurrency=7, keep_alive_s=3)
    assert (started["limit_concurrency"], started["timeout_keep_alive"]) == (7, 3)


# ---------------------------------------------------------------------------------------------
# model files stay inside the model folder


def _classifier_folder(tmp_path, weights=None) -> str:
    from imgfeat.io.decoders import DecodeOptions
    from imgfeat.scoring.classifier import write_classifier
    from imgfeat.scoring.heads import HeadArrays

    head = HeadArrays("linear", {"weights": np.zeros((2, 16)) if weights is None else weights, "bias": np.zeros(2)},
                      {"probabilistic": True, "mode": "lr"})
    return write_classifier(str(tmp_path / "model" / "artifacts" / "classifier"), model_name="tiny_torch", weights="none",
                            weights_sha256="", seed=42, weights_id="none-seed42", weights_file=None,
                            decode=DecodeOptions(size=32), precision="fp32", labels=LABELS, head_name="lr", head=head)


def _edit(folder: str, **fields) -> None:
    path = os.path.join(folder, "classifier.json")
    info = json.load(open(path))
    json.dump({**info, **fields}, open(path, "w"))


def test_model_files_outside_the_model_folder_are_refused(tmp_path):
    from imgfeat.scoring.classifier import ImageClassifier
    from imgfeat.scoring.pyfunc import load_classifier

    folder = _classifier_folder(tmp_path)
    model = str(tmp_path / "model")
    with open(os.path.join(model, "MLmodel"), "w") as fh:
        fh.write("flavors:\n  python_function:\n    artifacts:\n      classifier:\n        path: artifacts/classifier\n")
    assert load_classifier(model).labels == LABELS  # the untouched model loads
    outside = tmp_path / "outside.pth"
    outside.write_bytes(b"not yours")
    os.makedirs(os.path.join(folder, "weights"))
    os.symlink(outside, os.path.join(folder, "weights", "w.pth"))
    for fields in ({"weights": "file", "weights_file": "../../etc/passwd"}, {"weights": "file", "weights_file": "/etc/passwd"},
                   {"weights": "file", "weights_file": "weights/w.pth"}, {"weights": str(outside)}):
        _edit(folder, **fields)
        with pytest.raises(ValueError, match="outside the model folder|is not 'imagenet', 'none' or 'file'"):
            ImageClassifier(folder)
    _edit(folder, weights="none", weights_file=None)
    ImageClassifier(folder)  # back inside: loads
    with open(os.path.join(model, "MLmodel"), "w") as fh:
        fh.write("flavors:\n  python_function:\n    artifacts:\n      classifier:\n        path: ../elsewhere/classifier\n")
    os.makedirs(tmp_path / "elsewhere")
    os.rename(folder, tmp_path / "elsewhere" / "classifier")
    with pytest.raises(ValueError, match="outside the model folder"):
        load_classifier(model)
    os.symlink(tmp_path / "elsewhere" / "classifier", folder)  # the artifact itself a link out of the folder
    with open(os.path.join(model, "MLmodel"), "w") as fh:
        fh.write("flavors:\n  python_function:\n    artifacts:\n      classifier:\n        path: artifacts/classifier\n")
    with pytest.raises(ValueError, match="outside the model folder"):
        load_classifier(model)
