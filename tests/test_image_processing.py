"""fastconvnext.ConvNextImageProcessor against transformers' PIL-backend ConvNeXt processor (the oracle)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers.models.convnext.image_processing_pil_convnext import ConvNextImageProcessorPil

from helpers import transformers_composites_alpha_on_white
from fastconvnext.image_processing import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    PREPROCESSOR_CONFIG_NAME,
    ConvNextImageProcessor,
)

ODD_SIZES = [(37, 53), (300, 201), (513, 383)]  # (height, width)

SETTINGS = {
    "default": {},
    "shortest_edge_384_warp": {"size": {"shortest_edge": 384}},
    "shortest_edge_500_warp": {"size": {"shortest_edge": 500}},
    "shortest_edge_224_crop": {"size": {"shortest_edge": 224}},
    "crop_pct_0.95": {"size": {"shortest_edge": 224}, "crop_pct": 0.95},
    "crop_pct_1.3_pads": {"size": 160, "crop_pct": 1.3},
    "no_normalize": {"size": {"shortest_edge": 224}, "do_normalize": False},
    "no_rescale": {"size": {"shortest_edge": 96}, "do_rescale": False},
    "custom_mean_std": {"size": {"shortest_edge": 128}, "image_mean": [0.1, 0.7, 0.3], "image_std": [0.2, 0.35, 0.9]},
    "imagenet_stats_bilinear": {
        "size": {"shortest_edge": 224}, "image_mean": list(IMAGENET_DEFAULT_MEAN),
        "image_std": list(IMAGENET_DEFAULT_STD), "resample": Image.Resampling.BILINEAR,
    },
    "no_resize_extra_center_crop": {
        "do_resize": False, "do_center_crop": True, "crop_size": {"height": 31, "width": 45},
    },
}


def random_rgb(height, width, seed=0):
    rng = np.random.default_rng(seed + 7 * height + width)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def reference(images, **kwargs):
    return ConvNextImageProcessorPil(**kwargs)(images, return_tensors="pt")["pixel_values"]


def ours(images, **kwargs):
    return ConvNextImageProcessor(**kwargs)(images, return_tensors="pt")["pixel_values"]


def assert_close(actual, expected):
    assert actual.dtype == torch.float32
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected.to(torch.float32), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", SETTINGS)
def test_matches_transformers_on_odd_sized_rgb_batch(name):
    kwargs = SETTINGS[name]
    images = [random_rgb(h, w) for h, w in ODD_SIZES]
    assert_close(ours(images, **kwargs), reference(images, **kwargs))


def test_output_sizes_follow_convnext_rule():
    image = random_rgb(300, 201)
    assert ours(image, size=224).shape == (1, 3, 224, 224)
    assert ours(image).shape == (1, 3, 384, 384)  # transformers' default shortest edge is 384 (warp)
    assert ours(image, size=400).shape == (1, 3, 400, 400)


def test_for_imagenet_matches_hub_convnext_224_settings():
    image = random_rgb(300, 201)
    hub_settings = {"size": {"shortest_edge": 224}, "crop_pct": 0.875, "resample": 3,
                    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    processor = ConvNextImageProcessor.for_imagenet()
    assert_close(processor(image, return_tensors="pt")["pixel_values"], reference(image, **hub_settings))


def test_defaults_serialize_like_transformers():
    assert ConvNextImageProcessor().to_dict() == json.loads(ConvNextImageProcessorPil().to_json_string())


# ---- image modes ----------------------------------------------------------------------------------------


def rgba_image():
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (61, 47, 4), dtype=np.uint8))


def paletted_with_transparency():
    image = rgba_image().convert("RGB").convert("P")
    image.info["transparency"] = 5
    return image


MODE_IMAGES = {
    "RGBA": rgba_image,
    "LA": lambda: rgba_image().convert("LA"),
    "L": lambda: rgba_image().convert("L"),
    "P": lambda: rgba_image().convert("RGB").convert("P"),
    "P_transparent": paletted_with_transparency,
    "CMYK": lambda: rgba_image().convert("RGB").convert("CMYK"),
    "1": lambda: rgba_image().convert("1"),
}


MODE_IMAGES["PA"] = lambda: paletted_with_transparency().convert("PA")
TRANSPARENT_MODES = ("RGBA", "LA", "PA", "P_transparent")


@pytest.mark.parametrize("mode", MODE_IMAGES)
def test_non_rgb_modes_match_transformers_rgb_conversion(mode):
    # transformers fails on these without do_convert_rgb; with it, it converts (alpha onto white) like we do.
    image = MODE_IMAGES[mode]()
    if mode in TRANSPARENT_MODES and not transformers_composites_alpha_on_white():
        pytest.skip(f"transformers {transformers.__version__}'s convert_to_rgb drops alpha; fastconvnext "
                    "composites in-memory images onto white as newer transformers do")
    got = ours(image, size=224)
    assert got.shape == (1, 3, 224, 224)
    assert_close(got, reference(image, size=224, do_convert_rgb=True))


def transparent_files(directory):
    """Image files whose transparency changes the pixels when composited: {name: path}."""
    rng = np.random.default_rng(11)
    rgba = Image.fromarray(rng.integers(0, 256, (53, 67, 4), dtype=np.uint8))
    indexed = rgba.convert("RGB").quantize(colors=16)
    palette_alpha = bytes(rng.integers(0, 256, 16, dtype=np.uint8))
    files = {
        "rgba.png": (rgba, {}),
        "la.png": (rgba.convert("LA"), {}),
        "p_one_transparent_index.png": (indexed, {"transparency": int(np.asarray(indexed)[0, 0])}),
        "p_alpha_table.png": (indexed, {"transparency": palette_alpha}),
        "p_transparent.gif": (indexed, {"transparency": int(np.asarray(indexed)[0, 0])}),
        "rgba.webp": (rgba, {"lossless": True}),
        "rgba.tiff": (rgba, {}),
    }
    paths = {}
    for name, (image, options) in files.items():
        paths[name] = directory / name
        image.save(paths[name], **options)
    return paths


@pytest.fixture(scope="module")
def transparent_paths(tmp_path_factory):
    return transparent_files(tmp_path_factory.mktemp("transparent"))


@pytest.mark.parametrize("name", ["rgba.png", "la.png", "p_one_transparent_index.png", "p_alpha_table.png",
                                  "p_transparent.gif", "rgba.webp", "rgba.tiff"])
@pytest.mark.filterwarnings("ignore:Palette images with Transparency")
def test_transparent_files_give_transformers_pixels(transparent_paths, name):
    """transformers reads a file with `load_image`, whose convert("RGB") drops the alpha: the same pixels by
    default, through a path given to the processor and through transformers' own path handling."""
    from transformers.image_utils import load_image as transformers_load_image

    path = transparent_paths[name]
    with Image.open(path) as opened:
        opened.load()
        composited = Image.alpha_composite(Image.new("RGBA", opened.size, (255,) * 4), opened.convert("RGBA"))
        dropped = opened.convert("RGB")
    assert np.asarray(composited.convert("RGB")).tolist() != np.asarray(dropped).tolist(), "alpha matters here"
    expected = reference(transformers_load_image(str(path)), size=64)
    assert_close(ours(str(path), size=64), expected)
    assert_close(ours(path, size=64), expected)
    assert_close(ours(str(path), size=64), reference(str(path), size=64))


@pytest.mark.parametrize("name", ["rgba.png", "la.png", "p_alpha_table.png", "p_transparent.gif"])
@pytest.mark.filterwarnings("ignore:Palette images with Transparency")
def test_composite_files_on_white_is_an_opt_in(transparent_paths, name, tmp_path):
    """With composite_files_on_white=True a file gives the pixels of the same image in memory (alpha onto white,
    as transformers' convert_to_rgb); the option is never saved and survives per-call overrides."""
    path = transparent_paths[name]
    with Image.open(path) as opened:
        image = opened.copy()
    in_memory = ours(image, size=64)
    processor = ConvNextImageProcessor(size=64, composite_files_on_white=True)
    on_white = processor(str(path), return_tensors="pt")["pixel_values"]
    assert_close(on_white, in_memory)
    assert not torch.equal(on_white, ours(str(path), size=64))
    assert_close(ConvNextImageProcessor(size=64)(str(path), return_tensors="pt", composite_files_on_white=True)
                 ["pixel_values"], in_memory)
    assert_close(processor(str(path), return_tensors="pt", do_normalize=False)["pixel_values"],
                 ours(image, size=64, do_normalize=False))
    processor.save_pretrained(tmp_path)
    assert "composite_files_on_white" not in json.loads((tmp_path / PREPROCESSOR_CONFIG_NAME).read_text())
    if transformers_composites_alpha_on_white():
        assert_close(on_white, reference(image, size=64, do_convert_rgb=True))


def test_composite_files_on_white_must_be_a_flag():
    with pytest.raises(TypeError, match="composite_files_on_white must be true or false, got str 'yes'"):
        ConvNextImageProcessor(composite_files_on_white="yes")
    processor = ConvNextImageProcessor()
    with pytest.raises(TypeError, match="composite_files_on_white must be true or false"):
        processor.composite_files_on_white = 2
    assert processor.composite_files_on_white is False


def sixteen_bit_values():
    rng = np.random.default_rng(4)
    values = rng.integers(0, 65536, (45, 70), dtype=np.uint16)
    values[0, :4] = [0, 128, 65535, 385]  # 128/257 rounds to 0, 385/257 rounds to 1
    return values


def rgb_from_gray(gray_uint8):
    return Image.fromarray(np.repeat(gray_uint8[..., None], 3, axis=-1))


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_sixteen_bit_images_are_scaled_by_1_over_257(mode):
    values = sixteen_bit_values()
    width_height = values.shape[::-1]
    image = {
        "I;16": lambda: Image.fromarray(values),
        "I;16B": lambda: Image.frombytes("I;16B", width_height, values.astype(">u2").tobytes()),
        "I": lambda: Image.fromarray(values.astype(np.int32)),
    }[mode]()
    assert image.mode == mode
    expected_gray = np.floor(values.astype(np.float64) / 257 + 0.5).astype(np.uint8)
    got = ours(image, size=224)
    assert got.shape == (1, 3, 224, 224)
    assert_close(got, reference(rgb_from_gray(expected_gray), size=224))


def test_uint16_array_is_scaled_like_i16_image():
    values = sixteen_bit_values()
    assert_close(ours(values, size=96), ours(Image.fromarray(values), size=96))


def test_float_mode_is_clipped_and_rounded_to_8_bit():
    values = np.array([[-4.0, 0.4, 0.5, 0.6, 254.6, 300.0, np.nan, 77.49] * 5] * 20, dtype=np.float32)
    expected_gray = np.array([[0, 0, 1, 1, 255, 255, 0, 77] * 5] * 20, dtype=np.uint8)
    assert_close(ours(Image.fromarray(values), size=32), reference(rgb_from_gray(expected_gray), size=32))


# ---- input types ----------------------------------------------------------------------------------------


def test_numpy_and_torch_inputs_match_pil():
    image = random_rgb(53, 37)
    hwc = np.array(image)
    processor = ConvNextImageProcessor(size=64)
    expected = processor(image, return_tensors="pt").pixel_values
    assert_close(processor(hwc, return_tensors="pt").pixel_values, expected)
    chw_tensor = torch.from_numpy(hwc).permute(2, 0, 1)
    assert_close(processor(chw_tensor, return_tensors="pt").pixel_values, expected)
    hwc_tensor = torch.from_numpy(hwc)
    assert_close(processor(hwc_tensor, input_data_format="channels_last", return_tensors="pt").pixel_values, expected)
    chw = hwc.transpose(2, 0, 1)
    assert_close(processor(chw, input_data_format="channels_first", return_tensors="pt").pixel_values, expected)


def test_numpy_hwc_matches_transformers():
    hwc = np.asarray(random_rgb(41, 59))
    assert_close(ours(hwc, size=64), reference(hwc, size=64))


def test_batches_lists_and_paths(tmp_path):
    images = [random_rgb(40, 50, seed=s) for s in range(3)]
    expected = ours(images, size=32)
    assert expected.shape == (3, 3, 32, 32)
    stacked = np.stack([np.asarray(im) for im in images])
    assert_close(ours(stacked, size=32), expected)  # 4-D array = batch
    assert_close(ours(torch.from_numpy(stacked).permute(0, 3, 1, 2), size=32), expected)
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"im{i}.png")
        image.save(paths[-1])
    assert_close(ours([str(paths[0]), paths[1], images[2]], size=32), expected)


def test_grayscale_and_bool_arrays():
    gray = np.asarray(random_rgb(30, 40).convert("L"))
    assert_close(ours(gray, size=32), reference(rgb_from_gray(gray), size=32))
    mask = gray > 127
    assert_close(ours(mask, size=32), reference(rgb_from_gray(mask.astype(np.uint8) * 255), size=32))


def test_return_types_and_batch_feature():
    image = random_rgb(40, 50)
    out = ConvNextImageProcessor(size=32)(image, return_tensors="pt")
    assert out.pixel_values is out["pixel_values"]
    assert out.to(torch.float16).pixel_values.dtype == torch.float16
    as_numpy = ConvNextImageProcessor(size=32)(image, return_tensors="np")["pixel_values"]
    assert isinstance(as_numpy, np.ndarray) and as_numpy.dtype == np.float32
    np.testing.assert_array_equal(as_numpy, out.pixel_values.numpy())
    listed = ConvNextImageProcessor(do_resize=False)([image, random_rgb(20, 10)], return_tensors=None)["pixel_values"]
    assert [a.shape for a in listed] == [(3, 40, 50), (3, 20, 10)]


def test_per_call_overrides_and_attribute_assignment():
    image = random_rgb(300, 201)
    processor = ConvNextImageProcessor()
    overridden = processor(image, size=224, crop_pct=0.95, return_tensors="pt")["pixel_values"]
    assert_close(overridden, reference(image, size=224, crop_pct=0.95))
    assert processor.size == {"shortest_edge": 384}  # the override did not stick
    processor.size = 224
    assert processor.size == {"shortest_edge": 224}
    assert_close(processor(image, return_tensors="pt")["pixel_values"], reference(image, size=224))
    with pytest.raises(ValueError, match="shortest_edge"):
        processor.size = {"height": 3, "width": 3}
    processor.size = None  # None means the default, as in transformers
    assert processor.size == {"shortest_edge": 384}
    assert ConvNextImageProcessor(do_resize=None, image_mean=None) == ConvNextImageProcessor()


# ---- save / load ----------------------------------------------------------------------------------------


CUSTOM = {"size": {"shortest_edge": 192}, "crop_pct": 0.9, "resample": 2,
          "image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6], "do_normalize": True}


def test_save_and_load_round_trip(tmp_path):
    processor = ConvNextImageProcessor(**CUSTOM)
    written_files = processor.save_pretrained(tmp_path / "new" / "dir")
    assert written_files == [str(tmp_path / "new" / "dir" / PREPROCESSOR_CONFIG_NAME)]  # a list, as transformers
    path = Path(written_files[0])
    written = json.loads(path.read_text())
    assert written["image_processor_type"] == "ConvNextImageProcessor"
    assert written["size"] == {"shortest_edge": 192} and written["resample"] == 2
    assert ConvNextImageProcessor.from_pretrained(path.parent) == processor
    assert ConvNextImageProcessor.from_pretrained(path) == processor  # the JSON file itself
    assert ConvNextImageProcessor.from_pretrained(path.parent, crop_pct=0.5).crop_pct == 0.5


def test_transformers_loads_our_config_with_identical_outputs(tmp_path):
    ConvNextImageProcessor(**CUSTOM).save_pretrained(tmp_path)
    try:
        theirs = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    except ImportError as error:  # older transformers pick the torchvision-backed processor
        if "orchvision" not in str(error):
            raise
        pytest.skip(f"transformers {transformers.__version__}'s AutoImageProcessor needs torchvision, not installed")
    assert type(theirs).__name__.startswith("ConvNextImageProcessor")
    images = [random_rgb(h, w) for h, w in ODD_SIZES]
    expected = theirs(images, return_tensors="pt")["pixel_values"]
    loaded = ConvNextImageProcessor.from_pretrained(tmp_path)
    assert_close(loaded(images, return_tensors="pt")["pixel_values"], expected)


def test_we_load_transformers_config_with_identical_outputs(tmp_path):
    theirs = ConvNextImageProcessorPil(**CUSTOM)
    theirs.save_pretrained(tmp_path)
    image = random_rgb(300, 201)
    loaded = ConvNextImageProcessor.from_pretrained(tmp_path)
    assert_close(loaded(image, return_tensors="pt")["pixel_values"], reference(image, **CUSTOM))


def test_legacy_hub_config_with_unknown_keys(tmp_path):
    legacy = {"crop_pct": 0.875, "do_normalize": True, "do_resize": True,
              "feature_extractor_type": "ConvNextFeatureExtractor", "image_mean": [0.485, 0.456, 0.406],
              "image_std": [0.229, 0.224, 0.225], "resample": 3, "size": 224, "some_future_key": {"x": 1}}
    (tmp_path / PREPROCESSOR_CONFIG_NAME).write_text(json.dumps(legacy))
    assert ConvNextImageProcessor.from_pretrained(tmp_path) == ConvNextImageProcessor.for_imagenet()


# ---- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (42, TypeError, "PIL.Image.Image, a numpy array"),
        ([], ValueError, "empty list"),
        (np.zeros((8, 8, 3), dtype=np.float32), TypeError, "float arrays are ambiguous"),
        (np.full((8, 8), 300, dtype=np.int32), ValueError, "0..255"),
        (np.zeros((8, 8, 5), dtype=np.uint8), ValueError, "channel axis"),
        (np.zeros((2, 2, 8, 8, 3), dtype=np.uint8), ValueError, "dimensions"),
        ("/no/such/image.png", FileNotFoundError, "not found"),
    ],
)
def test_clear_errors_for_non_images(bad, error, match):
    with pytest.raises(error, match=match):
        ConvNextImageProcessor()(bad)


def test_non_image_file_is_a_value_error(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        ConvNextImageProcessor()(str(text))
    with pytest.raises(ValueError, match="directory"):
        ConvNextImageProcessor()(tmp_path)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"sise": 224}, TypeError, "unknown ConvNextImageProcessor argument"),
        ({"size": {"height": 224, "width": 224}}, ValueError, "shortest_edge"),
        ({"size": -3}, ValueError, "positive"),
        ({"crop_pct": 0}, ValueError, "crop_pct"),
        ({"image_mean": [0.5, 0.5]}, ValueError, "3 entries"),
        ({"resample": 17}, ValueError, "resampling filter"),
        ({"do_center_crop": True}, ValueError, "crop_size"),
    ],
)
def test_clear_errors_for_bad_settings(kwargs, error, match):
    with pytest.raises(error, match=match):
        ConvNextImageProcessor(**kwargs)


def test_clear_errors_at_call_and_load_time(tmp_path):
    processor = ConvNextImageProcessor(do_resize=False)
    with pytest.raises(ValueError, match="different sizes"):
        processor([random_rgb(10, 12), random_rgb(12, 10)], return_tensors="pt")
    with pytest.raises(ValueError, match="return_tensors"):
        processor(random_rgb(10, 12), return_tensors="tf")
    with pytest.raises(FileNotFoundError, match=PREPROCESSOR_CONFIG_NAME):
        ConvNextImageProcessor.from_pretrained(tmp_path)
    (tmp_path / PREPROCESSOR_CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ConvNextImageProcessor.from_pretrained(tmp_path)


def test_a_failed_save_leaves_the_previous_preprocessor_config_whole(tmp_path, monkeypatch):
    """A write that dies half-way (disk full, ...) must not leave a truncated preprocessor_config.json."""
    import pathlib

    ConvNextImageProcessor(**CUSTOM).save_pretrained(tmp_path)
    before = (tmp_path / "preprocessor_config.json").read_bytes()
    real_write_text = pathlib.Path.write_text

    def half_then_fail(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        ConvNextImageProcessor().save_pretrained(tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "preprocessor_config.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preprocessor_config.json"], "no staged file left"
