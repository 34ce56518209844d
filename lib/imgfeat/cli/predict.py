"""``imgfeat predict``: score an image folder with a model logged by `imgfeat train`."""

from __future__ import annotations

import argparse
from typing import Any

from imgfeat.config import Config

HELP = "predict labels for a folder of images with a logged model (runs:/ID/model or models:/NAME/VERSION)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-uri", help="runs:/RUN_ID/model or models:/NAME/VERSION")
    p.add_argument("--input", help="folder of images to score")
    p.add_argument("--output", help="predictions table: a path, or catalog.schema.table with Delta")
    p.add_argument("--errors", help="errors table (default: <output>_errors)")
    p.add_argument("--format", choices=["auto", "delta", "parquet"], help="table format (default auto)")
    p.add_argument("--mode", choices=["incremental", "overwrite"], help="incremental (default) or overwrite")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--weights", help="local copy of the model's weights file (default: the logged copy)")
    p.add_argument("--label-mode", choices=["auto", "folder", "manifest", "none"], help="known labels to keep beside predictions")
    p.add_argument("--aggregate", choices=["none", "study", "series", "patient"],
                   help="multi-label models: also one row per study (series, patient) in <output>_studies")
    p.add_argument("--aggregation", choices=["mean", "max", "noisy_or"],
                   help="how a study's images combine (default: the model's own, else mean)")


def overrides(a: argparse.Namespace) -> dict[str, Any]:
    return {
        "predict.model_uri": a.model_uri,
        "input.path": a.input,
        "output.path": a.output,
        "output.errors_path": a.errors,
        "output.format": a.format,
        "output.mode": a.mode,
        "mlflow.tracking_uri": a.tracking_uri,
        "input.label.mode": a.label_mode,
        "predict.weights": a.weights,
        "predict.aggregate": a.aggregate,
        "predict.aggregation": a.aggregation,
    }


def run(a: argparse.Namespace, cfg: Config) -> dict[str, Any]:
    from imgfeat.serve.batch import run_predict
    from imgfeat.session import get_spark

    result = run_predict(get_spark(cfg), cfg)
    print(result.summary(), flush=True)
    return result.to_dict()
