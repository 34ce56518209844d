"""Scoring and serving a multi-label model: per-finding probabilities and calls for one image and for a study, in
the classifier, the HTTP API, the page, the pyfunc model and batch prediction (docs/serving.md, "Multi-label
models and studies")."""

from __future__ import annotations

import os

import numpy as np
import pytest

FINDINGS = ["Atelectasis", "Pleural Effusion", "Mass-like"]
THRESHOLDS = [0.0, 0.5, 1.0]  # always called, called at 0.5, never called (a sigmoid stays below 1)
DIM = 16  # tiny_torch's features


def _weights(seed: int = 3) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.normal(0, 0.5, (2, DIM)), rng.normal(0, 0.3, 2)) for _ in FINDINGS]


def _model(root, aggregation: str | None = "mean") -> str:
    """A multi-label model folder as train logs it (classifier folder + MLmodel): a findings head of one binary
    lr part per finding over tiny_torch's features; returns the model folder."""
    from imgfeat.io.decoders import DecodeOptions
    from imgfeat.scoring.classifier import write_classifier
    from imgfeat.scoring.heads import HeadArrays

    parts = [HeadArrays("linear", {"weights": w, "bias": b}, {"probabilistic": True, "mode": "lr"}) for w, b in _weights()]
    head = HeadArrays("findings", {}, {"probabilistic": True, "mode": "per_finding", "head": "lr", "findings": FINDINGS},
                      parts)
    model = os.path.join(str(root), "model")
    write_classifier(os.path.join(model, "artifacts", "classifier"), head=head, model_name="tiny_torch", weights="none",
                     weights_sha256="", seed=42, weights_id="none-seed42", decode=DecodeOptions(size=32),
                     precision="fp32", labels=FINDINGS, head_name="lr", findings=FINDINGS, thresholds=THRESHOLDS,
                     aggregation=aggregation)
    with open(os.path.join(model, "MLmodel"), "w") as fh:
        fh.write("flavors:\n  python_function:\n    artifacts:\n      classifier:\n        path: artifacts/classifier\n")
    return model


def _png(seed: int, sick: bool = False) -> bytes:
    from imgfeat.demo.samples import encode, xray_array

    return encode(xray_array(np.random.default_rng(seed), (60, 80), sick=sick), "rgb_png")[0]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    from imgfeat.scoring.flavor import load_model

    return load_model(_model(tmp_path_factory.mktemp("multi"))).load(maps=True)


def _direct(classifier, data: bytes) -> np.ndarray:
    """P(finding) by hand: the backbone's features of the image, then each part's logistic regression in NumPy."""
    from imgfeat.engines.base import input_batch

    image = classifier.decode_one(data)
    x = np.asarray(classifier._ensure_predictor()(input_batch([image.array], 32)), dtype=np.float64)[0]
    logits = np.array([(w[1] - w[0]) @ x + (b[1] - b[0]) for w, b in _weights()])
    return 1.0 / (1.0 + np.exp(-logits))


# ---------------------------------------------------------------------------------------------
# the classifier


def test_one_image_gets_a_probability_and_a_call_per_finding(classifier):
    from imgfeat.scoring.classifier import Prediction

    image = _png(1)
    p = classifier.predict([image, b"junk"])
    expected = _direct(classifier, image)
    got = p[0].to_dict()
    assert [f["name"] for f in got["findings"]] == FINDINGS
    np.testing.assert_allclose([f["probability"] for f in got["findings"]], expected, rtol=1e-9, atol=1e-12)
    assert [f["threshold"] for f in got["findings"]] == THRESHOLDS
    assert [f["positive"] for f in got["findings"]] == [bool(e >= t) for e, t in zip(expected, THRESHOLDS, strict=True)]
    assert got["findings"][0]["positive"] and not got["findings"][2]["positive"]
    assert got["label"] == "|".join(f["name"] for f in got["findings"] if f["positive"])
    assert got["probabilities"] == {f["name"]: f["probability"] for f in got["findings"]}
    assert p[1].error_class == "not_an_image" and p[1].findings is None and "findings" not in p[1].to_dict()
    assert "findings" not in Prediction(label="A", probabilities={"A": 1.0}).to_dict()  # single-label as before
    assert classifier.describe()["findings"] == FINDINGS and classifier.describe()["task"] == "multi"
    explained = classifier.predict([image], explain=True)[0]
    assert explained.heatmap_png.startswith(b"\x89PNG") and explained.explanation == "exact"
    assert explained.explained == "Atelectasis" or explained.explained in explained.positive


@pytest.mark.parametrize("how", ["mean", "max", "noisy_or"])
def test_a_study_combines_its_images_probabilities(classifier, how):
    from imgfeat.scoring.classifier import study_of

    images = [_png(s, sick=s == 2) for s in (1, 2, 3)]
    predictions, study = classifier.predict_study([*images, b"junk"], how)
    per_image = np.array([_direct(classifier, i) for i in images])
    expected = {"mean": per_image.mean(axis=0), "max": per_image.max(axis=0),
                "noisy_or": 1 - np.prod(1 - per_image, axis=0)}[how]
    got = study.to_dict()
    assert (got["images"], got["failed"], got["aggregation"]) == (3, 1, how)
    np.testing.assert_allclose([f["probability"] for f in got["findings"]], expected, rtol=1e-9)
    assert [f["positive"] for f in got["findings"]] == [bool(e >= t) for e, t in zip(expected, THRESHOLDS, strict=True)]
    assert got["label"] == "|".join(f["name"] for f in got["findings"] if f["positive"])
    assert study_of(predictions, how).to_dict() == got
    nothing = study_of(predictions[3:], how)
    assert nothing.error_class == "no_image_scored" and nothing.findings is None


def test_a_single_label_study_is_the_mean_of_its_class_probabilities():
    from imgfeat.scoring.classifier import Prediction, study_of

    predictions = [Prediction(label="A", probabilities={"A": 0.6, "B": 0.4}),
                   Prediction(label="B", probabilities={"A": 0.05, "B": 0.95}),
                   Prediction(label="A", probabilities={"A": 0.55, "B": 0.45}),
                   Prediction(error_class="truncated", error_message="cut")]
    study = study_of(predictions, "mean").to_dict()  # two images say A, but the mean says B
    assert study["probabilities"] == pytest.approx({"A": 0.4, "B": 0.6}) and study["label"] == "B"
    assert (study["images"], study["failed"]) == (3, 1) and "findings" not in study
    assert study_of(predictions, "max").label == "B"  # max: A 0.6, B 0.95
    with pytest.raises(ValueError, match="noisy_or"):
        study_of(predictions, "median")


def test_one_aggregation_function_for_train_and_scoring():
    from imgfeat.scoring import aggregate as scoring
    from imgfeat.train import findings as train

    assert train.aggregate is scoring.aggregate and train.AGGREGATIONS == scoring.AGGREGATIONS


def test_the_multi_label_folder_must_agree_with_itself(tmp_path):
    import json

    from imgfeat.scoring.classifier import ImageClassifier

    folder = os.path.join(_model(tmp_path), "artifacts", "classifier")
    info = json.load(open(os.path.join(folder, "classifier.json")))
    json.dump({**info, "thresholds": [0.5]}, open(os.path.join(folder, "classifier.json"), "w"))
    with pytest.raises(ValueError, match="3 findings, 1 thresholds"):
        ImageClassifier(folder)


# ---------------------------------------------------------------------------------------------
# the HTTP API and the page


def _same_study(got: dict, expected: dict) -> None:
    """Equal study results, probabilities to 1e-6 (one image's features may differ in the last bits by batch)."""
    probabilities = [f["probability"] for f in got["findings"]]
    np.testing.assert_allclose(probabilities, [f["probability"] for f in expected["findings"]], rtol=1e-6)
    assert {k: v for k, v in got.items() if k not in ("findings", "probabilities")} == {
        k: v for k, v in expected.items() if k not in ("findings", "probabilities")}
    assert [(f["name"], f["threshold"], f["positive"]) for f in got["findings"]] == [
        (f["name"], f["threshold"], f["positive"]) for f in expected["findings"]]


def test_the_api_returns_findings_for_an_image_and_for_a_study(classifier):
    from fastapi.testclient import TestClient

    from imgfeat.serve.app import create_app

    client = TestClient(create_app(classifier, max_images=4, max_files=8))
    health = client.get("/health").json()["model"]
    assert (health["task"], health["findings"], health["thresholds"]) == ("multi", FINDINGS, THRESHOLDS)
    one = client.post("/predict", content=_png(1), headers={"Content-Type": "image/png"}).json()
    assert one["predictions"][0]["findings"] == classifier.predict([_png(1)])[0].findings and "study" not in one
    files = [("file", (f"view{s}.png", _png(s), "image/png")) for s in (1, 2, 3)]
    expected = classifier.predict_study([_png(s) for s in (1, 2, 3)], "max")[1].to_dict()
    by_query = client.post("/predict?study=true&aggregation=max", files=files)
    assert by_query.status_code == 200, by_query.text
    body = by_query.json()
    assert [p["filename"] for p in body["predictions"]] == ["view1.png", "view2.png", "view3.png"]
    _same_study(body["study"], expected)
    by_form = client.post("/predict", files=files, data={"study": "1"}).json()["study"]
    assert by_form["aggregation"] == "mean"  # the model's own
    _same_study(by_form, classifier.predict_study([_png(s) for s in (1, 2, 3)])[1].to_dict())
    bad = client.post("/predict?study=true&aggregation=median", files=files)
    assert bad.status_code == 400 and bad.json()["error_class"] == "bad_aggregation"
    too_many = client.post("/predict?study=true", files=[("file", (f"{i}.png", b"x", "image/png")) for i in range(5)])
    assert too_many.status_code == 413 and too_many.json()["error_class"] == "too_many_files"  # budgets by images
    junk = client.post("/predict?study=true", files=[("file", ("a.png", b"junk", "image/png"))])
    assert junk.status_code == 422 and junk.json()["study"]["error_class"] == "no_image_scored"


def test_the_page_has_finding_bars_and_a_study_choice():
    from imgfeat.serve.page import PAGE

    assert 'type="file"' in PAGE and "multiple" in PAGE.split('id="file"')[1].split(">")[0]
    assert 'id="as-study"' in PAGE and "score as one study" in PAGE
    assert 'form.append("study", "1")' in PAGE and "p.findings" in PAGE and 'mark.className = "mark"' in PAGE


class _MultiStub:
    """The server's interface without a model: fixed per-finding probabilities per image."""

    def __init__(self, rows):
        self.rows = rows
        self.labels = FINDINGS

    def describe(self):
        return {"backbone": "stub", "engine": "none", "weights_id": "stub-0", "head": "lr", "labels": FINDINGS,
                "input_size": 32, "precision": "fp32", "run_id": None, "task": "multi", "findings": FINDINGS,
                "thresholds": [0.5, 0.5, 0.5], "aggregation": "mean"}

    def load(self, maps=False):
        return self

    def predict(self, contents, explain=False, timings=None):
        from imgfeat.scoring.classifier import Prediction, finding_calls

        out = []
        for i, _ in enumerate(contents):
            calls = finding_calls(FINDINGS, [0.5, 0.5, 0.5], self.rows[i % len(self.rows)])
            out.append(Prediction(label="|".join(c["name"] for c in calls if c["positive"]), width=8, height=8,
                                  probabilities={c["name"]: c["probability"] for c in calls}, format="PNG",
                                  findings=calls))
        return out


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.skipif(not os.path.exists(CHROMIUM) and not os.environ.get("IMGFEAT_REQUIRE_BROWSER"),
                    reason="Debian's chromium is not installed (CI installs it: .ci/run)")
def test_the_page_shows_a_bar_per_finding_and_the_study_in_a_browser(tmp_path):
    import socket
    import threading
    import time
    import urllib.request

    import uvicorn
    from playwright.sync_api import sync_playwright

    from imgfeat.serve.app import create_app

    stub = _MultiStub([[0.9, 0.2, 0.1], [0.7, 0.6, 0.3], [0.2, 0.4, 0.05]])  # study mean: 0.6, 0.4, 0.15
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(stub), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"view{i}.png"))
        open(paths[-1], "wb").write(_png(i))
    try:
        for _ in range(60):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_function("document.getElementById('model').textContent.includes('findings: Atelectasis')")
            page.set_input_files("#file", paths[0])
            page.wait_for_selector("#result:not([hidden])", timeout=30_000)
            assert page.locator("#bars .bar").count() == 3 and page.locator("#bars .mark").count() == 3
            assert page.locator("#bars .bar.positive").count() == 1  # Atelectasis 0.9 >= 0.5
            assert page.is_hidden("#study-row")
            page.set_input_files("#file", paths)
            page.wait_for_selector("#study-result:not([hidden])", timeout=30_000)
            assert page.is_visible("#study-row") and page.locator("#images li").count() == 3
            assert "Study of 3 images (mean)" in page.text_content("#study-title")
            assert page.locator("#study-bars .bar").count() == 3
            assert page.locator("#study-bars .bar.positive .name").all_text_contents() == ["Atelectasis"]
            assert page.text_content("#error") == ""
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)


# ---------------------------------------------------------------------------------------------
# the pyfunc model


def test_the_pyfunc_model_returns_one_column_per_finding(classifier):
    import pandas as pd

    from imgfeat.scoring.pyfunc import ImgfeatPyfunc

    model = ImgfeatPyfunc()
    model.classifier = classifier
    images = [_png(1), _png(2, sick=True)]
    out = model.predict(None, pd.DataFrame({"content": [*images, b"junk"]}))
    columns = ["probability_Atelectasis", "probability_Pleural_Effusion", "probability_Mass_like"]
    assert list(out.columns) == ["findings_positive", *columns, "probabilities", "error_class", "error_message"]
    for row, image in zip(out.head(2).itertuples(), images, strict=True):
        expected = _direct(classifier, image)
        np.testing.assert_allclose([getattr(row, c) for c in columns], expected, rtol=1e-9)
        assert row.findings_positive == "|".join(f for f, e, t in zip(FINDINGS, expected, THRESHOLDS, strict=True) if e >= t)
    assert out.loc[2, "findings_positive"] is None and out.loc[2, "error_class"] == "not_an_image"
    assert np.isnan(out.loc[2, columns].astype(float)).all()


def test_the_logged_signature_names_the_columns_a_multi_label_model_returns():
    from imgfeat.scoring.flavor import pyfunc_signature

    multi = pyfunc_signature(FINDINGS).outputs.input_names()
    assert multi == ["findings_positive", "probability_Atelectasis", "probability_Pleural_Effusion",
                     "probability_Mass_like", "probabilities", "error_class", "error_message"]
    assert pyfunc_signature().outputs.input_names()[:2] == ["label", "probability"]


def test_probability_columns_never_merge_two_findings():
    from imgfeat.scoring.classifier import probability_columns

    assert probability_columns(["Pleural Effusion", "Pleural-Effusion", "A"]) == [
        "probability_Pleural_Effusion", "probability_Pleural_Effusion_2", "probability_A"]


# ---------------------------------------------------------------------------------------------
# batch prediction


def test_pyfunc_uri_of_a_predict_uri():
    from imgfeat.serve.batch_findings import pyfunc_uri_of

    assert pyfunc_uri_of("runs:/abc/model") == "runs:/abc/pyfunc_model"
    assert pyfunc_uri_of("runs:/abc") == "runs:/abc/pyfunc_model"
    assert pyfunc_uri_of("runs:/abc/pyfunc_model") == "runs:/abc/pyfunc_model"
    assert pyfunc_uri_of("/some/folder") == "/some/folder"


def test_batch_predict_writes_findings_and_one_row_per_study(spark, tmp_path):
    import pandas as pd

    from imgfeat.config import load_config
    from imgfeat.scoring.flavor import load_model
    from imgfeat.serve.batch import run_predict

    model = _model(tmp_path / "m")
    root = tmp_path / "images"
    layout = {"study_a": [1, 2, 3], "study_b": [4, 5]}
    for study, seeds in layout.items():
        (root / study).mkdir(parents=True)
        for s in seeds[:2]:  # study_a's third view comes later
            (root / study / f"view{s}.png").write_bytes(_png(s, sick=s % 2 == 0))
    (root / "study_b" / "broken.png").write_bytes(_png(9)[:100])
    out = str(tmp_path / "preds")
    cfg = load_config(overrides={"predict.model_uri": model, "input.path": str(root), "output.path": out,
                                 "output.format": "parquet", "mlflow.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
                      sets=["input.label.mode=none", r"input.study.pattern=^(.*)/[^/]+$", "predict.aggregate=study",
                            "predict.aggregation=noisy_or", "inference.batch_size=4"])
    first = run_predict(spark, cfg)
    assert (first.task, first.predicted, first.failed, first.studies, first.unkeyed) == ("multi", 4, 1, 2, 0)
    (root / "study_a" / "view3.png").write_bytes(_png(3))
    result = run_predict(spark, cfg)  # incremental: one new image; its study combined from both runs' rows
    assert (result.processed, result.predicted, result.studies) == (1, 1, 2)
    classifier = load_model(model)
    preds = pd.read_parquet(out).sort_values("rel_path")
    columns = ["probability_Atelectasis", "probability_Pleural_Effusion", "probability_Mass_like"]
    by_path = {}
    for row in preds.itertuples():
        by_path[row.rel_path] = np.asarray(row.finding_probability)
        np.testing.assert_allclose([getattr(row, c) for c in columns], row.finding_probability)
        assert list(row.findings) == FINDINGS
        assert list(row.findings_positive) == [f for f, p, t in zip(FINDINGS, row.finding_probability, THRESHOLDS,
                                                                      strict=True) if p >= t]
        assert row.prediction == "|".join(row.findings_positive)
    direct = {f"{study}/view{s}.png": _direct(classifier, _png(s, sick=s % 2 == 0))
              for study, seeds in layout.items() for s in seeds}
    assert set(by_path) == set(direct)
    for rel, p in by_path.items():
        np.testing.assert_allclose(p, direct[rel], rtol=1e-5, atol=1e-6)  # Spark's workers = the served model
    assert {f: sum(c.predicted_counts[f] for c in (first, result)) for f in FINDINGS} == {
        f: int(sum(by_path[r][j] >= THRESHOLDS[j] for r in by_path)) for j, f in enumerate(FINDINGS)}
    errors = pd.read_parquet(out + "_errors")
    assert list(errors["error_class"]) == ["truncated"] and list(errors["study_id"]) == ["study_b"]
    studies = pd.read_parquet(out + "_studies").sort_values("key")  # rewritten, not duplicated
    assert list(studies["key"]) == ["study_a", "study_b"] and list(studies["images"]) == [3, 2]
    assert set(studies["aggregation"]) == {"noisy_or"} and set(studies["level"]) == {"study"}
    for row in studies.itertuples():
        members = np.array([p for rel, p in by_path.items() if rel.startswith(row.key + "/")])
        np.testing.assert_allclose(row.finding_probability, 1 - np.prod(1 - members, axis=0), rtol=1e-9)
        assert list(row.findings_positive) == [f for f, p, t in zip(FINDINGS, row.finding_probability, THRESHOLDS,
                                                                      strict=True) if p >= t]
        np.testing.assert_allclose([getattr(row, c) for c in columns], row.finding_probability)


def test_study_rows_need_keys_and_a_multi_label_model(tmp_path):
    import json

    from imgfeat.config import load_config
    from imgfeat.serve.batch import run_predict
    from imgfeat.serve.studies import check_study_keys

    with pytest.raises(ValueError, match="input.study.column"):
        check_study_keys("study", ["path", "group_id"])
    with pytest.raises(ValueError, match="input.split.group"):
        check_study_keys("patient", ["path", "group_id"], grouped=False)
    check_study_keys("series", ["path"])  # series_key comes from each DICOM file
    model = _model(tmp_path)
    info_path = os.path.join(model, "artifacts", "classifier", "classifier.json")
    info = json.load(open(info_path))
    json.dump({k: v for k, v in info.items() if k not in ("task", "findings", "thresholds")}, open(info_path, "w"))
    cfg = load_config(overrides={"predict.model_uri": model, "input.path": str(tmp_path), "output.path": str(tmp_path / "p"),
                                 "mlflow.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}, sets=["predict.aggregate=study"])
    with pytest.raises(ValueError, match="is single-label"):
        run_predict(None, cfg)
