"""A real Spark standalone cluster on 127.0.0.1: spark-submit extract, lose a worker mid-job, compare with local."""

from __future__ import annotations

import glob
import os
import subprocess
import time

import numpy as np
import pytest

from imgfeat.demo.samples import make_samples
from imgfeat.featurize.extract import run_extract
from imgfeat.standalone import Standalone, standalone_env

from conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.integration


@pytest.fixture()
def cluster(tmp_path):
    c = Standalone(str(tmp_path / "spark"), standalone_env(str(tmp_path / "spark")))
    try:
        yield c.start(n_workers=2, memory="1g")
    finally:
        c.stop()


def test_standalone_cluster_with_worker_loss_matches_local_run(spark, cluster, tmp_path):
    s = make_samples(str(tmp_path / "img"), per_class=40, sizes=((64, 64), (96, 80)), seed=9)
    local = tiny_config(s.root, str(tmp_path / "local"))
    run_extract(spark, local)

    hold = tmp_path / "hold"
    hold.mkdir()
    out = str(tmp_path / "cluster")
    args = cluster.submit_command(os.path.join(ROOT, "lib"), executors=2, conf={
        "spark.executorEnv.IMGFEAT_TEST_FAULT": f"hold:{hold}",
        "spark.sql.adaptive.enabled": "false",
        "spark.sql.shuffle.partitions": "6",
        "spark.sql.files.maxPartitionBytes": "400000",
        "spark.sql.files.openCostInBytes": "100000",
    })
    args += ["jobs/extract_features.py", "--input", s.root, "--output", out, "--model", "tiny", "--weights", "none",
             "--format", "parquet", "--batch-size", "8"]
    log = open(tmp_path / "submit.log", "w+")
    job = subprocess.Popen(args, cwd=ROOT, env=cluster.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # Both executors (one core each) are busy with held tasks: then worker 0 is lost mid-job.
        deadline = time.monotonic() + 400
        while len(glob.glob(str(hold / "started-p[1-9]*"))) < 2:
            assert job.poll() is None, "the job ended before it was held"
            assert time.monotonic() < deadline, "the job never ran two tasks at once\n" + cluster.logs()
            time.sleep(0.5)
        cluster.kill_worker(0)
        (hold / "release").touch()
        rc = job.wait(timeout=500)
    finally:
        if job.poll() is None:
            from imgfeat.standalone import stop_group

            stop_group(job)
    log.seek(0)
    output = log.read()
    assert rc == 0, output[-4000:] + cluster.logs()
    assert glob.glob(str(hold / "started-p*-a[1-9]")), "no task was re-run after the worker was lost"
    assert cluster.alive_workers() == 1
    assert "featurized 80 + failed 5" in output

    for suffix in ("", "_errors"):
        got = spark.read.parquet(out + suffix).toPandas().sort_values("path").reset_index(drop=True)
        want = spark.read.parquet(local.output.path + suffix).toPandas().sort_values("path").reset_index(drop=True)
        assert got["path"].is_unique and list(got["path"]) == list(want["path"])
        same = ("error_class", "file_length") if suffix else ("weights_id", "width", "height", "source_mode")
        for col in ("label", "image_id", *same):
            assert list(got[col]) == list(want[col]), col
        if not suffix:
            np.testing.assert_allclose(np.stack(got["features"]), np.stack(want["features"]), rtol=0, atol=1e-5)
