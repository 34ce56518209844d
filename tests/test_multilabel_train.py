"""Multi-label training and study-, series- and volume-level results: per-finding heads and metrics with
intervals, masked targets provably out of training and metrics, thresholds stored with the model, study-level
kappa and AUC for a single-label (MURA-style) task equal to scikit-learn's on the mean of the images'
probabilities, and one pooled row per volume."""

from __future__ import annotations

import os

import numpy as np
import pytest

from imgfeat.config import load_config

FINDINGS = ["Effusion", "Nodule", "Pleural Thickening", "Hernia"]
DIM = 16  # the tiny backbone's feature width
SCHEMA = ("image_id string, path string, rel_path string, label string, split string, features array<float>, "
          "model string, weights_id string, labels array<string>, label_mask array<string>, findings array<string>, "
          "study_id string, group_id string, slice_index int")


def _multilabel_rows(seed: int = 3) -> list[tuple]:
    """48 patients (2 or 3 images each, a study per 2 images); 3 findings learnable from shifted Gaussian features;
    Hernia positive only in training patients; ~15 % of (image, finding) entries masked, half of them listed as
    positive. Two backbones with the same features: tiny_torch's rows have every masked target flipped."""
    rng = np.random.default_rng(seed)
    shifts = rng.normal(0, 3.0, (len(FINDINGS), DIM))
    rows = []
    for patient in range(48):
        split = "test" if patient >= 36 else "train"
        for i in range(2 if patient % 2 == 0 else 3):
            study = f"p{patient}-s{i // 2}"
            truth = rng.random(3) < [0.4, 0.35, 0.3]
            hernia = split == "train" and patient % 9 == 0
            positive = [*truth, hernia]
            x = rng.normal(0, 1.0, DIM) + sum(shifts[j] for j in range(4) if positive[j])
            masked = [j for j in range(3) if rng.random() < 0.15]
            known = [FINDINGS[j] for j in range(4) if positive[j] and j not in masked]
            listed = [j for j in masked if rng.random() < 0.5]  # a masked target: positive or not, it must not matter
            path = f"file:/nih/images/{patient:03d}_{i}.png"
            for model, flip in (("tiny", False), ("tiny_torch", True)):
                labels = known + [FINDINGS[j] for j in masked if (j in listed) != flip]
                rows.append((f"id{patient:03d}{i}", path, path[10:], None, split, x.astype(float).tolist(), model,
                             "none-seed42", sorted(labels), sorted(FINDINGS[j] for j in masked), FINDINGS, study,
                             f"patient{patient}", None))
    return rows


def _write(spark, rows, path):
    spark.createDataFrame(rows, SCHEMA).write.mode("overwrite").parquet(path)
    return path


def _config(table, store, experiment, *sets):
    return load_config(sets=[
        f"train.features={table}", "train.heads=[lr, keras]", f"mlflow.tracking_uri={store}",
        f"mlflow.experiment={experiment}", "train.validity.bootstrap_resamples=100", "train.params.lr_max_iter=20",
        "train.keras.epochs=15", "train.keras.hidden_units=0", "train.threshold_fraction=0.25", *sets])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return "sqlite:///" + str(tmp_path_factory.mktemp("mlflow") / "mlflow.db")


@pytest.fixture(scope="module")
def multi(spark, tmp_path_factory, store):
    from pyspark.sql import functions as F

    from imgfeat.train.fit import run_train

    table = str(tmp_path_factory.mktemp("multi") / "features")
    rows = spark.createDataFrame(_multilabel_rows(), SCHEMA)
    rows.withColumn("label_policy", F.lit("uncertain=ignore; blank=zeros")).write.mode("overwrite").parquet(table)
    return run_train(spark, _config(table, store, "multi", "train.aggregate=study"))


def test_per_finding_metrics_with_intervals_and_the_table_are_logged(multi, store):
    from mlflow.tracking import MlflowClient

    result = multi
    assert result.task == "multi" and result.labels == FINDINGS and result.select_metric == "test_auc_macro"
    assert [(r.backbone, r.head) for r in result.runs] == [("tiny", "lr"), ("tiny", "keras"), ("tiny_torch", "lr"),
                                                           ("tiny_torch", "keras")]
    client = MlflowClient(store)
    # How the targets were read travels with the runs: a U-Ones model is not a U-Ignore model.
    assert client.get_run(result.parent_run_id).data.params["label_policy"] == "uncertain=ignore; blank=zeros"
    for run in result.runs:
        assert client.get_run(run.run_id).data.params["label_policy"] == "uncertain=ignore; blank=zeros"
        m = run.metrics
        for finding in ("Effusion", "Nodule", "Pleural_Thickening"):
            for name in ("auc", "ap", "sensitivity", "specificity", "prevalence"):
                key = f"test_{name}_{finding}"
                assert m[f"{key}_ci_low"] <= m[key] <= m[f"{key}_ci_high"], key
            assert m[f"test_auc_{finding}"] > 0.75, (run.head, finding, m[f"test_auc_{finding}"])
        assert m["test_auc_macro_ci_low"] <= m["test_auc_macro"] <= m["test_auc_macro_ci_high"]
        assert "test_auc_micro" in m and "study_test_auc_macro" in m and "study_test_auc_Effusion_ci_low" in m
        artifacts = {a.path for a in client.list_artifacts(run.run_id)}
        assert {"findings.csv", "findings.md", "roc_findings.png", "findings_study.csv", "thresholds.json",
                "findings_report.json", "model"} <= artifacts
    best = next(r for r in result.runs if r.run_id == result.best_run_id)
    assert best.metrics["test_auc_macro"] == max(r.metrics["test_auc_macro"] for r in result.runs)
    summary = result.summary()
    assert "macro AUC" in summary and "per finding, best run" in summary and "Pleural Thickening" in summary


def test_a_finding_without_a_positive_test_example_is_reported_as_such(multi, store):
    import pandas as pd
    from mlflow.tracking import MlflowClient

    for run in multi.runs:
        m = run.metrics
        assert m["test_positives_Hernia"] == 0 and "test_auc_Hernia" not in m and "test_sensitivity_Hernia" not in m
        assert m["test_findings_without_both_classes"] == 1
        table = pd.read_csv(MlflowClient(store).download_artifacts(run.run_id, "findings.csv"), keep_default_na=False)
        hernia = table[table["finding"] == "Hernia"].iloc[0]
        assert hernia["note"] == "no positive test example" and hernia["auc"] == "n/a"
        # The macro mean is over the findings with both classes only: never a NaN hidden in it.
        aucs = [m[f"test_auc_{f}"] for f in ("Effusion", "Nodule", "Pleural_Thickening")]
        assert m["test_auc_macro"] == pytest.approx(np.mean(aucs))


def test_masked_targets_are_out_of_training_and_metrics(multi):
    """Every masked target flipped (tiny_torch's rows): every logged number of every head is the same."""
    a = [r for r in multi.runs if r.backbone == "tiny"]
    b = [r for r in multi.runs if r.backbone == "tiny_torch"]
    assert len(a) == len(b) == 2
    for run_a, run_b in zip(a, b, strict=True):
        assert run_a.head == run_b.head
        assert run_a.metrics.keys() == run_b.metrics.keys()
        for key, value in run_a.metrics.items():
            assert run_b.metrics[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (run_a.head, key)
        masked = sum(run_a.metrics[f"test_masked_{f}"] for f in ("Effusion", "Nodule", "Pleural_Thickening"))
        assert masked > 0


def test_thresholds_are_stored_with_both_logged_models(multi, store, spark):
    import mlflow

    from imgfeat.scoring.flavor import load_model

    mlflow.set_tracking_uri(store)
    for run in multi.runs[:2]:
        classifier = load_model(f"runs:/{run.run_id}/pyfunc_model")
        info, head = classifier.info, classifier.head
        thresholds = [run.metrics[f"test_threshold_{f.replace(' ', '_')}"] for f in FINDINGS]
        assert info.task == "multi" and info.findings == FINDINGS and info.labels == FINDINGS
        assert info.thresholds == pytest.approx(thresholds) and info.aggregation == "mean"
        assert thresholds[-1] == 0.5  # Hernia: no positive in the held-out share either
        assert head.kind == "findings" and head.findings == FINDINGS
        assert head.meta["mode"] == ("masked_bce" if run.head == "keras" else "per_finding")
        stages = mlflow.spark.load_model(f"runs:/{run.run_id}/model").stages
        assert type(stages[-1]).__name__ == "FindingsHeadModel"
        assert stages[-1].getThresholds() == pytest.approx(thresholds) and stages[-1].getFindings() == FINDINGS
        x = np.random.default_rng(0).normal(0, 3, (5, DIM))
        from pyspark.ml.functions import array_to_vector
        from pyspark.sql import functions as F

        df = spark.createDataFrame([(v.tolist(),) for v in x], "f array<double>").select(
            array_to_vector(F.col("f")).alias("features"))
        got = np.stack(stages[-1].transform(df).toPandas()["finding_probability"].to_numpy())
        np.testing.assert_allclose(got, head.finding_probabilities(x), rtol=1e-9)


def test_compare_prints_and_logs_the_best_runs_per_finding_table(multi, store, capsys):
    from mlflow.tracking import MlflowClient

    from imgfeat.cli import main

    result = multi
    assert main(["compare", "--experiment", "multi", "--tracking-uri", store]) == 0
    out = capsys.readouterr().out
    assert "auc_macro" in out and "auc_Pleural Thickening" in out and "per finding, best run" in out
    assert "no positive test example" in out and result.best_run_id in out
    artifacts = {a.path for a in MlflowClient(store).list_artifacts(result.parent_run_id)}
    assert {"comparison.md", "comparison_findings.csv", "comparison_findings.md"} <= artifacts


# ---------------------------------------------------------------------------------------------
# single-label studies (MURA) and volumes


def _mura_rows(seed: int = 5) -> tuple[list[tuple], dict[str, str]]:
    """30 patients x 2 studies x 2-3 images; the label (abnormal / normal) is the study's; every other image is a
    volume of 2 slices. Returns the rows and the study of each path."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(0, 1.2, (2, DIM))
    rows, study_of = [], {}
    for patient in range(30):
        for s in range(2):
            label = ["abnormal", "normal"][int(rng.random() < 0.5)]
            study = f"XR_ELBOW/patient{patient:05d}/study{s + 1}_{label}"
            shift = centre[int(label == "normal")] + rng.normal(0, 0.8, DIM)  # a study's views look alike
            for i in range(2 + (patient + s) % 2):
                path = f"file:/mura/{study}/image{i + 1}.png"
                study_of[path] = study
                for slice_index in ((0, 1) if i % 2 else (None,)):
                    x = shift + rng.normal(0, 1.5, DIM)
                    rows.append((f"m{patient}{s}{i}", path, path[6:], label, "test" if patient >= 21 else "train",
                                 x.astype(float).tolist(), "tiny", "none-seed42", None, None, None, study,
                                 f"patient{patient:05d}", slice_index))
    return rows, study_of


def test_study_level_kappa_and_auc_of_a_single_label_task_equal_scikit_learn(spark, tmp_path, store):
    """MURA: a study's probability is the mean of its images' (each a pooled volume or an image); kappa and AUC
    per study, next to the image-level metrics."""
    import pandas as pd
    from sklearn.metrics import cohen_kappa_score, roc_auc_score

    from imgfeat.scoring.flavor import load_model
    from imgfeat.train.fit import run_train

    rows, study_of = _mura_rows()
    table = _write(spark, rows, str(tmp_path / "mura"))
    result = run_train(spark, load_config(sets=[
        f"train.features={table}", "train.heads=[lr]", f"mlflow.tracking_uri={store}", "mlflow.experiment=mura",
        "train.validity.bootstrap_resamples=100", "train.aggregate=study", "train.pool_slices=mean",
        "train.params.lr_max_iter=20"]))
    (run,) = result.runs
    assert result.n_train + result.n_test == len(study_of)  # one row per volume, not per slice
    frame = pd.DataFrame(rows, columns=[c.split()[0] for c in SCHEMA.split(", ")])
    test = frame[frame["split"] == "test"]
    pooled = test.groupby("path").agg(x=("features", lambda v: np.mean(np.stack(v.to_numpy()), axis=0)),
                                      label=("label", "first"))
    x = np.stack(pooled["x"].to_numpy()).astype(np.float32).astype(np.float64)
    _, proba = load_model(f"runs:/{run.run_id}/pyfunc_model").head.predict(x)  # [abnormal, normal]
    per_study = pd.DataFrame({"study": [study_of[p] for p in pooled.index], "p_normal": proba[:, 1],
                              "normal": pooled["label"].to_numpy() == "normal"}).groupby("study").mean()
    truth, called = per_study["normal"].to_numpy() == 1, per_study["p_normal"].to_numpy() >= 0.5
    m = run.metrics
    assert m["study_n_test"] == len(per_study) == 18
    assert m["study_test_kappa"] == pytest.approx(cohen_kappa_score(truth, called))
    assert m["study_test_roc_auc"] == pytest.approx(roc_auc_score(truth, per_study["p_normal"]))
    assert m["study_test_kappa_ci_low"] <= m["study_test_kappa"] <= m["study_test_kappa_ci_high"]
    assert "test_kappa" in m and m["study_test_roc_auc"] > 0.8
    assert "study (18 in test): kappa" in result.summary()
    assert load_model(f"runs:/{run.run_id}/pyfunc_model").info.aggregation == "mean"


def test_pool_slices_gives_one_row_per_volume_with_the_mean_or_max_features(spark):
    from imgfeat.train.aggregate import pool_slices

    rows, study_of = _mura_rows()
    frame = spark.createDataFrame(rows, SCHEMA)
    for how, reduce in (("mean", np.mean), ("max", np.max)):
        pooled = pool_slices(frame, how).toPandas().set_index("path")
        assert len(pooled) == len(study_of) and pooled["slice_index"].isna().all()
        volume = next(r for r in rows if r[-1] == 1)[1]
        slices = np.array([r[5] for r in rows if r[1] == volume])
        np.testing.assert_allclose(pooled.loc[volume, "features"], reduce(slices, axis=0).astype(np.float32), rtol=1e-6)
        assert pooled.loc[volume, "pooled_slices"] == 2 and pooled.loc[volume, "study_id"] == study_of[volume]


def test_a_split_never_cuts_a_study(spark):
    """No patients: with train.aggregate=study the study is the split unit, stratified as before."""
    from imgfeat.train.split import assign_split, labelled_images

    rows, study_of = _mura_rows()
    frame = spark.createDataFrame(rows, SCHEMA).drop("group_id", "split")
    for aggregate, cut in (("study", False), ("none", True)):
        cfg = load_config(sets=["train.test_fraction=0.3", f"train.aggregate={aggregate}"])
        split, mode = assign_split(labelled_images(frame), cfg.train)
        sides = split.select("path", "is_test").distinct().toPandas()
        per_study = sides.assign(study=sides["path"].map(study_of)).groupby("study")["is_test"].nunique()
        assert mode == "hash" and (per_study.max() > 1) == cut


def test_a_single_label_study_with_two_labels_is_refused_by_name():
    from imgfeat.train.aggregate import single_label_per_key

    keys = np.array(["s1", "s1", "s2", "s2"])
    assert list(single_label_per_key(keys, np.array([1, 1, 0, 0]), ["A", "B"], "study")) == [1, 0]
    with pytest.raises(ValueError, match=r"study 's2' carry different labels \(A and B\)"):
        single_label_per_key(keys, np.array([1, 1, 0, 1]), ["A", "B"], "study")


def test_svc_is_refused_for_multi_label_and_the_default_metric_switches():
    from imgfeat.train.fit import _task_settings

    cfg = load_config(sets=["train.heads=[lr, svc]"])
    with pytest.raises(ValueError, match="svc cannot give"):
        _task_settings(cfg.train, multi=True)
    assert _task_settings(cfg.train, multi=False) == "test_f1_macro"
    assert _task_settings(load_config(sets=["train.heads=[lr]"]).train, multi=True) == "test_auc_macro"
    assert _task_settings(load_config(sets=["train.heads=[lr]", "train.select_metric=test_auc_Nodule"]).train,
                          multi=True) == "test_auc_Nodule"


def test_findings_head_arrays_and_classifier_json_round_trip(tmp_path):
    from imgfeat.backbones.registry import get_backbone
    from imgfeat.io.decoders import DecodeOptions
    from imgfeat.scoring.flavor import ClassifierInfo, read_info, save_model
    from imgfeat.scoring.heads import HeadArrays
    from imgfeat.train.export import export_masked_head
    from imgfeat.train.finding_heads import MaskedHead

    rng = np.random.default_rng(1)
    w, b = rng.normal(size=(DIM, 2)), rng.normal(size=2)
    linear = HeadArrays("linear", {"weights": np.stack([np.zeros(DIM), w[:, 0]]), "bias": np.array([0.0, b[0]])},
                        {"probabilistic": True, "mode": "lr"})
    constant = HeadArrays("constant", {"rate": np.array([0.25])}, {"probabilistic": True, "mode": "constant"})
    head = HeadArrays("findings", {}, {"probabilistic": True, "mode": "per_finding", "findings": ["A", "B"]},
                      [linear, constant])
    x = rng.normal(size=(4, DIM))
    expected = np.stack([1 / (1 + np.exp(-(x @ w[:, 0] + b[0]))), np.full(4, 0.25)], axis=1)
    masked = export_masked_head(MaskedHead([w], [b]), ["A", "B"])
    np.testing.assert_allclose(masked.finding_probabilities(x), 1 / (1 + np.exp(-(x @ w + b))))
    decode = DecodeOptions(size=32)
    for h in (head, masked):
        info = ClassifierInfo.describe(model_name="tiny", weights="none", weights_sha256="", seed=42,
                                       weights_id="none-seed42", decode=decode, precision="fp32", labels=["A", "B"],
                                       head_name="lr", head_kind=h.kind, findings=["A", "B"], thresholds=[0.3, 0.5],
                                       aggregation="max")
        folder = save_model(str(tmp_path / h.meta["mode"]), info, h)
        back = read_info(folder, folder)
        assert (back.task, back.findings, back.thresholds, back.aggregation) == ("multi", ["A", "B"], [0.3, 0.5], "max")
        loaded = HeadArrays.load(os.path.join(folder, "head"))
        np.testing.assert_allclose(loaded.finding_probabilities(x), h.finding_probabilities(x))
        with pytest.raises(ValueError, match="finding_probabilities"):
            loaded.predict(x)
    np.testing.assert_allclose(head.finding_probabilities(x), expected)
    assert get_backbone("tiny").feature_dim == DIM
