"""Hostile images and processor settings: bounded decoding and resizing, clear errors naming the file and
the limit, invalid settings refused at construction; EXIF orientation and transformers parity (the oracle)."""
import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_utils import load_image as transformers_load_image
from transformers.models.convnext.image_processing_pil_convnext import ConvNextImageProcessorPil

from fastconvnext.image_processing import (
    DEFAULT_MAX_PIXELS,
    MAX_PIXELS_ENV_VAR,
    PREPROCESSOR_CONFIG_NAME,
    ConvNextImageProcessor,
    ImageDecodeError,
    ImageTooLargeError,
    check_image_file,
    load_image,
)

EXIF_ORIENTATION_TAG = 0x0112


def random_rgb(height, width, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def with_declared_size(png, width, height):
    """The PNG with its IHDR width/height replaced (CRC fixed): a header that lies about the pixel count."""
    ihdr_start = 8 + 8  # signature, then the IHDR chunk's length and type
    ihdr = bytearray(png[ihdr_start : ihdr_start + 13])
    ihdr[0:8] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    return png[:ihdr_start] + bytes(ihdr) + crc + png[ihdr_start + 17 :]


# ---- pixel limits ---------------------------------------------------------------------------------------


def test_tiny_tall_png_is_refused_before_the_resize_allocates(tmp_path):
    path = tmp_path / "tall.png"
    Image.new("L", (1, 60000)).save(path, optimize=True)
    assert path.stat().st_size < 1024
    # transformers would resize it to 256 x 15,360,000 (about 12 GB as float32 RGB) for shortest edge 224.
    with pytest.raises(ImageTooLargeError, match=r"tall\.png resized .*256x15360000.*limit of 178,956,970"):
        ConvNextImageProcessor.for_imagenet()(str(path))
    with pytest.raises(ImageTooLargeError, match=r"image 0 resized"):  # an in-memory image is bounded too
        ConvNextImageProcessor.for_imagenet()(Image.new("RGB", (1, 60000)))


def test_decoded_pixel_limit_from_argument_and_environment(tmp_path, monkeypatch):
    path = tmp_path / "photo.png"
    image = random_rgb(100, 120)
    image.save(path)
    with pytest.raises(ImageTooLargeError, match=r"photo\.png is 120x100 = 12,000 pixels.*limit of 11,999"):
        ConvNextImageProcessor(size=32, max_pixels=11_999)(str(path))
    with pytest.raises(ImageTooLargeError, match="limit of 11,999"):
        load_image(path, max_pixels=11_999)
    with pytest.raises(ImageTooLargeError, match="limit of 11,999"):
        check_image_file(path, max_pixels=11_999)
    monkeypatch.setenv(MAX_PIXELS_ENV_VAR, "11999")
    with pytest.raises(ImageTooLargeError, match=MAX_PIXELS_ENV_VAR):
        ConvNextImageProcessor(size=32)(str(path))
    # At the limit the output is transformers' own: the limit refuses, it never changes pixels.
    expected = ConvNextImageProcessorPil(size=32)(image, return_tensors="pt")["pixel_values"]
    got = ConvNextImageProcessor(size=32, max_pixels=12_000)(str(path), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("value", ["many", "-5", "0", "1.5"])
def test_bad_environment_limit_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv(MAX_PIXELS_ENV_VAR, value)
    with pytest.raises(ValueError, match=f"{MAX_PIXELS_ENV_VAR} must be a positive integer"):
        ConvNextImageProcessor()


def test_lying_header_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    path.write_bytes(with_declared_size(png_bytes(random_rgb(8, 8)), 20_000, 20_000))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # Pillow's own bomb check off: ours alone decides
    assert check_image_file(path, max_pixels=400_000_000) == (20_000, 20_000)  # only the header was read
    with pytest.raises(ImageTooLargeError, match=r"bomb\.png is 20000x20000 = 400,000,000 pixels"):
        check_image_file(path)
    with pytest.raises(ImageTooLargeError, match=r"bomb\.png.*limit of 178,956,970"):
        ConvNextImageProcessor()(str(path))


def test_pillow_decompression_bomb_error_names_the_file(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(with_declared_size(png_bytes(random_rgb(8, 8)), 40_000, 40_000))  # over 2x Pillow's limit
    with pytest.raises(ImageTooLargeError, match=r"refusing to decode .*huge\.png"):
        load_image(path, max_pixels=10**10)


# ---- broken files ---------------------------------------------------------------------------------------


def jpeg_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize("cut", [3, 20, 100])  # inside the JPEG header (SOI, APP0, quantisation tables)
def test_jpeg_cut_inside_its_header_names_the_file(tmp_path, cut):
    path = tmp_path / "cut.jpg"
    path.write_bytes(jpeg_bytes(random_rgb(64, 64))[:cut])
    with pytest.raises(ImageDecodeError, match=r"cut\.jpg"):
        ConvNextImageProcessor()(str(path))
    with pytest.raises(ImageDecodeError, match=r"cut\.jpg"):
        check_image_file(path)


def test_jpeg_cut_inside_its_data_names_the_file(tmp_path):
    path = tmp_path / "half.jpg"
    data = jpeg_bytes(random_rgb(128, 128))
    path.write_bytes(data[: len(data) // 2])
    check_image_file(path)  # the header is intact ...
    with pytest.raises(ImageDecodeError, match=r"half\.jpg.*truncated"):  # ... the pixels are not
        ConvNextImageProcessor()(str(path))


def test_special_files_are_refused_without_reading(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening it for reading would block forever
    for path in (fifo, Path("/dev/zero")):
        with pytest.raises(ValueError, match=f"regular image file.*{path.name}"):
            ConvNextImageProcessor()(str(path))
        with pytest.raises(ValueError, match="regular image file"):
            check_image_file(path)


# ---- settings refused when the processor is built --------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"image_std": [0.2, 0.0, 0.3]}, ValueError, "image_std must not contain 0"),
        ({"image_std": 0}, ValueError, "image_std must not contain 0"),
        ({"image_std": [0.2, float("nan"), 0.3]}, ValueError, "finite"),
        ({"crop_pct": 0}, ValueError, "crop_pct must be > 0"),
        ({"crop_pct": -0.5}, ValueError, "crop_pct must be > 0"),
        ({"crop_pct": float("inf")}, ValueError, "finite"),
        ({"crop_pct": "0.9"}, TypeError, "crop_pct must be a number"),
        ({"size": 224, "crop_pct": 0.004}, ImageTooLargeError, r"crop_pct=0.004 .*shortest edge 56000"),
        ({"size": 224, "crop_pct": 1000}, ValueError, r"int\(224 / 1000.0\) = 0"),
        ({"size": 100_000}, ImageTooLargeError, "100000x100000"),
        ({"size": 2**80}, ImageTooLargeError, "limit"),
        ({"do_center_crop": True, "crop_size": 50_000}, ImageTooLargeError, "crop_size"),
        ({"rescale_factor": float("nan")}, ValueError, "finite"),
        ({"size": 224, "crop_pct": 1e-320}, ImageTooLargeError, "infinity pixels"),
        ({"rescale_factor": 1e308}, ValueError, "rescale_factor=1e\\+308 overflows float32"),
        ({"image_std": 1e-320}, ValueError, "overflow float32"),  # 0 once rounded to float32
        ({"image_mean": 1e308, "image_std": 1e308}, ValueError, "overflow float32"),
        ({"do_resize": "yes"}, TypeError, "do_resize must be true or false"),
    ],
)
def test_invalid_settings_are_refused_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        ConvNextImageProcessor(**kwargs)


def test_invalid_settings_are_refused_on_assignment_and_per_call():
    processor = ConvNextImageProcessor(size=32)
    with pytest.raises(ValueError, match="image_std must not contain 0"):
        processor.image_std = [0, 0, 0]
    with pytest.raises(ImageTooLargeError):
        processor(random_rgb(10, 10), crop_pct=0.0001)
    with pytest.raises(ImageTooLargeError, match="size"):
        processor.max_pixels = 1000  # 32x32 output alone is over it
    assert processor.image_std == (0.5, 0.5, 0.5) and processor.max_pixels == DEFAULT_MAX_PIXELS


def test_config_file_with_absurd_settings_names_the_file(tmp_path):
    (tmp_path / PREPROCESSOR_CONFIG_NAME).write_text(json.dumps({"size": {"shortest_edge": 224}, "crop_pct": 0.004}))
    with pytest.raises(ImageTooLargeError, match=PREPROCESSOR_CONFIG_NAME):
        ConvNextImageProcessor.from_pretrained(tmp_path)
    (tmp_path / PREPROCESSOR_CONFIG_NAME).write_text(json.dumps({"image_std": [0, 0, 0]}))
    with pytest.raises(ValueError, match=f"{PREPROCESSOR_CONFIG_NAME}.*image_std"):
        ConvNextImageProcessor.from_pretrained(tmp_path)


def test_weights_only_directory_points_to_for_imagenet(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"ConvNextImageProcessor\.for_imagenet\(\)"):
        ConvNextImageProcessor.from_pretrained(tmp_path)


# ---- transformers parity: EXIF, list outputs, to_json_file -----------------------------------------------


def exif_rotated_jpeg(path, orientation):
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    random_rgb(90, 150, seed=3).save(path, "JPEG", quality=95, exif=exif)


@pytest.mark.parametrize("orientation", [3, 6, 8])  # 180 degrees, 90 clockwise, 90 counter-clockwise
def test_exif_orientation_applied_as_transformers_load_image(tmp_path, orientation):
    path = tmp_path / f"rotated{orientation}.jpg"
    exif_rotated_jpeg(path, orientation)
    settings = {"size": {"shortest_edge": 64}}
    expected = ConvNextImageProcessorPil(**settings)(transformers_load_image(str(path)), return_tensors="pt")
    got = ConvNextImageProcessor(**settings)(str(path), return_tensors="pt")
    torch.testing.assert_close(got["pixel_values"], expected["pixel_values"], rtol=0, atol=1e-5)
    assert load_image(path).size == transformers_load_image(str(path)).size
    with Image.open(path) as raw:  # the tag matters: ignoring it gives other pixels
        unrotated = ConvNextImageProcessorPil(**settings)(raw.convert("RGB"), return_tensors="pt")["pixel_values"]
    assert (unrotated - expected["pixel_values"]).abs().max() > 0.5


def test_without_return_tensors_returns_a_list_as_transformers():
    images = [random_rgb(50, 60, seed=1), random_rgb(70, 40, seed=2)]
    expected = ConvNextImageProcessorPil(size=32)(images)["pixel_values"]
    got = ConvNextImageProcessor(size=32)(images)["pixel_values"]
    assert isinstance(expected, list) and isinstance(got, list) and len(got) == len(expected) == 2
    for ours, theirs in zip(got, expected):
        assert type(ours) is type(theirs) is np.ndarray and ours.dtype == theirs.dtype and ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    # Without resizing, images of different sizes stay a list, as in transformers.
    unresized = ConvNextImageProcessor(do_resize=False)(images)["pixel_values"]
    assert [a.shape for a in unresized] == [(3, 50, 60), (3, 70, 40)]


def test_to_json_file_is_read_by_transformers(tmp_path):
    processor = ConvNextImageProcessor(size=160, crop_pct=0.9, image_mean=[0.1, 0.2, 0.3], image_std=[0.3, 0.2, 0.1])
    path = tmp_path / "settings.json"
    assert processor.to_json_file(path) is None  # as transformers' to_json_file
    assert json.loads(path.read_text()) == processor.to_dict()
    theirs = ConvNextImageProcessorPil.from_json_file(str(path))
    image = random_rgb(100, 77, seed=4)
    torch.testing.assert_close(processor(image, return_tensors="pt")["pixel_values"],
                               theirs(image, return_tensors="pt")["pixel_values"], rtol=0, atol=1e-5)
    assert ConvNextImageProcessor.from_pretrained(path) == processor


# ---- icons, empty images, a preprocessor config linked from outside the model directory ---------------------


def _icon_with_embedded_png(declared, png):
    """An ICO file with one entry that declares `declared` (width, height bytes) and holds the PNG `png`."""
    entry = struct.pack("<BBBBHHII", declared[0], declared[1], 0, 0, 1, 32, len(png), 6 + 16)
    return struct.pack("<HHH", 0, 1, 1) + entry + png


@pytest.fixture
def no_png_decoding(monkeypatch):
    """Fail any PNG decode: the checks below must refuse an icon from its headers, before Pillow decodes it."""
    from PIL import PngImagePlugin

    def refuse(self, *args, **kwargs):
        raise AssertionError("a PNG was decoded before the size check")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", refuse)


def test_an_icon_whose_png_is_larger_than_declared_is_refused_before_decoding(tmp_path, no_png_decoding):
    path = tmp_path / "lying.ico"
    path.write_bytes(_icon_with_embedded_png((16, 16), png_bytes(Image.new("RGB", (400, 300)))))
    with pytest.raises(ImageTooLargeError, match=r"lying.ico \(icon entry 0\) is 400x300 = 120,000 pixels"):
        load_image(path, max_pixels=100_000)
    with pytest.raises(ImageTooLargeError, match="400x300"):
        ConvNextImageProcessor(size={"shortest_edge": 16})(str(path), max_pixels=100_000)


def test_an_icon_within_the_limit_matches_transformers(tmp_path):
    path = tmp_path / "small.ico"
    random_rgb(40, 40).save(path, format="ICO", sizes=[(40, 40)])
    ours = ConvNextImageProcessor(size={"shortest_edge": 32})(str(path), return_tensors="pt")["pixel_values"]
    theirs = ConvNextImageProcessorPil(size={"shortest_edge": 32})(
        transformers_load_image(str(path)), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(10, 0, 3), (0, 7, 3), (0, 0)])
def test_an_image_without_pixels_is_a_clear_error(shape):
    processor = ConvNextImageProcessor(size={"shortest_edge": 32})  # the crop_pct resize divides by the size
    with pytest.raises(ValueError, match=r"has no pixels; expected an image at least 1x1"):
        processor(np.zeros(shape, dtype=np.uint8), return_tensors="pt")
    with pytest.raises(ValueError, match=r"has no pixels"):
        ConvNextImageProcessor()(np.zeros(shape, dtype=np.uint8), return_tensors="pt")  # the warp resize


def test_a_preprocessor_config_linked_from_outside_the_model_directory_is_refused(tmp_path):
    outside = tmp_path / "elsewhere.json"
    outside.write_text(json.dumps({"size": {"shortest_edge": 64}}))
    model = tmp_path / "model"
    model.mkdir()
    (model / PREPROCESSOR_CONFIG_NAME).symlink_to(outside)
    with pytest.raises(PermissionError, match="outside the model directory"):
        ConvNextImageProcessor.from_pretrained(model)
    assert ConvNextImageProcessor.from_pretrained(outside).size == {"shortest_edge": 64}  # named directly: allowed


def test_a_fifo_as_the_preprocessor_config_is_refused_without_blocking(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    os.mkfifo(model / PREPROCESSOR_CONFIG_NAME)
    for where in (model, model / PREPROCESSOR_CONFIG_NAME):
        with pytest.raises(OSError, match="FIFO.*expected a regular file|expected a regular file"):
            ConvNextImageProcessor.from_pretrained(where)
