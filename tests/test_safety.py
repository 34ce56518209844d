"""Safe loading and privacy: only weights are loaded, pins are enforced, servers bind localhost, metadata is clean."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from imgfeat.train.privacy import PrivacyError, check_metadata, check_mlflow_run

ROOT = Path(__file__).resolve().parent.parent


def _calls_and_keywords(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            yield name, {kw.arg: kw.value for kw in node.keywords}


# The one model load: predict loads the Spark pipeline (no Keras model file) from the MLflow URI the user names.
ALLOWED_MODEL_LOADS = {("batch.py", "load_model")}
# Modules whose load/loads run code from the bytes they read.
UNPICKLERS = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}


def test_predict_loads_only_the_model_uri_the_user_named():
    tree = ast.parse((ROOT / "lib" / "imgfeat" / "serve" / "batch.py").read_text())
    loads = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "load_model"]
    assert len(loads) == 1
    assert ast.unparse(loads[0].func) == "mlflow.spark.load_model"
    assert ast.unparse(loads[0].args[0]) == "uri"
    assert "uri = cfg.predict.model_uri" in ast.unparse(tree)


def _unsafe_loads(name: str, text: str) -> list[str]:
    """Calls in ``text`` that would deserialise code: model files, pickles (by any alias), torch.load without
    weights_only=True, allow_pickle."""
    tree = ast.parse(text)
    aliases = {}  # local name -> module, e.g. cp -> cloudpickle
    offenders = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update({(a.asname or a.name): a.name for a in node.names})
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNPICKLERS:
            offenders += [f"{name}: from {node.module} import {a.name}" for a in node.names
                          if a.name in {"load", "loads", "Unpickler"}]
    for call, keywords in _calls_and_keywords(tree):
        model_load = call in {"load_model", "model_from_json", "model_from_config", "deserialize_keras_object"}
        if model_load and (name, call) not in ALLOWED_MODEL_LOADS:
            offenders.append(f"{name}: {call}()")
        safe = keywords.get("safe_mode")
        if isinstance(safe, ast.Constant) and safe.value is False:
            offenders.append(f"{name}: safe_mode=False")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        root, _, attr = func.rpartition(".")
        module = aliases.get(root.split(".")[0], root.split(".")[0])
        if (module.split(".")[0] in UNPICKLERS and attr in {"load", "loads", "Unpickler"}) or func.endswith("read_pickle"):
            offenders.append(f"{name}: {func}()")
        keywords = {kw.arg: kw.value for kw in node.keywords}
        if "allow_pickle" in keywords and not (isinstance(keywords["allow_pickle"], ast.Constant)
                                               and keywords["allow_pickle"].value is False):
            offenders.append(f"{name}: {func}(allow_pickle=...)")
        if module == "torch" and attr == "load":
            weights_only = keywords.get("weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                offenders.append(f"{name}: torch.load without weights_only=True")
    return offenders


def test_library_never_deserializes_models_or_pickles():
    offenders = []
    for path in sorted((ROOT / "lib" / "imgfeat").rglob("*.py")) + sorted((ROOT / "jobs").glob("*.py")):
        offenders += _unsafe_loads(path.name, path.read_text())
    assert offenders == []


@pytest.mark.parametrize("code", [
    "import pickle\npickle.load(fh)",
    "import cloudpickle as cp\ncp.loads(blob)",
    "from joblib import load\n",
    "import numpy as np\nnp.load(path, allow_pickle=True)",
    "import torch\ntorch.load(path)",
    "import torch as T\nT.load(path, weights_only=False)",
    "import pandas as pd\npd.read_pickle(path)",
    "import keras\nkeras.models.load_model(path)",
])
def test_the_unsafe_load_check_catches_each_kind(code):
    assert _unsafe_loads("example.py", code)


def test_the_unsafe_load_check_passes_safe_loads():
    assert _unsafe_loads("example.py", "import torch\ntorch.load(b, map_location='cpu', weights_only=True)\n"
                                       "import numpy as np\nnp.load(p)\nimport json\njson.loads(t)") == []


def test_weights_file_is_loaded_as_weights_only(tmp_path, monkeypatch):
    import keras

    from imgfeat.backbones.registry import get_backbone
    from imgfeat.backbones.weights import WeightsError, sha256_file
    from imgfeat.engines import resolve_weights
    from imgfeat.engines.keras import build_architecture

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was deserialised")

    monkeypatch.setattr(keras.models, "load_model", forbidden)
    monkeypatch.setattr(keras.saving, "load_model", forbidden)
    backbone = get_backbone("tiny")
    good = str(tmp_path / "tiny.weights.h5")
    build_architecture(backbone).save_weights(good)
    assert resolve_weights(backbone, good).weights_id == f"sha256:{sha256_file(good)}"

    # A full model file whose Lambda layer would write a marker if its code ever ran.
    marker = tmp_path / "code-ran"
    inputs = keras.Input((4,))
    code = eval(f"lambda x: (open({str(marker)!r}, 'w'), x)[1]")  # no closure: Keras saves the bytecode
    hostile = keras.Model(inputs, keras.layers.Lambda(code)(inputs))
    hostile_path = str(tmp_path / "hostile.keras")
    hostile.save(hostile_path)
    marker.unlink(missing_ok=True)  # saving traces the lambda once
    with pytest.raises(WeightsError, match="could not load weights file"):
        resolve_weights(backbone, hostile_path)
    assert not marker.exists()


def test_pinned_sha256_mismatch_stops_the_job_with_a_clear_error(spark, samples, tmp_path, capsys):
    from imgfeat.backbones.registry import get_backbone
    from imgfeat.backbones.weights import sha256_file
    from imgfeat.cli import main
    from imgfeat.engines.keras import build_architecture

    weights = str(tmp_path / "tiny.weights.h5")
    build_architecture(get_backbone("tiny")).save_weights(weights)
    out = str(tmp_path / "feats")
    rc = main(["extract", "--input", samples.root, "--output", out, "--model", "tiny", "--weights", weights,
               "--weights-sha256", "ab" * 32, "--format", "parquet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"has sha256 {sha256_file(weights)}, but model.weights_sha256 pins {'ab' * 32}" in err
    assert not os.path.exists(out) and not os.path.exists(out + "_errors")


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _probe(root: str, master: str | None) -> str:
    """A driver script that starts imgfeat's session and prints the listening addresses of its JVM's process tree."""
    sets = [*([f"spark.master={master}"] if master else []), "spark.driver_memory=512m"]
    return (
        "import json, logging, psutil\n"
        "logging.basicConfig()\n"  # as imgfeat's CLI does
        "from imgfeat.config import load_config\n"
        "from imgfeat.session import get_spark\n"
        f"spark = get_spark(load_config(sets={sets!r}))\n"
        "spark.range(10).count()\n"
        # python -c: the JVM is our child; under spark-submit, the JVM started this Python driver
        f"jvm = psutil.Process() if {root == 'python'} else psutil.Process().parent()\n"
        "procs = [jvm] + jvm.children(recursive=True)\n"
        "addrs = sorted({c.laddr.ip for p in procs for c in p.net_connections('inet') if c.status == 'LISTEN'})\n"
        "print('RESULT', json.dumps({'addrs': addrs, 'ui': spark.sparkContext.uiWebUrl}))\n"
        "spark.stop()\n"
    )


def _probe_env(local_ip: str | None) -> dict[str, str]:
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYTHONPATH": str(ROOT / "lib")}
    env.pop("SPARK_LOCAL_IP", None)
    if local_ip:
        env["SPARK_LOCAL_IP"] = local_ip
    return env


def test_spark_session_servers_bind_localhost_only(tmp_path):
    """The driver's RPC, block manager and web UI listen on 127.0.0.1 only (UI enabled here)."""
    result = subprocess.run([sys.executable, "-c", _probe("python", "local[1]")], capture_output=True, text=True,
                            env=_probe_env(None), timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.split("RESULT", 1)[1])
    assert found["ui"] and found["addrs"] and set(found["addrs"]) <= LOOPBACK, found


@pytest.mark.parametrize("local_ip, ui", [(None, False), ("127.0.0.1", True)])
def test_local_spark_submit_listens_on_loopback_only(tmp_path, local_ip, ui):
    """Under spark-submit the JVM starts before imgfeat runs: without SPARK_LOCAL_IP its UI would bind *:4040."""
    script = tmp_path / "probe.py"
    script.write_text(_probe("spark-submit", None))
    submit = os.path.join(os.path.dirname(sys.executable), "spark-submit")
    result = subprocess.run([submit, "--master", "local[1]", str(script)], capture_output=True, text=True,
                            env=_probe_env(local_ip), timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.split("RESULT", 1)[1])
    assert found["addrs"] and set(found["addrs"]) <= LOOPBACK, found
    assert bool(found["ui"]) is ui
    if not ui:
        # spark-submit merges the Python driver's stderr into its stdout.
        assert "SPARK_LOCAL_IP=127.0.0.1 spark-submit" in result.stdout + result.stderr


def test_run_metadata_without_content_or_patient_fields_passes():
    params = {"model": "resnet50", "weights_id": "sha256:" + "a" * 64, "heads": "lr,rf", "test_fraction": 0.2}
    tags = {"mlflow.source.name": "jobs/train.py", "mlflow.log-model.history": "x" * 2000, "features": "/data/f"}
    check_metadata(params, tags)
    check_mlflow_run(SimpleNamespace(data=SimpleNamespace(params=params, tags=tags)))


@pytest.mark.parametrize(
    "params, tags, message",
    [
        ({"PatientID": "123"}, {}, "param 'PatientID' names a patient/study field"),
        ({}, {"patient_name": "DOE^JOHN"}, "tag 'patient_name' names a patient/study field"),
        ({"note": "Patient Birth Date: 19700101"}, {}, "contains a patientbirthdate value"),
        ({"image": b"\x89PNG\r\n"}, {}, "holds raw bytes"),
        ({"sample": "iVBORw0KGgo" * 100}, {}, "1100 characters long"),
    ],
)
def test_run_metadata_with_content_or_patient_fields_is_refused(params, tags, message):
    with pytest.raises(PrivacyError, match=message):
        check_metadata(params, tags)


def test_artifacts_carry_no_reversible_image_ids_and_no_file_names(spark, tmp_path):
    """Kermany-style names hold patient numbers; a plain hash of a relative path is reversed by hashing guesses."""
    import hashlib

    import mlflow
    import numpy as np
    import pandas as pd

    from imgfeat.config import load_config
    from imgfeat.demo.samples import encode, xray_array
    from imgfeat.featurize.extract import run_extract
    from imgfeat.train.fit import run_train
    from imgfeat.train.privacy import PrivacyError, artifact_ids, check_artifact_table

    from conftest import tiny_config

    rng = np.random.default_rng(3)
    for label in ("NORMAL", "PNEUMONIA"):
        os.makedirs(tmp_path / "img" / label)
        for i in range(10):
            data, ext = encode(xray_array(rng, (48, 48), sick=label == "PNEUMONIA"), "gray_jpeg")
            (tmp_path / "img" / label / f"person{1000 + i}_bacteria_{i}.{ext}").write_bytes(data)
    features = str(tmp_path / "features")
    run_extract(spark, tiny_config(str(tmp_path / "img"), features, "input.split.mode=hash"))
    table = spark.read.parquet(features).toPandas()
    store = "sqlite:///" + str(tmp_path / "mlflow.db")
    sets = [f"train.features={features}", "train.heads=[dt]", f"mlflow.tracking_uri={store}", "mlflow.experiment=p"]
    plain = run_train(spark, load_config(sets=sets))
    client = mlflow.MlflowClient(store)
    parent = client.get_run(plain.parent_run_id)
    assert "test_images.csv" not in {a.path for a in client.list_artifacts(plain.parent_run_id)}
    logged_values = " ".join(map(str, {**parent.data.params, **parent.data.tags}.values()))
    assert str(tmp_path) not in logged_values and "person10" not in logged_values
    # With a secret, the held-out list is logged with keyed ids: not the table's ids, not a hash of a name.
    salted = run_train(spark, load_config(sets=[*sets, "privacy.id_salt=s3cret"]))
    listed = pd.read_csv(client.download_artifacts(salted.parent_run_id, "test_images.csv"))
    test_ids = sorted(table[table["split"] == "test"]["image_id"])
    assert sorted(listed["test_id"]) == sorted(artifact_ids(test_ids, "s3cret"))
    guesses = {hashlib.sha256(f"{label}/{n}".encode()).hexdigest()[:24] for label, n in
               zip(table["label"], table["rel_path"].str.split("/").str[-1])}
    assert not guesses & set(listed["test_id"]) and not set(table["image_id"]) & set(listed["test_id"])
    with pytest.raises(PrivacyError, match="column 'path'"):
        check_artifact_table(table[["path", "label"]], "leak.csv")
    with pytest.raises(PrivacyError, match="file names or paths"):
        check_artifact_table(pd.DataFrame({"id": ["NORMAL/person1_virus_2.jpeg"]}), "leak.csv")
