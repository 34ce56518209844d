"""The answers ``imgfeat serve`` gives instead of a result: an HTTP status with a reason a client can act on."""

from __future__ import annotations

from typing import Any


class BadRequest(Exception):
    """An HTTP error answer: ``status``, ``detail`` (what went wrong and what to do) and extra JSON fields
    (``error_class``)."""

    def __init__(self, status: int, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.detail, self.extra = status, detail, extra


class ModelUnavailable(Exception):
    """The model thread is not running: no request can be scored until the server restarts (503)."""


class ModelFailed(Exception):
    """The model raised while scoring a batch; the thread goes on (500 for the requests of that batch)."""
