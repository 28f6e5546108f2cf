"""herd.images against transformers' Llama4ImageProcessor: same grids, same resize sizes, same pixels."""

import base64
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Llama4ImageProcessor
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_utils import load_image as hf_load_image
from transformers.models.llama4 import image_processing_llama4

from herd.errors import ConfigError, HerdError
from herd.images import ImageConfig, ImageError, _plan, load_image, process_images, tile_image


class HFFloat32(Llama4ImageProcessor):
    # Llama4ImageProcessor rounds to bfloat16 before scaling and has no option to stop it; its base class's
    # fused normalisation is HF's own float32 path, with everything else (grid, resize, pad, tiles) untouched.
    rescale_and_normalize = TorchvisionBackend.rescale_and_normalize


def noise(h, w, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def gradient(h, w):
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = [255 * x / max(w - 1, 1), 255 * y / max(h - 1, 1), 127.5 + 127 * np.sin(x / 9 + y / 13)]
    return np.stack(rgb, -1).astype(np.uint8)


def png(img: Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def assert_matches_hf(img, cfg=ImageConfig()):
    """herd's tiles of `img` (anything load_image takes) equal HF's, in float32 and in HF's default bfloat16."""
    kw = dict(max_patches=cfg.max_patches, resize_to_max_canvas=cfg.resize_to_max_canvas,
              size={"height": cfg.tile_size, "width": cfg.tile_size})
    ref32 = HFFloat32(**kw)(img, return_tensors="pt")
    ref16 = Llama4ImageProcessor(**kw)(img, return_tensors="pt")
    rgb = load_image(img)
    ours, ours16 = tile_image(rgb, cfg), tile_image(rgb, cfg, torch.bfloat16)
    assert ours.aspect_ratio == tuple(ref32["aspect_ratios"][0].tolist())
    assert ours.pixel_values.dtype == torch.float32 and ref32["pixel_values"].dtype == torch.float32
    assert ours.pixel_values.shape == ref32["pixel_values"].shape
    assert (ours.pixel_values - ref32["pixel_values"]).abs().max().item() <= 1e-5
    assert ref16["pixel_values"].dtype == torch.bfloat16 and torch.equal(ours16.pixel_values, ref16["pixel_values"])
    return ours


# (height, width): tiny, wide, tall, square, > 16 tiles, odd, exact tile, one pixel over, and a size where
# float64 and HF's float32 floor the resize width differently (2688 * 607 / 4249 is exactly 384).
SIZES = [(7, 10), (300, 1500), (1500, 300), (500, 500), (2500, 3000), (601, 337), (336, 336), (337, 337), (4249, 607)]


@pytest.mark.parametrize("hw", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_noise_matches_hf(hw):
    out = assert_matches_hf(Image.fromarray(noise(*hw)))
    rows, cols = out.aspect_ratio
    assert out.pixel_values.shape == (rows * cols + (rows * cols > 1), 3, 336, 336)


@pytest.mark.parametrize("hw", [(7, 10), (1500, 300), (2500, 3000), (601, 337)])
def test_gradient_matches_hf(hw):
    assert_matches_hf(Image.fromarray(gradient(*hw)))


@pytest.mark.parametrize("cfg", [ImageConfig(resize_to_max_canvas=True), ImageConfig(max_patches=4),
                                 ImageConfig(tile_size=112, max_patches=6)], ids=["max_canvas", "4_patches", "tile112"])
@pytest.mark.parametrize("hw", [(90, 60), (200, 700), (1000, 900)])
def test_config_variants_match_hf(cfg, hw):
    assert_matches_hf(Image.fromarray(noise(*hw)), cfg)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("cfg", [ImageConfig(), ImageConfig(resize_to_max_canvas=True), ImageConfig(max_patches=5)],
                         ids=["default", "max_canvas", "5_patches"])
def test_grid_and_resize_size_match_hf_on_many_sizes(cfg, monkeypatch):
    # Run HF's real _preprocess but stop at the padding step: by then it has chosen the canvas and the resize
    # size, which is all we compare, and no pixels were touched. Covers the float32 floor() edge cases.
    seen = {}

    def resize(image, size, **kw):
        seen["resized"] = (size.height, size.width)
        return image.new_zeros(1).expand(*image.shape[:-2], size.height, size.width)

    def pad(images, target_size, **kw):
        seen["grid"] = (int(target_size[0]) // cfg.tile_size, int(target_size[1]) // cfg.tile_size)
        raise _Stop

    monkeypatch.setattr(image_processing_llama4, "pad_to_best_fit", pad)
    hf = Llama4ImageProcessor(max_patches=cfg.max_patches, resize_to_max_canvas=cfg.resize_to_max_canvas)
    monkeypatch.setattr(hf, "resize", resize)
    sizes = [tuple(s) for s in np.random.default_rng(1).integers(1, 1600, (200, 2))]
    sizes += [(3156, 5523), (4249, 607), (2212, 2133), (1876, 1407), (1, 1), (1, 3000), (3000, 1), (335, 337)]
    for h, w in sizes:
        img = torch.zeros(3, 1, 1, dtype=torch.uint8).expand(3, h, w)
        with pytest.raises(_Stop):
            hf(img, return_tensors="pt", input_data_format="channels_first")
        assert _plan(h, w, cfg) == (seen["grid"], seen["resized"]), (h, w)


# ---------------------------------------------------------------------------------------------- inputs

def test_every_input_kind_gives_the_same_tensor(tmp_path):
    a = noise(37, 53)
    data = png(Image.fromarray(a))
    (tmp_path / "x.png").write_bytes(data)
    want = torch.from_numpy(a).permute(2, 0, 1)
    kinds = [str(tmp_path / "x.png"), tmp_path / "x.png", Image.fromarray(a), a, data, bytearray(data),
             "data:image/png;base64," + base64.b64encode(data).decode(),
             want.clone(), torch.from_numpy(a).permute(2, 0, 1)]  # contiguous and strided tensors
    for x in kinds:
        got = load_image(x)
        assert got.dtype == torch.uint8 and torch.equal(got, want), type(x)


def test_grey_inputs_agree():
    a = noise(20, 30, 1)
    want = load_image(Image.fromarray(a[:, :, 0], "L"))
    for x in [a, a[:, :, 0], torch.from_numpy(a).permute(2, 0, 1), torch.from_numpy(a[:, :, 0])]:
        assert torch.equal(load_image(x), want)
    assert torch.equal(want, torch.from_numpy(a).permute(2, 0, 1).expand(3, -1, -1))
    assert_matches_hf(a)  # HF's array route (HxWx1): channel repeat


def _mode_image(mode):
    a = noise(45, 70, 4, seed=3)
    a[:5, :, 3], a[5:10, :, 3] = 0, 255  # fully transparent and fully opaque rows
    if mode == "P+transparency":
        img = Image.fromarray(a[:, :, :3]).quantize(16)
        img.info["transparency"] = 3
        return img
    if mode == "P":
        return Image.fromarray(a[:, :, :3]).quantize(64)
    return Image.fromarray(a).convert(mode) if mode != "RGBA" else Image.fromarray(a)


MODES = ["RGBA", "LA", "L", "P", "P+transparency", "CMYK", "1", "I;16", "RGB"]


@pytest.mark.parametrize("mode", MODES)
def test_colour_modes_match_hf(mode):
    img = _mode_image(mode)
    assert_matches_hf(img)
    # the same image encoded to a file decodes to the same pixels
    again = load_image(png(img, "TIFF" if mode == "CMYK" else "PNG"))
    assert torch.equal(again, load_image(img))


def test_transparent_is_white_and_array_alpha_matches_hf():
    a = noise(30, 40, 4)
    a[..., 3] = 0
    assert (load_image(a) == 255).all()  # fully transparent -> white, as HF's convert_to_rgb
    a = noise(30, 40, 4)
    ours = tile_image(load_image(a)).pixel_values
    assert torch.equal(ours, tile_image(load_image(Image.fromarray(a))).pixel_values)
    # HF blends 4-channel arrays in float and truncates, PIL rounds: at most one uint8 step apart
    ref = HFFloat32()(a, return_tensors="pt")["pixel_values"]
    assert (ours - ref).abs().max().item() <= 2 / 255 + 1e-6


def test_exif_orientation_is_applied_like_hf_load_image(tmp_path):
    img = Image.fromarray(noise(20, 30))
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img.save(tmp_path / "r.png", exif=exif)
    got = load_image(tmp_path / "r.png")
    assert got.shape == (3, 30, 20)
    assert torch.equal(got, torch.from_numpy(np.array(hf_load_image(str(tmp_path / "r.png")))).permute(2, 0, 1))


def test_process_images_matches_hf_batch():
    imgs = [Image.fromarray(noise(h, w, seed=i)) for i, (h, w) in enumerate([(40, 900), (400, 400), (8, 8)])]
    outs = process_images(imgs)
    ref = HFFloat32()(imgs, return_tensors="pt")
    assert [o.aspect_ratio for o in outs] == [tuple(r) for r in ref["aspect_ratios"].tolist()]
    ours = torch.cat([o.pixel_values for o in outs])
    assert ours.shape == ref["pixel_values"].shape and (ours - ref["pixel_values"]).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------------------- errors

def _png_bytes():
    return png(Image.fromarray(noise(64, 64)))


def _file(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    return tmp_path / name


# name -> (tmp_path -> (bad input, text the error message must contain))
BAD = {
    "corrupt bytes": lambda d: (b"\x00\x01 definitely not an image", "image (bytes, 26 bytes)"),
    "truncated png bytes": lambda d: (_png_bytes()[:3000], "image (bytes, 3000 bytes)"),
    "truncated png file": lambda d: (_file(d, "cut.png", _png_bytes()[:3000]), str(d / "cut.png")),
    "empty file": lambda d: (str(_file(d, "empty.png", b"")), str(d / "empty.png")),
    "text file as png": lambda d: (str(_file(d, "text.png", b"hello, not a picture\n")), str(d / "text.png")),
    "missing file": lambda d: (str(d / "missing.png"), str(d / "missing.png")),
    "directory": lambda d: (d, str(d)),
    "http url": lambda d: ("http://example.com/cat.png", "http://example.com/cat.png"),
    "https url": lambda d: ("https://example.com/cat.png", "https://example.com/cat.png"),
    "bad base64": lambda d: ("data:image/png;base64,@@@not base64@@@", "image (data URL, 38 chars)"),
    "non-base64 data url": lambda d: ("data:image/png,xxxxxxxxxx", "image (data URL, 25 chars)"),
    "float array": lambda d: (np.zeros((8, 8, 3), np.float32), "image (ndarray float32 (8, 8, 3))"),
    "2-channel array": lambda d: (np.zeros((8, 8, 2), np.uint8), "image (ndarray uint8 (8, 8, 2))"),
    "empty array": lambda d: (np.zeros((0, 8, 3), np.uint8), "image (ndarray uint8 (0, 8, 3))"),
    "HWC tensor": lambda d: (torch.zeros(8, 8, 3, dtype=torch.uint8), "image (Tensor uint8 (8, 8, 3))"),
    "float tensor": lambda d: (torch.zeros(3, 8, 8), "image (Tensor float32 (3, 8, 8))"),
    "int": lambda d: (12345, "image (int)"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_raises_image_error_naming_it(case, tmp_path, monkeypatch):
    from PIL import ImageFile

    # importing llama-models' preprocess turns this global on; truncated images must still be errors
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    x, name = BAD[case](tmp_path)
    with pytest.raises(ImageError) as info:
        load_image(x)
    e, msg = info.value, str(info.value)
    assert isinstance(e, HerdError) and name in msg, msg
    assert "Traceback" not in msg and not re.search(r"0x[0-9a-f]{6,}", msg), msg  # no raw object reprs
    assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__), msg  # no PIL error chained
    if "url" in case and "data" not in case:
        assert "remote URLs are not fetched" in msg
    if case == "missing file":
        assert "No such file" in msg


def test_process_images_names_the_failing_index(tmp_path):
    with pytest.raises(ImageError, match=re.escape("image #2 (bytes, 4 bytes)")):
        process_images([noise(10, 10), Image.fromarray(noise(5, 5)), b"junk"])
    with pytest.raises(ImageError, match=re.escape(f"image #1 ({tmp_path / 'nope.jpg'})")):
        process_images([noise(10, 10), tmp_path / "nope.jpg"])


def test_config_is_validated():
    with pytest.raises(ConfigError):
        ImageConfig(max_patches=0)
