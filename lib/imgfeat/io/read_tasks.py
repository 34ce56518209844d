"""Featurizing read tasks sized by image count, in a multiple of the task slots, finishing together.

Extract and batch scoring featurize inside the read tasks of a binaryFile scan, so a task's time follows its number
of images, not its bytes. Spark packs a scan's files by bytes (each file counts as its length plus
``spark.sql.files.openCostInBytes``; "next fit decreasing" into tasks of ``spark.sql.files.maxPartitionBytes``),
which gives many small tasks and a short last one; every task pays a fixed set-up in the JVM and the Python worker,
and the last one leaves a slot idle (measured: docs/benchmarks.md). imgfeat simulates Spark's packing and picks a
``maxPartitionBytes`` that gives about ``images_per_task`` images per task (``inference.images_per_task``), in a
multiple of the slots, with a nearly full last task. A ``maxPartitionBytes`` the user set explicitly caps the tasks
(imgfeat then only evens them out).
"""

from __future__ import annotations

import heapq
import logging
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from imgfeat.config.schema import InferenceConfig

log = logging.getLogger(__name__)

MAX_FILES = 50_000  # file lengths fetched to the driver to simulate the packing; larger scans use their mean length
CPU_IMAGES_PER_TASK = 512  # ~45 s of ResNet50 per task on one CPU core: per-task set-up under 1 %
GPU_IMAGES_PER_TASK = 8192  # a few s per task at GPU speeds (thousands of images/s); not measured with Spark here


def images_per_task(spark: SparkSession, inference: InferenceConfig) -> int:
    """``inference.images_per_task``, or for 0 (auto) the CPU or GPU default: GPU when ``inference.device`` is gpu
    or the session gives tasks a GPU share (``spark.task.resource.gpu.amount``)."""
    if inference.images_per_task:
        return inference.images_per_task
    gpu = inference.device == "gpu"
    if inference.device == "auto":
        try:
            gpu = float(spark.conf.get("spark.task.resource.gpu.amount", None) or 0) > 0
        except Exception:  # a session that hides its conf: CPU-sized tasks are the safe side
            gpu = False
    return GPU_IMAGES_PER_TASK if gpu else CPU_IMAGES_PER_TASK


def file_partitions(lengths: list[int], max_split_bytes: int, open_cost: int) -> list[int]:
    """Files per read task as Spark packs unsplittable files (FilePartition.getFilePartitions): sorted by length,
    largest first, each added to the current task unless that would take it over ``max_split_bytes``; empty files
    are not read."""
    counts: list[int] = []
    size = files = 0
    for length in sorted((n for n in lengths if n > 0), reverse=True):
        if files and size + length > max_split_bytes:
            counts.append(files)
            size = files = 0
        size += length + open_cost
        files += 1
    if files:
        counts.append(files)
    return counts


def makespan(counts: list[int], slots: int) -> int:
    """Files featurized by the busiest slot when tasks go, in order, to whichever slot is free first."""
    finish = [0] * max(1, slots)
    for count in counts:
        heapq.heappush(finish, heapq.heappop(finish) + count)
    return max(finish)


def spark_split_bytes(total_bytes: int, max_partition_bytes: int, open_cost: int, min_partitions: int) -> int:
    """Spark's maxSplitBytes for a scan of ``total_bytes`` (lengths plus open costs)."""
    return min(max_partition_bytes, max(open_cost, total_bytes // max(1, min_partitions)))


def task_count(files: int, slots: int, per_task: int, at_least: int = 1) -> int:
    """Read tasks for ``files`` files: about ``per_task`` files each and at least ``at_least``, rounded up to a
    multiple of the slots (every slot busy to the end), never more than the files."""
    slots = max(1, slots)
    tasks = max(1, at_least, math.ceil(files / max(1, per_task)))
    return max(1, min(files, math.ceil(tasks / slots) * slots))


def planned_split_bytes(lengths: list[int], open_cost: int, slots: int, per_task: int,
                        cap: int | None = None) -> int | None:
    """The ``maxPartitionBytes`` under which Spark packs files of ``lengths`` into read tasks of about ``per_task``
    files in a multiple of ``slots``, finishing together (the smallest busiest slot over three task counts); at
    most ``cap`` (a user's setting) and then at least as many tasks as under it. None for an empty scan."""
    lengths = [n for n in lengths if n > 0]  # Spark's scans skip empty files
    if not lengths:
        return None
    total = sum(lengths) + open_cost * len(lengths)
    widest = max(lengths) + open_cost
    limit = cap if cap is not None else total + widest
    tasks = task_count(len(lengths), slots, per_task, len(file_partitions(lengths, limit, open_cost)))
    best, best_span = None, None
    for n in (tasks, tasks + slots, tasks + 2 * slots):
        # The smallest split that packs into at most n tasks lies within one file's cost of total / n: every task
        # but the last is left less than a file short of the split.
        lo, hi = total // n, min(limit, total // n + 2 * widest)
        if lo > limit or len(file_partitions(lengths, hi, open_cost)) > n:
            continue
        while hi - lo > max(1, widest // 16):
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if len(file_partitions(lengths, mid, open_cost)) <= n else (mid, hi)
        span = makespan(file_partitions(lengths, hi, open_cost), slots)
        if best_span is None or span < best_span:
            best, best_span = hi, span
    return best if best is not None else limit


def read_settings(spark: SparkSession, scanned: DataFrame, per_task: int, more_lengths: list[int] | None = None
                  ) -> dict[str, str]:
    """SQL settings (for :func:`imgfeat.session.sql_conf` around the action) under which a binaryFile scan of the
    files in ``scanned`` (a ``file_length`` column) and of files of ``more_lengths`` (every file the scan lists)
    gives read tasks of about ``per_task`` images in a multiple of the slots, finishing together; empty where the
    session's settings are out of reach (Spark Connect). An optimisation only: the tasks read the same files."""
    from pyspark.sql import functions as F

    key = "spark.sql.files.maxPartitionBytes"
    try:
        conf = spark._jsparkSession.sessionState().conf()  # type: ignore[union-attr]
        cap = int(conf.filesMaxPartitionBytes()) if spark.conf.get(key, None) is not None else None
        open_cost = int(conf.filesOpenCostInBytes())
        min_num = conf.filesMinPartitionNum()
        slots = int(spark.sparkContext.defaultParallelism)
        leaf = spark.conf.get("spark.sql.leafNodeDefaultParallelism", None)
        min_partitions = int(min_num.get()) if min_num.isDefined() else int(leaf or slots)
    except Exception as exc:  # Spark Connect, or a Spark whose internals moved: keep Spark's split
        log.debug("read tasks left to Spark (%s)", str(exc)[:120])
        return {}
    more = [n for n in more_lengths or [] if n > 0]
    positive = scanned.select("file_length").filter(F.col("file_length") > 0)
    rows = positive.limit(MAX_FILES + 1).collect()
    lengths = [int(r["file_length"]) for r in rows] + more
    simulated = len(lengths) <= MAX_FILES
    if simulated:
        split = planned_split_bytes(lengths, open_cost, slots, per_task, cap)
        files, total = len(lengths), sum(lengths) + open_cost * len(lengths)
    else:  # too many to simulate: tasks of the mean file's cost (Spark's packing leaves each under a file short)
        stats = positive.agg(F.count("*").alias("n"), F.sum("file_length").alias("bytes")).first()
        files = int(stats["n"]) + len(more)
        total = int(stats["bytes"]) + sum(more) + open_cost * files
        tasks = task_count(files, slots, per_task, math.ceil(total / cap) if cap else 1)
        split = total // tasks + total // files
        split = min(cap, split) if cap is not None else split
    if split is None:
        return {}
    settings = {key: str(split)}
    if split > spark_split_bytes(total, split, open_cost, min_partitions):
        settings["spark.sql.files.minPartitionNum"] = "1"  # or Spark would split by bytes per core below ``split``
    if simulated:
        counts = file_partitions(lengths, split, open_cost)
        log.info("read tasks: %d of %d-%d files over %d slots (maxPartitionBytes %d)", len(counts), min(counts),
                 max(counts), slots, split)
    else:
        log.info("read tasks: about %d of %d files over %d slots (maxPartitionBytes %d)", math.ceil(total / split),
                 files, slots, split)
    return settings
