"""Reading an upload from the request stream: bounded in size and in time, multipart parsed once as it arrives.

``body_chunks`` yields the body as the client sends it and stops it with 413 past ``max_upload_bytes`` (also
when no Content-Length was sent) and with 408 when the whole body has not arrived within ``body_timeout_s``.
A multipart upload is parsed from that stream by Starlette's parser (file parts spool to a temporary file past
1 MB, never joined into one body first); every file part after the first reserves one more image of the
admission budget as the parser meets it (``imgfeat.serve.admission``).
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from imgfeat.serve.admission import Reservation
from imgfeat.serve.errors import BadRequest

RAW_TYPES = ("image/", "application/dicom", "application/octet-stream", "application/x-nifti", "application/gzip")
MAX_FIELD_BYTES = 64 * 1024  # a non-file form field (study=1, aggregation=max; others ignored): larger ones are refused


def content_kind(request: Any) -> str:
    """The request's media type, checked before anything is read: multipart, or a raw image type (else 415)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "multipart/form-data" and (not kind or not any(kind.startswith(t) for t in RAW_TYPES)):
        raise BadRequest(415, f"content type {kind or '(none)'!r} is not an image: upload multipart/form-data, or "
                              "the raw bytes as image/png, image/jpeg, application/dicom or application/octet-stream")
    return kind


def check_length(request: Any, max_bytes: int) -> None:
    """413 from the Content-Length header alone, before the body is read."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise BadRequest(413, f"upload of {int(length):,} bytes is over the limit of {max_bytes:,} bytes "
                              "(imgfeat serve --max-upload-mb)")


async def body_chunks(receive: Callable[[], Any], max_bytes: int, timeout_s: float) -> AsyncIterator[bytes]:
    """The body's chunks as they arrive; 413 past ``max_bytes``, 408 when it takes longer than ``timeout_s``."""
    deadline, size = time.monotonic() + timeout_s, 0
    while True:
        try:
            message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            raise BadRequest(408, f"the request body did not arrive within {timeout_s:g} s (serve.body_timeout_s); "
                                  "send it faster or in one go", error_class="body_timeout") from None
        if message["type"] == "http.disconnect":
            raise BadRequest(400, "the client disconnected before sending the whole body", error_class="disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise BadRequest(413, f"upload is over the limit of {max_bytes:,} bytes (imgfeat serve --max-upload-mb)")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def read_raw(chunks: AsyncIterator[bytes]) -> bytes:
    """The whole body, held once (BytesIO hands its buffer over without a copy)."""
    buffer = io.BytesIO()
    async for chunk in chunks:
        buffer.write(chunk)
    body = buffer.getvalue()
    if not body:
        raise BadRequest(400, "the request body is empty: send the image bytes")
    return body


async def read_multipart(request: Any, chunks: AsyncIterator[bytes], reservation: Reservation,
                         max_files: int, fields: dict[str, str] | None = None) -> list[tuple[str, bytes]]:
    """(file name, bytes) of every file part, parsed from ``chunks`` as they arrive; ``fields`` gets the text
    fields (the last value of each name)."""
    from starlette.formparsers import MultiPartException

    parser = _counting_parser(request.headers, chunks, max_files, reservation.add_image)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise BadRequest(400, f"malformed multipart body: {exc.message} (at most {max_files} files per request)") from None
    try:
        files = [(getattr(v, "filename", None) or k, await v.read()) for k, v in form.multi_items() if hasattr(v, "read")]
        if fields is not None:
            fields.update((k, v) for k, v in form.multi_items() if isinstance(v, str))
    finally:
        await form.close()
    if not files:
        raise BadRequest(400, "the multipart body has no file part: send the image as a file field, e.g. "
                              "curl -F file=@xray.png")
    return files


def _counting_parser(headers: Any, chunks: AsyncIterator[bytes], max_files: int, add_image: Callable[[], None]) -> Any:
    """Starlette's multipart parser, calling ``add_image`` for every file part after the first."""
    from starlette.formparsers import MultiPartParser

    class CountingParser(MultiPartParser):
        files = 0

        def on_headers_finished(self) -> None:
            super().on_headers_finished()
            if self._current_part.file is not None:
                self.files += 1
                if self.files > 1:
                    add_image()

    return CountingParser(headers, chunks, max_files=max_files, max_fields=max_files, max_part_size=MAX_FIELD_BYTES)
