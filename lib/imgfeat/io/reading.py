"""Reading the contents of the files a job processes: one binaryFile scan (of their paths, or of the whole folder),
in read tasks sized by image count (:mod:`imgfeat.io.read_tasks`)."""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

from imgfeat.io.root import input_root

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from imgfeat.config.schema import InferenceConfig, InputConfig

log = logging.getLogger(__name__)

# Above this many files to read, read the whole root and semi-join instead of listing paths.
MAX_EXPLICIT_PATHS = 20_000
# Up to this many rows, per-file attributes are broadcast to the content read (no shuffle).
MAX_BROADCAST_ROWS = 2_000_000


def _escape_glob(path: str) -> str:
    return re.sub(r"([\\*?\[\]{}])", r"\\\1", path)


def reads_paths(n_todo: int, n_listed: int) -> bool:
    """Whether the scan reads the paths to do (a few, of a larger folder) rather than the whole folder."""
    return n_todo <= MAX_EXPLICIT_PATHS and n_todo < n_listed


def read_contents(spark: SparkSession, inp: InputConfig, todo: DataFrame, n_todo: int, n_listed: int) -> DataFrame:
    """path, content, length, modificationTime for the files in ``todo`` (under ``inp.path``, at most
    ``inp.max_file_bytes``) that can still be read.

    Files that vanished since listing are skipped here (ignoreMissingFiles) and accounted for by the
    caller, which compares against ``todo``.
    """
    from pyspark.sql import functions as F

    root = input_root(spark, inp.path)
    reader = (
        spark.read.format("binaryFile")
        .option("ignoreMissingFiles", "true")
        .option("recursiveFileLookup", "true")
    )
    if reads_paths(n_todo, n_listed):
        paths = [_escape_glob(r["path"]) for r in todo.select("path").collect()]
        try:
            contents = reader.load(paths)
        except Exception as exc:  # a path vanished before Spark could check it: fall back
            log.info("explicit path read failed (%s); reading the whole folder instead", str(exc)[:120])
            contents = reader.load(root)
    else:
        contents = reader.load(root)
    contents = contents.filter(F.col("length") <= F.lit(inp.max_file_bytes))
    return contents.join(broadcast_if_small(todo.select("path"), n_todo), on="path", how="left_semi")


def read_task_settings(spark: SparkSession, inference: InferenceConfig, todo: DataFrame, n_todo: int, n_listed: int,
                       other_lengths: list[int] | None) -> dict[str, str]:
    """Settings (for ``session.sql_conf`` around the action) that give :func:`read_contents`' scan of ``todo`` read
    tasks of ``inference.images_per_task`` images finishing together (:mod:`imgfeat.io.read_tasks`); empty where
    that scan also lists files already done, or other files whose lengths are unknown (``other_lengths`` None).
    ``todo`` must be persisted or materialised: its lengths are collected again."""
    from imgfeat.io.read_tasks import images_per_task, read_settings

    per_task = images_per_task(spark, inference)
    if reads_paths(n_todo, n_listed):
        return read_settings(spark, todo, per_task)  # the scan reads these paths
    if n_todo == n_listed and other_lengths is not None:  # the scan reads the whole folder
        return read_settings(spark, todo, per_task, other_lengths)
    return {}


def broadcast_if_small(df: DataFrame, rows: int) -> DataFrame:
    """Broadcast a path list that fits comfortably in memory, so image bytes are never shuffled."""
    from pyspark.sql import functions as F

    return F.broadcast(df) if rows <= MAX_BROADCAST_ROWS else df
