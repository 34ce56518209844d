"""The benchmark tool works (a functional check on a few images; numbers are not asserted)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("model, engine", [("tiny", "keras"), ("tiny_torch", "torch")])
def test_bench_runs_both_pipelines_on_the_same_images(samples, tmp_path, model, engine):
    out = tmp_path / "bench.json"
    config = tmp_path / "bench.yaml"
    config.write_text("inference: {decode_threads: 2}\n")
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    result = subprocess.run(
        [sys.executable, "-m", "imgfeat.cli", "bench", "--input", os.path.join(samples.root, "PNEUMONIA"),
         "--limit", "20", "--model", model, "--batch-size", "8", "--master", "local[2]",
         "--workdir", str(tmp_path / "w"), "--json", str(out), "--set", "model.seed=7", "--config", str(config)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["images"] == 20 and data["model"] == model and data["engine"] == engine
    assert data["ours_images_per_s"] > 0 and data["baseline_images_per_s"] > 0
    assert data["ratio"] == pytest.approx(data["ours_images_per_s"] / data["baseline_images_per_s"], rel=0.01)
    assert data["ours_memory"]["jvm_mb"] > 0 and data["ours_memory"]["python_workers_mb"] > 0
    assert {"list_and_plan", "decode_task_seconds", "inference_task_seconds"} <= set(data["stages"])
    # --set and --config reach our extract job (they used to be accepted and ignored).
    command = data["settings"]["ours_command"]
    assert command[command.index("model.seed=7") - 1] == "--set"
    assert command[command.index("--config") + 1] == str(config)
    import numpy as np

    assert np.load(tmp_path / "w" / "baseline.npy").shape == (20, 16)
    assert "ratio ours/baseline" in result.stdout and f"engine={engine}" in result.stdout


def test_the_per_task_bench_runs_without_spark(samples, tmp_path):
    """The GPU machines have no Java or Spark: the featurizer's task function is timed on its own (CPU here)."""
    out = tmp_path / "task.json"
    args = ["--input", os.path.join(samples.root, "PNEUMONIA"), "--limit", "24", "--model", "tiny_torch",
            "--batch-size", "8", "--precision", "bf16", "--json", str(out)]
    # As on the GPU machines: neither Spark nor TensorFlow can be imported.
    code = ("import sys; sys.modules['pyspark'] = None; sys.modules['tensorflow'] = None\n"
            f"from imgfeat.bench.task import main; sys.exit(main({args!r}))")
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "lib")}, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["images"] == data["featurized"] == 24 and data["precision"] == "bf16" and data["engine"] == "torch"
    assert data["images_per_s"] > 0 and data["decode_s"] > 0 and data["inference_s"] > 0
