"""``imgfeat finetune``: fine-tune a PyTorch backbone on an image folder with TorchDistributor (docs/finetuning.md)."""

from __future__ import annotations

import argparse
from typing import Any

from imgfeat.config import Config

HELP = "fine-tune a PyTorch backbone on labelled images, distributed with TorchDistributor, tracked in MLflow"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", help="folder of images (one sub-folder per class) or with --manifest")
    p.add_argument("--manifest", help="CSV with path,label")
    p.add_argument("--output", help="folder for the decoded table, checkpoints and outputs (finetune.output)")
    p.add_argument("--model", help="a PyTorch backbone: efficientnet_lite0, tv_resnet50, tv_densenet121")
    p.add_argument("--weights", help="initial weights: imagenet | none | a .pth state dict")
    p.add_argument("--split-mode", choices=["none", "hash", "folder"], help="train/test assignment (as extract)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="images per step and process")
    p.add_argument("--learning-rate", type=float, help="the new head's (the backbone's: x finetune.backbone_lr_scale)")
    p.add_argument("--train-layers", help="head | last:K | all")
    p.add_argument("--num-processes", type=int, help="training processes (TorchDistributor)")
    p.add_argument("--precision", choices=["fp32", "bf16"])
    p.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per process (NCCL)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    p.add_argument("--allow-label-conflicts", action="store_const", const=True,
                   help="train even if identical files carry different labels (one of them is wrong)")
    p.add_argument("--experiment", help="MLflow experiment")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")


def overrides(a: argparse.Namespace) -> dict[str, Any]:
    return {
        "input.path": a.input, "input.label.manifest": a.manifest, "finetune.output": a.output, "model.name": a.model,
        "model.weights": a.weights, "input.split.mode": a.split_mode, "finetune.epochs": a.epochs,
        "finetune.batch_size": a.batch_size, "finetune.learning_rate": a.learning_rate,
        "finetune.train_layers": a.train_layers, "finetune.num_processes": a.num_processes,
        "finetune.precision": a.precision, "finetune.use_gpu": a.use_gpu, "mlflow.experiment": a.experiment,
        "mlflow.tracking_uri": a.tracking_uri, "train.validity.allow_label_conflicts": a.allow_label_conflicts,
    }


def run(a: argparse.Namespace, cfg: Config) -> dict[str, Any]:
    from imgfeat.finetune.run import run_finetune
    from imgfeat.session import get_spark

    result = run_finetune(get_spark(cfg), cfg, resume=a.resume)
    print(result.summary(), flush=True)
    return result.to_dict()
