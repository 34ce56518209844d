"""Keras ResNet50 on the TensorFlow backend vs the torch backend: same weights file, features and images/s.

    .venv/bin/python bench/keras_backends.py            # runs each backend in its own process, twice

Prints one JSON line per run and the largest feature difference between the backends. A benchmark, not a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


def one_run(backend: str, weights: str, out: str, images: int = 96, batch: int = 32) -> dict:
    os.environ["KERAS_BACKEND"] = backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    if backend == "torch":
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
    keras.utils.set_random_seed(42)
    model = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(224, 224, 3), pooling="avg")
    if os.path.exists(weights):
        model.load_weights(weights)
    else:
        model.save_weights(weights)
    x = np.random.default_rng(0).uniform(0, 255, (images, 224, 224, 3)).astype("float32")
    x = keras.applications.resnet50.preprocess_input(x)
    model.predict(x[:batch], verbose=0, batch_size=batch)  # warm-up
    started = time.perf_counter()
    features = model.predict(x, verbose=0, batch_size=batch)
    seconds = time.perf_counter() - started
    np.save(out, features)
    return {"backend": keras.backend.backend(), "images": images, "img_per_s": round(images / seconds, 2)}


def main() -> int:
    if len(sys.argv) == 4:
        print(json.dumps(one_run(*sys.argv[1:])))
        return 0
    work = tempfile.mkdtemp(prefix="keras-backends-")
    weights = os.path.join(work, "resnet50.weights.h5")
    for _ in range(2):
        for backend in ("tensorflow", "torch"):
            out = os.path.join(work, f"{backend}.npy")
            done = subprocess.run([sys.executable, __file__, backend, weights, out], capture_output=True, text=True)
            print(done.stdout.strip().splitlines()[-1] if done.returncode == 0 else done.stderr[-2000:])
    a, b = (np.load(os.path.join(work, f"{k}.npy")) for k in ("tensorflow", "torch"))
    print(json.dumps({"max_abs_diff": float(np.abs(a - b).max()),
                      "relative_l2": float(np.linalg.norm(a - b) / np.linalg.norm(a))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
