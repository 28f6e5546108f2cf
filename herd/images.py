"""Llama 4 image input: load anything image-like as RGB, then tile it exactly as HF's Llama4ImageProcessor does.

Per image: pick the grid of rows x cols tiles (rows * cols <= max_patches) that needs the least resizing,
resize without distortion (bilinear, antialiased, on uint8), pad right/bottom with black, scale to [-1, 1],
cut into tile_size^2 tiles in reading order and, when there is more than one tile, append a thumbnail of
the whole image squashed to one tile. The grid is what herd.chat calls an image part's "tiles".

load_image() accepts:
  - a path (str or pathlib.Path), raw bytes, or a "data:...;base64," URL: decoded with Pillow, EXIF
    orientation applied (as HF's load_image does); http(s) and other URLs are refused, never fetched;
  - a PIL.Image, used as given;
  - a uint8 numpy array, HxW (grey) or HxWxC with C in 1, 3, 4 (RGBA);
  - a uint8 torch tensor, HxW or CxHxW with C in 1, 3, 4.
Float arrays are refused: [0, 1] and [0, 255] cannot be told apart, so scaling them is the caller's call.
Alpha is composited onto white and grey/palette/CMYK go through Pillow's RGB conversion, like HF's
convert_to_rgb for PIL images. 4-channel arrays take that same PIL route, so every input kind of one
image gives the same tensor (HF's own array route rounds the alpha blend differently, by <= 1/255).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF

from herd.errors import ConfigError, HerdError


class ImageError(HerdError):
    """An image cannot be read, decoded or converted to RGB; the message names the input."""


@dataclass(frozen=True)
class ImageConfig:
    """Preprocessing knobs; the defaults are HF's Llama4ImageProcessor (Llama 4 Scout and Maverick)."""

    tile_size: int = 336
    max_patches: int = 16  # most tiles in the grid, thumbnail not counted
    resize_to_max_canvas: bool = False  # True: upscale to the largest grid that fits; False: small images stay 1 tile

    def __post_init__(self):
        if self.tile_size < 1 or self.max_patches < 1:
            raise ConfigError(f"tile_size and max_patches must be >= 1, got {self.tile_size}, {self.max_patches}")


@dataclass(frozen=True)
class ProcessedImage:
    pixel_values: torch.Tensor  # [rows*cols (+1 thumbnail if > 1), 3, tile, tile], values in [-1, 1]
    aspect_ratio: tuple[int, int]  # (rows, cols) of the tile grid


# ---------------------------------------------------------------------------------------------- loading

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def _describe(x: Any, index: int | None) -> str:
    who = "image" if index is None else f"image #{index}"
    if isinstance(x, Path) or (isinstance(x, str) and not x.startswith("data:")):
        path = str(x) if len(str(x)) <= 200 else str(x)[:100] + f"... ({len(str(x))} chars)"
        return path if index is None else f"{who} ({path})"
    if isinstance(x, str):
        return f"{who} (data URL, {len(x)} chars)"
    if isinstance(x, (bytes, bytearray, memoryview)):
        return f"{who} (bytes, {len(x)} bytes)"
    if isinstance(x, Image.Image):
        return f"{who} (PIL {x.mode} {x.width}x{x.height})"
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return f"{who} ({type(x).__name__} {str(x.dtype).removeprefix('torch.')} {tuple(x.shape)})"
    return f"{who} ({type(x).__name__})"


def _decode(data: bytes, name: str) -> Image.Image:
    if not data:
        raise ImageError(f"{name}: empty, no image data")
    # llama-models' preprocess module sets Pillow's global LOAD_TRUNCATED_IMAGES on import, which would turn a
    # truncated file into an image padded with black; a truncated upload must be an error here.
    lenient, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # open() only reads the header: truncated pixel data shows up here
        return ImageOps.exif_transpose(img)
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image, or a format Pillow cannot read") from None
    except Exception as e:  # Pillow's decoders fail on bad data with many types (OSError, SyntaxError, struct.error...)
        raise ImageError(f"{name}: corrupt or truncated image ({type(e).__name__}: {e})") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient


def _from_array(a: np.ndarray, name: str) -> Image.Image:
    if a.dtype != np.uint8:
        raise ImageError(f"{name}: arrays must be uint8 0..255, got {a.dtype} (scale floats to 0..255 first)")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ImageError(f"{name}: expected HxW or HxWxC (C = 1, 3 or 4) pixels, got shape {a.shape}")
    return Image.fromarray(np.ascontiguousarray(a))  # mode L, RGB or RGBA from the shape


def _to_rgb(img: Image.Image) -> torch.Tensor:
    # HF's convert_to_rgb: anything transparent goes on white (a bare convert("RGB") would show whatever colour
    # hides under alpha 0), everything else through Pillow's own conversion (grey, palette, CMYK, 16-bit...).
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous()  # [3, H, W] uint8


def load_image(x: Any, index: int | None = None) -> torch.Tensor:
    """Any supported image input (see module docstring) -> [3, H, W] uint8 RGB tensor.

    `index` only labels errors ("image #2 (bytes, 12 bytes): ..."); every failure raises ImageError.
    """
    name = _describe(x, index)
    if isinstance(x, torch.Tensor):
        if x.dtype != torch.uint8 or not (x.ndim == 2 or (x.ndim == 3 and x.shape[0] in (1, 3, 4))):
            raise ImageError(f"{name}: tensors must be uint8 HxW or CxHxW (C = 1, 3 or 4)")
        if x.ndim == 3 and x.shape[0] == 3 and x.numel():
            return x.detach().cpu().contiguous()  # already RGB: skip the PIL round trip
        x = x.detach().cpu().numpy()
        x = x.transpose(1, 2, 0) if x.ndim == 3 else x  # HxWxC, as numpy arrays come
    if isinstance(x, str) and x.startswith("data:"):
        header, comma, payload = x.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ImageError(f"{name}: only base64 data URLs are supported (data:<type>;base64,<data>)")
        try:
            x = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ImageError(f"{name}: invalid base64 in data URL") from None
    elif isinstance(x, str) and _URL.match(x):
        raise ImageError(f"{name}: remote URLs are not fetched; download the image and pass its path or bytes")
    if isinstance(x, (str, Path)):
        try:
            x = Path(x).expanduser().read_bytes()
        except OSError as e:
            raise ImageError(f"{name}: cannot read file ({e.strerror or type(e).__name__})") from None
    if isinstance(x, (bytes, bytearray, memoryview)):
        img = _decode(bytes(x), name)
    elif isinstance(x, np.ndarray):
        img = _from_array(x, name)
    elif isinstance(x, Image.Image):
        img = x
    else:
        raise ImageError(f"{name}: unsupported input type; expected a path, bytes, data URL, PIL image, "
                         "uint8 numpy array or uint8 tensor")
    try:
        rgb = _to_rgb(img)
    except Exception as e:  # a lazily opened PIL image can still fail to decode, odd modes can fail to convert
        raise ImageError(f"{name}: cannot convert {img.mode} image to RGB ({type(e).__name__}: {e})") from None
    if rgb.shape[1] == 0 or rgb.shape[2] == 0:
        raise ImageError(f"{name}: image has no pixels ({rgb.shape[2]}x{rgb.shape[1]})")
    return rgb


# ---------------------------------------------------------------------------------------------- tiling

@lru_cache(maxsize=8)
def _grids(max_patches: int) -> torch.Tensor:
    # Every rows x cols grid with at most max_patches tiles. HF lists them in another order, but that order
    # never decides anything: among the best-scaling grids the smallest one is unique (both its rows and
    # its cols are the minimum), in float32 too.
    grids = [(r, c) for r in range(1, max_patches + 1) for c in range(1, max_patches // r + 1)]
    return torch.tensor(grids)  # [n_grids, 2] (rows, cols)


def _plan(h: int, w: int, cfg: ImageConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """(rows, cols) of the tile grid and the (height, width) to resize to before padding, as HF picks them."""
    grids, t = _grids(cfg.max_patches), cfg.tile_size
    canvas = grids * t  # [n_grids, 2]
    # Largest scale that fits each canvas without distortion, in float32 as HF computes it (the == below
    # must see HF's rounding).
    scales = torch.minimum(canvas[:, 0] / h, canvas[:, 1] / w)
    up = scales[scales >= 1]
    if len(up):  # smallest upscale (or largest, if asked), else the mildest downscale
        best = up.max() if cfg.resize_to_max_canvas else up.min()
    else:
        best = scales[scales < 1].max()
    fits = grids[scales == best]
    rows, cols = fits[(fits[:, 0] * fits[:, 1]).argmin()].tolist()  # least padding among equals

    th, tw = rows * t, cols * t
    # HF divides in float32 on a side when its limit came from the canvas (a tensor there) and in float64
    # otherwise; that flips floor() by one pixel on some sizes (e.g. 3156x5523), so we do the same.
    f32_h = cfg.resize_to_max_canvas or th < max(h, t)
    f32_w = cfg.resize_to_max_canvas or tw < max(w, t)
    if not cfg.resize_to_max_canvas:  # upscale a small image to at most one tile, never to fill the canvas
        th, tw = min(max(h, t), th), min(max(w, t), tw)
    scale_h = (np.float32(th) if f32_h else th) / h
    scale_w = (np.float32(tw) if f32_w else tw) / w
    if scale_w < scale_h:
        nh, nw = min(math.floor(h * scale_w), th), tw
    else:
        nh, nw = th, min(math.floor(w * scale_h), tw)
    return (rows, cols), (max(int(nh), 1), max(int(nw), 1))


def tile_grid(img: torch.Tensor, cfg: ImageConfig = ImageConfig()) -> tuple[int, int]:
    """(rows, cols) of the grid tile_image cuts ``img`` [3, H, W] into, without cutting it."""
    return _plan(img.shape[1], img.shape[2], cfg)[0]


def tile_image(img: torch.Tensor, cfg: ImageConfig = ImageConfig(),
               dtype: torch.dtype = torch.float32) -> ProcessedImage:
    """[3, H, W] uint8 RGB (see load_image) -> Llama 4 tiles.

    dtype=torch.bfloat16 reproduces HF's default output bit for bit (it rounds to bfloat16 before scaling);
    float32 equals HF's float32 normalisation to ~1e-7.
    """
    tiles, grid = tile_image_uint8(img, cfg)
    return ProcessedImage(normalize_tiles(tiles, dtype), grid)


def tile_image_uint8(img: torch.Tensor, cfg: ImageConfig = ImageConfig()) -> tuple[torch.Tensor, tuple[int, int]]:
    """The tiles before normalisation: ([rows*cols (+1 thumbnail), 3, tile, tile] uint8, (rows, cols)). Training
    data stores these (a quarter of the bytes of float32) and normalises when it serves them."""
    if img.dtype != torch.uint8 or img.ndim != 3 or img.shape[0] != 3:
        raise ImageError(f"tile_image takes a [3, H, W] uint8 tensor (see load_image), "
                         f"got {img.dtype} {tuple(img.shape)}")
    t, bilinear = cfg.tile_size, TF.InterpolationMode.BILINEAR
    (rows, cols), (nh, nw) = _plan(img.shape[1], img.shape[2], cfg)
    # Resize the uint8 image, as HF does: the rounding back to uint8 is part of the reference output.
    x = TF.resize(img, [nh, nw], interpolation=bilinear, antialias=True)  # [3, nh, nw]
    x = TF.pad(x, [0, 0, cols * t - nw, rows * t - nh])  # black right/bottom: [3, rows*t, cols*t]
    tiles = x.reshape(3, rows, t, cols, t).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, t, t)
    if rows * cols > 1:  # global view: the whole image squashed to one tile
        thumb = TF.resize(img, [t, t], interpolation=bilinear, antialias=True)  # [3, t, t]
        tiles = torch.cat([tiles, thumb[None]])
    return tiles, (rows, cols)


def normalize_tiles(tiles_uint8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 tiles -> model input in [-1, 1]: HF's rescale, then normalise with mean = std = 0.5."""
    return (tiles_uint8.to(dtype) * (1 / 255) - 0.5) / 0.5


def process_images(images: Sequence[Any], cfg: ImageConfig = ImageConfig(),
                   dtype: torch.dtype = torch.float32) -> list[ProcessedImage]:
    """Load and tile each image; errors name the failing one as "image #i" (its index in `images`)."""
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"process_images takes a list of images, got {type(images).__name__}")
    return [tile_image(load_image(x, index=i), cfg, dtype) for i, x in enumerate(images)]
