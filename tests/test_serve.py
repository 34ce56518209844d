"""Serving: heads as arrays, the pyfunc model (= the Spark model), mlflow models serve, the HTTP API, the page."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config

# ---------------------------------------------------------------------------------------------
# heads exported to arrays score exactly as MLlib


@pytest.mark.parametrize("n_classes,heads", [(2, ["lr", "rf", "dt", "gbt", "svc"]), (3, ["gbt", "svc", "rf"])])
def test_exported_heads_score_exactly_as_mllib(spark, n_classes, heads):
    from pyspark.ml.functions import vector_to_array
    from pyspark.ml.linalg import Vectors

    from imgfeat.config import load_config
    from imgfeat.train.export import export_head
    from imgfeat.train.heads import build_head

    cfg = load_config(sets=["train.params.rf_num_trees=8", "train.params.gbt_max_iter=3", "train.params.lr_max_iter=10",
                            "train.params.svc_max_iter=5"])
    rng = np.random.default_rng(n_classes)
    x = rng.normal(0, 1, (240, 6))
    y = rng.integers(0, n_classes, 240)
    x[:, 0] += 1.5 * y
    frame = spark.createDataFrame([(Vectors.dense(r.tolist()), float(t)) for r, t in zip(x, y, strict=True)],
                                  ["features", "label_index"])
    for head in heads:
        model = build_head(head, cfg.train, n_classes, weighted=False).estimator.fit(frame)
        out = model.transform(frame)
        column = "probability" if "probability" in out.columns else "rawPrediction"
        pdf = out.select(vector_to_array(column).alias("s"), "prediction_index").toPandas()
        arrays = export_head(model)
        np.testing.assert_allclose(arrays.raw_scores(x), np.stack(pdf["s"]), atol=1e-9, err_msg=head)
        index, proba = arrays.predict(x)
        assert (index == pdf["prediction_index"].to_numpy()).all(), head
        np.testing.assert_allclose(proba.sum(axis=1), 1.0)


def test_saved_heads_load_without_pickle(tmp_path):
    from imgfeat.scoring.heads import HeadArrays

    part = HeadArrays("linear", {"weights": np.array([[-1.0, 2.0], [1.0, -2.0]]), "bias": np.array([0.5, -0.5])},
                      {"probabilistic": False, "mode": "svc"})
    head = HeadArrays("ovr", {}, {"probabilistic": False, "mode": "ovr"}, [part, part])
    head.save(str(tmp_path))
    loaded = HeadArrays.load(str(tmp_path))
    x = np.array([[1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_array_equal(loaded.raw_scores(x), head.raw_scores(x))


# ---------------------------------------------------------------------------------------------
# the flavour's files and requirements


@pytest.mark.parametrize("with_file", [False, True])
def test_classifier_json_is_written_as_before_and_round_trips(tmp_path, with_file):
    """Models logged before ClassifierInfo load: the file's bytes are those of the earlier writer's dict."""
    from imgfeat.backbones.registry import get_backbone
    from imgfeat.io.decoders import DecodeOptions
    from imgfeat.scoring.flavor import CLASSIFIER_FILE, ClassifierInfo, read_info, save_model
    from imgfeat.scoring.heads import HeadArrays

    decode = DecodeOptions(size=32, formats=("PNG", "DICOM"))
    backbone = get_backbone("tiny_torch")
    head = HeadArrays("linear", {"weights": np.ones((2, backbone.feature_dim)), "bias": np.zeros(2)},
                      {"probabilistic": True, "mode": "lr"})
    source = tmp_path / "my weights.pth"
    source.write_bytes(b"state dict")
    # The earlier write_classifier's description, key by key and in its order.
    before = {"format_version": 1, "backbone": "tiny_torch", "engine": backbone.engine, "input_size": 32,
              "feature_dim": backbone.feature_dim, "weights": "file" if with_file else "none", "weights_id": "none-seed7",
              "weights_sha256": "", "seed": 7, "decode": decode.to_dict(), "precision": "fp32",
              "labels": ["NORMAL", "PNEUMONIA"], "head": "lr", "head_kind": "linear", "run_id": "r1",
              **({"weights_file": "weights/my weights.pth"} if with_file else {})}
    info = ClassifierInfo.describe(model_name="tiny_torch", weights="none", weights_sha256="", seed=7,
                                   weights_id="none-seed7", decode=decode, precision="fp32",
                                   labels=["NORMAL", "PNEUMONIA"], head_name="lr", head_kind=head.kind, run_id="r1")
    folder = save_model(str(tmp_path / "classifier"), info, head, str(source) if with_file else None)
    text = open(os.path.join(folder, CLASSIFIER_FILE), encoding="utf-8").read()
    assert text == json.dumps(before, indent=2)
    assert ClassifierInfo.from_dict(json.loads(text)).to_dict() == before
    assert read_info(folder, folder).to_dict() == before
    assert not with_file or open(os.path.join(folder, "weights", "my weights.pth"), "rb").read() == b"state dict"
    newer = {**before, "format_version": 2}
    without_labels = {k: v for k, v in before.items() if k != "labels"}
    for changed, message in ((newer, "classifier format 2 is not 1"), (without_labels, r"lacks \['labels'\]")):
        with open(os.path.join(folder, CLASSIFIER_FILE), "w", encoding="utf-8") as fh:
            json.dump(changed, fh)
        with pytest.raises(ValueError, match=message):
            read_info(folder, folder)


def test_pip_requirements_pin_the_engine_and_spark_only_for_the_spark_model():
    from importlib import metadata

    from imgfeat.scoring.flavor import get_default_pip_requirements

    torch = f"torch=={metadata.version('torch').split('+')[0]}"
    served = get_default_pip_requirements("torch", "tiny_torch", ("PNG",))
    spark = get_default_pip_requirements("torch", "tiny_torch", ("PNG", "DICOM"), spark=True)
    assert torch in served and torch in spark  # the Spark model of a torch backbone needs torch too
    assert not any(r.startswith(("pyspark==", "pydicom==")) for r in served)
    assert any(r.startswith("pyspark==") for r in spark) and any(r.startswith("pydicom==") for r in spark)
    keras_spark = get_default_pip_requirements("keras", "resnet50", ("PNG",), spark=True)
    assert len(keras_spark) == len(set(keras_spark)) and not any(r.startswith("torch==") for r in keras_spark)


# ---------------------------------------------------------------------------------------------
# a trained run: the pyfunc model against the Spark PipelineModel


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return "sqlite:///" + str(tmp_path_factory.mktemp("serve-mlflow") / "mlflow.db")


@pytest.fixture(scope="module")
def served_runs(spark, samples, tmp_path_factory, store):
    """tiny_torch features of the samples; lr, rf, svc and a Keras head with a hidden layer trained on them."""
    from imgfeat.config import load_config
    from imgfeat.featurize.extract import run_extract
    from imgfeat.train.fit import run_train

    tmp = tmp_path_factory.mktemp("serve")
    features = str(tmp / "features")
    run_extract(spark, tiny_config(samples.root, features, "model.name=tiny_torch", "input.split.mode=hash",
                                   "input.split.test_fraction=0.3"))
    cfg = load_config(sets=[
        f"train.features={features}", "train.heads=[lr, rf, svc, keras]", f"mlflow.tracking_uri={store}",
        "mlflow.experiment=serve", "train.params.rf_num_trees=5", "train.params.lr_max_iter=20",
        "train.params.svc_max_iter=5", "train.keras.epochs=3", "train.keras.hidden_units=8",
        f"train.keras.cache_dir=file://{tmp}/petastorm", "train.register=imgfeat-serve-test",
    ])
    result = run_train(spark, cfg)
    return {r.head: r.run_id for r in result.runs}, result


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")


def _files(root):
    """The sample images (good and broken) as extract lists them: no README, no hidden files."""
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))


def test_pyfunc_output_equals_the_spark_pipeline_model(spark, samples, served_runs, store):
    import mlflow
    import mlflow.spark
    from pyspark.ml.functions import vector_to_array
    from pyspark.sql import functions as F

    runs, _ = served_runs
    mlflow.set_tracking_uri(store)
    paths = _files(samples.root)
    # The Spark model scores images that decode (imgfeat predict routes the others to its errors table).
    good = [p for p in paths if os.path.abspath(p) not in samples.bad]
    raw = spark.read.format("binaryFile").load(good).select("path", "content")
    blobs = {p: open(p, "rb").read() for p in paths}
    for head, run_id in runs.items():
        pipeline = mlflow.spark.load_model(f"runs:/{run_id}/model")
        scored = pipeline.transform(raw)
        score_col = "probability" if "probability" in scored.columns else "rawPrediction"
        rows = scored.select("path", "prediction", vector_to_array(F.col(score_col)).alias("s")).collect()
        spark_out = {r["path"].removeprefix("file:"): r for r in rows}
        model = mlflow.pyfunc.load_model(f"runs:/{run_id}/pyfunc_model")
        import pandas as pd

        out = model.predict(pd.DataFrame({"content": [blobs[p] for p in paths]}))
        assert len(out) == len(paths)
        for p, (_, row) in zip(paths, out.iterrows(), strict=True):
            if os.path.abspath(p) in samples.bad:
                assert row["label"] is None and row["error_class"] == samples.bad[os.path.abspath(p)], (head, p)
                continue
            expected = spark_out[p]
            assert row["label"] == expected["prediction"], (head, p)
            s = np.asarray(expected["s"])
            if score_col == "rawPrediction":
                s = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
            got = np.array([row["probabilities"][k] for k in sorted(row["probabilities"])])
            np.testing.assert_allclose(got, s, atol=2e-5, err_msg=f"{head} {p}")
        assert out["error_class"].notna().sum() == len(samples.bad)


def test_class_activation_map_is_exact_for_a_linear_head(served_runs, store):
    import mlflow

    from imgfeat.demo.samples import encode, xray_array
    from imgfeat.scoring.flavor import load_model

    runs, _ = served_runs
    mlflow.set_tracking_uri(store)
    classifier = load_model(f"runs:/{runs['lr']}/pyfunc_model")
    image = classifier.decode_one(encode(xray_array(np.random.default_rng(1), (240, 320), sick=True), "rgb_png")[0])
    batch = image.array[None].astype(np.float32)
    features = classifier._ensure_predictor()(batch)[0]
    maps = classifier._ensure_maps()(batch)[0]
    np.testing.assert_allclose(maps.mean(axis=(0, 1)), features, rtol=1e-4, atol=1e-5)  # the features pool the map
    w, b = classifier.head.arrays["weights"], classifier.head.arrays["bias"]
    logits = w @ features + b
    for k in range(len(classifier.labels)):
        direction, how = classifier.head.class_direction(features, k)
        assert how == "exact"
        # mean over the map of A(x, y) . d is class k's logit minus the classes' mean, up to the bias terms
        np.testing.assert_allclose((maps @ direction).mean() + b[k] - b.mean(), logits[k] - logits.mean(), rtol=1e-4, atol=1e-5)
    keras = load_model(f"runs:/{runs['keras']}/pyfunc_model")
    assert keras.head.class_direction(features, 0)[1] == "gradient"
    assert load_model(f"runs:/{runs['rf']}/pyfunc_model").head.class_direction(features, 1)[1] == "path"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen | None, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {proc.stdout.read().decode()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {seconds} s")


def _post_json(url: str, payload: dict, timeout: float = 60) -> dict:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=timeout).read())


def test_mlflow_models_serve_answers_on_loopback(samples, served_runs, store):
    runs, _ = served_runs
    port = _free_port()
    # mlflow execs `uvicorn` from PATH: this environment's, as after `source .venv/bin/activate`.
    env = {**os.environ, "MLFLOW_TRACKING_URI": store,
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{runs['lr']}/pyfunc_model",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait(f"http://127.0.0.1:{port}/ping", proc, 120)
        good = next(p for p in _files(samples.root) if p.endswith(".png") and "bad_" not in p)
        data = base64.b64encode(open(good, "rb").read()).decode()
        out = _post_json(f"http://127.0.0.1:{port}/invocations",
                         {"dataframe_split": {"columns": ["content"], "data": [[data], [base64.b64encode(b"nope").decode()]]}})
        first, second = out["predictions"]
        assert first["label"] in ("NORMAL", "PNEUMONIA") and abs(sum(first["probabilities"].values()) - 1) < 1e-6
        assert second["label"] is None and second["error_class"] == "not_an_image"
    finally:
        proc.terminate()
        proc.wait(30)


# ---------------------------------------------------------------------------------------------
# the HTTP API


@pytest.fixture(scope="module")
def api(served_runs, store):
    import mlflow
    from fastapi.testclient import TestClient

    from imgfeat.scoring.flavor import load_model
    from imgfeat.serve.app import create_app

    runs, _ = served_runs
    mlflow.set_tracking_uri(store)
    classifier = load_model(f"runs:/{runs['lr']}/pyfunc_model").load()
    app = create_app(classifier, model_uri="test", max_upload_bytes=2 * 1024 * 1024)
    return TestClient(app), classifier


def _png(seed: int = 0, size=(240, 320), sick=False) -> bytes:
    from imgfeat.demo.samples import encode, xray_array

    return encode(xray_array(np.random.default_rng(seed), size, sick=sick), "rgb_png")[0]


def test_predict_multipart_raw_and_explain(api):
    client, classifier = api
    assert client.get("/health").json()["model"]["head"] == "lr"
    one = client.post("/predict", files={"file": ("a.png", _png(), "image/png")})
    assert one.status_code == 200, one.text
    body = one.json()
    p = body["predictions"][0]
    expected = classifier.predict([_png()])[0]
    assert p["label"] == expected.label and p["probabilities"] == pytest.approx(expected.probabilities)
    assert body["model"]["weights_id"] == "none-seed42" and body["timings_ms"]["total"] > 0
    raw = client.post("/predict", content=_png(), headers={"Content-Type": "image/png"})
    assert raw.json()["predictions"][0]["probabilities"] == pytest.approx(p["probabilities"])
    many = client.post("/predict", files=[("file", ("a.png", _png(1), "image/png")), ("file", ("b.png", b"junk", "image/png"))])
    assert many.status_code == 200 and [q["filename"] for q in many.json()["predictions"]] == ["a.png", "b.png"]
    assert many.json()["predictions"][1]["error_class"] == "not_an_image"
    explained = client.post("/predict?explain=true", files={"file": ("a.png", _png(), "image/png")}).json()["predictions"][0]
    overlay = Image.open(io.BytesIO(base64.b64decode(explained["heatmap_png"])))
    assert overlay.size == (explained["width"], explained["height"]) != (32, 32)  # the image's own size, not the model's
    assert explained["explanation"] == "exact"
    png = client.post("/explain", content=_png(), headers={"Content-Type": "image/png"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    schema = client.get("/openapi.json").json()
    assert {"/predict", "/explain", "/health"} <= set(schema["paths"])
    assert "multipart/form-data" in schema["paths"]["/predict"]["post"]["requestBody"]["content"]


def test_dicom_upload_is_scored(api):
    from pydicom.data import get_testdata_file

    client, _ = api
    data = open(get_testdata_file("CT_small.dcm"), "rb").read()
    out = client.post("/predict", content=data, headers={"Content-Type": "application/dicom"})
    assert out.status_code == 200, out.text
    assert out.json()["predictions"][0]["format"] == "DICOM"


def test_bad_input_gets_a_clear_4xx(api):
    client, _ = api
    png = _png()
    cases = {
        "empty": (client.post("/predict", content=b"", headers={"Content-Type": "image/png"}), 400, None),
        "no file part": (client.post("/predict", content=b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n--b--\r\n',
                                     headers={"Content-Type": "multipart/form-data; boundary=b"}), 400, None),
        "form, not an upload": (client.post("/predict", data={"x": "1"}), 415, None),
        "not an image": (client.post("/predict", content=b"hello world", headers={"Content-Type": "image/png"}), 422, "not_an_image"),
        "truncated": (client.post("/predict", content=png[: len(png) // 2], headers={"Content-Type": "image/png"}), 422, "truncated"),
        "wrong type": (client.post("/predict", content=png, headers={"Content-Type": "text/plain"}), 415, None),
        "oversize": (client.post("/predict", content=b"\0" * (3 * 1024 * 1024), headers={"Content-Type": "image/png"}), 413, None),
        "explain of junk": (client.post("/explain", content=b"junk", headers={"Content-Type": "image/png"}), 422, "not_an_image"),
    }
    bomb = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(bomb, "PNG")  # 144 megapixels in ~20 kB: over the 120 MP guard
    cases["decompression bomb"] = (client.post("/predict", content=bomb.getvalue(), headers={"Content-Type": "image/png"}),
                                   422, "too_large")
    for name, (response, status, error_class) in cases.items():
        assert response.status_code == status, (name, response.status_code, response.text)
        body = response.json()
        assert body["detail"], name
        if error_class:
            assert body["error_class"] == error_class, (name, body)


def test_oversize_upload_is_refused_from_its_content_length(api):
    client, _ = api

    def body():  # a 200 MB upload the server must not read: it answers from the Content-Length header
        yield b"\0" * 1024

    response = client.post("/predict", content=body(), headers={"Content-Type": "image/png", "Content-Length": str(200 * 2**20)})
    assert response.status_code == 413 and "limit" in response.json()["detail"]


def test_token_is_required_when_set(served_runs, api):
    from fastapi.testclient import TestClient

    from imgfeat.serve.app import create_app, serve

    _, classifier = api
    client = TestClient(create_app(classifier, token="s3cret"))
    assert client.get("/health").json()["auth"] is True
    assert client.post("/predict", content=_png(), headers={"Content-Type": "image/png"}).status_code == 401
    ok = client.post("/predict", content=_png(), headers={"Content-Type": "image/png", "Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    with pytest.raises(ValueError, match="--token"):
        serve(classifier, host="0.0.0.0", port=1)


def test_concurrent_requests_get_their_own_answers_and_a_full_queue_gets_503(api):
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from imgfeat.serve.app import create_app

    client, classifier = api
    images = [_png(seed, sick=seed % 2 == 1) for seed in range(8)]
    expected = [p.probabilities for p in classifier.predict(images)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: client.post("/predict", content=b, headers={"Content-Type": "image/png"}), images * 2))
    for i, answer in enumerate(answers):
        assert answer.status_code == 200
        assert answer.json()["predictions"][0]["probabilities"] == pytest.approx(expected[i % 8], abs=1e-6)
    # No waiting room: while one request holds the model, a second is turned away at once.
    gate = threading.Event()
    original = classifier.predict

    def slow(*args, **kwargs):
        gate.wait(10)
        return original(*args, **kwargs)

    busy = TestClient(create_app(classifier, max_waiting=0))
    classifier.predict = slow
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(busy.post, "/predict", content=images[0], headers={"Content-Type": "image/png"})
            time.sleep(0.5)
            second = busy.post("/predict", content=images[1], headers={"Content-Type": "image/png"})
            gate.set()
            assert first.result().status_code == 200
    finally:
        classifier.predict = original
    assert second.status_code == 503 and second.headers["retry-after"] == "1"


def test_serve_finds_the_pyfunc_model_from_a_run_or_a_registered_version(served_runs, store):
    import mlflow

    from imgfeat.scoring.pyfunc import resolve_uri

    runs, result = served_runs
    mlflow.set_tracking_uri(store)
    assert resolve_uri(f"runs:/{runs['lr']}") == f"runs:/{runs['lr']}/pyfunc_model"
    assert resolve_uri("models:/imgfeat-serve-test/1") == f"runs:/{result.best_run_id}/pyfunc_model"
    assert resolve_uri("models:/imgfeat-serve-test/latest") == f"runs:/{result.best_run_id}/pyfunc_model"


# ---------------------------------------------------------------------------------------------
# the page, in a real browser

CHROMIUM = "/usr/bin/chromium"


def _real_xray() -> str | None:
    root = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "kermany224", "test", "PNEUMONIA")
    if os.path.isdir(root):
        return os.path.join(root, sorted(os.listdir(root))[0])
    return None


@pytest.mark.skipif(not os.path.exists(CHROMIUM) and not os.environ.get("IMGFEAT_REQUIRE_BROWSER"),
                    reason="Debian's chromium is not installed (CI installs it: .ci/run)")
def test_the_page_shows_label_bars_and_heat_map_in_a_browser(api, tmp_path):
    import uvicorn
    from playwright.sync_api import sync_playwright

    from imgfeat.serve.app import create_app

    _, classifier = api
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(classifier, model_uri="test"), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    image = _real_xray()
    if image is None:  # no shared data: a generated X-ray
        image = str(tmp_path / "xray.png")
        open(image, "wb").write(_png(3, (600, 500), sick=True))
    try:
        _wait(f"http://127.0.0.1:{port}/health", None, 30)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_function("document.getElementById('model').textContent.includes('tiny_torch')")
            page.set_input_files("#file", image)
            page.wait_for_selector("#result:not([hidden])", timeout=30_000)
            label = page.text_content("#label")
            assert label in classifier.labels
            assert page.locator(".bar").count() == len(classifier.labels)
            page.wait_for_function("document.getElementById('heatmap').naturalWidth > 0")
            assert page.evaluate("document.getElementById('heatmap').src").startswith("data:image/png;base64,")
            assert page.text_content("#error") == ""
            page.screenshot(path=str(tmp_path / "page.png"))
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)
