"""Patient data stays home: keyed ids in MLflow, no patient fields as labels, hashed dataset names; identical files
with two labels stop training; dotted Spark keys in --set; Arrow batches bounded in bytes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from imgfeat.config import ConfigError, load_config

from conftest import tiny_config

COPY = ("train/NORMAL/IM-0201-0001.jpeg", "train/PNEUMONIA/person1500_bacteria_1.jpeg")


@pytest.fixture(scope="module")
def phi_table(spark, tmp_path_factory):
    """Kermany-style names (patient numbers in them) in train/ and test/ folders: patient person1437 on both sides,
    and one NORMAL film copied into PNEUMONIA. The features folder's own name names a ward and a patient."""
    from imgfeat.demo.samples import encode, xray_array
    from imgfeat.featurize.extract import run_extract

    tmp = tmp_path_factory.mktemp("phi")
    root = tmp / "img"
    names = {"train/NORMAL": ["IM-0201-0001", "IM-0202-0001", "IM-0203-0001"],
             "train/PNEUMONIA": ["person1437_bacteria_1", "person1438_bacteria_1", "person1439_virus_1"],
             "test/NORMAL": ["IM-0204-0001", "IM-0205-0001"],
             "test/PNEUMONIA": ["person1437_bacteria_2", "person1440_bacteria_1"]}
    rng = np.random.default_rng(11)
    for folder, stems in names.items():
        os.makedirs(root / folder)
        for stem in stems:
            data, _ = encode(xray_array(rng, (48, 48), sick="PNEUMONIA" in folder), "gray_jpeg")
            (root / folder / f"{stem}.jpeg").write_bytes(data)
    shutil.copy(root / COPY[0], root / COPY[1])
    features = str(tmp / "ward7_person1437_features")
    run_extract(spark, tiny_config(str(root), features, "input.split.mode=folder", "input.split.folder_level=2",
                                   "input.split.group=regex", "input.split.group_pattern=kermany"))
    store = "sqlite:///" + str(tmp / "mlflow.db")
    sets = [f"train.features={features}", "train.heads=[dt]", f"mlflow.tracking_uri={store}", "mlflow.experiment=phi",
            "train.validity.bootstrap_resamples=0", "train.validity.allow_group_overlap=true"]
    return {"features": features, "store": store, "sets": sets, "table": spark.read.parquet(features).toPandas()}


def _strings(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    else:
        yield str(value)


def _audit(client, run_id):
    return json.loads(open(client.download_artifacts(run_id, "audit.json"), encoding="utf-8").read())


def test_identical_files_with_two_labels_stop_train_and_nothing_logged_names_a_patient(spark, phi_table):
    import mlflow

    from imgfeat.train.audit import LabelConflictError
    from imgfeat.train.fit import run_train

    sets, table = phi_table["sets"], phi_table["table"]
    assert set(table["group_id"]) >= {"person1437", "IM-0201"}
    with pytest.raises(LabelConflictError) as stopped:
        run_train(spark, load_config(sets=sets))
    message = str(stopped.value)
    assert f"{COPY[0]} (NORMAL)" in message and f"{COPY[1]} (PNEUMONIA)" in message and "--allow-label-conflicts" in message

    first = run_train(spark, load_config(sets=[*sets, "train.validity.allow_label_conflicts=true"]))
    second = run_train(spark, load_config(sets=[*sets, "train.validity.allow_label_conflicts=true"]))
    assert first.runs and first.audit["exact_cross_label_count"] == 1
    client = mlflow.MlflowClient(phi_table["store"])
    failed = [r for r in client.search_runs([first.experiment_id]) if r.info.status == "FAILED"]
    assert len(failed) == 1
    # Every name an attacker could guess (groups, files, paths, image ids, contents), hashed as a plain prefix.
    guesses = {*table["group_id"], *table["rel_path"], *table["image_id"],
               *(p.split("/")[-1] for p in table["rel_path"]), *(p.split("/")[-1].split(".")[0] for p in table["rel_path"])}
    plain = {hashlib.sha256(g.encode()).hexdigest()[:8] for g in guesses} | {c[:8] for c in table["content_sha256"]}
    audits = []
    for run in (failed[0], client.get_run(first.parent_run_id), client.get_run(second.parent_run_id)):
        audit = _audit(client, run.info.run_id)
        logged = [*_strings(audit), open(client.download_artifacts(run.info.run_id, "audit.md"), encoding="utf-8").read(),
                  *run.data.params.values(), *run.data.tags.values()]
        assert not [v for v in logged for h in plain if h in v], "an id in MLflow is a plain hash of a guessable name"
        assert not [v for v in logged if re.search(r"person1\d{3}|IM-02|\.jpeg|ward7", v)], "a name reached MLflow"
        assert re.fullmatch(r"features-[0-9a-f]{12}", run.data.tags["dataset"]) and run.data.params["dataset"] == run.data.tags["dataset"]
        audits.append(audit)
    # Without a secret, ids link within a run only: the same patient gets another id in the next run.
    groups = [a["groups_across_splits"] for a in audits[1:]]
    assert [len(g) for g in groups] == [1, 1] and groups[0][0]["group_id"] != groups[1][0]["group_id"]
    assert audits[1]["exact_cross_label"][0]["content_id"] != audits[2]["exact_cross_label"][0]["content_id"]


def test_a_secret_keys_ids_stably_and_a_given_dataset_name_is_used(monkeypatch):
    from imgfeat.train.privacy import dataset_name, keyed_id, run_salt

    monkeypatch.delenv("IMGFEAT_ID_SALT", raising=False)
    assert run_salt("s3cret") == "s3cret" and run_salt(None) != run_salt(None)
    monkeypatch.setenv("IMGFEAT_ID_SALT", "from-env")
    assert run_salt(None) == "from-env"
    assert keyed_id("person1437", "s3cret") == keyed_id("person1437", "s3cret") != keyed_id("person1437", "other")
    assert dataset_name("kermany-grouped", "/data/ward7", "s") == "kermany-grouped"
    assert dataset_name(None, "/data/ward7/", "s") == dataset_name(None, "/data/ward7", "s") != "ward7"


@pytest.mark.parametrize("tag", ["PatientName", "PatientID", "patient_birth_date", "AccessionNumber", "StudyInstanceUID",
                                 "(0010,0010)", "0010,0020"])
def test_patient_fields_are_refused_as_label_tags(tag):
    with pytest.raises(ConfigError, match=r"input\.label\.dicom_tag=.*patient/study identifier"):
        load_config(sets=["input.label.mode=dicom_tag", f"input.label.dicom_tag='{tag}'"])


def test_clinical_label_tags_pass_and_privacy_uses_the_config_list():
    from imgfeat.config import phi
    from imgfeat.train import privacy

    for tag in ("StudyDescription", "BodyPartExamined", "ViewPosition"):
        assert load_config(sets=["input.label.mode=dicom_tag", f"input.label.dicom_tag={tag}"]).input.label.dicom_tag == tag
    assert privacy.PATIENT_FIELDS is phi.PATIENT_FIELDS and "patientname" in phi.PATIENT_FIELDS


def test_set_of_a_dotted_spark_key_reaches_the_session_conf_intact():
    from imgfeat.cli import build_parser, config_from_args

    cfg = load_config(sets=["spark.conf.spark.sql.shuffle.partitions=7", "spark.conf.spark.ui.enabled=false"])
    assert cfg.spark.conf == {"spark.sql.shuffle.partitions": "7", "spark.ui.enabled": "false"}
    nested = load_config(sets=["spark.conf={spark: {sql: {shuffle.partitions: 7}}}"])
    assert nested.spark.conf == {"spark.sql.shuffle.partitions": "7"}
    a = build_parser().parse_args(["train", "--features", "f", "--allow-label-conflicts",
                                   "--set", "spark.conf.spark.sql.shuffle.partitions=7"])
    cfg = config_from_args(a)
    assert cfg.spark.conf == {"spark.sql.shuffle.partitions": "7"} and cfg.train.validity.allow_label_conflicts
    with pytest.raises(ConfigError, match="needs a text value"):
        load_config(sets=["spark.conf.spark.jars.packages=[a, b]"])


def test_arrow_batches_are_bounded_in_bytes(spark):
    from pyspark.sql import functions as F

    from imgfeat.session import get_spark

    for bad in ("0", str(2**31)):
        with pytest.raises(ConfigError, match="arrow_batch_bytes"):
            load_config(sets=[f"inference.arrow_batch_bytes={bad}"])
    row = 100_000

    @F.pandas_udf("long")
    def batch_bytes(content: pd.Series) -> pd.Series:
        return pd.Series([sum(len(c) for c in content)] * len(content))

    rows = spark.range(12, numPartitions=1).select(F.expr(f"cast(repeat('x', {row}) as binary)").alias("content"))
    try:
        get_spark(load_config(sets=["inference.arrow_batch_rows=64", "inference.arrow_batch_bytes=250000"]))
        seen = rows.select(batch_bytes("content").alias("b")).toPandas()["b"]
    finally:
        get_spark(load_config())  # the defaults again for the other tests
    # A batch closes once it reaches the bound: at most the bound plus one row, never 12 rows of 100 KB.
    assert 0 < seen.max() < 250_000 + row and seen.max() == 3 * row


def test_finetune_input_with_two_labels_on_one_file_stops(spark):
    from imgfeat.finetune.data import check_labels
    from imgfeat.train.audit import LabelConflictError

    rows = [("/in/NORMAL/a.png", "NORMAL/a.png", "NORMAL", "train", "c1"),
            ("/in/PNEUMONIA/a_copy.png", "PNEUMONIA/a_copy.png", "PNEUMONIA", "test", "c1"),
            ("/in/NORMAL/b.png", "NORMAL/b.png", "NORMAL", "train", "c2"),
            ("/in/NORMAL/b_copy.png", "NORMAL/b_copy.png", "NORMAL", "train", "c2")]
    decoded = spark.createDataFrame(rows, "path string, rel_path string, label string, split string, content_sha256 string")
    with pytest.raises(LabelConflictError, match=r"1 file content.*NORMAL/a\.png \(NORMAL\) = PNEUMONIA/a_copy\.png \(PNEUMONIA\)"):
        check_labels(decoded, False, "/in")
    check_labels(decoded, True, "/in")  # train.validity.allow_label_conflicts
    check_labels(decoded.filter("content_sha256 = 'c2'"), False, "/in")  # same label: fine
