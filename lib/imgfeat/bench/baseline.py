"""The baseline we compare against: a plain single-process Keras script, as users write it.

tf.data reads, decodes and resizes (parallel map, prefetch), then the same frozen backbone runs on
each batch. Run as ``python -m imgfeat.bench.baseline --list FILES.txt --model resnet50 --out X.npy``;
it prints one JSON line with its own timings. The process's whole wall time is measured by the caller.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse_args(argv: list[str] | None, default_model: str) -> argparse.Namespace:
    """The arguments every baseline script takes (the bench passes the same ones to each)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--list", required=True, help="text file with one image path per line")
    parser.add_argument("--model", default=default_model)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", required=True, help="where to save the features (.npy)")
    return parser.parse_args(argv)


def save_and_report(out_path: str, feats: list, t0: float, t_model: float) -> int:
    """Save the features and print the one JSON line the bench reads."""
    import numpy as np

    out = np.concatenate(feats).astype(np.float32)
    np.save(out_path, out)
    t_end = time.perf_counter()
    print(json.dumps({"images": len(out), "startup_s": t_model - t0, "loop_s": t_end - t_model}))
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv, "resnet50")
    t0 = time.perf_counter()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from imgfeat.backbones.registry import get_backbone
    from imgfeat.engines.keras import KerasEngine, build_architecture

    backbone = get_backbone(a.model)
    size = backbone.input_size
    with open(a.list, encoding="utf-8") as fh:
        files = [line.strip() for line in fh if line.strip()]
    tf.keras.utils.set_random_seed(42)
    model = build_architecture(backbone)
    engine = KerasEngine()
    t_model = time.perf_counter()

    def load(path: tf.Tensor) -> tf.Tensor:
        img = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        img = tf.image.resize(img, (size, size))
        return engine.preprocess(backbone, img)

    ds = (
        tf.data.Dataset.from_tensor_slices(files)
        .map(load, num_parallel_calls=tf.data.AUTOTUNE)
        .batch(a.batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
    return save_and_report(a.out, [model(x, training=False).numpy() for x in ds], t0, t_model)


if __name__ == "__main__":
    sys.exit(main())
