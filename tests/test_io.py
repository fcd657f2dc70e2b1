"""Image/mask reading: conversions are as documented and bad files give one clear InputError."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from synth.core.errors import InputError
from synth.core.io import list_images, read_image, read_mask, write_image


def test_grayscale_rgba_16bit_palette_conversions(tmp_path):
    gray = (np.arange(64 * 48) % 256).astype(np.uint8).reshape(48, 64)
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    rgb = read_image(tmp_path / "gray.png")
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
    assert (rgb[:, :, 0] == gray).all() and (rgb[:, :, 2] == gray).all()

    rgba = np.dstack([gray, gray // 2, gray // 3, np.full_like(gray, 7)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = read_image(tmp_path / "rgba.png")
    assert out.shape == (48, 64, 3) and (out == rgba[:, :, :3]).all()  # alpha dropped, colours kept

    deep = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 21)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    out = read_image(tmp_path / "deep.png", "L")
    assert out.dtype == np.uint8
    np.testing.assert_allclose(out, np.round(deep / 257.0), atol=1)

    Image.fromarray(gray, "L").convert("P").save(tmp_path / "pal.png")
    assert read_image(tmp_path / "pal.png").shape == (48, 64, 3)


@pytest.mark.parametrize("content,expected", [(b"", r"empty \(0 bytes\)"), (b"not an image at all", "cannot decode")])
def test_bad_files_name_the_file(tmp_path, content, expected):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(InputError, match=expected) as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_truncated_jpeg_is_reported(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.jpg"):
        read_image(tmp_path / "cut.jpg")


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(InputError, match="folder not found"):
        list_images(tmp_path / "nowhere")
    with pytest.raises(InputError, match="no images found"):
        list_images(tmp_path)


def test_huge_image_refused(tmp_path):
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(InputError, match="above the limit"):
        read_image(tmp_path / "big.png", max_pixels=5000)


def test_mask_binarisation_and_size_check(tmp_path):
    mask = np.zeros((32, 40), np.uint8)
    mask[5:10, 5:20] = 255
    noisy = mask.copy()
    noisy[noisy == 255] = 200  # JPEG-like values above 128 count as defect
    noisy[0, 0] = 40  # and low values do not
    Image.fromarray(noisy).save(tmp_path / "m.png")
    out = read_mask(tmp_path / "m.png")
    assert out.dtype == bool and out.sum() == 75 and not out[0, 0]

    Image.fromarray((mask > 0).astype(np.uint8)).save(tmp_path / "m01.png")  # 0/1 masks
    assert read_mask(tmp_path / "m01.png").sum() == 75

    with pytest.raises(InputError, match="re-export the mask") as info:
        read_mask(tmp_path / "m.png", shape=(64, 64), image_path="img.png")
    assert "img.png" in str(info.value) and "m.png" in str(info.value)

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(InputError, match="mask is empty"):
        read_mask(tmp_path / "empty.png", allow_empty=False)


def test_write_image_is_atomic_and_roundtrips(tmp_path):
    image = np.random.default_rng(1).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    write_image(tmp_path / "a" / "x.png", image)
    assert (read_image(tmp_path / "a" / "x.png") == image).all()
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["x.png"]  # no temporary file left behind
    with pytest.raises(InputError, match="uint8"):
        write_image(tmp_path / "f.png", image.astype(np.float32))


def test_stable_hash_is_the_sha256_of_sorted_json() -> None:
    import hashlib

    from synth.core.io import stable_hash

    expected = hashlib.sha256(b'{"a": [1, 2], "b": "x"}').hexdigest()  # the cache keys' format, unchanged
    assert stable_hash({"b": "x", "a": [1, 2]}) == expected
    assert stable_hash({"a": [1, 2], "b": "x"}, digits=16) == expected[:16]
    assert stable_hash({"a": [2, 1], "b": "x"}) != expected
