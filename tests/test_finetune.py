"""Fine-tuning with TorchDistributor: 2 processes on local[2], a tiny torch network, generated images."""

from __future__ import annotations

import os

import numpy as np
import pytest


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from imgfeat.demo.samples import make_samples

    return make_samples(str(tmp_path_factory.mktemp("ft-images")), per_class=40, seed=3)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return "sqlite:///" + str(tmp_path_factory.mktemp("ft-mlflow") / "mlflow.db")


def _cfg(images, out, store, *sets, root=None):
    from imgfeat.config import load_config

    return load_config(overrides={"input.path": str(root or images.root), "finetune.output": str(out), "model.name": "tiny_torch",
                                  "model.weights": "none", "input.split.mode": "hash", "mlflow.tracking_uri": store,
                                  "mlflow.experiment": "finetune-tests"},
                       sets=["finetune.epochs=3", "finetune.batch_size=8", "finetune.train_layers=all",
                             "finetune.learning_rate=0.01", "finetune.backbone_lr_scale=1.0", "finetune.patience=0",
                             "finetune.num_processes=2", "finetune.row_group_images=16", "input.split.test_fraction=0.25",
                             "finetune.validation_fraction=0.15", *sets])


@pytest.fixture(scope="module")
def finetuned(spark, images, store, tmp_path_factory):
    from imgfeat.finetune.run import run_finetune

    out = tmp_path_factory.mktemp("ft-run")
    return run_finetune(spark, _cfg(images, out, store)), out


def test_the_backbone_artifact_is_where_extract_looks_for_it():
    from imgfeat.backbones.weights import FINETUNED_ARTIFACT
    from imgfeat.finetune.run import BACKBONE_ARTIFACT

    assert BACKBONE_ARTIFACT == FINETUNED_ARTIFACT  # --weights runs:/RUN_ID reads what finetune logged


def _state(path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def test_two_processes_train_log_curves_and_a_weights_only_checkpoint(finetuned, store, spark):
    import mlflow

    result, out = finetuned
    assert result.world_size == 2 and len(result.history) == 3
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"], result.history
    assert all(h["val_images"] > 0 and h["train_images"] > 0 for h in result.history)
    client = mlflow.MlflowClient(store)
    assert [m.step for m in client.get_metric_history(result.run_id, "val_loss")] == [0, 1, 2]
    run = client.get_run(result.run_id)
    assert {"test_accuracy", "test_roc_auc", "test_accuracy_ci_low", "test_f1_macro"} <= set(run.data.metrics)
    assert run.data.params["train_layers"] == "all" and run.data.tags["imgfeat.kind"] == "finetune"
    local = mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="finetuned/backbone.pth", tracking_uri=store)
    state = _state(local)  # weights only: a mapping of tensors, loadable without unpickling code
    assert state and all(hasattr(v, "shape") for v in state.values())
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_bad_image_lands_in_the_errors_table_and_training_goes_on(finetuned, images, spark):
    result, out = finetuned
    errors = {os.path.basename(r["path"]): r["error_class"] for r in spark.read.parquet(result.table["errors_path"]).collect()}
    expected = {os.path.basename(p): c for p, c in images.bad.items()}
    assert errors == expected
    n_rows = spark.read.parquet(result.table["path"]).count()
    assert n_rows == images.valid  # every good image decoded once, into train, val or test


def test_the_decoded_table_is_laid_out_the_same_wherever_the_folder_lies(finetuned, images, spark, tmp_path):
    """Files and row groups follow the images' relative paths, not the folder's location or Spark's read order, so
    the seeded epoch order (and with it the weights) is the same for a moved copy of the data."""
    import shutil

    import pyarrow.parquet as pq

    from imgfeat.finetune.data import build_decoded_table, table_files

    result, out = finetuned
    moved = shutil.copytree(images.root, tmp_path / "elsewhere" / "data")
    cfg = _cfg(images, tmp_path / "run", "sqlite://", root=moved)
    table = build_decoded_table(spark, cfg.input, cfg.preprocess, cfg.finetune, False, result.table["size"],
                                "file://" + str(tmp_path / "decoded"))

    def layout(path):
        return [pq.read_table(f, columns=["rel_path", "split"]).to_pylist() for f in table_files(path)]

    assert layout(table.path.removeprefix("file:")) == layout(result.table["path"])


def test_same_seed_same_weights_and_a_killed_run_resumes_to_them(spark, images, store, finetuned, tmp_path, monkeypatch):
    import torch

    from imgfeat.finetune.loop import STOP_ENV
    from imgfeat.finetune.run import run_finetune

    result, out = finetuned
    reference = _state(os.path.join(out, "run", "checkpoints", "last.pt"))["model"]
    # A second run with the same seed, killed after its first epoch and resumed: equal to the first run tensor by
    # tensor (its first epoch ran from scratch, so this also shows that the same seed gives the same weights).
    killed = tmp_path / "killed"
    monkeypatch.setenv(STOP_ENV, "1")
    with pytest.raises(Exception):  # noqa: B017 (TorchDistributor reports the processes' exit as its own error)
        run_finetune(spark, _cfg(images, killed, store))
    assert _state(os.path.join(killed, "run", "checkpoints", "last.pt"))["state"]["epoch"] == 0
    monkeypatch.delenv(STOP_ENV)
    resumed = run_finetune(spark, _cfg(images, killed, store), resume=True)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    final = _state(os.path.join(killed, "run", "checkpoints", "last.pt"))["model"]
    assert all(torch.equal(reference[k], final[k]) for k in reference)


def test_the_finetuned_backbone_extracts_serves_and_predicts_like_a_direct_forward_pass(spark, images, store, finetuned, tmp_path):
    import mlflow
    import torch

    from imgfeat.engines import torch_models
    from imgfeat.featurize.extract import run_extract
    from imgfeat.io.decoders import DecodeOptions, decode_file
    from imgfeat.scoring.flavor import load_model

    from conftest import tiny_config

    result, out = finetuned
    mlflow.set_tracking_uri(store)
    features = str(tmp_path / "features")
    run_extract(spark, tiny_config(images.root, features, "model.name=tiny_torch", f"model.weights=runs:/{result.run_id}"))
    rows = spark.read.parquet(features).select("path", "features", "weights_id").limit(6).collect()
    assert {r["weights_id"] for r in rows} == {f"sha256:{result.backbone_sha256}"}
    net = torch_models.build("tiny", 32)
    torch_models.load_weights(net, _state(result.backbone_file))
    net.eval()
    head = _state(os.path.join(out, "run", "head.pth"))
    classifier = load_model(f"runs:/{result.run_id}/pyfunc_model")
    mean = std = np.full(3, 127.5)  # tiny_torch: (x - 127.5) / 127.5
    for r in rows:
        data = open(r["path"].removeprefix("file:"), "rb").read()
        x = decode_file(data, DecodeOptions(size=32))[0].array
        t = torch.from_numpy(((x - mean) / std).astype(np.float32)).permute(2, 0, 1)[None]
        with torch.no_grad():
            direct = net(t)[0].numpy()
            proba = torch.softmax(torch.nn.functional.linear(net(t), head["weight"], head["bias"]), 1)[0].numpy()
        np.testing.assert_allclose(np.asarray(r["features"]), direct, rtol=1e-4, atol=1e-5)
        served = classifier.predict([data])[0]
        np.testing.assert_allclose([served.probabilities[k] for k in sorted(served.probabilities)], proba, atol=1e-5)
