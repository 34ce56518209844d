"""Batched featurization: image bytes -> (features | error) per row, as a Spark pandas UDF.

``featurize_batch`` is plain pandas/NumPy (testable without Spark); ``featurize_udf`` wraps it in an
iterator pandas UDF that builds the model once per Python worker and reuses it for every batch.
"""

from __future__ import annotations

import gc
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from imgfeat.engines.base import input_batch
from imgfeat.featurize.spec import FeaturizeSpec
from imgfeat.io.decoders import DECODE_FAILED, DecodeError, decode_or_error
from imgfeat.io.decoders.deadline import DecodeWatchdog
from imgfeat.io.decoders.spark_image import decode_spark_image
from imgfeat.io.fingerprints import perceptual_hash

if TYPE_CHECKING:
    from pyspark.sql import Column

# One result per input file. Volumes give several model inputs (slices): the per-slice fields are arrays,
# exploded into one row per slice by ``imgfeat.featurize.job.featurize_contents``.
SLICE_FIELDS = ["features", "features_f16", "slice_index", "phash"]
META_DDL = (
    "modality string, study_key string, series_key string, body_part string, view_position string, "
    "pixel_spacing array<double>, rows int, columns int, bits_stored int, photometric string, patient_key string, "
    "label_value string"
)
META_FIELDS = [part.split()[0] for part in META_DDL.split(", ")]
RESULT_DDL = (
    "features array<array<float>>, features_f16 array<binary>, slice_index array<int>, phash array<string>, "
    "width int, height int, source_mode string, format string, content_sha256 string, "
    f"{META_DDL}, error_class string, error_message string"
)
RESULT_FIELDS = [*SLICE_FIELDS, "width", "height", "source_mode", "format", "content_sha256", *META_FIELDS,
                 "error_class", "error_message"]


def _decode_one(data: Any, spec: FeaturizeSpec) -> Any:
    """A list of decoded images (file bytes, or a row of Spark's image source), or the DecodeError."""
    if isinstance(data, pd.Series):  # a struct from spark.read.format("image")
        try:
            return [decode_spark_image(data, spec.decode)]
        except DecodeError as exc:
            return exc
        except Exception as exc:  # never let one file fail the batch
            return DecodeError(DECODE_FAILED, f"unexpected {type(exc).__name__}: {exc}")
    return decode_or_error(None if data is None else bytes(data), spec.decode, spec.id_salt, spec.label_tag)


@dataclass
class DecodedRows:
    """A batch after decoding: the result columns so far, and the model inputs still to run."""

    out: dict[str, list[Any]]
    host: list[tuple[int, int, Any]]  # (row, slice position, DecodedImage): decoded on the CPU
    device: list[tuple[int, Any]]  # (row, (3, s, s) uint8 tensor on the model's device): JPEGs decoded there


def _device_decode(items: list[Any], spec: FeaturizeSpec, jpeg_decoder: Any) -> dict[int, tuple[Any, Any]]:
    """Rows whose JPEG the device decoded: row -> (header, tensor). The rest go to Pillow."""
    headers = {i: h for i, d in enumerate(items) if (h := jpeg_decoder.header(None if d is None else bytes(d)))}
    rows = sorted(headers)
    done: dict[int, tuple[Any, Any]] = {}
    for start in range(0, len(rows), spec.batch_size):
        chunk = rows[start:start + spec.batch_size]
        for i, tensor in zip(chunk, jpeg_decoder.decode([bytes(items[i]) for i in chunk]), strict=True):
            if tensor is not None:
                done[i] = (headers[i], tensor)
    return done


def _decode_on_host(items: list[Any], rows: list[int], spec: FeaturizeSpec,
                    pool: ThreadPoolExecutor | None) -> dict[int, tuple[Any, list[str] | None]]:
    """row -> (decoded images or DecodeError, perceptual hashes), in the decode threads. Each file gets at most
    preprocess.decode_timeout_s, else it is a timed_out row (imgfeat.io.decoders.deadline)."""
    watchdog = DecodeWatchdog(spec.decode.decode_timeout_s)

    def decode(i: int) -> tuple[Any, list[str] | None]:
        d = watchdog.call(_decode_one, items[i], spec)
        return d, None if isinstance(d, DecodeError) else [perceptual_hash(img.array) for img in d]

    try:
        return dict(zip(rows, pool.map(decode, rows) if pool else map(decode, rows), strict=True))
    finally:
        watchdog.close()


def decode_rows(contents: pd.Series | pd.DataFrame, spec: FeaturizeSpec, pool: ThreadPoolExecutor | None = None,
                timings: dict[str, float] | None = None, jpeg_decoder: Any = None) -> DecodedRows:
    """Decode every row (JPEGs on the model's device when ``jpeg_decoder`` is given, the rest and whatever the
    device refuses with ``decode_file``) and fill in everything but the features."""
    t0 = time.perf_counter()
    n = len(contents)
    structs = isinstance(contents, pd.DataFrame)
    items = [row for _, row in contents.iterrows()] if structs else list(contents)
    on_device = _device_decode(items, spec, jpeg_decoder) if jpeg_decoder is not None and not structs else {}
    rest = [i for i in range(n) if i not in on_device]

    decoded = _decode_on_host(items, rest, spec, pool)
    out: dict[str, list[Any]] = {name: [None] * n for name in RESULT_FIELDS}
    host: list[tuple[int, int, Any]] = []
    for i, (d, phashes) in decoded.items():
        if isinstance(d, DecodeError):
            out["error_class"][i] = d.error_class
            out["error_message"][i] = d.message
            for key in META_FIELDS:
                out[key][i] = d.meta.get(key)
            continue
        first = d[0]
        out["width"][i], out["height"][i] = first.width, first.height
        out["source_mode"][i], out["format"][i] = first.source_mode, first.format
        # Duplicates: the exact bytes, and a perceptual hash of each decoded image (docs/validity.md).
        raw = items[i]["data"] if structs else items[i]
        out["content_sha256"][i] = hashlib.sha256(bytes(raw)).hexdigest()
        for key in META_FIELDS:
            out[key][i] = first.meta.get(key)
        out["slice_index"][i] = [img.slice_index for img in d]
        out["phash"][i] = phashes
        out["features"][i] = [None] * len(d)
        out["features_f16"][i] = [None] * len(d)
        host += [(i, j, img) for j, img in enumerate(d)]
    device: list[tuple[int, Any]] = []
    if on_device:
        rows = sorted(on_device)
        import torch

        pixels = torch.stack([on_device[i][1] for i in rows]).permute(0, 2, 3, 1).cpu().numpy()  # for the hashes

        def hashes(k: int) -> tuple[str, str]:  # the CPU's share of a device-decoded image (threads: GIL released)
            return hashlib.sha256(bytes(items[rows[k]])).hexdigest(), perceptual_hash(pixels[k])

        digests = list(pool.map(hashes, range(len(rows))) if pool else map(hashes, range(len(rows))))
        for k, i in enumerate(rows):
            header = on_device[i][0]
            out["width"][i], out["height"][i], out["source_mode"][i], out["format"][i] = (
                header.width, header.height, header.mode, "JPEG")
            out["content_sha256"][i] = digests[k][0]
            out["slice_index"][i] = [None]
            out["phash"][i] = [digests[k][1]]
            out["features"][i], out["features_f16"][i] = [None], [None]
            device.append((i, on_device[i][1]))
    if timings is not None:
        timings["decode"] = timings.get("decode", 0.0) + (time.perf_counter() - t0)
    return DecodedRows(out, host, device)


def infer_rows(rows: DecodedRows, predict: Callable[[np.ndarray], np.ndarray], spec: FeaturizeSpec,
               timings: dict[str, float] | None = None) -> pd.DataFrame:
    """Run the model on every decoded input in chunks of ``batch_size``; the finished result rows."""
    t0 = time.perf_counter()
    out, size = rows.out, spec.decode.size

    def store(chunk: list[tuple[int, int]], feats: np.ndarray) -> None:
        for k, (i, j) in enumerate(chunk):
            out["features"][i][j] = feats[k]
            if spec.float16_column:
                out["features_f16"][i][j] = feats[k].astype(np.float16).tobytes()

    for start in range(0, len(rows.host), spec.batch_size):
        chunk = rows.host[start : start + spec.batch_size]
        batch = input_batch([img.array for _, _, img in chunk], size)
        store([(i, j) for i, j, _ in chunk], np.asarray(predict(batch), dtype=np.float32))
    if rows.device:
        import torch

        for start in range(0, len(rows.device), spec.batch_size):
            chunk = rows.device[start : start + spec.batch_size]
            feats = predict.from_device(torch.stack([t for _, t in chunk]))  # type: ignore[attr-defined]
            store([(i, 0) for i, _ in chunk], np.asarray(feats, dtype=np.float32))
    if timings is not None:
        timings["inference"] = timings.get("inference", 0.0) + (time.perf_counter() - t0)
    return pd.DataFrame(out)


def featurize_batch(
    contents: pd.Series | pd.DataFrame,
    predict: Callable[[np.ndarray], np.ndarray],
    spec: FeaturizeSpec,
    pool: ThreadPoolExecutor | None = None,
    timings: dict[str, float] | None = None,
    jpeg_decoder: Any = None,
) -> pd.DataFrame:
    """Decode every row, run the model on every decoded image (slice) in chunks, return one result row per input.

    ``contents``: file bytes (a Series), or the rows of Spark's image struct (a DataFrame: origin, height, width,
    nChannels, mode, data). ``timings`` (optional) accumulates seconds spent in "decode" and "inference".
    ``jpeg_decoder``: a ``DeviceJpegDecoder`` for ``inference.jpeg_decoder=nvjpeg`` (None: Pillow for all).
    """
    return infer_rows(decode_rows(contents, spec, pool, timings, jpeg_decoder), predict, spec, timings)


def featurize_stream(batches: Iterator[pd.Series | pd.DataFrame], predict: Callable[[np.ndarray], np.ndarray],
                     spec: FeaturizeSpec, pool: ThreadPoolExecutor | None = None,
                     timings: dict[str, float] | None = None, jpeg_decoder: Any = None) -> Iterator[pd.DataFrame]:
    """``featurize_batch`` over a task's batches; with ``spec.prefetch`` the next batch is decoded in a thread
    while the model runs on this one (Pillow, nvJPEG and the model release the GIL)."""
    if not spec.prefetch:
        for contents in batches:
            yield featurize_batch(contents, predict, spec, pool, timings, jpeg_decoder)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="imgfeat-prefetch") as ahead:
        pending = None
        for contents in batches:
            ready, pending = pending, ahead.submit(decode_rows, contents, spec, pool, timings, jpeg_decoder)
            if ready is not None:
                yield infer_rows(ready.result(), predict, spec, timings)
        if pending is not None:
            yield infer_rows(pending.result(), predict, spec, timings)


def jpeg_decoder_for(spec: FeaturizeSpec, predict: Any) -> Any:
    """The device JPEG decoder ``spec`` asks for (None for Pillow)."""
    if spec.jpeg_decoder != "nvjpeg":
        return None
    from imgfeat.engines.torch_jpeg import DeviceJpegDecoder

    return DeviceJpegDecoder(spec.decode, predict.device)


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


_FROZEN: set[int] = set()


def _predictor(spec: FeaturizeSpec, weights_broadcast: Any) -> Callable[[np.ndarray], np.ndarray]:
    """The worker's cached model for ``spec`` (built on first use in this process), from the backbone's engine.

    Once built, everything the worker holds is moved out of the garbage collector's reach (``gc.freeze``): Spark's
    reused Python workers run a full ``gc.collect()`` after every task, which walked the framework's and the model's
    ~0.4 million objects each time (measured: docs/benchmarks.md); the model lives as long as the worker anyway.
    Garbage is collected first, so only live objects are frozen.
    """
    from imgfeat.engines import engine_of
    from imgfeat.engines.base import cached_predictor

    predict = cached_predictor(engine_of(spec.backbone), spec.backbone, spec.weights,
                               lambda: None if weights_broadcast is None else weights_broadcast.value,
                               spec.engine_options())
    if id(predict) not in _FROZEN:
        gc.collect()
        gc.freeze()
        _FROZEN.add(id(predict))
    return predict


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
            yield from featurize_stream(batches, predict, spec, pool, timings, jpeg_decoder_for(spec, predict))
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

    spark.sparkContext.setJobDescription("imgfeat: build the model in every Python worker")
    spark.range(slots, numPartitions=slots).mapInPandas(warm, "id long").collect()
