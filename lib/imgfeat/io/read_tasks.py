"""Read tasks of even size: the file-scan settings under which a job's image files split into a multiple of the
task slots, with nearly equal numbers of files per task.

Spark packs the files of a scan into read tasks by bytes (each file counts as its length plus
``spark.sql.files.openCostInBytes``; "next fit decreasing" into tasks of ``spark.sql.files.maxPartitionBytes``).
With the featurizing done in the read tasks, a task's time follows its number of images, and the packing leaves a
last task with whatever remains: 5,216 Kermany images on 2 slots gave 41 tasks (40 of 127-128, one of 97), so one
slot featurized a 21st task (about 11 s here) while the other had nothing left to do: 2,656 images on the busier
slot against 2,608 for an even split. With ``maxPartitionBytes`` chosen for 44 tasks of 99-119 images, 2,618. Only
small jobs gain (the tail is at most one task in ``tasks / slots``), so only a scan of at most
``MAX_TASKS_PER_SLOT`` default tasks per slot is rebalanced.
"""

from __future__ import annotations

import heapq
import logging
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

MAX_TASKS_PER_SLOT = 32  # beyond this the last task's tail is under ~1.5 % of the job
MAX_FILES = 50_000  # file lengths fetched to the driver to plan the tasks (a search of ~1 s at most)


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


def balanced_split_bytes(lengths: list[int], max_partition_bytes: int, open_cost: int, slots: int,
                         min_partitions: int) -> int | None:
    """A ``maxPartitionBytes`` (at most the configured one) whose tasks finish together on ``slots`` slots, or None
    when Spark's own split is as good or the scan is large enough for the tail not to matter."""
    lengths = [n for n in lengths if n > 0]  # Spark's scans skip empty files
    if not lengths or slots < 2:
        return None
    total = sum(lengths) + open_cost * len(lengths)
    default = spark_split_bytes(total, max_partition_bytes, open_cost, min_partitions)
    counts = file_partitions(lengths, default, open_cost)
    if len(counts) > MAX_TASKS_PER_SLOT * slots:
        return None
    best, best_span = None, makespan(counts, slots)
    if best_span <= math.ceil(len(lengths) / slots):
        return None
    widest = max(lengths) + open_cost
    tasks = max(slots, math.ceil(len(counts) / slots) * slots)
    for n in (tasks, tasks + slots, tasks + 2 * slots):
        # The smallest split that packs into at most n tasks lies within one file's cost of total / n: every task
        # but the last is left less than a file short of the split.
        lo, hi = total // n, min(max_partition_bytes, total // n + 2 * widest)
        if lo > max_partition_bytes or len(file_partitions(lengths, hi, open_cost)) > n:
            continue
        while hi - lo > max(1, widest // 16):
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if len(file_partitions(lengths, mid, open_cost)) <= n else (mid, hi)
        span = makespan(file_partitions(lengths, hi, open_cost), slots)
        if span < best_span:
            best, best_span = hi, span
    return best


def balanced_read_settings(spark: SparkSession, scanned: DataFrame, more_lengths: list[int] | None = None
                           ) -> dict[str, str]:
    """SQL settings (for :func:`imgfeat.session.sql_conf` around the action) under which a binaryFile scan of the
    files in ``scanned`` (a ``file_length`` column) and of files of ``more_lengths`` (every file the scan lists)
    gives read tasks that finish together; empty when Spark's own split is as good, or the scan is large, or the
    session's settings are out of reach (Spark Connect). An optimisation only: the tasks read the same files."""
    from pyspark.sql import functions as F

    try:
        conf = spark._jsparkSession.sessionState().conf()  # type: ignore[union-attr]
        max_partition_bytes = int(conf.filesMaxPartitionBytes())
        open_cost = int(conf.filesOpenCostInBytes())
        min_num = conf.filesMinPartitionNum()
        slots = int(spark.sparkContext.defaultParallelism)
        leaf = spark.conf.get("spark.sql.leafNodeDefaultParallelism", None)
        min_partitions = int(min_num.get()) if min_num.isDefined() else int(leaf or slots)
    except Exception as exc:  # Spark Connect, or a Spark whose internals moved: keep Spark's split
        log.debug("read tasks not balanced (%s)", str(exc)[:120])
        return {}
    rows = scanned.select("file_length").filter(F.col("file_length") > 0).limit(MAX_FILES + 1).collect()
    lengths = [int(r["file_length"]) for r in rows] + [n for n in more_lengths or [] if n > 0]
    if len(lengths) > MAX_FILES:
        return {}
    split = balanced_split_bytes(lengths, max_partition_bytes, open_cost, slots, min_partitions)
    if split is None:
        return {}
    total = sum(lengths) + open_cost * len(lengths)
    settings = {"spark.sql.files.maxPartitionBytes": str(split)}
    if split > spark_split_bytes(total, split, open_cost, min_partitions):
        settings["spark.sql.files.minPartitionNum"] = "1"  # or Spark would split by bytes per core below ``split``
    counts = file_partitions(lengths, split, open_cost)
    log.info("read tasks: %d of %d-%d files over %d slots (maxPartitionBytes %d)", len(counts), min(counts),
             max(counts), slots, split)
    return settings
