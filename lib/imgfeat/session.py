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
    from pyspark import SparkConf
    from pyspark.sql import SparkSession

    from imgfeat.config.schema import InferenceConfig

log = logging.getLogger(__name__)

DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"


def get_spark(cfg: Config) -> SparkSession:
    """Return the running session (spark-submit, Databricks, notebook) or build a local one."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        _set_runtime_conf(active, cfg)
        return active
    submitted = _submitted_conf()
    local = (submitted.get("spark.master", None) or cfg.spark.master or "local[*]").startswith("local")
    under_submit = "PYSPARK_GATEWAY_PORT" in os.environ
    # Spark's web UI binds every interface unless SPARK_LOCAL_IP is set in the JVM's environment. Our own JVM
    # (python / imgfeat / notebooks) starts below and inherits it; spark-submit's JVM started before this code
    # ran, and the Python driver inherited its environment, so its absence here means the UI would listen on *.
    ui_exposed = local and under_submit and not os.environ.get("SPARK_LOCAL_IP")
    _prepare_environment(local, submitted)
    settings = {**_session_settings(cfg), **(_local_settings(under_submit) if local else {}),
                **_delta_settings(submitted, cfg.spark.conf)}
    if ui_exposed and "spark.ui.enabled" not in cfg.spark.conf and not submitted.contains("spark.ui.enabled"):
        # The driver's RPC and block manager still bind 127.0.0.1 (settings above); only the UI cannot.
        settings["spark.ui.enabled"] = "false"
        log.warning(
            "local spark-submit without SPARK_LOCAL_IP: Spark's web UI would listen on every network interface, so it "
            "is off. For the UI on 127.0.0.1 only, run: SPARK_LOCAL_IP=127.0.0.1 spark-submit ..."
        )
    spark = _builder(cfg, submitted, settings).getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("IMGFEAT_SPARK_LOG_LEVEL", "WARN"))
    _warn_unbounded_arrow_bytes(spark, cfg.inference, cfg.input.max_file_bytes)
    return spark


def _submitted_conf() -> SparkConf:
    """What spark-submit passed, if anything (an empty SparkConf otherwise)."""
    from pyspark import SparkConf

    if "PYSPARK_GATEWAY_PORT" in os.environ:
        # Started by spark-submit: attach to its JVM first, or SparkConf() is empty and --master is ignored.
        from pyspark import SparkContext

        SparkContext._ensure_initialized()
    return SparkConf()


def _prepare_environment(local: bool, submitted: SparkConf) -> None:
    """The environment the session's JVM and Python workers inherit."""
    if local:
        # A local session serves 127.0.0.1 only, unless SPARK_LOCAL_IP says otherwise.
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    if not submitted.contains("spark.pyspark.python") and not os.environ.get("PYSPARK_PYTHON"):
        # Workers must run the interpreter that has TensorFlow and imgfeat, not whatever python3 is on PATH.
        os.environ["PYSPARK_PYTHON"] = sys.executable


def _session_settings(cfg: Config) -> dict[str, str]:
    """What every session imgfeat builds sets: Arrow (batches bounded), reused Python workers, adaptive SQL."""
    return {
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        **arrow_batch_settings(cfg.inference),
        "spark.python.worker.reuse": "true",
        "spark.ui.showConsoleProgress": "true",
        "spark.sql.adaptive.enabled": "true",
    }


def _local_settings(under_submit: bool) -> dict[str, str]:
    """A local session's: 127.0.0.1, few shuffle partitions, small files packed per read task, a lean JVM."""
    host = os.environ["SPARK_LOCAL_IP"]
    # On a cluster, executors must reach the driver: only a local session pins the driver to this address.
    # Small local jobs: a few shuffle partitions, not 200; and many small image files per read task
    # (Spark counts every file as at least openCostInBytes, 4 MB by default, when packing tasks).
    settings = {"spark.driver.host": host, "spark.driver.bindAddress": host,
                "spark.sql.shuffle.partitions": str(max(4, 2 * (os.cpu_count() or 1))),
                "spark.sql.files.openCostInBytes": str(1024 * 1024)}
    if not under_submit:
        # The JVM this process starts: client JIT only (C1), which plumbing work repays better than the server
        # compiler; Spark's classes from a class-data archive when `make setup` built one (imgfeat.jvm_archive).
        # Measured: docs/benchmarks.md ("Why the code is as it is"). A spark.conf of
        # spark.driver.extraJavaOptions replaces it.
        from imgfeat.jvm_archive import java_options

        settings["spark.driver.extraJavaOptions"] = f"-XX:TieredStopAtLevel=1 {java_options()}".strip()
    return settings


def _delta_settings(submitted: SparkConf, conf: dict[str, str]) -> dict[str, str]:
    """Delta Lake's extension and catalog, when its package is on the session (or IMGFEAT_DELTA=1)."""
    packages = ",".join([submitted.get("spark.jars.packages", ""), conf.get("spark.jars.packages", "")])
    if "delta" in packages.lower() or os.environ.get("IMGFEAT_DELTA") == "1":
        return {"spark.sql.extensions": DELTA_EXTENSION, "spark.sql.catalog.spark_catalog": DELTA_CATALOG}
    return {}


def _builder(cfg: Config, submitted: SparkConf, settings: dict[str, str]) -> SparkSession.Builder:
    """The session builder: spark-submit's settings win over imgfeat's own, ``spark.conf`` over both."""
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(cfg.spark.app_name)
    if not submitted.contains("spark.master"):
        builder = builder.master(cfg.spark.master or "local[*]")
        builder = builder.config("spark.driver.memory", cfg.spark.driver_memory)
    for key, value in {**settings, **cfg.spark.conf}.items():
        if not submitted.contains(key) or key in cfg.spark.conf:
            builder = builder.config(key, value)
    return builder


def arrow_batch_settings(inference: InferenceConfig) -> dict[str, str]:
    """The Arrow batches handed to the UDFs: at most ``inference.arrow_batch_rows`` rows, and (Spark 4+) closed
    once they reach ``inference.arrow_batch_bytes``, so a batch holds at most that plus one file (measured:
    docs/benchmarks.md)."""
    return {"spark.sql.execution.arrow.maxRecordsPerBatch": str(inference.arrow_batch_rows),
            "spark.sql.execution.arrow.maxBytesPerBatch": str(inference.arrow_batch_bytes)}


def _warn_unbounded_arrow_bytes(spark: SparkSession, inference: InferenceConfig, max_file_bytes: int) -> None:
    """Spark before 4.0 has no byte bound: a batch may hold arrow_batch_rows files of input.max_file_bytes."""
    worst = inference.arrow_batch_rows * max_file_bytes
    major = spark.version.split(".")[0]
    if major.isdigit() and int(major) < 4 and worst > inference.arrow_batch_bytes:
        log.warning("Spark %s bounds Arrow batches by rows only: up to %d files of up to %d bytes (%.1f GiB) per batch; "
                    "lower inference.arrow_batch_rows or input.max_file_bytes if workers run out of memory",
                    spark.version, inference.arrow_batch_rows, max_file_bytes, worst / 2**30)


def _set_runtime_conf(spark: SparkSession, cfg: Config) -> None:
    try:
        for key, value in arrow_batch_settings(cfg.inference).items():
            spark.conf.set(key, value)
        spark.conf.set("spark.sql.execution.arrow.pyspark.enabled", "true")
    except Exception as exc:  # some managed sessions forbid setting confs
        log.warning("could not set Arrow batch size on the running session: %s", exc)
    _warn_unbounded_arrow_bytes(spark, cfg.inference, cfg.input.max_file_bytes)


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


def threads_for(spark: SparkSession, requested: int = 0) -> int:
    """Framework (TensorFlow / PyTorch) threads per Python worker, so that concurrent tasks don't oversubscribe
    the cores: ``requested`` (inference.threads) when set, else cores / task slots."""
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
