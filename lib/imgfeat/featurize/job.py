"""The scan skeleton that extract and batch prediction share: list -> plan -> read -> featurize -> append both
tables -> account.

A scan job holds writer leases on its two tables (its output table and its errors table) from start to end
(``scan_run``), plans against what the tables already hold (``plan_scan``), featurizes the files still to do in
the read tasks of one scan (``featurize_todo``), and appends both tables, checking that every file it processed
ends in exactly one of them (``write_rows``). What the rows hold (features, or predictions) is the job's own.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from imgfeat.io.decoders import EMPTY_FILE, TOO_LARGE, UNREADABLE

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

    from imgfeat.backbones.weights import WeightsSource
    from imgfeat.config.schema import InferenceConfig, InputConfig, OutputConfig
    from imgfeat.featurize.spec import FeaturizeSpec
    from imgfeat.store.lease import RunLeases

log = logging.getLogger(__name__)

# What identifies a version of a file: a changed file is featurized again and its old rows replaced.
FINGERPRINT = ["file_length", "file_modification_time"]


@dataclass(frozen=True)
class Tables:
    """The two tables a scan job writes (``output.path`` and its errors table), their format, and how."""

    output: str
    errors: str
    fmt: str  # parquet | delta (resolved)
    mode: str = "incremental"  # incremental | overwrite
    lease_timeout_s: float = 120.0
    lease_dir: str | None = None

    @classmethod
    def of(cls, spark: SparkSession, output: OutputConfig, errors_path: str | None) -> Tables:
        """The tables of the ``output`` settings (``errors_path``: Config.errors_path), their format resolved."""
        from imgfeat.store.tables import resolve_format

        return cls(output.path or "", errors_path or "", resolve_format(spark, output.format), output.mode,
                   output.lease_timeout_s, output.lease_dir)

    @property
    def paths(self) -> list[str]:
        return [self.output, self.errors]


@dataclass(frozen=True)
class ScanRun:
    """One run of a scan job: the tables, whose rows it writes (model key, weights id), its run id and leases."""

    tables: Tables
    job: str  # extract | predict: the leases' owner and the Spark job descriptions
    model: str
    weights_id: str
    run_id: str
    leases: RunLeases = field(repr=False)

    def describe(self, spark: SparkSession, step: str | None) -> None:
        """Name the Spark jobs that follow (Spark's UI); None clears it."""
        spark.sparkContext.setJobDescription(f"imgfeat {self.job}: {step}" if step else None)


@contextmanager
def scan_run(spark: SparkSession, tables: Tables, job: str, model: str, weights_id: str) -> Iterator[ScanRun]:
    """A run holding writer leases on both tables (refused while another live run writes the same model and weights
    there; runs of other models proceed side by side), released when the run ends, however it ends."""
    from imgfeat.store.lease import Owner, open_leases

    run_id = uuid.uuid4().hex[:12]
    owner = Owner(run_id, model, weights_id, job=job)
    with open_leases(spark, tables.paths, tables.fmt, owner, tables.lease_timeout_s, tables.lease_dir) as leases:
        yield ScanRun(tables, job, model, weights_id, run_id, leases)


def existing_keys(spark: SparkSession, run: ScanRun) -> DataFrame | None:
    """(path, model, weights_id, fingerprint) already in the output or errors table for the run's model and weights.

    Each table is repaired first (with this run's leases, so that its own folders count as live)."""
    from pyspark.sql import functions as F

    from imgfeat.store.tables import read_table, repair, table_exists

    frames = []
    for location in run.tables.paths:
        repair(spark, location, run.tables.fmt, run.leases.get(location))
        if table_exists(spark, location, run.tables.fmt):
            frames.append(read_table(spark, location, run.tables.fmt).select("path", "model", "weights_id", *FINGERPRINT))
    if not frames:
        return None
    keys = frames[0] if len(frames) == 1 else frames[0].unionByName(frames[1])
    return keys.filter((F.col("model") == run.model) & (F.col("weights_id") == run.weights_id)).dropDuplicates(
        ["path", *FINGERPRINT]
    )


@dataclass
class ScanPlan:
    """What a scan of the input folder found, and what is left to do against the tables."""

    images: DataFrame  # the listing, persisted (``finish_scan`` releases it)
    n_listed: int
    n_other: int  # files with other extensions (not images)
    other_lengths: list[int] | None  # their lengths (None: too many), taken while listing, to size the read tasks
    todo: DataFrame  # the images to process: new, changed, or all of them (overwrite)
    n_todo: int
    replace: DataFrame | None  # paths whose old rows the appends replace
    n_replaced: int
    report: dict[str, int] = field(default_factory=dict)  # io.labels.label_report's counts, when asked for

    @property
    def already_done(self) -> int:
        return self.n_listed - self.n_todo


def plan_scan(spark: SparkSession, inp: InputConfig, run: ScanRun, existing: DataFrame | None,
              report_labels: bool = False) -> ScanPlan:
    """List the input folder (``inp``) and plan the work against the tables (``existing``: ``existing_keys``),
    read under their commit locks; ``report_labels``: count how labelling went too (one job with the count)."""
    from pyspark import StorageLevel

    from imgfeat.io.labels import label_report
    from imgfeat.io.listing import list_files, listing_settings, other_file_lengths
    from imgfeat.session import sql_conf
    from imgfeat.store.tables import check_replace_supported, table_locks

    run.describe(spark, "listing")
    images, others = list_files(spark, inp)
    images = images.persist(StorageLevel.MEMORY_AND_DISK)
    with sql_conf(spark, listing_settings(spark)):  # the scans that list, in one task per core
        report = label_report(spark, inp, images) if report_labels else {"listed": images.count()}
        other_lengths = other_file_lengths(others)  # counted (and sized, for the read tasks) while listing
        n_other = len(other_lengths) if other_lengths is not None else others.count()
    n_listed = report.pop("listed")
    run.describe(spark, "planning")
    with table_locks(spark, run.tables.paths, run.tables.fmt, run.leases):
        todo, n_todo, replace, n_replaced = _plan_work(spark, images, existing, run, n_listed)
    if replace is not None:  # before featurizing: a replace the tables cannot take fails now, not after hours
        for location in run.tables.paths:
            check_replace_supported(spark, location, run.tables.fmt)
    return ScanPlan(images, n_listed, n_other, other_lengths, todo, n_todo, replace, n_replaced, report)


def _done_keys(images: DataFrame, existing: DataFrame) -> DataFrame:
    """(path, fingerprint) of the listed files that are done: in a table with their current fingerprint
    and with no row left from an older version of the file.

    A run that dies after writing the features table but before the errors table (or the reverse)
    leaves a changed file with a new row in one table and its old row in the other; such a file is not
    done, so the next run processes it again and replaces both rows.
    """
    current = images.select("path", *FINGERPRINT)
    stale = existing.join(current, on=["path", *FINGERPRINT], how="left_anti").select("path")
    keys = existing.select("path", *FINGERPRINT)
    return keys.join(stale.join(current.select("path"), on="path", how="left_semi"), on="path", how="left_anti")


def _plan_work(spark: SparkSession, images: DataFrame, existing: DataFrame | None, run: ScanRun, n_images: int
               ) -> tuple[DataFrame, int, DataFrame | None, int]:
    """(todo, its count, paths whose old rows must be replaced, their count) for incremental/overwrite runs.

    When it depends on the existing tables (an incremental re-run), ``todo`` is materialised to the run's scratch
    folder beside the output table (dropped by ``finish_scan``) so that the plan never reads the tables about to be
    rewritten and survives the loss of an executor. Otherwise ``todo`` is ``images`` itself (persisted by the
    caller) and ``n_images`` its count. The caller holds the tables' commit locks, so that no other run swaps a
    table while it is read.
    """
    from imgfeat.store.tables import materialize

    if existing is None or run.tables.mode == "overwrite":
        # The plan does not depend on the tables: no need to freeze it (a first run skips a write).
        todo, n_todo = images, n_images
        replace = existing.select("path").distinct() if existing is not None else None
    else:
        todo = images.join(_done_keys(images, existing), on=["path", *FINGERPRINT], how="left_anti")
        replace = todo.join(existing.select("path").distinct(), on="path", how="left_semi").select("path")
        todo = materialize(spark, todo, run.tables.output, run.run_id)
        n_todo = todo.count()
    replaced_paths = [r["path"] for r in replace.collect()] if replace is not None else []
    n_replaced = len(replaced_paths)
    replace = spark.createDataFrame([(p,) for p in replaced_paths], "path string") if n_replaced else None
    return todo, n_todo, replace, n_replaced


def broadcast_weights(spark: SparkSession, source: WeightsSource) -> Any:
    """Ship a weights file's bytes to the workers once (None for seeded weights)."""
    data = source.read_bytes()
    return spark.sparkContext.broadcast(data) if data is not None else None


def featurize_contents(
    contents: DataFrame, spec: FeaturizeSpec, weights_broadcast: Any, accumulators: dict | None = None
) -> DataFrame:
    """Add the UDF's result columns (features or error) to a DataFrame with a ``content`` column: one row per 2D
    image or per selected slice of a volume (``slice_index``), one row per file that failed."""
    from pyspark.sql import functions as F

    from imgfeat.featurize.udf import RESULT_FIELDS, SLICE_FIELDS, featurize_udf

    udf = featurize_udf(spec, weights_broadcast, accumulators)
    with_result = contents.withColumn("_r", udf(F.col("content"))).drop("content")
    keep = [c for c in with_result.columns if c != "_r"]
    per_file = [F.col(f"_r.{f}").alias(f) for f in RESULT_FIELDS if f not in SLICE_FIELDS]
    exploded = with_result.select("*", F.posexplode_outer("_r.features").alias("_pos", "features"))
    per_slice = [F.element_at(F.col(f"_r.{f}"), F.col("_pos") + 1).alias(f) for f in SLICE_FIELDS if f != "features"]
    return exploded.select(*keep, *per_file, "features", *per_slice)


def unread_errors(todo: DataFrame, read: DataFrame, max_file_bytes: int) -> DataFrame:
    """The files of ``todo`` never read (empty, too large, or gone since listing), with error class and message.

    ``read`` holds the paths that were read: pass the persisted featurized rows, never a new scan of the
    folder, so that a file appearing or vanishing meanwhile ends in exactly one table.
    """
    from pyspark.sql import functions as F

    return (
        todo.join(read.select("path"), on="path", how="left_anti")
        .withColumn(
            "error_class",
            F.when(F.col("file_length") == 0, F.lit(EMPTY_FILE))
            .when(F.col("file_length") > max_file_bytes, F.lit(TOO_LARGE))
            .otherwise(F.lit(UNREADABLE)),
        )
        .withColumn(
            "error_message",
            F.when(F.col("error_class") == EMPTY_FILE, F.lit("the file is empty (0 bytes)"))
            .when(
                F.col("error_class") == TOO_LARGE,
                F.concat(
                    F.lit("file is "),
                    F.col("file_length").cast("string"),
                    F.lit(f" bytes, over input.max_file_bytes={max_file_bytes}"),
                ),
            )
            .otherwise(F.lit("the file could not be read (it disappeared or is unreadable since listing)")),
        )
    )


@dataclass
class Featurized:
    """The planned files, featurized: persisted until ``write_rows`` has written and counted them."""

    rows: DataFrame  # one per image or selected slice, and one per file that failed to decode (error_class)
    unread: DataFrame  # the files of the plan never read, with their error class and message
    read_settings: dict[str, str]  # SQL settings that size the read tasks (for the action that computes ``rows``)


def featurize_todo(spark: SparkSession, inp: InputConfig, inference: InferenceConfig, plan: ScanPlan,
                   spec: FeaturizeSpec, weights_broadcast: Any, accumulators: dict | None = None,
                   decoded: Callable[[DataFrame], DataFrame] | None = None) -> Featurized:
    """Read and featurize the plan's files in the read tasks of one scan (``inp``: where and how large;
    ``inference``: how many images per task); ``decoded``: what the job adds to each row once its file is read."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from imgfeat.io.reading import broadcast_if_small, read_contents, read_task_settings

    todo, n_todo = plan.todo, plan.n_todo
    log.info("featurizing %d of %d files with %s", n_todo, plan.n_listed, spec.model_name)
    contents = read_contents(spark, inp, todo, n_todo, plan.n_listed)
    read_settings = read_task_settings(spark, inference, todo, n_todo, plan.n_listed, plan.other_lengths)
    # Per-file attributes ride along with the bytes (a broadcast join), so nothing is shuffled
    # and the UDF's output needs no join afterwards.
    attrs = broadcast_if_small(todo.drop(*FINGERPRINT), n_todo)
    read = contents.select("path", "content", F.col("length").alias("file_length"),
                           F.col("modificationTime").alias("file_modification_time"))
    rows = featurize_contents(read.join(attrs, on="path", how="inner"), spec, weights_broadcast, accumulators)
    # One scan: the rows read and featurized are persisted, and the unread files are todo minus those rows.
    rows = (decoded(rows) if decoded is not None else rows).persist(StorageLevel.MEMORY_AND_DISK)
    unread = unread_errors(todo, rows, inp.max_file_bytes).persist(StorageLevel.MEMORY_AND_DISK)
    return Featurized(rows, unread, read_settings)


def error_rows(featurized: Featurized, keys: list[str], meta: list[Column], extra: list[str] | None = None
               ) -> DataFrame:
    """The errors table's rows: the files that failed to decode and those never read, as ``keys`` (the file's
    columns), ``meta`` (the run's), error class and message, fingerprint, then ``extra`` (null for unread files)."""
    from pyspark.sql import functions as F

    extra = extra or []
    cols = [*keys, "error_class", "error_message", *FINGERPRINT]
    failed = featurized.rows.filter(F.col("error_class").isNotNull()).select(*cols, *extra)
    both = failed.unionByName(featurized.unread.select(*cols), allowMissingColumns=bool(extra))
    return both.select(*keys, *meta, *cols[len(keys):], *extra)


def replace_keys(replace: DataFrame | None, model: str, weights_id: str) -> DataFrame | None:
    """The (path, model, weights_id) rows an append removes first."""
    from pyspark.sql import functions as F

    if replace is None:
        return None
    return replace.select("path", F.lit(model).alias("model"), F.lit(weights_id).alias("weights_id"))


@dataclass(frozen=True)
class Written:
    """What ``write_rows`` wrote: files in the output table and in the errors table, and output rows."""

    ok: int = 0  # files (a volume counts once)
    failed: int = 0
    ok_rows: int = 0  # rows: one per 2D image, one per selected slice of a volume


def write_rows(spark: SparkSession, run: ScanRun, plan: ScanPlan, featurized: Featurized, output_rows: DataFrame,
               errors: DataFrame, words: tuple[str, str] = ("features", "featurized")) -> Written:
    """Append ``output_rows`` and ``errors`` (replacing the plan's changed files' rows), count the files in each and
    check that every processed file ended in exactly one table: processed = ok + failed, else a RuntimeError.
    ``words``: what the output rows are and what happened to their files, for Spark's UI and the error."""
    from pyspark.sql import functions as F

    from imgfeat.session import sql_conf
    from imgfeat.store.tables import append_rows

    tables = run.tables
    keys = replace_keys(plan.replace, run.model, run.weights_id)
    run.describe(spark, f"featurize {plan.n_todo} files, write {words[0]}")
    # Without adaptive execution the write computes the persisted rows and writes them in one pass (with it, Spark
    # first materialises the cache in a job of its own: a second pass, docs/benchmarks.md). The read tasks are
    # sized to finish together.
    with sql_conf(spark, {"spark.sql.adaptive.enabled": "false", **featurized.read_settings}):
        append_rows(spark, output_rows, tables.output, tables.fmt, replace=keys, lease=run.leases[tables.output])
    run.describe(spark, "write errors")
    append_rows(spark, errors, tables.errors, tables.fmt, replace=keys, lease=run.leases[tables.errors])
    run.describe(spark, "counts")
    # Files, not rows: a volume gives one row per selected slice.
    counts = {r["ok"]: (r["files"], r["n"]) for r in featurized.rows.groupBy(F.col("error_class").isNull().alias("ok"))
              .agg(F.countDistinct("path").alias("files"), F.count("*").alias("n")).collect()}
    ok, ok_rows = counts.get(True, (0, 0))
    written = Written(ok, counts.get(False, (0, 0))[0] + featurized.unread.count(), ok_rows)
    featurized.rows.unpersist()
    featurized.unread.unpersist()
    if written.ok + written.failed != plan.n_todo:
        raise RuntimeError(
            f"accounting mismatch: {plan.n_todo} files to process but {written.ok} {words[1]} + {written.failed} "
            "failed; the tables were written, please report this with the input folder's listing"
        )
    return written


def finish_scan(spark: SparkSession, run: ScanRun, plan: ScanPlan) -> None:
    """Release what the run held on the driver and beside the tables: the persisted listing, the plan's scratch."""
    from imgfeat.store.tables import drop_scratch

    run.describe(spark, "clean-up")
    plan.images.unpersist()
    drop_scratch(spark, run.tables.output, run.run_id)
    run.describe(spark, None)
