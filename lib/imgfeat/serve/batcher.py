"""The model thread of ``imgfeat serve``: one thread owns the model and scores every waiting request in one call.

Jobs whose client has gone (their future cancelled: a timeout, a dropped connection) are skipped before scoring;
a job is marked running before it is scored, so it can no longer be cancelled under the thread. The loop is
guarded: a failing model call fails the requests of that batch (``ModelFailed``, 500) and the thread goes on; an
error outside any call is logged and the thread goes on. Should the thread end anyway, every waiting request and
every later one gets ``ModelUnavailable`` (503) instead of waiting forever, and ``alive`` says so (/health).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

from imgfeat.serve.errors import ModelFailed, ModelUnavailable

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One request's images on their way to the model; ``future`` gets (predictions, timings) or the error."""

    contents: list[bytes]
    explain: bool
    release: Callable[[], None] | None = None  # gives the request's admission budget back
    future: Future = field(default_factory=Future)
    queued: float = field(default_factory=time.perf_counter)
    n: int = 0

    def __post_init__(self) -> None:
        self.n = len(self.contents)

    def finish(self) -> None:
        """Let go of the images and give the budget back (safe to call more than once)."""
        self.contents = []
        if self.release is not None:
            self.release()


class Batcher:
    """One thread owns the model: it takes every job waiting when it is free (up to ``max_batch`` images)."""

    def __init__(self, classifier: Any, max_batch: int = 16) -> None:
        self.classifier, self.max_batch = classifier, max_batch
        self.jobs: queue.Queue[Job] = queue.Queue()
        self._lock = threading.Lock()
        self._alive = True
        self._running: list[Job] = []
        self._busy_since: float | None = None
        self._thread = threading.Thread(target=self._run, name="imgfeat-model", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._alive and self._thread.is_alive()

    def busy_seconds(self) -> float:
        """How long the model has been on its current batch (0 when idle): a stuck model shows here."""
        since = self._busy_since
        return round(time.monotonic() - since, 3) if since is not None else 0.0

    def submit(self, contents: list[bytes], explain: bool, release: Callable[[], None] | None = None) -> Job:
        """Queue ``contents``; ``ModelUnavailable`` at once when the model thread has stopped."""
        job = Job(contents, explain, release)
        with self._lock:
            if not self.alive:
                raise ModelUnavailable("the model thread has stopped (see the server log); restart imgfeat serve")
            self.jobs.put(job)
        return job

    def _run(self) -> None:
        try:
            while True:
                try:
                    self._step()
                except Exception:  # a bug outside the model call: the thread must not end on it
                    log.exception("the model thread caught an unexpected error; it goes on")
        except BaseException:
            log.critical("the model thread stopped; /health reports it and requests get 503", exc_info=True)
        finally:
            self._stop()

    def _step(self) -> None:
        batch = self._collect()
        self._running, self._busy_since = batch, time.monotonic()
        try:
            for explain in (False, True):
                group = [j for j in batch if j.explain == explain]
                if group:
                    self._score(group, explain)
        except Exception as exc:  # (anything else ends the thread: _stop answers the batch)
            self._running, self._busy_since = [], None
            _fail(batch, ModelFailed(f"{type(exc).__name__} while answering"))
            raise
        self._running, self._busy_since = [], None

    def _collect(self) -> list[Job]:
        """The next batch: blocks for a first job, then takes what waits; cancelled jobs are dropped here."""
        batch: list[Job] = []
        images = 0
        while images < self.max_batch:
            try:
                job = self.jobs.get(block=not batch)
            except queue.Empty:
                break
            if job.future.set_running_or_notify_cancel():  # from here on the job cannot be cancelled
                batch.append(job)
                images += job.n
            else:
                job.finish()
        return batch

    def _score(self, group: list[Job], explain: bool) -> None:
        started = time.perf_counter()
        timings: dict[str, float] = {}
        try:
            predictions = self.classifier.predict([c for j in group for c in j.contents], explain=explain, timings=timings)
            if len(predictions) != sum(j.n for j in group):
                raise ValueError(f"the model gave {len(predictions)} predictions for {sum(j.n for j in group)} images")
        except Exception as exc:  # the model failed: the requests of this batch learn it, the thread goes on
            log.exception("scoring a batch of %d requests failed", len(group))
            _fail(group, ModelFailed(f"the model failed on this batch ({type(exc).__name__}; details in the server log)"))
            return
        for p in predictions:
            guard_finite(p)
        timings["batch_images"] = float(len(predictions))
        at = 0
        for job in group:
            job.finish()  # before answering: a client's next request must find its budget free
            _settle(job.future, (predictions[at:at + job.n], {**timings, "queue_ms": 1000 * (started - job.queued)}))
            at += job.n

    def _stop(self) -> None:
        """The thread is ending: no more jobs, and every one in hand or waiting gets 503."""
        with self._lock:
            self._alive = False
            left = list(self._running)
            while True:
                try:
                    left.append(self.jobs.get_nowait())
                except queue.Empty:
                    break
        _fail(left, ModelUnavailable("the model thread stopped while this request waited (see the server log); "
                                     "restart imgfeat serve"))


def guard_finite(p: Any) -> None:
    """A prediction whose probabilities are not all finite (NaN, inf) becomes that image's error, never a label."""
    if p.probabilities is None or all(math.isfinite(v) for v in p.probabilities.values()):
        return
    p.label = p.probabilities = p.heatmap = p.heatmap_png = p.explanation = None
    p.findings = None  # a multi-label prediction's calls go with its probabilities
    p.error_class = "non_finite_output"
    p.error_message = ("the model's probabilities for this image are not finite numbers (NaN or infinity): the model "
                       "is broken for this input; check its head and backbone weights")


def _fail(jobs: list[Job], exc: Exception) -> None:
    for job in jobs:
        job.finish()
        if not job.future.done():
            _settle(job.future, error=exc)


def _settle(future: Future, result: Any = None, error: Exception | None = None) -> None:
    """Set a future's outcome; one cancelled or already settled in the meantime is left as it is."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass
