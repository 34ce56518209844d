"""``imgfeat compare``: the latest train run's backbone x head table, best first."""

from __future__ import annotations

import argparse
from typing import Any

from imgfeat.config import Config

HELP = "compare the runs of the latest `imgfeat train` in an MLflow experiment (multi-label: with the best run's per-finding table)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", help="MLflow experiment name (default imgfeat)")
    p.add_argument("--positive-class", help="class whose precision, recall and F1 are shown (default: last label)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--run-id", help="parent run of the train call to compare (default: the latest)")
    p.add_argument("--sort-by", help="metric to sort by, e.g. test_accuracy (default train.select_metric)")


def overrides(a: argparse.Namespace) -> dict[str, Any]:
    return {
        "mlflow.experiment": a.experiment,
        "train.positive_class": a.positive_class,
        "mlflow.tracking_uri": a.tracking_uri,
        "train.select_metric": a.sort_by,
    }


def run(a: argparse.Namespace, cfg: Config) -> dict[str, Any]:
    import pandas as pd

    from imgfeat.train.compare import run_compare
    from imgfeat.train.tracking import tracking_uri

    table = run_compare(cfg, a.run_id)
    with pd.option_context("display.max_columns", None, "display.width", 200, "display.float_format", "{:.4f}".format):
        print(table.to_string(index=False), flush=True)
    print("[imgfeat] *_ci: 95 % bootstrap intervals; equal ranks are ties (overlapping intervals)")
    if table.attrs.get("paired_test"):
        print(f"[imgfeat] best two, paired on the same test images: {table.attrs['paired_test']}")
    findings = table.attrs.get("findings")
    if findings is not None:
        print(f"[imgfeat] per finding, {table.attrs['findings_title']} (sorted by {table.attrs['sort_by']}):")
        with pd.option_context("display.max_columns", None, "display.width", 250):
            print(pd.DataFrame(findings).to_string(index=False), flush=True)
        print("[imgfeat] also logged as comparison_findings.md/.csv")
    print(f"[imgfeat] logged comparison.md/.csv/.png to parent run {table.attrs['parent_run_id']}; "
          f"open the MLflow UI with: mlflow ui --backend-store-uri {tracking_uri(cfg.mlflow)}")
    return {"parent_run_id": table.attrs["parent_run_id"], "positive_class": table.attrs["positive_class"],
            "paired_test": table.attrs.get("paired_test"), "rows": table.to_dict(orient="records"),
            **({"findings": findings} if findings is not None else {})}
