"""The extract job: image folder -> features table + errors table, incrementally."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from imgfeat.backbones.registry import engine_for, get_backbone
from imgfeat.config import Config
from imgfeat.featurize.job import FINGERPRINT
from imgfeat.io.decoders import DecodeOptions
from imgfeat.io.labels import MULTI_COLUMNS

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from imgfeat.backbones.registry import Backbone
    from imgfeat.backbones.weights import WeightsSource
    from imgfeat.config.schema import InferenceConfig, InputConfig
    from imgfeat.featurize.job import Featurized, ScanPlan, ScanRun, Written
    from imgfeat.featurize.spec import FeaturizeSpec

log = logging.getLogger(__name__)

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
    no_study: int = 0  # input.study set: images whose study was not found (DICOM files may still get theirs)
    feature_rows: int = 0  # rows written to the features table: one per 2D image, one per selected slice

    def summary(self) -> str:
        warnings = ""
        if self.unlabelled:
            warnings += f"\n[imgfeat]   warning: {self.unlabelled} listed images have no label (train will leave them out)"
        if self.ungrouped:
            warnings += (f"\n[imgfeat]   warning: {self.ungrouped} images match no group (input.split.group_pattern); "
                         "each is its own group")
        if self.no_study:
            warnings += (f"\n[imgfeat]   warning: {self.no_study} images match no study (input.study); each is "
                         "its own study unless it is a DICOM file")
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


def decoded_attributes(inp: InputConfig) -> Callable[[DataFrame], DataFrame]:
    """What is only known once a file is read, by the ``input`` settings: dicom_tag labels, patient_key groups,
    DICOM studies (study_key, where rows carry a study_id the input did not give), and then their hash split; a
    function of the featurized rows."""
    label_from_tag = inp.label.effective_mode == "dicom_tag"
    split = inp.split

    def add(rows: DataFrame) -> DataFrame:
        from pyspark.sql import functions as F

        from imgfeat.io.splits import hash_split

        if label_from_tag:
            rows = rows.withColumn("label", F.coalesce(F.col("label"), F.col("label_value")))
        study = "study_id" in rows.columns
        if study:
            rows = rows.withColumn("study_id", F.coalesce(F.col("study_id"), F.col("study_key")))
        if split.group == "patient_key":
            rows = rows.withColumn("group_id", F.col("patient_key"))
        if split.mode == "hash" and (split.group == "patient_key" or study):
            rows = rows.withColumn("split", hash_split(split, study))
        return rows

    return add


def check_recorded_settings(spark: SparkSession, run: ScanRun, wanted: str) -> None:
    """Refuse to add rows made with other preprocessing to a table that already holds the run's model and weights."""
    from pyspark.sql import functions as F

    from imgfeat.featurize.settings import COLUMN, SettingsError, describe_difference
    from imgfeat.store.tables import read_table, table_exists

    if run.tables.mode == "overwrite":
        return  # every row of this backbone and weights is recomputed
    for location in run.tables.paths:
        if not table_exists(spark, location, run.tables.fmt):
            continue
        table = read_table(spark, location, run.tables.fmt)
        if COLUMN not in table.columns:
            continue  # written before settings were recorded
        mine = (F.col("model") == run.model) & (F.col("weights_id") == run.weights_id) & F.col(COLUMN).isNotNull()
        recorded = [r[COLUMN] for r in table.filter(mine).select(COLUMN).distinct().limit(5).collect()]
        other = [r for r in recorded if r != wanted]
        if other:
            raise SettingsError(
                f"{location} already holds {run.model} features (weights {run.weights_id[:40]}) made with other "
                f"preprocessing ({describe_difference(other[0], wanted)}); mixing them would give the model "
                "differently prepared inputs. Extract into another --output, or pass --mode overwrite to recompute "
                "them all with these settings."
            )


def _start_warmup(spark: SparkSession, spec: FeaturizeSpec, broadcast: Any) -> threading.Thread:
    """Build the model in every Python worker while the driver lists files (a background job).

    Python workers are reused between tasks, so the featurizing tasks later find the model built.
    The warm-up takes every task slot, so the listing jobs queue behind it; it still shortens the run
    (measured: docs/benchmarks.md).
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


@dataclass(frozen=True)
class _Model:
    """What an extract run featurizes with, fixed before it reads anything."""

    backbone: Backbone
    engine: str
    weights: WeightsSource
    spec: FeaturizeSpec
    decoded: Callable[[DataFrame], DataFrame]  # decoded_attributes of the input settings


def run_extract(spark: SparkSession, cfg: Config) -> ExtractResult:
    """List, skip what is done, featurize the rest, write features and errors; return the counts.

    The run holds writer leases on both tables from start to end (``featurize.job.scan_run``): a second run of the
    same model and weights on them is refused meanwhile; runs of other backbones proceed side by side.
    """
    from imgfeat.engines import resolve_weights
    from imgfeat.featurize.job import Tables, scan_run

    if not cfg.output.path:
        raise ValueError("no output location: pass --output PATH (or set output.path)")
    started = time.time()
    tables = Tables.of(spark, cfg.output, cfg.errors_path)
    decoded = decoded_attributes(cfg.input)
    backbone = get_backbone(cfg.model.name)
    engine = engine_for(backbone, cfg.inference.engine)
    log.info("resolving %s (%s engine) weights=%s", backbone.name, engine, cfg.model.weights)
    resolved = resolve_weights(backbone, cfg.model.weights, cfg.model.seed, cfg.model.weights_sha256)
    model = _Model(backbone, engine, resolved, _spec(spark, cfg, backbone, resolved), decoded)
    with scan_run(spark, tables, "extract", backbone.name, resolved.weights_id) as run:
        return _extract(spark, cfg.input, cfg.inference, run, model, started)


def _spec(spark: SparkSession, cfg: Config, backbone: Backbone, weights: WeightsSource) -> FeaturizeSpec:
    """The workers' spec: the backbone and weights, decoded by ``preprocess``, run by ``inference``."""
    from imgfeat.featurize.spec import dicom_label_tag, featurize_spec
    from imgfeat.io.groups import id_salt
    from imgfeat.session import threads_for

    label_tag, salt, threads = dicom_label_tag(cfg.input.label), id_salt(cfg.privacy.id_salt), cfg.inference.threads
    decode = DecodeOptions.from_config(cfg.preprocess, backbone.input_size)
    return featurize_spec(backbone, weights, decode, cfg.inference, threads_for(spark, threads), salt, label_tag,
                          cfg.output.float16_column)


def _extract(spark: SparkSession, inp: InputConfig, inference: InferenceConfig, run: ScanRun, model: _Model,
             started: float) -> ExtractResult:
    from imgfeat.featurize.job import (
        Written,
        broadcast_weights,
        existing_keys,
        featurize_todo,
        finish_scan,
        plan_scan,
        write_rows,
    )
    from imgfeat.featurize.settings import settings_json
    from imgfeat.store.tables import table_locks

    spec = model.spec
    settings = settings_json(model.backbone, model.engine, spec.decode, spec.precision, spec.jpeg_decoder)
    run.describe(spark, "existing tables")
    existing = existing_keys(spark, run)  # repairs them first
    with table_locks(spark, run.tables.paths, run.tables.fmt, run.leases):
        check_recorded_settings(spark, run, settings)
    broadcast = broadcast_weights(spark, model.weights)
    warmup = _start_warmup(spark, spec, broadcast) if inference.warmup else None
    plan = plan_scan(spark, inp, run, existing, report_labels=True)
    _warn_about_labels(plan.report)
    stages = {"list_and_plan": time.time() - started}
    accumulators = {k: spark.sparkContext.accumulator(0.0) for k in ("decode", "inference", "model_load")}
    written = Written()
    if plan.n_todo:
        write_started = time.time()
        featurized = featurize_todo(spark, inp, inference, plan, spec, broadcast, accumulators, model.decoded)
        written = write_rows(spark, run, plan, featurized, *_output_rows(featurized, run, model, settings))
        stages["featurize_and_write"] = time.time() - write_started
    if warmup is not None:
        warmup.join()
    stages.update({f"{k}_task_seconds": round(a.value, 3) for k, a in accumulators.items()})
    finish_scan(spark, run, plan)
    return _result(run, plan, written, started, stages)


def _warn_about_labels(report: dict[str, int]) -> None:
    for key, text in (("unlabelled", "listed images have no label"),
                      ("manifest_unmatched", "label-manifest rows match no listed image"),
                      ("ungrouped", "images match no group; each is its own group"),
                      ("no_study", "images match no study (input.study)")):
        if report.get(key):
            log.warning("%d %s", report[key], text)


def _result(run: ScanRun, plan: ScanPlan, written: Written, started: float,
            stages: dict[str, float]) -> ExtractResult:
    return ExtractResult(
        listed=plan.n_listed,
        ignored_other_files=plan.n_other,
        already_done=plan.already_done,
        processed=plan.n_todo,
        featurized=written.ok,
        failed=written.failed,
        replaced=plan.n_replaced,
        features_path=run.tables.output,
        errors_path=run.tables.errors,
        format=run.tables.fmt,
        model=run.model,
        weights_id=run.weights_id,
        seconds=time.time() - started,
        stage_seconds={k: round(v, 3) for k, v in stages.items()},
        feature_rows=written.ok_rows,
        **plan.report,
    )


def _output_rows(featurized: Featurized, run: ScanRun, model: _Model, settings: str) -> tuple[DataFrame, DataFrame]:
    """(features table rows, errors table rows) of a run's featurized rows and unread files."""
    from pyspark.sql import functions as F

    from imgfeat.featurize.job import error_rows

    meta = [
        F.lit(run.model).alias("model"),
        F.lit(run.weights_id).alias("weights_id"),
        F.lit(run.run_id).alias("run_id"),
        F.current_timestamp().alias("extracted_at"),
        F.lit(settings).alias("preprocess"),
    ]
    # Multi-label findings and the study: only where the input gives them (other tables keep their columns).
    targets = [c for c in (*MULTI_COLUMNS, "study_id") if c in featurized.rows.columns]
    feature_rows = featurized.rows.filter(F.col("error_class").isNull()).select(
        "image_id", "path", "rel_path", "label", *targets, "split", "group_id",
        "features", "features_f16", *meta,
        F.lit(model.backbone.feature_dim).alias("feature_dim"),
        "width", "height", "source_mode", "format", "content_sha256", "phash", "slice_index", *METADATA, *FINGERPRINT,
    )
    keys = ["image_id", "path", "rel_path", "label", *targets, "split", "group_id"]
    return feature_rows, error_rows(featurized, keys, meta, METADATA)
