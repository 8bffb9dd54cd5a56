import os
import shutil
import tempfile

# Tests never read or write the user's caches (the tuning cache, which `auto` writes on a GPU, among them), nor
# inductor's shared /tmp/torchinductor_<user>: entries there that other runs left (under other ATen CPU
# capabilities, from other processes) crashed fresh processes with heap corruption or gave NaN on this machine,
# where a private cache gave the right numbers.
_CACHE_HOME = tempfile.mkdtemp(prefix="fastconvnext-test-cache-")
os.environ["XDG_CACHE_HOME"] = _CACHE_HOME
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(_CACHE_HOME, "torchinductor")

# The kernels are tested in Triton's interpreter on CPU. Triton reads this variable when a
# @triton.jit function is defined, so it must be set before any kernel module is imported.
# GPU mode: FASTCONVNEXT_TEST_DEVICE=cuda leaves TRITON_INTERPRET unset, so the kernel tests run the
# compiled kernels natively (real configs, the autotuner) on a CUDA device (tests/helpers.py: KERNEL_DEVICE).
TEST_DEVICE_ENV = "FASTCONVNEXT_TEST_DEVICE"
TEST_DEVICES = ("cpu", "cuda")
_test_device = os.environ.get(TEST_DEVICE_ENV, "cpu").strip().lower() or "cpu"
if _test_device not in TEST_DEVICES:
    raise ValueError(f"{TEST_DEVICE_ENV} must be one of {TEST_DEVICES}, got {os.environ[TEST_DEVICE_ENV]!r}")
if _test_device == "cuda":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise ValueError(f"{TEST_DEVICE_ENV}=cuda runs the kernels natively: unset TRITON_INTERPRET "
                         f"(it is {os.environ['TRITON_INTERPRET']!r})")
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs only with FASTCONVNEXT_TEST_DEVICE=cuda (native kernels, "
                                       "large shapes); skipped, and reported as skipped, otherwise")
    if _test_device == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"{TEST_DEVICE_ENV}=cuda but torch sees no CUDA device "
                                f"(torch {torch.__version__}, CUDA build {torch.version.cuda})")


# Suites that drive the kernels with small CPU tensors through Triton's interpreter (and patch it). In GPU
# mode they are skipped, and reported so; test_kernels_native.py runs both ops natively at stage shapes.
INTERPRETER_SUITES = (
    "test_dwconv_layernorm.py", "test_dwconv_launch_paths.py", "test_dwconv_launch_plans.py", "test_convnext_mlp.py",
    "test_convnext_mlp_launch_paths.py", "test_convnext_mlp_launch_plans.py",
    "test_convnext_mlp_fp32_intermediates.py", "test_fused_equivalence.py",
    "test_convnext_mlp_saved_pre.py", "test_convnext_mlp_split_epilogue.py", "test_convnext_mlp_activation.py",
    "test_dwconv_forward_tiles.py", "test_dwconv_backward_tiles.py", "test_calibrate_machine.py",
)
# Single tests, in files whose other tests run anywhere, that launch the kernels on CPU tensors: through the
# interpreter's own classes, or with the 'triton' backend forced on a CPU model (which needs the interpreter).
# "file::test" skips every parametrization, "file::test[id]" one. GPU mode skips them and reports so.
INTERPRETER_TESTS = (
    "test_kernel_env.py::test_every_kernel_launch_asks_for_fma_contraction",  # spies InterpretedFunction.run
    "test_compile_cpu.py::test_default_inductor_through_both_custom_ops_forward_and_backward",
    "test_patch_transformers.py::test_patched_blocks_run_the_fused_kernels",
    "test_training.py::test_torch_compile_fullgraph_through_the_kernels_custom_ops",
    "test_training.py::test_saved_bytes_of_one_block_match_a_hand_count[triton]",
)


def interpreter_only_reason(file_name, name, original_name=None):
    """Why GPU mode skips a test (file name, test name with its parametrization, name without it), or None."""
    if file_name in INTERPRETER_SUITES:
        return "interpreter suite (small CPU tensors); GPU mode runs test_kernels_native.py"
    if f"{file_name}::{name}" in INTERPRETER_TESTS or f"{file_name}::{original_name or name}" in INTERPRETER_TESTS:
        return "runs the kernels on CPU tensors, which only Triton's interpreter can (CPU mode runs it)"
    return None


def pytest_collection_modifyitems(config, items):
    if _test_device == "cuda":
        for item in items:
            reason = interpreter_only_reason(item.path.name, item.name, getattr(item, "originalname", None))
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=reason))
        return
    skip = pytest.mark.skip(reason=f"GPU-only test: set {TEST_DEVICE_ENV}=cuda on a machine with a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE_HOME, ignore_errors=True)
