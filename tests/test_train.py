"""Train, compare and predict: metrics vs scikit-learn, heads on separable features, MLflow runs and
artifacts in a temporary sqlite store, the logged model scoring raw images, batch prediction."""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest

from imgfeat.config import load_config
from imgfeat.train.metrics import binary_auc, classification_metrics

from conftest import tiny_config

# ---------------------------------------------------------------------------------------------
# metrics (no Spark)


@pytest.mark.parametrize("k", [2, 3])
def test_metrics_equal_scikit_learn(k):
    from sklearn import metrics as skm

    rng = np.random.default_rng(k)
    n = 300
    y = rng.integers(0, k, n)
    proba = rng.dirichlet(np.ones(k), n)
    proba[np.arange(n), y] += rng.random(n)  # informative, not perfect
    proba /= proba.sum(axis=1, keepdims=True)
    pred = proba.argmax(axis=1)
    labels = ["COVID", "NORMAL", "PNEUMONIA"][:k]
    got, report = classification_metrics(y, pred, proba, labels)

    assert got["test_accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert got["test_f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert got["test_f1_weighted"] == pytest.approx(skm.f1_score(y, pred, average="weighted"))
    assert got["test_kappa"] == pytest.approx(skm.cohen_kappa_score(y, pred))
    assert got["test_log_loss"] == pytest.approx(skm.log_loss(y, proba, labels=list(range(k))))
    expected_auc = skm.roc_auc_score(y, proba[:, 1]) if k == 2 else skm.roc_auc_score(y, proba, multi_class="ovr", average="macro")
    assert got["test_roc_auc"] == pytest.approx(expected_auc)
    precision, recall, f1, _ = skm.precision_recall_fscore_support(y, pred, labels=list(range(k)))
    for i, label in enumerate(labels):
        assert got[f"test_precision_{label}"] == pytest.approx(precision[i])
        assert got[f"test_recall_{label}"] == pytest.approx(recall[i])
        assert got[f"test_f1_{label}"] == pytest.approx(f1[i])
    assert report["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()


def test_class_weights_give_each_class_an_equal_share():
    from imgfeat.train.metrics import class_weights

    weights = class_weights({"A": 30, "B": 10}, ["A", "B"])
    assert [30 * weights[0], 10 * weights[1]] == pytest.approx([20, 20])  # n / classes each
    assert class_weights({"A": 4}, ["A", "B"]) == pytest.approx([0.5, 2.0])  # a class without rows counts as one


def test_evaluate_is_the_metrics_plus_their_bootstrap_intervals():
    from imgfeat.config.schema import ValidityConfig
    from imgfeat.train.metrics import defined, evaluate

    rng = np.random.default_rng(5)
    y = np.repeat([0, 1], 40)
    proba = np.clip(np.stack([1 - y, y], axis=1) * 0.6 + rng.random((80, 2)) * 0.5, 0.01, None)
    proba /= proba.sum(axis=1, keepdims=True)
    pred = proba.argmax(axis=1)
    plain, report = classification_metrics(y, pred, proba, ["A", "B"])
    units = np.arange(80)
    assert evaluate(y, pred, proba, ["A", "B"], units, ValidityConfig(bootstrap_resamples=0), 1) == (plain, report)
    got, got_report = evaluate(y, pred, proba, ["A", "B"], units, ValidityConfig(bootstrap_resamples=200), 1)
    assert got_report == report and {k: got[k] for k in plain} == plain
    assert got["test_accuracy_ci_low"] <= got["test_accuracy"] <= got["test_accuracy_ci_high"]
    assert set(got) - set(plain) == {f"{k}_ci_{side}" for k in plain for side in ("low", "high")}
    kept = defined({"a": 1.0, "b": float("nan"), "c": np.float32("nan"), "d": 2})
    assert kept == {"a": 1.0, "d": 2} and not any(math.isnan(v) for v in kept.values())


def test_keras_head_standardization_folds_into_the_first_layer_exactly():
    from imgfeat.train.keras_head import fold_standardization

    rng = np.random.default_rng(3)
    x = rng.normal(50, 30, (20, 6)).astype(np.float32)
    mean, std = x.mean(axis=0), x.std(axis=0)
    kernel, bias, hidden = rng.normal(size=(6, 4)), rng.normal(size=4), rng.normal(size=(4, 2))
    folded = fold_standardization([kernel, bias, hidden], mean, std)
    np.testing.assert_allclose(x @ folded[0] + folded[1], ((x - mean) / std) @ kernel + bias, rtol=1e-6, atol=1e-6)
    assert folded[2] is hidden


def test_auc_handles_ties_like_scikit_learn():
    from sklearn.metrics import roc_auc_score

    y = np.array([0, 0, 1, 1, 0, 1, 1, 0])
    s = np.array([0.1, 0.5, 0.5, 0.9, 0.5, 0.2, 0.9, 0.1])
    assert binary_auc(y == 1, s) == pytest.approx(roc_auc_score(y, s))


# ---------------------------------------------------------------------------------------------
# heads on separable synthetic features


def _separable_table(spark, path, per_class=60, dim=16, classes=("A", "B", "C"), models=("tiny",), roots=("/x",)):
    """A features table like extract's: Gaussian clusters, one per class, for each model (and input root)."""
    import hashlib

    rng = np.random.default_rng(7)
    centres = rng.normal(0, 4, (len(classes), dim))
    rows = []
    for m, model in enumerate(models):
        for c, label in enumerate(classes):
            for i in range(per_class):
                image_id = hashlib.sha256(f"{label}/{i}".encode()).hexdigest()[:24]
                for root in roots:  # the same relative name under each root: the same image_id
                    vec = (centres[c] + rng.normal(0, 1.0, dim) + m).astype(float).tolist()
                    rows.append((image_id, f"file:{root}/{label}/{i}.png", f"{label}/{i}.png", label, None, vec, model,
                                 "none-seed42"))
    schema = ("image_id string, path string, rel_path string, label string, split string, features array<float>, "
              "model string, weights_id string")
    spark.createDataFrame(rows, schema).write.mode("overwrite").parquet(path)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return "sqlite:///" + str(tmp_path_factory.mktemp("mlflow") / "mlflow.db")


@pytest.fixture(scope="module")
def trained_all_heads(spark, tmp_path_factory, store):
    from imgfeat.train.fit import run_train

    tmp = tmp_path_factory.mktemp("heads")
    table = str(tmp / "features")
    _separable_table(spark, table)
    # Few iterations: each MLlib iteration is a Spark job, and these are separable clusters.
    cfg = load_config(sets=[
        f"train.features={table}", "train.heads=[lr, rf, dt, gbt, svc, keras]", f"mlflow.tracking_uri={store}",
        "mlflow.experiment=heads", "train.params.rf_num_trees=10", "train.params.gbt_max_iter=3",
        "train.params.lr_max_iter=15", "train.params.svc_max_iter=5", "train.keras.epochs=10",
        f"train.keras.cache_dir=file://{tmp}/petastorm", "train.class_weighting=true",
    ])
    return run_train(spark, cfg), cfg


def test_every_head_reaches_high_accuracy_on_separable_features(trained_all_heads):
    result, _ = trained_all_heads
    assert [r.head for r in result.runs] == ["lr", "rf", "dt", "gbt", "svc", "keras"]
    assert result.labels == ["A", "B", "C"]
    assert result.split_mode == "hash"
    assert (result.n_train, result.n_test) == (144, 36)  # exactly 20% of each class of 60
    for run in result.runs:
        assert run.metrics["test_accuracy"] > 0.9, (run.head, run.metrics)
        assert run.metrics["test_roc_auc"] > 0.9, (run.head, run.metrics)
    assert result.best_run_id in {r.run_id for r in result.runs}


def test_runs_params_metrics_and_artifacts_are_in_the_store(trained_all_heads, store):
    from mlflow.tracking import MlflowClient

    from imgfeat.train.privacy import check_mlflow_run

    result, _ = trained_all_heads
    client = MlflowClient(store)
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["imgfeat.kind"] == "train"
    # The UI opens the experiment on its runs (MLflow 3 opens untagged ones in the GenAI traces view).
    assert client.get_experiment(result.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    # No secret configured: no per-image ids in the artifacts, only a digest of which images were held out.
    assert "test_images.csv" not in {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert len(parent.data.params["test_set_sha256"]) == 64
    children = client.search_runs([result.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert len(children) == 6
    for child in children:
        tags, params, metrics = child.data.tags, child.data.params, child.data.metrics
        check_mlflow_run(child)  # no image content, no patient fields
        assert tags["backbone"] == "tiny" and re.fullmatch(r"features-[0-9a-f]{12}", tags["dataset"]) and params["head"] == tags["head"]
        for key in ("backbone", "weights_id", "head", "split_seed", "test_fraction", "train_count_A", "test_count_C", "features_table_sha256", "preprocess"):
            assert key in params, key
        for key in ("test_accuracy", "test_f1_macro", "test_f1_weighted", "test_kappa", "test_roc_auc",
                    "test_precision_A", "test_recall_B", "test_f1_C"):
            assert key in metrics, key
        assert "test_log_loss" in metrics
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"confusion_matrix.png", "roc_curve.png", "classification_report.json"} <= artifacts
        report = json.loads(open(client.download_artifacts(child.info.run_id, "classification_report.json")).read())
        assert sum(map(sum, report["confusion_matrix"])) == result.n_test  # the same 36 test images for every head


def test_the_split_is_the_same_for_every_backbone_and_stratified(spark, tmp_path, store):
    from imgfeat.train.split import assign_split, read_features

    table = str(tmp_path / "two")
    _separable_table(spark, table, per_class=25, classes=("N", "P"), models=("m1", "m2"))
    cfg = load_config(sets=[f"train.features={table}", "train.test_fraction=0.2"])
    df = read_features(spark, cfg.train.features, cfg.output.format)
    images = df.select("path", "image_id", "label", "split").dropDuplicates(["path"])
    split, mode = assign_split(images, cfg.train)
    assert mode == "hash"
    counts = {(r["label"], r["is_test"]): r["n"] for r in split.groupBy("label", "is_test").count().withColumnRenamed("count", "n").collect()}
    assert counts == {("N", True): 5, ("N", False): 20, ("P", True): 5, ("P", False): 20}
    again, _ = assign_split(images, cfg.train)
    assert sorted(r["image_id"] for r in split.filter("is_test").collect()) == sorted(r["image_id"] for r in again.filter("is_test").collect())


def test_two_input_roots_with_the_same_relative_names_keep_every_image(spark, tmp_path, store):
    from imgfeat.train.fit import run_train

    table = str(tmp_path / "two_roots")
    _separable_table(spark, table, per_class=10, classes=("N", "P"), roots=("/hospital_a", "/hospital_b"))
    cfg = load_config(sets=[f"train.features={table}", "train.heads=[dt]", f"mlflow.tracking_uri={store}",
                            "mlflow.experiment=two-roots", "train.test_fraction=0.2"])
    result = run_train(spark, cfg)
    assert result.n_train + result.n_test == 40  # 2 roots x 2 classes x 10: none collapse onto a shared image_id
    assert result.n_test == 8


def test_compare_prints_sorted_table_and_logs_it(trained_all_heads, store, capsys):
    from mlflow.tracking import MlflowClient

    from imgfeat.cli import main

    result, _ = trained_all_heads
    assert main(["compare", "--experiment", "heads", "--positive-class", "C", "--tracking-uri", store]) == 0
    out = capsys.readouterr().out
    assert "f1_C" in out and "keras" in out and "mlflow ui --backend-store-uri" in out
    from imgfeat.train.compare import run_compare

    cfg = load_config(sets=[f"mlflow.tracking_uri={store}", "mlflow.experiment=heads", "train.positive_class=B"])
    table = run_compare(cfg)
    assert len(table) == 6
    assert list(table["f1_macro"]) == sorted(table["f1_macro"], reverse=True)
    assert {"accuracy", "precision_B", "recall_B", "f1_B", "f1_macro", "kappa", "auc"} <= set(table.columns)
    artifacts = {a.path for a in MlflowClient(store).list_artifacts(result.parent_run_id)}
    assert {"comparison.md", "comparison.csv", "comparison.png"} <= artifacts


def test_compare_names_a_wrong_positive_class(trained_all_heads, store):
    from imgfeat.train.compare import run_compare

    cfg = load_config(sets=[f"mlflow.tracking_uri={store}", "mlflow.experiment=heads", "train.positive_class=COVID"])
    with pytest.raises(ValueError, match="COVID.*not one of the trained labels"):
        run_compare(cfg)


@pytest.mark.parametrize("tuning", ["train.cv_folds=3", "train.validation_fraction=0.25"])
def test_model_selection_picks_the_better_grid_value_and_logs_it(spark, tmp_path, store, tuning):
    """A depth-1 tree cannot tell three classes apart; CrossValidator / TrainValidationSplit must pick depth 5."""
    from mlflow.tracking import MlflowClient

    from imgfeat.train.fit import run_train

    table = str(tmp_path / "features")
    _separable_table(spark, table, per_class=30, dim=4)
    cfg = load_config(sets=[
        f"train.features={table}", "train.heads=[dt]", f"mlflow.tracking_uri={store}", "mlflow.experiment=tuning",
        "train.grid.dt_max_depth=[1, 5]", tuning,
    ])
    result = run_train(spark, cfg)
    (run,) = result.runs
    expected = "CrossValidator(numFolds=3)" if "cv_folds" in tuning else "TrainValidationSplit(trainRatio=0.75)"
    assert run.params["tuning"] == expected
    assert run.params["maxDepth"] == 5
    assert run.params["tuning_best_f1"] > 0.9
    assert run.metrics["test_accuracy"] > 0.9
    logged = MlflowClient(store).get_run(run.run_id).data.params
    assert (logged["head_tuning"], logged["head_maxDepth"]) == (expected, "5")


# ---------------------------------------------------------------------------------------------
# end to end on images: extract -> train (CLI) -> logged model on raw bytes -> predict


@pytest.fixture(scope="module")
def image_run(spark, samples, tmp_path_factory, store):
    from imgfeat.cli import main
    from imgfeat.featurize.extract import run_extract

    tmp = tmp_path_factory.mktemp("e2e")
    features = str(tmp / "features")
    run_extract(spark, tiny_config(samples.root, features, "input.split.mode=hash", "input.split.test_fraction=0.3"))
    js = str(tmp / "train.json")
    assert main(["train", "--features", features, "--heads", "lr,dt", "--experiment", "e2e", "--tracking-uri", store,
                 "--json", js, "--register", "imgfeat-test"]) == 0
    return json.load(open(js)), features, tmp


def test_logged_model_scores_raw_image_bytes_like_the_head_on_features(spark, samples, image_run, store):
    import mlflow.spark
    from pyspark.sql import functions as F

    result, features, _ = image_run
    assert result["split_mode"] == "column"  # the table's hash split from extract
    lr = next(r for r in result["runs"] if r["head"] == "lr")
    mlflow.set_tracking_uri(store)
    model = mlflow.spark.load_model(f"runs:/{lr['run_id']}/model")
    assert [type(s).__name__ for s in model.stages] == ["ImageFeaturizer", "LogisticRegressionModel", "IndexToString"]
    good = [p for p in _image_files(samples.root) if "bad_" not in p]
    raw = spark.read.format("binaryFile").load(good).select("path", "content")
    scored = {r["path"]: r["prediction"] for r in model.transform(raw).select("path", "prediction").collect()}
    assert len(scored) == samples.valid and set(scored.values()) <= {"NORMAL", "PNEUMONIA"}
    # The same head on the stored features gives the same labels: featurizer + head reproduce training.
    table = spark.read.parquet(features).select("path", F.col("features"))
    from pyspark.ml import PipelineModel
    from pyspark.ml.functions import array_to_vector

    head = PipelineModel(stages=model.stages[1:])
    direct = {r["path"]: r["prediction"] for r in head.transform(table.withColumn("features", array_to_vector("features"))).collect()}
    assert direct == scored


def test_the_logged_model_prepares_images_as_extract_did_not_as_train_is_configured(spark, samples, tmp_path, store):
    """Train/serve skew: features extracted with resize_mode=pad; train runs with defaults (stretch)."""
    import mlflow.spark
    from pyspark.ml.functions import vector_to_array

    from imgfeat.featurize.extract import run_extract
    from imgfeat.featurize.settings import SettingsError
    from imgfeat.train.fit import run_train

    features = str(tmp_path / "padded")
    run_extract(spark, tiny_config(samples.root, features, "preprocess.resize_mode=pad", "input.split.mode=hash",
                                   "input.split.test_fraction=0.3", "preprocess.max_pixels=100000000"))
    cfg = load_config(sets=[f"train.features={features}", "train.heads=[dt]", f"mlflow.tracking_uri={store}",
                            "mlflow.experiment=skew"])
    assert cfg.preprocess.resize_mode == "stretch"
    result = run_train(spark, cfg)
    mlflow.set_tracking_uri(store)
    model = mlflow.spark.load_model(f"runs:/{result.runs[0].run_id}/model")
    featurizer = model.stages[0]
    decode = featurizer.decode_options()
    assert (decode.resize_mode, decode.max_pixels) == ("pad", 100_000_000)
    # Non-square images: pad and stretch give different inputs, so equal features prove the same preparation.
    stored = {r["path"]: np.array(r["features"]) for r in spark.read.parquet(features).collect()}
    raw = spark.read.format("binaryFile").load(list(stored)).select("path", "content")
    again = {r["path"]: np.array(r["f"]) for r in featurizer.transform(raw).select("path", vector_to_array("features").alias("f")).collect()}
    assert again.keys() == stored.keys()
    for path, vec in stored.items():
        np.testing.assert_allclose(again[path], vec, rtol=1e-5, atol=1e-6)
    # Adding stretch rows for the same backbone to that table is refused, naming the difference.
    with pytest.raises(SettingsError, match="preprocess.resize_mode: 'pad' -> 'stretch'"):
        run_extract(spark, tiny_config(samples.root, features, "input.split.mode=hash", "preprocess.max_pixels=100000000"))


def test_train_refuses_a_table_that_mixes_preprocessing_for_one_backbone(spark, samples, tmp_path, store):
    from pyspark.sql import functions as F

    from imgfeat.featurize.extract import run_extract
    from imgfeat.featurize.settings import SettingsError
    from imgfeat.train.fit import run_train

    pad, stretch = str(tmp_path / "pad"), str(tmp_path / "stretch")
    run_extract(spark, tiny_config(samples.root, pad, "preprocess.resize_mode=pad", "input.split.mode=hash"))
    run_extract(spark, tiny_config(samples.root, stretch, "input.split.mode=hash"))
    mixed = str(tmp_path / "mixed")
    a = spark.read.parquet(pad).filter(F.col("path").contains("/NORMAL/"))
    b = spark.read.parquet(stretch).filter(F.col("path").contains("/PNEUMONIA/"))
    a.unionByName(b).write.parquet(mixed)
    cfg = load_config(sets=[f"train.features={mixed}", "train.heads=[dt]", f"mlflow.tracking_uri={store}",
                            "mlflow.experiment=mixed"])
    with pytest.raises(SettingsError, match="2 different preprocessing settings"):
        run_train(spark, cfg)


def test_register_puts_the_best_model_in_the_registry(image_run, store):
    from mlflow.tracking import MlflowClient

    result, _, _ = image_run
    assert result["registered"]["name"] == "imgfeat-test"
    version = MlflowClient(store).get_model_version("imgfeat-test", result["registered"]["version"])
    assert version.run_id == result["best_run_id"]


def test_predict_writes_one_row_per_image_and_errors_and_is_incremental(spark, samples, image_run, store):
    from imgfeat.serve.batch import run_predict

    result, _, tmp = image_run
    uri = f"runs:/{result['best_run_id']}/model"
    cfg = load_config(overrides={"predict.model_uri": uri, "input.path": samples.root, "output.path": str(tmp / "preds"),
                                 "output.format": "parquet", "mlflow.tracking_uri": store})
    first = run_predict(spark, cfg)
    assert (first.predicted, first.failed) == (samples.valid, len(samples.bad))
    preds = spark.read.parquet(str(tmp / "preds")).toPandas()
    assert len(preds) == samples.valid and preds["path"].is_unique
    assert set(preds["prediction"]) <= {"NORMAL", "PNEUMONIA"}
    assert np.allclose(preds["probability_NORMAL"] + preds["probability_PNEUMONIA"], 1.0)
    errors = spark.read.parquet(str(tmp / "preds_errors")).toPandas()
    assert dict(zip(errors["path"].str.replace("file:", ""), errors["error_class"])) == samples.bad
    second = run_predict(spark, cfg)
    assert (second.processed, second.already_done) == (0, samples.valid + len(samples.bad))


def test_predict_keys_rows_by_the_model_a_uri_resolves_to(spark, samples, image_run, store):
    """models:/NAME/latest re-scores after a new version; one model by two URIs is scored once."""
    import mlflow

    from imgfeat.serve.batch import run_predict

    result, _, tmp = image_run
    out = str(tmp / "preds_by_version")
    latest = _predict_config("models:/imgfeat-test/latest", samples.root, out, store)
    first = run_predict(spark, latest)
    assert first.processed == samples.valid + len(samples.bad) and first.model_version == "1"
    by_run = run_predict(spark, _predict_config(f"runs:/{result['best_run_id']}/model", samples.root, out, store))
    assert by_run.processed == 0  # the same model: nothing to redo, no duplicate rows
    other = next(r["run_id"] for r in result["runs"] if r["run_id"] != result["best_run_id"])
    mlflow.set_tracking_uri(store)
    assert mlflow.register_model(f"runs:/{other}/model", "imgfeat-test").version == 2
    second = run_predict(spark, latest)
    assert second.processed == samples.valid + len(samples.bad) and second.model_version == "2"
    preds = spark.read.parquet(out).toPandas()
    assert preds.groupby("model_version")["path"].nunique().to_dict() == {"1": samples.valid, "2": samples.valid}
    assert set(preds["model_uri"]) == {"models:/imgfeat-test/latest"}  # the runs:/ call wrote nothing


def test_a_model_trained_on_a_weights_file_predicts_where_that_file_is_not(spark, samples, tmp_path, store):
    from imgfeat.backbones.registry import get_backbone
    from imgfeat.backbones.weights import WeightsError
    from imgfeat.engines.keras import build_architecture
    from imgfeat.featurize.extract import run_extract
    from imgfeat.serve.batch import run_predict
    from imgfeat.train.fit import run_train

    weights = tmp_path / "trained_here" / "tiny.weights.h5"
    weights.parent.mkdir()
    build_architecture(get_backbone("tiny")).save_weights(str(weights))
    features = str(tmp_path / "features")
    run_extract(spark, tiny_config(samples.root, features, f"model.weights={weights}", "input.split.mode=hash"))
    result = run_train(spark, load_config(sets=[
        f"train.features={features}", "train.heads=[dt]", f"mlflow.tracking_uri={store}", "mlflow.experiment=wfile",
        f"model.weights={weights}"]))
    moved = tmp_path / "elsewhere.weights.h5"
    weights.rename(moved)  # "another machine": the recorded path does not exist
    uri = f"runs:/{result.runs[0].run_id}/model"
    logged = run_predict(spark, _predict_config(uri, samples.root, str(tmp_path / "p1"), store))
    assert logged.predicted == samples.valid
    cfg = _predict_config(uri, samples.root, str(tmp_path / "p2"), store)
    cfg.predict.weights = str(moved)
    assert run_predict(spark, cfg).predicted == samples.valid
    assert _run_ids(spark, str(tmp_path / "p1")).keys() == _run_ids(spark, str(tmp_path / "p2")).keys()
    other = tmp_path / "other.weights.h5"
    build_architecture(get_backbone("tiny")).save_weights(str(other))  # another random init: another sha256
    cfg.predict.weights, cfg.output.path = str(other), str(tmp_path / "p3")
    with pytest.raises(WeightsError, match="pins"):
        run_predict(spark, cfg)


def test_predict_says_what_is_wrong_with_a_non_imgfeat_model_uri(spark, tmp_path, store):
    from imgfeat.serve.batch import run_predict

    cfg = load_config(overrides={"input.path": str(tmp_path), "output.path": str(tmp_path / "p"), "mlflow.tracking_uri": store})
    with pytest.raises(ValueError, match="--model-uri"):
        run_predict(spark, cfg)


def _image_files(root):
    out = []
    for base, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith((".", "_"))]
        out += [os.path.join(base, f) for f in files if not f.startswith((".", "_")) and not f.endswith(".txt")]
    return sorted(out)



# ---------------------------------------------------------------------------------------------
# predict is as reliable as extract: added and changed files, a job killed mid-write


def _predict_config(uri: str, folder: str, output: str, store: str):
    return load_config(overrides={"predict.model_uri": uri, "input.path": folder, "output.path": output,
                                  "output.format": "parquet", "mlflow.tracking_uri": store})


def _add_xrays(folder: str, n: int, seed: int) -> list[str]:
    from imgfeat.demo.samples import encode, xray_array

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        data, ext = encode(xray_array(rng, (64, 64), sick=True), "rgb_png")
        paths.append(os.path.join(folder, "PNEUMONIA", f"added_{seed}_{i:04d}.{ext}"))
        with open(paths[-1], "wb") as fh:
            fh.write(data)
    return paths


def _run_ids(spark, location: str) -> dict[str, str]:
    return {r["path"]: r["run_id"] for r in spark.read.parquet(location).select("path", "run_id").collect()}


def test_predict_processes_only_added_and_changed_files(spark, samples, image_run, store, tmp_path):
    import shutil

    from imgfeat.demo.samples import encode, xray_array
    from imgfeat.serve.batch import run_predict

    result, _, _ = image_run
    folder = str(tmp_path / "img")
    shutil.copytree(samples.root, folder)
    cfg = _predict_config(f"runs:/{result['best_run_id']}/model", folder, str(tmp_path / "preds"), store)
    first = run_predict(spark, cfg)
    before = _run_ids(spark, cfg.output.path)
    added = _add_xrays(folder, 3, seed=21)
    changed = next(p for p in _image_files(folder) if "bad_" not in p and "added_" not in p)
    data, _ = encode(xray_array(np.random.default_rng(22), (80, 80), sick=False), "rgb_png")
    with open(changed, "wb") as fh:  # same path, new content and a later modification time
        fh.write(data)
    os.utime(changed, (os.path.getatime(changed), os.path.getmtime(changed) + 10))

    second = run_predict(spark, cfg)
    assert (second.listed, second.processed, second.replaced) == (first.listed + 3, 4, 1)
    assert (second.predicted, second.failed) == (4, 0)
    after = _run_ids(spark, cfg.output.path)
    assert spark.read.parquet(cfg.output.path).count() == len(after) == samples.valid + 3  # no duplicate path
    assert {"file:" + p for p in added} <= set(after)
    changed_uri = "file:" + changed
    assert after[changed_uri] != before[changed_uri]  # re-predicted, the old row replaced
    assert {p: r for p, r in after.items() if p in before and p != changed_uri} == {
        p: r for p, r in before.items() if p != changed_uri}  # everything else untouched
    third = run_predict(spark, cfg)
    assert third.processed == 0 and _run_ids(spark, cfg.output.path) == after


@pytest.mark.integration  # starts job processes of its own (~35-50 s)
def test_killed_predict_leaves_previous_table_unchanged_and_rerun_completes(spark, samples, image_run, store, tmp_path):
    import glob
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from imgfeat.serve.batch import run_predict

    result, _, _ = image_run
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folder = str(tmp_path / "img")
    shutil.copytree(samples.root, folder)
    uri = f"runs:/{result['best_run_id']}/model"
    cfg = _predict_config(uri, folder, str(tmp_path / "preds"), store)
    first = run_predict(spark, cfg)
    before = _run_ids(spark, cfg.output.path)
    added = _add_xrays(folder, 60, seed=23)
    hold = tmp_path / "hold"
    hold.mkdir()
    temporary = cfg.output.path + ".imgfeat-staging-*/_temporary"  # the run writes to its own staging folder
    # As in extract's kill test: without adaptive execution, featurizing + scoring + writing is one Spark
    # job that sets up its commit first; tasks of partitions other than 0 are held, then the job is killed.
    proc = subprocess.Popen(
        [sys.executable, "jobs/predict.py", "--model-uri", uri, "--input", folder, "--output", cfg.output.path,
         "--format", "parquet", "--tracking-uri", store, "--master", "local[2]", "--set",
         "spark.conf={spark.ui.enabled: 'false', spark.sql.adaptive.enabled: 'false', "
         "spark.sql.files.maxPartitionBytes: '400000', spark.sql.files.openCostInBytes: '100000'}"],
        cwd=root, env={**os.environ, "PYSPARK_PYTHON": sys.executable, "IMGFEAT_TEST_FAULT": f"hold:{hold}"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (glob.glob(temporary) and glob.glob(str(hold / "started-p[1-9]*"))):
            assert proc.poll() is None, f"the predict job ended (rc {proc.returncode}) before its write"
            assert time.monotonic() < deadline, "gave up waiting for the predict job's write"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert glob.glob(temporary)  # the killed write's uncommitted state is there ...
    assert _run_ids(spark, cfg.output.path) == before  # ... and the table reads exactly as before

    again = run_predict(spark, cfg)
    assert (again.processed, again.predicted) == (len(added), len(added))
    after = _run_ids(spark, cfg.output.path)
    assert spark.read.parquet(cfg.output.path).count() == len(after) == first.predicted + len(added)
    assert {"file:" + p for p in added} <= set(after)
    assert not glob.glob(cfg.output.path + ".imgfeat-staging-*")  # the killed run's lease died with it
