"""``imgfeat train``: features table -> one MLflow child run per backbone x head."""

from __future__ import annotations

import argparse
from typing import Any

from imgfeat.config import Config

HELP = "train classifier heads on a features table, tracked in MLflow"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", help="features table written by `imgfeat extract` (its --output)")
    p.add_argument("--heads", help="comma-separated heads: lr,rf,dt,gbt,svc,keras (default lr,rf,dt)")
    p.add_argument("--backbones", help="comma-separated backbones to use (default: all in the table)")
    p.add_argument("--experiment", help="MLflow experiment name (default imgfeat)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--test-fraction", type=float, help="test share per class for the hash split (default 0.2)")
    p.add_argument("--split-mode", choices=["auto", "column", "hash"], help="auto (default): the table's split column if it has train and test")
    p.add_argument("--cv-folds", type=int, help="K >= 2: select hyperparameters with K-fold CrossValidator over train.grid")
    p.add_argument("--class-weighting", action="store_const", const=True, help="weight rows by inverse class frequency")
    p.add_argument("--positive-class", help="class reported by compare (default: last label alphabetically)")
    p.add_argument("--register", metavar="NAME", help="register the best run's model in the Model Registry as NAME")
    p.add_argument("--format", choices=["auto", "delta", "parquet"], help="format of the features table (default auto)")
    p.add_argument("--allow-group-overlap", action="store_const", const=True,
                   help="train even if train and test share a group (patient)")
    p.add_argument("--allow-duplicates", action="store_const", const=True,
                   help="train even if the same image content is in train and test")
    p.add_argument("--allow-label-conflicts", action="store_const", const=True,
                   help="train even if identical files carry different labels (one of them is wrong)")
    p.add_argument("--target-sensitivity", type=float, help="binary: report the operating point at this sensitivity (0.95)")
    p.add_argument("--aggregate", choices=["none", "study", "series", "patient"],
                   help="also report results per study / series / patient (the split then never cuts one)")
    p.add_argument("--aggregation", choices=["mean", "max", "noisy_or"], help="how a study's image probabilities combine (mean)")
    p.add_argument("--pool-slices", choices=["none", "mean", "max"], help="pool a volume's slices into one row before the head")
    p.add_argument("--threshold", choices=["youden", "sensitivity"],
                   help="multi-label: how each finding's threshold is chosen on held-out training patients (youden)")


def overrides(a: argparse.Namespace) -> dict[str, Any]:
    return {
        "train.features": a.features,
        "train.heads": a.heads,
        "train.backbones": a.backbones,
        "mlflow.experiment": a.experiment,
        "mlflow.tracking_uri": a.tracking_uri,
        "train.test_fraction": a.test_fraction,
        "train.split_mode": a.split_mode,
        "train.cv_folds": a.cv_folds,
        "train.class_weighting": a.class_weighting,
        "train.positive_class": a.positive_class,
        "train.register": a.register,
        "output.format": a.format,
        "train.validity.allow_group_overlap": a.allow_group_overlap,
        "train.validity.allow_duplicates": a.allow_duplicates,
        "train.validity.allow_label_conflicts": a.allow_label_conflicts,
        "train.validity.target_sensitivity": a.target_sensitivity,
        "train.aggregate": a.aggregate,
        "train.aggregation": a.aggregation,
        "train.pool_slices": a.pool_slices,
        "train.threshold": a.threshold,
    }


def run(a: argparse.Namespace, cfg: Config) -> dict[str, Any]:
    from imgfeat.session import get_spark
    from imgfeat.train.fit import run_train

    result = run_train(get_spark(cfg), cfg)
    print(result.summary(), flush=True)
    return result.to_dict()
