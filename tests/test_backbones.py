"""Every registered backbone against an independent reference: Pillow decoding, the documented preprocessing
written out here, and the framework's own model built directly, on coloured images with structure.

The pipeline side is what the featurizing UDF runs (imgfeat's decoder + the engine's predictor). A swapped
channel order, a wrong preprocess_input or a wrong resize would show here; grayscale inputs would hide the first.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from imgfeat.backbones.registry import BACKBONES
from imgfeat.engines import EngineOptions, get_predictor, resolve_weights
from imgfeat.io.decoders import DecodeOptions, decode_image

CAFFE_BGR_MEAN = np.array([103.939, 116.779, 123.68], dtype=np.float32)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

# x: float32 RGB 0..255, (n, s, s, 3). Written from each model's documentation, not from imgfeat's code.
REFERENCE_PREPROCESSING = {
    "resnet50": lambda x: x[..., ::-1] - CAFFE_BGR_MEAN,  # "caffe": RGB -> BGR, minus the ImageNet BGR means
    "vgg19": lambda x: x[..., ::-1] - CAFFE_BGR_MEAN,
    "vgg16": lambda x: x[..., ::-1] - CAFFE_BGR_MEAN,
    "xception": lambda x: x / 127.5 - 1.0,  # "tf"
    "inception_v3": lambda x: x / 127.5 - 1.0,  # "tf": -1..1
    "densenet121": lambda x: (x / 255.0 - IMAGENET_MEAN) / IMAGENET_STD,  # "torch" mode, still NHWC
    "efficientnet_b0": lambda x: x,  # Keras' EfficientNet rescales inside the model
    "efficientnet_lite0": lambda x: (x - 127.0) / 128.0,  # TF-Lite's efficientnet-lite: mean 127, std 128
    "tv_resnet50": lambda x: (x / 255.0 - IMAGENET_MEAN) / IMAGENET_STD,  # torchvision's Normalize
    "tv_densenet121": lambda x: (x / 255.0 - IMAGENET_MEAN) / IMAGENET_STD,
}
REAL = sorted(name for name in BACKBONES if not name.startswith("tiny"))


def _coloured_images(n: int = 3) -> list[bytes]:
    """Non-square PNGs: colour gradients that differ per channel, a red disc and a blue bar at random places."""
    rng = np.random.default_rng(11)
    out = []
    for _ in range(n):
        h, w = 260, 310
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        rgb = np.stack([255 * xx / w, 255 * yy / h, 255 * (1 - xx / w) * rng.uniform(0.3, 1)], -1)
        img = Image.fromarray(rgb.astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(img)
        cx, cy, r = rng.integers(40, 200), rng.integers(40, 180), rng.integers(15, 40)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(230, 20, 30))
        x0, y0 = rng.integers(0, 200), rng.integers(0, 200)
        draw.rectangle((x0, y0, x0 + 90, y0 + 25), fill=(10, 40, 220))
        buf = io.BytesIO()
        img.save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def _reference_input(data: list[bytes], size: int) -> np.ndarray:
    return np.stack([
        np.asarray(Image.open(io.BytesIO(d)).convert("RGB").resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
        for d in data
    ])


def _reference_features(name: str, x: np.ndarray) -> np.ndarray:
    backbone = BACKBONES[name]
    prepared = REFERENCE_PREPROCESSING[name](x).astype(np.float32)
    if backbone.engine == "keras":
        import keras

        keras.utils.set_random_seed(42)
        model = getattr(keras.applications, backbone.constructor)(
            include_top=False, weights=None, input_shape=x.shape[1:], pooling="avg")
        return np.asarray(model.predict(prepared, verbose=0))
    import torch

    from imgfeat.engines import torch_models

    torch.manual_seed(42)
    model = torch_models.build(backbone.constructor, x.shape[1]).eval()
    with torch.inference_mode():
        return model(torch.from_numpy(np.ascontiguousarray(prepared.transpose(0, 3, 1, 2)))).numpy()


def test_every_real_backbone_has_a_reference():
    assert set(REAL) == set(REFERENCE_PREPROCESSING), "add the documented preprocessing of each new backbone here"


@pytest.mark.parametrize("name", REAL)
def test_pipeline_features_equal_an_independent_reference(name):
    backbone = BACKBONES[name]
    data = _coloured_images()
    source = resolve_weights(backbone, "none", 42)
    predict = get_predictor(name, source, source.read_bytes, EngineOptions(threads=2))
    ours_input = np.stack([decode_image(d, DecodeOptions(size=backbone.input_size)).array for d in data])
    reference_input = _reference_input(data, backbone.input_size)
    np.testing.assert_array_equal(ours_input, reference_input)  # decoding: exactly Pillow's RGB + bilinear resize
    ours = predict(ours_input)
    expected = _reference_features(name, reference_input)
    assert ours.shape == expected.shape == (len(data), backbone.feature_dim)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))
    # The images differ, and so must their features (a constant output would pass the comparison above).
    assert np.abs(ours[0] - ours[1]).max() > 1e-3 * float(np.abs(ours).max())
