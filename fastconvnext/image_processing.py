"""ConvNeXt image preprocessing on Pillow + torch, a drop-in for transformers' `ConvNextImageProcessor`.

The pipeline (all steps can be switched off, defaults as in transformers 5.x):

1. Every input becomes an 8-bit RGB Pillow image (see `convert_to_rgb` for the mode rules).
2. Resize with Pillow (bicubic by default). For `size["shortest_edge"] < 384` the shortest edge is first
   resized to `int(shortest_edge / crop_pct)`, keeping the aspect ratio, and the centre
   `shortest_edge x shortest_edge` square is cropped; from 384 up the image is warped to a square with no crop.
3. Optional extra centre crop (`do_center_crop`, `crop_size`), as transformers allows.
4. Rescale (`x * rescale_factor`, computed in float64 then cast to float32) and normalise
   (`(x - mean) / std` in float32).

Outputs match transformers' PIL-backend processor (`ConvNextImageProcessorPil`) bit for bit on RGB input.
Unlike transformers, the output is always float32, even with rescaling and normalisation switched off,
and non-RGB images (RGBA, L, P, 16-bit, CMYK, ...) are converted instead of failing.

Image files are opened as transformers' `load_image` does: the EXIF orientation tag is applied
(`ImageOps.exif_transpose`) before anything else, so a rotated phone photo gives the same pixels, and
transparency (RGBA, LA, P with a transparent colour) is dropped by Pillow's `convert("RGB")`: the colour
channels are kept as stored, whatever their alpha. In-memory images (PIL images, arrays) with transparency
are composited onto white, as transformers' `convert_to_rgb` (`do_convert_rgb=True`) does. To composite
files onto white too, pass `composite_files_on_white=True` to the processor (a choice of this process, never
saved to preprocessor_config.json, as `max_pixels`).

Bounded memory: an image whose decoded size (width x height, read from the file header before decoding)
or whose resized size exceeds `max_pixels` is refused with `ImageTooLargeError` naming the image and the
limit. The limit defaults to the size at which Pillow refuses a decompression bomb (178,956,970 pixels,
twice Pillow's default `Image.MAX_IMAGE_PIXELS`) and is set per processor
(`ConvNextImageProcessor(max_pixels=...)`, never saved to preprocessor_config.json) or process-wide with
the environment variable FASTCONVNEXT_MAX_IMAGE_PIXELS; Pillow's own bomb check (twice
`PIL.Image.MAX_IMAGE_PIXELS`) still applies on top: raise that too for a higher limit. Only regular files
are opened (a FIFO or /dev/zero is refused).

Settings are checked when the processor is built (and on every change): settings whose output alone
would pass the pixel limit (`size`, `crop_size`, a tiny `crop_pct`), `crop_pct <= 0` or so large the
resized edge is 0, `image_std` containing 0, and rescale/normalise values under which a pixel overflows
float32 are refused, so a processor that builds gives finite outputs.

Errors: every bad input or setting raises a ValueError or TypeError subclass (files: OSError subclasses such
as FileNotFoundError / PermissionError, or `ImageDecodeError` for bytes Pillow cannot decode), and every
message names the file or argument concerned.

Accepted inputs: a PIL image, a local file path, a numpy array or torch tensor (one image as HW, HWC or
CHW; a batch as a 4-D array), or a list/tuple of those. Arrays must be uint8, uint16 (scaled by 1/257),
bool, or another integer type holding values in 0..255; float arrays are refused because their range
(0..1 or 0..255) is ambiguous. For 3-D arrays the channel axis is inferred as transformers does: the first
axis if it has 1, 3 or 4 entries, else the last; pass `input_data_format="channels_last"` (or
`"channels_first"`) to say which.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from fastconvnext.safe_io import model_root, open_regular_file, write_text_atomically

# transformers' class defaults (`IMAGENET_STANDARD_*`) ...
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
# ... and the statistics the ImageNet ConvNeXt checkpoints were trained with (`IMAGENET_DEFAULT_*`).
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"
# From this shortest edge on, ConvNeXt warps the image to a square instead of resize + crop.
WARP_FROM_SHORTEST_EDGE = 384
DEFAULT_CROP_PCT = 224 / 256

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_CHANNEL_COUNTS = (1, 3, 4)
_RETURN_TENSORS = ("pt", "np", None)

MAX_PIXELS_ENV_VAR = "FASTCONVNEXT_MAX_IMAGE_PIXELS"
# Pillow's default DecompressionBombError threshold (2 * Image.MAX_IMAGE_PIXELS): ~0.5 GiB of 8-bit RGB, so
# every image Pillow decodes by default (a 108-megapixel phone photo included) is accepted.
DEFAULT_MAX_PIXELS = 178_956_970
MAX_CONFIG_BYTES = 1 << 20  # a preprocessor_config.json is a few hundred bytes


class ImageDecodeError(ValueError):
    """An image file whose bytes Pillow cannot decode; the message names the file."""


class ImageTooLargeError(ValueError):
    """An image whose decoded or resized pixel count exceeds the processor's `max_pixels` limit."""


def max_image_pixels(max_pixels: int | None = None) -> int:
    """The pixel limit in force: `max_pixels` when given, else $FASTCONVNEXT_MAX_IMAGE_PIXELS, else the default."""
    if max_pixels is not None:
        return _positive_int(max_pixels, "max_pixels")
    text = os.environ.get(MAX_PIXELS_ENV_VAR, "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        return _positive_int(int(text), MAX_PIXELS_ENV_VAR)
    except ValueError:
        raise ValueError(f"{MAX_PIXELS_ENV_VAR} must be a positive integer (pixels), got {text!r}") from None


def _positive_int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_pixels(width: int, height: int, limit: int, what: str) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"{what} is {width}x{height}: it has no pixels; expected an image at least 1x1")
    if width * height > limit:
        raise ImageTooLargeError(
            f"{what} is {width}x{height} = {width * height:,} pixels, more than the limit of {limit:,} "
            f"(raise it with ConvNextImageProcessor(max_pixels=...) or ${MAX_PIXELS_ENV_VAR})"
        )


class BatchFeature(dict):
    """The processor's output: a dict (`out["pixel_values"]`) that also reads as attributes and moves with `.to()`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, *args, **kwargs) -> BatchFeature:
        """`tensor.to(*args, **kwargs)` on every torch tensor value (device and/or dtype)."""
        return BatchFeature({
            key: value.to(*args, **kwargs) if isinstance(value, torch.Tensor) else value
            for key, value in self.items()
        })


# ---------------------------------------------------------------------------------------------------------------
# Inputs -> 8-bit RGB Pillow images


def load_image(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """Decode an image file fully (the file handle is released) with its EXIF orientation applied.

    The pixel count is checked against `max_image_pixels(max_pixels)` from the header, before decoding.
    Raises FileNotFoundError / other OSError for the file itself, ValueError for a directory, ImageTooLargeError
    over the limit, ImageDecodeError for bytes that are no (complete) image.
    """
    path = Path(path)
    limit = max_image_pixels(max_pixels)
    _check_regular_file(path)
    with open(path, "rb") as handle:
        return _decode(handle, path, limit, header_only=False)


def _check_regular_file(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    if path.is_dir():
        raise ValueError(f"expected an image file, got a directory: {path}")
    if not path.is_file():  # a FIFO would block, /dev/zero or /dev/urandom never end
        raise ValueError(f"expected a regular image file, got a device, FIFO or socket: {path}")


def check_image_file(path: str | os.PathLike, max_pixels: int | None = None) -> tuple[int, int]:
    """Read only the header of an image file and return its (width, height); raises as `load_image` does
    for a missing file, bytes that are no image, or a pixel count over the limit (nothing is decoded)."""
    path = Path(path)
    limit = max_image_pixels(max_pixels)
    _check_regular_file(path)
    with open(path, "rb") as handle:
        image = _decode(handle, path, limit, header_only=True)
        return image.width, image.height


_ICON_MAGICS = (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00")  # ICO, CUR
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_icon_entries(handle, path: Path, limit: int) -> None:
    """ICO/CUR files: Pillow decodes the largest entry inside Image.open, before any size can be checked, so
    every entry's real size (the embedded PNG's IHDR, or the BMP header) is checked here first."""
    header = handle.read(6)
    handle.seek(0)
    if header[:4] not in _ICON_MAGICS:
        return
    count = int.from_bytes(header[4:6], "little")
    directory = handle.read(6 + 16 * count)[6:]
    for index in range(len(directory) // 16):
        entry = directory[16 * index:16 * index + 16]
        width, height = entry[0] or 256, entry[1] or 256
        handle.seek(int.from_bytes(entry[12:16], "little"))
        head = handle.read(24)
        if head[:8] == _PNG_MAGIC and len(head) == 24:
            width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        elif len(head) >= 12:
            width = abs(int.from_bytes(head[4:8], "little", signed=True))
            height = abs(int.from_bytes(head[8:12], "little", signed=True)) // 2  # image and mask rows
        _check_pixels(max(width, 1), max(height, 1), limit, f"image {path} (icon entry {index})")
    handle.seek(0)


def _decode(handle, path: Path, limit: int, header_only: bool) -> Image.Image:
    try:
        _check_icon_entries(handle, path, limit)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides below
            image = Image.open(handle)
        _check_pixels(image.width, image.height, limit, f"image {path}")
        if header_only:
            return image
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # as transformers' load_image does
        return image
    except ImageTooLargeError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageTooLargeError(
            f"refusing to decode {path}: {error} (Pillow's own check, over PIL.Image.MAX_IMAGE_PIXELS x 2; "
            f"fastconvnext's limit is {limit:,} pixels)"
        ) from None
    except UnidentifiedImageError:
        raise ImageDecodeError(f"not a readable image file: {path} (no format Pillow knows)") from None
    except MemoryError:
        raise
    except Exception as error:  # Pillow's decoders raise many types on malformed bytes (SyntaxError, struct.error, ...)
        raise ImageDecodeError(f"cannot decode image {path}: {_describe(error)}") from None


def _describe(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def convert_to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow image to 8-bit RGB.

    - Transparency (RGBA, LA, PA, P with a transparent colour, ...) is composited onto white, as
      transformers' own `convert_to_rgb` does (image files are read by `_path_to_rgb`, which drops it).
    - 16-bit greyscale (I;16*) and 32-bit integer (I) images are read as 0..65535 and scaled by 1/257 (rounded).
    - Float images (F) are read as 0..255: clipped, rounded half up (NaN -> 0).
    - Everything else (L, 1, P, CMYK, YCbCr, ...) uses Pillow's own `convert("RGB")`.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        return _gray_to_rgb(_sixteen_to_eight_bit(np.asarray(image)))
    if image.mode == "F":  # Pillow's own F -> L conversion truncates instead of rounding
        return _gray_to_rgb(_float_to_eight_bit(np.asarray(image)))
    if _has_transparency(image):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ValueError(f"cannot convert a PIL image in mode {image.mode!r} to RGB: {error}") from None


def _has_transparency(image: Image.Image) -> bool:
    bands = image.getbands()
    return "A" in bands or "a" in bands or image.info.get("transparency") is not None


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(gray).convert("RGB")  # 2-D uint8 -> mode L


def _float_to_eight_bit(values: np.ndarray) -> np.ndarray:
    return np.floor(np.clip(np.nan_to_num(values.astype(np.float64)), 0, 255) + 0.5).astype(np.uint8)


def _sixteen_to_eight_bit(values: np.ndarray) -> np.ndarray:
    # 65535 / 257 == 255 exactly, and k + 0.5 is never hit because 257 is odd, so rint has no ties.
    return np.rint(np.clip(values.astype(np.float64), 0, 65535) / 257.0).astype(np.uint8)


def _array_to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        return _sixteen_to_eight_bit(array)
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(
                f"integer image arrays must hold values in 0..255 (uint16 is read as 0..65535), "
                f"got dtype {array.dtype} with range [{array.min()}, {array.max()}]"
            )
        return array.astype(np.uint8)
    raise TypeError(
        f"image arrays must be uint8 (or uint16 / bool / 0..255 integers), got dtype {array.dtype}; "
        "float arrays are ambiguous (0..1 or 0..255): convert them to uint8 first"
    )


def _channels_last(array: np.ndarray, input_data_format: str | None) -> np.ndarray:
    """A 2-D or 3-D array as HW or HWC."""
    if array.ndim == 2:
        return array
    if array.ndim != 3:
        raise ValueError(f"an image array must have 2 (HW) or 3 (HWC/CHW) dimensions, got shape {tuple(array.shape)}")
    if input_data_format is None:
        if array.shape[0] in _CHANNEL_COUNTS:
            input_data_format = "channels_first"
        elif array.shape[-1] in _CHANNEL_COUNTS:
            input_data_format = "channels_last"
        else:
            raise ValueError(
                f"cannot find the channel axis of an image of shape {tuple(array.shape)}: "
                f"expected 1, 3 or 4 channels first (CHW) or last (HWC)"
            )
    if input_data_format == "channels_first":
        array = np.moveaxis(array, 0, -1)
    elif input_data_format != "channels_last":
        raise ValueError(f"input_data_format must be 'channels_first' or 'channels_last', got {input_data_format!r}")
    if array.shape[-1] not in _CHANNEL_COUNTS:
        raise ValueError(f"expected 1, 3 or 4 channels, got shape {tuple(array.shape)} ({input_data_format})")
    return array[..., 0] if array.shape[-1] == 1 else array


def _array_to_pil(array: np.ndarray, input_data_format: str | None, limit: int) -> Image.Image:
    hw_or_hwc = _channels_last(array, input_data_format)
    _check_pixels(hw_or_hwc.shape[1], hw_or_hwc.shape[0], limit, "an input image array")
    pixels = np.ascontiguousarray(_array_to_uint8(hw_or_hwc))
    return convert_to_rgb(Image.fromarray(pixels))


def _as_numpy(image: Any) -> np.ndarray | None:
    if isinstance(image, torch.Tensor):
        return image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        return image
    return None


def to_rgb_images(
    images: Any, input_data_format: str | None = None, max_pixels: int | None = None,
    composite_files_on_white: bool = False,
) -> list[Image.Image]:
    """Flatten any accepted input (see module docstring) into a list of 8-bit RGB Pillow images."""
    named = named_rgb_images(images, input_data_format, max_image_pixels(max_pixels), composite_files_on_white)
    return [image for _, image in named]


def named_rgb_images(
    images: Any, input_data_format: str | None, limit: int, composite_files_on_white: bool = False
) -> list[tuple[str, Image.Image]]:
    """Like `to_rgb_images`, each image paired with the name errors use: its file path, else "image <index>"."""
    named = _flatten(images, input_data_format, limit, _flag(composite_files_on_white, "composite_files_on_white"))
    return [(name or f"image {index}", image) for index, (name, image) in enumerate(named)]


def _flatten(
    images: Any, input_data_format: str | None, limit: int, files_on_white: bool
) -> list[tuple[str | None, Image.Image]]:
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("got an empty list of images")
        return [named for image in images for named in _flatten(image, input_data_format, limit, files_on_white)]
    if isinstance(images, Image.Image):
        _check_pixels(images.width, images.height, limit, "an input image")
        return [(None, convert_to_rgb(images))]
    if isinstance(images, (str, os.PathLike)):
        return [(str(images), _path_to_rgb(images, limit, files_on_white))]
    array = _as_numpy(images)
    if array is None:
        raise TypeError(
            "images must be a PIL.Image.Image, a numpy array, a torch tensor, a file path, or a list of these; "
            f"got {type(images).__name__}"
        )
    if array.ndim == 4:
        return [(None, _array_to_pil(one, input_data_format, limit)) for one in array]
    return [(None, _array_to_pil(array, input_data_format, limit))]


def _path_to_rgb(path: str | os.PathLike, limit: int, on_white: bool = False) -> Image.Image:
    """An image file as 8-bit RGB; transparency dropped as transformers' `load_image` drops it (`convert("RGB")`),
    or composited onto white with `on_white`."""
    image = load_image(path, max_pixels=limit)
    try:
        if _has_transparency(image) and not on_white and image.mode not in _SIXTEEN_BIT_MODES + ("F",):
            return image.convert("RGB")
        return convert_to_rgb(image)
    except ValueError as error:
        raise ImageDecodeError(f"{path}: {error}") from None


# ---------------------------------------------------------------------------------------------------------------
# Geometry


def shortest_edge_resize_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(height, width) with the shorter side = `shortest_edge`; the longer side truncated, as transformers does."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def center_crop(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Centre crop of a [C, H, W] tensor; where the image is smaller than the crop, the border is zero."""
    channels, in_height, in_width = pixels.shape
    top, left = (in_height - height) // 2, (in_width - width) // 2
    if top >= 0 and left >= 0:
        return pixels[:, top : top + height, left : left + width]
    out = pixels.new_zeros((channels, height, width))
    src_top, src_left = max(top, 0), max(left, 0)
    dst_top, dst_left = src_top - top, src_left - left
    rows, cols = min(in_height - src_top, height - dst_top), min(in_width - src_left, width - dst_left)
    source = pixels[:, src_top : src_top + rows, src_left : src_left + cols]
    out[:, dst_top : dst_top + rows, dst_left : dst_left + cols] = source
    return out


# ---------------------------------------------------------------------------------------------------------------
# Settings


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shortest_edge_size(size: Any) -> dict[str, int]:
    if _is_int(size):
        size = {"shortest_edge": size}
    if not isinstance(size, Mapping) or set(size) != {"shortest_edge"}:
        raise ValueError(f'size must be an int or {{"shortest_edge": int}}, got {size!r}')
    edge = size["shortest_edge"]
    if not _is_int(edge) or edge <= 0:
        raise ValueError(f"size['shortest_edge'] must be a positive int, got {edge!r}")
    return {"shortest_edge": edge}


def _height_width_size(size: Any) -> dict[str, int]:
    if _is_int(size):
        size = {"height": size, "width": size}
    elif isinstance(size, (list, tuple)) and len(size) == 2:
        size = {"height": size[0], "width": size[1]}
    if not isinstance(size, Mapping) or set(size) != {"height", "width"}:
        raise ValueError(f'crop_size must be an int, (height, width) or {{"height": int, "width": int}}, got {size!r}')
    if not all(_is_int(v) and v > 0 for v in size.values()):
        raise ValueError(f"crop_size entries must be positive ints, got {dict(size)!r}")
    return {"height": size["height"], "width": size["width"]}


def _finite_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return number


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, (bool, np.bool_)) or (_is_int(value) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name} must be true or false, got {type(value).__name__} {value!r}")


def _per_channel(values: Any, name: str) -> tuple[float, float, float]:
    if isinstance(values, (int, float, np.number)) and not isinstance(values, bool):
        values = (values,) * 3
    if not isinstance(values, (list, tuple, np.ndarray, torch.Tensor)):
        raise TypeError(f"{name} must be a number or 3 numbers, got {type(values).__name__} {values!r}")
    values = [v.item() if isinstance(v, (np.generic, torch.Tensor)) else v for v in values]
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 entries (one per RGB channel), got {len(values)}: {values!r}")
    return tuple(_finite_float(v, f"{name} entry") for v in values)


def _resample(value: Any) -> Image.Resampling:
    try:
        return Image.Resampling(int(value))
    except (TypeError, ValueError, OverflowError):
        names = ", ".join(f"{member.value} ({member.name})" for member in Image.Resampling)
        raise ValueError(f"resample must be a PIL resampling filter, one of {names}; got {value!r}") from None


@dataclass(frozen=True)
class _Settings:
    do_resize: bool
    size: dict
    crop_pct: float
    resample: Image.Resampling
    do_center_crop: bool | None
    crop_size: dict | None
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple
    image_std: tuple
    do_convert_rgb: bool | None


def _make_settings(max_pixels: int, **kwargs: Any) -> _Settings:
    """Validated settings; an argument given as None takes its default, as in transformers."""
    settings = _build_settings(**{name: value for name, value in kwargs.items() if value is not None})
    _check_output_size(settings, max_pixels)
    _check_value_range(settings)
    return settings


def _build_settings(
    do_resize: bool = True,
    size: Any = None,
    crop_pct: float | None = None,
    resample: Any = Image.Resampling.BICUBIC,
    do_center_crop: bool | None = None,
    crop_size: Any = None,
    do_rescale: bool = True,
    rescale_factor: float = 1 / 255,
    do_normalize: bool = True,
    image_mean: Any = None,
    image_std: Any = None,
    do_convert_rgb: bool | None = None,
) -> _Settings:
    crop_pct = DEFAULT_CROP_PCT if crop_pct is None else _finite_float(crop_pct, "crop_pct")
    if crop_pct <= 0:
        raise ValueError(f"crop_pct must be > 0, got {crop_pct}")
    do_center_crop = None if do_center_crop is None else _flag(do_center_crop, "do_center_crop")
    if do_center_crop and crop_size is None:
        raise ValueError("do_center_crop=True needs crop_size")
    image_std = _per_channel(IMAGENET_STANDARD_STD if image_std is None else image_std, "image_std")
    if 0.0 in image_std:
        raise ValueError(f"image_std must not contain 0 (normalising divides by it), got {list(image_std)}")
    return _Settings(
        do_resize=_flag(do_resize, "do_resize"),
        size=_shortest_edge_size({"shortest_edge": WARP_FROM_SHORTEST_EDGE} if size is None else size),
        crop_pct=crop_pct,
        resample=_resample(resample),
        do_center_crop=do_center_crop,
        crop_size=None if crop_size is None else _height_width_size(crop_size),
        do_rescale=_flag(do_rescale, "do_rescale"),
        rescale_factor=_finite_float(rescale_factor, "rescale_factor"),
        do_normalize=_flag(do_normalize, "do_normalize"),
        image_mean=_per_channel(IMAGENET_STANDARD_MEAN if image_mean is None else image_mean, "image_mean"),
        image_std=image_std,
        do_convert_rgb=None if do_convert_rgb is None else _flag(do_convert_rgb, "do_convert_rgb"),
    )


def _check_output_size(settings: _Settings, limit: int) -> None:
    """Refuse settings whose resized or cropped output alone exceeds the pixel limit, whatever the image."""
    edge = settings.size["shortest_edge"]
    _check_pixels(edge, edge, limit, f"the output of size={{'shortest_edge': {edge}}}")
    if edge < WARP_FROM_SHORTEST_EDGE:
        if not math.isfinite(edge / settings.crop_pct):
            raise ImageTooLargeError(
                f"crop_pct={settings.crop_pct} is too small: the shortest edge would be resized to {edge} / "
                f"{settings.crop_pct} = infinity pixels"
            )
        resized_edge = _crop_resize_edge(settings)
        if resized_edge < 1:
            raise ValueError(
                f"crop_pct={settings.crop_pct} resizes the shortest edge to int({edge} / {settings.crop_pct}) = "
                f"{resized_edge} pixels; expected crop_pct <= {edge}"
            )
        what = f"the resized image for crop_pct={settings.crop_pct} (shortest edge {resized_edge}) at least"
        _check_pixels(resized_edge, resized_edge, limit, what)
    if settings.crop_size is not None:
        _check_pixels(settings.crop_size["width"], settings.crop_size["height"], limit, "crop_size")


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _check_value_range(settings: _Settings) -> None:
    """Refuse rescale/normalise settings under which a pixel value in 0..255 overflows float32 (inf/NaN output)."""
    top = 255.0 * abs(settings.rescale_factor) if settings.do_rescale else 255.0
    if top > _FLOAT32_MAX:
        raise ValueError(
            f"rescale_factor={settings.rescale_factor} overflows float32 (255 x {settings.rescale_factor:.3g}); "
            f"expected |rescale_factor| <= {_FLOAT32_MAX / 255:.3g}"
        )
    if not settings.do_normalize:
        return
    for mean, std in zip(settings.image_mean, settings.image_std):
        # float32 holds mean, std, x - mean and (x - mean) / std; std must not round to 0 in float32
        span = top + abs(mean)
        std32 = abs(float(np.float32(std))) if abs(std) <= _FLOAT32_MAX else math.inf
        if span > _FLOAT32_MAX or std32 in (0.0, math.inf) or span / std32 > _FLOAT32_MAX:
            raise ValueError(
                f"image_mean={list(settings.image_mean)} and image_std={list(settings.image_std)} overflow float32: "
                f"(x - {mean:.3g}) / {std:.3g} for x in [0, {top:.3g}]; expected a normalisation with finite output"
            )


def _crop_resize_edge(settings: _Settings) -> int:
    return int(settings.size["shortest_edge"] / settings.crop_pct)


_SETTING_NAMES = tuple(_Settings.__dataclass_fields__)
# Constructor arguments that are choices of this process, never saved to preprocessor_config.json.
_PROCESS_OPTIONS = ("max_pixels", "composite_files_on_white")
# Keys transformers may write that carry no preprocessing setting.
_BOOKKEEPING_KEYS = {"image_processor_type", "feature_extractor_type", "processor_class", "auto_map"}


# ---------------------------------------------------------------------------------------------------------------
# The processor


class ConvNextImageProcessor:
    """ConvNeXt preprocessing; same constructor arguments, defaults and outputs as transformers' processor.

    Args:
        do_resize: resize (and, below 384, centre crop) per the ConvNeXt rule. Default True.
        size: `{"shortest_edge": int}` or an int. Default `{"shortest_edge": 384}` (transformers' default;
            the ImageNet-224 checkpoints ship `224`, see `for_imagenet`).
        crop_pct: fraction of the resized image kept by the crop when shortest_edge < 384. Default 224/256.
        resample: Pillow filter (int or `PIL.Image.Resampling`). Default bicubic.
        do_center_crop, crop_size: extra centre crop after resizing (off unless set).
        do_rescale, rescale_factor: multiply by `rescale_factor` (default 1/255).
        do_normalize, image_mean, image_std: `(x - mean) / std`; default mean = std = 0.5 (transformers' default).
        do_convert_rgb: accepted and saved for compatibility; images are always converted to RGB here.
        max_pixels: the most pixels an image may have decoded or resized (see the module docstring); default
            $FASTCONVNEXT_MAX_IMAGE_PIXELS or 178,956,970. A safety limit of this process, never saved.
        composite_files_on_white: composite the transparency of image files (paths) onto white, as for
            in-memory images, instead of dropping it as transformers' `load_image` does. Default False (pixels
            as transformers gives them). A choice of this process, never saved.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self, *, max_pixels: int | None = None, composite_files_on_white: bool = False, **kwargs: Any
    ) -> None:
        unknown = sorted(set(kwargs) - set(_SETTING_NAMES))
        if unknown:
            raise TypeError(
                f"unknown ConvNextImageProcessor argument(s) {unknown}; expected some of "
                f"{list(_SETTING_NAMES) + list(_PROCESS_OPTIONS)}"
            )
        object.__setattr__(self, "max_pixels", max_image_pixels(max_pixels))
        object.__setattr__(self, "composite_files_on_white", _flag(composite_files_on_white, "composite_files_on_white"))
        self._settings = _make_settings(self.max_pixels, **kwargs)

    def __getattr__(self, name: str) -> Any:
        settings = self.__dict__.get("_settings")
        if settings is not None and name in _SETTING_NAMES:
            return getattr(settings, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SETTING_NAMES:  # `processor.size = 224` works as in transformers, validated
            value = _make_settings(self.max_pixels, **{**self._kwargs(), name: value})
            name = "_settings"
        elif name == "max_pixels":
            value = max_image_pixels(value)
            _check_output_size(self._settings, value)
        elif name == "composite_files_on_white":
            value = _flag(value, name)
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ConvNextImageProcessor) and self._settings == other._settings

    @classmethod
    def for_imagenet(cls, image_size: int = 224, **kwargs: Any) -> ConvNextImageProcessor:
        """The settings the facebook/convnext-*-224 checkpoints ship: shortest edge `image_size`, crop 224/256,
        bicubic, ImageNet mean/std. `image_size` is an int or, as a config may hold it, a square [size, size]
        pair; ConvNeXt's preprocessing makes square images, so a pair of two sizes is refused."""
        settings = {"size": {"shortest_edge": _square_image_size(image_size)}, "crop_pct": DEFAULT_CROP_PCT,
                    "image_mean": IMAGENET_DEFAULT_MEAN, "image_std": IMAGENET_DEFAULT_STD}
        return cls(**{**settings, **kwargs})

    # ---- running -------------------------------------------------------------------------------------------

    def __call__(self, images: Any, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    def preprocess(
        self,
        images: Any,
        return_tensors: str | None = None,
        input_data_format: str | None = None,
        **overrides: Any,
    ) -> BatchFeature:
        """Preprocess one image or a batch; any constructor argument can be overridden for this call.

        Returns `{"pixel_values": ...}` as transformers does: a list of float32 numpy [3, H, W] arrays
        (`return_tensors=None`, the default), one float32 [B, 3, H, W] torch tensor (`"pt"`) or numpy
        array (`"np"`).
        """
        if return_tensors not in _RETURN_TENSORS:
            raise ValueError(f"return_tensors must be one of {_RETURN_TENSORS}, got {return_tensors!r}")
        limit = max_image_pixels(overrides.pop("max_pixels", self.max_pixels))
        on_white = overrides.pop("composite_files_on_white", self.composite_files_on_white)
        settings = self._with_overrides(overrides, limit)
        named_images = named_rgb_images(images, input_data_format, limit, on_white)
        pixels = [_process(image, settings, name, limit) for name, image in named_images]
        return BatchFeature({"pixel_values": _collate(pixels, return_tensors)})

    def _with_overrides(self, overrides: dict, limit: int) -> _Settings:
        if not overrides and limit == self.max_pixels:
            return self._settings
        return type(self)(max_pixels=limit, **{**self._kwargs(), **overrides})._settings

    # ---- serialisation -------------------------------------------------------------------------------------

    def _kwargs(self) -> dict[str, Any]:
        return {name: getattr(self._settings, name) for name in _SETTING_NAMES}

    def to_dict(self) -> dict[str, Any]:
        """Settings in transformers' `preprocessor_config.json` form (None-valued optional settings left out)."""
        out = {name: value for name, value in self._kwargs().items() if value is not None}
        out["resample"] = int(out["resample"])
        out["image_mean"] = list(out["image_mean"])
        out["image_std"] = list(out["image_std"])
        out["image_processor_type"] = "ConvNextImageProcessor"
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], **overrides: Any) -> ConvNextImageProcessor:
        """Build from a `preprocessor_config.json` dict; keys that are no ConvNeXt setting are ignored."""
        known = {key: value for key, value in config.items() if key in _SETTING_NAMES}
        return cls(**{**known, **overrides})

    def to_json_file(self, json_file_path: str | os.PathLike) -> None:
        """Write the settings as JSON to `json_file_path` (what `save_pretrained` writes), as transformers does;
        atomically, so a failed write leaves any previous file whole."""
        write_text_atomically(json_file_path, self.to_json_string())

    def save_pretrained(self, save_directory: str | os.PathLike) -> list[str]:
        """Write `save_directory/preprocessor_config.json` (directory created if needed); returns the written
        paths as a list of str, as transformers does."""
        directory = Path(save_directory)
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(f"save_pretrained expects a directory, got a file: {directory}")
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / PREPROCESSOR_CONFIG_NAME
        self.to_json_file(path)
        return [str(path)]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> ConvNextImageProcessor:
        """Load from a directory holding `preprocessor_config.json`, or from such a JSON file itself.

        Settings errors name the file. A directory without the file (model weights only) raises
        FileNotFoundError pointing to `ConvNextImageProcessor.for_imagenet()`.
        """
        path = Path(path)
        config_file = _config_file(path)
        # Read from a model directory: the file must be inside it (no symbolic link out of it), as model files are.
        config = _read_config(config_file, model_root(path) if path.is_dir() else None)
        try:
            return cls.from_dict(config, **overrides)
        except (ValueError, TypeError) as error:
            raise type(error)(f"{config_file}: {error}") from None


def _square_image_size(image_size: Any) -> Any:
    """An int, or the one size of a square [h, w] / (h, w) / {"height", "width"} (checked later as any size is)."""
    if isinstance(image_size, Mapping) and set(image_size) == {"height", "width"}:
        image_size = (image_size["height"], image_size["width"])
    if isinstance(image_size, Sequence) and not isinstance(image_size, str) and len(image_size) == 2:
        height, width = image_size
        if height != width:
            raise ValueError(
                f"image_size {list(image_size)} is not square: the ImageNet evaluation settings resize the shortest "
                "edge and crop a square; save a preprocessor_config.json with the model for other shapes")
        return height
    return image_size


def _config_file(path: Path) -> Path:
    config_file = path / PREPROCESSOR_CONFIG_NAME if path.is_dir() else path
    if config_file.is_file() or config_file.exists() and not config_file.is_dir():
        return config_file  # opening it refuses what is not a regular file (a FIFO would block a plain read)
    if path.is_dir():
        raise FileNotFoundError(
            f"no {PREPROCESSOR_CONFIG_NAME} in {path} (a directory with model weights only?); for the ImageNet "
            "evaluation settings the facebook/convnext-*-224 checkpoints ship, use "
            "ConvNextImageProcessor.for_imagenet() (image_size=config.image_size for other resolutions)"
        )
    raise FileNotFoundError(f"no {PREPROCESSOR_CONFIG_NAME} found at {path}")


def _read_config(config_file: Path, root: Path | None) -> dict:
    with open_regular_file(config_file, root) as handle:
        data = handle.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ValueError(f"{config_file} is over {MAX_CONFIG_BYTES:,} bytes; expected a JSON file of at most that")
    try:
        config = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:  # JSONDecodeError is a ValueError
        raise ValueError(f"{config_file} is not valid JSON: {_describe(error)}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} must hold a JSON object, got {type(config).__name__}")
    return config


def _process(image: Image.Image, settings: _Settings, name: str, limit: int) -> torch.Tensor:
    """One RGB Pillow image -> float32 [3, H, W]; `name` and `limit` for the resize bound."""
    crop = None
    if settings.do_resize:
        image, crop = _convnext_resize(image, settings, name, limit)
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
    if crop is not None:
        pixels = center_crop(pixels, crop, crop)
    if settings.do_center_crop:
        pixels = center_crop(pixels, settings.crop_size["height"], settings.crop_size["width"])
    if settings.do_rescale:
        pixels = (pixels.to(torch.float64) * settings.rescale_factor).to(torch.float32)
    pixels = pixels.to(torch.float32)
    if settings.do_normalize:
        mean = torch.tensor(settings.image_mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(settings.image_std, dtype=torch.float32).view(3, 1, 1)
        pixels = (pixels - mean) / std
    return pixels.contiguous()


def _convnext_resize(
    image: Image.Image, settings: _Settings, name: str, limit: int
) -> tuple[Image.Image, int | None]:
    """Resize per the ConvNeXt rule; returns the image and the square crop still to take (None: no crop)."""
    shortest_edge = settings.size["shortest_edge"]
    if shortest_edge >= WARP_FROM_SHORTEST_EDGE:
        return image.resize((shortest_edge, shortest_edge), resample=settings.resample), None
    height, width = shortest_edge_resize_size(image.height, image.width, _crop_resize_edge(settings))
    _check_pixels(width, height, limit, f"{name} resized (from {image.width}x{image.height})")
    return image.resize((width, height), resample=settings.resample), shortest_edge


def _collate(pixels: list[torch.Tensor], return_tensors: str | None) -> Any:
    if return_tensors is None:
        return [p.numpy() for p in pixels]
    shapes = {tuple(p.shape) for p in pixels}
    if len(shapes) > 1:
        raise ValueError(
            f"cannot stack images of different sizes {sorted(shapes)}; keep do_resize=True "
            "or pass return_tensors=None"
        )
    batch = torch.stack(pixels)
    return batch if return_tensors == "pt" else batch.numpy()


__all__ = [
    "BatchFeature",
    "ConvNextImageProcessor",
    "DEFAULT_MAX_PIXELS",
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "IMAGENET_STANDARD_MEAN",
    "IMAGENET_STANDARD_STD",
    "ImageDecodeError",
    "ImageTooLargeError",
    "MAX_PIXELS_ENV_VAR",
    "PREPROCESSOR_CONFIG_NAME",
    "convert_to_rgb",
    "check_image_file",
    "load_image",
    "max_image_pixels",
]
