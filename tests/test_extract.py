"""The extract job on generated images, with the tiny backbone (fast) unless marked slow."""

from __future__ import annotations

import glob
import os
import shutil

import numpy as np
import pytest

from imgfeat.demo.samples import encode, xray_array
from imgfeat.featurize.extract import run_extract
from imgfeat.io.decoders import DecodeOptions, decode_image
from imgfeat.store.tables import StorageError

from conftest import tiny_config


def _tables(spark, cfg):
    feats = spark.read.parquet(cfg.output.path).toPandas()
    errors = spark.read.parquet(cfg.errors_path).toPandas()
    return feats, errors


def _local(path: str) -> str:
    return path[5:] if path.startswith("file:") else path


@pytest.fixture()
def folder(samples, tmp_path):
    """A private copy of the samples that a test may change."""
    target = tmp_path / "images"
    shutil.copytree(samples.root, target)
    return str(target)


def test_every_file_ends_in_exactly_one_table(spark, samples, tmp_path):
    cfg = tiny_config(samples.root, str(tmp_path / "feats"))
    result = run_extract(spark, cfg)
    feats, errors = _tables(spark, cfg)

    assert result.listed == samples.valid + len(samples.bad)
    assert result.processed == result.featurized + result.failed == result.listed
    assert (result.featurized, result.failed) == (samples.valid, len(samples.bad))
    assert result.ignored_other_files == 1  # README.txt; .hidden.jpg is not listed at all
    assert len(feats) == samples.valid and feats["path"].is_unique
    assert set(feats["path"]).isdisjoint(errors["path"])
    assert {_local(p): c for p, c in zip(errors["path"], errors["error_class"])} == samples.bad
    assert errors["error_message"].str.len().min() > 10
    assert set(feats["label"]) == {"NORMAL", "PNEUMONIA"}
    assert all(len(f) == 16 for f in feats["features"])
    assert (feats["model"] == "tiny").all() and (feats["weights_id"] == "none-seed42").all()
    assert {"I;16", "RGBA", "P", "CMYK", "L", "RGB"} <= set(feats["source_mode"])
    assert feats["image_id"].is_unique
    assert not any(".hidden" in p for p in list(feats["path"]) + list(errors["path"]))


def test_features_equal_a_direct_model_call(spark, samples, tmp_path):
    from imgfeat.backbones.registry import get_backbone
    from imgfeat.engines import engine_of, resolve_weights

    cfg = tiny_config(samples.root, str(tmp_path / "feats"))
    run_extract(spark, cfg)
    feats = spark.read.parquet(cfg.output.path).toPandas()
    backbone = get_backbone("tiny")
    engine = engine_of(backbone)
    model = engine.build_model(backbone, resolve_weights(backbone, "none", 42))
    opts = DecodeOptions(size=backbone.input_size)
    for _, row in feats.head(8).iterrows():
        with open(_local(row["path"]), "rb") as fh:
            x = decode_image(fh.read(), opts).array[None]
        expected = engine.forward(model, engine.preprocess(backbone, x))[0]
        np.testing.assert_allclose(row["features"], expected, rtol=1e-4, atol=1e-5)


def test_incremental_runs_add_only_new_and_replace_changed(spark, folder, tmp_path):
    cfg = tiny_config(folder, str(tmp_path / "feats"))
    first = run_extract(spark, cfg)
    again = run_extract(spark, cfg)
    assert (again.processed, again.already_done) == (0, first.listed)
    feats, errors = _tables(spark, cfg)
    assert len(feats) + len(errors) == first.listed

    rng = np.random.default_rng(7)
    for i in range(2):
        data, ext = encode(xray_array(rng, (300, 300), sick=True), "rgb_png")
        with open(os.path.join(folder, "PNEUMONIA", f"added_{i}.{ext}"), "wb") as fh:
            fh.write(data)
    changed = sorted(p for p in feats["path"] if "NORMAL" in p)[0]
    old = feats.set_index("path").loc[changed, "features"]
    data, _ = encode(xray_array(rng, (260, 200), sick=True), "gray_jpeg")
    with open(_local(changed), "wb") as fh:
        fh.write(data)
    os.utime(_local(changed), (1_900_000_000, 1_900_000_000))

    third = run_extract(spark, cfg)
    assert (third.processed, third.replaced, third.featurized) == (3, 1, 3)
    feats, errors = _tables(spark, cfg)
    assert feats["path"].is_unique and len(feats) + len(errors) == first.listed + 2
    assert not np.allclose(feats.set_index("path").loc[changed, "features"], old)


def test_overwrite_mode_recomputes_without_duplicates(spark, samples, tmp_path):
    cfg = tiny_config(samples.root, str(tmp_path / "feats"))
    run_extract(spark, cfg)
    cfg.output.mode = "overwrite"
    result = run_extract(spark, cfg)
    feats, errors = _tables(spark, cfg)
    assert result.processed == result.listed == len(feats) + len(errors)
    assert feats["path"].is_unique and errors["path"].is_unique


def test_two_backbones_share_one_table(spark, samples, tmp_path):
    cfg = tiny_config(samples.root, str(tmp_path / "feats"))
    run_extract(spark, cfg)
    cfg.model.seed = 7  # other weights: a different weights_id, featurized separately
    result = run_extract(spark, cfg)
    assert result.processed == result.listed
    feats, _ = _tables(spark, cfg)
    assert feats.groupby("weights_id").size().to_dict() == {"none-seed42": samples.valid, "none-seed7": samples.valid}


def test_labels_from_manifest_and_stable_hash_split(spark, samples, tmp_path):
    manifest = tmp_path / "labels.csv"
    names = sorted(os.listdir(os.path.join(samples.root, "PNEUMONIA")))
    manifest.write_text("path,label\n" + "".join(f"PNEUMONIA/{n},sick\n" for n in names))
    cfg = tiny_config(
        samples.root, str(tmp_path / "feats"),
        "input.label.mode=manifest", f"input.label.manifest={manifest}",
        "input.split.mode=hash", "input.split.test_fraction=0.5",
    )
    run_extract(spark, cfg)
    feats, _ = _tables(spark, cfg)
    labelled = feats[feats["path"].str.contains("/PNEUMONIA/")]
    assert (labelled["label"] == "sick").all()
    assert feats[feats["path"].str.contains("/NORMAL/")]["label"].isna().all()
    assert set(feats["split"]) == {"train", "test"}
    cfg2 = tiny_config(
        samples.root, str(tmp_path / "feats2"), "input.split.mode=hash", "input.split.test_fraction=0.5"
    )
    run_extract(spark, cfg2)
    again, _ = _tables(spark, cfg2)
    assert dict(zip(feats["path"], feats["split"])) == dict(zip(again["path"], again["split"]))


def test_a_manifest_alone_labels_the_images_and_unmatched_rows_and_files_are_counted(spark, samples, tmp_path):
    manifest = tmp_path / "labels.csv"
    names = sorted(n for n in os.listdir(os.path.join(samples.root, "PNEUMONIA")) if not n.startswith("."))
    rows = "".join(f"PNEUMONIA/{n},sick\n" for n in names) + "PNEUMONIA/typo_missing.jpg,sick\nNOPE/x.png,ok\n"
    manifest.write_text("path,label\n" + rows)
    # --manifest without --label-mode: the manifest is used (it used to be ignored in favour of folder labels).
    cfg = tiny_config(samples.root, str(tmp_path / "feats"), f"input.label.manifest={manifest}")
    result = run_extract(spark, cfg)
    feats, _ = _tables(spark, cfg)
    assert (feats[feats["path"].str.contains("/PNEUMONIA/")]["label"] == "sick").all()
    n_normal = sum(1 for n in os.listdir(os.path.join(samples.root, "NORMAL")) if not n.startswith("."))
    assert result.manifest_unmatched == 2
    assert result.unlabelled == n_normal  # every NORMAL file, broken ones included, has no manifest row
    assert "2 rows of the label manifest match no listed image" in result.summary()
    from imgfeat.config import ConfigError

    with pytest.raises(ConfigError, match="input.label.manifest is given but input.label.mode=folder"):
        tiny_config(samples.root, str(tmp_path / "f2"), f"input.label.manifest={manifest}", "input.label.mode=folder")


def test_feature_columns_are_written_without_a_dictionary(spark, tmp_path):
    """Feature vectors and bytes never repeat, so Parquet's dictionary attempt is wasted work: off for float-array
    and binary columns, on for the rest, in a plain append and in a rewrite that replaces rows."""
    import pyarrow.parquet as pq
    from pyspark.sql import functions as F

    from imgfeat.store.tables import append_rows

    def rows(n):  # repeated values, which a dictionary would encode
        return spark.range(n).select(F.concat(F.lit("p"), F.col("id").cast("string")).alias("path"),
                                     F.lit("m").alias("model"), F.lit("w").alias("weights_id"),
                                     F.array_repeat(F.lit(0.5).cast("float"), 64).alias("features"),
                                     F.lit(b"\x00\x01").alias("features_f16")).coalesce(1)

    def encodings(location):
        out = {}
        for f in glob.glob(os.path.join(location, "*.parquet")):
            md = pq.ParquetFile(f).metadata.row_group(0)
            for i in range(md.num_columns):
                out.setdefault(md.column(i).path_in_schema, set()).update(md.column(i).encodings)
        return out

    location = str(tmp_path / "t")
    append_rows(spark, rows(50), location, "parquet")
    replace = rows(3).select("path", "model", "weights_id")  # the rows appended again below: replaced, not doubled
    for step in ("append", "replace"):
        enc = encodings(location)
        assert not any("DICTIONARY" in e for e in enc["features.list.element"] | enc["features_f16"]), (step, enc)
        assert any("DICTIONARY" in e for e in enc["model"]), (step, enc)
        append_rows(spark, rows(3), location, "parquet", replace=replace)
    assert spark.read.parquet(location).count() == 50


def test_delta_without_delta_fails_clearly(spark, samples, tmp_path):
    cfg = tiny_config(samples.root, str(tmp_path / "feats"), "output.format=delta")
    with pytest.raises(StorageError, match="no Delta Lake.*--format parquet"):
        run_extract(spark, cfg)
    cfg.output.format = "auto"
    assert run_extract(spark, cfg).format == "parquet"


def test_missing_input_folder_is_named(spark, tmp_path):
    from imgfeat.io.listing import InputError

    cfg = tiny_config(str(tmp_path / "nope"), str(tmp_path / "feats"))
    with pytest.raises(InputError, match="nope.*does not exist"):
        run_extract(spark, cfg)


def test_weights_file_is_hashed_and_pinned(spark, samples, tmp_path):
    from imgfeat.backbones.registry import get_backbone
    from imgfeat.backbones.weights import WeightsError, sha256_file
    from imgfeat.engines.keras import build_architecture

    path = str(tmp_path / "tiny.weights.h5")
    model = build_architecture(get_backbone("tiny"))
    model.save_weights(path)
    digest = sha256_file(path)
    cfg = tiny_config(samples.root, str(tmp_path / "feats"), f"model.weights={path}", f"model.weights_sha256={digest}")
    result = run_extract(spark, cfg)
    assert result.weights_id == f"sha256:{digest}"
    cfg.model.weights_sha256 = "0" * 64
    with pytest.raises(WeightsError, match="sha256"):
        run_extract(spark, cfg)


@pytest.mark.slow
@pytest.mark.parametrize("model_name, size", [("resnet50", 224), ("inception_v3", 299)])
def test_real_backbones_end_to_end_match_keras(spark, tmp_path, model_name, size):
    from imgfeat.backbones.registry import get_backbone
    from imgfeat.demo.samples import make_samples
    from imgfeat.engines import engine_of, resolve_weights

    s = make_samples(str(tmp_path / "img"), per_class=2, with_bad=True)
    cfg = tiny_config(s.root, str(tmp_path / "feats"), f"model.name={model_name}")
    result = run_extract(spark, cfg)
    assert (result.featurized, result.failed) == (4, len(s.bad))
    feats = spark.read.parquet(cfg.output.path).toPandas()
    backbone = get_backbone(model_name)
    engine = engine_of(backbone)
    model = engine.build_model(backbone, resolve_weights(backbone, "none", 42))
    opts = DecodeOptions(size=size)
    batch = np.stack([decode_image(open(_local(p), "rb").read(), opts).array for p in feats["path"]])
    expected = engine.forward(model, engine.preprocess(backbone, batch))
    got = np.stack(feats["features"].to_numpy())
    assert got.shape == (4, 2048)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))
