"""Writer leases and the commit lock of a table: which runs are writing it now, and one commit at a time.

A table's lease folder (``<location>.imgfeat-leases/`` beside a path; under ``output.lease_dir`` for a table name)
holds, for every run writing the table:

- ``<run_id>.json``: the owner (run id, job, model, weights id, host, pid, start time), written once;
- ``<run_id>.heartbeat``: rewritten every few seconds by a daemon thread (:class:`RunLeases`).

A lease is live while its newest file is younger than its timeout, judged by the file system's own clock (the
modification time of a probe file written now), so the hosts' clocks need not agree; a lease taken on this host by a
process that has ended is dead at once (a killed job can be re-run without waiting for its lease to expire).
Two live leases of the same model and weights on one table conflict: the later one (by the file system's creation
order) is refused.

``_commit.lock`` is created exclusively by the run that commits rows (or rewrites the table) and deleted when it
is done. A waiting run breaks it only when its holder's lease is dead; of several breakers exactly one wins
(each first creates ``_commit.lock.break-<token>`` exclusively), so a broken lock is never broken twice.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

LOCK = "_commit.lock"
DEFAULT_TIMEOUT_S = 120.0


class LeaseError(RuntimeError):
    """Another live run holds the table for the same backbone, or this run lost its lease."""


@dataclass(frozen=True)
class Owner:
    """Who writes a table. ``model`` empty: a writer that claims no backbone (never conflicts on one)."""

    run_id: str
    model: str = ""
    weights_id: str = ""
    job: str = "extract"
    exclusive: bool = False  # conflicts with every other live writer (tables that allow only one)
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def describe(self) -> str:
        what = f"{self.job} of {self.model} (weights {self.weights_id[:40]})" if self.model else self.job
        return f"run {self.run_id}, {what}, on host {self.host} pid {self.pid}, started {self.started}"


class LeaseFs(Protocol):
    """The few file operations leases need; ``create_exclusive`` must be atomic (see :class:`HadoopFs`)."""

    def mkdirs(self, folder: str) -> None: ...
    def create_exclusive(self, path: str, text: str) -> bool: ...
    def write(self, path: str, text: str) -> None: ...
    def read(self, path: str) -> str | None: ...
    def listing(self, folder: str) -> dict[str, float]: ...
    def mtime(self, path: str) -> float | None: ...
    def delete(self, path: str) -> None: ...
    def rename(self, src: str, dst: str) -> bool: ...


class LocalFs:
    """A driver-local (or NFS-mounted) folder, through the OS: ``O_EXCL`` creation is atomic, unlike Hadoop's
    local file system, whose ``create(overwrite=false)`` checks and then creates."""

    def mkdirs(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)

    def create_exclusive(self, path: str, text: str) -> bool:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        return True

    def write(self, path: str, text: str) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)

    def read(self, path: str) -> str | None:
        try:
            with open(path, encoding="utf-8") as fh:
                return fh.read()
        except FileNotFoundError:
            return None

    def listing(self, folder: str) -> dict[str, float]:
        try:
            with os.scandir(folder) as entries:
                return {e.name: e.stat().st_mtime for e in entries if not e.name.startswith(".")}
        except FileNotFoundError:
            return {}

    def mtime(self, path: str) -> float | None:
        try:
            return os.stat(path).st_mtime
        except FileNotFoundError:
            return None

    def delete(self, path: str) -> None:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass

    def rename(self, src: str, dst: str) -> bool:
        if os.path.exists(dst):
            return False
        os.rename(src, dst)
        return True


class HadoopFs:
    """A Hadoop FileSystem (HDFS, dbfs:, s3a:, abfs:, gs: ...) through the JVM. ``create(overwrite=false)`` is
    atomic on HDFS, ABFS (If-None-Match) and GCS (generation 0); on S3 only where the connector makes it conditional."""

    def __init__(self, fs: Any, jvm: Any) -> None:
        self.fs, self.jvm = fs, jvm

    def _path(self, path: str) -> Any:
        return self.jvm.org.apache.hadoop.fs.Path(path)

    def mkdirs(self, folder: str) -> None:
        self.fs.mkdirs(self._path(folder))

    def create_exclusive(self, path: str, text: str) -> bool:
        try:
            out = self.fs.create(self._path(path), False)
        except Exception as exc:  # FileAlreadyExistsException (or the store's own conflict error)
            if "AlreadyExists" in str(exc) or "already exists" in str(exc).lower() or self.read(path) is not None:
                return False
            raise
        try:
            out.write(bytearray(text.encode("utf-8")))
        finally:
            out.close()
        return True

    def write(self, path: str, text: str) -> None:
        out = self.fs.create(self._path(path), True)
        try:
            out.write(bytearray(text.encode("utf-8")))
        finally:
            out.close()

    def read(self, path: str) -> str | None:
        try:
            stream = self.fs.open(self._path(path))
        except Exception:  # FileNotFoundException
            return None
        try:
            return str(self.jvm.org.apache.commons.io.IOUtils.toString(stream, "UTF-8"))
        finally:
            stream.close()

    def listing(self, folder: str) -> dict[str, float]:
        try:
            statuses = self.fs.listStatus(self._path(folder))
        except Exception as exc:  # FileNotFoundException: no lease yet
            if "FileNotFound" in str(exc) or "No such file" in str(exc):
                return {}
            raise
        return {s.getPath().getName(): s.getModificationTime() / 1000.0 for s in statuses
                if not s.getPath().getName().startswith(".")}

    def mtime(self, path: str) -> float | None:
        try:
            return self.fs.getFileStatus(self._path(path)).getModificationTime() / 1000.0
        except Exception:  # FileNotFoundException
            return None

    def delete(self, path: str) -> None:
        self.fs.delete(self._path(path), False)

    def rename(self, src: str, dst: str) -> bool:
        return bool(self.fs.rename(self._path(src), self._path(dst)))


def fs_now(fs: LeaseFs, folder: str) -> float:
    """The file system's clock: the modification time of a probe file written now (seconds)."""
    probe = f"{folder}/_clock-{uuid.uuid4().hex[:12]}"
    fs.write(probe, "")
    try:
        now = fs.mtime(probe)
    finally:
        fs.delete(probe)
    if now is None:
        raise LeaseError(f"cannot read back the probe file {probe}: is {folder} writable?")
    return now


@dataclass(frozen=True)
class LeaseInfo:
    run_id: str
    owner: Owner | None  # None: its owner file is unreadable (written by a newer version, or damaged)
    created: float  # the owner file's modification time (the file system's clock)
    alive: bool


class TableLease:
    """One run's lease on one table (its lease folder), and the table's commit lock."""

    def __init__(self, fs: LeaseFs, folder: str, owner: Owner, timeout_s: float) -> None:
        if timeout_s < 1:
            raise ValueError(f"output.lease_timeout_s must be >= 1 second, got {timeout_s}")
        self.fs, self.folder, self.owner, self.timeout_s = fs, folder.rstrip("/"), owner, float(timeout_s)
        self._lock_depth = 0
        self._lock_token: str | None = None
        self._mutex = threading.RLock()  # one lock holder per run: its threads take turns

    @property
    def run_id(self) -> str:
        return self.owner.run_id

    def _file(self, name: str) -> str:
        return f"{self.folder}/{name}"

    def acquire(self) -> None:
        """Register this run; refused (LeaseError, nothing left behind) when a live run conflicts."""
        self.fs.mkdirs(self.folder)
        tmp = self._file(f"_new-{self.run_id}.json")
        self.fs.write(tmp, json.dumps(asdict(self.owner)))
        if not self.fs.rename(tmp, self._file(f"{self.run_id}.json")):
            self.fs.delete(tmp)
            raise LeaseError(f"run id {self.run_id} already holds a lease in {self.folder}")
        self.beat()
        conflicts = self._conflicts()
        if conflicts:
            self.release()
            raise LeaseError(
                f"{self.folder.removesuffix('.imgfeat-leases')} is being written by {conflicts[0].describe()}"
                f"{' (a table that allows one writer at a time)' if conflicts[0].exclusive or self.owner.exclusive else ''}. "
                f"Wait for it to finish (its lease expires {self.timeout_s:.0f} s after its last heartbeat if it died), "
                "or write to another --output.")

    def _conflicts(self) -> list[Owner]:
        leases = self.leases()
        mine = leases.get(self.run_id)
        if mine is None:
            raise LeaseError(f"the lease of run {self.run_id} vanished from {self.folder} while it was being taken")
        earlier = [i for i in leases.values() if i.alive and i.run_id != self.run_id
                   and (i.created, i.run_id) < (mine.created, self.run_id)]
        return [i.owner or Owner(i.run_id, job="unknown writer", exclusive=True) for i in earlier
                if i.owner is None or self._conflicts_with(i.owner)]

    def _conflicts_with(self, other: Owner) -> bool:
        if self.owner.exclusive or other.exclusive:
            return True
        return bool(self.owner.model) and (other.model, other.weights_id) == (self.owner.model, self.owner.weights_id)

    def beat(self) -> None:
        self.fs.write(self._file(f"{self.run_id}.heartbeat"), f"{time.time():.3f}")

    def release(self) -> None:
        self.fs.delete(self._file(f"{self.run_id}.json"))
        self.fs.delete(self._file(f"{self.run_id}.heartbeat"))

    def leases(self) -> dict[str, LeaseInfo]:
        """Every lease in the folder (this run's too), live or not."""
        files = self.fs.listing(self.folder)
        if not files:
            return {}
        now = fs_now(self.fs, self.folder)
        out = {}
        for name, created in files.items():
            if not name.endswith(".json") or name.startswith("_"):
                continue
            run_id = name.removesuffix(".json")
            newest = max(created, files.get(f"{run_id}.heartbeat", created))
            owner = _owner(self.fs.read(self._file(name)))
            alive = now - newest <= self.timeout_s and not (owner is not None and _process_gone(owner))
            out[run_id] = LeaseInfo(run_id, owner, created, alive)
        return out

    def live_runs(self) -> set[str]:
        return {r for r, info in self.leases().items() if info.alive}

    def remove_dead(self) -> list[str]:
        """Delete the files of expired leases (and heartbeats without a lease), and half-written files of killed
        runs older than the timeout; the dead run ids."""
        files = self.fs.listing(self.folder)
        live = self.live_runs()
        dead = sorted({n.rsplit(".", 1)[0] for n in files if n.endswith((".json", ".heartbeat"))
                       and not n.startswith("_")} - live)
        for run_id in dead:
            self.fs.delete(self._file(f"{run_id}.json"))
            self.fs.delete(self._file(f"{run_id}.heartbeat"))
        strays = [n for n in files if n.startswith(("_new-", "_clock-"))]
        if strays:
            now = fs_now(self.fs, self.folder)
            for name in strays:
                if now - files[name] > self.timeout_s:
                    self.fs.delete(self._file(name))
        return dead

    def check_held(self) -> None:
        """Raise LeaseError when this run's lease is gone or expired (another run may be cleaning up after it)."""
        info = self.leases().get(self.run_id)
        if info is None or not info.alive:
            raise LeaseError(
                f"run {self.run_id} lost its lease on {self.folder.removesuffix('.imgfeat-leases')} (no heartbeat for "
                f"over {self.timeout_s:.0f} s: a stalled driver?); its rows were not committed. Run the job again.")

    @contextmanager
    def lock(self) -> Iterator[None]:
        """The table's commit lock, held by this run for the block (re-entrant within the run)."""
        with self._mutex:
            if self._lock_depth == 0:
                self._lock_token = self._take_lock()
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0:
                    self._drop_lock()

    def _take_lock(self) -> str:
        token = f"{self.run_id}.{uuid.uuid4().hex[:12]}"
        lock, pause, waited_since = self._file(LOCK), 0.05, time.monotonic()
        next_note = waited_since + 30
        while not self.fs.create_exclusive(lock, token):
            holder = self.fs.read(lock)
            if holder is None:  # released meanwhile
                time.sleep(pause)
                continue
            holder_run = holder.split(".", 1)[0]
            if self._dead_holder(holder, holder_run, lock):
                self._break_lock(holder)
                continue
            if time.monotonic() > next_note:
                log.warning("waiting %.0f s for the commit lock of %s, held by run %s", time.monotonic() - waited_since,
                            self.folder, holder_run)
                next_note += 60
            time.sleep(pause)
            pause = min(0.5, pause * 2)
        return token

    def _dead_holder(self, holder: str, holder_run: str, lock: str) -> bool:
        """The lock's holder is this run (a lock it failed to delete) or not running; an empty lock is being
        written (create, then write) unless it is older than the lease timeout."""
        if not holder:
            created = self.fs.mtime(lock)
            return created is not None and fs_now(self.fs, self.folder) - created > self.timeout_s
        return holder_run == self.run_id or holder_run not in self.live_runs()

    def _break_lock(self, holder: str) -> None:
        marker = self._file(f"{LOCK}.break-{holder}")
        if not self.fs.create_exclusive(marker, self.run_id):
            return  # another run is breaking it
        try:
            if self.fs.read(self._file(LOCK)) == holder:
                log.warning("breaking the commit lock of %s: its holder (run %s) is no longer running", self.folder,
                            holder.split(".", 1)[0])
                self.fs.delete(self._file(LOCK))
        finally:
            self.fs.delete(marker)

    def _drop_lock(self) -> None:
        if self.fs.read(self._file(LOCK)) == self._lock_token:
            self.fs.delete(self._file(LOCK))
        self._lock_token = None


def _process_gone(owner: Owner) -> bool:
    """The owner ran on this host and its process has ended (a killed job's lease need not wait to expire)."""
    if owner.host != socket.gethostname() or owner.pid <= 0:
        return False
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # e.g. another user's process: it exists
        return False
    return False


def _owner(text: str | None) -> Owner | None:
    try:
        data = json.loads(text or "")
        return Owner(**{k: data[k] for k in Owner.__dataclass_fields__ if k in data})
    except (ValueError, TypeError, KeyError):
        return None


class RunLeases:
    """A run's leases on the tables it writes, refreshed by one daemon thread; a context manager.

    Entering takes every lease (in a fixed order) or none; leaving stops the heartbeat and releases them.
    """

    def __init__(self, leases: dict[str, TableLease], heartbeat_s: float | None = None) -> None:
        self.leases = leases
        timeout = min((lease.timeout_s for lease in leases.values()), default=120.0)
        self.heartbeat_s = heartbeat_s or max(0.2, min(10.0, timeout / 6))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __getitem__(self, location: str) -> TableLease:
        return self.leases[location]

    def get(self, location: str) -> TableLease | None:
        return self.leases.get(location)

    def __enter__(self) -> RunLeases:
        taken: list[TableLease] = []
        try:
            for lease in sorted(self.leases.values(), key=lambda item: item.folder):
                lease.acquire()
                taken.append(lease)
        except BaseException:
            for lease in taken:
                lease.release()
            raise
        self._thread = threading.Thread(target=self._beat, name="imgfeat-lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            for lease in self.leases.values():
                try:
                    lease.beat()
                except Exception as exc:  # the next beat may succeed; check_held catches a lost lease
                    log.warning("heartbeat of %s failed: %s", lease.folder, str(exc)[:200])

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for lease in self.leases.values():
            try:
                lease.release()
            except Exception as err:  # expires by itself
                log.warning("could not release the lease in %s (%s); it expires by itself", lease.folder, str(err)[:200])


def lease_store(spark: SparkSession, folder: str) -> tuple[LeaseFs, str]:
    """(file operations, folder) for a lease folder: the OS for local folders, else Hadoop's FileSystem."""
    from imgfeat.store.paths import hadoop_fs

    fs, jpath = hadoop_fs(spark, folder)
    qualified = fs.makeQualified(jpath)
    if str(fs.getScheme()) == "file":
        return LocalFs(), str(qualified.toUri().getPath())
    return HadoopFs(fs, spark.sparkContext._jvm), str(qualified.toString())  # type: ignore[union-attr]


def table_lease(spark: SparkSession, location: str, owner: Owner, timeout_s: float = DEFAULT_TIMEOUT_S,
                lease_dir: str | None = None) -> TableLease:
    """``owner``'s (not yet acquired) lease on ``location``."""
    from imgfeat.store.paths import lease_folder

    fs, folder = lease_store(spark, lease_folder(spark, location, lease_dir))
    return TableLease(fs, folder, owner, timeout_s)


def open_leases(spark: SparkSession, locations: list[str], fmt: str, owner: Owner,
                timeout_s: float = DEFAULT_TIMEOUT_S, lease_dir: str | None = None) -> RunLeases:
    """A run's leases on ``locations`` (enter the result to take them). A Parquet table name allows one writer at a
    time (Spark's commit protocol shares its ``_temporary`` folder); every other table one per backbone."""
    from imgfeat.store.paths import is_table_name

    return RunLeases({
        location: table_lease(spark, location, replace(owner, exclusive=fmt == "parquet" and is_table_name(location)),
                              timeout_s, lease_dir)
        for location in dict.fromkeys(locations)
    })


@contextmanager
def own_lease(spark: SparkSession, location: str, lease: TableLease | None = None) -> Iterator[TableLease]:
    """``lease`` itself, or a lease of a writer that claims no backbone for the block (callers without a run)."""
    if lease is not None:
        yield lease
        return
    with RunLeases({location: table_lease(spark, location, Owner(uuid.uuid4().hex[:12], job="maintenance"))}) as leases:
        yield leases[location]
