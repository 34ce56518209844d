"""`imgfeat finetune` on a CheXpert-shaped manifest (issue 35): one output per finding, the masked binary
cross-entropy (masked targets provably out of the loss), per-finding thresholds and metrics logged as `train`'s
multi-label runs log them, and a pyfunc model that scores per-finding probabilities equal to the network's."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest

FINDINGS = ["Atelectasis", "Cardiomegaly", "Edema"]
PATIENTS = 18  # 2 images each


def _chexpert(root: str) -> str:
    """36 generated radiographs under CheXpert's folder shape and a manifest with one column per finding (1 / 0 / -1 /
    blank): Cardiomegaly brightens the image, Edema adds opacities, Atelectasis a bright corner; ~15 % uncertain."""
    from imgfeat.demo.samples import encode, write_manifest, xray_array

    rng = np.random.default_rng(5)
    rows = []
    for p in range(PATIENTS):
        for view in (1, 2):
            rel = f"train/patient{p:05d}/study1/view{view}_frontal.png"
            truth = rng.random(3) < 0.45
            img = xray_array(rng, (40, 40), bool(truth[2]))
            img = img + 0.25 * truth[1]
            if truth[0]:
                img[:14, :14] += 0.5
            os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
            with open(os.path.join(root, rel), "wb") as fh:
                fh.write(encode(np.clip(img, 0, 1), "rgb_png")[0])
            values = ["-1" if rng.random() < 0.15 else ("1" if t else rng.choice(["0", ""])) for t in truth]
            rows.append({"Path": rel, "Sex": "F", **dict(zip(FINDINGS, values, strict=True))})
    return write_manifest(os.path.join(os.path.dirname(root), "train.csv"), rows)


def _flipped_copy(files: list[str], folder: str, entries: str) -> list[str]:
    """The decoded table with the targets of its masked (``entries="masked"``) or known entries flipped, row group by
    row group (the same row groups: the same epoch order)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(folder)
    out = []
    for f in files:
        source, path = pq.ParquetFile(f), os.path.join(folder, os.path.basename(f))
        with pq.ParquetWriter(path, source.schema_arrow) as writer:
            for g in range(source.num_row_groups):
                table = source.read_row_group(g)
                t = np.array(table.column("targets").to_pylist(), dtype=np.float32)
                m = np.array(table.column("mask").to_pylist(), dtype=np.float32)
                flip = (m == 0) if entries == "masked" else (m > 0)
                t = np.where(flip, 1 - t, t)
                field = table.schema.field("targets")
                column = pa.array(t.tolist(), type=field.type)
                writer.write_table(table.set_column(table.schema.get_field_index("targets"), field, column))
        out.append(path)
    return out


def _config(images: str, manifest: str, out: str, store: str):
    from imgfeat.config import load_config

    return load_config(
        overrides={"input.path": images, "finetune.output": out, "model.name": "tiny_torch", "model.weights": "none",
                   "mlflow.tracking_uri": store, "mlflow.experiment": "multilabel-finetune"},
        sets=[f"input.label.manifest={manifest}", "input.label.path_column=Path",
              f"input.label.findings=[{', '.join(FINDINGS)}]", "input.label.uncertain=ignore", "input.split.mode=hash",
              "input.split.group=regex", r"input.split.group_pattern=(patient\d+)/", "input.split.group_source=path",
              "input.split.test_fraction=0.3", "finetune.validation_fraction=0.25", "finetune.epochs=2",
              "finetune.batch_size=8", "finetune.train_layers=all", "finetune.learning_rate=0.01",
              "finetune.backbone_lr_scale=1.0", "finetune.patience=0", "finetune.num_processes=1",
              "finetune.row_group_images=8", "train.validity.bootstrap_resamples=100"])


def _direct_probabilities(run_dir: str, data: bytes) -> np.ndarray:
    """sigmoid(head(backbone(image))) of the fine-tuned network's files, by hand."""
    import torch

    from imgfeat.engines import torch_models
    from imgfeat.finetune.run import BACKBONE_FILE, HEAD_FILE
    from imgfeat.io.decoders import DecodeOptions, decode_file

    net = torch_models.build("tiny", 32)
    torch_models.load_weights(net, torch.load(os.path.join(run_dir, BACKBONE_FILE), weights_only=True))
    net.eval()
    head = torch.load(os.path.join(run_dir, HEAD_FILE), weights_only=True)
    x = (decode_file(data, DecodeOptions(size=32))[0].array - 127.5) / 127.5  # tiny_torch's normalisation
    with torch.no_grad():
        features = net(torch.from_numpy(x.astype(np.float32)).permute(2, 0, 1)[None])
        return torch.sigmoid(torch.nn.functional.linear(features, head["weight"], head["bias"]))[0].numpy()


def _loop_weights(spec, files: list[str], out_dir: str) -> dict:
    """The network after training ``spec`` on ``files`` in this process (no TorchDistributor)."""
    import dataclasses

    import torch

    from imgfeat.finetune import loop

    loop.run_loop(dataclasses.replace(spec, files=files, out_dir=out_dir, resume=False))
    return torch.load(os.path.join(out_dir, loop.CHECKPOINT_DIR, loop.CHECKPOINT_FILE), weights_only=True)["model"]


def test_multilabel_finetune_masks_unknown_targets_logs_findings_and_serves_them(spark, tmp_path):
    import mlflow
    import torch

    from imgfeat.finetune.run import RUN_DIR, run_finetune
    from imgfeat.scoring.flavor import load_model

    images = str(tmp_path / "CheXpert-v1.0-small")
    manifest = _chexpert(images)
    store = "sqlite:///" + str(tmp_path / "mlflow.db")
    cfg = _config(images, manifest, str(tmp_path / "ft"), store)
    result = run_finetune(spark, cfg)

    # The decoded table: a target and a mask per finding; uncertain (-1) entries masked, every image in it once.
    table = result.table
    assert table["findings"] == FINDINGS and table["failed"] == 0
    decoded = spark.read.parquet(table["path"]).select("rel_path", "targets", "mask", "split").collect()
    assert len(decoded) == 2 * PATIENTS
    with open(manifest, encoding="utf-8") as fh:
        want = {r["Path"]: r for r in csv.DictReader(fh)}
    for r in decoded:
        row = want[r["rel_path"]]
        assert r["mask"] == [0.0 if row[f] == "-1" else 1.0 for f in FINDINGS]
        assert r["targets"] == [1.0 if row[f] == "1" else 0.0 for f in FINDINGS]
    assert any(0.0 in r["mask"] for r in decoded if r["split"] == "train")  # masked training entries exist

    # Logged as train's multi-label runs: per-finding metrics and thresholds, the findings table and ROC picture.
    client = mlflow.MlflowClient(store)
    run = client.get_run(result.run_id)
    metrics, params = run.data.metrics, run.data.params
    assert {f"test_threshold_{f}" for f in FINDINGS} <= set(metrics)
    assert {f"test_auc_{f}" for f in FINDINGS} | {"test_auc_macro", "test_auc_micro", "test_loss"} <= set(metrics)
    assert params["task"] == "multi" and params["threshold_method"] == "youden" and "val_auc_macro" in metrics
    assert params["label_policy"] == "uncertain=ignore; blank=zeros"
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"findings.csv", "findings.md", "roc_findings.png", "thresholds.json", "model"} <= artifacts
    thresholds = result.extra["thresholds"]
    assert [metrics[f"test_threshold_{f}"] for f in FINDINGS] == pytest.approx(thresholds)
    assert "macro AUC" in result.summary() and "Cardiomegaly" in result.summary()

    # The pyfunc model: per-finding probabilities equal to the fine-tuned network's sigmoid outputs.
    classifier = load_model(f"runs:/{result.run_id}/pyfunc_model")
    assert classifier.multi and classifier.findings == FINDINGS and classifier.thresholds == pytest.approx(thresholds)
    data = open(os.path.join(images, decoded[0]["rel_path"]), "rb").read()
    served = classifier.predict([data])[0]
    assert served.error_class is None and [f["name"] for f in served.findings] == FINDINGS
    np.testing.assert_allclose([served.probabilities[f] for f in FINDINGS],
                               _direct_probabilities(os.path.join(str(tmp_path / "ft"), RUN_DIR), data), atol=1e-5)

    # Masked targets are out of the loss: flipping them gives bit-identical weights (same seed); flipping known
    # targets does not (the comparison can tell).
    spec = _spec(result, cfg)
    same = _loop_weights(spec, spec.files, str(tmp_path / "loop-same"))
    masked = _loop_weights(spec, _flipped_copy(spec.files, str(tmp_path / "masked"), "masked"), str(tmp_path / "loop-m"))
    known = _loop_weights(spec, _flipped_copy(spec.files, str(tmp_path / "known"), "known"), str(tmp_path / "loop-k"))
    assert all(torch.equal(same[k], masked[k]) for k in same)
    assert not all(torch.equal(same[k], known[k]) for k in same)


def _spec(result, cfg):
    """The run's LoopSpec as run_finetune builds it (resume=True: its run folder is kept)."""
    from imgfeat.backbones.registry import get_backbone
    from imgfeat.finetune.run import _loop_spec, _loss_weights

    weights = _loss_weights(result.table, cfg.finetune.class_weighting)
    return _loop_spec(get_backbone("tiny_torch"), result.table, 32, cfg.finetune.output, None, weights, cfg.finetune, True)
