"""The GPU data path, on the CPU: device JPEG decoding (a Pillow stand-in for nvJPEG), the device resize, uint8
batches, prefetching, and the settings that need the torch engine."""

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from imgfeat.backbones.registry import get_backbone
from imgfeat.demo.samples import encode, xray_array
from imgfeat.engines import EngineOptions, get_predictor, resolve_weights
from imgfeat.engines.torch_jpeg import DeviceJpegDecoder, device_header, pillow_decode
from imgfeat.featurize.udf import FeaturizeSpec, featurize_batch, featurize_stream
from imgfeat.io.decoders import DecodeOptions, decode_image

SIZE = 32


def _jpeg(w: int, h: int, seed: int, mode: str = "L") -> bytes:
    arr = (xray_array(np.random.default_rng(seed), (w, h), sick=seed % 2 == 1) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "L").convert(mode).save(buf, "JPEG", quality=92)
    return buf.getvalue()


def _files() -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(3)
    return [
        ("gray_jpeg", _jpeg(96, 80, 1)),
        ("rgb_jpeg", _jpeg(64, 120, 2, "RGB")),
        ("wide_jpeg", _jpeg(200, 50, 3)),
        ("already_sized_jpeg", _jpeg(SIZE, SIZE, 4)),
        ("png", encode(xray_array(rng, (70, 70), sick=False), "rgb_png")[0]),
        ("gray16_png", encode(xray_array(rng, (70, 70), sick=True), "gray16_png")[0]),
        ("cmyk_jpeg", encode(xray_array(rng, (70, 70), sick=False), "cmyk_jpeg")[0]),
        ("exif_rotated_jpeg", encode(xray_array(rng, (90, 60), sick=False), "exif_rotated_jpeg")[0]),
        ("truncated_jpeg", _jpeg(96, 80, 5)[:400]),
        ("not_an_image", b"just some text, not pixels"),
        ("empty", b""),
    ]


class CountingDecode:
    """pillow_decode with nvJPEG's contract, counting what reaches the 'device'."""

    def __init__(self) -> None:
        self.decoded = 0

    def __call__(self, tensors):
        out = pillow_decode(tensors)
        self.decoded += len(out)
        return out


@pytest.fixture(scope="module")
def tiny():
    backbone = get_backbone("tiny_torch")
    source = resolve_weights(backbone, "none")
    predict = get_predictor("tiny_torch", source, source.read_bytes, EngineOptions(threads=1, device="cpu"))
    return backbone, source, predict


def _spec(backbone, source, **decode) -> FeaturizeSpec:
    return FeaturizeSpec(backbone=backbone, weights=source, decode=DecodeOptions(size=SIZE, jpeg_draft=False, **decode),
                         batch_size=4)


@pytest.mark.parametrize("threads", [1, 3])
def test_device_jpegs_match_pillow_and_everything_else_goes_through_pillow(tiny, threads):
    backbone, source, predict = tiny
    spec = _spec(backbone, source)
    names, blobs = zip(*_files(), strict=True)
    decode = CountingDecode()
    decoder = DeviceJpegDecoder(spec.decode, predict.device, decode_jpeg=decode)
    with ThreadPoolExecutor(threads) as pool:
        on_device = featurize_batch(pd.Series(blobs), predict, spec, pool if threads > 1 else None, jpeg_decoder=decoder)
    on_cpu = featurize_batch(pd.Series(blobs), predict, spec)
    # The device took the four plain JPEGs; the truncated one was tried there, refused, and classified by Pillow.
    eligible = [n for n, b in zip(names, blobs, strict=True) if device_header(b, spec.decode)]
    assert eligible == ["gray_jpeg", "rgb_jpeg", "wide_jpeg", "already_sized_jpeg", "truncated_jpeg"]
    assert decode.decoded == 4
    for column in ("error_class", "width", "height", "source_mode", "format", "content_sha256"):
        assert on_device[column].astype(object).fillna("-").tolist() == on_cpu[column].astype(object).fillna("-").tolist()
    assert on_cpu.set_index(pd.Index(names))["error_class"].dropna().to_dict() == {
        "truncated_jpeg": "truncated", "not_an_image": "not_an_image", "empty": "empty_file"}
    for i, name in enumerate(names):
        if on_cpu["error_class"][i] is None:
            a, b = np.asarray(on_device["features"][i][0]), np.asarray(on_cpu["features"][i][0])
            assert np.allclose(a, b, atol=0.05 * np.abs(b).max()), name
            # near-identical pixels give the same or a nearly equal perceptual hash
            diff = (int(on_device["phash"][i][0], 16) ^ int(on_cpu["phash"][i][0], 16)).bit_count()
            assert diff <= 8, (name, diff)


@pytest.mark.parametrize("resize_mode", ["stretch", "crop", "pad"])
@pytest.mark.parametrize("resample", ["bilinear", "bicubic", "nearest"])
def test_device_resize_matches_pillow(resize_mode, resample):
    options = DecodeOptions(size=SIZE, resize_mode=resize_mode, resample=resample, jpeg_draft=False)
    decoder = DeviceJpegDecoder(options, "cpu", decode_jpeg=pillow_decode)
    for w, h in ((200, 50), (48, 130), (64, 64)):
        data = _jpeg(w, h, w)
        device = decoder.decode([data])[0].permute(1, 2, 0).numpy().astype(np.float32)
        pillow = decode_image(data, options).array.astype(np.float32)
        assert device.shape == pillow.shape == (SIZE, SIZE, 3)
        tolerance = 1.5
        assert np.abs(device - pillow).mean() < tolerance, (w, h, np.abs(device - pillow).mean())
        if resize_mode == "pad" and w != h:  # the letterbox bands are black in both
            assert (device == 0).mean() > 0.3 and abs((device == 0).mean() - (pillow == 0).mean()) < 0.05


def test_batches_reach_the_model_as_uint8_unless_high_bit_depth(tiny):
    backbone, source, predict = tiny
    seen = []

    def spy(batch):
        seen.append(batch.dtype)
        return predict(batch)

    names, blobs = zip(*_files()[:6], strict=True)  # four JPEGs, an 8-bit PNG, a 16-bit PNG
    spec = FeaturizeSpec(backbone=backbone, weights=source, decode=DecodeOptions(size=SIZE), batch_size=5)
    featurize_batch(pd.Series(blobs), spy, spec)
    assert seen == [np.dtype(np.uint8), np.dtype(np.float32)]  # the 16-bit PNG's batch is float32


def test_prefetching_gives_the_same_rows_in_the_same_order(tiny):
    backbone, source, predict = tiny
    blobs = [b for _, b in _files()] * 2
    batches = [pd.Series(blobs[i:i + 5]) for i in range(0, len(blobs), 5)]
    spec = _spec(backbone, source)
    plain = FeaturizeSpec(**{**spec.__dict__, "prefetch": False})
    timings: dict[str, float] = {}
    ahead = list(featurize_stream(iter(batches), predict, spec, timings=timings))
    turn = list(featurize_stream(iter(batches), predict, plain))
    assert [len(x) for x in ahead] == [len(b) for b in batches]
    for a, b in zip(ahead, turn, strict=True):
        assert a["content_sha256"].tolist() == b["content_sha256"].tolist()
        assert a["error_class"].tolist() == b["error_class"].tolist()
        for fa, fb in zip(a["features"], b["features"], strict=True):
            assert (fa is None and fb is None) or np.array_equal(np.stack(fa), np.stack(fb))
    assert timings["decode"] > 0 and timings["inference"] > 0


def test_nvjpeg_needs_cuda_and_applies_to_torch_backbones_only():
    from imgfeat.config.load import load_config
    from imgfeat.featurize.settings import settings_json
    from imgfeat.featurize.spec import torch_only_settings

    backbone = get_backbone("tiny_torch")
    source = resolve_weights(backbone, "none")
    with pytest.raises(RuntimeError, match="nvjpeg needs a CUDA device"):
        get_predictor("tiny_torch", source, source.read_bytes, EngineOptions(device="cpu", jpeg_decoder="nvjpeg"))
    cfg = load_config(sets=["model.name=tiny", "inference.jpeg_decoder=nvjpeg", "inference.compile=true"])
    assert torch_only_settings("keras", cfg.inference) == ("pillow", False)
    assert torch_only_settings("torch", cfg.inference) == ("nvjpeg", True)
    # recorded with the features (tables never mix the two decoders); Pillow tables keep their old record
    assert '"jpeg_decoder": "nvjpeg"' in settings_json(backbone, "torch", DecodeOptions(), "fp32", "nvjpeg")
    assert "jpeg_decoder" not in settings_json(backbone, "torch", DecodeOptions(), "fp32", "pillow")


@pytest.mark.integration  # torch.compile's first build takes ~40 s on 2 cores
def test_compiled_backbone_gives_the_same_features():
    backbone = get_backbone("tiny_torch")
    source = resolve_weights(backbone, "none")
    batch = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    plain = get_predictor("tiny_torch", source, source.read_bytes, EngineOptions(threads=1))
    compiled = get_predictor("tiny_torch", source, source.read_bytes, EngineOptions(threads=1, compile=True))
    assert compiled is not plain
    assert np.allclose(compiled(batch), plain(batch), atol=1e-5)
    assert np.allclose(compiled(batch[:3]), plain(batch[:3]), atol=1e-5)  # another batch size
