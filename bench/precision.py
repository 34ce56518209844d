"""fp32 against bf16 for the whole extract job, next to the bare model in the same process set-up.

For each precision: ``imgfeat extract`` on N images (whole process timed, as ``imgfeat bench`` does), with the
bare model measured just before and just after it: as many concurrent processes as the job has task slots, each
with the job's threads per worker, running the engine's predictor on one prepared uint8 batch (no decoding, no
Spark), all timed over the same span. Prints the table of docs/benchmarks.md ("CPU: fp32 and bf16") and writes JSON.

    python bench/precision.py --input ../shared/data/kermany224/train --model resnet50 --limit 5216
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

BARE = r"""
import json, sys, time
import numpy as np
from imgfeat.backbones.registry import get_backbone
from imgfeat.engines import EngineOptions, get_predictor, resolve_weights
model, precision, threads, seconds, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
backbone = get_backbone(model)
source = resolve_weights(backbone, "none")
predict = get_predictor(model, source, source.read_bytes, EngineOptions(threads=threads, precision=precision))
x = np.random.default_rng(0).integers(0, 256, (batch_size, backbone.input_size, backbone.input_size, 3), dtype=np.uint8)
predict(x); predict(x)
print("ready", flush=True)
sys.stdin.readline()  # every process starts timing together, and times the same span
t, n = time.perf_counter(), 0
while time.perf_counter() - t < seconds:
    predict(x)
    n += batch_size
print(json.dumps({"images_per_s": n / (time.perf_counter() - t)}))
"""


def bare_model(model: str, precision: str, slots: int, threads: int, seconds: float, batch_size: int) -> float:
    """Summed images/s of ``slots`` concurrent processes running the model alone: each builds and warms its model,
    then all time the same ``seconds`` together (a process timed while another still builds would run alone)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", BARE, model, precision, str(threads), str(seconds),
                               str(batch_size)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(slots)]
    for p in procs:
        while (line := p.stdout.readline()) and line.strip() != "ready":
            pass
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    rates = [json.loads(p.communicate()[0].strip().splitlines()[-1])["images_per_s"] for p in procs]
    return sum(rates)


def main() -> int:
    from imgfeat.bench.run import run_bench

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--slots", type=int, default=os.cpu_count() or 1, help="task slots of local[*]")
    parser.add_argument("--bare-seconds", type=float, default=45.0,
                        help="timed span of the bare model, measured before and after each job (the mean is used)")
    parser.add_argument("--json", help="write the numbers here")
    a = parser.parse_args()
    threads = max(1, (os.cpu_count() or 1) // a.slots)
    rows = {}
    for precision in ("fp32", "bf16"):
        bare_before = bare_model(a.model, precision, a.slots, threads, a.bare_seconds, a.batch_size)
        job = run_bench(a.input, a.model, a.limit, batch_size=a.batch_size, skip_baseline=True,
                        sets=[f"inference.precision={precision}"], workdir=tempfile.mkdtemp(prefix=f"imgfeat-{precision}-"))
        featurize_s = job.stages.get("featurize_and_write", float("nan"))
        bare_after = bare_model(a.model, precision, a.slots, threads, a.bare_seconds, a.batch_size)
        bare = (bare_before + bare_after) / 2
        rows[precision] = {"job_s": job.ours_seconds, "job_images_per_s": job.ours_images_per_s,
                           "featurize_images_per_s": round(a.limit / featurize_s, 2),
                           "bare_model_images_per_s": round(bare, 2),
                           "bare_before_after": [round(bare_before, 2), round(bare_after, 2)],
                           "job_of_bare": round(job.ours_images_per_s / bare, 3),
                           "featurize_of_bare": round(a.limit / featurize_s / bare, 3), "stages": job.stages}
    rows["bf16_over_fp32_job"] = round(rows["bf16"]["job_images_per_s"] / rows["fp32"]["job_images_per_s"], 3)
    rows["bf16_over_fp32_bare"] = round(rows["bf16"]["bare_model_images_per_s"] / rows["fp32"]["bare_model_images_per_s"], 3)
    print(f"{'precision':<10} {'job s':>7} {'job img/s':>10} {'featurize img/s':>16} {'bare img/s':>11} "
          f"{'job/bare':>9} {'featurize/bare':>15}")
    for p in ("fp32", "bf16"):
        r = rows[p]
        print(f"{p:<10} {r['job_s']:>7.1f} {r['job_images_per_s']:>10.2f} {r['featurize_images_per_s']:>16.2f} "
              f"{r['bare_model_images_per_s']:>11.2f} {r['job_of_bare']:>9.3f} {r['featurize_of_bare']:>15.3f}")
    print(f"bf16 / fp32: whole job {rows['bf16_over_fp32_job']:.2f}x, bare model {rows['bf16_over_fp32_bare']:.2f}x")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as fh:
            json.dump({"model": a.model, "images": a.limit, "slots": a.slots, "threads": threads, **rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
