"""Multi-label manifests: NIH's delimited findings, CheXpert's per-finding columns under each uncertain policy, and
bad rows named (imgfeat.io.multilabel)."""

from __future__ import annotations

import gzip
import os

import pytest

from imgfeat.io.multilabel import FindingsSpec, ManifestValueError, check_findings, vocabulary, with_findings

NIH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "nih_chestxray14",
                   "Data_Entry_2017_v2020.csv.gz")
CHEXPERT = ["Atelectasis", "Cardiomegaly", "Edema"]


def _nih_rows(n: int) -> list[str]:
    with gzip.open(NIH, "rt") as fh:
        return [next(fh) for _ in range(n + 1)]


@pytest.mark.skipif(not os.path.exists(NIH), reason="../shared/data/nih_chestxray14 is not beside the repository")
def test_nih_delimited_findings_with_no_finding(spark, tmp_path):
    path = tmp_path / "nih.csv"
    path.write_text("".join(_nih_rows(200)))
    manifest = spark.read.option("header", "true").csv(str(path)).withColumnRenamed("Image Index", "rel_path")
    spec = FindingsSpec(column="Finding Labels")
    names = vocabulary(manifest, spec)
    assert "No Finding" not in names and {"Cardiomegaly", "Effusion", "Emphysema"} <= set(names)
    check_findings(manifest, spec, names, str(path))
    rows = {r["rel_path"]: r for r in with_findings(manifest, spec, names).collect()}
    assert rows["00000001_001.png"]["labels"] == ["Cardiomegaly", "Emphysema"]
    assert rows["00000002_000.png"]["labels"] == [] and rows["00000002_000.png"]["label_mask"] == []
    with pytest.raises(ManifestValueError, match=r"line 2 \(00000001_000.png\): unknown finding\(s\) Cardiomegaly"):
        check_findings(manifest, FindingsSpec(findings=("Effusion",), column="Finding Labels"), ["Effusion"], "nih.csv")


def _chexpert(spark, tmp_path, extra: str = ""):
    path = tmp_path / "train.csv"
    path.write_text("path,Atelectasis,Cardiomegaly,Edema\n"
                    "p1/a.jpg,1.0,,-1.0\n"
                    "p1/b.jpg,0.0,-1.0,\n"
                    "p2/c.jpg,,1.0,0.0\n" + extra)
    return spark.read.option("header", "true").csv(str(path)).withColumnRenamed("path", "rel_path"), str(path)


@pytest.mark.parametrize("uncertain, blank, expected", [
    ("ignore", "zeros", {"p1/a.jpg": (["Atelectasis"], ["Edema"]), "p1/b.jpg": ([], ["Cardiomegaly"]),
                         "p2/c.jpg": (["Cardiomegaly"], [])}),
    ("zeros", "zeros", {"p1/a.jpg": (["Atelectasis"], []), "p1/b.jpg": ([], []), "p2/c.jpg": (["Cardiomegaly"], [])}),
    ("ones", "ignore", {"p1/a.jpg": (["Atelectasis", "Edema"], ["Cardiomegaly"]), "p1/b.jpg": (["Cardiomegaly"], ["Edema"]),
                        "p2/c.jpg": (["Cardiomegaly"], ["Atelectasis"])}),
])
def test_chexpert_columns_under_each_uncertain_policy(spark, tmp_path, uncertain, blank, expected):
    manifest, source = _chexpert(spark, tmp_path)
    spec = FindingsSpec(findings=tuple(CHEXPERT), uncertain=uncertain, blank=blank)
    check_findings(manifest, spec, CHEXPERT, source)
    got = {r["rel_path"]: (r["labels"], r["label_mask"]) for r in with_findings(manifest, spec, CHEXPERT).collect()}
    assert got == expected


def test_bad_values_and_missing_columns_are_named(spark, tmp_path):
    manifest, source = _chexpert(spark, tmp_path, "p3/d.jpg,yes,0,2\n")
    spec = FindingsSpec(findings=tuple(CHEXPERT))
    with pytest.raises(ManifestValueError, match=r"line 5 \(p3/d.jpg\): Atelectasis=yes; Edema=2 \(values must be"):
        check_findings(manifest, spec, CHEXPERT, source)
    with pytest.raises(ManifestValueError, match="missing column.* Pneumonia"):
        check_findings(manifest, FindingsSpec(findings=("Pneumonia",)), ["Pneumonia"], source)
    with pytest.raises(ValueError, match="uncertain"):
        FindingsSpec(findings=("A",), uncertain="maybe")
