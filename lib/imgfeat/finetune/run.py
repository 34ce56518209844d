"""The fine-tune job: decode once, train with TorchDistributor, evaluate on the test split, log to MLflow.

The run logs its parameters, one metric point per epoch (train/validation loss and accuracy, validation AUC,
images/s: the UI draws the curves), the best epoch's network as weights-only state dicts (``finetuned/backbone.pth``
in the backbone's own parameter names, ``finetuned/head.pth``; never a pickled module), test metrics with the same
metric set and bootstrap intervals as ``train``, and two models: ``model`` (Spark: ImageFeaturizer with the
fine-tuned backbone + its linear head, for ``imgfeat predict``) and ``pyfunc_model`` (for ``imgfeat serve``).
The backbone file is also what ``imgfeat extract --weights runs:/RUN_ID`` (or the file itself) featurizes with.
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

log = logging.getLogger(__name__)

BACKBONE_ARTIFACT = "finetuned/backbone.pth"


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
        m = self.test_metrics
        lines = [f"[imgfeat] finetune: run {self.run_id} in experiment {self.experiment!r}: {len(self.history)} epochs "
                 f"with {self.world_size} processes in {self.train_seconds:.0f}s (total {self.seconds:.0f}s); best epoch "
                 f"{self.best_epoch}"]
        for h in self.history:
            lines.append(f"[imgfeat]   epoch {h['epoch']}: train loss {h['train_loss']:.4f}, val loss {h['val_loss']:.4f}, "
                         f"val accuracy {h['val_accuracy']:.4f}, {h['train_images_per_s']:.1f} images/s")
        lines.append(f"[imgfeat]   test: accuracy {m.get('test_accuracy', float('nan')):.4f}, AUC "
                     f"{m.get('test_roc_auc', float('nan')):.4f}, macro F1 {m.get('test_f1_macro', float('nan')):.4f}")
        lines.append(f"[imgfeat]   fine-tuned backbone: {self.backbone_file} (sha256 {self.backbone_sha256[:16]}...); extract "
                     f"with --weights runs:/{self.run_id}; serve with imgfeat serve --model-uri runs:/{self.run_id}")
        return "\n".join(lines)


def run_finetune(spark: SparkSession, cfg: Config, resume: bool = False) -> FinetuneResult:
    """Fine-tune ``model.name`` (a torch backbone) on ``input.path``; see the module docstring."""
    import mlflow

    from imgfeat.backbones.registry import get_backbone
    from imgfeat.engines import resolve_weights
    from imgfeat.finetune.data import build_decoded_table, table_files
    from imgfeat.finetune.loop import LoopSpec, spec_dict
    from imgfeat.train.privacy import check_metadata
    from imgfeat.train.tracking import tracking_uri, use_experiment

    started = time.time()
    fc = cfg.finetune
    backbone = get_backbone(cfg.model.name)
    if backbone.engine != "torch":
        raise ValueError(f"finetune trains PyTorch backbones; {backbone.name} is a {backbone.engine} backbone. Use e.g. "
                         "--model efficientnet_lite0")
    if not fc.output:
        raise ValueError("finetune needs an output folder: --output DIR (or finetune.output)")
    out = os.path.abspath(fc.output.removeprefix("file:"))
    os.makedirs(out, exist_ok=True)
    table_path = os.path.join(out, "decoded")
    size = cfg.preprocess.image_size or backbone.input_size
    marker = os.path.join(out, "decoded.json")
    if resume and os.path.exists(marker):
        with open(marker, encoding="utf-8") as fh:
            table = json.load(fh)
        log.info("resuming: reusing the decoded table %s", table_path)
    else:
        table = build_decoded_table(spark, cfg, size, "file://" + table_path).to_dict()
        with open(marker, "w", encoding="utf-8") as fh:
            json.dump(table, fh, indent=2)
    labels = table["labels"]
    train_counts = table["counts"].get("train", {})
    if len(labels) < 2 or not all(train_counts.get(lab) for lab in labels):
        raise ValueError(f"fine-tuning needs training images of at least 2 classes; the table has {table['counts']}")
    total = sum(train_counts.values())
    class_weights = [total / (len(labels) * train_counts[lab]) for lab in labels] if fc.class_weighting else None
    source = resolve_weights(backbone, cfg.model.weights, cfg.model.seed, cfg.model.weights_sha256)
    spec = LoopSpec(
        files=table_files(table_path), labels=labels, architecture=backbone.constructor, input_size=size,
        feature_dim=backbone.feature_dim, mean=tuple(backbone.mean), std=tuple(backbone.std),
        out_dir=os.path.join(out, "run"), weights=source.read_bytes(), seed=fc.seed, train_layers=fc.train_layers,
        epochs=fc.epochs, batch_size=fc.batch_size, learning_rate=fc.learning_rate,
        backbone_lr_scale=fc.backbone_lr_scale, weight_decay=fc.weight_decay, warmup_fraction=fc.warmup_fraction,
        class_weights=class_weights, patience=fc.patience, precision=fc.precision, use_gpu=fc.use_gpu, resume=resume,
        augment={"rotate_degrees": fc.rotate_degrees, "shift": fc.shift, "scale": fc.scale,
                 "brightness": fc.brightness, "contrast": fc.contrast, "hflip": fc.hflip},
    )
    if not resume and os.path.isdir(spec.out_dir):
        import shutil

        shutil.rmtree(spec.out_dir)
    t0 = time.time()
    result = distribute(spec, fc.num_processes, fc.local_mode, fc.use_gpu)
    train_seconds = time.time() - t0

    use_experiment(cfg)
    with mlflow.start_run(run_name=f"finetune {backbone.name}", tags={"imgfeat.kind": "finetune", "backbone": backbone.name,
                                                                       "head": "finetuned", "weights_id": source.weights_id}) as run:
        params = {k: v for k, v in spec_dict(spec).items() if k not in ("files", "out_dir", "labels", "mean", "std", "augment")}
        params.update({f"augment_{k}": v for k, v in spec.augment.items()})
        params.update({"backbone": backbone.name, "initial_weights_id": source.weights_id, "labels": json.dumps(labels),
                       "num_processes": fc.num_processes, "local_mode": fc.local_mode,
                       "trainable_parameters": result["trainable_parameters"], "steps_per_epoch": result["steps_per_epoch"],
                       "validation_fraction": fc.validation_fraction,
                       **{f"count_{split}_{lab}": n for split, c in table["counts"].items() for lab, n in c.items()}})
        params["class_weights"] = json.dumps(class_weights)
        check_metadata(params)  # no patient fields or image content in run metadata
        mlflow.log_params(params)
        for h in result["history"]:
            mlflow.log_metrics({k: v for k, v in h.items() if k != "epoch" and v == v}, step=int(h["epoch"]))
        backbone_file, head = _split_best(spec.out_dir)
        from imgfeat.backbones.weights import sha256_file

        sha = sha256_file(backbone_file)
        mlflow.log_artifact(backbone_file, artifact_path="finetuned")
        mlflow.log_artifact(os.path.join(spec.out_dir, "head.pth"), artifact_path="finetuned")
        mlflow.log_artifact(backbone_file, artifact_path=f"weights/{sha[:16]}")  # where imgfeat predict looks
        mlflow.log_dict(result, "finetune_history.json")
        test_metrics, report = _test_metrics(spec, backbone_file, head, cfg)
        if test_metrics:
            mlflow.log_metrics({k: v for k, v in test_metrics.items() if v == v})
            mlflow.log_dict(report, "classification_report.json")
        mlflow.log_metric("best_epoch", result["best_epoch"])
        _log_models(cfg, backbone.name, backbone_file, sha, head, labels, size, run.info.run_id)
        run_id = run.info.run_id
    return FinetuneResult(run_id=run_id, experiment=cfg.mlflow.experiment, tracking_uri=tracking_uri(cfg), table=table,
                          history=result["history"], best_epoch=result["best_epoch"], test_metrics=test_metrics,
                          backbone_file=backbone_file, backbone_sha256=sha, seconds=round(time.time() - started, 1),
                          train_seconds=round(train_seconds, 1), world_size=result["world_size"])


def distribute(spec: Any, num_processes: int, local_mode: bool, use_gpu: bool) -> dict[str, Any]:
    """Run ``run_loop(spec)`` in ``num_processes`` processes with Spark's TorchDistributor; process 0's result."""
    from pyspark.ml.torch.distributor import TorchDistributor

    from imgfeat.finetune.loop import run_loop

    returned = TorchDistributor(num_processes=num_processes, local_mode=local_mode, use_gpu=use_gpu).run(run_loop, spec)
    if returned is None:  # local mode hands back nothing here: process 0 wrote it
        with open(os.path.join(spec.out_dir, "result.json"), encoding="utf-8") as fh:
            returned = json.load(fh)
    return returned


def _split_best(run_dir: str) -> tuple[str, dict[str, np.ndarray]]:
    """best_model.pt -> backbone.pth (the architecture's own parameter names) and head.pth; returns the
    backbone file and the head as arrays."""
    import torch

    state = torch.load(os.path.join(run_dir, "best_model.pt"), map_location="cpu", weights_only=True)
    backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    head = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
    path = os.path.join(run_dir, "backbone.pth")
    torch.save(backbone, path)
    torch.save(head, os.path.join(run_dir, "head.pth"))
    return path, {k: v.numpy().astype(np.float64) for k, v in head.items()}


def _test_metrics(spec: Any, backbone_file: str, head: dict[str, np.ndarray], cfg: Config) -> tuple[dict[str, float], dict[str, Any]]:
    """The best network on the test split: train's metric set and bootstrap intervals."""
    import dataclasses

    import torch

    from imgfeat.finetune.loop import build_network, evaluate
    from imgfeat.train.metrics import classification_metrics, metric_key
    from imgfeat.train.uncertainty import bootstrap_intervals

    with open(backbone_file, "rb") as fh:
        net = build_network(dataclasses.replace(spec, weights=fh.read()))
    net.head.load_state_dict({k: torch.from_numpy(v).float() for k, v in head.items()})
    torch.set_num_threads(os.cpu_count() or 1)
    test = evaluate(net, spec, "test", torch.device("cpu"))
    if not test["n"]:
        log.warning("no test images: test metrics are not logged")
        return {}, {}
    y, proba = test["y"], test["proba"]
    p = proba.argmax(1)
    metrics, report = classification_metrics(y, p, proba, spec.labels)
    v = cfg.train.validity
    metrics.update(bootstrap_intervals(y, p, proba, spec.labels, np.arange(len(y)), v.bootstrap_resamples, v.confidence,
                                       cfg.train.seed, metric_key=metric_key))
    metrics["test_loss"] = test["loss"]
    return metrics, report


def _log_models(cfg: Config, model_name: str, backbone_file: str, sha: str, head: dict[str, np.ndarray],
                labels: list[str], size: int, run_id: str) -> None:
    """``model`` (Spark, for predict) and ``pyfunc_model`` (for serve): the fine-tuned backbone + its head."""
    import mlflow.spark
    from pyspark.ml import PipelineModel
    from pyspark.ml.feature import IndexToString

    from imgfeat.featurize.extract import decode_options
    from imgfeat.featurize.transformer import ImageFeaturizer
    from imgfeat.scoring.heads import HeadArrays
    from imgfeat.scoring.pyfunc import log_classifier
    from imgfeat.train.heads import FEATURES_COL, PREDICTION_COL
    from imgfeat.train.keras_head import KerasHeadModel, weights_to_b64
    from imgfeat.train.tracking import model_signature, pip_requirements

    decode = decode_options(cfg, size)
    featurizer = ImageFeaturizer.from_decode_options(
        decode, inputCol="content", outputCol=FEATURES_COL, modelName=model_name, weights=backbone_file,
        weightsSha256=sha, batchSize=cfg.inference.batch_size, outputType="vector")
    w, b = head["weight"], head["bias"]
    linear = KerasHeadModel(featuresCol=FEATURES_COL, predictionCol=PREDICTION_COL, inputDim=w.shape[1],
                            numClasses=w.shape[0], hiddenUnits=0,
                            weightsB64=weights_to_b64([w.T.astype(np.float32), b.astype(np.float32)]))
    converter = IndexToString(inputCol=PREDICTION_COL, outputCol="prediction", labels=labels)
    mlflow.spark.log_model(PipelineModel(stages=[featurizer, linear, converter]), artifact_path="model",
                           pip_requirements=pip_requirements(), signature=model_signature())
    arrays = HeadArrays("linear", {"weights": w, "bias": b}, {"probabilistic": True, "mode": "finetuned"})
    log_classifier(model_name=model_name, weights=backbone_file, weights_sha256=sha, seed=cfg.model.seed,
                   weights_id=f"sha256:{sha}", weights_file=backbone_file, decode=decode, precision="fp32",
                   labels=labels, head_name="finetuned", head=arrays, run_id=run_id)
