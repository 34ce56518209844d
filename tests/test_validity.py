"""Results a reviewer can trust: grouped splits, the leakage audit, bootstrap intervals, calibration, paired tests."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from imgfeat.config import load_config
from imgfeat.demo.samples import encode, realistic_xray_array

from conftest import tiny_config

# ---------------------------------------------------------------------------------------------
# uncertainty (no Spark): weighted computations equal scikit-learn with sample weights


def _binary_predictions(n=80, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    score = np.clip(0.35 * y + rng.uniform(0, 0.65, n), 0, 1).round(2)  # ties on purpose
    proba = np.stack([1 - score, score], 1)
    return y, (score > 0.5).astype(int), proba


def test_resampled_metrics_equal_scikit_learn_with_the_same_weights():
    from sklearn import metrics as skm

    from imgfeat.train.uncertainty import _cm_metrics, _weighted_auc, _weighted_cm, resample_weights

    y, p, proba = _binary_predictions()
    w = resample_weights(np.arange(len(y)), 5, seed=3)
    cms = _cm_metrics(_weighted_cm(y, p, w, 2))
    aucs = _weighted_auc(y == 1, proba[:, 1], w)
    for b in range(5):
        sw = w[b]
        assert cms["accuracy"][b] == pytest.approx(skm.accuracy_score(y, p, sample_weight=sw))
        assert cms["f1_macro"][b] == pytest.approx(skm.f1_score(y, p, average="macro", sample_weight=sw))
        assert cms["kappa"][b] == pytest.approx(skm.cohen_kappa_score(y, p, sample_weight=sw))
        assert cms["recall_1"][b] == pytest.approx(skm.recall_score(y, p, sample_weight=sw))
        assert aucs[b] == pytest.approx(skm.roc_auc_score(y, proba[:, 1], sample_weight=sw))


def test_intervals_contain_the_estimate_are_seeded_and_resample_groups_whole():
    from imgfeat.train.metrics import classification_metrics
    from imgfeat.train.uncertainty import bootstrap_intervals, resample_weights

    y, p, proba = _binary_predictions(200)
    labels = ["NORMAL", "PNEUMONIA"]
    point, _ = classification_metrics(y, p, proba, labels)
    ci = bootstrap_intervals(y, p, proba, labels, np.arange(len(y)), resamples=1000, seed=1)
    for name in ("accuracy", "f1_macro", "kappa", "roc_auc", "log_loss", "recall_PNEUMONIA", "precision_NORMAL"):
        assert ci[f"test_{name}_ci_low"] <= point[f"test_{name}"] <= ci[f"test_{name}_ci_high"], name
    assert ci == bootstrap_intervals(y, p, proba, labels, np.arange(len(y)), resamples=1000, seed=1)
    width = ci["test_accuracy_ci_high"] - ci["test_accuracy_ci_low"]
    assert 0.03 < width < 0.2
    # Groups of 4 images move together: weights are equal inside a group, and intervals get wider.
    groups = np.arange(len(y)) // 4
    w = resample_weights(groups, 50, seed=2)
    assert all(len(set(w[b, groups == g])) == 1 for b in range(50) for g in range(5))


def test_calibration_operating_point_and_mcnemar():
    from scipy.stats import binomtest

    from imgfeat.train.uncertainty import calibration, mcnemar, operating_point

    y = np.array([0, 0, 1, 1, 1, 1])
    proba = np.array([[0.9, 0.1], [0.6, 0.4], [0.4, 0.6], [0.2, 0.8], [0.1, 0.9], [0.7, 0.3]])
    cal = calibration(y, proba, bins=2)  # top-class confidences 0.9 0.6 0.6 0.8 0.9 0.7, five of six right
    assert cal["ece"] == pytest.approx(abs(5 / 6 - np.mean([0.9, 0.6, 0.6, 0.8, 0.9, 0.7])))
    point = operating_point(y == 1, proba[:, 1], 0.75)
    assert point == {"threshold": 0.6, "sensitivity": 0.75, "specificity": 1.0}
    a = np.array([1, 1, 1, 1, 1, 0, 1, 0], dtype=bool)
    b = np.array([1, 0, 0, 0, 1, 0, 1, 1], dtype=bool)
    result = mcnemar(a, b)
    assert (result["only_a_correct"], result["only_b_correct"]) == (3, 1)
    assert result["p_value"] == pytest.approx(binomtest(3, 4, 0.5).pvalue)


# ---------------------------------------------------------------------------------------------
# groups, duplicates and the audit, end to end


def _write(path, arr, kind="gray_jpeg"):
    data, _ = encode(arr, kind)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)


def _kermany_like(root, patients=12, per_patient=3, seed=0):
    """Files named as in Kermany: person<N>_bacteria_<k>.jpeg (PNEUMONIA), IM-<N>-000<k>.jpeg (NORMAL)."""
    rng = np.random.default_rng(seed)
    for p in range(patients):
        for k in range(per_patient):
            _write(os.path.join(root, "PNEUMONIA", f"person{100 + p}_bacteria_{k}.jpeg"),
                   realistic_xray_array(rng, (96, 96), sick=True))
            _write(os.path.join(root, "NORMAL", f"IM-{200 + p:04d}-000{k}.jpeg"), realistic_xray_array(rng, (96, 96), sick=False))


def test_grouped_split_keeps_every_patient_on_one_side(spark, tmp_path):
    from imgfeat.featurize.extract import run_extract
    from imgfeat.train.split import audit_table

    root = str(tmp_path / "img")
    _kermany_like(root)
    features = str(tmp_path / "features")
    extracted = run_extract(spark, tiny_config(root, features, "input.split.group=regex", "input.split.group_pattern=kermany",
                                               "input.split.mode=hash", "input.split.test_fraction=0.3"))
    assert extracted.ungrouped == 0
    table = spark.read.parquet(features).toPandas()
    assert table["group_id"].nunique() == 24 and set(table["group_id"].str[:6]) == {"person", "IM-020", "IM-021"}
    # The extract-time hash split: each patient on one side.
    assert (table.groupby("group_id")["split"].nunique() == 1).all()
    # train's own hash split (no split column used) is grouped too; the audit agrees.
    cfg = load_config(sets=[f"train.features={features}", "train.split_mode=hash", "train.test_fraction=0.25"])
    report = audit_table(spark, cfg)
    assert report.groups == 24 and report.groups_across_splits_count == 0
    assert report.class_balance["test"]["NORMAL"] == report.class_balance["test"]["PNEUMONIA"] == 9  # 3 patients x 3


def test_the_audit_finds_duplicates_and_train_refuses_a_leaking_split(spark, tmp_path):
    from imgfeat.featurize.extract import run_extract
    from imgfeat.train.audit import LeakageError
    from imgfeat.train.fit import run_train
    from imgfeat.train.split import audit_table

    rng = np.random.default_rng(4)
    root = tmp_path / "img"
    for split in ("train", "test"):
        for label in ("NORMAL", "PNEUMONIA"):
            for i in range(6):
                _write(str(root / split / label / f"{split}_{label}_{i}.png"),
                       realistic_xray_array(rng, (96, 96), sick=label == "PNEUMONIA"), "rgb_png")
    # An exact copy across splits and classes, and a re-encoded, brightened near copy across splits.
    shutil.copy(root / "train" / "NORMAL" / "train_NORMAL_0.png", root / "test" / "PNEUMONIA" / "copied.png")
    original = realistic_xray_array(np.random.default_rng(9), (96, 96), sick=False)
    _write(str(root / "train" / "NORMAL" / "original.png"), original, "rgb_png")
    _write(str(root / "test" / "NORMAL" / "near_copy.jpeg"), np.clip(original * 1.04, 0, 1), "gray_jpeg")
    features = str(tmp_path / "features")
    run_extract(spark, tiny_config(str(root), features, "input.split.mode=folder", "input.split.folder_level=2"))

    report = audit_table(spark, load_config(sets=[f"train.features={features}"]))
    assert report.split_mode == "column"
    assert report.exact_duplicate_sets == 1 and report.exact_cross_split_count == 1 and report.exact_cross_label_count == 1
    assert sorted(report.exact_cross_split[0]["paths"]) == ["test/PNEUMONIA/copied.png", "train/NORMAL/train_NORMAL_0.png"]
    near = {(p["a"], p["b"]) for p in report.near_cross_split}
    assert ("test/NORMAL/near_copy.jpeg", "train/NORMAL/original.png") in near
    assert report.class_balance == {"train": {"NORMAL": 7, "PNEUMONIA": 6}, "test": {"NORMAL": 7, "PNEUMONIA": 7}}

    store = "sqlite:///" + str(tmp_path / "mlflow.db")
    sets = [f"train.features={features}", "train.heads=[dt]", f"mlflow.tracking_uri={store}", "mlflow.experiment=leak",
            "train.validity.bootstrap_resamples=200"]
    with pytest.raises(LeakageError, match=r"copied\.png"):
        run_train(spark, load_config(sets=sets))
    # train's own hash split keeps the duplicates together (and --allow-duplicates would train on the leak); the
    # copy still carries two labels, which stops train unless allowed (tests/test_phi.py).
    result = run_train(spark, load_config(sets=[*sets, "train.split_mode=hash", "train.validity.allow_label_conflicts=true"]))
    assert result.audit["exact_cross_split_count"] == 0 and result.runs
    import mlflow

    client = mlflow.MlflowClient(store)
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"audit.json", "audit.md"} <= artifacts
    logged = open(client.download_artifacts(result.parent_run_id, "audit.json")).read()
    assert "copied.png" not in logged and ".png" not in logged  # the artifact names contents, not files
    failed = [r for r in client.search_runs([result.experiment_id]) if r.info.status == "FAILED"]
    assert len(failed) == 1 and "audit.json" in {a.path for a in client.list_artifacts(failed[0].info.run_id)}


def test_every_logged_metric_has_an_interval_and_compare_ranks_ties(spark, samples, tmp_path):
    import mlflow

    from imgfeat.featurize.extract import run_extract
    from imgfeat.train.compare import run_compare
    from imgfeat.train.fit import run_train

    features = str(tmp_path / "features")
    run_extract(spark, tiny_config(samples.root, features, "input.split.mode=hash", "input.split.test_fraction=0.4"))
    store = "sqlite:///" + str(tmp_path / "mlflow.db")
    sets = [f"train.features={features}", "train.heads=[lr, dt]", f"mlflow.tracking_uri={store}", "mlflow.experiment=ci",
            "train.positive_class=PNEUMONIA"]
    result = run_train(spark, load_config(sets=sets))
    for run in result.runs:
        m = run.metrics
        point_metrics = [k for k in m if k.startswith("test_") and not k.endswith(("_ci_low", "_ci_high"))
                         and k not in ("test_ece", "test_threshold_at_target_sensitivity", "test_sensitivity_at_target",
                                       "test_specificity_at_target_sensitivity")]
        for name in point_metrics:
            assert f"{name}_ci_low" in m and m[f"{name}_ci_low"] <= m[name] + 1e-9 <= m[f"{name}_ci_high"] + 2e-9, name
        assert 0 <= m["test_ece"] <= 1 and "test_specificity_at_target_sensitivity" in m
    assert result.paired_test and 0 <= result.paired_test["p_value"] <= 1
    client = mlflow.MlflowClient(store)
    assert "reliability_diagram.png" in {a.path for a in client.list_artifacts(result.runs[0].run_id)}
    table = run_compare(load_config(sets=sets))
    assert all(table[f"{c}_ci"].str.match(r"^\d\.\d{3}-\d\.\d{3}$").all() for c in ("accuracy", "f1_macro", "auc"))
    assert table["rank"].iloc[0] == 1 and table.attrs["paired_test"].startswith(f"{result.paired_test['a']} vs")
    assert table["specificity_at_target_sensitivity"].between(0, 1).all() and table["ece"].between(0, 1).all()


def test_groups_from_a_manifest_column(spark, tmp_path):
    from imgfeat.featurize.extract import run_extract

    rng = np.random.default_rng(5)
    root = tmp_path / "img"
    lines = ["path,label,patient"]
    for i in range(12):
        name = f"scan_{i:03d}.png"
        _write(str(root / name), realistic_xray_array(rng, (64, 64), sick=i % 2 == 1), "rgb_png")
        lines.append(f"{name},{'PNEUMONIA' if i % 2 else 'NORMAL'},P{i // 4}")  # 3 patients, 4 scans each
    manifest = tmp_path / "labels.csv"
    manifest.write_text("\n".join(lines) + "\n")
    features = str(tmp_path / "features")
    run_extract(spark, tiny_config(str(root), features, f"input.label.manifest={manifest}",
                                   "input.split.group=manifest_column", "input.split.group_column=patient",
                                   "input.split.mode=hash", "input.split.test_fraction=0.4"))
    table = spark.read.parquet(features).toPandas()
    assert sorted(table["group_id"].unique()) == ["P0", "P1", "P2"]
    assert (table.groupby("group_id")["split"].nunique() == 1).all() and set(table["label"]) == {"NORMAL", "PNEUMONIA"}
