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


def test_predict_loads_only_the_model_uri_the_user_named():
    tree = ast.parse((ROOT / "lib" / "imgfeat" / "serve" / "batch.py").read_text())
    loads = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "load_model"]
    assert len(loads) == 1
    assert ast.unparse(loads[0].func) == "mlflow.spark.load_model"
    assert ast.unparse(loads[0].args[0]) == "uri"
    assert "uri = cfg.predict.model_uri" in ast.unparse(tree)


def test_library_never_deserializes_models_or_pickles():
    offenders = []
    for path in sorted((ROOT / "lib" / "imgfeat").rglob("*.py")) + sorted((ROOT / "jobs").glob("*.py")):
        for name, keywords in _calls_and_keywords(ast.parse(path.read_text())):
            if name in {"load_model", "model_from_json", "model_from_config", "deserialize_keras_object"}:
                if (path.name, name) in ALLOWED_MODEL_LOADS:
                    continue
                offenders.append(f"{path.name}: {name}()")
            if name in {"load", "loads"} and path.read_text().count("import pickle"):
                offenders.append(f"{path.name}: pickle.{name}()")
            safe = keywords.get("safe_mode")
            if isinstance(safe, ast.Constant) and safe.value is False:
                offenders.append(f"{path.name}: safe_mode=False")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("torch.load"):
                weights_only = {kw.arg: kw.value for kw in node.keywords}.get("weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    offenders.append(f"{path.name}: torch.load without weights_only=True")
    assert offenders == []


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


def test_spark_session_servers_bind_localhost_only(tmp_path):
    """The driver's RPC, block manager and web UI listen on 127.0.0.1 only (UI enabled here)."""
    script = (
        "import json, psutil\n"
        "from imgfeat.config import load_config\n"
        "from imgfeat.session import get_spark\n"
        "spark = get_spark(load_config(sets=['spark.master=local[1]', 'spark.driver_memory=512m']))\n"
        "assert spark.sparkContext.uiWebUrl\n"
        "procs = [psutil.Process()] + psutil.Process().children(recursive=True)\n"
        "addrs = sorted({c.laddr.ip for p in procs for c in p.net_connections('inet') if c.status == 'LISTEN'})\n"
        "print('LISTEN', json.dumps(addrs))\n"
        "spark.stop()\n"
    )
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYTHONPATH": str(ROOT / "lib")}
    env.pop("SPARK_LOCAL_IP", None)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    addrs = json.loads(result.stdout.split("LISTEN", 1)[1])
    assert addrs and set(addrs) <= {"127.0.0.1", "::1", "::ffff:127.0.0.1"}, addrs


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
