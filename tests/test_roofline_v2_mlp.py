"""The byte/FLOP model of ConvNeXt V2's MLP (fc1, GELU, GRN, fc2, residual): every expectation below is counted from
the shape in the test, by tensor, not read off the function under test."""
import pytest

from fastconvnext.tooling import roofline

SHAPE = roofline.StageShape("tiny", 1, 3, 5, 8)  # N = 3 images of 5x5, C = 8
N, M, C, D, S = 3, 3 * 5 * 5, 8, 32, 2  # bf16: 2 bytes an element


def _eager(pass_):
    return roofline.traffic("convnext_v2_mlp", "eager", pass_, SHAPE, "bf16")


def _forward_elements():
    """Elements the eager forward moves. [M, D]: fc1 writes h; GELU 1 + 1; the norm reads 1; h * Nx, w * ., + b
    1 + 1 each; + h 2 + 1; fc2 reads 1 -> 8 read + 6 written. [M, C]: fc1 reads x, fc2 writes y, the residual add
    2 + 1. Parameters W1, b1, W2, b2, GRN w and b. [N, D]: G written; mean reads G, the division reads G and writes
    Nx; h * Nx reads Nx. [N]: mean written, + eps 1 + 1, the division reads it."""
    return 14 * M * D + 5 * M * C + (D * C + D) + (C * D + C) + 2 * D + 5 * N * D + 4 * N


def _backward_elements():
    """Elements autograd's backward moves. [M, D] read: fc2 wgrad 1 (A), db 1, dA * (h Nx) 2, its sum 1, dA * w 1,
    * Nx 1, * h 2, dNx sum 1, norm path 1 (h), two accumulations 2 + 2, GELU bwd 2, fc1 dgrad 1, wgrad 1, bias 1
    = 20; written: dA, dA * (h Nx), dA * w, * Nx, * h, norm path, two accumulations, GELU bwd = 9. [M, C]: dy read by
    fc2 dgrad, wgrad and bias grad, x by fc1 wgrad, dx written = 5. W2 and W1 read by the dgrads, their gradients
    written; GRN's w read by dA * w; bias-like gradients db2 (C), GRN db and dw, db1 (D each). [N, D]: Nx read, dNx
    written, dG through the mean (5 read, 3 written), norm path reads dG and G = 12; [N]: 3 read, 1 written."""
    return 29 * M * D + 5 * M * C + 4 * D * C + D + C + 3 * D + 12 * N * D + 4 * N


def test_eager_forward_bytes_and_flops():
    forward = _eager("fwd")
    assert forward.bytes == _forward_elements() * S
    gemms = 2 * (2 * M * C * D)
    vector = 8 * M * D + 2 * M * D + 4 * M * D + M * C + 2 * N * D + N  # GELU, norm, GRN's 4 passes, residual, [N, D]
    assert forward.flops == gemms + vector
    assert sum(step.flops for step in forward.steps if step.unit == "matmul") == gemms
    assert len(forward.steps) == 10  # one step per kernel eager launches


def test_eager_backward_bytes_and_flops():
    training = _eager("fwd+bwd")
    assert training.bytes == (_forward_elements() + _backward_elements()) * S
    matmul = sum(step.flops for step in training.steps if step.unit == "matmul")
    assert matmul == 6 * (2 * M * C * D)  # fc1, fc2; fc2 dgrad, wgrad; fc1 dgrad, wgrad
    # GELU bwd 12; GRN's 9 products, sums and accumulations 1 each, its norm path 2; db1 and db2 1 each; [N, D] 6
    vector_bwd = 12 * M * D + (9 + 2) * M * D + M * D + M * C + 6 * N * D
    assert training.flops - _eager("fwd").flops == 4 * (2 * M * C * D) + vector_bwd


def test_fusion_floor_reads_and_writes_each_tensor_once():
    sums = N * D * 4  # per-image fp32 sums of h^2 ([N, D]), written by pass 1 and read by pass 2
    forward = roofline.traffic("convnext_v2_mlp", "fused_min", "fwd", SHAPE, "bf16")
    assert forward.bytes == (2 * M * C + 2 * D * C + M * C) * S + 2 * sums
    assert forward.flops == 2 * (2 * M * C * D)
    training = roofline.traffic("convnext_v2_mlp", "fused_min", "fwd+bwd", SHAPE, "bf16")
    # backward: x, dy, W1, W2 read, dx, dW1, dW2 written; the saved norms read, sums of dA * h and dA written + read
    assert training.bytes - forward.bytes == (2 * M * C + 2 * D * C + M * C + 2 * D * C) * S + (1 + 2 * 2) * sums
    assert training.flops - forward.flops == 5 * (2 * M * C * D)


def test_the_floor_moves_fewer_bytes_than_eager_and_the_estimate_is_slower_than_the_eager_floor():
    """(In training the fusion floor recomputes fc1: 7 products to eager's 6, so where the products bound it, as fp32
    on CUDA cores at C = 768, its time may exceed the eager floor's, as V1's does.)"""
    for shape in roofline.stage_shapes(("tiny", "base"), 256):
        for pass_ in roofline.PASSES:
            for dtype in roofline.DTYPE_BYTES:
                eager = roofline.traffic("convnext_v2_mlp", "eager", pass_, shape, dtype)
                floor = roofline.traffic("convnext_v2_mlp", "fused_min", pass_, shape, dtype)
                assert floor.bytes < eager.bytes / 10
                for gpu in roofline.ROOFLINE_GPUS:
                    assert eager.seconds(gpu) < eager.estimate_seconds(gpu)
                    if dtype != "fp32":
                        assert floor.seconds(gpu) < eager.seconds(gpu)


def test_eager_estimate_charges_the_gemms_at_cublas_and_the_passes_at_hbm():
    gpu = roofline.H100_SXM
    steps = _eager("fwd").steps
    fc1, gelu = steps[0], steps[1]
    assert fc1.estimate_seconds(gpu, "bf16") == pytest.approx(
        max((M * C + D * C + D + M * D) * S / (0.8 * 3.35e12), 2 * M * C * D / (0.78 * 989e12)))
    assert gelu.estimate_seconds(gpu, "bf16") == pytest.approx(
        max(2 * M * D * S / (0.8 * 3.35e12), 8 * M * D / 67e12))


def test_the_v2_mlp_has_no_analytic_as_built_model():
    """Its kernels as built are modelled by the static SASS model only."""
    with pytest.raises(ValueError, match="sass_report"):
        roofline.traffic("convnext_v2_mlp", "fused", "fwd", SHAPE, "bf16")
    assert "convnext_v2_mlp" in roofline.OPS and "convnext_v2_mlp" not in roofline.BUILT_OPS
    assert roofline.BLOCKS["ConvNeXt V2"] == ("dwconv_layernorm", "convnext_v2_mlp")
