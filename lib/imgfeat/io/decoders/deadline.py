"""A wall-clock limit per decode (``preprocess.decode_timeout_s``): past it, the file is a ``timed_out`` error and
the caller goes on with the next one.

Python cannot stop a thread. Each caller thread hands its decodes to its own runner thread and waits at most the
limit; a runner whose decode overran is abandoned (a daemon: it finishes, or not, on its own and never blocks the
worker's exit, then ends) and the caller gets a fresh runner. The decoding budget (``budget``) makes a decode that
long rare; should ``MAX_ABANDONED`` abandoned decodes still be running in this process, the next decode raises
``StuckDecodes`` (failing the task with that message) instead of piling up threads and their memory.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from imgfeat.io.decoders.base import TIMED_OUT, DecodeError

MAX_ABANDONED = 3  # per process

_ABANDONED: list[threading.Thread] = []
_LOCK = threading.Lock()


class StuckDecodes(RuntimeError):
    """Too many decodes in this process ran past the limit and are still running."""


def stuck_decodes() -> int:
    """Abandoned decodes of this process still running."""
    with _LOCK:
        _ABANDONED[:] = [t for t in _ABANDONED if t.is_alive()]
        return len(_ABANDONED)


class _Runner:
    """A daemon thread running one job at a time for one caller thread."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.done = threading.Event()
        self.result: list[Any] = []
        self.thread = threading.Thread(target=self._loop, name="imgfeat-decode", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            fn, args = job
            try:
                self.result = [fn(*args), None]
            except BaseException as exc:  # handed to the caller
                self.result = [None, exc]
            self.done.set()

    def run(self, fn: Callable[..., Any], args: tuple[Any, ...], timeout_s: float) -> tuple[bool, Any]:
        """(finished, result) of ``fn(*args)`` within ``timeout_s``; an exception of ``fn`` is raised here."""
        self.done.clear()
        self.jobs.put((fn, args))
        if not self.done.wait(timeout_s):
            return False, None
        value, error = self.result
        self.result = []
        if error is not None:
            raise error
        return True, value

    def stop(self) -> None:
        self.jobs.put(None)


class DecodeWatchdog:
    """Runs decodes with a per-call wall-clock limit (``timeout_s`` <= 0: in the caller, no limit). One per batch
    or task; ``close`` ends its idle runners. Safe to use from several threads (each gets its own runner)."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._local = threading.local()
        self._runners: list[_Runner] = []
        self._lock = threading.Lock()

    def _runner(self) -> _Runner:
        runner = getattr(self._local, "runner", None)
        if runner is None:
            runner = self._local.runner = _Runner()
            with self._lock:
                self._runners.append(runner)
        return runner

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, or a ``timed_out`` DecodeError when it runs past the limit."""
        if self.timeout_s <= 0:
            return fn(*args)
        stuck = stuck_decodes()
        if stuck >= MAX_ABANDONED:
            raise StuckDecodes(f"{stuck} decodes in this Python worker ran past preprocess.decode_timeout_s="
                               f"{self.timeout_s:g}s and are still running (Python cannot stop a thread): failing "
                               "the task rather than piling them up. Look for timed_out rows in the errors table "
                               "and leave those files out, or raise preprocess.decode_timeout_s")
        runner = self._runner()
        finished, value = runner.run(fn, args, self.timeout_s)
        if finished:
            return value
        self._local.runner = None
        runner.stop()  # it ends once its decode returns
        with self._lock:
            self._runners.remove(runner)
        with _LOCK:
            _ABANDONED.append(runner.thread)
        return DecodeError(TIMED_OUT, f"decoding took longer than preprocess.decode_timeout_s={self.timeout_s:g}s and "
                                      "was abandoned (an adversarial or pathological file?); leave the file out, or "
                                      "raise the limit")

    def close(self) -> None:
        with self._lock:
            runners, self._runners = self._runners, []
        for runner in runners:
            runner.stop()
