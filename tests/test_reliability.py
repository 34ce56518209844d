"""Reliability: exactly-once accounting under bad input, vanishing files, interrupted and retried runs.

In-process tests share the session's local SparkSession; the ones that must kill or configure a job
process (retries need a ``local[N,maxFailures]`` master) run ``jobs/extract_features.py`` in a subprocess.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import imgfeat.io.reading
import imgfeat.store.tables
from imgfeat.demo.samples import BAD_FILES, encode, make_samples, xray_array
from imgfeat.featurize.extract import run_extract

from conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ((64, 64), (80, 64), (64, 96))


def _local(path: str) -> str:
    return path[5:] if path.startswith("file:") else path


def _tables(spark, cfg):
    return spark.read.parquet(cfg.output.path).toPandas(), spark.read.parquet(cfg.errors_path).toPandas()


def _snapshot(spark, location: str) -> list[tuple]:
    df = spark.read.parquet(location).toPandas()
    return sorted(zip(df["path"], df["run_id"], [tuple(np.round(f, 6)) for f in df["features"]]))


def _add_images(folder: str, n: int, seed: int, prefix: str = "added") -> list[str]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        data, ext = encode(xray_array(rng, (64, 64), sick=True), "rgb_png")
        path = os.path.join(folder, "PNEUMONIA", f"{prefix}_{i:04d}.{ext}")
        with open(path, "wb") as fh:
            fh.write(data)
        paths.append(path)
    return paths


def _job_args(input_path: str, output: str, master: str = "local[2]", *extra: str) -> list[str]:
    return [
        sys.executable, "jobs/extract_features.py", "--input", input_path, "--output", output,
        "--model", "tiny", "--weights", "none", "--format", "parquet", "--batch-size", "8",
        "--master", master, "--set", "spark.conf={spark.ui.enabled: 'false'}", *extra,
    ]


def _job_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYSPARK_PYTHON": sys.executable, "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


def test_bad_input_at_scale_ends_with_exact_counts(spark, tmp_path, monkeypatch):
    """Hundreds of valid images + every bad kind + an oversized file + a file deleted after listing."""
    s = make_samples(str(tmp_path / "img"), per_class=150, sizes=SMALL, seed=3)
    oversized = os.path.join(s.root, "PNEUMONIA", "oversized.png")
    with open(oversized, "wb") as fh:
        fh.write(os.urandom(300_000))
    vanishing = os.path.join(s.root, "PNEUMONIA", "vanishing.jpg")
    shutil.copy(glob.glob(os.path.join(s.root, "NORMAL", "*.jpg"))[0], vanishing)
    real_read = imgfeat.io.reading.read_contents

    def read_then_delete(*args, **kwargs):
        df = real_read(*args, **kwargs)  # the folder is listed here; the file goes before it is read
        os.remove(vanishing)
        return df

    monkeypatch.setattr(imgfeat.io.reading, "read_contents", read_then_delete)
    cfg = tiny_config(s.root, str(tmp_path / "feats"), "input.max_file_bytes=200000")
    result = run_extract(spark, cfg)
    feats, errors = _tables(spark, cfg)

    expected = {**s.bad, oversized: "too_large", vanishing: "unreadable"}
    assert set(BAD_FILES.values()) | {"unreadable"} <= set(expected.values())
    assert (result.listed, result.featurized, result.failed) == (300 + len(expected), 300, len(expected))
    assert len(feats) == 300 and feats["path"].is_unique
    assert {_local(p): c for p, c in zip(errors["path"], errors["error_class"])} == expected
    assert set(feats["path"]).isdisjoint(errors["path"])

    monkeypatch.setattr(imgfeat.io.reading, "read_contents", real_read)
    again = run_extract(spark, cfg)  # the vanished file is no longer listed; nothing else to do
    assert (again.listed, again.processed) == (result.listed - 1, 0)


@pytest.fixture()
def folder(tmp_path):
    s = make_samples(str(tmp_path / "img"), per_class=20, sizes=SMALL, seed=5)
    return s


def test_run_that_dies_between_the_two_tables_is_completed_without_a_path_in_both(spark, folder, tmp_path, monkeypatch):
    cfg = tiny_config(folder.root, str(tmp_path / "feats"))
    first = run_extract(spark, cfg)
    bad = next(p for p, c in folder.bad.items() if c == "truncated")
    data, _ = encode(xray_array(np.random.default_rng(1), (64, 64), sick=False), "gray_jpeg")
    with open(bad, "wb") as fh:  # the broken file is fixed: same path, new content
        fh.write(data)
    real_append = imgfeat.store.tables.append_rows
    calls = []

    def die_before_errors_table(spark_, df, location, *args, **kwargs):
        calls.append(location)
        if location == cfg.errors_path:
            raise KeyboardInterrupt("simulated death after the features table was written")
        return real_append(spark_, df, location, *args, **kwargs)

    monkeypatch.setattr(imgfeat.store.tables, "append_rows", die_before_errors_table)
    with pytest.raises(KeyboardInterrupt):
        run_extract(spark, cfg)
    monkeypatch.setattr(imgfeat.store.tables, "append_rows", real_append)

    feats, errors = _tables(spark, cfg)
    bad_uri = "file:" + bad
    assert bad_uri in set(feats["path"]) and bad_uri in set(errors["path"])  # the state the crash left
    third = run_extract(spark, cfg)
    assert (third.processed, third.replaced, third.featurized) == (1, 1, 1)
    feats, errors = _tables(spark, cfg)
    assert feats["path"].is_unique and errors["path"].is_unique
    assert set(feats["path"]).isdisjoint(errors["path"])
    assert len(feats) + len(errors) == first.listed and len(errors) == len(folder.bad) - 1


def test_a_file_vanishing_between_the_two_table_writes_ends_in_exactly_one_table(spark, folder, tmp_path, monkeypatch):
    """The errors table is derived from the rows already read, not from a second scan of the folder."""
    cfg = tiny_config(folder.root, str(tmp_path / "feats"))
    real_append = imgfeat.store.tables.append_rows
    victim = sorted(glob.glob(os.path.join(folder.root, "NORMAL", "normal_*")))[0]

    def delete_after_features_table(spark_, df, location, *args, **kwargs):
        result = real_append(spark_, df, location, *args, **kwargs)
        if location == cfg.output.path:
            os.remove(victim)  # featurized and written; gone before the errors table is computed
        return result

    monkeypatch.setattr(imgfeat.store.tables, "append_rows", delete_after_features_table)
    result = run_extract(spark, cfg)
    feats, errors = _tables(spark, cfg)
    assert "file:" + victim in set(feats["path"])
    assert set(feats["path"]).isdisjoint(errors["path"])
    assert len(feats) + len(errors) == result.listed == result.featurized + result.failed


def test_parquet_swap_interrupted_midway_is_recovered(spark, folder, tmp_path):
    cfg = tiny_config(folder.root, str(tmp_path / "feats"))
    run_extract(spark, cfg)
    before = _snapshot(spark, cfg.output.path)
    # A kill between "move the old table aside" and "move the new one in" leaves no table at the
    # location, the previous table beside it, and a staging folder.
    os.rename(cfg.output.path, cfg.output.path + ".imgfeat-old-0badc0de")
    shutil.copytree(cfg.output.path + ".imgfeat-old-0badc0de", cfg.output.path + ".imgfeat-staging-0badc0de")
    again = run_extract(spark, cfg)
    assert again.processed == 0
    assert _snapshot(spark, cfg.output.path) == before
    # Nothing left beside the table but its (empty) folder of writer leases.
    assert glob.glob(cfg.output.path + ".imgfeat-*") == [cfg.output.path + ".imgfeat-leases"]
    assert not os.listdir(cfg.output.path + ".imgfeat-leases")


def test_leftover_temporary_of_a_killed_append_is_never_committed(spark, folder, tmp_path):
    cfg = tiny_config(folder.root, str(tmp_path / "feats"))
    run_extract(spark, cfg)
    before = _snapshot(spark, cfg.output.path)
    # What a job killed after some task commits leaves (FileOutputCommitter v1): committed task output
    # under _temporary that only the job commit would have moved in.
    task_dir = os.path.join(cfg.output.path, "_temporary", "0", "task_202501010000_0001_m_000000")
    os.makedirs(task_dir)
    for i, part in enumerate(glob.glob(os.path.join(cfg.output.path, "part-*.parquet"))):
        shutil.copy(part, os.path.join(task_dir, f"part-{i:05d}-0badc0de-dead-4bad-8bad-0123456789ab-c000.snappy.parquet"))
    assert _snapshot(spark, cfg.output.path) == before  # readers ignore _temporary
    added = _add_images(folder.root, 3, seed=11)
    result = run_extract(spark, cfg)
    assert (result.processed, result.featurized) == (3, 3)
    feats, _ = _tables(spark, cfg)
    assert feats["path"].is_unique and len(feats) == len(before) + 3
    assert {"file:" + p for p in added} <= set(feats["path"])


@pytest.mark.integration  # starts job processes of its own (~35-50 s)
def test_task_retries_give_the_same_output_as_a_clean_run(spark, folder, tmp_path):
    clean = tiny_config(folder.root, str(tmp_path / "clean"))
    run_extract(spark, clean)
    out = str(tmp_path / "retried")
    job = subprocess.run(
        _job_args(folder.root, out, "local[2,3]"), capture_output=True, text=True, cwd=ROOT, timeout=600,
        env=_job_env(IMGFEAT_TEST_FAULT="fail-first-attempt"),
    )
    assert job.returncode == 0, job.stderr[-3000:]
    assert "IMGFEAT_TEST_FAULT: injected failure" in job.stderr  # first attempts really failed
    for suffix in ("", "_errors"):
        got = spark.read.parquet(out + suffix).toPandas().sort_values("path")
        want = spark.read.parquet(clean.output.path + suffix).toPandas().sort_values("path")
        assert got["path"].is_unique and list(got["path"]) == list(want["path"])
        if not suffix:
            np.testing.assert_allclose(np.stack(got["features"]), np.stack(want["features"]), rtol=0, atol=1e-6)
        else:
            assert list(got["error_class"]) == list(want["error_class"])


def _wait_for(predicate, what: str, proc: subprocess.Popen, limit: float = 300.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the job ended (rc {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.2)


@pytest.mark.integration  # starts job processes of its own (~35-50 s)
def test_killed_job_leaves_previous_table_unchanged_and_rerun_completes(spark, folder, tmp_path):
    cfg = tiny_config(folder.root, str(tmp_path / "feats"))
    first = run_extract(spark, cfg)
    before = _snapshot(spark, cfg.output.path)
    added = _add_images(folder.root, 60, seed=12)
    hold = tmp_path / "hold"
    hold.mkdir()
    temporary = cfg.output.path + ".imgfeat-staging-*/_temporary"  # the run writes to its own staging folder
    # Without adaptive execution the whole write (its featurizing stage included) is one Spark job that
    # sets up its commit (_temporary) first; tasks of partitions other than 0 are held, so the job
    # process is killed mid-write, deterministically.
    proc = subprocess.Popen(
        _job_args(folder.root, cfg.output.path, "local[2]", "--set",
                  "spark.conf={spark.ui.enabled: 'false', spark.sql.adaptive.enabled: 'false', "
                  "spark.sql.files.maxPartitionBytes: '400000', spark.sql.files.openCostInBytes: '100000'}"),
        cwd=ROOT, env=_job_env(IMGFEAT_TEST_FAULT=f"hold:{hold}"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        _wait_for(lambda: glob.glob(temporary) and glob.glob(str(hold / "started-p[1-9]*")), "the write", proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert glob.glob(temporary)  # the killed write's uncommitted state is still there ...
    assert _snapshot(spark, cfg.output.path) == before  # ... and the table reads exactly as before

    again = run_extract(spark, cfg)
    assert (again.processed, again.featurized) == (len(added), len(added))
    feats, errors = _tables(spark, cfg)
    assert feats["path"].is_unique and len(feats) + len(errors) == first.listed + len(added)
    assert {"file:" + p for p in added} <= set(feats["path"])
    # The killed run's lease died with its process: the re-run was not refused, and removed its staging folder.
    assert not glob.glob(cfg.output.path + ".imgfeat-staging-*")
