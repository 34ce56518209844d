"""``imgfeat serve``: a trained model behind HTTP (FastAPI on uvicorn) and a page to try it in a browser.

    POST /predict[?explain=true]  multipart upload of one or more images, or the raw bytes of one
                                  -> JSON: label, probabilities, model and weights id, timings (+ heat map PNG)
    POST /explain                 one image -> the heat map over it, image/png
    GET  /health                  the model and whether requests need a token
    GET  /                        the page: pick or drop an image, see the label, the probabilities and the map
    GET  /openapi.json, /docs     the schema

Bad input is a 4xx with a reason (``detail``, ``error_class``), never a 500: an empty body (400), a body over
``max_upload_bytes`` (413, checked before reading and while reading), a content type that is not an image
(415), bytes that do not decode (422 with the decoder's error class: not_an_image, truncated, too_large for
decompression bombs, ...). At most one model call runs at a time; up to ``max_waiting`` requests wait for it and
further ones get 503 with Retry-After, so memory stays bounded (about max_waiting x max_upload_bytes). Requests
that arrive while the model is busy are scored together in the next batch (at most ``max_batch`` images): one
model call for several clients, no added wait for a lone one.
"""


import asyncio
import base64
import hmac
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from imgfeat.scoring.classifier import ImageClassifier

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD = 50 * 1024 * 1024
RAW_TYPES = ("image/", "application/dicom", "application/octet-stream", "application/x-nifti", "application/gzip")
_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "file": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/dicom": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}


class BadRequest(Exception):
    def __init__(self, status: int, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.detail, self.extra = status, detail, extra


@dataclass
class _Job:
    contents: list[bytes]
    explain: bool
    future: Future = field(default_factory=Future)
    queued: float = field(default_factory=time.perf_counter)


class Batcher:
    """One thread owns the model: it takes every job waiting when it is free and scores them in one call."""

    def __init__(self, classifier: ImageClassifier, max_waiting: int, max_batch: int = 16):
        self.classifier, self.max_waiting, self.max_batch = classifier, max_waiting, max_batch
        self.jobs: queue.Queue[_Job] = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._run, name="imgfeat-model", daemon=True).start()

    def submit(self, contents: list[bytes], explain: bool) -> Future:
        """A future of (predictions, timings); BadRequest(503) when 1 + max_waiting jobs are already in."""
        with self._lock:
            if self._pending >= 1 + self.max_waiting:
                raise BadRequest(503, f"busy: {self._pending} requests are already running or waiting; retry shortly")
            self._pending += 1
        job = _Job(contents, explain)
        self.jobs.put(job)
        return job.future

    def _run(self) -> None:
        while True:
            batch = [self.jobs.get()]
            images = len(batch[0].contents)
            while images < self.max_batch:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                batch.append(job)
                images += len(job.contents)
            for explain in (False, True):
                group = [j for j in batch if j.explain == explain]
                if group:
                    self._score(group, explain)

    def _score(self, group: list[_Job], explain: bool) -> None:
        started = time.perf_counter()
        timings: dict[str, float] = {}
        try:
            predictions = self.classifier.predict([c for j in group for c in j.contents], explain=explain, timings=timings)
        except Exception as exc:  # the model failed: every request of the batch learns it (500 with the reason)
            log.exception("scoring a batch of %d requests failed", len(group))
            self._release(len(group))
            for job in group:
                job.future.set_exception(exc)
            return
        timings["batch_images"] = float(len(predictions))
        self._release(len(group))  # before answering: a client's next request must find its slot free
        at = 0
        for job in group:
            job.future.set_result((predictions[at:at + len(job.contents)], {**timings, "queue_ms": 1000 * (started - job.queued)}))
            at += len(job.contents)

    def _release(self, n: int) -> None:
        with self._lock:
            self._pending -= n


def create_app(classifier: ImageClassifier, *, model_uri: str = "", token: str | None = None,
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD, max_files: int = 16, max_waiting: int = 32,
               max_batch: int = 16) -> Any:
    """The ASGI app serving ``classifier``."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    from imgfeat.serve.page import PAGE

    app = FastAPI(title="imgfeat", version="1", description="Chest X-ray classification with a model trained by imgfeat.")
    model = {**classifier.describe(), "model_uri": model_uri}
    batcher = Batcher(classifier, max_waiting, max_batch)

    @app.exception_handler(BadRequest)
    async def _bad(request: Request, exc: BadRequest) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse({"detail": exc.detail, **exc.extra}, status_code=exc.status, headers=headers)

    def _authorise(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise BadRequest(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'")

    async def _read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_upload_bytes:
            raise BadRequest(413, f"upload of {int(length):,} bytes is over the limit of {max_upload_bytes:,} bytes "
                                  "(imgfeat serve --max-upload-mb)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_upload_bytes:
                raise BadRequest(413, f"upload is over the limit of {max_upload_bytes:,} bytes (imgfeat serve --max-upload-mb)")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _uploads(request: Request) -> list[tuple[str, bytes]]:
        """(name, bytes) of every uploaded file (multipart) or of the raw body."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await _read_body(request)
        if kind == "multipart/form-data":
            request._body = body  # the form parser reads the body already read (and bounded) here
            try:
                form = await request.form(max_files=max_files, max_fields=max_files, max_part_size=max_upload_bytes)
            except Exception as exc:
                raise BadRequest(400, f"malformed multipart body: {exc}") from None
            files = [(getattr(v, "filename", None) or k, await v.read()) for k, v in form.multi_items()
                     if hasattr(v, "read")]
            if not files:
                raise BadRequest(400, "the multipart body has no file part: send the image as a file field, e.g. "
                                      "curl -F file=@xray.png")
            return files
        if not kind or not any(kind.startswith(t) for t in RAW_TYPES):
            raise BadRequest(415, f"content type {kind or '(none)'!r} is not an image: upload multipart/form-data, or "
                                  "the raw bytes as image/png, image/jpeg, application/dicom or application/octet-stream")
        if not body:
            raise BadRequest(400, "the request body is empty: send the image bytes")
        return [("body", body)]

    async def _score(files: list[tuple[str, bytes]], explain: bool) -> tuple[list[Any], dict[str, float]]:
        return await asyncio.wrap_future(batcher.submit([data for _, data in files], explain))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model, "auth": token is not None, "max_upload_bytes": max_upload_bytes}

    @app.post("/predict", openapi_extra={"requestBody": _UPLOAD_BODY})
    async def predict(request: Request, explain: bool = False) -> JSONResponse:
        started = time.perf_counter()
        _authorise(request)
        files = await _uploads(request)
        read_ms = 1000 * (time.perf_counter() - started)
        predictions, timings = await _score(files, explain)
        items = []
        for (name, _), p in zip(files, predictions, strict=True):
            item = {"filename": name, **p.to_dict()}
            if explain and p.heatmap_png is not None:
                item["heatmap_png"] = base64.b64encode(p.heatmap_png).decode("ascii")
            items.append(item)
        body = {"model": model, "predictions": items,
                "batch_images": int(timings.get("batch_images", len(items))), "timings_ms": {"read": round(read_ms, 2), **{k.removesuffix("_ms"): round(v, 2) for k, v in timings.items()
                                                              if k != "batch_images"},
                               "total": round(1000 * (time.perf_counter() - started), 2)}}
        if all(p.error_class for p in predictions):
            first = predictions[0]
            body["detail"] = f"no image could be scored: {first.error_class}: {first.error_message}"
            body["error_class"] = first.error_class
            return JSONResponse(body, status_code=422)
        return JSONResponse(body)

    @app.post("/explain", openapi_extra={"requestBody": _UPLOAD_BODY},
              responses={200: {"content": {"image/png": {}}, "description": "the heat map over the image"}})
    async def explain(request: Request) -> Response:
        _authorise(request)
        files = await _uploads(request)
        predictions, _ = await _score(files[:1], True)
        p = predictions[0]
        if p.error_class:
            raise BadRequest(422, f"{p.error_class}: {p.error_message}", error_class=p.error_class)
        return Response(p.heatmap_png, media_type="image/png",
                        headers={"X-Imgfeat-Label": p.label or "", "X-Imgfeat-Explanation": p.explanation or ""})

    return app


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


def serve(classifier: ImageClassifier, *, host: str = "127.0.0.1", port: int = 8000, model_uri: str = "",
          token: str | None = None, max_upload_bytes: int = DEFAULT_MAX_UPLOAD, allow_anonymous: bool = False,
          max_waiting: int = 32) -> None:
    """Run the app with uvicorn until interrupted. Anything but loopback needs a token (or ``allow_anonymous``)."""
    import uvicorn

    if not is_loopback(host) and token is None and not allow_anonymous:
        raise ValueError(f"--host {host} exposes the model beyond this machine: set --token (or IMGFEAT_SERVE_TOKEN), "
                         "or pass --allow-anonymous if the network in front of it authenticates")
    classifier.load(maps=True)
    app = create_app(classifier, model_uri=model_uri, token=token, max_upload_bytes=max_upload_bytes,
                     max_waiting=max_waiting)
    log.info("serving %s on http://%s:%d/ (page), POST /predict, GET /health", model_uri, host, port)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
