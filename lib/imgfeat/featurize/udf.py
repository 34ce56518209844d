"""Batched featurization: image bytes -> (features | error) per row, as a Spark pandas UDF.

``featurize_batch`` is plain pandas/NumPy (testable without Spark); ``featurize_udf`` wraps it in an
iterator pandas UDF that builds the model once per Python worker and reuses it for every batch.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from imgfeat.backbones.registry import Backbone
from imgfeat.backbones.weights import WeightsSource
from imgfeat.io.decoders import DECODE_FAILED, DecodeError, DecodeOptions, decode_image
from imgfeat.io.fingerprints import perceptual_hash

if TYPE_CHECKING:
    from pyspark.sql import Column

RESULT_DDL = (
    "features array<float>, features_f16 binary, width int, height int, source_mode string, "
    "format string, content_sha256 string, phash string, error_class string, error_message string"
)
RESULT_FIELDS = ["features", "features_f16", "width", "height", "source_mode", "format", "content_sha256", "phash",
                 "error_class", "error_message"]


@dataclass(frozen=True)
class FeaturizeSpec:
    """Everything a worker needs, small and picklable (the weights travel as a broadcast)."""

    backbone: Backbone  # the registry entry itself, so backbones registered on the driver work on workers
    weights: WeightsSource
    decode: DecodeOptions
    batch_size: int = 32
    tf_threads: int = 1
    device: str = "auto"
    mixed_precision: bool = False
    decode_threads: int = 1
    float16_column: bool = False

    @property
    def model_name(self) -> str:
        return self.backbone.name


def _decode_one(data: Any, options: DecodeOptions) -> Any:
    try:
        return decode_image(None if data is None else bytes(data), options)
    except DecodeError as exc:
        return exc
    except Exception as exc:  # never let one file fail the batch
        return DecodeError(DECODE_FAILED, f"unexpected {type(exc).__name__}: {exc}")


def featurize_batch(
    contents: pd.Series,
    predict: Callable[[np.ndarray], np.ndarray],
    spec: FeaturizeSpec,
    pool: ThreadPoolExecutor | None = None,
    timings: dict[str, float] | None = None,
) -> pd.DataFrame:
    """Decode every row, run the model on the decodable ones in chunks, return one result row each.

    ``timings`` (optional) accumulates seconds spent in "decode" and "inference".
    """
    n = len(contents)
    t0 = time.perf_counter()
    decoded = list(pool.map(lambda d: _decode_one(d, spec.decode), contents)) if pool else [
        _decode_one(d, spec.decode) for d in contents
    ]
    out: dict[str, list[Any]] = {name: [None] * n for name in RESULT_FIELDS}
    ok = [i for i, d in enumerate(decoded) if not isinstance(d, DecodeError)]
    for i, d in enumerate(decoded):
        if isinstance(d, DecodeError):
            out["error_class"][i] = d.error_class
            out["error_message"][i] = d.message
        else:
            out["width"][i], out["height"][i] = d.width, d.height
            out["source_mode"][i], out["format"][i] = d.source_mode, d.format
            # Duplicates: the exact bytes, and a perceptual hash of the decoded image (docs/validity.md).
            out["content_sha256"][i] = hashlib.sha256(bytes(contents.iloc[i])).hexdigest()
            out["phash"][i] = perceptual_hash(d.array)
    size = spec.decode.size
    t1 = time.perf_counter()
    for start in range(0, len(ok), spec.batch_size):
        idx = ok[start : start + spec.batch_size]
        batch = np.empty((len(idx), size, size, 3), dtype=np.float32)
        for j, i in enumerate(idx):
            batch[j] = decoded[i].array
        feats = np.asarray(predict(batch), dtype=np.float32)
        for j, i in enumerate(idx):
            out["features"][i] = feats[j]
            if spec.float16_column:
                out["features_f16"][i] = feats[j].astype(np.float16).tobytes()
    if timings is not None:
        t2 = time.perf_counter()
        timings["decode"] = timings.get("decode", 0.0) + (t1 - t0)
        timings["inference"] = timings.get("inference", 0.0) + (t2 - t1)
    return pd.DataFrame(out)


# Test-only fault injection (docs/reliability.md), off unless this variable is set in the workers' environment:
#   fail-first-attempt   the first attempt of every even-numbered partition raises (task retries)
#   hold:DIR             each task touches DIR/started-p<partition>-a<attempt>; tasks of partitions other than 0
#                        then wait (at most 10 minutes) until DIR/release exists (interrupts, worker loss)
FAULT_ENV = "IMGFEAT_TEST_FAULT"


def _injected_fault() -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    from pyspark import TaskContext

    ctx = TaskContext.get()
    if ctx is None:
        return
    kind, _, arg = spec.partition(":")
    if kind == "fail-first-attempt" and ctx.attemptNumber() == 0 and ctx.partitionId() % 2 == 0:
        raise RuntimeError(f"{FAULT_ENV}: injected failure of partition {ctx.partitionId()}, attempt 0")
    if kind == "hold" and arg:
        open(os.path.join(arg, f"started-p{ctx.partitionId()}-a{ctx.attemptNumber()}"), "w").close()
        deadline = time.monotonic() + 600
        while ctx.partitionId() != 0 and not os.path.exists(os.path.join(arg, "release")):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{FAULT_ENV}: never released")
            time.sleep(0.2)


def _predictor(spec: FeaturizeSpec, weights_broadcast: Any) -> Callable[[np.ndarray], np.ndarray]:
    """The worker's cached model for ``spec`` (built on first use in this process), from the backbone's engine."""
    from imgfeat.engines import EngineOptions, engine_of
    from imgfeat.engines.base import cached_predictor

    options = EngineOptions(threads=spec.tf_threads, device=spec.device, mixed_precision=spec.mixed_precision,
                            input_size=spec.decode.size)
    return cached_predictor(engine_of(spec.backbone), spec.backbone, spec.weights,
                            lambda: None if weights_broadcast is None else weights_broadcast.value, options)


def featurize_udf(
    spec: FeaturizeSpec, weights_broadcast: Any = None, accumulators: dict[str, Any] | None = None
) -> Callable[[Column], Column]:
    """An iterator pandas UDF: content (binary) -> struct(RESULT_DDL).

    ``weights_broadcast`` holds the weights file's bytes (None for seeded weights).

    ``accumulators`` (optional): Spark float accumulators "decode", "inference" and "model_load"
    that receive the task-seconds spent in each stage.
    """
    from pyspark.sql import functions as F

    def featurize(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        _injected_fault()
        started = time.perf_counter()
        predict = _predictor(spec, weights_broadcast)
        timings: dict[str, float] = {"model_load": time.perf_counter() - started}
        pool = ThreadPoolExecutor(spec.decode_threads) if spec.decode_threads > 1 else None
        try:
            for contents in batches:
                yield featurize_batch(contents, predict, spec, pool, timings)
        finally:
            if pool:
                pool.shutdown()
            for name, acc in (accumulators or {}).items():
                acc.add(timings.get(name, 0.0))

    return F.pandas_udf(featurize, RESULT_DDL).asNondeterministic()  # type: ignore[call-overload]


def warmup_workers(spark: Any, spec: FeaturizeSpec, weights_broadcast: Any, slots: int) -> None:
    """Run one tiny task per slot that builds the model in its (reused) Python worker."""

    def warm(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        _predictor(spec, weights_broadcast)
        yield from batches

    spark.range(slots, numPartitions=slots).mapInPandas(warm, "id long").collect()
