"""The extract job: image folder -> features table + errors table, incrementally."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from imgfeat.backbones.registry import engine_for, get_backbone
from imgfeat.backbones.weights import WeightsSource
from imgfeat.config import Config
from imgfeat.io.decoders import EMPTY_FILE, TOO_LARGE, UNREADABLE, DecodeOptions

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from imgfeat.backbones.registry import Backbone
    from imgfeat.featurize.udf import FeaturizeSpec
    from imgfeat.store.lease import RunLeases

log = logging.getLogger(__name__)

FINGERPRINT = ["file_length", "file_modification_time"]
# DICOM / NIfTI metadata columns (null for photographic formats); no patient identifier, only patient_key.
METADATA = ["modality", "study_key", "series_key", "body_part", "view_position", "pixel_spacing", "rows", "columns",
            "bits_stored", "photometric", "patient_key"]


@dataclass
class ExtractResult:
    listed: int  # image files found under the input folder
    ignored_other_files: int  # files with other extensions (not images)
    already_done: int  # skipped: already in the features or errors table with the same fingerprint
    processed: int  # files handled by this run (= featurized + failed)
    featurized: int  # files (a volume counts once; see feature_rows)
    failed: int
    replaced: int  # changed files whose old rows were replaced
    features_path: str
    errors_path: str
    format: str
    model: str
    weights_id: str
    seconds: float
    # Wall seconds of listing/planning and of featurize+write; task-seconds summed over workers
    # spent decoding, in inference and building models.
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # Listed images without a label (kept, with a null label: train leaves them out), and label-manifest rows
    # that match no listed image (a typo, or files not there).
    unlabelled: int = 0
    manifest_unmatched: int = 0
    ungrouped: int = 0  # grouped split: images whose group was not found (each is its own group)
    feature_rows: int = 0  # rows written to the features table: one per 2D image, one per selected slice

    def summary(self) -> str:
        warnings = ""
        if self.unlabelled:
            warnings += f"\n[imgfeat]   warning: {self.unlabelled} listed images have no label (train will leave them out)"
        if self.ungrouped:
            warnings += (f"\n[imgfeat]   warning: {self.ungrouped} images match no group (input.split.group_pattern); "
                         "each is its own group")
        if self.manifest_unmatched:
            warnings += (f"\n[imgfeat]   warning: {self.manifest_unmatched} rows of the label manifest match no listed "
                         "image (check their paths against --input)")
        return (
            f"[imgfeat] extract {self.model} ({self.weights_id[:40]}): listed {self.listed} image files "
            f"({self.ignored_other_files} other files ignored); {self.already_done} already done; "
            f"processed {self.processed} = featurized {self.featurized} + failed {self.failed}"
            f"{f' ({self.feature_rows} feature rows: volumes give one per slice)' if self.feature_rows > self.featurized else ''}"
            f"{f' ({self.replaced} changed files replaced)' if self.replaced else ''} in {self.seconds:.1f}s\n"
            f"[imgfeat]   features ({self.format}): {self.features_path}\n"
            f"[imgfeat]   errors   ({self.format}): {self.errors_path}"
            f"{warnings}"
        )

    def to_dict(self) -> dict:
        return asdict(self)


def decode_options(cfg: Config, size: int | None = None) -> DecodeOptions:
    p = cfg.preprocess
    return DecodeOptions(
        size=size or p.image_size or get_backbone(cfg.model.name).input_size,
        resize_mode=p.resize_mode,
        resample=p.resample,
        high_bit_depth=p.high_bit_depth,
        max_pixels=p.max_pixels,
        jpeg_draft=p.jpeg_draft,
        formats=tuple(f.upper() for f in p.formats),
        dicom_window=p.dicom.window,
        volume=p.volume,
        decode_timeout_s=p.decode_timeout_s,
    )


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


def torch_only_settings(engine: str, cfg: Config) -> tuple[str, bool]:
    """(jpeg_decoder, compile) as they apply to a backbone on ``engine``: both are the torch engine's; a Keras
    backbone in the same job decodes with Pillow and runs uncompiled (said once in the log, not refused, so that
    one job can extract torch and Keras backbones with the same settings)."""
    decoder, compiled = cfg.inference.jpeg_decoder, cfg.inference.compile
    if engine != "torch" and (decoder != "pillow" or compiled):
        log.info("%s runs on the %s engine: inference.jpeg_decoder=%s and inference.compile=%s apply to torch "
                 "backbones only; this one decodes with Pillow, uncompiled", cfg.model.name, engine, decoder, compiled)
        return "pillow", False
    return decoder, compiled


def featurize_spec(spark: SparkSession, cfg: Config, source: WeightsSource) -> FeaturizeSpec:
    from imgfeat.featurize.udf import FeaturizeSpec
    from imgfeat.io.groups import id_salt
    from imgfeat.session import tf_threads_for

    backbone = get_backbone(cfg.model.name)
    decoder, compiled = torch_only_settings(backbone.engine, cfg)
    return FeaturizeSpec(
        backbone=backbone,
        weights=source,
        decode=decode_options(cfg),
        batch_size=cfg.inference.batch_size,
        tf_threads=tf_threads_for(spark, cfg.inference.tf_threads),
        device=cfg.inference.device,
        precision=cfg.inference.precision,
        decode_threads=cfg.inference.decode_threads,
        prefetch=cfg.inference.prefetch,
        compile=compiled,
        jpeg_decoder=decoder,
        float16_column=cfg.output.float16_column,
        secret=id_salt(cfg.privacy.id_salt),
        label_tag=cfg.input.label.dicom_tag if cfg.input.label.effective_mode == "dicom_tag" else None,
    )


def _start_warmup(spark: SparkSession, spec: FeaturizeSpec, broadcast: Any) -> threading.Thread:
    """Build the model in every Python worker while the driver lists files (a background job).

    Python workers are reused between tasks, so the featurizing tasks later find the model built.
    The warm-up takes every task slot, so the listing jobs queue behind it; measured on 300 images
    (ResNet50, local[2]): warming both workers 55.5 s end to end, one worker 64.7 s, none 71.7 s.
    """
    from imgfeat.featurize.udf import warmup_workers
    from imgfeat.session import task_slots

    def run() -> None:
        try:
            warmup_workers(spark, spec, broadcast, task_slots(spark))
        except Exception as exc:  # only an optimisation: the real tasks build the model anyway
            log.warning("worker warm-up failed (%s); continuing", str(exc)[:200])

    thread = threading.Thread(target=run, name="imgfeat-warmup", daemon=True)
    thread.start()
    return thread


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


def run_leases(spark: SparkSession, cfg: Config, fmt: str, run_id: str, model: str, weights_id: str,
               job: str) -> RunLeases:
    """The run's writer leases on the output and errors tables (enter to take them: refused while another live run
    writes the same model and weights there); released when the run ends, however it ends."""
    from imgfeat.store.lease import Owner, open_leases

    return open_leases(spark, [cfg.output.path or "", cfg.errors_path or ""], fmt,
                       Owner(run_id, model, weights_id, job=job), cfg.output.lease_timeout_s, cfg.output.lease_dir)


def existing_keys(spark: SparkSession, cfg: Config, fmt: str, weights_id: str, model: str | None = None,
                  leases: RunLeases | None = None) -> DataFrame | None:
    """(path, model, weights_id, fingerprint) already in the output or errors table for ``model`` (default model.name).

    Each table is repaired first (``leases``: this run's, so that its own folders count as live)."""
    from pyspark.sql import functions as F

    from imgfeat.store.tables import read_table, repair, table_exists

    frames = []
    for location in (cfg.output.path, cfg.errors_path):
        repair(spark, location, fmt, leases.get(location) if leases is not None else None)
        if table_exists(spark, location, fmt):
            frames.append(read_table(spark, location, fmt).select("path", "model", "weights_id", *FINGERPRINT))
    if not frames:
        return None
    keys = frames[0] if len(frames) == 1 else frames[0].unionByName(frames[1])
    model = model or cfg.model.name
    return keys.filter((F.col("model") == model) & (F.col("weights_id") == weights_id)).dropDuplicates(
        ["path", *FINGERPRINT]
    )


def with_decoded_attributes(rows: DataFrame, cfg: Config) -> DataFrame:
    """What is only known once a file is read: dicom_tag labels, and patient_key groups (and their hash split)."""
    from pyspark.sql import functions as F

    from imgfeat.io.listing import hash_split

    if cfg.input.label.effective_mode == "dicom_tag":
        rows = rows.withColumn("label", F.coalesce(F.col("label"), F.col("label_value")))
    if cfg.input.split.group == "patient_key":
        rows = rows.withColumn("group_id", F.col("patient_key"))
        if cfg.input.split.mode == "hash":
            rows = rows.withColumn("split", hash_split(cfg))
    return rows


def check_recorded_settings(spark: SparkSession, cfg: Config, fmt: str, model: str, weights_id: str, wanted: str) -> None:
    """Refuse to add rows made with other preprocessing to a table that already holds ``model`` with ``weights_id``."""
    from pyspark.sql import functions as F

    from imgfeat.featurize.settings import COLUMN, SettingsError, describe_difference
    from imgfeat.store.tables import read_table, table_exists

    if cfg.output.mode == "overwrite":
        return  # every row of this backbone and weights is recomputed
    for location in (cfg.output.path, cfg.errors_path):
        if not table_exists(spark, location, fmt):
            continue
        table = read_table(spark, location, fmt)
        if COLUMN not in table.columns:
            continue  # written before settings were recorded
        recorded = [
            r[COLUMN] for r in table.filter((F.col("model") == model) & (F.col("weights_id") == weights_id)
                                            & F.col(COLUMN).isNotNull()).select(COLUMN).distinct().limit(5).collect()
        ]
        other = [r for r in recorded if r != wanted]
        if other:
            raise SettingsError(
                f"{location} already holds {model} features (weights {weights_id[:40]}) made with other preprocessing "
                f"({describe_difference(other[0], wanted)}); mixing them would give the model differently prepared "
                "inputs. Extract into another --output, or pass --mode overwrite to recompute them all with these settings."
            )


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


def plan_work(
    spark: SparkSession, images: DataFrame, existing: DataFrame | None, mode: str, output: str, run_id: str,
    n_images: int | None = None,
) -> tuple[DataFrame, int, DataFrame | None, int]:
    """(todo, its count, paths whose old rows must be replaced, their count) for incremental/overwrite runs.

    When it depends on the existing tables (an incremental re-run), ``todo`` is materialised to run
    ``run_id``'s scratch folder beside ``output`` (dropped with ``store.tables.drop_scratch`` at the end of
    the run) so that the plan never reads the tables about to be rewritten and survives the loss of an
    executor. Otherwise ``todo`` is ``images`` itself (the caller persists it), and ``n_images``, when
    given, is its count. Callers hold the tables' commit locks (``store.tables.table_locks``) meanwhile, so that
    no other run swaps a table while it is read.
    """
    from imgfeat.store.tables import materialize

    if existing is None or mode == "overwrite":
        # The plan does not depend on the tables: no need to freeze it (a first run skips a write).
        todo = images
        n_todo = images.count() if n_images is None else n_images
        replace = existing.select("path").distinct() if existing is not None else None
    else:
        todo = images.join(_done_keys(images, existing), on=["path", *FINGERPRINT], how="left_anti")
        replace = todo.join(existing.select("path").distinct(), on="path", how="left_semi").select("path")
        todo = materialize(spark, todo, output, run_id)
        n_todo = todo.count()
    replaced_paths = [r["path"] for r in replace.collect()] if replace is not None else []
    n_replaced = len(replaced_paths)
    replace = spark.createDataFrame([(p,) for p in replaced_paths], "path string") if n_replaced else None
    return todo, n_todo, replace, n_replaced


@dataclass
class _Run:
    """What an extract run fixes before it reads anything."""

    fmt: str
    backbone: Backbone
    engine: str
    weights: WeightsSource
    run_id: str
    leases: RunLeases
    started: float


@dataclass
class _Plan:
    images: DataFrame  # persisted listing
    n_listed: int
    n_other: int
    other_lengths: Any
    labels: dict[str, int]
    todo: DataFrame
    n_todo: int
    replace: DataFrame | None
    n_replaced: int


def run_extract(spark: SparkSession, cfg: Config) -> ExtractResult:
    """List, skip what is done, featurize the rest, write features and errors; return the counts.

    The run holds writer leases on both tables from start to end (``run_leases``): a second run of the same model
    and weights on them is refused meanwhile; runs of other backbones proceed side by side.
    """
    from imgfeat.engines import resolve_weights
    from imgfeat.store.tables import resolve_format

    if not cfg.output.path:
        raise ValueError("no output location: pass --output PATH (or set output.path)")
    started = time.time()
    fmt = resolve_format(spark, cfg.output.format)
    backbone = get_backbone(cfg.model.name)
    engine = engine_for(backbone, cfg.inference.engine)
    log.info("resolving %s (%s engine) weights=%s", backbone.name, engine, cfg.model.weights)
    resolved = resolve_weights(backbone, cfg.model.weights, cfg.model.seed, cfg.model.weights_sha256)
    run_id = uuid.uuid4().hex[:12]
    with run_leases(spark, cfg, fmt, run_id, backbone.name, resolved.weights_id, "extract") as leases:
        return _extract(spark, cfg, _Run(fmt, backbone, engine, resolved, run_id, leases, started))


def _extract(spark: SparkSession, cfg: Config, run: _Run) -> ExtractResult:
    from imgfeat.featurize.settings import settings_json
    from imgfeat.store.tables import drop_scratch, table_locks

    spec = featurize_spec(spark, cfg, run.weights)
    settings = settings_json(run.backbone, run.engine, spec.decode, spec.precision, spec.jpeg_decoder)
    sc = spark.sparkContext
    sc.setJobDescription("imgfeat extract: existing tables")
    existing = existing_keys(spark, cfg, run.fmt, run.weights.weights_id, leases=run.leases)  # repairs them first
    with table_locks(spark, [cfg.output.path or "", cfg.errors_path or ""], run.fmt, run.leases):
        check_recorded_settings(spark, cfg, run.fmt, run.backbone.name, run.weights.weights_id, settings)
    broadcast = broadcast_weights(spark, run.weights)
    warmup = _start_warmup(spark, spec, broadcast) if cfg.inference.warmup else None
    plan = _plan_extract(spark, cfg, run, existing)
    stages = {"list_and_plan": time.time() - run.started}
    accumulators = {k: sc.accumulator(0.0) for k in ("decode", "inference", "model_load")}
    featurized = failed = feature_rows_written = 0
    if plan.n_todo:
        write_started = time.time()
        featurized, failed, feature_rows_written = _featurize_and_write(
            spark, cfg, run, plan, spec, broadcast, settings, accumulators)
        stages["featurize_and_write"] = time.time() - write_started
    if warmup is not None:
        warmup.join()
    sc.setJobDescription("imgfeat extract: clean-up")
    stages.update({f"{k}_task_seconds": round(a.value, 3) for k, a in accumulators.items()})
    plan.images.unpersist()
    drop_scratch(spark, cfg.output.path, run.run_id)
    sc.setJobDescription(None)
    result = ExtractResult(
        listed=plan.n_listed,
        ignored_other_files=plan.n_other,
        already_done=plan.n_listed - plan.n_todo,
        processed=plan.n_todo,
        featurized=featurized,
        failed=failed,
        replaced=plan.n_replaced,
        features_path=cfg.output.path or "",
        errors_path=cfg.errors_path or "",
        format=run.fmt,
        model=run.backbone.name,
        weights_id=run.weights.weights_id,
        seconds=time.time() - run.started,
        stage_seconds={k: round(v, 3) for k, v in stages.items()},
        feature_rows=feature_rows_written,
        **plan.labels,
    )
    if featurized + failed != plan.n_todo:
        raise RuntimeError(
            f"accounting mismatch: {plan.n_todo} files to process but {featurized} featurized + {failed} failed; "
            "the tables were written, please report this with the input folder's listing"
        )
    return result


def _plan_extract(spark: SparkSession, cfg: Config, run: _Run, existing: DataFrame | None) -> _Plan:
    """List the input folder and plan the work against the tables (read under their commit locks)."""
    from pyspark import StorageLevel

    from imgfeat.io.listing import label_report, list_files, listing_settings, other_file_lengths
    from imgfeat.session import sql_conf
    from imgfeat.store.tables import check_replace_supported, table_locks

    sc = spark.sparkContext
    sc.setJobDescription("imgfeat extract: listing")
    images, others = list_files(spark, cfg)
    images = images.persist(StorageLevel.MEMORY_AND_DISK)
    with sql_conf(spark, listing_settings(spark)):  # the scans that list, in one task per core
        labels = label_report(spark, cfg, images)  # the listed count too: one job
        other_lengths = other_file_lengths(others)  # counted (and sized, for the read tasks) while listing
        n_other = len(other_lengths) if other_lengths is not None else others.count()
    n_listed = labels.pop("listed")
    for key, text in (("unlabelled", "listed images have no label"),
                      ("manifest_unmatched", "label-manifest rows match no listed image"),
                      ("ungrouped", "images match no group; each is its own group")):
        if labels[key]:
            log.warning("%d %s", labels[key], text)
    sc.setJobDescription("imgfeat extract: planning")
    tables = [cfg.output.path or "", cfg.errors_path or ""]
    with table_locks(spark, tables, run.fmt, run.leases):
        todo, n_todo, replace, n_replaced = plan_work(spark, images, existing, cfg.output.mode, tables[0], run.run_id,
                                                        n_listed)
    if replace is not None:  # before featurizing: a replace the tables cannot take fails now, not after hours
        for location in tables:
            check_replace_supported(spark, location, run.fmt)
    return _Plan(images, n_listed, n_other, other_lengths, labels, todo, n_todo, replace, n_replaced)


def _featurize_and_write(spark: SparkSession, cfg: Config, run: _Run, plan: _Plan, spec: FeaturizeSpec,
                         broadcast: Any, settings: str, accumulators: dict) -> tuple[int, int, int]:
    """Featurize the planned files and append the rows to both tables: (files featurized, failed, feature rows)."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from imgfeat.io.listing import broadcast_if_small, read_contents, read_task_settings
    from imgfeat.session import sql_conf
    from imgfeat.store.tables import append_rows

    sc = spark.sparkContext
    todo, n_todo = plan.todo, plan.n_todo
    log.info("featurizing %d of %d files with %s", n_todo, plan.n_listed, run.backbone.name)
    contents = read_contents(spark, cfg, todo, n_todo, plan.n_listed)
    read_settings = read_task_settings(spark, cfg, todo, n_todo, plan.n_listed, plan.other_lengths)
    # Per-file attributes ride along with the bytes (a broadcast join), so nothing is shuffled
    # and the UDF's output needs no join afterwards.
    attrs = broadcast_if_small(todo.drop(*FINGERPRINT), n_todo)
    rows = featurize_contents(
        contents.select(
            "path",
            "content",
            F.col("length").alias("file_length"),
            F.col("modificationTime").alias("file_modification_time"),
        ).join(attrs, on="path", how="inner"),
        spec,
        broadcast,
        accumulators,
    )
    # One scan: the rows read and featurized are persisted, and the unread files are todo minus those rows.
    rows = with_decoded_attributes(rows, cfg).persist(StorageLevel.MEMORY_AND_DISK)
    unread = unread_errors(todo, rows, cfg.input.max_file_bytes).persist(StorageLevel.MEMORY_AND_DISK)
    feature_rows, error_rows = _output_rows(rows, unread, run, settings)
    keys = replace_keys(plan.replace, run.backbone.name, run.weights.weights_id)
    sc.setJobDescription(f"imgfeat extract: featurize {n_todo} files, write features")
    # Without adaptive execution the write computes the persisted rows and writes them in one pass; with it,
    # Spark first materialises the cache in a job of its own and then writes from it (a second pass over
    # every feature vector: 2.9 s per 2,000 images here). The read tasks are sized to finish together.
    with sql_conf(spark, {"spark.sql.adaptive.enabled": "false", **read_settings}):
        append_rows(spark, feature_rows, cfg.output.path, run.fmt, replace=keys, lease=run.leases[cfg.output.path])
    sc.setJobDescription("imgfeat extract: write errors")
    append_rows(spark, error_rows, cfg.errors_path, run.fmt, replace=keys, lease=run.leases[cfg.errors_path])
    sc.setJobDescription("imgfeat extract: counts")
    # Files, not rows: a volume gives one row per selected slice.
    counts = {r["ok"]: (r["files"], r["n"]) for r in rows.groupBy(F.col("error_class").isNull().alias("ok"))
              .agg(F.countDistinct("path").alias("files"), F.count("*").alias("n")).collect()}
    featurized, feature_rows_written = counts.get(True, (0, 0))
    failed = counts.get(False, (0, 0))[0] + unread.count()
    rows.unpersist()
    unread.unpersist()
    return featurized, failed, feature_rows_written


def _output_rows(rows: DataFrame, unread: DataFrame, run: _Run, settings: str) -> tuple[DataFrame, DataFrame]:
    """(features table rows, errors table rows) of a run's featurized rows and unread files."""
    from pyspark.sql import functions as F

    meta = [
        F.lit(run.backbone.name).alias("model"),
        F.lit(run.weights.weights_id).alias("weights_id"),
        F.lit(run.run_id).alias("run_id"),
        F.current_timestamp().alias("extracted_at"),
        F.lit(settings).alias("preprocess"),
    ]
    feature_rows = rows.filter(F.col("error_class").isNull()).select(
        "image_id", "path", "rel_path", "label", "split", "group_id",
        "features", "features_f16", *meta,
        F.lit(run.backbone.feature_dim).alias("feature_dim"),
        "width", "height", "source_mode", "format", "content_sha256", "phash", "slice_index", *METADATA, *FINGERPRINT,
    )
    error_cols = ["image_id", "path", "rel_path", "label", "split", "group_id", "error_class", "error_message",
                  *FINGERPRINT]
    error_rows = (
        rows.filter(F.col("error_class").isNotNull()).select(*error_cols, *METADATA)
        .unionByName(unread.select(*error_cols), allowMissingColumns=True)
        .select(*error_cols[:6], *meta, *error_cols[6:], *METADATA)
    )
    return feature_rows, error_rows


def replace_keys(replace: DataFrame | None, model: str, weights_id: str) -> DataFrame | None:
    from pyspark.sql import functions as F

    if replace is None:
        return None
    return replace.select("path", F.lit(model).alias("model"), F.lit(weights_id).alias("weights_id"))
