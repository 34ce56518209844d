"""Behaviour pinned across refactors: extract, train, predict and finetune give the tables and metrics recorded in
``tests/golden/equivalence.json`` on the same generated inputs.

The golden file was written by the code before the job-skeleton refactor (issue 34). Regenerate it only for an
intended change of behaviour, and say so in the commit: ``IMGFEAT_WRITE_GOLDEN=1 pytest tests/test_equivalence.py``.
Floats are compared with a tolerance (other CPUs may round the last bits differently); everything else exactly.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pytest

from conftest import tiny_config

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "equivalence.json")
WRITE = os.environ.get("IMGFEAT_WRITE_GOLDEN") == "1"
TOLERANCE = 2e-3  # features, probabilities, losses and metrics


def _rounded(values: Any, digits: int = 5) -> Any:
    if values is None:
        return None
    return [round(float(v), digits) for v in values]


def _extract_summary(spark: Any, features: str, errors: str) -> dict[str, Any]:
    rows = spark.read.parquet(features).toPandas()
    errs = spark.read.parquet(errors).toPandas()
    return {
        "features": {r.rel_path: [r.label, r.split, r.group_id, r.format, _rounded(r.features)]
                     for r in rows.sort_values("rel_path").itertuples()},
        "errors": {r.rel_path: [r.label, r.error_class] for r in errs.sort_values("rel_path").itertuples()},
        "columns": sorted(rows.columns), "error_columns": sorted(errs.columns),
    }


def _train_summary(result: Any) -> dict[str, Any]:
    keys = ("test_accuracy", "test_f1_macro", "test_kappa", "test_roc_auc", "test_log_loss")
    return {"labels": result.labels, "split_mode": result.split_mode, "n_train": result.n_train, "n_test": result.n_test,
            "runs": {r.head: {k: round(r.metrics[k], 6) for k in keys if k in r.metrics} for r in result.runs}}


def _predict_summary(spark: Any, output: str, result: Any) -> dict[str, Any]:
    preds = spark.read.parquet(output).toPandas()
    errs = spark.read.parquet(output + "_errors").toPandas()
    return {"counts": [result.listed, result.predicted, result.failed], "labels": result.labels,
            "predictions": {r.rel_path: [r.prediction, _rounded(r.probability)] for r in preds.sort_values("rel_path").itertuples()},
            "errors": {r.rel_path: r.error_class for r in errs.sort_values("rel_path").itertuples()},
            "columns": sorted(preds.columns)}


def _finetune_summary(result: Any) -> dict[str, Any]:
    history = [{k: round(float(v), 5) for k, v in h.items() if k in ("train_loss", "val_loss", "train_images", "val_images")}
               for h in result.history]
    keys = ("test_accuracy", "test_f1_macro", "test_roc_auc", "test_log_loss")
    return {"history": history, "best_epoch": result.best_epoch,
            "test": {k: round(result.test_metrics[k], 6) for k in keys if k in result.test_metrics},
            "table": {k: v for k, v in result.table.items() if k in ("counts", "listed", "failed")}}


@pytest.fixture(scope="module")
def outcomes(spark, tmp_path_factory) -> dict[str, Any]:
    from imgfeat.config import load_config
    from imgfeat.demo.samples import make_samples
    from imgfeat.featurize.extract import run_extract
    from imgfeat.finetune.run import run_finetune
    from imgfeat.serve.batch import run_predict
    from imgfeat.train.fit import run_train

    tmp = tmp_path_factory.mktemp("equivalence")
    images = make_samples(str(tmp / "images"), per_class=20, seed=11)
    store = "sqlite:///" + str(tmp / "mlflow.db")
    features = str(tmp / "features")
    run_extract(spark, tiny_config(images.root, features, "input.split.mode=hash", "input.split.test_fraction=0.3",
                                   "input.split.group=regex", r"input.split.group_pattern=^[a-z]+_\d{2}(\d\d)_"))
    out: dict[str, Any] = {"extract": _extract_summary(spark, features, features + "_errors")}
    trained = run_train(spark, load_config(sets=[
        f"train.features={features}", "train.heads=[lr, dt]", f"mlflow.tracking_uri={store}",
        "mlflow.experiment=equivalence", "train.validity.bootstrap_resamples=0", "train.dataset=equivalence"]))
    out["train"] = _train_summary(trained)
    best = next(r for r in trained.runs if r.head == "lr")
    predicted = str(tmp / "predictions")
    result = run_predict(spark, load_config(overrides={
        "predict.model_uri": f"runs:/{best.run_id}/model", "input.path": images.root, "output.path": predicted,
        "output.format": "parquet", "mlflow.tracking_uri": store}))
    out["predict"] = _predict_summary(spark, predicted, result)
    tuned = run_finetune(spark, load_config(
        overrides={"input.path": images.root, "finetune.output": str(tmp / "finetune"), "model.name": "tiny_torch",
                   "model.weights": "none", "input.split.mode": "hash", "mlflow.tracking_uri": store,
                   "mlflow.experiment": "equivalence-finetune"},
        sets=["finetune.epochs=2", "finetune.batch_size=8", "finetune.train_layers=all", "finetune.patience=0",
              "finetune.num_processes=1", "finetune.row_group_images=16", "input.split.test_fraction=0.25",
              "finetune.validation_fraction=0.2", "train.validity.bootstrap_resamples=0"]))
    out["finetune"] = _finetune_summary(tuned)
    return out


def _compare(got: Any, want: Any, where: str) -> list[str]:
    """Differences between two JSON-like values: floats within TOLERANCE, everything else equal."""
    if isinstance(want, dict) and isinstance(got, dict):
        if set(got) != set(want):
            return [f"{where}: keys differ: only now {sorted(set(got) - set(want))[:5]}, "
                    f"only before {sorted(set(want) - set(got))[:5]}"]
        return [d for k in want for d in _compare(got[k], want[k], f"{where}.{k}")]
    if isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            return [f"{where}: {len(got)} items now, {len(want)} before"]
        return [d for i, (g, w) in enumerate(zip(got, want, strict=True)) for d in _compare(g, w, f"{where}[{i}]")]
    if isinstance(want, float) or isinstance(got, float):
        ok = got is not None and want is not None and bool(np.isclose(got, want, rtol=TOLERANCE, atol=TOLERANCE))
        return [] if ok else [f"{where}: {got} now, {want} before"]
    return [] if got == want else [f"{where}: {got!r} now, {want!r} before"]


@pytest.mark.parametrize("job", ["extract", "train", "predict", "finetune"])
def test_the_jobs_give_the_recorded_tables_and_metrics(outcomes, job):
    if WRITE:
        recorded = json.load(open(GOLDEN)) if os.path.exists(GOLDEN) else {}
        recorded[job] = json.loads(json.dumps(outcomes[job]))
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w", encoding="utf-8") as fh:
            json.dump(recorded, fh, indent=1, sort_keys=True)
        pytest.skip("golden file written")
    want = json.load(open(GOLDEN))[job]
    differences = _compare(json.loads(json.dumps(outcomes[job])), want, job)
    assert not differences, "\n".join(differences[:20])
