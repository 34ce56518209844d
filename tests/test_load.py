"""Load: 20,000 generated images through the job process, every image accounted for, memory measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from imgfeat.demo.samples import encode, xray_array
from imgfeat.standalone import stop_group

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_IMAGES = 20_000
GIB = 1 << 30

pytestmark = [pytest.mark.integration, pytest.mark.timeout(2400)]
REPORT = os.path.join(ROOT, ".pytest_cache", "load-test.json")


def _write_images(root: str, n: int) -> None:
    rng = np.random.default_rng(20)
    kinds = ("gray_jpeg", "rgb_png", "gray16_png", "rgba_png")
    for i in range(n):
        cls = ("NORMAL", "PNEUMONIA")[i % 2]
        folder = os.path.join(root, cls, f"batch{i // 1000:02d}")
        os.makedirs(folder, exist_ok=True)
        data, ext = encode(xray_array(rng, (64, 64), sick=i % 2 == 1), kinds[i % len(kinds)])
        with open(os.path.join(folder, f"img_{i:05d}.{ext}"), "wb") as fh:
            fh.write(data)


def _role(p: psutil.Process, driver_pid: int) -> str | None:
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return None
    if p.pid == driver_pid:
        return "driver_python"
    if "java" in p.name() or "org.apache.spark" in cmd:
        return "driver_jvm"
    if "pyspark.daemon" in cmd or "pyspark.worker" in cmd or "python" in p.name():
        return "python_worker"
    return None


def _report(peak: dict[str, int], seconds: float, finished: bool) -> dict:
    """Peak RSS in MiB so far, kept in .pytest_cache/load-test.json (also when the run is cut short)."""
    measured = {**{k: round(v / 2**20) for k, v in peak.items()}, "seconds": round(seconds, 1),
                "images": N_IMAGES, "finished": finished}
    os.makedirs(os.path.dirname(REPORT), exist_ok=True)
    with open(REPORT, "w") as fh:
        json.dump(measured, fh, indent=2)
    return measured


def test_twenty_thousand_images_with_bounded_memory(spark, tmp_path):
    images, out, js = str(tmp_path / "img"), str(tmp_path / "feats"), str(tmp_path / "result.json")
    _write_images(images, N_IMAGES)
    args = [sys.executable, "jobs/extract_features.py", "--input", images, "--output", out, "--model", "tiny",
            "--weights", "none", "--format", "parquet", "--master", "local[2]", "--json", js,
            "--set", "spark.driver_memory=2g", "--set", "inference.batch_size=64",
            # ~2 kB files: count each as 256 kB (not Spark's 4 MB) so a read task gets ~500 files, not 32
            "--set", "spark.conf={spark.sql.files.openCostInBytes: '262144'}"]
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "TF_CPP_MIN_LOG_LEVEL": "2"}
    log = open(tmp_path / "job.log", "w+")
    started = time.monotonic()
    job = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    peak = {"driver_python": 0, "driver_jvm": 0, "python_worker": 0, "python_workers_total": 0, "all_total": 0}
    try:
        root = psutil.Process(job.pid)
        while job.poll() is None:
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            totals = {"python_worker": 0, "all": 0}
            for p in procs:
                role = _role(p, job.pid)
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                totals["all"] += rss
                if role:
                    peak[role] = max(peak[role], rss)
                if role == "python_worker":
                    totals["python_worker"] += rss
            peak["python_workers_total"] = max(peak["python_workers_total"], totals["python_worker"])
            peak["all_total"] = max(peak["all_total"], totals["all"])
            _report(peak, time.monotonic() - started, finished=False)
            time.sleep(0.5)
        rc = job.wait(timeout=1500)
    finally:
        stop_group(job)
    seconds = time.monotonic() - started
    log.seek(0)
    assert rc == 0, log.read()[-4000:]
    result = json.load(open(js))
    print("LOAD", json.dumps(_report(peak, seconds, finished=True)))

    assert (result["listed"], result["featurized"], result["failed"]) == (N_IMAGES, N_IMAGES, 0)
    feats = spark.read.parquet(out).select("path", "feature_dim").toPandas()
    assert len(feats) == N_IMAGES and feats["path"].is_unique and (feats["feature_dim"] == 16).all()
    # Bounded: memory does not grow with the number of images (each process stays far below what
    # holding 20,000 decoded images would take).
    assert peak["driver_python"] < 1.5 * GIB
    assert peak["driver_jvm"] < 3 * GIB
    assert peak["python_worker"] < 2 * GIB
