"""Feature and error tables: Delta Lake where the session has it, Parquet otherwise.

A table location is a path (``/data/features``, ``dbfs:/...``, ``s3://...``) or, for Delta, a
Unity Catalog / metastore name (``catalog.schema.table``).

Several runs may write one table at once (e.g. two backbones): each holds a writer lease on it (``store.lease``).
A Parquet append writes to a staging folder of its own beside the table, then moves its part files (unique names)
in under the table's commit lock; a replace writes its new rows to staging first, then, under the lock, rewrites
the table with them and swaps it in. ``repair`` removes only what runs without a live lease left. Delta commits
through its log (``store.delta_commit``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING

from imgfeat.session import delta_available
from imgfeat.store import delta_commit
from imgfeat.store.lease import TableLease, own_lease
from imgfeat.store.paths import (
    escape_glob,
    is_object_store,
    is_table_name,
    location_in,
    run_folder,
    run_folders,
    scheme_of,
    scratch_table,
    scratch_table_owner,
)
from imgfeat.store.paths import hadoop_fs as _hadoop_fs

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.types import StructType

    from imgfeat.store.lease import RunLeases

log = logging.getLogger(__name__)

KEY_COLUMNS = ["path", "model", "weights_id"]
__all__ = ["KEY_COLUMNS", "StorageError", "append_rows", "check_replace_supported", "drop_scratch", "is_table_name",
           "location_in", "materialize", "read_table", "repair", "resolve_format", "table_exists", "table_locks"]


class StorageError(RuntimeError):
    """A table cannot be written or read in the requested format."""


def resolve_format(spark: SparkSession, requested: str) -> str:
    """auto -> delta when available, else parquet (logged); delta without Delta -> clear error."""
    available = delta_available(spark)
    if requested == "delta" and not available:
        raise StorageError(
            "output.format=delta, but this Spark session has no Delta Lake. Run on Databricks, or start "
            "Spark with Delta (spark-submit --packages io.delta:delta-spark_2.13:4.0.0 --conf "
            "spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension --conf "
            "spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog), "
            "or use --format parquet."
        )
    if requested == "auto":
        chosen = "delta" if available else "parquet"
        if not available:
            log.warning("Delta Lake is not available in this session: writing Parquet (--format auto)")
        return chosen
    return requested


def table_exists(spark: SparkSession, location: str, fmt: str) -> bool:
    if is_table_name(location):
        return bool(spark.catalog.tableExists(location))
    fs, jpath = _hadoop_fs(spark, location)
    if fmt == "delta":
        return bool(fs.exists(jpath.suffix("/_delta_log")))
    if not fs.exists(jpath):
        return False
    return any(not s.getPath().getName().startswith(("_", ".")) for s in fs.listStatus(jpath))


def read_table(spark: SparkSession, location: str, fmt: str) -> DataFrame:
    if is_table_name(location):
        return spark.table(location)
    # Tables written by older versions lack newer columns (e.g. preprocess): read the union of the schemas.
    # Spark's file sources expand globs in the paths they read: escaped, a folder named "out[1]" means itself.
    path = location if fmt == "delta" else escape_glob(location)
    return spark.read.format(fmt).option("mergeSchema", "true").load(path)


def parquet_write_options(schema: StructType) -> dict[str, str]:
    """Parquet writer options for ``schema``: no dictionary encoding for float-array and binary columns.

    Feature vectors (and image bytes) almost never repeat a value, but Parquet first tries a dictionary for every
    column chunk and falls back only once it outgrows its page (1 MiB): for each task's first ~128 feature rows
    the work is done twice. Without the attempt such tables write in about half the time (docs/benchmarks.md).
    """
    from pyspark.sql.types import ArrayType, BinaryType, DoubleType, FloatType

    options = {}
    for f in schema.fields:
        if isinstance(f.dataType, ArrayType) and isinstance(f.dataType.elementType, (FloatType, DoubleType)):
            # Spark's list layout, and the legacy one (spark.sql.parquet.writeLegacyFormat)
            options.update({f"parquet.enable.dictionary#{f.name}.list.element": "false",
                            f"parquet.enable.dictionary#{f.name}.bag.array": "false"})
        elif isinstance(f.dataType, BinaryType):
            options[f"parquet.enable.dictionary#{f.name}"] = "false"
    return options


def _writer(df: DataFrame, fmt: str, mode: str):
    writer = df.write.format(fmt).mode(mode)
    if fmt == "parquet":
        writer = writer.options(**parquet_write_options(df.schema))
    return writer


def _needs_lock(location: str, fmt: str) -> bool:
    """Only Parquet folders: Delta commits through its log, and a Parquet table name has one writer at a time."""
    return fmt == "parquet" and not is_table_name(location)


@contextmanager
def table_locks(spark: SparkSession, locations: list[str], fmt: str, leases: RunLeases | None) -> Iterator[None]:
    """Hold the commit locks of ``locations`` (in a fixed order, so runs never wait on each other in a circle),
    e.g. while reading tables that another run might swap meanwhile. Nothing to hold without leases or for Delta."""
    with ExitStack() as stack:
        held = [leases[loc] for loc in dict.fromkeys(locations) if leases is not None and _needs_lock(loc, fmt)]
        for lease in sorted(held, key=lambda item: item.folder):
            stack.enter_context(lease.lock())
        yield


def check_replace_supported(spark: SparkSession | None, location: str, fmt: str) -> None:
    """Refuse to replace rows of a Parquet table on an object store, where the swap (two folder renames) would be
    copies and deletes: a job killed in the middle could leave no complete table."""
    if fmt == "parquet" and not is_table_name(location) and is_object_store(spark, location):
        raise StorageError(
            f"{location} is a Parquet table on an object store ({scheme_of(spark, location)}:), where renaming a folder "
            "copies it: this run would replace rows (changed files, or --mode overwrite) by rewriting the table and "
            "swapping it in, and a job killed mid-swap could lose the table. Write Delta (--format delta), or "
            "recompute everything into a new --output with --mode overwrite. Appending new files stays possible.")


def append_rows(
    spark: SparkSession, df: DataFrame, location: str, fmt: str, replace: DataFrame | None = None,
    lease: TableLease | None = None,
) -> None:
    """Append ``df``; first remove the rows whose (path, model, weights_id) are in ``replace``.

    ``lease``: the writing run's lease on ``location`` (a short-lived one is taken without it). Delta: one commit
    (``store.delta_commit``; a replace needs ``df``'s ``run_id`` column to be the lease's run id). Parquet: ``df``
    is written to a staging folder of this run (computing it, outside any lock), then, under the commit lock,
    its files are moved into the table, or, to replace rows, the table is rewritten to another staging folder
    with them and swapped in, so readers never see a half-written table and no other run's rows are lost.
    """
    if replace is not None:
        check_replace_supported(spark, location, fmt)
    if fmt == "delta":
        exists = table_exists(spark, location, fmt)
        delta_commit.write(df, location, lambda rows, mode: _writer(rows, fmt, mode), is_table_name(location),
                           replace if exists else None, lease.run_id if lease is not None else None)
        return
    if is_table_name(location):
        if replace is not None and table_exists(spark, location, fmt):
            raise StorageError(f"{location!r} is a table name: replacing rows needs Delta (use a path for Parquet)")
        _writer(df, fmt, "append").saveAsTable(location)
        return
    with own_lease(spark, location, lease) as own:
        staged = run_folder(location, "staging", own.run_id, uuid.uuid4().hex[:8])
        try:
            _writer(df, fmt, "overwrite").save(staged)
            with own.lock():
                own.check_held()  # a run presumed dead must not commit: its staging may be gone
                if replace is None or not table_exists(spark, location, fmt):
                    _move_parts(spark, staged, location)
                else:
                    _rewrite(spark, staged, location, replace, own.run_id)
        finally:
            _delete(spark, staged)


def _delete(spark: SparkSession, location: str) -> None:
    fs, path = _hadoop_fs(spark, location)
    fs.delete(path, True)


def _move_parts(spark: SparkSession, staged: str, location: str) -> None:
    """Move the data files of ``staged`` into the table (created if needed). Spark's part-file names hold the
    write job's UUID, so they never collide with the table's; a run that dies midway leaves some of its files in
    the table (those files' images are done) and the others in its staging folder (``repair`` removes it)."""
    fs, target = _hadoop_fs(spark, location)
    _, source = _hadoop_fs(spark, staged)
    jvm = spark.sparkContext._jvm  # type: ignore[union-attr]
    files = [s.getPath() for s in fs.listStatus(source) if not s.getPath().getName().startswith(("_", "."))]
    fs.mkdirs(target)
    for moved, path in enumerate(files):
        destination = jvm.org.apache.hadoop.fs.Path(target, path.getName())
        if fs.exists(destination) or not fs.rename(path, destination):
            raise StorageError(
                f"could not move {path.getName()} into {location} ({moved} of {len(files)} files moved): the images "
                "of the files not moved are not in the table, and the next run processes them again")


def _rewrite(spark: SparkSession, staged: str, location: str, replace: DataFrame, run_id: str) -> None:
    """The table without ``replace``'s keys, plus the staged rows, written to staging and swapped in."""
    kept = read_table(spark, location, "parquet").join(replace.select(*KEY_COLUMNS), on=KEY_COLUMNS, how="left_anti")
    merged = kept.unionByName(spark.read.parquet(escape_glob(staged)), allowMissingColumns=True)
    rewritten = run_folder(location, "staging", run_id, "rewrite-" + uuid.uuid4().hex[:8])
    try:
        _writer(merged, "parquet", "overwrite").save(rewritten)
        _swap(spark, rewritten, location, run_id)
    finally:
        _delete(spark, rewritten)  # gone after a swap; a failed rewrite's leftovers


def _swap(spark: SparkSession, staging: str, location: str, run_id: str | None = None) -> None:
    """Move ``staging`` into place of ``location``; the old table is kept until the new one is in.

    Two folder renames: atomic on HDFS and local disks, which is why object stores are refused before this."""
    fs, target = _hadoop_fs(spark, location)
    _, new = _hadoop_fs(spark, staging)
    _, old = _hadoop_fs(spark, run_folder(location, "old", run_id or uuid.uuid4().hex[:12], uuid.uuid4().hex[:8]))
    if not fs.rename(target, old):
        raise StorageError(f"could not move {location} aside to replace it; the table is unchanged")
    if not fs.rename(new, target):
        fs.rename(old, target)
        raise StorageError(f"could not move the new table into {location}; the previous table was restored")
    fs.delete(old, True)


def repair(spark: SparkSession, location: str, fmt: str, lease: TableLease | None = None) -> None:
    """Undo what killed writers left beside ``location``, before reading or writing it; never what a live run
    (one with a live lease, ``lease``'s own run included) is using.

    - killed inside ``_swap`` with the table moved aside: the previous table is moved back;
    - a dead run's staging and scratch folders, and a finished swap's old copy: deleted;
    - a table name's scratch tables of dead runs: dropped;
    - ``<table>/_temporary`` (what a killed Spark write into the table itself leaves, e.g. by an older version):
      deleted when no other run holds a lease, because the next such write's job commit would otherwise merge its
      committed task files into the table (Hadoop's FileOutputCommitter), duplicating rows;
    - expired leases: deleted.
    On an object store an old copy is never moved or deleted (a folder rename there is a copy: neither copy may be
    complete); it is named in a warning instead.
    """
    with own_lease(spark, location, lease) as own:
        if is_table_name(location):
            _drop_dead_scratch_tables(spark, location, own.live_runs())
        else:
            with table_locks(spark, [location], fmt, {location: own}):  # type: ignore[arg-type]
                _repair_path(spark, location, fmt, own)
        own.remove_dead()


def _repair_path(spark: SparkSession, location: str, fmt: str, own: TableLease) -> None:
    fs, target = _hadoop_fs(spark, location)
    live = own.live_runs()
    dead = [f for f in run_folders(spark, location) if f.owner not in live]
    olds = sorted((f for f in dead if f.kind == "old"), key=lambda f: f.mtime)
    if olds and is_object_store(spark, location):
        log.warning("%s was left beside %s by a replace interrupted on an object store; check which of it and the "
                    "table is complete and put that one in place by hand (nothing was removed)", olds[-1].path, location)
        dead = []
    elif olds and not fs.exists(target):
        log.warning("restoring %s: a previous run was killed while replacing it", location)
        if not fs.rename(olds[-1].path, target):
            raise StorageError(f"could not restore the previous table {olds[-1].path} to {location}")
        dead.remove(olds[-1])
    for folder in dead:
        log.warning("removing %s, left by a run that is no longer running (%s)", folder.path, folder.owner)
        fs.delete(folder.path, True)
    temporary = target.suffix("/_temporary")
    if fmt == "parquet" and fs.exists(temporary):
        if live - {own.run_id}:
            log.info("leaving %s/_temporary: runs %s are writing the table", location, sorted(live - {own.run_id}))
        else:
            log.warning("removing %s/_temporary, the uncommitted output of a killed run", location)
            fs.delete(temporary, True)


def _drop_dead_scratch_tables(spark: SparkSession, location: str, live: set[str]) -> None:
    schema = location.rsplit(".", 1)[0]
    try:
        tables = [t.name for t in spark.catalog.listTables(schema)]
    except Exception as exc:  # the schema may not exist yet
        log.debug("cannot list the tables of %s: %s", schema, str(exc)[:200])
        return
    for name in tables:
        owner = scratch_table_owner(location, name)
        if owner is not None and owner not in live:
            log.warning("dropping %s.%s, left by a run that is no longer running", schema, name)
            spark.sql(f"DROP TABLE IF EXISTS {schema}.{name}")


def materialize(spark: SparkSession, df: DataFrame, location: str, run_id: str, tag: str = "todo") -> DataFrame:
    """Freeze ``df`` so later plans never re-read what it was computed from (e.g. tables about to be replaced).

    Written beside ``location`` (a scratch folder, or for a table name a scratch table in its schema), named with
    ``run_id`` so that ``repair`` removes it only once that run is gone (``drop_scratch`` removes it at the end of
    the run). Unlike ``localCheckpoint``, it survives the loss of executors.
    """
    if is_table_name(location):
        name = scratch_table(location, run_id, tag)
        df.write.mode("overwrite").saveAsTable(name)
        return spark.table(name)
    scratch = run_folder(location, "scratch", run_id, tag)
    df.write.mode("overwrite").parquet(scratch)
    return spark.read.parquet(escape_glob(scratch))


def drop_scratch(spark: SparkSession, location: str, run_id: str, tag: str = "todo") -> None:
    if is_table_name(location):
        spark.sql(f"DROP TABLE IF EXISTS {scratch_table(location, run_id, tag)}")
    else:
        _delete(spark, run_folder(location, "scratch", run_id, tag))
