import io

import numpy as np
import pytest
from PIL import Image

from imgfeat.demo.samples import BAD_FILES, KINDS, bad_file_bytes, encode, xray_array
from imgfeat.io.decoders import DecodeError, DecodeOptions, decode_image

OPTS = DecodeOptions(size=64)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_decodes_to_three_channels(kind):
    data, _ = encode(xray_array(np.random.default_rng(1), (120, 80), sick=False), kind)
    img = decode_image(data, OPTS)
    assert img.array.shape == (64, 64, 3)
    # 8-bit images reach the model as uint8 (a quarter of float32's bytes); high-bit-depth ones as float32.
    assert img.array.dtype == (np.float32 if kind == "gray16_png" else np.uint8)
    assert img.array.min() >= 0.0 and img.array.max() <= 255.0
    assert img.array.max() - img.array.min() > 50, "contrast lost"
    assert np.allclose(img.array[..., 0], img.array[..., 2], atol=3), "grayscale content stays gray"


@pytest.mark.parametrize("name, error_class", sorted(BAD_FILES.items()))
def test_bad_inputs_are_classified(name, error_class):
    with pytest.raises(DecodeError) as info:
        decode_image(bad_file_bytes(name), OPTS)
    assert info.value.error_class == error_class
    assert info.value.message


def test_sixteen_bit_keeps_its_contrast():
    # 12-bit detector data in a 16-bit PNG: a naive 8-bit conversion saturates everything to white.
    ramp = np.tile(np.linspace(0, 4095, 256, dtype=np.float32), (64, 1)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")
    naive = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))
    assert naive.min() > 250 or (naive == 255).mean() > 0.9  # what we must not do
    img = decode_image(buf.getvalue(), DecodeOptions(size=64, resize_mode="stretch"))
    row = img.array[32, :, 0]
    assert row[0] < 5 and row[-1] > 250
    assert np.all(np.diff(row) >= -1e-3), "monotone ramp stays monotone"
    full = decode_image(buf.getvalue(), DecodeOptions(size=64, high_bit_depth="full_range"))
    assert full.array.max() == pytest.approx(4095 / 65535 * 255, rel=0.02)


def test_exif_orientation_is_applied_and_reported():
    arr = np.zeros((100, 200), dtype=np.uint8)
    arr[:, :100] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, "JPEG", exif=exif.tobytes())
    img = decode_image(buf.getvalue(), DecodeOptions(size=64, resize_mode="pad"))
    assert (img.width, img.height) == (100, 200)
    # after rotation the white half is on top
    assert img.array[20, 32, 0] > 200 and img.array[44, 32, 0] < 50


def test_pad_and_crop_preserve_aspect():
    arr = np.full((100, 300), 200, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, "PNG")
    padded = decode_image(buf.getvalue(), DecodeOptions(size=60, resize_mode="pad"))
    assert padded.array[0, 30, 0] == 0 and padded.array[30, 30, 0] == pytest.approx(200, abs=1)
    cropped = decode_image(buf.getvalue(), DecodeOptions(size=60, resize_mode="crop"))
    assert cropped.array.min() == pytest.approx(200, abs=1)


def test_large_jpeg_uses_draft_and_matches_full_decode():
    rng = np.random.default_rng(3)
    arr = (xray_array(rng, (2400, 2000), sick=True) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, "JPEG", quality=92)
    fast = decode_image(buf.getvalue(), DecodeOptions(size=224))
    slow = decode_image(buf.getvalue(), DecodeOptions(size=224, jpeg_draft=False))
    assert (fast.width, fast.height) == (2400, 2000)
    assert np.abs(fast.array.astype(np.float32) - slow.array).mean() < 3.0


def test_rgba_is_composited_not_garbage():
    rgba = np.zeros((10, 10, 4), dtype=np.uint8)
    rgba[..., :3] = 255
    rgba[:, :5, 3] = 255  # left opaque white, right transparent (white but invisible)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    img = decode_image(buf.getvalue(), DecodeOptions(size=10))
    assert img.array[5, 1, 0] == 255 and img.array[5, 8, 0] == 0


def test_pixel_limit_is_a_setting():
    buf = io.BytesIO()
    Image.new("L", (300, 300)).save(buf, "PNG")
    with pytest.raises(DecodeError) as info:
        decode_image(buf.getvalue(), DecodeOptions(size=32, max_pixels=10_000))
    assert info.value.error_class == "too_large"
