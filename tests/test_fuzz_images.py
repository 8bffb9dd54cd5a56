"""Fuzzing image files and preprocessor_config.json (hypothesis): mutated inputs end in a result or in one of
the documented error types (ValueError, TypeError, OSError subclasses), in bounded time, with finite output.

The case counts are fixed (800 image files, 600 configs) and the search is derandomised, so CI runs the
same cases every time (under 30 s in all on a 2-core machine); FASTCONVNEXT_FUZZ_EXAMPLES=N runs N random
cases per test instead.
"""
import io
import json
import math
import os
import time
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fastconvnext.image_processing import PREPROCESSOR_CONFIG_NAME, ConvNextImageProcessor

DOCUMENTED_ERRORS = (ValueError, TypeError, OSError)
# A hang detector, not a speed claim: one case decodes at most MAX_PIXELS pixels and takes milliseconds.
CASE_TIME_LIMIT_S = 60
MAX_PIXELS = 1 << 20
OUTPUT_EDGE = 32
EXAMPLES = int(os.environ.get("FASTCONVNEXT_FUZZ_EXAMPLES", "0"))
IMAGE_CASES, CONFIG_CASES = 800, 600  # about 10 s each on a loaded 2-core machine


def fuzz_settings(default_examples):
    return settings(
        max_examples=EXAMPLES or default_examples,
        derandomize=not EXAMPLES,
        deadline=None,  # per-case time is checked below with a generous limit, never against a tight deadline
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def encoded(image, fmt, **options):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def seed_files():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 17, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees
    return {
        "rgb.png": encoded(rgb, "PNG"),
        "palette.png": encoded(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8), "PNG", transparency=0),
        "gray16.png": encoded(Image.fromarray(rng.integers(0, 65536, (9, 11), dtype=np.uint16)), "PNG"),
        "rgba.png": encoded(rgb.convert("RGBA"), "PNG"),
        "photo.jpg": encoded(rgb, "JPEG", quality=80, exif=exif),
        "gray.jpg": encoded(rgb.convert("L"), "JPEG", progressive=True),
    }


SEEDS = seed_files()


@st.composite
def mutated_bytes(draw, seeds):
    name = draw(st.sampled_from(sorted(seeds)))
    data = bytearray(seeds[name])
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "int32"]))
        if kind == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[position:]
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[position : position + draw(st.integers(1, 16))]
        else:  # a header field (width, height, length) replaced by a big or boundary value
            value = draw(st.sampled_from([0, 1, 0x7FFFFFFF, 0xFFFFFFFF, 65535, 65536, 60000]))
            data[position : position + 4] = value.to_bytes(4, "big")
        if not data:
            break
    return name, bytes(data)


def assert_finite_output(output):
    pixels = output["pixel_values"]
    assert isinstance(pixels, list) and len(pixels) == 1
    assert pixels[0].dtype == np.float32 and pixels[0].shape == (3, OUTPUT_EDGE, OUTPUT_EDGE)
    assert np.isfinite(pixels[0]).all()


def run_case(action):
    """Run `action`; it may succeed or raise a documented error, within the time limit. Returns the outcome."""
    start = time.monotonic()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns about corrupt EXIF and the like
            action()
        outcome = "ok"
    except DOCUMENTED_ERRORS as error:
        assert str(error).strip(), f"{type(error).__name__} without a message"
        outcome = type(error).__name__
    elapsed = time.monotonic() - start
    assert elapsed < CASE_TIME_LIMIT_S, f"one case took {elapsed:.0f} s"
    return outcome


def test_fuzz_image_files(tmp_path):
    processor = ConvNextImageProcessor(size=OUTPUT_EDGE, max_pixels=MAX_PIXELS)
    outcomes = []

    @fuzz_settings(default_examples=IMAGE_CASES)
    @given(mutated_bytes(SEEDS))
    def check(case):
        name, data = case
        path = tmp_path / f"fuzz_{name}"
        path.write_bytes(data)

        def process():
            try:
                assert_finite_output(processor(str(path)))
            except DOCUMENTED_ERRORS as error:
                assert path.name in str(error), f"the error does not name the file: {error}"
                raise

        outcomes.append(run_case(process))

    check()
    print(f"\nimage fuzz: {len(outcomes)} cases, outcomes {sorted(set(outcomes))}")
    assert len(outcomes) >= (EXAMPLES or IMAGE_CASES) * 0.9
    assert "ok" in outcomes and len(set(outcomes)) > 1  # both decodable and broken files were produced


VALID_CONFIG = {
    "do_resize": True, "size": {"shortest_edge": OUTPUT_EDGE}, "crop_pct": 0.875, "resample": 3,
    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
    "image_processor_type": "ConvNextImageProcessor",
}
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=8,
)
SETTING_KEYS = sorted(VALID_CONFIG) + ["crop_size", "do_center_crop", "do_convert_rgb", "unknown_key"]


@st.composite
def mutated_configs(draw):
    """preprocessor_config.json text: valid settings with some values replaced, or the JSON text itself damaged."""
    config = dict(VALID_CONFIG)
    for key in draw(st.lists(st.sampled_from(SETTING_KEYS), min_size=1, max_size=3)):
        config[key] = draw(JSON_VALUES | st.sampled_from([0, -1, 0.004, 1e-320, 1e308, 2**40, [0, 0, 0]]))
    text = json.dumps(config)  # NaN and Infinity as Python's json writes them, as transformers does
    if draw(st.booleans()):
        return text
    position = draw(st.integers(0, len(text)))
    return text[:position] + draw(st.text(max_size=4)) + text[position + draw(st.integers(0, 4)) :]


def test_fuzz_preprocessor_config(tmp_path):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 29, 3), dtype=np.uint8))
    outcomes = []

    @fuzz_settings(default_examples=CONFIG_CASES)
    @given(mutated_configs())
    def check(text):
        (tmp_path / PREPROCESSOR_CONFIG_NAME).write_text(text, encoding="utf-8", errors="surrogatepass")

        def load_and_run():
            processor = ConvNextImageProcessor.from_pretrained(tmp_path, max_pixels=MAX_PIXELS)
            output = processor(image, return_tensors="np")["pixel_values"]
            assert output.dtype == np.float32 and output.ndim == 4 and output.shape[:2] == (1, 3)
            assert np.isfinite(output).all(), f"non-finite output for {text}"
            assert math.prod(output.shape) <= 3 * MAX_PIXELS

        outcomes.append(run_case(load_and_run))

    check()
    print(f"\nconfig fuzz: {len(outcomes)} cases, outcomes {sorted(set(outcomes))}")
    assert len(outcomes) >= (EXAMPLES or CONFIG_CASES) * 0.9
    assert "ok" in outcomes and len(set(outcomes)) > 1


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_fuzz_seeds_are_valid_images(tmp_path, name):
    """The unmutated seeds decode: the fuzz starts from files that work."""
    path = tmp_path / name
    path.write_bytes(SEEDS[name])
    assert_finite_output(ConvNextImageProcessor(size=OUTPUT_EDGE)(str(path)))
