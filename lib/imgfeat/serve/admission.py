"""How much work ``imgfeat serve`` takes in at once: requests and images, reserved before a body is read.

A request reserves one request slot and one image when it arrives, before any of its body is read; a multipart
upload reserves one more image for every further file part as the parser meets it. The reservation is given back
when the model has scored the request (or the request failed, timed out or was dropped). With either budget full,
a new request gets 503 at once, so a flood of uploads never sits in memory waiting: at most ``max_requests``
bodies of at most ``max_upload_bytes`` each are held, and at most ``max_images`` images wait for the model.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from imgfeat.serve.errors import BadRequest

DEFAULT_MAX_UPLOAD = 50 * 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """The server's bounds (settings ``serve.*``, docs/serving.md "Limits")."""

    max_upload_bytes: int = DEFAULT_MAX_UPLOAD  # one request's body
    max_files: int = 16  # file parts of one multipart upload
    max_waiting: int = 32  # requests admitted besides the one being scored (reading, waiting)
    max_images: int = 64  # images admitted at once (read, waiting or being scored)
    max_batch: int = 16  # images per model call
    request_timeout_s: float = 60.0  # admission to answer, beyond it 504
    body_timeout_s: float = 60.0  # to receive a whole body, beyond it 408

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_files", "max_images", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"serve.{name} = {getattr(self, name)} must be >= 1")
        if self.max_waiting < 0:
            raise ValueError(f"serve.max_waiting = {self.max_waiting} must be >= 0")
        for name in ("request_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"serve.{name} = {getattr(self, name)} must be > 0 seconds")


class Admission:
    """The budgets: ``1 + max_waiting`` requests and ``max_images`` images in at once (thread safe)."""

    def __init__(self, limits: Limits) -> None:
        self.max_requests, self.max_images = 1 + limits.max_waiting, limits.max_images
        self.requests = self.images = 0
        self._lock = threading.Lock()

    def reserve(self) -> Reservation:
        """One request and its first image; ``BadRequest(503)`` when either budget is full."""
        with self._lock:
            if self.requests >= self.max_requests:
                raise BadRequest(503, f"busy: {self.requests} requests are already being read, waiting or scored "
                                      f"(the limit, serve.max_waiting + 1, is {self.max_requests}); retry shortly",
                                 error_class="busy")
            if self.images >= self.max_images:
                raise _images_busy(self.images, self.max_images)
            self.requests += 1
            self.images += 1
        return Reservation(self)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"requests": self.requests, "images": self.images, "max_requests": self.max_requests,
                    "max_images": self.max_images}


class Reservation:
    """What one request holds of the budgets; ``release`` gives it back (idempotent, from any thread)."""

    def __init__(self, admission: Admission) -> None:
        self._admission, self.images, self.released = admission, 1, False

    def add_image(self) -> None:
        """One more image (a further file part); 413 if one request could never fit, 503 if the budget is full now."""
        a = self._admission
        with a._lock:
            if self.released:
                return
            if self.images + 1 > a.max_images:
                raise BadRequest(413, f"more than {a.max_images} images in one request (serve.max_images); send "
                                      "fewer files per request", error_class="too_many_files")
            if a.images >= a.max_images:
                raise _images_busy(a.images, a.max_images)
            a.images += 1
            self.images += 1

    def release(self) -> None:
        a = self._admission
        with a._lock:
            if not self.released:
                self.released = True
                a.requests -= 1
                a.images -= self.images


def _images_busy(images: int, limit: int) -> BadRequest:
    return BadRequest(503, f"busy: {images} images are already being read, waiting or scored (serve.max_images = "
                           f"{limit}); retry shortly", error_class="busy")
