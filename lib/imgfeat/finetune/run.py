"""The fine-tune job: decode once, train with TorchDistributor, evaluate on the test split, log to MLflow.

Steps (each a small function below, as in pyspark's TorchDistributor): check the backbone (``_torch_backbone``),
decode the images once into a Parquet table under ``finetune.output`` (``_decoded_table``; reused on ``resume``),
build the processes' settings (``_loop_spec``), train (``distribute``: ``finetune.loop`` in ``num_processes``
processes), and in one MLflow run: log its parameters (``_log_params``), one metric point per epoch (train/validation
loss and accuracy, validation AUC, images/s: the UI draws the curves), the best epoch's network as weights-only state
dicts (``_log_network``: ``finetuned/backbone.pth`` in the backbone's own parameter names, ``finetuned/head.pth``;
never a pickled module), test metrics with the same metric set and bootstrap intervals as ``train``
(``_test_metrics``: ``train.metrics.evaluate``), and the two models ``train`` logs too (``train.image_model``):
``model`` (Spark: ImageFeaturizer with the fine-tuned backbone + its linear head, for ``imgfeat predict``) and
``pyfunc_model`` (for ``imgfeat serve``). The backbone file is also what ``imgfeat extract --weights runs:/RUN_ID``
(or the file itself) featurizes with.

Multi-label input (input.label.multi / input.label.findings): one output per finding, the masked binary
cross-entropy with per-finding positive weights (known negatives / known positives in training,
``finding_heads.positive_weights``); each finding's threshold chosen on the validation split (``train.threshold``:
youden or ``train.validity.target_sensitivity``), the test split evaluated per finding with patients as bootstrap
units (``findings.evaluate_findings``) and logged as ``train``'s multi-label runs log it (``test_auc_<finding>``,
``test_auc_macro``, findings.csv/.md, roc_findings.png: ``train.multilabel.log_results``); the models are those of
``train``'s multi-label runs (``image_model.log_findings_model``: ``FindingsHeadModel`` over the fine-tuned linear
head as a masked-BCE ``findings`` head, task multi with the findings and thresholds).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from imgfeat.config import Config

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from imgfeat.backbones.registry import Backbone
    from imgfeat.config.schema import FinetuneConfig, TrainConfig, ValidityConfig
    from imgfeat.finetune.loop import LoopSpec
    from imgfeat.io.decoders import DecodeOptions

log = logging.getLogger(__name__)

# Under finetune.output:
DECODED_DIR = "decoded"  # the decoded table (and decoded_errors)
DECODED_MARKER = "decoded.json"  # its description, written once it is complete: what --resume reuses
RUN_DIR = "run"  # the processes' out_dir: checkpoints, best model, result, then backbone.pth and head.pth
# In the run's artifacts:
FINETUNED_DIR = "finetuned"
BACKBONE_FILE = "backbone.pth"
HEAD_FILE = "head.pth"
BACKBONE_ARTIFACT = f"{FINETUNED_DIR}/{BACKBONE_FILE}"  # what `--weights runs:/RUN_ID` reads (backbones.weights)
HISTORY_ARTIFACT = "finetune_history.json"
REPORT_ARTIFACT = "classification_report.json"


@dataclass
class FinetuneResult:
    run_id: str
    experiment: str
    tracking_uri: str
    table: dict[str, Any]
    history: list[dict[str, Any]]
    best_epoch: int
    test_metrics: dict[str, float]
    backbone_file: str
    backbone_sha256: str
    seconds: float
    train_seconds: float
    world_size: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        m, findings = self.test_metrics, self.extra.get("findings")
        lines = [f"[imgfeat] finetune: run {self.run_id} in experiment {self.experiment!r}: {len(self.history)} epochs "
                 f"with {self.world_size} processes in {self.train_seconds:.0f}s (total {self.seconds:.0f}s); best epoch "
                 f"{self.best_epoch}"]
        for h in self.history:
            lines.append(f"[imgfeat]   epoch {h['epoch']}: train loss {h['train_loss']:.4f}, val loss {h['val_loss']:.4f}, "
                         f"val accuracy {h['val_accuracy']:.4f}, {h['train_images_per_s']:.1f} images/s")
        if findings:
            lines.append(f"[imgfeat]   test, {len(findings)} findings: macro AUC {m.get('test_auc_macro', float('nan')):.4f}, "
                         f"micro AUC {m.get('test_auc_micro', float('nan')):.4f}; per finding (thresholds from validation):")
            lines += [f"[imgfeat]     {line}" for line in str(self.extra.get("findings_table", "")).splitlines()]
        else:
            lines.append(f"[imgfeat]   test: accuracy {m.get('test_accuracy', float('nan')):.4f}, AUC "
                         f"{m.get('test_roc_auc', float('nan')):.4f}, macro F1 {m.get('test_f1_macro', float('nan')):.4f}")
        lines.append(f"[imgfeat]   fine-tuned backbone: {self.backbone_file} (sha256 {self.backbone_sha256[:16]}...); extract "
                     f"with --weights runs:/{self.run_id}; serve with imgfeat serve --model-uri runs:/{self.run_id}")
        return "\n".join(lines)


def run_finetune(spark: SparkSession, cfg: Config, resume: bool = False) -> FinetuneResult:
    """Fine-tune ``model.name`` (a torch backbone) on ``input.path``; see the module docstring."""
    import mlflow

    from imgfeat.engines import resolve_weights
    from imgfeat.train.metrics import defined
    from imgfeat.train.tracking import tracking_uri, use_experiment

    started = time.time()
    fc = cfg.finetune
    backbone = _torch_backbone(cfg.model.name)
    out = _output_folder(fc.output)
    size = cfg.preprocess.image_size or backbone.input_size
    table = _decoded_table(spark, cfg, out, size, resume)
    weights = _loss_weights(table, fc.class_weighting)
    source = resolve_weights(backbone, cfg.model.weights, cfg.model.seed, cfg.model.weights_sha256)
    spec = _loop_spec(backbone, table, size, out, source.read_bytes(), weights, fc, resume)
    t0 = time.time()
    result = distribute(spec, fc.num_processes, fc.local_mode, fc.use_gpu)
    train_seconds = time.time() - t0

    use_experiment(cfg.mlflow)
    tags = {"imgfeat.kind": "finetune", "backbone": backbone.name, "head": "finetuned", "weights_id": source.weights_id}
    with mlflow.start_run(run_name=f"finetune {backbone.name}", tags=tags) as run:
        _log_params(spec, fc, backbone.name, source.weights_id, result, table)
        for h in result["history"]:
            mlflow.log_metrics(defined({k: v for k, v in h.items() if k != "epoch"}), step=int(h["epoch"]))
        backbone_file, sha, head = _log_network(spec.out_dir, result)
        test_metrics, extra = _evaluate_and_log_models(spec, cfg, backbone.name, backbone_file, sha, head, size,
                                                       run.info.run_id)
        mlflow.log_metric("best_epoch", result["best_epoch"])
        run_id = run.info.run_id
    return FinetuneResult(run_id=run_id, experiment=cfg.mlflow.experiment, tracking_uri=tracking_uri(cfg.mlflow), table=table,
                          history=result["history"], best_epoch=result["best_epoch"], test_metrics=test_metrics,
                          backbone_file=backbone_file, backbone_sha256=sha, seconds=round(time.time() - started, 1),
                          train_seconds=round(train_seconds, 1), world_size=result["world_size"], extra=extra)


def _loss_weights(table: dict[str, Any], class_weighting: bool) -> list[float] | None:
    """Single-label: the class weights (finetune.class_weighting), after checking that training has 2 classes.
    Multi-label: each finding's positive weight (known negatives / known positives in training; 1 for every finding
    without finetune.class_weighting), after checking that some finding has both classes in training."""
    from imgfeat.train.metrics import class_weights

    findings = table.get("findings") or []
    if not findings:
        labels, train_counts = table["labels"], table["counts"].get("train", {})
        if len(labels) < 2 or not all(train_counts.get(lab) for lab in labels):
            raise ValueError(f"fine-tuning needs training images of at least 2 classes; the table has {table['counts']}")
        return class_weights(train_counts, labels) if class_weighting else None
    from imgfeat.train.finding_heads import positive_weights

    pos = np.array([table["counts"].get("train", {}).get(f, 0) for f in findings], dtype=float)
    known = np.array([table["known"].get("train", {}).get(f, 0) for f in findings], dtype=float)
    usable = [f for f, p, k in zip(findings, pos, known, strict=True) if 0 < p < k]
    if not usable:
        raise ValueError(f"fine-tuning needs a finding with known positive and negative training images; per finding, "
                         f"known positives {dict(zip(findings, pos.astype(int).tolist(), strict=True))} of known "
                         f"{dict(zip(findings, known.astype(int).tolist(), strict=True))}: check input.label.findings "
                         "and input.label.uncertain / blank")
    if len(usable) < len(findings):
        log.warning("findings %s have one known class only in training: their outputs learn nothing useful",
                    [f for f in findings if f not in usable])
    if not class_weighting:
        return [1.0] * len(findings)
    # positive_weights counts over rows: one row of all positives and one of all negatives, weighted by the counts.
    y, counted = np.array([np.ones(len(findings)), np.zeros(len(findings))]), np.array([pos, known - pos])
    return [float(w) for w in positive_weights(y, counted)]


def _torch_backbone(name: str) -> Backbone:
    """The registry's backbone ``name``; ValueError unless it is a PyTorch one."""
    from imgfeat.backbones.registry import get_backbone

    backbone = get_backbone(name)
    if backbone.engine != "torch":
        raise ValueError(f"finetune trains PyTorch backbones; {backbone.name} is a {backbone.engine} backbone. Use e.g. "
                         "--model efficientnet_lite0")
    return backbone


def _output_folder(output: str | None) -> str:
    """``finetune.output`` as an absolute local folder (created)."""
    if not output:
        raise ValueError("finetune needs an output folder: --output DIR (or finetune.output)")
    out = os.path.abspath(output.removeprefix("file:"))
    os.makedirs(out, exist_ok=True)
    return out


def _decoded_table(spark: SparkSession, cfg: Config, out: str, size: int, resume: bool) -> dict[str, Any]:
    """The decoded table's description: decoded now, or (``resume``) the one a previous attempt completed."""
    from imgfeat.finetune.data import build_decoded_table

    table_path = os.path.join(out, DECODED_DIR)
    marker = os.path.join(out, DECODED_MARKER)
    if resume and os.path.exists(marker):
        with open(marker, encoding="utf-8") as fh:
            table = json.load(fh)
        log.info("resuming: reusing the decoded table %s", table_path)
        return table
    table = build_decoded_table(spark, cfg.input, cfg.preprocess, cfg.finetune, cfg.train.validity.allow_label_conflicts,
                                size, "file://" + table_path).to_dict()
    with open(marker, "w", encoding="utf-8") as fh:
        json.dump(table, fh, indent=2)
    return table


def _loop_spec(backbone: Backbone, table: dict[str, Any], size: int, out: str, weights: bytes | None,
               class_weights: list[float] | None, fc: FinetuneConfig, resume: bool) -> LoopSpec:
    """The processes' settings; a fresh run (not ``resume``) starts from an empty run folder. ``class_weights``:
    multi-label, the findings' positive weights."""
    from imgfeat.finetune.data import table_files
    from imgfeat.finetune.loop import LoopSpec

    out_dir = os.path.join(out, RUN_DIR)
    multi = table.get("findings") or []  # a description written before multi-label tables has none
    spec = LoopSpec(
        files=table_files(os.path.join(out, DECODED_DIR)), labels=table["labels"],
        architecture=backbone.constructor, input_size=size, feature_dim=backbone.feature_dim,
        mean=tuple(backbone.mean), std=tuple(backbone.std), out_dir=out_dir, weights=weights, seed=fc.seed,
        train_layers=fc.train_layers, epochs=fc.epochs, batch_size=fc.batch_size, learning_rate=fc.learning_rate,
        backbone_lr_scale=fc.backbone_lr_scale, weight_decay=fc.weight_decay, warmup_fraction=fc.warmup_fraction,
        class_weights=None if multi else class_weights, patience=fc.patience, precision=fc.precision,
        use_gpu=fc.use_gpu, resume=resume,
        augment={"rotate_degrees": fc.rotate_degrees, "shift": fc.shift, "scale": fc.scale,
                 "brightness": fc.brightness, "contrast": fc.contrast, "hflip": fc.hflip},
        findings=list(multi), positive_weights=list(class_weights or []) if multi else [],
    )
    if not resume and os.path.isdir(out_dir):
        import shutil

        shutil.rmtree(out_dir)
    return spec


def distribute(spec: Any, num_processes: int, local_mode: bool, use_gpu: bool) -> dict[str, Any]:
    """Run ``run_loop(spec)`` in ``num_processes`` processes with Spark's TorchDistributor; process 0's result."""
    from pyspark.ml.torch.distributor import TorchDistributor

    from imgfeat.finetune.loop import RESULT_FILE, run_loop

    returned = TorchDistributor(num_processes=num_processes, local_mode=local_mode, use_gpu=use_gpu).run(run_loop, spec)
    if returned is None:  # local mode hands back nothing here: process 0 wrote it
        with open(os.path.join(spec.out_dir, RESULT_FILE), encoding="utf-8") as fh:
            returned = json.load(fh)
    return returned


def _log_params(spec: LoopSpec, fc: FinetuneConfig, backbone: str, weights_id: str, result: dict[str, Any],
                table: dict[str, Any]) -> None:
    """The run's parameters: the processes' settings and the table's counts (no patient fields, no content);
    multi-label: the findings, their positive weights and per split and finding the known positives and images."""
    import mlflow

    from imgfeat.finetune.loop import spec_dict
    from imgfeat.train.metrics import finding_key
    from imgfeat.train.privacy import check_metadata

    skip = ("files", "out_dir", "labels", "mean", "std", "augment", "findings", "positive_weights")
    params = {k: v for k, v in spec_dict(spec).items() if k not in skip}
    params.update({f"augment_{k}": v for k, v in spec.augment.items()})
    params.update({"backbone": backbone, "initial_weights_id": weights_id, "labels": json.dumps(spec.labels),
                   "num_processes": fc.num_processes, "local_mode": fc.local_mode,
                   "trainable_parameters": result["trainable_parameters"], "steps_per_epoch": result["steps_per_epoch"],
                   "validation_fraction": fc.validation_fraction})
    if spec.multi:
        params.update({"task": "multi", "loss": "masked binary cross-entropy", "findings": json.dumps(spec.findings),
                       "positive_weights": json.dumps(spec.positive_weights),
                       "label_policy": table.get("label_policy") or "not recorded (decoded before imgfeat recorded it)"})
        for what, counts in (("positives", table["counts"]), ("known", table.get("known", {}))):
            params.update({f"{what}_{split}_{finding_key(f)}": n for split, c in counts.items() for f, n in c.items()})
    else:
        params.update({f"count_{split}_{lab}": n for split, c in table["counts"].items() for lab, n in c.items()})
    params["class_weights"] = json.dumps(spec.class_weights)
    check_metadata(params)  # no patient fields or image content in run metadata
    mlflow.log_params(params)


def _log_network(run_dir: str, result: dict[str, Any]) -> tuple[str, str, dict[str, np.ndarray]]:
    """The best network as weights-only state dicts, logged with the history; (backbone file, its sha256, head)."""
    import mlflow

    from imgfeat.backbones.weights import sha256_file

    backbone_file, head = _split_best(run_dir)
    sha = sha256_file(backbone_file)
    mlflow.log_artifact(backbone_file, artifact_path=FINETUNED_DIR)
    mlflow.log_artifact(os.path.join(run_dir, HEAD_FILE), artifact_path=FINETUNED_DIR)
    mlflow.log_artifact(backbone_file, artifact_path=f"weights/{sha[:16]}")  # where imgfeat predict looks
    mlflow.log_dict(result, HISTORY_ARTIFACT)
    return backbone_file, sha, head


def _split_best(run_dir: str) -> tuple[str, dict[str, np.ndarray]]:
    """The best model file -> backbone.pth (the architecture's own parameter names) and head.pth; returns the
    backbone file and the head as arrays."""
    import torch

    from imgfeat.finetune.loop import BEST_MODEL_FILE

    state = torch.load(os.path.join(run_dir, BEST_MODEL_FILE), map_location="cpu", weights_only=True)
    backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    head = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
    path = os.path.join(run_dir, BACKBONE_FILE)
    torch.save(backbone, path)
    torch.save(head, os.path.join(run_dir, HEAD_FILE))
    return path, {k: v.numpy().astype(np.float64) for k, v in head.items()}


def _evaluate_and_log_models(spec: LoopSpec, cfg: Config, backbone: str, backbone_file: str, sha: str,
                             head: dict[str, np.ndarray], size: int, run_id: str) -> tuple[dict[str, float], dict[str, Any]]:
    """Test metrics and the two models, single- or multi-label; (the metrics, FinetuneResult.extra)."""
    from imgfeat.io.decoders import DecodeOptions

    net = _network(spec, backbone_file, head)
    if spec.multi:
        test_metrics, thresholds, table = _test_findings(spec, net, cfg.train, backbone)
        extra = {"findings": spec.findings, "thresholds": thresholds, "findings_table": table}
    else:
        test_metrics, extra = _test_metrics(spec, net, cfg.train.validity, cfg.train.seed), {}
    featurizer = _featurizer(backbone, backbone_file, sha, DecodeOptions.from_config(cfg.preprocess, size),
                             cfg.model.seed, cfg.inference.batch_size)
    if spec.multi:
        _log_findings_models(featurizer, head, spec.findings, extra["thresholds"], run_id)
    else:
        _log_models(featurizer, head, spec.labels, run_id)
    return test_metrics, extra


def _network(spec: LoopSpec, backbone_file: str, head: dict[str, np.ndarray]) -> Any:
    """The best network (the fine-tuned backbone file + head), for evaluation on this machine's cores."""
    import dataclasses

    import torch

    from imgfeat.finetune import loop

    with open(backbone_file, "rb") as fh:
        net = loop.build_network(dataclasses.replace(spec, weights=fh.read()))
    net.head.load_state_dict({k: torch.from_numpy(v).float() for k, v in head.items()})
    torch.set_num_threads(os.cpu_count() or 1)
    return net


def _test_metrics(spec: LoopSpec, net: Any, validity: ValidityConfig, seed: int) -> dict[str, float]:
    """The best network on the test split (``train``'s evaluation: metrics, bootstrap intervals), logged."""
    import mlflow
    import torch

    from imgfeat.finetune import loop
    from imgfeat.train.metrics import defined, evaluate

    test = loop.evaluate(net, spec, "test", torch.device("cpu"))
    if not test["n"]:
        log.warning("no test images: test metrics are not logged")
        return {}
    y, proba = test["y"], test["proba"]
    metrics, report = evaluate(y, proba.argmax(1), proba, spec.labels, np.arange(len(y)), validity, seed)
    metrics["test_loss"] = test["loss"]
    mlflow.log_metrics(defined(metrics))
    mlflow.log_dict(report, REPORT_ARTIFACT)
    return metrics


def _test_findings(spec: LoopSpec, net: Any, tc: TrainConfig,
                   backbone: str) -> tuple[dict[str, float], list[float], str]:
    """Multi-label: thresholds chosen on the validation split, the test split per finding (patients as bootstrap
    units), logged as ``train``'s multi-label runs log theirs; (metrics, thresholds, the per-finding table)."""
    import mlflow
    import torch

    from imgfeat.finetune import loop
    from imgfeat.train.findings import Targets, evaluate_findings
    from imgfeat.train.multilabel import findings_text, log_results

    cpu = torch.device("cpu")
    thresholds = _thresholds(loop.evaluate(net, spec, "val", cpu), spec.findings, tc)
    test = loop.evaluate(net, spec, "test", cpu)
    if not test["n"]:
        log.warning("no test images: test metrics are not logged")
        mlflow.log_dict({"findings": spec.findings, "thresholds": thresholds}, "thresholds.json")
        return {}, thresholds, ""
    groups = loop.split_column(spec.files, "test", "group_id")
    images = loop.split_column(spec.files, "test", "image_id")
    units = np.array([g if g is not None else f"image:{i}" for g, i in zip(groups, images, strict=True)])
    targets = Targets(tuple(spec.findings), test["y"], test["mask"] > 0)
    trained = Targets(tuple(spec.findings), np.array(loop.split_column(spec.files, "train", "targets")),
                      np.array(loop.split_column(spec.files, "train", "mask")) > 0)
    v = tc.validity
    report = evaluate_findings(targets, test["proba"], thresholds, units, v.bootstrap_resamples, v.confidence, tc.seed,
                               one_class=trained.one_class())
    metrics = log_results([("test_", report, targets, test["proba"])], spec.findings, thresholds,
                          f"{backbone} fine-tuned")
    metrics["test_loss"] = test["loss"]
    mlflow.log_metric("test_loss", test["loss"])
    return metrics, thresholds, findings_text(report)


def _thresholds(val: dict[str, Any], findings: list[str], tc: TrainConfig) -> list[float]:
    """Each finding's threshold on the validation entries where it is known (``findings.choose_threshold``: youden
    or ``train.validity.target_sensitivity``; 0.5 where validation lacks a class); the choice is logged."""
    import mlflow

    from imgfeat.train.findings import choose_threshold

    out, fallback = [], []
    for j, name in enumerate(findings):
        known = val["mask"][:, j] > 0
        positive = val["y"][known, j] > 0.5
        if not positive.any() or positive.all():
            fallback.append(name)
        out.append(choose_threshold(positive, val["proba"][known, j], tc.threshold, tc.validity.target_sensitivity))
    if fallback:
        log.warning("the validation split (%d images) lacks a class of %s: threshold 0.5 for those findings",
                    val["n"], fallback)
    mlflow.log_params({"threshold_method": tc.threshold if tc.threshold == "youden" else
                       f"sensitivity >= {tc.validity.target_sensitivity}", "threshold_split": "val",
                       "threshold_images": val["n"], "threshold_fallback_0.5": json.dumps(fallback)})
    return out


def _featurizer(model_name: str, backbone_file: str, sha: str, decode: DecodeOptions, seed: int,
                batch_size: int) -> Any:
    """An ``ImageFeaturizer`` with the fine-tuned backbone (its file, pinned by ``sha``)."""
    from imgfeat.featurize.transformer import ImageFeaturizer
    from imgfeat.train.heads import FEATURES_COL

    return ImageFeaturizer.from_decode_options(
        decode, inputCol="content", outputCol=FEATURES_COL, modelName=model_name, weights=backbone_file,
        weightsSha256=sha, seed=seed, batchSize=batch_size, outputType="vector")


def _log_models(featurizer: Any, head: dict[str, np.ndarray], labels: list[str], run_id: str) -> None:
    """``model`` (Spark, for predict) and ``pyfunc_model`` (for serve): the fine-tuned backbone + its linear head."""
    from imgfeat.scoring.heads import HeadArrays
    from imgfeat.train.heads import FEATURES_COL, PREDICTION_COL
    from imgfeat.train.image_model import log_image_model
    from imgfeat.train.keras_head import KerasHeadModel, weights_to_b64

    w, b = head["weight"], head["bias"]
    linear = KerasHeadModel(featuresCol=FEATURES_COL, predictionCol=PREDICTION_COL, inputDim=w.shape[1],
                            numClasses=w.shape[0], hiddenUnits=0,
                            weightsB64=weights_to_b64([w.T.astype(np.float32), b.astype(np.float32)]))
    arrays = HeadArrays("linear", {"weights": w, "bias": b}, {"probabilistic": True, "mode": "finetuned"})
    log_image_model(featurizer, linear, labels, "finetuned", run_id, arrays)



def _log_findings_models(featurizer: Any, head: dict[str, np.ndarray], findings: list[str], thresholds: list[float],
                         run_id: str) -> None:
    """Multi-label ``model`` and ``pyfunc_model``, as ``train``'s multi-label runs log them: the fine-tuned backbone
    + ``FindingsHeadModel`` over its linear head (a ``findings`` head, mode masked_bce: one sigmoid per finding)."""
    import dataclasses

    from imgfeat.train.export import export_masked_head
    from imgfeat.train.finding_heads import MaskedHead
    from imgfeat.train.findings_model import FindingsHeadModel
    from imgfeat.train.heads import FEATURES_COL
    from imgfeat.train.image_model import log_findings_model

    arrays = export_masked_head(MaskedHead([head["weight"].T], [head["bias"]]), findings)
    arrays = dataclasses.replace(arrays, meta={**arrays.meta, "head": "finetuned"})
    stage = FindingsHeadModel.of(arrays, thresholds, featuresCol=FEATURES_COL)
    log_findings_model(featurizer, stage, "finetuned", run_id)
