"""The one place that builds (or adopts) the SparkSession."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from imgfeat.config import Config

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"


def get_spark(cfg: Config) -> SparkSession:
    """Return the running session (spark-submit, Databricks, notebook) or build a local one."""
    from pyspark import SparkConf
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        _set_runtime_conf(active, cfg)
        return active

    if "PYSPARK_GATEWAY_PORT" in os.environ:
        # Started by spark-submit: attach to its JVM first, or SparkConf() is empty and --master is ignored.
        from pyspark import SparkContext

        SparkContext._ensure_initialized()
    submitted = SparkConf()  # holds what spark-submit passed, if anything
    builder = SparkSession.builder.appName(cfg.spark.app_name)
    if not submitted.contains("spark.master"):
        builder = builder.master(cfg.spark.master or "local[*]")
        builder = builder.config("spark.driver.memory", cfg.spark.driver_memory)
    master = submitted.get("spark.master", None) or cfg.spark.master or "local[*]"
    local = master.startswith("local")
    under_submit = "PYSPARK_GATEWAY_PORT" in os.environ
    # Spark's web UI binds every interface unless SPARK_LOCAL_IP is set in the JVM's environment. Our own JVM
    # (python / imgfeat / notebooks) starts below and inherits it; spark-submit's JVM started before this code
    # ran, and the Python driver inherited its environment, so its absence here means the UI would listen on *.
    ui_exposed = local and under_submit and not os.environ.get("SPARK_LOCAL_IP")
    if local:
        # A local session serves 127.0.0.1 only, unless SPARK_LOCAL_IP says otherwise.
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    if not submitted.contains("spark.pyspark.python") and not os.environ.get("PYSPARK_PYTHON"):
        # Workers must run the interpreter that has TensorFlow and imgfeat, not whatever python3 is on PATH.
        os.environ["PYSPARK_PYTHON"] = sys.executable
    settings = {
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        **arrow_batch_settings(cfg),
        "spark.python.worker.reuse": "true",
        "spark.ui.showConsoleProgress": "true",
        "spark.sql.adaptive.enabled": "true",
    }
    if local:  # on a cluster, executors must reach the driver: keep the cluster's own network settings
        settings["spark.driver.host"] = settings["spark.driver.bindAddress"] = os.environ["SPARK_LOCAL_IP"]
    if local:
        # Small local jobs: a few shuffle partitions, not 200; and many small image files per read task
        # (Spark counts every file as at least openCostInBytes, 4 MB by default, when packing tasks).
        settings["spark.sql.shuffle.partitions"] = str(max(4, 2 * (os.cpu_count() or 1)))
        settings["spark.sql.files.openCostInBytes"] = str(1024 * 1024)
    if local and not under_submit:
        # The JVM this process starts: client JIT only (C1). A local job's JVM does plumbing (planning, file reads,
        # Arrow, Parquet), where the server compiler's compile time costs more than its faster code returns:
        # measured on 2 cores, ResNet50 on 2,000 images, JVM CPU 43-49 -> 26-28 s and the job 5 s shorter
        # (docs/benchmarks.md). A spark.conf of spark.driver.extraJavaOptions replaces it.
        # Spark's classes from a class-data archive when `make setup` built one (imgfeat.jvm_archive): the session
        # 5.2-8.1 -> 2.9-3.6 s, its first job 2.2-3.2 -> 1.0-1.2 s.
        from imgfeat.jvm_archive import java_options

        settings["spark.driver.extraJavaOptions"] = f"-XX:TieredStopAtLevel=1 {java_options()}".strip()
    packages = ",".join([submitted.get("spark.jars.packages", ""), cfg.spark.conf.get("spark.jars.packages", "")])
    if "delta" in packages.lower() or os.environ.get("IMGFEAT_DELTA") == "1":
        settings["spark.sql.extensions"] = DELTA_EXTENSION
        settings["spark.sql.catalog.spark_catalog"] = DELTA_CATALOG
    if ui_exposed and "spark.ui.enabled" not in cfg.spark.conf and not submitted.contains("spark.ui.enabled"):
        # The driver's RPC and block manager still bind 127.0.0.1 (settings above); only the UI cannot.
        settings["spark.ui.enabled"] = "false"
        log.warning(
            "local spark-submit without SPARK_LOCAL_IP: Spark's web UI would listen on every network interface, so it "
            "is off. For the UI on 127.0.0.1 only, run: SPARK_LOCAL_IP=127.0.0.1 spark-submit ..."
        )
    for key, value in {**settings, **cfg.spark.conf}.items():
        if not submitted.contains(key) or key in cfg.spark.conf:
            builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("IMGFEAT_SPARK_LOG_LEVEL", "WARN"))
    _warn_unbounded_arrow_bytes(spark, cfg)
    return spark


def arrow_batch_settings(cfg: Config) -> dict[str, str]:
    """The Arrow batches handed to the UDFs: at most ``inference.arrow_batch_rows`` rows, and (Spark 4+) closed
    once they reach ``inference.arrow_batch_bytes``, so a batch holds at most that plus one file (measured:
    1 MB rows under a 3.5 MB bound came in batches of 4, pyspark 4.0.1)."""
    return {"spark.sql.execution.arrow.maxRecordsPerBatch": str(cfg.inference.arrow_batch_rows),
            "spark.sql.execution.arrow.maxBytesPerBatch": str(cfg.inference.arrow_batch_bytes)}


def _warn_unbounded_arrow_bytes(spark: SparkSession, cfg: Config) -> None:
    """Spark before 4.0 has no byte bound: a batch may hold arrow_batch_rows files of input.max_file_bytes."""
    worst = cfg.inference.arrow_batch_rows * cfg.input.max_file_bytes
    major = spark.version.split(".")[0]
    if major.isdigit() and int(major) < 4 and worst > cfg.inference.arrow_batch_bytes:
        log.warning("Spark %s bounds Arrow batches by rows only: up to %d files of up to %d bytes (%.1f GiB) per batch; "
                    "lower inference.arrow_batch_rows or input.max_file_bytes if workers run out of memory",
                    spark.version, cfg.inference.arrow_batch_rows, cfg.input.max_file_bytes, worst / 2**30)


def _set_runtime_conf(spark: SparkSession, cfg: Config) -> None:
    try:
        for key, value in arrow_batch_settings(cfg).items():
            spark.conf.set(key, value)
        spark.conf.set("spark.sql.execution.arrow.pyspark.enabled", "true")
    except Exception as exc:  # some managed sessions forbid setting confs
        log.warning("could not set Arrow batch size on the running session: %s", exc)
    _warn_unbounded_arrow_bytes(spark, cfg)


@contextmanager
def sql_conf(spark: SparkSession, settings: dict[str, str]) -> Iterator[None]:
    """Runtime SQL settings for the queries run inside the block, restored afterwards. A session that refuses a
    setting (some managed ones do) keeps its own: these are optimisations, never needed for correct results."""
    previous: dict[str, str | None] = {}
    for key, value in settings.items():
        try:
            previous[key] = spark.conf.get(key, None)
            spark.conf.set(key, value)
        except Exception as exc:
            log.debug("could not set %s (%s); keeping the session's value", key, str(exc)[:120])
    try:
        yield
    finally:
        for key, value in previous.items():
            try:
                if value is None:
                    spark.conf.unset(key)
                else:
                    spark.conf.set(key, value)
            except Exception:
                pass


def task_slots(spark: SparkSession) -> int:
    """How many tasks run at once on one machine (local[N]: N; cluster: executor cores / task cpus)."""
    master = spark.sparkContext.master or ""
    match = re.match(r"local\[(\*|\d+)(?:,\s*\d+)?\]", master)
    if master == "local":
        return 1
    if match:
        return (os.cpu_count() or 1) if match.group(1) == "*" else int(match.group(1))
    conf = spark.sparkContext.getConf()
    cores = int(conf.get("spark.executor.cores", str(os.cpu_count() or 1)))
    per_task = float(conf.get("spark.task.cpus", "1"))
    return max(1, int(cores // per_task))


def tf_threads_for(spark: SparkSession, requested: int = 0) -> int:
    """TensorFlow intra-op threads per Python worker so that concurrent tasks don't oversubscribe."""
    if requested:
        return requested
    master = spark.sparkContext.master or ""
    if master.startswith("local"):
        cores = os.cpu_count() or 1
    else:
        cores = int(spark.sparkContext.getConf().get("spark.executor.cores", str(os.cpu_count() or 1)))
    return max(1, cores // task_slots(spark))


def delta_available(spark: SparkSession) -> bool:
    """True when this session can read and write Delta tables."""
    try:
        if spark.conf.get("spark.databricks.clusterUsageTags.clusterId", None):
            return True
    except Exception:
        pass
    try:
        spark.sparkContext._jvm.java.lang.Class.forName("io.delta.tables.DeltaTable")  # type: ignore[union-attr]
    except Exception:
        return False
    extensions = spark.conf.get("spark.sql.extensions", "") or ""
    return DELTA_EXTENSION in extensions
