"""``imgfeat extract``: image folder -> features table + errors table."""

from __future__ import annotations

import argparse
from typing import Any

from imgfeat.config import Config

HELP = "featurize a folder of images with a frozen backbone"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", help="folder of images (one sub-folder per class)")
    p.add_argument("--output", help="features table: a path, or catalog.schema.table with Delta")
    p.add_argument("--errors", help="errors table (default: <output>_errors)")
    p.add_argument("--model", help="backbone: resnet50, inception_v3, densenet121, vgg19, efficientnet_b0 (keras); "
                   "efficientnet_lite0, tv_resnet50, tv_densenet121 (torch)")
    p.add_argument("--engine", choices=["auto", "keras", "torch"], help="inference engine (default auto: the backbone's own)")
    p.add_argument("--weights", help="imagenet | none | /path/to/weights.h5 (keras) or .pth (torch)")
    p.add_argument("--weights-sha256", help="stop unless the weights file has this sha256")
    p.add_argument("--format", choices=["auto", "delta", "parquet"], help="table format (default auto)")
    p.add_argument("--mode", choices=["incremental", "overwrite"], help="incremental (default) or overwrite")
    p.add_argument("--batch-size", type=int, help="images per model call")
    p.add_argument("--label-mode", choices=["auto", "folder", "manifest", "none"],
                   help="where labels come from (default auto: the manifest if given, else the folder)")
    p.add_argument("--manifest", help="CSV with path,label (implies --label-mode manifest)")
    p.add_argument("--split-mode", choices=["none", "hash", "folder"], help="train/test assignment")


def overrides(a: argparse.Namespace) -> dict[str, Any]:
    return {
        "input.path": a.input,
        "output.path": a.output,
        "output.errors_path": a.errors,
        "model.name": a.model,
        "model.weights": a.weights,
        "inference.engine": a.engine,
        "model.weights_sha256": a.weights_sha256,
        "output.format": a.format,
        "output.mode": a.mode,
        "inference.batch_size": a.batch_size,
        "input.label.mode": a.label_mode,
        "input.label.manifest": a.manifest,
        "input.split.mode": a.split_mode,
    }


def run(a: argparse.Namespace, cfg: Config) -> dict[str, Any]:
    from imgfeat.featurize.extract import run_extract
    from imgfeat.session import get_spark

    result = run_extract(get_spark(cfg), cfg)
    print(result.summary(), flush=True)
    return result.to_dict()
