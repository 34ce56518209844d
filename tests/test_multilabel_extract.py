"""Radiology's label shapes on the input side (issue 35): NIH's delimited findings matched by bare file name, CheXpert's
per-finding columns under each uncertain policy, MURA's study-folder labels with study keys and patient folders, and
the errors bad manifests and studies of two patients must give."""

from __future__ import annotations

import csv
import gzip
import json
import os
import re

import pytest

from imgfeat.config import ConfigError, load_config
from imgfeat.demo.samples import (
    MURA_FOLDER_PATTERN,
    MURA_PATIENT_PATTERN,
    MURA_STUDY_PATTERN,
    NIH_FINDINGS,
    NIH_IMAGE,
    NIH_PATIENT,
    encode,
    make_mura_samples,
    make_nih_samples,
    read_nih_rows,
    write_manifest,
    xray_array,
)
from imgfeat.featurize.extract import run_extract
from imgfeat.io.multilabel import ManifestValueError
from imgfeat.io.root import InputError

from conftest import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NIH = os.path.join(REPO, "..", "shared", "data", "nih_chestxray14", "Data_Entry_2017_v2020.csv.gz")
SAMPLE = 60


def _listed(spark, root: str, *sets: str):
    """The listing of ``root`` under ``sets``, as {rel_path: row dict}."""
    from imgfeat.io.listing import list_files

    images, _ = list_files(spark, load_config(overrides={"input.path": root}, sets=list(sets)).input)
    return {r["rel_path"]: r.asDict() for r in images.collect()}


def _write_images(root, rel_paths, sick=()):
    import numpy as np

    rng = np.random.default_rng(3)
    for rel in rel_paths:
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        data, _ = encode(xray_array(rng, (40, 40), rel in sick), "rgb_png")
        with open(os.path.join(root, rel), "wb") as fh:
            fh.write(data)


# ---------------------------------------------------------------------------------------------
# NIH ChestX-ray14: the real manifest, its first rows paired with generated images


def _all_findings(path: str) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8", newline="") as fh:
        return sorted({f for r in csv.DictReader(fh) for f in r[NIH_FINDINGS].split("|")} - {"No Finding"})


NEEDS_NIH = pytest.mark.skipif(not os.path.exists(NIH), reason="the NIH ChestX-ray14 manifest is not beside the repository")


@pytest.fixture(scope="module")
def nih(spark, tmp_path_factory):
    """SAMPLE rows of the real NIH manifest paired with generated images, extracted with the whole
    manifest as input.label.manifest and a patient-grouped split: (rows, sample set, config, extract result)."""
    tmp = tmp_path_factory.mktemp("nih")
    rows = read_nih_rows(NIH, SAMPLE, every=10)  # ~44 patients, some with follow-ups
    sample = make_nih_samples(str(tmp / "nih"), rows, folders=3, size=(40, 40))
    cfg = tiny_config(sample.root, str(tmp / "feats"), f"input.label.manifest={NIH}",
                      "input.label.path_column=Image Index", "input.label.multi.column=Finding Labels",
                      "input.split.group=manifest_column", "input.split.group_column=Patient ID",
                      "input.split.mode=hash", "input.split.test_fraction=0.4")
    return rows, sample, cfg, run_extract(spark, cfg)


@NEEDS_NIH
def test_nih_manifest_gives_findings_per_image_and_a_patient_grouped_split(spark, nih):
    rows, sample, cfg, result = nih
    feats = spark.read.parquet(cfg.output.path).toPandas()

    total = sum(1 for _ in gzip.open(NIH, "rt")) - 1  # every manifest row but the sample's names no listed image
    assert (result.featurized, result.failed, result.unlabelled) == (SAMPLE, 0, 0)
    assert result.manifest_unmatched == total - SAMPLE
    by_name = {p.rsplit("/", 1)[-1]: r for p, r in zip(feats["rel_path"], feats.itertuples())}
    assert set(by_name) == set(sample.images)
    expected = sample.findings()
    assert {n: list(r.labels) for n, r in by_name.items()} == expected
    assert any(v == [] for v in expected.values()) and any(len(v) > 1 for v in expected.values())  # No Finding; a|b
    assert all(list(m) == [] for m in feats["label_mask"]) and feats["label"].isna().all()
    findings = _all_findings(NIH)  # the whole manifest's vocabulary, on every row
    assert len(findings) == 14 and all(list(f) == findings for f in feats["findings"])
    patients = {r[NIH_IMAGE]: r[NIH_PATIENT] for r in rows}
    assert {n: r.group_id for n, r in by_name.items()} == patients
    sides = feats.groupby("group_id")["split"].nunique()
    assert feats["group_id"].value_counts().max() > 1  # follow-ups: a patient with several images, on one side
    assert (sides == 1).all() and set(feats["split"]) == {"train", "test"}
    assert "study_id" in feats.columns and feats["study_id"].isna().all()


@NEEDS_NIH
def test_nih_rows_train_per_finding_heads_on_the_patient_split_and_print_the_table(spark, nih, tmp_path):
    """The Done-when of issue 35: real NIH rows -> per-finding lr heads on the patient-grouped split -> the
    per-finding table with intervals; a finding without both classes in test is reported, not averaged as NaN."""
    from mlflow.tracking import MlflowClient

    from imgfeat.train.fit import run_train

    _, _, cfg, _ = nih
    feats = spark.read.parquet(cfg.output.path).toPandas()
    test = feats[feats["split"] == "test"]
    findings = list(feats["findings"].iloc[0])
    train = feats[feats["split"] == "train"]
    absent = [f for f in findings if not any(f in list(x) for x in train["labels"])]  # no positive in training
    train_cfg = load_config(sets=[
        f"train.features={cfg.output.path}", "train.heads=[lr]", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db",
        "mlflow.experiment=nih", "train.validity.bootstrap_resamples=100", "train.params.lr_max_iter=10",
        "train.threshold_fraction=0.25"])
    result = run_train(spark, train_cfg)
    (run,) = result.runs
    # One class in the rows the heads were fitted on (train minus the threshold share): at least the absent ones.
    untrained = json.loads(MlflowClient(train_cfg.mlflow.tracking_uri).get_run(run.run_id).data.params[
        "head_constant_findings"])
    assert absent and set(absent) <= set(untrained)
    both = [f for f in findings if 0 < sum(f in list(x) for x in test["labels"]) < len(test) and f not in untrained]
    assert len(both) >= 2
    assert result.split_mode == "column" and result.n_test == len(test) >= 10
    assert run.metrics["test_findings_without_both_classes"] == len(findings) - len(both)
    assert {f"test_auc_{f.replace(' ', '_')}" for f in both} <= set(run.metrics)
    summary = result.summary()
    assert "per finding, best run" in summary and "macro AUC" in summary
    for f in both:  # each finding with both classes: its AUC with a bootstrap interval over patients
        line = next(ln for ln in summary.splitlines() if f" {f} " in ln or ln.strip().startswith(f))
        assert re.search(r"\d\.\d{3} \(\d\.\d{3}-\d\.\d{3}\)", line), line
    for f in untrained:  # nothing learned: said so, no AUC of a constant score
        line = next(ln for ln in summary.splitlines() if ln.strip().startswith(f))
        assert line.rstrip().endswith("one class in training"), line
    print(summary)


def test_bare_file_names_must_be_unique_in_the_folder(spark, tmp_path):
    root = str(tmp_path / "images")
    _write_images(root, ["a/00000001_000.png", "b/00000001_000.png", "b/00000002_000.png", "00000003_000.png",
                         "c/00000003_000.png"])
    manifest = write_manifest(str(tmp_path / "m.csv"), [
        {"Image Index": "00000002_000.png", "Finding Labels": "Mass"},
        {"Image Index": "00000003_000.png", "Finding Labels": "No Finding"},  # the root's file: unambiguous
        {"Image Index": "00000001_000.png", "Finding Labels": "Effusion"}])
    sets = [f"input.label.manifest={manifest}", "input.label.path_column=Image Index",
            "input.label.multi.column=Finding Labels"]
    with pytest.raises(InputError, match=r"00000001_000\.png \(2 files: a/00000001_000\.png, b/00000001_000\.png\)"):
        _listed(spark, root, *sets)
    write_manifest(manifest, [{"Image Index": "00000002_000.png", "Finding Labels": "Mass"},
                              {"Image Index": "00000003_000.png", "Finding Labels": "No Finding"},
                              {"Image Index": "a/00000001_000.png", "Finding Labels": "Effusion"}])
    listed = _listed(spark, root, *sets)
    assert {p: r["labels"] for p, r in listed.items()} == {
        "b/00000002_000.png": ["Mass"], "00000003_000.png": [], "a/00000001_000.png": ["Effusion"],
        "b/00000001_000.png": None, "c/00000003_000.png": None}
    assert all(r["findings"] == ["Effusion", "Mass"] for r in listed.values())
    with pytest.raises(ManifestValueError, match=r"line 4 \(a/00000001_000\.png\): unknown finding\(s\) Effusion"):
        _listed(spark, root, *sets, "input.label.findings=[Mass]")  # declared findings: others are an error


# ---------------------------------------------------------------------------------------------
# CheXpert: one column per finding, 1 / 0 / -1 / blank

CHEXPERT = ["Atelectasis", "Cardiomegaly", "Edema"]
CHEX_ROWS = [  # path, then one value per finding
    ("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.png", "1", "-1", ""),
    ("CheXpert-v1.0-small/train/patient00001/study1/view2_lateral.png", "1", "-1", ""),
    ("CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.png", "0", "1", "-1"),
    ("CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.png", "", "", "0"),
    ("CheXpert-v1.0-small/train/patient00003/study2/view1_frontal.png", "-1.0", "0.0", "1.0"),
]
CHEX_SETS = [f"input.label.findings=[{', '.join(CHEXPERT)}]", "input.label.path_column=Path",
             "input.study.pattern=^(.*)/[^/]+$", "input.split.group=regex", r"input.split.group_pattern=(patient\d+)/",
             "input.split.group_source=path"]


@pytest.fixture(scope="module")
def chexpert(tmp_path_factory):
    root = tmp_path_factory.mktemp("chexpert")
    images = str(root / "images")
    _write_images(images, [r[0] for r in CHEX_ROWS], sick={r[0] for r in CHEX_ROWS if "1" in r[1:]})
    rows = [{"Path": r[0], "Sex": "F", **dict(zip(CHEXPERT, r[1:], strict=True))} for r in CHEX_ROWS]
    return images, write_manifest(str(root / "train.csv"), rows), rows


@pytest.mark.parametrize(("uncertain", "blank", "want"), [
    # per image (in CHEX_ROWS' order): (labels, label_mask)
    ("ignore", "zeros", [(["Atelectasis"], ["Cardiomegaly"])] * 2 + [(["Cardiomegaly"], ["Edema"]), ([], []),
                                                                    (["Edema"], ["Atelectasis"])]),
    ("zeros", "zeros", [(["Atelectasis"], [])] * 2 + [(["Cardiomegaly"], []), ([], []), (["Edema"], [])]),
    ("ones", "ignore", [(["Atelectasis", "Cardiomegaly"], ["Edema"])] * 2 + [
        (["Cardiomegaly", "Edema"], []), ([], ["Atelectasis", "Cardiomegaly"]), (["Atelectasis", "Edema"], [])]),
])
def test_chexpert_columns_follow_the_uncertain_and_blank_policies(spark, chexpert, uncertain, blank, want):
    images, manifest, _ = chexpert
    listed = _listed(spark, images, f"input.label.manifest={manifest}", f"input.label.uncertain={uncertain}",
                     f"input.label.blank={blank}", *CHEX_SETS)
    got = [(listed[r[0]]["labels"], listed[r[0]]["label_mask"]) for r in CHEX_ROWS]
    assert got == want
    assert all(r["findings"] == CHEXPERT and r["label"] is None for r in listed.values())
    assert {r["label_policy"] for r in listed.values()} == {f"uncertain={uncertain}; blank={blank}"}
    assert {p: r["study_id"] for p, r in listed.items()} == {r[0]: r[0].rsplit("/", 1)[0] for r in CHEX_ROWS}
    assert {p: r["group_id"] for p, r in listed.items()} == {r[0]: r[0].split("/")[2] for r in CHEX_ROWS}


def test_a_parquet_manifest_with_numbers_reads_like_the_csv(spark, chexpert, tmp_path):
    import pandas as pd

    images, _, rows = chexpert
    frame = pd.DataFrame(rows)
    for name in CHEXPERT:
        frame[name] = pd.to_numeric(frame[name].replace("", None))  # floats with NaN for blanks, as pandas writes
    frame.to_parquet(tmp_path / "train.parquet")
    listed = _listed(spark, images, f"input.label.manifest={tmp_path / 'train.parquet'}", *CHEX_SETS)
    assert [(listed[r[0]]["labels"], listed[r[0]]["label_mask"]) for r in CHEX_ROWS][2:4] == [
        (["Cardiomegaly"], ["Edema"]), ([], [])]


def test_chexpert_bad_value_or_missing_finding_column_is_a_clear_error(spark, chexpert, tmp_path):
    images, _, rows = chexpert
    bad = [dict(r) for r in rows]
    bad[2]["Edema"] = "2"  # the manifest's line 4 (header = line 1)
    manifest = write_manifest(str(tmp_path / "bad.csv"), bad)
    with pytest.raises(ManifestValueError, match=r"line 4 \(CheXpert-v1.0-small/train/patient00002.*Edema=2"):
        _listed(spark, images, f"input.label.manifest={manifest}", *CHEX_SETS)
    with pytest.raises(InputError, match=r"lacks column\(s\) 'Pleural Effusion' \(a finding"):
        _listed(spark, images, f"input.label.manifest={manifest}", *CHEX_SETS,
                "input.label.findings=[Atelectasis, Pleural Effusion]")


def test_chexpert_extract_carries_the_contract_columns(spark, chexpert, tmp_path):
    images, manifest, _ = chexpert
    cfg = tiny_config(images, str(tmp_path / "feats"), f"input.label.manifest={manifest}", *CHEX_SETS,
                      "input.split.mode=hash")
    result = run_extract(spark, cfg)
    feats = spark.read.parquet(cfg.output.path)
    assert (result.featurized, result.unlabelled, result.no_study) == (len(CHEX_ROWS), 0, 0)
    types = dict(feats.dtypes)
    assert {types[c] for c in ("labels", "label_mask", "findings")} == {"array<string>"}
    assert types["study_id"] == "string" and types["label"] == "string" and types["label_policy"] == "string"
    errors = spark.read.parquet(cfg.errors_path)
    assert {"labels", "label_mask", "findings", "study_id"} <= set(errors.columns)


# ---------------------------------------------------------------------------------------------
# MURA: the label in the study folder, one patient per folder


def test_mura_folder_gives_study_labels_keys_and_patient_groups(spark, tmp_path):
    mura = make_mura_samples(str(tmp_path / "mura"), patients=8, size=(40, 40), seed=5)
    cfg = tiny_config(mura.root, str(tmp_path / "feats"), f"input.label.folder_pattern={MURA_FOLDER_PATTERN}",
                      f"input.study.pattern={MURA_STUDY_PATTERN}", "input.split.group=regex",
                      f"input.split.group_pattern={MURA_PATIENT_PATTERN}", "input.split.group_source=path",
                      "input.split.mode=hash", "input.split.test_fraction=0.4")
    result = run_extract(spark, cfg)
    feats = spark.read.parquet(cfg.output.path).toPandas().set_index("rel_path")
    assert (result.featurized, result.unlabelled, result.ungrouped, result.no_study) == (len(mura.labels), 0, 0, 0)
    assert feats["label"].to_dict() == mura.labels
    assert feats["study_id"].to_dict() == mura.studies
    assert feats["group_id"].to_dict() == mura.patients
    assert (feats.groupby("study_id")["split"].nunique() == 1).all()
    assert (feats.groupby("group_id")["split"].nunique() == 1).all() and set(feats["split"]) == {"train", "test"}
    assert not {"labels", "label_mask", "findings"} & set(feats.columns)  # single-label: no multi-label columns


def test_a_study_split_keeps_ungrouped_studies_whole(spark, tmp_path):
    mura = make_mura_samples(str(tmp_path / "mura"), patients=10, images=(3, 3), size=(32, 32), seed=2)
    listed = _listed(spark, mura.root, f"input.label.folder_pattern={MURA_FOLDER_PATTERN}",
                     f"input.study.pattern={MURA_STUDY_PATTERN}", "input.split.mode=hash",
                     "input.split.test_fraction=0.5")
    per_study: dict[str, set] = {}
    for r in listed.values():
        per_study.setdefault(r["study_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in per_study.values()) and {"train", "test"} == set().union(*per_study.values())


def test_a_study_whose_images_carry_two_patients_is_an_error(spark, tmp_path):
    root = str(tmp_path / "images")
    _write_images(root, ["XR_WRIST/study1_positive/p01_image1.png", "XR_WRIST/study1_positive/p02_image2.png",
                         "XR_WRIST/study2_negative/p03_image1.png"])
    with pytest.raises(InputError, match=r"study 'XR_WRIST/study1_positive': patients p01, p02 in "
                                         r"XR_WRIST/study1_positive/p01_image1\.png \(p01\)"):
        _listed(spark, root, f"input.label.folder_pattern={MURA_FOLDER_PATTERN}",
                f"input.study.pattern={MURA_STUDY_PATTERN}", "input.split.group=regex",
                r"input.split.group_pattern=^(p\d+)_")


def test_label_settings_are_checked_at_start():
    with pytest.raises(ConfigError, match="input.label.multi.column reads findings from a manifest"):
        load_config(sets=["input.label.multi.column=Finding Labels"])
    with pytest.raises(ConfigError, match="input.label.findings reads findings from a manifest"):
        load_config(sets=["input.label.findings=[Edema]", "input.label.mode=folder"])
    with pytest.raises(ConfigError, match="input.label.folder_pattern.*2 capture groups"):
        load_config(sets=[r"input.label.folder_pattern=^(study)\d+_(\w+)$"])
    with pytest.raises(ConfigError, match="input.study.pattern.*not a valid regex"):
        load_config(sets=["input.study.pattern=(unclosed"])
    with pytest.raises(ConfigError, match="input.study.column.*is a manifest column"):
        load_config(sets=["input.study.column=Study"])
    with pytest.raises(ConfigError, match="input.label.uncertain"):
        load_config(sets=["input.label.uncertain=maybe"])


def test_dicom_files_take_their_own_study_when_the_input_gives_none(spark, tmp_path):
    import numpy as np

    from imgfeat.demo.samples import dicom_bytes, make_dicom

    rng = np.random.default_rng(0)
    root = tmp_path / "dicom"
    (root / "scans").mkdir(parents=True)
    datasets = [make_dicom("mono2_16bit", rng, size=48, patient_id=f"PAT-{i}") for i in range(4)]
    for ds in datasets[1:3]:  # three views of one study
        ds.StudyInstanceUID = datasets[0].StudyInstanceUID
    for i, ds in enumerate(datasets):
        (root / "scans" / f"view{i}.dcm").write_bytes(dicom_bytes(ds))
    manifest = write_manifest(str(tmp_path / "m.csv"), [
        {"path": f"scans/view{i}.dcm", "findings": ["Mass", "No Finding"][i % 2]} for i in range(4)])
    cfg = tiny_config(str(root), str(tmp_path / "feats"), f"input.label.manifest={manifest}",
                      "input.label.multi.column=findings", "privacy.id_salt=test-secret", "input.split.mode=hash",
                      "input.split.test_fraction=0.5")
    run_extract(spark, cfg)
    feats = spark.read.parquet(cfg.output.path).toPandas().set_index("rel_path").sort_index()
    assert feats["study_id"].notna().all() and (feats["study_id"] == feats["study_key"]).all()
    assert feats["study_id"].nunique() == 2 and feats.loc["scans/view3.dcm", "study_id"] != feats.loc[
        "scans/view0.dcm", "study_id"]
    assert feats.iloc[:3]["split"].nunique() == 1  # the split was recomputed by study once the files were read
    assert [list(v) for v in feats["labels"]] == [["Mass"], [], ["Mass"], []]
