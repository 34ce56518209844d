"""``imgfeat serve``: a trained model behind HTTP (FastAPI on uvicorn) and a page to try it in a browser.

    POST /predict[?explain=true]  multipart upload of one or more images, or the raw bytes of one
                                  -> JSON: label, probabilities (multi-label: per finding probability,
                                  threshold and call), model and weights id, timings (+ heat map PNG)
         [?study=true]            (or a form field study=1) the images are one study: + ``study``, their
                                  probabilities combined (``aggregation``: mean | max | noisy_or)
    POST /explain                 one image -> the heat map over it, image/png
    GET  /health                  the model, whether its thread runs (200 "ok", else 503 "degraded"), the load
    GET  /                        the page: pick or drop an image, see the label, the probabilities and the map
    GET  /openapi.json, /docs     the schema

Bad input is a 4xx with a reason (``detail``, ``error_class``), never a 500: an empty body (400), a body over
``max_upload_bytes`` (413, from Content-Length before reading and while reading), a body slower than
``body_timeout_s`` (408), a content type that is not an image (415), bytes that do not decode (422 with the
decoder's error class: not_an_image, truncated, too_large for decompression bombs, ...), probabilities that are
not finite (422, non_finite_output). A request is admitted (``imgfeat.serve.admission``: requests and images)
before its body is read, else 503 with Retry-After; one thread owns the model (``imgfeat.serve.batcher``) and
scores the requests waiting for it together; a request not answered within ``request_timeout_s`` gets 504 and
is dropped. Header values are percent-encoded UTF-8 where they are not plain ASCII (``header_value``).
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations (Request) at runtime.
import asyncio
import base64
import dataclasses
import hmac
import logging
import time
from typing import Any
from urllib.parse import quote, urlsplit

from imgfeat.scoring.aggregate import AGGREGATIONS
from imgfeat.serve.admission import DEFAULT_MAX_UPLOAD, Admission, Limits
from imgfeat.serve.batcher import Batcher, Job
from imgfeat.serve.errors import BadRequest, ModelFailed, ModelUnavailable
from imgfeat.serve.upload import RAW_TYPES, body_chunks, check_length, content_kind, read_multipart, read_raw

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_MAX_UPLOAD", "RAW_TYPES", "BadRequest", "Limits", "create_app", "header_value", "serve"]

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
_PLAIN = frozenset(chr(c) for c in range(0x20, 0x7F)) - {"%"}
_TRUE = ("1", "true", "yes", "on")


def header_value(text: str) -> str:
    """``text`` as an HTTP header value: printable ASCII but ``%`` as it is, every other character (non-ASCII,
    control characters, ``%``, a space at either end) as its UTF-8 bytes percent-encoded, so that
    ``urllib.parse.unquote`` or JavaScript's ``decodeURIComponent`` give ``text`` back exactly."""
    last = len(text) - 1
    return "".join(c if c in _PLAIN and not (c == " " and i in (0, last)) else quote(c, safe="")
                   for i, c in enumerate(text))


def public_uri(uri: str) -> str:
    """The model URI as /health shows it: MLflow URIs (runs:/, models:/) whole, a path only by its last part."""
    if not uri or uri.startswith(("runs:/", "models:/")):
        return uri
    scheme = urlsplit(uri).scheme
    scheme = scheme if len(scheme) > 1 else ""  # C:\... is a path
    if not scheme and "/" not in uri and "\\" not in uri:
        return uri
    name = uri.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return f"{scheme}:.../{name}" if scheme else f".../{name}"


def check_token(token: str | None) -> str | None:
    """The bearer token without surrounding whitespace; ValueError for an empty or blank one."""
    if token is None:
        return None
    if not token.strip():
        raise ValueError("the bearer token is empty (--token '' or IMGFEAT_SERVE_TOKEN=''): set a secret, or unset "
                         "both to serve without a token (loopback only, or --allow-anonymous)")
    return token.strip()


class _Service:
    """What the routes share: the model thread, the admission budget, the limits and the token."""

    def __init__(self, classifier: Any, model_uri: str, token: str | None, limits: Limits) -> None:
        self.token, self.limits = check_token(token), limits
        self.model = {**classifier.describe(), "model_uri": public_uri(model_uri)}
        self.admission = Admission(limits)
        self.batcher = Batcher(classifier, limits.max_batch)

    def authorise(self, request: Any) -> None:
        if self.token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            raise BadRequest(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'")

    async def answer(self, request: Any, explain: bool, first_only: bool = False, fields: dict[str, str] | None = None
                     ) -> tuple[list[str], list[Any], dict[str, float]]:
        """(file names, predictions, timings): checks, admission before the body, reading, scoring; ``fields``
        gets a multipart upload's text fields."""
        self.authorise(request)
        kind = content_kind(request)
        check_length(request, self.limits.max_upload_bytes)
        reservation = self.admission.reserve()
        job: Job | None = None
        try:
            started = time.perf_counter()
            chunks = body_chunks(request.receive, self.limits.max_upload_bytes, self.limits.body_timeout_s)
            if kind == "multipart/form-data":
                files = await read_multipart(request, chunks, reservation, self.limits.max_files, fields)
            else:
                files = [("body", await read_raw(chunks))]
            files = files[:1] if first_only else files
            read_ms = 1000 * (time.perf_counter() - started)
            try:
                job = self.batcher.submit([data for _, data in files], explain, reservation.release)
            except ModelUnavailable as exc:
                raise BadRequest(503, str(exc), error_class="model_unavailable") from None
            predictions, timings = await self._wait(job)
            return [name for name, _ in files], predictions, {"read_ms": read_ms, **timings}
        finally:
            if job is None:
                reservation.release()
            elif job.future.cancelled():  # never reached the model: let go of it now
                job.finish()

    async def _wait(self, job: Job) -> tuple[list[Any], dict[str, float]]:
        timeout = self.limits.request_timeout_s
        try:
            return await asyncio.wait_for(asyncio.wrap_future(job.future), timeout)
        except TimeoutError:
            job.future.cancel()  # still waiting: the model thread skips it; already scoring: it finishes unread
            raise BadRequest(504, f"the model did not answer within {timeout:g} s (serve.request_timeout_s); the "
                                  "request was dropped: retry later", error_class="timeout") from None
        except ModelUnavailable as exc:
            raise BadRequest(503, str(exc), error_class="model_unavailable") from None
        except ModelFailed as exc:
            raise BadRequest(500, str(exc), error_class="model_error") from None

    def health(self) -> tuple[dict[str, Any], int]:
        alive = self.batcher.alive
        lim = self.limits
        body = {"status": "ok" if alive else "degraded", "model": self.model, "auth": self.token is not None,
                "max_upload_bytes": lim.max_upload_bytes,
                "model_thread": {"alive": alive, "busy_s": self.batcher.busy_seconds()},
                "load": self.admission.snapshot(),
                "limits": {k: getattr(lim, k) for k in ("max_files", "max_batch", "request_timeout_s", "body_timeout_s")}}
        return body, 200 if alive else 503


def _aggregation(given: str | None, model: dict[str, Any]) -> str:
    """The study aggregation asked for (query or form), else the model's recorded one, else mean; 400 if unknown."""
    how = (given or model.get("aggregation") or "mean").strip().lower()
    if how not in AGGREGATIONS:
        raise BadRequest(400, f"aggregation {given!r} is not one of {', '.join(AGGREGATIONS)}",
                         error_class="bad_aggregation")
    return how


def _predict_body(service: _Service, names: list[str], predictions: list[Any], timings: dict[str, float],
                  explain: bool, started: float, study: str | None = None) -> tuple[dict[str, Any], int]:
    """The JSON of /predict; ``study``: the aggregation of a study upload (adds ``study``)."""
    items = []
    for name, p in zip(names, predictions, strict=True):
        item = {"filename": name, **p.to_dict()}
        if explain and p.heatmap_png is not None:
            item["heatmap_png"] = base64.b64encode(p.heatmap_png).decode("ascii")
        items.append(item)
    spent = {k.removesuffix("_ms"): round(v, 2) for k, v in timings.items() if k != "batch_images"}
    body = {"model": service.model, "predictions": items, "batch_images": int(timings.get("batch_images", len(items))),
            "timings_ms": {**spent, "total": round(1000 * (time.perf_counter() - started), 2)}}
    if study is not None:
        from imgfeat.scoring.classifier import study_of

        body["study"] = study_of(predictions, study).to_dict()
    if all(p.error_class for p in predictions):
        first = predictions[0]
        body["detail"] = f"no image could be scored: {first.error_class}: {first.error_message}"
        body["error_class"] = first.error_class
        return body, 422
    return body, 200


def create_app(classifier: Any, *, model_uri: str = "", token: str | None = None, limits: Limits | None = None,
               **overrides: Any) -> Any:
    """The ASGI app serving ``classifier``; ``overrides``: fields of ``Limits`` (max_upload_bytes, max_waiting, ...)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    from imgfeat.serve.page import PAGE

    service = _Service(classifier, model_uri, token, dataclasses.replace(limits or Limits(), **overrides))
    app = FastAPI(title="imgfeat", version="1", description="Chest X-ray classification with a model trained by imgfeat.")
    app.state.service = service

    @app.exception_handler(BadRequest)
    async def _bad(request: Request, exc: BadRequest) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse({"detail": exc.detail, **exc.extra}, status_code=exc.status, headers=headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error answering %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal error (see the server log)", "error_class": "internal"}, status_code=500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE)

    @app.get("/health")
    async def health() -> JSONResponse:
        body, status = service.health()
        return JSONResponse(body, status_code=status)

    @app.post("/predict", openapi_extra={"requestBody": _UPLOAD_BODY})
    async def predict(request: Request, explain: bool = False, study: bool = False,
                      aggregation: str | None = None) -> JSONResponse:
        started = time.perf_counter()
        if aggregation is not None:
            _aggregation(aggregation, service.model)  # a wrong one is refused before the body is read
        fields: dict[str, str] = {}
        names, predictions, timings = await service.answer(request, explain, fields=fields)
        if study or fields.get("study", "").strip().lower() in _TRUE:
            how = _aggregation(aggregation or fields.get("aggregation"), service.model)
        else:
            how = None
        body, status = _predict_body(service, names, predictions, timings, explain, started, how)
        return JSONResponse(body, status_code=status)

    @app.post("/explain", openapi_extra={"requestBody": _UPLOAD_BODY},
              responses={200: {"content": {"image/png": {}}, "description": "the heat map over the image"}})
    async def explain(request: Request) -> Response:
        _, predictions, _ = await service.answer(request, True, first_only=True)
        p = predictions[0]
        if p.error_class:
            raise BadRequest(422, f"{p.error_class}: {p.error_message}", error_class=p.error_class)
        return Response(p.heatmap_png, media_type="image/png",
                        headers={"X-Imgfeat-Label": header_value(p.label or ""),
                                 "X-Imgfeat-Explanation": header_value(p.explanation or "")})

    return app


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


def serve(classifier: Any, *, host: str = "127.0.0.1", port: int = 8000, model_uri: str = "", token: str | None = None,
          allow_anonymous: bool = False, limits: Limits | None = None, limit_concurrency: int = 100,
          keep_alive_s: float = 5.0, **overrides: Any) -> None:
    """Run the app with uvicorn until interrupted. Anything but loopback needs a token (or ``allow_anonymous``);
    an empty token is refused. ``limit_concurrency``: connections and requests uvicorn takes at once (more: 503)."""
    import uvicorn

    token = check_token(token)
    if not is_loopback(host) and token is None and not allow_anonymous:
        raise ValueError(f"--host {host} exposes the model beyond this machine: set --token (or IMGFEAT_SERVE_TOKEN), "
                         "or pass --allow-anonymous if the network in front of it authenticates")
    if limit_concurrency < 1 or keep_alive_s <= 0:
        raise ValueError(f"serve.limit_concurrency ({limit_concurrency}) must be >= 1 and serve.keep_alive_s "
                         f"({keep_alive_s}) > 0")
    classifier.load(maps=True)
    app = create_app(classifier, model_uri=model_uri, token=token, limits=limits, **overrides)
    log.info("serving %s on http://%s:%d/ (page), POST /predict, GET /health", public_uri(model_uri), host, port)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5,
                limit_concurrency=limit_concurrency, timeout_keep_alive=keep_alive_s)
