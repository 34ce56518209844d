"""The featurizer's own per-task function, timed without Spark: bytes in, features out.

Runs where Spark cannot (the lent GPU machines have PyTorch and no Java, Spark or TensorFlow): the files are read
into memory first, then ``featurize_stream`` (decode -> model input -> the engine's predictor, with the next batch
decoded while the model runs: exactly what each Spark task runs) is timed per stage, next to the model alone on
one prepared batch. On a CUDA machine the GPU's utilisation is sampled with ``nvidia-smi`` while it runs.

    python -m imgfeat.bench.task --input DIR --model efficientnet_lite0 --limit 2000 [--precision bf16] [--device gpu]
        [--jpeg-decoder nvjpeg] [--compile] [--decode-threads 8]
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


def _spec(model: str, weights: str, batch_size: int, precision: str, device: str, threads: int, jpeg_decoder: str,
          compile: bool, prefetch: bool, decode_threads: int) -> Any:
    """The spec a Spark task of extract would get for these settings (``featurize.spec.featurize_spec``)."""
    from imgfeat.backbones.registry import get_backbone
    from imgfeat.config.schema import InferenceConfig
    from imgfeat.engines import resolve_weights
    from imgfeat.featurize.spec import featurize_spec
    from imgfeat.io.decoders import DecodeOptions

    backbone = get_backbone(model)
    inference = InferenceConfig(batch_size=batch_size, threads=threads, device=device, precision=precision,
                                decode_threads=decode_threads, prefetch=prefetch, jpeg_decoder=jpeg_decoder,
                                compile=compile)
    return featurize_spec(backbone, resolve_weights(backbone, weights), DecodeOptions(size=backbone.input_size),
                          inference, threads)


def _bare_model(spec: Any, bare_batches: int) -> tuple[Any, float, float]:
    """(predictor, seconds to build and warm it, images/s of the model alone on one prepared uint8 batch)."""
    import numpy as np

    from imgfeat.engines import get_predictor

    started = time.perf_counter()
    predict = get_predictor(spec.model_name, spec.weights, spec.weights.read_bytes, spec.engine_options())
    size, batch_size = spec.decode.size, spec.batch_size
    warm = np.random.default_rng(0).integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    predict(warm)  # warm up (and compile) at the full batch shape
    model_load = time.perf_counter() - started
    t_bare = time.perf_counter()
    for _ in range(bare_batches):  # the model alone: no decoding, no Arrow
        predict(warm)
    return predict, model_load, bare_batches * batch_size / (time.perf_counter() - t_bare)


def run_task_bench(input_dir: str, model: str = "efficientnet_lite0", limit: int = 500, batch_size: int = 64,
                   precision: str = "fp32", device: str = "auto", threads: int = 0, weights: str = "none",
                   rows_per_task_batch: int = 256, jpeg_decoder: str = "pillow", compile: bool = False,
                   prefetch: bool = True, decode_threads: int = 1, bare_batches: int = 5) -> dict[str, Any]:
    """Time ``featurize_stream`` (what a Spark task runs) on ``limit`` files from ``input_dir`` (repeated if
    fewer), and the model alone on one prepared batch (``bare``); returns the numbers."""
    from concurrent.futures import ThreadPoolExecutor

    import pandas as pd

    from imgfeat.bench.run import list_images
    from imgfeat.featurize.udf import featurize_stream, jpeg_decoder_for

    files = list_images(input_dir)
    if not files:
        raise ValueError(f"no images under {input_dir}")
    blobs = [Path(files[i % len(files)]).read_bytes() for i in range(limit)]
    spec = _spec(model, weights, batch_size, precision, device, threads, jpeg_decoder, compile, prefetch, decode_threads)
    predict, model_load, bare = _bare_model(spec, bare_batches)
    stop, gpu = threading.Event(), []
    sampler = threading.Thread(target=_gpu_sampler, args=(stop, gpu), daemon=True)
    if shutil.which("nvidia-smi"):
        sampler.start()
    timings: dict[str, float] = {}
    pool = ThreadPoolExecutor(decode_threads) if decode_threads > 1 else None
    t0 = time.perf_counter()
    batches = (pd.Series(blobs[i:i + rows_per_task_batch]) for i in range(0, len(blobs), rows_per_task_batch))
    n_ok = sum(int(out["error_class"].isna().sum())
               for out in featurize_stream(batches, predict, spec, pool, timings, jpeg_decoder_for(spec, predict)))
    wall = time.perf_counter() - t0
    stop.set()
    if pool:
        pool.shutdown()
    rate = len(blobs) / wall
    return {
        "model": model, "engine": spec.backbone.engine, "precision": precision, "device": device,
        "jpeg_decoder": spec.jpeg_decoder, "compile": spec.compile, "prefetch": prefetch, "images": len(blobs),
        "featurized": n_ok, "batch_size": batch_size, "wall_s": round(wall, 3), "images_per_s": round(rate, 2),
        "bare_model_images_per_s": round(bare, 2), "of_bare_model": round(rate / bare, 3),
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
    parser.add_argument("--jpeg-decoder", choices=["pillow", "nvjpeg"], default="pillow")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    parser.add_argument("--no-prefetch", action="store_true", help="decode and run the model in turn")
    parser.add_argument("--decode-threads", type=int, default=1)
    parser.add_argument("--json", help="also write the numbers to this file")
    a = parser.parse_args(argv)
    result = run_task_bench(a.input, a.model, a.limit, a.batch_size, a.precision, a.device, a.threads, a.weights,
                            jpeg_decoder=a.jpeg_decoder, compile=a.compile, prefetch=not a.no_prefetch,
                            decode_threads=a.decode_threads)
    print(json.dumps(result))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
