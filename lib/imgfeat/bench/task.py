"""The featurizer's own per-task function, timed without Spark: bytes in, features out.

Runs where Spark cannot (the lent GPU machines have PyTorch and no Java, Spark or TensorFlow): the files are read
into memory first, then ``featurize_batch`` (decode -> model input -> the engine's predictor, exactly what each
Spark task runs) is timed per stage over batches. On a CUDA machine the GPU's utilisation is sampled with
``nvidia-smi`` while it runs.

    python -m imgfeat.bench.task --input DIR --model efficientnet_lite0 --limit 2000 [--precision bf16] [--device gpu]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any


def _gpu_sampler(stop: threading.Event, samples: list[float]) -> None:
    while not stop.is_set():
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5).stdout
            samples.append(float(out.split()[0]))
        except Exception:
            return
        stop.wait(0.5)


def run_task_bench(input_dir: str, model: str = "efficientnet_lite0", limit: int = 500, batch_size: int = 64,
                   precision: str = "fp32", device: str = "auto", threads: int = 0, weights: str = "none",
                   rows_per_task_batch: int = 256) -> dict[str, Any]:
    """Time ``featurize_batch`` on ``limit`` files from ``input_dir`` (repeated if fewer); returns the numbers."""
    import numpy as np
    import pandas as pd

    from imgfeat.backbones.registry import get_backbone
    from imgfeat.bench.run import list_images
    from imgfeat.engines import EngineOptions, get_predictor, resolve_weights
    from imgfeat.featurize.udf import FeaturizeSpec, featurize_batch
    from imgfeat.io.decoders import DecodeOptions

    files = list_images(input_dir)
    if not files:
        raise ValueError(f"no images under {input_dir}")
    paths = [files[i % len(files)] for i in range(limit)]
    blobs = [Path(p).read_bytes() for p in paths]
    backbone = get_backbone(model)
    source = resolve_weights(backbone, weights)
    options = EngineOptions(threads=threads, device=device, precision=precision)
    started = time.perf_counter()
    predict = get_predictor(model, source, source.read_bytes, options)
    spec = FeaturizeSpec(backbone=backbone, weights=source, decode=DecodeOptions(size=backbone.input_size),
                         batch_size=batch_size, precision=precision, device=device)
    predict(np.zeros((min(batch_size, 4), backbone.input_size, backbone.input_size, 3), np.float32))  # warm up
    model_load = time.perf_counter() - started
    stop, gpu = threading.Event(), []
    sampler = threading.Thread(target=_gpu_sampler, args=(stop, gpu), daemon=True)
    if shutil.which("nvidia-smi"):
        sampler.start()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    n_ok = 0
    for start in range(0, len(blobs), rows_per_task_batch):
        out = featurize_batch(pd.Series(blobs[start:start + rows_per_task_batch]), predict, spec, None, timings)
        n_ok += int(out["error_class"].isna().sum())
    wall = time.perf_counter() - t0
    stop.set()
    return {
        "model": model, "engine": backbone.engine, "precision": precision, "device": device, "images": len(blobs),
        "featurized": n_ok, "batch_size": batch_size, "wall_s": round(wall, 3), "images_per_s": round(len(blobs) / wall, 2),
        "decode_s": round(timings.get("decode", 0.0), 3), "inference_s": round(timings.get("inference", 0.0), 3),
        "decode_images_per_s": round(len(blobs) / max(timings.get("decode", 1e-9), 1e-9), 2),
        "inference_images_per_s": round(len(blobs) / max(timings.get("inference", 1e-9), 1e-9), 2),
        "model_load_s": round(model_load, 3),
        "gpu_utilisation_mean": round(sum(gpu) / len(gpu), 1) if gpu else None,
        "cpu_count": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--weights", default="none")
    parser.add_argument("--json", help="also write the numbers to this file")
    a = parser.parse_args(argv)
    result = run_task_bench(a.input, a.model, a.limit, a.batch_size, a.precision, a.device, a.threads, a.weights)
    print(json.dumps(result))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
