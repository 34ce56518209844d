"""The entry points, end to end in their own processes."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, **kw):
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600, **kw)


@pytest.mark.integration  # starts job processes of its own (~35-50 s)
def test_job_script_runs_end_to_end_and_second_run_adds_nothing(samples, tmp_path):
    out, js = str(tmp_path / "feats"), str(tmp_path / "result.json")
    args = [sys.executable, "jobs/extract_features.py", "--input", samples.root, "--output", out,
            "--model", "tiny", "--weights", "none", "--format", "parquet", "--master", "local[2]",
            "--set", "spark.conf={spark.ui.enabled: 'false'}", "--json", js]
    first = _run(args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "featurized 24 + failed 5" in first.stdout
    assert json.load(open(js))["featurized"] == 24
    second = _run(args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.load(open(js))["processed"] == 0
    assert os.path.isdir(out) and os.path.isdir(out + "_errors")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--set", "model.nmae=x"], "unknown setting 'model.nmae'"),
        (["--model", "alexnet"], "unknown backbone 'alexnet'"),
        (["--format", "csv"], "invalid choice"),
    ],
)
def test_bad_settings_fail_at_start_with_the_setting_named(tmp_path, extra, message):
    result = _run([sys.executable, "-m", "imgfeat.cli", "extract", "--input", str(tmp_path), "--output", str(tmp_path / "o"), *extra])
    assert result.returncode == 2
    assert message in result.stderr
