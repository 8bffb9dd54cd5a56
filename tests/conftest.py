import os

# The kernels are tested in Triton's interpreter on CPU. Triton reads this variable when a
# @triton.jit function is defined, so it must be set before any kernel module is imported.
# A GPU run can opt out with TRITON_INTERPRET=0.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
