"""Throughput of extract on a Spark standalone cluster on 127.0.0.1 with 1, then 2 workers (1 core each).

    .venv/bin/python bench/standalone_scaling.py --input ../shared/data/kermany224/train --limit 1000 \
        [--model resnet50] [--workers 1,2] [--json FILE]

Each run starts a fresh master + W workers from the pyspark installation, runs
``spark-submit --master spark://127.0.0.1:PORT jobs/extract_features.py`` on the same N files (symlinks),
times the whole submit (driver start-up included) and stops every process it started. Prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "lib"))

from imgfeat.bench.run import _timed, prepare_inputs  # noqa: E402
from imgfeat.standalone import Standalone, standalone_env  # noqa: E402


def run_once(workers: int, folder: str, n: int, model: str, workdir: str) -> dict:
    cluster = Standalone(os.path.join(workdir, f"spark{workers}"), standalone_env(os.path.join(workdir, f"spark{workers}")))
    out = os.path.join(workdir, f"out{workers}")
    cmd = cluster.submit_command(os.path.join(ROOT, "lib"), executors=workers, executor_memory="3g", driver_memory="2g")
    js = os.path.join(workdir, f"extract{workers}.json")
    cmd += [os.path.join(ROOT, "jobs", "extract_features.py"), "--input", folder, "--output", out,
            "--model", model, "--weights", "none", "--format", "parquet", "--json", js]
    try:
        cluster.start(n_workers=workers, memory="4g")
        seconds, peaks, rc = _timed(cmd, cluster.env, os.path.join(workdir, f"submit{workers}.log"))
    finally:
        cluster.stop()
    if rc != 0:
        raise SystemExit(f"the extract job on {workers} worker(s) failed (rc {rc}); see {workdir}/submit{workers}.log")
    with open(js, encoding="utf-8") as fh:
        extract = json.load(fh)
    return {"workers": workers, "images": n, "seconds": round(seconds, 2), "images_per_s": round(n / seconds, 3),
            "featurized": extract["featurized"], "stage_seconds": extract["stage_seconds"],
            "driver_peak_mb": round(peaks.total_mb, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True)
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts, one run each")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="imgfeat-scaling-") as workdir:
        folder, files = prepare_inputs(a.input, a.limit, workdir)
        results = []
        for w in (int(x) for x in a.workers.split(",")):
            started = time.strftime("%H:%M:%S")
            results.append(run_once(w, folder, len(files), a.model, workdir))
            print(f"[bench] {started} {w} worker(s): {results[-1]}", flush=True)
    base = results[0]["images_per_s"]
    print(f"\n{'workers':>8} {'images':>7} {'seconds':>8} {'img/s':>7} {'speed-up':>9}")
    for r in results:
        print(f"{r['workers']:>8} {r['images']:>7} {r['seconds']:>8.1f} {r['images_per_s']:>7.2f} {r['images_per_s'] / base:>9.2f}")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
