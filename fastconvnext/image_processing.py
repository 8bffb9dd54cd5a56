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

Accepted inputs: a PIL image, a local file path, a numpy array or torch tensor (one image as HW, HWC or
CHW; a batch as a 4-D array), or a list/tuple of those. Arrays must be uint8, uint16 (scaled by 1/257),
bool, or another integer type holding values in 0..255; float arrays are refused because their range
(0..1 or 0..255) is ambiguous. For 3-D arrays the channel axis is inferred as transformers does: the first
axis if it has 1, 3 or 4 entries, else the last; pass `input_data_format="channels_last"` (or
`"channels_first"`) to say which.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

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


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file fully (so the file handle is released). Raises FileNotFoundError / ValueError."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    if path.is_dir():
        raise ValueError(f"expected an image file, got a directory: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except UnidentifiedImageError:
        raise ValueError(f"not a readable image file: {path}") from None
    except Image.DecompressionBombError as error:
        raise ValueError(f"refusing to open {path}: {error}") from None
    except OSError as error:
        raise ValueError(f"cannot read image {path}: {error}") from None


def convert_to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow image to 8-bit RGB.

    - Transparency (RGBA, LA, PA, P with a transparent colour, ...) is composited onto white, as
      transformers' own `convert_to_rgb` does.
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


def _array_to_pil(array: np.ndarray, input_data_format: str | None) -> Image.Image:
    pixels = np.ascontiguousarray(_array_to_uint8(_channels_last(array, input_data_format)))
    return convert_to_rgb(Image.fromarray(pixels))


def _as_numpy(image: Any) -> np.ndarray | None:
    if isinstance(image, torch.Tensor):
        return image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        return image
    return None


def to_rgb_images(images: Any, input_data_format: str | None = None) -> list[Image.Image]:
    """Flatten any accepted input (see module docstring) into a list of 8-bit RGB Pillow images."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("got an empty list of images")
        return [rgb for image in images for rgb in to_rgb_images(image, input_data_format)]
    if isinstance(images, Image.Image):
        return [convert_to_rgb(images)]
    if isinstance(images, (str, os.PathLike)):
        return [convert_to_rgb(load_image(images))]
    array = _as_numpy(images)
    if array is None:
        raise TypeError(
            "images must be a PIL.Image.Image, a numpy array, a torch tensor, a file path, or a list of these; "
            f"got {type(images).__name__}"
        )
    if array.ndim == 4:
        return [_array_to_pil(one, input_data_format) for one in array]
    return [_array_to_pil(array, input_data_format)]


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


def _shortest_edge_size(size: Any) -> dict[str, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = {"shortest_edge": size}
    if not isinstance(size, Mapping) or set(size) != {"shortest_edge"}:
        raise ValueError(f'size must be an int or {{"shortest_edge": int}}, got {size!r}')
    edge = size["shortest_edge"]
    if not isinstance(edge, int) or isinstance(edge, bool) or edge <= 0:
        raise ValueError(f"size['shortest_edge'] must be a positive int, got {edge!r}")
    return {"shortest_edge": edge}


def _height_width_size(size: Any) -> dict[str, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = {"height": size, "width": size}
    elif isinstance(size, Sequence) and len(size) == 2:
        size = {"height": size[0], "width": size[1]}
    if not isinstance(size, Mapping) or set(size) != {"height", "width"}:
        raise ValueError(f'crop_size must be an int, (height, width) or {{"height": int, "width": int}}, got {size!r}')
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size.values()):
        raise ValueError(f"crop_size entries must be positive ints, got {dict(size)!r}")
    return {"height": size["height"], "width": size["width"]}


def _per_channel(values: Any, name: str) -> tuple[float, float, float]:
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = (values,) * 3
    try:
        values = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number or 3 numbers, got {values!r}") from None
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 entries (one per RGB channel), got {len(values)}: {values!r}")
    return values


def _resample(value: Any) -> Image.Resampling:
    try:
        return Image.Resampling(int(value))
    except (TypeError, ValueError):
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


def _make_settings(**kwargs: Any) -> _Settings:
    """Validated settings; an argument given as None takes its default, as in transformers."""
    return _build_settings(**{name: value for name, value in kwargs.items() if value is not None})


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
    crop_pct = DEFAULT_CROP_PCT if crop_pct is None else float(crop_pct)
    if crop_pct <= 0:
        raise ValueError(f"crop_pct must be > 0, got {crop_pct}")
    if do_center_crop and crop_size is None:
        raise ValueError("do_center_crop=True needs crop_size")
    return _Settings(
        do_resize=bool(do_resize),
        size=_shortest_edge_size({"shortest_edge": WARP_FROM_SHORTEST_EDGE} if size is None else size),
        crop_pct=crop_pct,
        resample=_resample(resample),
        do_center_crop=do_center_crop,
        crop_size=None if crop_size is None else _height_width_size(crop_size),
        do_rescale=bool(do_rescale),
        rescale_factor=float(rescale_factor),
        do_normalize=bool(do_normalize),
        image_mean=_per_channel(IMAGENET_STANDARD_MEAN if image_mean is None else image_mean, "image_mean"),
        image_std=_per_channel(IMAGENET_STANDARD_STD if image_std is None else image_std, "image_std"),
        do_convert_rgb=do_convert_rgb,
    )


_SETTING_NAMES = tuple(_Settings.__dataclass_fields__)
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
    """

    model_input_names = ["pixel_values"]

    def __init__(self, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(_SETTING_NAMES))
        if unknown:
            raise TypeError(
                f"unknown ConvNextImageProcessor argument(s) {unknown}; expected some of {list(_SETTING_NAMES)}"
            )
        self._settings = _make_settings(**kwargs)

    def __getattr__(self, name: str) -> Any:
        settings = self.__dict__.get("_settings")
        if settings is not None and name in _SETTING_NAMES:
            return getattr(settings, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SETTING_NAMES:  # `processor.size = 224` works as in transformers, validated
            value = _make_settings(**{**self._kwargs(), name: value})
            name = "_settings"
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ConvNextImageProcessor) and self._settings == other._settings

    @classmethod
    def for_imagenet(cls, image_size: int = 224, **kwargs: Any) -> ConvNextImageProcessor:
        """The settings the facebook/convnext-*-224 checkpoints ship: shortest edge `image_size`, crop 224/256,
        bicubic, ImageNet mean/std."""
        settings = {"size": {"shortest_edge": image_size}, "crop_pct": DEFAULT_CROP_PCT,
                    "image_mean": IMAGENET_DEFAULT_MEAN, "image_std": IMAGENET_DEFAULT_STD}
        return cls(**{**settings, **kwargs})

    # ---- running -------------------------------------------------------------------------------------------

    def __call__(self, images: Any, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    def preprocess(
        self,
        images: Any,
        return_tensors: str | None = "pt",
        input_data_format: str | None = None,
        **overrides: Any,
    ) -> BatchFeature:
        """Preprocess one image or a batch; any constructor argument can be overridden for this call.

        Returns `{"pixel_values": float32 [B, 3, H, W]}` as a torch tensor (`return_tensors="pt"`, default),
        a numpy array (`"np"`) or a list of numpy [3, H, W] arrays (`None`, like transformers).
        """
        if return_tensors not in _RETURN_TENSORS:
            raise ValueError(f"return_tensors must be one of {_RETURN_TENSORS}, got {return_tensors!r}")
        settings = self._with_overrides(overrides)
        rgb_images = to_rgb_images(images, input_data_format)
        pixels = [_process(image, settings) for image in rgb_images]
        return BatchFeature({"pixel_values": _collate(pixels, return_tensors)})

    def _with_overrides(self, overrides: dict) -> _Settings:
        if not overrides:
            return self._settings
        return type(self)(**{**self._kwargs(), **overrides})._settings

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

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write `save_directory/preprocessor_config.json` (directory created if needed); returns the file path."""
        directory = Path(save_directory)
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"save_pretrained expects a directory, got a file: {directory}")
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / PREPROCESSOR_CONFIG_NAME
        path.write_text(self.to_json_string(), encoding="utf-8")
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> ConvNextImageProcessor:
        """Load from a directory holding `preprocessor_config.json`, or from such a JSON file itself."""
        path = Path(path)
        config_file = path / PREPROCESSOR_CONFIG_NAME if path.is_dir() else path
        if not config_file.is_file():
            raise FileNotFoundError(f"no {PREPROCESSOR_CONFIG_NAME} found at {path}")
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{config_file} is not valid JSON: {error}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{config_file} must hold a JSON object, got {type(config).__name__}")
        return cls.from_dict(config, **overrides)


def _process(image: Image.Image, settings: _Settings) -> torch.Tensor:
    """One RGB Pillow image -> float32 [3, H, W]."""
    crop = None
    if settings.do_resize:
        image, crop = _convnext_resize(image, settings)
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


def _convnext_resize(image: Image.Image, settings: _Settings) -> tuple[Image.Image, int | None]:
    """Resize per the ConvNeXt rule; returns the image and the square crop still to take (None: no crop)."""
    shortest_edge = settings.size["shortest_edge"]
    if shortest_edge >= WARP_FROM_SHORTEST_EDGE:
        return image.resize((shortest_edge, shortest_edge), resample=settings.resample), None
    resized_edge = int(shortest_edge / settings.crop_pct)
    height, width = shortest_edge_resize_size(image.height, image.width, resized_edge)
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
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "IMAGENET_STANDARD_MEAN",
    "IMAGENET_STANDARD_STD",
    "PREPROCESSOR_CONFIG_NAME",
    "convert_to_rgb",
    "load_image",
]
