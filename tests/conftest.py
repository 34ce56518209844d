"""Shared fixtures: one local SparkSession for the whole run, generated images."""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:///" + os.path.abspath(".pytest_cache/mlflow-tests.db"))


@pytest.fixture(scope="session")
def spark():
    from imgfeat.config import load_config
    from imgfeat.session import get_spark

    cfg = load_config(
        sets=[
            "spark.master=local[2]",
            "spark.driver_memory=3g",
            "spark.conf={spark.sql.shuffle.partitions: '4', spark.ui.enabled: 'false'}",
        ]
    )
    session = get_spark(cfg)
    yield session
    session.stop()


@pytest.fixture(scope="session")
def samples(tmp_path_factory):
    """12 images per class of every kind, plus one broken file of each kind."""
    from imgfeat.demo.samples import make_samples

    return make_samples(str(tmp_path_factory.mktemp("samples")), per_class=12)


def tiny_config(input_path: str, output_path: str, *sets: str):
    from imgfeat.config import load_config

    return load_config(
        overrides={
            "input.path": input_path,
            "output.path": output_path,
            "model.name": "tiny",
            "model.weights": "none",
            "output.format": "parquet",
            "inference.batch_size": 8,
        },
        sets=list(sets),
    )
