"""The `fastconvnext` command, run in-process through `main(argv)`; transformers is the oracle."""
import io
import json
import os
import struct
import subprocess
import sys
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers.image_utils import load_image as transformers_load_image
from transformers.models.convnext.image_processing_pil_convnext import ConvNextImageProcessorPil

from fastconvnext import backend
from fastconvnext.cli import main
from fastconvnext.image_processing import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from tolerance import assert_within_rule, float64_twin

LABELS = {0: "cat", 1: "dog", 2: "bird"}
TINY = dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_labels=3, id2label=LABELS,
            label2id={v: k for k, v in LABELS.items()}, image_size=64)
PREPROCESSING = dict(size={"shortest_edge": 64}, image_mean=list(IMAGENET_DEFAULT_MEAN),
                     image_std=list(IMAGENET_DEFAULT_STD))


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(1)
    model = transformers.ConvNextForImageClassification(transformers.ConvNextConfig(**TINY)).eval()
    with torch.no_grad():  # a confident head, so the ranking is far from ties
        model.classifier.weight.normal_(0, 3.0)
        model.classifier.bias.copy_(torch.tensor([0.5, -0.5, 0.0]))
    return model


@pytest.fixture(scope="module")
def model_dir(hf_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf_model")
    hf_model.save_pretrained(directory)
    ConvNextImageProcessorPil(**PREPROCESSING).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    directory = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (height, width) in enumerate([(70, 93), (81, 64), (64, 101)]):
        path = directory / f"image{i}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(autouse=True)
def _restore_backend():
    previous = backend.get_backend()
    yield
    backend.set_backend(previous)


def run(capsys, *argv):
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


def transformers_top_k(hf_model, processor, image_paths, k):
    pixels = processor([Image.open(p).convert("RGB") for p in image_paths], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        probabilities = hf_model(pixels).logits.softmax(-1)
    return probabilities.topk(k, dim=-1)


# ---- classify -------------------------------------------------------------------------------------------


def test_classify_json_matches_transformers(capsys, hf_model, model_dir, images):
    code, out, err = run(capsys, "classify", "--model", model_dir, *images, "--top-k", 2, "--batch-size", 2,
                         "--device", "cpu", "--json")
    assert code == 0, err
    results = json.loads(out)
    values, indices = transformers_top_k(hf_model, ConvNextImageProcessorPil.from_pretrained(model_dir), images, 2)
    assert [r["image"] for r in results] == [str(p) for p in images]
    for result, probs, ids in zip(results, values.tolist(), indices.tolist()):
        assert [p["label"] for p in result["predictions"]] == [LABELS[i] for i in ids]
        assert [p["index"] for p in result["predictions"]] == ids
        np.testing.assert_allclose([p["probability"] for p in result["predictions"]], probs, rtol=0, atol=1e-5)
    assert len({r["predictions"][0]["label"] for r in results}) > 1, "the images should not all get one label"


def test_classify_text_output(capsys, hf_model, model_dir, images):
    code, out, err = run(capsys, "classify", "-m", model_dir, images[0], "-k", 10)
    assert code == 0, err
    values, indices = transformers_top_k(hf_model, ConvNextImageProcessorPil.from_pretrained(model_dir), images[:1], 3)
    lines = out.splitlines()
    assert lines[0] == str(images[0])
    assert len(lines) == 4  # top-k is capped at num_labels = 3
    for rank, (line, prob, index) in enumerate(zip(lines[1:], values[0].tolist(), indices[0].tolist()), start=1):
        assert line == f"  {rank}. {prob:.4f}  {LABELS[index]}"


def test_classify_checkpoint_file_uses_imagenet_defaults(capsys, hf_model, images, tmp_path):
    checkpoint = tmp_path / "tiny.pth"
    torch.save(hf_model.state_dict(), checkpoint)
    code, out, err = run(capsys, "classify", "--model", checkpoint, images[1], "--json", "--backend", "eager")
    assert code == 0, err
    # No config.json: labels fall back to LABEL_i, preprocessing to the ImageNet eval settings at 224.
    defaults = ConvNextImageProcessorPil(size={"shortest_edge": 224}, crop_pct=224 / 256, resample=3,
                                         image_mean=list(IMAGENET_DEFAULT_MEAN), image_std=list(IMAGENET_DEFAULT_STD))
    values, indices = transformers_top_k(hf_model, defaults, images[1:2], 3)
    predictions = json.loads(out)[0]["predictions"]
    assert "note:" in err and "ConvNextImageProcessor.for_imagenet(image_size=224)" in err  # the fallback says so
    assert [p["label"] for p in predictions] == [f"LABEL_{i}" for i in indices[0].tolist()]
    np.testing.assert_allclose([p["probability"] for p in predictions], values[0].tolist(), rtol=0, atol=1e-5)


def test_classify_multi_label_model_reports_sigmoid_scores(capsys, hf_model, images, tmp_path):
    hf_model.config.problem_type = "multi_label_classification"
    try:
        hf_model.save_pretrained(tmp_path)
    finally:
        hf_model.config.problem_type = None
    code, out, err = run(capsys, "classify", "--model", tmp_path, images[2], "--json")
    assert code == 0, err
    # No preprocessor_config.json in this directory: ImageNet eval settings at config.image_size (64).
    defaults = ConvNextImageProcessorPil(size={"shortest_edge": 64}, crop_pct=224 / 256, resample=3,
                                         image_mean=list(IMAGENET_DEFAULT_MEAN), image_std=list(IMAGENET_DEFAULT_STD))
    pixels = defaults(Image.open(images[2]).convert("RGB"), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        scores = hf_model(pixels).logits.sigmoid()[0]
    predictions = json.loads(out)[0]["predictions"]
    expected = scores.sort(descending=True)
    assert [p["index"] for p in predictions] == expected.indices.tolist()
    np.testing.assert_allclose([p["probability"] for p in predictions], expected.values.tolist(), rtol=0, atol=1e-5)


HEADS = {  # name: (num_labels, problem_type, the pipeline's function_to_apply)
    "one logit": (1, None, "sigmoid"),
    "regression, one output": (1, "regression", "none"),
    "regression, three outputs": (3, "regression", "none"),
    "multi-label": (3, "multi_label_classification", "sigmoid"),
    "single-label": (3, "single_label_classification", "softmax"),
}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("head", sorted(HEADS))
def test_classify_scores_as_transformers_image_classification_pipeline(capsys, head, images, tmp_path):
    """The oracle is transformers' ImageClassificationPipeline with its default function_to_apply: sigmoid for a
    one-logit or multi-label head, softmax for single-label, raw scores (not probabilities) for regression."""
    num_labels, problem_type, function = HEADS[head]
    labels = {i: LABELS[i] for i in range(num_labels)}
    torch.manual_seed(2)
    model = transformers.ConvNextForImageClassification(transformers.ConvNextConfig(**dict(
        TINY, num_labels=num_labels, id2label=labels, label2id={v: k for k, v in labels.items()},
        problem_type=problem_type))).eval()
    with torch.no_grad():
        model.classifier.weight.normal_(0, 3.0)
    model.save_pretrained(tmp_path)
    processor = ConvNextImageProcessorPil(**PREPROCESSING)
    processor.save_pretrained(tmp_path)
    pipe = transformers.pipeline("image-classification", model=model, image_processor=processor, device="cpu")
    if function == "none" and not _pipeline_gives_raw_regression_scores(pipe, processor, images[0], model):
        pytest.skip(f"transformers {transformers.__version__}'s pipeline squashes regression outputs; fastconvnext "
                    "follows newer transformers (raw scores)")
    capsys.readouterr()
    code, out, err = run(capsys, "classify", "--model", tmp_path, *images, "--json", "--top-k", 2)
    assert code == 0, err
    key = "score" if function == "none" else "probability"
    results = json.loads(out)
    for image, result in zip(images, results):
        expected = pipe(str(image), top_k=2)
        assert [p["label"] for p in result["predictions"]] == [e["label"] for e in expected]
        assert all(set(p) == {"label", "index", key} for p in result["predictions"])
        reference = float64_pipeline_scores(model, processor, image, function)
        assert_within_rule(torch.tensor([p[key] for p in result["predictions"]]),
                           torch.tensor([e["score"] for e in expected]),
                           reference[[p["index"] for p in result["predictions"]]], torch.float32, f"{key} of {image}")
    if function == "none":
        assert "raw scores (logits), not probabilities" in err
    code, out, err = run(capsys, "classify", "--model", tmp_path, images[0], "--top-k", 1)
    assert code == 0, err
    top = results[0]["predictions"][0]
    value = f"score {top[key]:.4f}" if function == "none" else f"{top[key]:.4f}"
    assert out.splitlines()[1] == f"  1. {value}  {top['label']}"


def float64_pipeline_scores(model, processor, image, function):
    """R of the tolerance rule: the pipeline's scores from transformers' float64 twin on the pipeline's pixels."""
    pixels = processor(transformers_load_image(str(image)), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = float64_twin(model)(pixels.double()).logits[0]
    return {"sigmoid": logits.sigmoid(), "softmax": logits.softmax(-1), "none": logits}[function]


def _pipeline_gives_raw_regression_scores(pipe, processor, image, model):
    """Whether the installed pipeline reports a regression head's raw outputs (newer transformers) or squashes them."""
    with torch.no_grad():
        logits = model(processor(Image.open(image).convert("RGB"), return_tensors="pt")["pixel_values"]).logits[0]
    return abs(pipe(str(image), top_k=1)[0]["score"] - logits.max().item()) < 1e-4


def test_device_cuda_without_cuda_is_an_error(capsys, model_dir, images, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = run(capsys, "classify", "--model", model_dir, images[0], "--device", "cuda")
    assert code == 1
    assert_one_line_error(err, "no CUDA device")


# ---- convert --------------------------------------------------------------------------------------------


def test_convert_directory_loads_in_transformers_with_identical_logits(capsys, hf_model, model_dir, tmp_path):
    out_dir = tmp_path / "converted"
    code, out, err = run(capsys, "convert", model_dir, out_dir)
    assert code == 0, err
    assert "ConvNextForImageClassification" in out
    reloaded = transformers.ConvNextForImageClassification.from_pretrained(out_dir).eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels).logits, hf_model(pixels).logits, rtol=0, atol=0)
    assert reloaded.config.id2label == LABELS
    # The source's preprocessing is carried over and transformers reads it.
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(out_dir)
    except ImportError as error:  # older transformers pick the torchvision-backed processor
        if "orchvision" not in str(error):
            raise
        processor = ConvNextImageProcessorPil.from_pretrained(out_dir)
    assert processor.size["shortest_edge"] == 64 and list(processor.image_mean) == list(IMAGENET_DEFAULT_MEAN)


def test_convert_headless_checkpoint_file(capsys, hf_model, tmp_path):
    trunk = {k[len("convnext."):]: v for k, v in hf_model.state_dict().items() if k.startswith("convnext.")}
    checkpoint = tmp_path / "trunk.pth"
    torch.save({"model": trunk}, checkpoint)
    out_dir = tmp_path / "trunk_dir"
    code, out, err = run(capsys, "convert", checkpoint, out_dir, "--dtype", "fp16")
    assert code == 0, err
    reloaded = transformers.ConvNextModel.from_pretrained(out_dir).eval()
    assert reloaded.dtype == torch.float16
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = hf_model.convnext(pixels).pooler_output
        got = reloaded.float()(pixels).pooler_output
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-2)  # weights rounded to fp16
    written = json.loads((out_dir / "preprocessor_config.json").read_text())
    assert written["size"] == {"shortest_edge": 224} and written["image_processor_type"] == "ConvNextImageProcessor"


# ---- info, help -----------------------------------------------------------------------------------------


def test_info_reports_versions_devices_and_backend(capsys):
    code, out, err = run(capsys, "info")
    assert code == 0, err
    assert f"torch         {torch.__version__}" in out
    assert f"transformers  {transformers.__version__}" in out
    assert f"cuda available    {torch.cuda.is_available()}" in out
    for op in backend.describe():
        assert op in out
    previous = backend.get_backend()
    code, out, err = run(capsys, "info", "--json", "--backend", "eager")
    report = json.loads(out)
    assert backend.get_backend() == previous  # --backend holds for the one command only
    assert report["backend"]["setting"] == "eager"
    assert report["backend"]["convnext_mlp [cuda]"].startswith("eager")
    assert report["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))


def test_help_lists_commands_and_examples(capsys):
    code, out, err = run(capsys, "--help")
    assert code == 0
    for text in ("classify", "convert", "info", "bench", "examples:", "FASTCONVNEXT_BACKEND"):
        assert text in out
    code, out, err = run(capsys, "classify", "--help")
    assert code == 0 and "--top-k" in out and "preprocessor_config.json" in out


def test_bench_help_parses_without_error(capsys):
    code, out, err = run(capsys, "bench", "--help")
    assert code == 0, err
    assert out.startswith("usage: fastconvnext bench")


def test_loader_report_keeps_its_lines_under_the_error(capsys, hf_model, images, tmp_path):
    state_dict = dict(hf_model.state_dict())
    del state_dict["convnext.encoder.stages.1.layers.0.pwconv1.weight"]
    torch.save(state_dict, tmp_path / "incomplete.pth")
    code, out, err = run(capsys, "classify", "--model", tmp_path / "incomplete.pth", images[0])
    assert code == 1
    lines = err.splitlines()
    assert lines[0].startswith("fastconvnext: error: checkpoint") and "does not match" in lines[0]
    assert any("encoder.stages.1.layers.0.pwconv1.weight" in line for line in lines[1:])
    assert all(line.startswith("  ") for line in lines[1:])


def test_installed_console_script_help():
    script = Path(sys.executable).parent / "fastconvnext"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: fastconvnext")
    assert "classify" in result.stdout and "convert" in result.stdout


# ---- errors ---------------------------------------------------------------------------------------------


def assert_one_line_error(err, *fragments):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fastconvnext: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_missing_model_path(capsys, images, tmp_path):
    code, out, err = run(capsys, "classify", "--model", tmp_path / "nowhere", images[0])
    assert code == 1
    assert_one_line_error(err, "nowhere")


def test_missing_image(capsys, model_dir, tmp_path):
    code, out, err = run(capsys, "classify", "--model", model_dir, tmp_path / "missing.png")
    assert code == 1
    assert_one_line_error(err, "image not found", "missing.png")


def test_non_image_file(capsys, model_dir, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    code, out, err = run(capsys, "classify", "--model", model_dir, text)
    assert code == 1
    assert_one_line_error(err, "not a readable image file", "notes.jpg")


def test_unsupported_checkpoint_file(capsys, images, tmp_path):
    checkpoint = tmp_path / "weights.txt"
    checkpoint.write_text("not weights")
    for argv in (["classify", "--model", checkpoint, images[0]], ["convert", checkpoint, tmp_path / "out"]):
        code, out, err = run(capsys, *argv)
        assert code == 1
        assert_one_line_error(err, "unsupported checkpoint file", "weights.txt")


def test_classify_needs_a_classifier_head(capsys, hf_model, images, tmp_path):
    hf_model.convnext.save_pretrained(tmp_path / "trunk")
    capsys.readouterr()  # transformers' progress bar
    code, out, err = run(capsys, "classify", "--model", tmp_path / "trunk", images[0])
    assert code == 1
    assert_one_line_error(err, "no classification head", "ConvNextModel")


@pytest.mark.parametrize("argv", [
    [],
    ["classify", "img.png"],  # --model missing
    ["classify", "--model", "m", "img.png", "--top-k", "0"],
    ["classify", "--model", "m", "img.png", "--dtype", "fp8"],
    ["convert", "only_source"],
    ["frobnicate"],
])
def test_usage_errors_exit_2(capsys, argv):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert "usage: fastconvnext" in err and "error:" in err


# ---- hostile input ----------------------------------------------------------------------------------------

# Unicode categories a terminal may act on: controls (C0, DEL, C1 such as CSI \x9b), bidi/format characters.
TERMINAL_ACTIVE = ("Cc", "Cf", "Zl", "Zp")
HOSTILE_LABELS = {0: "cat\x1b]0;pwned\x07", 1: "\x1b[2J\x1b[Hdog", 2: "bird\u202etxt.exe\x9b31m\r"}


def assert_terminal_safe(text):
    active = [char for line in text.splitlines() for char in line if unicodedata.category(char) in TERMINAL_ACTIVE]
    assert not active, f"raw control/format characters reach the terminal: {active!r}"


def test_classify_escapes_labels_and_paths(capsys, hf_model, tmp_path):
    model_dir = tmp_path / "hostile_labels"
    hf_model.save_pretrained(model_dir)
    capsys.readouterr()  # transformers' progress bar
    config = json.loads((model_dir / "config.json").read_text())
    config["id2label"] = {str(k): v for k, v in HOSTILE_LABELS.items()}
    config["label2id"] = {v: k for k, v in HOSTILE_LABELS.items()}
    (model_dir / "config.json").write_text(json.dumps(config))
    image = tmp_path / "photo\x1b[31m\u202e.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)
    code, out, err = run(capsys, "classify", "--model", model_dir, image, "--top-k", 3)
    assert code == 0, err
    assert_terminal_safe(out)
    assert_terminal_safe(err)
    assert out.splitlines()[0] == str(image).replace("\x1b", "\\x1b").replace("\u202e", "\\u202e")
    assert "cat\\x1b]0;pwned\\x07" in out and "\\x1b[2J\\x1b[Hdog" in out and "bird\\u202etxt.exe\\x9b31m\\x0d" in out
    code, out, err = run(capsys, "classify", "--model", model_dir, image, "--json")
    assert code == 0, err
    assert out.isascii()  # JSON escapes every control and non-ASCII character ...
    labels = {p["label"] for p in json.loads(out)[0]["predictions"]}
    assert labels == set(HOSTILE_LABELS.values())  # ... and round-trips the labels exactly


def exif_rotated_jpeg(path, orientation=6):
    exif = Image.Exif()
    exif[0x0112] = orientation  # EXIF Orientation
    rng = np.random.default_rng(11)
    Image.fromarray(rng.integers(0, 256, (60, 110, 3), dtype=np.uint8)).save(path, "JPEG", quality=95, exif=exif)


def test_classify_applies_exif_orientation_as_transformers(capsys, hf_model, model_dir, tmp_path):
    path = tmp_path / "rotated.jpg"
    exif_rotated_jpeg(path)
    code, out, err = run(capsys, "classify", "--model", model_dir, path, "--json", "--top-k", 3)
    assert code == 0, err
    processor = ConvNextImageProcessorPil.from_pretrained(model_dir)
    with torch.no_grad():
        expected = hf_model(processor(transformers_load_image(str(path)), return_tensors="pt")["pixel_values"])
        ignoring_exif = hf_model(processor(Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"])
    expected, ignoring_exif = expected.logits.softmax(-1)[0], ignoring_exif.logits.softmax(-1)[0]
    predictions = json.loads(out)[0]["predictions"]
    got = [p["probability"] for p in sorted(predictions, key=lambda p: p["index"])]
    np.testing.assert_allclose(got, expected.tolist(), rtol=0, atol=1e-5)
    assert (expected - ignoring_exif).abs().max() > 1e-3  # the orientation changes the answer here


def with_declared_size(png, width, height):
    """The PNG with its IHDR width/height replaced (CRC fixed): a tiny decompression bomb."""
    ihdr = bytearray(png[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    return png[:16] + bytes(ihdr) + struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr))) + png[33:]


def test_decompression_bomb_is_one_error_line(capsys, model_dir, images, tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(with_declared_size(images[0].read_bytes(), 50_000, 50_000))
    code, out, err = run(capsys, "classify", "--model", model_dir, images[0], bomb)
    assert code == 1
    assert_one_line_error(err, "bomb.png", "2500000000 pixels", "decompression bomb", "limit is 178,956,970")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # without Pillow's check, ours speaks alone
    code, out, err = run(capsys, "classify", "--model", model_dir, images[0], bomb)
    assert code == 1
    assert_one_line_error(err, "bomb.png", "50000x50000", "limit of 178,956,970")


def jpeg_bytes(path):
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize("part", ["header", "data"])
def test_cut_jpeg_is_one_error_line_naming_it(capsys, model_dir, images, tmp_path, part):
    data = jpeg_bytes(images[0])
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[:40] if part == "header" else data[: len(data) // 2])
    code, out, err = run(capsys, "classify", "--model", model_dir, cut)
    assert code == 1
    assert_one_line_error(err, "cut.jpg")
    assert "Traceback" not in err


def test_tiny_tall_png_is_one_error_line_naming_it(capsys, model_dir, tmp_path):
    tall = tmp_path / "tall.png"
    Image.new("L", (1, 60000)).save(tall, optimize=True)  # a few hundred bytes; resized: 73 x 4,380,000
    code, out, err = run(capsys, "classify", "--model", model_dir, tall)
    assert code == 1
    assert_one_line_error(err, "tall.png resized", "limit of 178,956,970")


def test_fifo_image_is_one_error_line(capsys, model_dir, tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    code, out, err = run(capsys, "classify", "--model", model_dir, fifo)
    assert code == 1
    assert_one_line_error(err, "regular image file", "pipe.jpg")


def test_image_pixel_limit_from_environment(capsys, model_dir, images, monkeypatch):
    monkeypatch.setenv("FASTCONVNEXT_MAX_IMAGE_PIXELS", "1000")
    code, out, err = run(capsys, "classify", "--model", model_dir, images[0])
    assert code == 1
    assert_one_line_error(err, images[0].name, "limit of 1,000", "FASTCONVNEXT_MAX_IMAGE_PIXELS")


@pytest.mark.parametrize("setting", [{"image_std": [0.2, 0.0, 0.2]}, {"crop_pct": 0.004}])
def test_absurd_preprocessor_config_is_one_error_line(capsys, hf_model, images, tmp_path, setting):
    hf_model.save_pretrained(tmp_path)
    capsys.readouterr()  # transformers' progress bar
    config = {**PREPROCESSING, "image_processor_type": "ConvNextImageProcessor", **setting}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    code, out, err = run(capsys, "classify", "--model", tmp_path, images[0])
    assert code == 1
    assert_one_line_error(err, "preprocessor_config.json", next(iter(setting)))
    for weights in tmp_path.glob("model*.safetensors"):  # checked before the model is loaded
        weights.unlink()
    code, out, err = run(capsys, "classify", "--model", tmp_path, images[0])
    assert_one_line_error(err, "preprocessor_config.json", next(iter(setting)))


def test_broken_checkpoint_files_are_one_error_line(capsys, hf_model, images, tmp_path):
    full = tmp_path / "full.pth"
    torch.save(hf_model.state_dict(), full)
    (tmp_path / "cut.pth").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    for name in ("cut.pth", "garbage.safetensors"):
        code, out, err = run(capsys, "classify", "--model", tmp_path / name, images[0])
        assert code == 1
        assert_one_line_error(err, name)
    for argv in (["--traceback", "classify", "--model", tmp_path / name, images[0]],
                 ["classify", "--model", tmp_path / name, images[0], "--traceback"]):
        code, out, err = run(capsys, *argv)
        assert code == 1
        assert "Traceback (most recent call last)" in err and err.splitlines()[-1].startswith("fastconvnext: error:")


@pytest.mark.parametrize("raised", [
    AssertionError("Torch not compiled with CUDA enabled"),  # torch.load(map_location="cuda") on a CPU build
    EOFError("Ran out of input"),
])
def test_foreign_loader_errors_are_one_line_naming_the_model(capsys, model_dir, images, monkeypatch, raised):
    import fastconvnext.checkpoint

    def load_pretrained(*args, **kwargs):
        raise raised

    monkeypatch.setattr(fastconvnext.checkpoint, "load_pretrained", load_pretrained)
    for argv in (["classify", "--model", model_dir, images[0]], ["convert", model_dir, model_dir.parent / "out"]):
        code, out, err = run(capsys, *argv)
        assert code == 1
        assert_one_line_error(err, f"cannot load {model_dir}", type(raised).__name__, str(raised))


# ---- --ignore-mismatched-sizes ---------------------------------------------------------------------------


def test_ignore_mismatched_sizes_reinitializes_the_head(capsys, hf_model, images, tmp_path):
    five_labels = tmp_path / "five_labels"
    hf_model.save_pretrained(five_labels)
    capsys.readouterr()  # transformers' progress bar
    config = json.loads((five_labels / "config.json").read_text())
    config["id2label"] = {str(i): f"class{i}" for i in range(5)}
    config["label2id"] = {f"class{i}": i for i in range(5)}
    (five_labels / "config.json").write_text(json.dumps(config))
    code, out, err = run(capsys, "classify", "--model", five_labels, images[0])
    assert code == 1 and err.startswith("fastconvnext: error: ") and "--ignore-mismatched-sizes" in err
    code, out, err = run(capsys, "classify", "--model", five_labels, images[0], "--ignore-mismatched-sizes", "--json")
    assert code == 0, err
    assert err.startswith("fastconvnext: warning: ") and "newly initialized" in err and "classifier.weight" in err
    assert {p["label"] for p in json.loads(out)[0]["predictions"]} == {f"class{i}" for i in range(5)}
    converted = tmp_path / "converted"
    code, out, err = run(capsys, "convert", five_labels, converted, "--ignore-mismatched-sizes")
    assert code == 0, err
    # transformers, the oracle, loads the same checkpoint the same way: trunk kept, head re-initialized.
    theirs = transformers.ConvNextForImageClassification.from_pretrained(five_labels, ignore_mismatched_sizes=True)
    reloaded = transformers.ConvNextForImageClassification.from_pretrained(converted)
    assert reloaded.classifier.weight.shape == theirs.classifier.weight.shape == (5, 32)
    for name, tensor in hf_model.convnext.state_dict().items():
        torch.testing.assert_close(reloaded.convnext.state_dict()[name], tensor, rtol=0, atol=0)


# ---- answers without torch; a bad FASTCONVNEXT_BACKEND ---------------------------------------------------

PROBE = """
import json, sys
from fastconvnext.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "heavy": sorted(m for m in ("torch", "PIL", "triton") if m in sys.modules)}))
"""


def run_probe(*argv, **env):
    result = subprocess.run([sys.executable, "-c", PROBE, *map(str, argv)], capture_output=True, text=True,
                            timeout=300, env={**os.environ, **env})
    return json.loads(result.stdout.splitlines()[-1]), result.stderr


@pytest.mark.parametrize("argv, code", [
    (["--help"], 0),
    (["--version"], 0),
    (["classify", "--help"], 0),
    (["convert", "--help"], 0),
    ([], 2),
    (["classify", "img.png"], 2),
    (["classify", "--model", "m", "img.png", "--top-k", "zero"], 2),
    (["frobnicate"], 2),
])
def test_help_version_and_usage_errors_import_no_torch(argv, code):
    report, err = run_probe(*argv, FASTCONVNEXT_BACKEND="bogus")  # nor does a bad backend setting matter
    assert report == {"code": code, "heavy": []}, err
    assert "Traceback" not in err


def run_cli(*argv, **env):
    return subprocess.run([sys.executable, "-m", "fastconvnext.cli", *map(str, argv)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env})


def test_bad_backend_setting_is_one_error_line(model_dir, images):
    result = run_cli("classify", "--model", model_dir, images[0], "--device", "cpu", FASTCONVNEXT_BACKEND="bogus")
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "FASTCONVNEXT_BACKEND", "bogus")
    result = run_cli("info", FASTCONVNEXT_BACKEND="bogus")
    assert result.returncode == 1
    assert f"torch         {torch.__version__}" in result.stdout  # info still reports what it can
    assert "invalid" in result.stdout
    assert_one_line_error(result.stderr, "FASTCONVNEXT_BACKEND", "bogus")


# ---- image_size as a pair in config.json, and convert's output ---------------------------------------------


def _weights_only_dir(hf_model, tmp_path, image_size):
    directory = tmp_path / "weights_only"
    model = transformers.ConvNextForImageClassification(
        transformers.ConvNextConfig(**{**hf_model.config.to_dict(), "image_size": image_size}))
    model.load_state_dict(hf_model.state_dict())
    model.save_pretrained(directory)
    return directory


def test_a_square_image_size_pair_classifies_as_its_int(capsys, hf_model, images, tmp_path):
    as_pair = _weights_only_dir(hf_model, tmp_path / "pair", [64, 64])
    as_int = _weights_only_dir(hf_model, tmp_path / "int", 64)
    code, out_pair, err = run(capsys, "classify", "--model", as_pair, "--json", images[0])
    assert code == 0, err
    code, out_int, err = run(capsys, "classify", "--model", as_int, "--json", images[0])
    assert code == 0, err
    assert json.loads(out_pair) == json.loads(out_int)


def test_a_non_square_image_size_is_a_clear_error_and_convert_writes_nothing(capsys, hf_model, images, tmp_path):
    source = _weights_only_dir(hf_model, tmp_path, [64, 48])
    capsys.readouterr()  # transformers' save progress
    code, _, err = run(capsys, "classify", "--model", source, images[0])
    assert code == 1
    assert_one_line_error(err, "image_size [64, 48] is not square", "preprocessor_config.json")
    destination = tmp_path / "converted"
    code, _, err = run(capsys, "convert", source, destination)
    assert code == 1 and "is not square" in err
    assert not destination.exists()


def test_convert_prints_its_destination_escaped(capsys, model_dir, tmp_path):
    destination = tmp_path / "out\x1b[31mred"
    code, out, err = run(capsys, "convert", model_dir, destination)
    assert code == 0, err
    assert "\x1b" not in out and "out\\x1b[31mred" in out


# ---- ConvNeXt V2 and DINOv3-ConvNeXt --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def v2_model():
    torch.manual_seed(2)
    model = transformers.ConvNextV2ForImageClassification(transformers.ConvNextV2Config(**TINY)).eval()
    with torch.no_grad():  # a confident head and a GRN that matters
        model.classifier.weight.normal_(0, 3.0)
        for module in model.modules():
            if isinstance(module, transformers.models.convnextv2.modeling_convnextv2.ConvNextV2GRN):
                module.weight.normal_(0, 0.5)
                module.bias.normal_(0, 0.5)
    return model


def test_classify_a_convnext_v2_directory_matches_transformers(capsys, v2_model, images, tmp_path):
    v2_model.save_pretrained(tmp_path)
    ConvNextImageProcessorPil(**PREPROCESSING).save_pretrained(tmp_path)
    code, out, err = run(capsys, "classify", "--model", tmp_path, *images, "--top-k", "2", "--json")
    assert code == 0, err
    expected = transformers_top_k(v2_model, ConvNextImageProcessorPil(**PREPROCESSING), images, 2)
    for result, probabilities, indices in zip(json.loads(out), *expected):
        assert [p["label"] for p in result["predictions"]] == [LABELS[int(i)] for i in indices]
        assert np.allclose([p["probability"] for p in result["predictions"]], probabilities.numpy(), atol=1e-5)


def test_convert_a_convnext_v2_timm_file_loads_in_transformers(capsys, v2_model, tmp_path):
    from test_timm_users import v2_timm_layout

    checkpoint = tmp_path / "convnextv2_atto.pth"
    torch.save(v2_timm_layout(v2_model, conv_mlp=True), checkpoint)
    code, out, err = run(capsys, "convert", checkpoint, tmp_path / "out")
    assert code == 0, err
    assert "ConvNextV2ForImageClassification" in out
    reloaded = transformers.ConvNextV2ForImageClassification.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.layer_norm_eps == 1e-6  # timm's final norm
    pixels = torch.randn(2, 3, 64, 64)
    reference = transformers.ConvNextV2ForImageClassification(
        transformers.ConvNextV2Config(**{**TINY, "layer_norm_eps": 1e-6})).eval()
    reference.load_state_dict(v2_model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels).logits, reference(pixels).logits, rtol=0, atol=0)


def test_convert_a_dinov3_directory_and_classify_refuses_it(capsys, images, tmp_path):
    torch.manual_seed(3)
    hf = transformers.DINOv3ConvNextModel(transformers.DINOv3ConvNextConfig(
        hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1])).eval()
    hf.save_pretrained(tmp_path / "dinov3")
    code, out, err = run(capsys, "convert", tmp_path / "dinov3", tmp_path / "out")
    assert code == 0, err
    assert "DINOv3ConvNextModel" in out
    reloaded = transformers.DINOv3ConvNextModel.from_pretrained(tmp_path / "out").eval()
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels).last_hidden_state, hf(pixels).last_hidden_state, rtol=0, atol=0)
    code, out, err = run(capsys, "classify", "--model", tmp_path / "dinov3", images[0])
    assert code == 1
    assert "has no classification head (it loads as DINOv3ConvNextModel)" in err
