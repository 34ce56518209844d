"""``make demo``: sample images -> efficientnet_lite0 (torch, real ImageNet weights) + resnet50 + inception_v3
(keras) features -> lr, rf, dt heads in MLflow -> comparison.

Works offline: EfficientNet-Lite0's ImageNet weights ship in a Python package; when a Keras backbone's ImageNet
weights are not available it says so loudly and uses random weights for that backbone (the demo only; real
jobs never fall back silently). The generated images are ``realistic`` (classes overlap), so heads and
backbones differ, and pretrained features beat random ones.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

BANNER = "=" * 78


def _weights_for(model_name: str) -> str:
    from imgfeat.backbones.registry import get_backbone
    from imgfeat.backbones.weights import WeightsError, weights_source

    try:
        source = weights_source(get_backbone(model_name), "imagenet")
        print(f"[demo] {model_name}: ImageNet weights {source.path} ({source.weights_id[:31]}...)", flush=True)
        return "imagenet"
    except WeightsError as exc:
        print(f"\n{BANNER}\n!! DEMO ONLY: ImageNet weights for {model_name} are unavailable here, so the demo uses")
        print("!! RANDOM weights (--weights none). Features and accuracies are NOT meaningful.")
        print(f"!! {exc}\n{BANNER}\n", flush=True)
        return "none"


def run_demo(
    workdir: str = "demo_output",
    per_class: int = 60,
    models: tuple[str, ...] = ("efficientnet_lite0", "resnet50", "inception_v3"),
    tracking_uri: str = "sqlite:///mlflow.db",
) -> dict:
    from imgfeat.config import load_config
    from imgfeat.demo.samples import make_medical_samples, make_samples
    from imgfeat.featurize.extract import run_extract
    from imgfeat.session import get_spark

    workdir = os.path.abspath(workdir)
    images = os.path.join(workdir, "images")
    if not os.path.isdir(images):
        samples = make_samples(images, per_class=per_class, realistic=True)
        medical = make_medical_samples(images, per_kind=2)  # both classes
        print(f"[demo] generated {samples.valid} sample images, {sum(map(len, medical.values()))} DICOM and NIfTI files "
              f"({', '.join(sorted(medical))}) and {len(samples.bad)} broken files in {images}")
    else:
        print(f"[demo] using the sample images already in {images}")
    features = os.path.join(workdir, "features")
    results = {}
    for model in models:
        cfg = load_config(
            overrides={
                "input.path": images,
                "output.path": features,
                "model.name": model,
                "model.weights": _weights_for(model),
                "output.format": "auto",
                "input.split.mode": "hash",
                "inference.batch_size": 16,
            }
        )
        spark = get_spark(cfg)
        result = run_extract(spark, cfg)
        print(result.summary(), flush=True)
        results[model] = result
    print(f"\n[demo] features: {features}  errors: {features}_errors")
    results["train"] = train = _train(spark, features, tracking_uri)
    results["compare"] = table = _compare(tracking_uri)
    import pandas as pd

    with pd.option_context("display.max_columns", None, "display.width", 200, "display.float_format", "{:.4f}".format):
        print(f"\n[demo] backbone x head on the held-out split (sorted by macro F1):\n{table.to_string(index=False)}")
    print(f"\n[demo] done: {len(train.runs)} runs in MLflow experiment {EXPERIMENT!r}. Open them with:")
    print(f"[demo]   mlflow ui --backend-store-uri {tracking_uri}")
    if train.best_run_id:
        print("[demo] Try the best model on one image, in a browser at http://127.0.0.1:8000/ (docs/serving.md):")
        print(f"[demo]   .venv/bin/imgfeat serve --model-uri runs:/{train.best_run_id} --tracking-uri {tracking_uri}")
        print(f"[demo]   mlflow models serve -m runs:/{train.best_run_id}/pyfunc_model --env-manager local -p 5001   "
              f"(with MLFLOW_TRACKING_URI={tracking_uri})")
    return results


EXPERIMENT = "imgfeat-demo"


def _train(spark, features: str, tracking_uri: str):
    from imgfeat.config import load_config
    from imgfeat.train.fit import run_train

    cfg = load_config(overrides={"train.features": features, "train.heads": ["lr", "rf", "dt"],
                                 "mlflow.experiment": EXPERIMENT, "mlflow.tracking_uri": tracking_uri,
                                 "train.params.rf_num_trees": 20})
    result = run_train(spark, cfg)
    print(result.summary(), flush=True)
    return result


def _compare(tracking_uri: str):
    from imgfeat.config import load_config
    from imgfeat.train.compare import run_compare

    return run_compare(load_config(overrides={"mlflow.experiment": EXPERIMENT, "mlflow.tracking_uri": tracking_uri,
                                              "train.positive_class": "PNEUMONIA"}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default="demo_output")
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--models", default="efficientnet_lite0,resnet50,inception_v3",
                        help="backbones, comma-separated")
    a = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    run_demo(a.workdir, a.per_class, tuple(m.strip() for m in a.models.split(",") if m.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
