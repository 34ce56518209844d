"""Several runs writing one table: writer leases, the commit lock, repair that spares live runs, Delta commits.

The concurrent runs are two threads of this process sharing the session's SparkSession (two backbones = the
``tiny`` backbone with two seeds, i.e. two weights ids); Delta's JARs are not on this machine, so its commits are
checked through a writer that records them.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import imgfeat.store.tables
from imgfeat.demo.samples import encode, make_samples, xray_array
from imgfeat.featurize.extract import run_extract
from imgfeat.store import delta_commit, paths
from imgfeat.store.lease import LOCK, HadoopFs, LeaseError, LocalFs, Owner, RunLeases, TableLease, table_lease
from imgfeat.store.tables import StorageError, append_rows, drop_scratch, materialize, read_table, repair

from conftest import tiny_config

SMALL = ((64, 64), (80, 64), (64, 96))


@pytest.fixture()
def session_conf(spark):
    """Two runs in one session interleave their ``sql_conf`` blocks: put the session's settings back afterwards."""
    before = dict(spark.conf.getAll)
    yield
    after = dict(spark.conf.getAll)
    for key in after.keys() - before.keys():
        spark.conf.unset(key)
    for key, value in before.items():
        if after.get(key) != value:
            spark.conf.set(key, value)


def _rows(spark, paths_, model="m", weights="w", run_id="r0", slices=(None,)):
    from pyspark.sql import functions as F

    data = [(p, model, weights, run_id, s) for p in paths_ for s in slices]
    return spark.createDataFrame(data, "path string, model string, weights_id string, run_id string, slice_index int") \
        .withColumn("features", F.array(F.lit(0.5).cast("float")))


def _fs(spark, tmp_path, kind):
    """The OS's file operations, or Hadoop's (what a cluster's lease folders go through) on a local folder."""
    if kind == "local":
        return LocalFs()
    return HadoopFs(imgfeat.store.tables._hadoop_fs(spark, str(tmp_path))[0], spark.sparkContext._jvm)


def _lease(folder, run_id, model="tiny", weights="none-seed1", timeout=120.0, fs=None):
    return TableLease(fs or LocalFs(), str(folder), Owner(run_id, model, weights), timeout)


def _age(folder, run_id, seconds):
    """Make a lease look as if its last heartbeat was ``seconds`` ago."""
    for suffix in (".json", ".heartbeat"):
        path = os.path.join(folder, run_id + suffix)
        if os.path.exists(path):
            old = time.time() - seconds
            os.utime(path, (old, old))


def test_two_backbones_writing_one_table_at_once_each_end_exactly_once(spark, tmp_path, monkeypatch, session_conf):
    """Seed 1 replaces changed files (rewrite + swap) while seed 2 appends, both having written their rows when
    either commits: neither loses the other's rows, in the features and in the errors table."""
    s = make_samples(str(tmp_path / "img"), per_class=4, sizes=SMALL, seed=7)
    cfg = {seed: tiny_config(s.root, str(tmp_path / "feats"), f"model.seed={seed}", "inference.warmup=false")
           for seed in (1, 2)}
    first = run_extract(spark, cfg[1])
    changed = sorted(glob.glob(os.path.join(s.root, "NORMAL", "*.png")))[0]
    fixed = next(p for p, c in s.bad.items() if c == "truncated")
    for i, path in enumerate((changed, fixed)):  # new content: seed 1 replaces their rows in both tables
        data, _ = encode(xray_array(np.random.default_rng(20 + i), (64, 64), sick=False), "rgb_png")
        with open(path, "wb") as fh:
            fh.write(data)
    real_append, waiting = imgfeat.store.tables.append_rows, set()
    barrier = threading.Barrier(2, timeout=300)

    def together(spark_, df, location, *args, **kwargs):
        if threading.get_ident() not in waiting:  # each run's features write: both have staged rows
            waiting.add(threading.get_ident())
            barrier.wait()
        return real_append(spark_, df, location, *args, **kwargs)

    monkeypatch.setattr(imgfeat.store.tables, "append_rows", together)
    results, failures = {}, []

    def run(seed):
        try:
            results[seed] = run_extract(spark, cfg[seed])
        except BaseException as exc:  # reported below
            failures.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not failures, failures
    assert (results[1].processed, results[1].replaced) == (2, 2)
    assert results[2].processed == first.listed
    feats = read_table(spark, cfg[1].output.path, "parquet").toPandas()
    errors = read_table(spark, cfg[1].errors_path, "parquet").toPandas()
    for weights_id in ("none-seed1", "none-seed2"):
        f, e = feats[feats["weights_id"] == weights_id], errors[errors["weights_id"] == weights_id]
        assert f["path"].is_unique and e["path"].is_unique, weights_id
        assert set(f["path"]).isdisjoint(e["path"]), weights_id
        assert len(f) + len(e) == first.listed, weights_id
        assert "file:" + fixed in set(f["path"]), weights_id
    assert not [p for p in glob.glob(cfg[1].output.path + "*.imgfeat-*") if not p.endswith(".imgfeat-leases")]
    assert not [n for n in os.listdir(cfg[1].output.path + ".imgfeat-leases") if not n.startswith(".")]


def test_repair_spares_a_live_runs_folders_and_removes_a_dead_runs(spark, tmp_path):
    location = str(tmp_path / "feats")
    append_rows(spark, _rows(spark, ["a", "b"]), location, "parquet")
    live = _lease(location + ".imgfeat-leases", "1ive0000run1")
    live.acquire()
    dead = _lease(location + ".imgfeat-leases", "dead0000run2", weights="none-seed2")
    dead.acquire()
    _age(dead.folder, dead.run_id, 3600)
    kept = [paths.run_folder(location, "staging", live.run_id, "x"), paths.run_folder(location, "scratch", live.run_id, "todo")]
    gone = [paths.run_folder(location, "staging", dead.run_id, "x"), paths.run_folder(location, "scratch", dead.run_id, "todo")]
    temporary = os.path.join(location, "_temporary", "0")
    for folder in kept + gone + [temporary]:
        os.makedirs(folder)
    repair(spark, location, "parquet")
    assert all(os.path.isdir(f) for f in kept) and not any(os.path.exists(f) for f in gone)
    assert os.path.isdir(temporary)  # a live run holds a lease: its output is never touched
    assert not os.path.exists(os.path.join(dead.folder, dead.run_id + ".json"))  # the expired lease is gone
    live.release()
    repair(spark, location, "parquet")
    assert not any(os.path.exists(f) for f in kept + [temporary])
    assert sorted(read_table(spark, location, "parquet").toPandas()["path"]) == ["a", "b"]


def test_a_second_writer_of_the_same_backbone_is_refused_while_the_first_holds_the_lease(spark, tmp_path, samples):
    cfg = tiny_config(samples.root, str(tmp_path / "feats"))
    first = table_lease(spark, cfg.output.path, Owner("f1rst0000run", "tiny", "none-seed42"))
    first.acquire()
    try:
        with pytest.raises(LeaseError, match=f"run f1rst0000run, extract of tiny .*on host .* pid {os.getpid()}"):
            run_extract(spark, cfg)
        other = table_lease(spark, cfg.output.path, Owner("0ther0000run", "tiny", "none-seed7"))
        other.acquire()  # another backbone (weights) proceeds alongside
        other.release()
    finally:
        first.release()
    assert not os.path.exists(cfg.output.path)  # the refused run wrote nothing
    assert sorted(os.listdir(first.folder)) == []  # and left no lease behind


def test_the_lease_of_an_ended_process_on_this_host_is_dead_at_once(tmp_path):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = TableLease(LocalFs(), str(tmp_path), Owner("k1lled00run1", "tiny", "none-seed1", pid=int(ended.stdout)), 120)
    killed.acquire()  # as a job killed with SIGKILL leaves it: fresh, never released
    again = _lease(tmp_path, "again000run2")
    again.acquire()  # same backbone, not refused
    assert again.live_runs() == {"again000run2"}


@pytest.mark.parametrize("kind", ["local", "hadoop"])
def test_same_backbone_leases_taken_together_admit_exactly_one(spark, tmp_path, kind):
    fs = _fs(spark, tmp_path, kind)
    assert fs.listing(str(tmp_path / "missing")) == {}
    a, b = (_lease(tmp_path / "t.imgfeat-leases", r, fs=fs) for r in ("aaaa0000run1", "bbbb0000run2"))
    for lease in (a, b):  # both registered before either checks (what a simultaneous start looks like)
        lease.fs.mkdirs(lease.folder)
        lease.fs.write(f"{lease.folder}/{lease.run_id}.json", json.dumps(dataclasses.asdict(lease.owner)))
        lease.beat()
    verdicts = []
    for lease in (a, b):
        verdicts.append(bool(lease._conflicts()))
    assert sorted(verdicts) == [False, True]


@pytest.mark.parametrize("kind", ["local", "hadoop"])
def test_a_stale_lease_and_its_commit_lock_are_broken_and_a_live_lock_is_waited_for(spark, tmp_path, kind):
    fs = _fs(spark, tmp_path, kind)
    folder = tmp_path / "t.imgfeat-leases"
    stale = _lease(folder, "57a1e0000run", fs=fs)
    stale.acquire()
    with stale.lock():
        pass
    assert fs.create_exclusive(f"{folder}/{LOCK}", "57a1e0000run.0badc0de")  # died holding the lock
    _age(str(folder), stale.run_id, 3600)
    fresh = _lease(folder, "fre5h000run1", fs=fs)
    fresh.acquire()  # same backbone: allowed, the other lease expired
    order = []
    with fresh.lock():  # breaks the dead run's lock
        order.append("fresh in")
        other = _lease(folder, "0ther000run2", weights="none-seed9", fs=fs)
        other.acquire()
        inside = threading.Event()

        def wait_for_lock():
            with other.lock():
                order.append("other in")
                inside.set()

        waiter = threading.Thread(target=wait_for_lock)
        waiter.start()
        inside.wait(1.0)  # time for the waiter to (wrongly) break a live holder's lock
        order.append("fresh out")
    waiter.join(timeout=120)
    assert order == ["fresh in", "fresh out", "other in"]
    assert fs.read(f"{folder}/{LOCK}") is None
    fresh.remove_dead()
    assert not (folder / "57a1e0000run.json").exists()


def test_a_run_that_lost_its_lease_commits_nothing(spark, tmp_path):
    location = str(tmp_path / "feats")
    append_rows(spark, _rows(spark, ["a"]), location, "parquet")
    lease = table_lease(spark, location, Owner("l0st0000run1", "m", "w"), timeout_s=60)
    with RunLeases({location: lease}, heartbeat_s=3600):
        _age(lease.folder, lease.run_id, 600)  # e.g. a driver stalled past its timeout: others may clean up
        with pytest.raises(LeaseError, match="lost its lease"):
            append_rows(spark, _rows(spark, ["b"]), location, "parquet", lease=lease)
    assert sorted(read_table(spark, location, "parquet").toPandas()["path"]) == ["a"]
    assert not glob.glob(location + ".imgfeat-staging-*")


def test_a_location_with_glob_characters_is_repaired_and_read_as_itself(spark, tmp_path):
    location = str(tmp_path / "out[1]{a,b}*?")
    neighbour = str(tmp_path / "out1ab")  # what "out[1]{a,b}*?" means as a glob
    append_rows(spark, _rows(spark, ["n"]), neighbour, "parquet")
    append_rows(spark, _rows(spark, ["a", "b"]), location, "parquet")
    append_rows(spark, _rows(spark, ["b"], run_id="r1"), location, "parquet",
                replace=_rows(spark, ["b"]).select("path", "model", "weights_id"))
    before = sorted(read_table(spark, location, "parquet").toPandas()["path"])
    assert before == ["a", "b"]
    # A kill inside the swap, and a dead run's staging, beside the table and beside the neighbour.
    old = paths.run_folder(location, "old", "dead0000run1", "x")
    os.rename(location, old)
    os.makedirs(paths.run_folder(location, "staging", "dead0000run1", "y"))
    foreign = paths.run_folder(neighbour, "staging", "0ther000run1", "z")
    os.makedirs(foreign)
    repair(spark, location, "parquet")
    assert sorted(read_table(spark, location, "parquet").toPandas()["path"]) == before
    assert [os.path.basename(p) for p in glob.glob(glob.escape(location) + ".imgfeat-*")] == [
        os.path.basename(location) + ".imgfeat-leases"]
    assert os.path.isdir(foreign) and read_table(spark, neighbour, "parquet").count() == 1


def test_a_parquet_replace_on_an_object_store_is_refused_and_appends_are_not(spark, tmp_path, monkeypatch):
    for location in ("s3://b/t", "s3a://b/t", "gs://b/t", "abfss://c@a.dfs.core.windows.net/t", "wasbs://c@a/t",
                     "dbfs:/t"):
        assert paths.is_object_store(None, location), location
    assert not paths.is_object_store(None, "/data/t") and not paths.is_object_store(None, "hdfs://nn/t")
    keys = _rows(spark, ["a"]).select("path", "model", "weights_id")
    with pytest.raises(StorageError, match=r"object store \(s3a:\).*--format delta.*--mode overwrite"):
        append_rows(spark, _rows(spark, ["a"]), "s3a://bucket/features", "parquet", replace=keys)
    location = str(tmp_path / "t")
    monkeypatch.setattr(imgfeat.store.tables, "is_object_store", lambda spark_, loc: True)  # a local stand-in
    append_rows(spark, _rows(spark, ["a"]), location, "parquet")
    append_rows(spark, _rows(spark, ["b"]), location, "parquet")
    with pytest.raises(StorageError, match="object store"):
        append_rows(spark, _rows(spark, ["a"]), location, "parquet", replace=keys)
    assert sorted(read_table(spark, location, "parquet").toPandas()["path"]) == ["a", "b"]


class _RecordingWriter:
    """Stands in for a Delta DataFrameWriter: records what would be committed."""

    def __init__(self, calls, df, mode, fail_first=0):
        self.calls, self.df, self.mode, self.options_, self.fail = calls, df, mode, {}, fail_first

    def options(self, **kw):
        self.options_.update(kw)
        return self

    def save(self, location):
        if len([c for c in self.calls if c[0] == "attempt"]) < self.fail:
            self.calls.append(("attempt", location))
            raise RuntimeError("io.delta.exceptions.ConcurrentAppendException: Files were added by a concurrent update")
        self.calls.append(("save", location, self.mode, dict(self.options_)))

    saveAsTable = save


def test_a_delta_replace_is_one_replace_where_commit_removing_exactly_the_replaced_rows(spark, monkeypatch):
    calls = []
    monkeypatch.setattr(imgfeat.store.tables, "table_exists", lambda *a: True)
    monkeypatch.setattr(imgfeat.store.tables, "_writer", lambda df, fmt, mode: _RecordingWriter(calls, df, mode, 1))
    monkeypatch.setattr(delta_commit.time, "sleep", lambda s: None)
    # The table: two backbones; path "v" is a volume with three slices; "o'q" needs quoting.
    table = _rows(spark, ["v"], slices=(0, 1, 2)).unionByName(_rows(spark, ["a", "o'q"])) \
        .unionByName(_rows(spark, ["v", "a"], weights="w2")).unionByName(_rows(spark, ["x"], run_id="older"))
    new = _rows(spark, ["v"], run_id="run1", slices=(0, 1)).unionByName(_rows(spark, ["n", "o'q"], run_id="run1"))
    replace = spark.createDataFrame([("v", "m", "w"), ("o'q", "m", "w")], "path string, model string, weights_id string")
    append_rows(spark, new, "/data/features", "delta", replace=replace, lease=_FakeLease("run1"))
    _, location, mode, options = calls[1]
    assert [c[0] for c in calls] == ["attempt", "save"]  # one commit (retried once after a concurrent one)
    assert (location, mode, options["mergeSchema"]) == ("/data/features", "overwrite", "true")
    predicate = options["replaceWhere"]
    removed = table.filter(predicate).select("path", "weights_id", "slice_index").collect()
    assert sorted((r["path"], r["weights_id"], r["slice_index"] if r["slice_index"] is not None else -1)
                  for r in removed) == [("o'q", "w", -1), ("v", "w", 0), ("v", "w", 1), ("v", "w", 2)]
    assert new.filter(predicate).count() == new.count()  # Delta requires every new row to match
    calls.clear()
    append_rows(spark, new, "cat.sch.features", "delta", lease=_FakeLease("run1"))
    assert calls[-1] == ("save", "cat.sch.features", "append", {"mergeSchema": "true"})  # a blind append


class _FakeLease:
    def __init__(self, run_id):
        self.run_id = run_id


class _FakeSpark:
    """A session with a catalog that holds table names (this machine's session has no metastore to spare)."""

    def __init__(self, tables):
        self.tables, self.sql_calls = tables, []
        self.catalog = self

    def listTables(self, schema):
        return [type("T", (), {"name": n}) for n in self.tables]

    def sql(self, text):
        self.sql_calls.append(text)

    def table(self, name):
        return ("read", name)


class _FakeFrame:
    def __init__(self, calls):
        self.calls = calls
        self.write = self

    def mode(self, mode):
        self.calls.append(("mode", mode))
        return self

    def saveAsTable(self, name):
        self.calls.append(("saveAsTable", name))

    def localCheckpoint(self, *a, **kw):
        raise AssertionError("localCheckpoint: its blocks die with the executors")


def test_a_table_names_plan_goes_to_a_scratch_table_of_the_run_and_dead_ones_are_dropped(tmp_path):
    calls = []
    fake = _FakeSpark(["features", "features__imgfeat_scratch_l1ve0000run1_todo", "features__imgfeat_scratch_dead0000run2_todo",
                       "other__imgfeat_scratch_dead0000run2_todo"])
    frozen = materialize(fake, _FakeFrame(calls), "cat.sch.features", "l1ve0000run1")
    assert calls == [("mode", "overwrite"), ("saveAsTable", "cat.sch.features__imgfeat_scratch_l1ve0000run1_todo")]
    assert frozen == ("read", "cat.sch.features__imgfeat_scratch_l1ve0000run1_todo")
    live = _lease(tmp_path / "leases", "l1ve0000run1")
    live.acquire()
    repair(fake, "cat.sch.features", "delta", lease=live)
    assert fake.sql_calls == ["DROP TABLE IF EXISTS cat.sch.features__imgfeat_scratch_dead0000run2_todo"]
    drop_scratch(fake, "cat.sch.features", "l1ve0000run1")
    assert fake.sql_calls[-1] == "DROP TABLE IF EXISTS cat.sch.features__imgfeat_scratch_l1ve0000run1_todo"


def test_a_parquet_table_name_takes_one_writer_at_a_time(spark, tmp_path):
    from imgfeat.store.lease import open_leases

    owner = Owner("f1rst0000run", "tiny", "none-seed1")
    with open_leases(spark, ["db.features"], "parquet", owner, lease_dir=str(tmp_path)):
        second = open_leases(spark, ["db.features"], "parquet", Owner("sec0nd000run", "tiny", "none-seed2"),
                             lease_dir=str(tmp_path))
        with pytest.raises(LeaseError, match="one writer at a time"):
            second.__enter__()
    assert os.listdir(tmp_path / "db.features.imgfeat-leases") == []
