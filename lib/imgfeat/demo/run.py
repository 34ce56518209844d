"""``make demo``: sample images -> resnet50 + inception_v3 features -> lr, rf, dt heads in MLflow -> comparison.

Works offline: when ImageNet weights are not available it says so loudly and uses random weights
(the demo only; real jobs never fall back silently).
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
        weights_source(get_backbone(model_name), "imagenet")
        return "imagenet"
    except WeightsError as exc:
        print(f"\n{BANNER}\n!! DEMO ONLY: ImageNet weights for {model_name} are unavailable here, so the demo uses")
        print("!! RANDOM weights (--weights none). Features and accuracies are NOT meaningful.")
        print(f"!! {exc}\n{BANNER}\n", flush=True)
        return "none"


def run_demo(
    workdir: str = "demo_output",
    per_class: int = 16,
    models: tuple[str, ...] = ("resnet50", "inception_v3"),
    tracking_uri: str = "sqlite:///mlflow.db",
) -> dict:
    from imgfeat.config import load_config
    from imgfeat.demo.samples import make_samples
    from imgfeat.featurize.extract import run_extract
    from imgfeat.session import get_spark

    workdir = os.path.abspath(workdir)
    images = os.path.join(workdir, "images")
    if not os.path.isdir(images):
        samples = make_samples(images, per_class=per_class)
        print(f"[demo] generated {samples.valid} sample images and {len(samples.bad)} broken files in {images}")
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
    parser.add_argument("--per-class", type=int, default=16)
    a = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    run_demo(a.workdir, a.per_class)
    return 0


if __name__ == "__main__":
    sys.exit(main())
