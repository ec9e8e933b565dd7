"""Every image mode becomes the right 8-bit RGB picture; what cannot be decoded is skipped and recorded."""
from __future__ import annotations

import io

import h5py
import numpy as np
import pytest
import torch
from conftest import config
from PIL import Image

from extract import pipeline
from extract.images import to_rgb


def gradient16():
    return np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)


def reopen(image: Image.Image, fmt: str, **kw) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    buf.seek(0)
    return Image.open(buf)


def test_16_bit_png_is_scaled_not_clipped():
    img = reopen(Image.fromarray(gradient16()), "PNG")
    assert img.mode == "I;16"
    rgb = np.asarray(to_rgb(img))
    expected = np.rint(gradient16() / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(rgb[..., 0], expected)
    assert rgb.mean() == pytest.approx(127.5, abs=1)  # Pillow's own convert("RGB") clips: nearly all white
    assert np.asarray(img.convert("RGB")).mean() > 250


@pytest.mark.parametrize("values, expected_mid", [(np.linspace(0, 1, 1024), 127.5), (np.linspace(-3, 5, 1024), 127.5)])
def test_float_tiff_is_scaled_from_0_1_or_stretched(values, expected_mid):
    img = reopen(Image.fromarray(values.reshape(32, 32).astype(np.float32)), "TIFF")
    assert img.mode == "F"
    rgb = np.asarray(to_rgb(img))
    assert rgb.min() == 0 and rgb.max() == 255 and rgb.mean() == pytest.approx(expected_mid, abs=1)


def test_32_bit_integer_images_holding_16_bit_values():
    rgb = np.asarray(to_rgb(Image.fromarray(gradient16().astype(np.int32))))
    assert rgb.max() == 255 and rgb.mean() == pytest.approx(127.5, abs=1)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    shown = to_rgb(reopen(img, "PNG", exif=exif))
    assert shown.size == (20, 40)
    assert np.asarray(shown)[2, 10, 2] > 200  # the blue half is now on top


def test_transparency_goes_on_white_and_other_modes_convert():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(to_rgb(rgba))[0, 0].tolist() == [255, 255, 255]
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0])
    pal = reopen(pal, "PNG", transparency=0)
    assert np.asarray(to_rgb(pal))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(to_rgb(Image.new("LA", (2, 2), (0, 128))))[0, 0].tolist() == [127, 127, 127]
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    assert np.asarray(to_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]
    assert to_rgb(Image.new("L", (2, 2), 7)).mode == "RGB" and to_rgb(Image.new("1", (2, 2))).mode == "RGB"


def test_extraction_scales_16_bit_images_and_records_what_it_cannot_decode(tmp_path, tiny_model):
    root = tmp_path / "odd"
    folder = root / "photo" / "thing"
    folder.mkdir(parents=True)
    Image.fromarray(gradient16()).save(folder / "deep.png")
    Image.fromarray(np.linspace(0, 1, 1024).reshape(32, 32).astype(np.float32)).save(folder / "float.tif")
    Image.new("RGB", (16, 16), (10, 200, 30)).save(folder / "image-with-odd-suffix.jfif", format="PNG")
    (folder / "notes.txt").write_text("not an image")
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, format="JPEG")
    (folder / "torn.jpg").write_bytes(good.getvalue()[:200])
    (folder / ".hidden.png").write_bytes(b"ignored: hidden files are not inputs")
    path = pipeline.run(config("extract", ["dataset=folder", f"dataset.root={root}", f"model.name={tiny_model}",
                                           f"cache_dir={tmp_path / 'cache'}", "num_workers=0"]))
    with h5py.File(path, "r") as f:
        g = f["domains/photo"]
        ids = [s.decode() for s in g["ids"][()]]
        skipped = dict(zip((s.decode() for s in g["skipped/ids"][()]), (s.decode() for s in g["skipped/reasons"][()])))
        emb = g["image_embeddings"][()]
    assert sorted(ids) == ["photo/thing/deep.png", "photo/thing/float.tif", "photo/thing/image-with-odd-suffix.jfif"]
    assert sorted(skipped) == ["photo/thing/notes.txt", "photo/thing/torn.jpg"] and all(skipped.values())
    from transformers import CLIPModel

    from extract.model import image_processor_class

    model = CLIPModel.from_pretrained(tiny_model).eval()
    processor = image_processor_class().from_pretrained(tiny_model)
    eight_bit = Image.fromarray(np.rint(gradient16() / 257.0).astype(np.uint8)).convert("RGB")
    with torch.no_grad():
        expected = model.get_image_features(**processor(images=eight_bit, return_tensors="pt")).pooler_output[0]
    np.testing.assert_allclose(emb[ids.index("photo/thing/deep.png")], expected.numpy(), rtol=1e-4, atol=1e-5)
