import os

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
)


def pytest_collection_modifyitems(config, items):
    if _test_device == "cuda":
        skip = pytest.mark.skip(reason="interpreter suite (small CPU tensors); GPU mode runs test_kernels_native.py")
        for item in items:
            if item.path.name in INTERPRETER_SUITES:
                item.add_marker(skip)
        return
    skip = pytest.mark.skip(reason=f"GPU-only test: set {TEST_DEVICE_ENV}=cuda on a machine with a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
