"""Analytic roofline of the fused ops: bytes moved through HBM and FLOPs, eager vs fused.

Every implementation is written out below as a list of `Step`s, one per kernel it launches, each with
the bytes it reads and writes in HBM and the FLOPs it does. A step's time bound on a GPU is
max(bytes / HBM bandwidth, FLOPs / peak of the unit doing them); an implementation's bound is the sum
over its steps (kernels run one after another). Tensor-core FLOPs (the MLP's GEMMs) and CUDA-core FLOPs
(depthwise conv, LayerNorm, activations, element-wise ops; all computed in fp32 by PyTorch and by the
kernels) are bounded by their own peaks.

Notation: P = N*H*W pixels (= M rows of the MLP), C channels, K = 7 taps per side, D = 4C hidden,
s = bytes per activation element (fp32 4, fp16/bf16 2). Parameters are in the activation dtype.
Statistics (LayerNorm mean/rstd) and partial sums are fp32.

Assumptions, the same for every implementation:
- Each tensor a kernel touches crosses HBM once per kernel. Re-reads that a tile schedule serves from
  L1/L2 or shared memory are not counted: the depthwise halo (a tile of pixels reads its neighbours'
  rows, counted 1x) and the MLP weights (W1 + W2 = 8*C^2*s, at most 16.8 MB for C = 1024 in bf16,
  which fits in the 50 MB L2 of an H100 and the 40 MB of an A100) are read from HBM once per kernel.
- Kernel launch latency (a few microseconds each) is not modelled. At the 7x7 stages the bounds are
  a few microseconds, so there the number of launches decides: eager launches 2-3 kernels per op
  forward, the fused ops 1 (plus small parameter casts).
- FLOP counts: a multiply-add is 2; LayerNorm 8 per element forward (mean 1, variance 3, normalise 2,
  affine 2), 10 backward for the input gradient and 4 for the weight/bias gradients; erf GELU 8 per
  element forward, 12 backward (derivative plus product); bias, layer scale and residual 1 each; GRN's
  norm 2 per element (square, add), each of its elementwise products, sums and adds 1.
- Drop path (stochastic depth) is off; the layer scale (gamma) is present (ConvNeXt's default; V2 has none).
- The gradient of the block input is the sum of the residual path and the dwconv path: that
  accumulation lies between the two ops and is the same for every implementation, so it is left out.
- "fwd" is an inference forward (no autograd); "fwd+bwd" is a training forward (which in the fused
  MLP also writes y2 = fc2 output for dgamma) followed by the backward.

"fused" models the kernels as built in kernels/*_kernel.py (see `DWCONV_FUSED` and `mlp_fused_tiles`):
where those recompute or write partial sums, that is counted. "fused_min" is the floor any fusion
could reach: every activation tensor read or written once, no recomputation beyond what the algorithm
needs. The gap between the two is the headroom left in the kernels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

STAT_BYTES = 4  # fp32 LayerNorm statistics and partial sums
KERNEL_SIZE = 7
MLP_RATIO = 4
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}

LN_FWD_FLOPS = 8
LN_BWD_DX_FLOPS = 10
LN_BWD_DW_FLOPS = 4
GELU_FWD_FLOPS = 8
GELU_BWD_FLOPS = 12

OPS = ("dwconv_layernorm", "convnext_mlp", "convnext_v2_mlp")
PASSES = ("fwd", "fwd+bwd")


# ----------------------------------------------------------------------------------------- hardware


@dataclass(frozen=True)
class Gpu:
    """Public peak figures: HBM bandwidth, dense tensor-core and CUDA-core (fp32, non-tensor) FLOP/s."""

    name: str
    hbm_bytes_per_s: float
    tensor_flops: dict  # dtype -> dense peak; "tf32" for fp32 GEMMs when TF32 is allowed
    vector_flops: float  # fp32 FMA units

    def matmul_peak(self, dtype, allow_tf32):
        if dtype == "fp32":
            return self.tensor_flops["tf32"] if allow_tf32 else self.vector_flops
        return self.tensor_flops[dtype]


H100_SXM = Gpu("H100 SXM", 3.35e12, {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12}, 67e12)
A100_SXM = Gpu("A100 SXM 80GB", 2.039e12, {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12}, 19.5e12)
ROOFLINE_GPUS = (H100_SXM, A100_SXM)


@dataclass(frozen=True)
class Machine:
    """What the static SASS model (fastconvnext/tooling/sass_report.py) needs beyond a Gpu's peaks: per-SM rates and chip
    totals. The clock is the one the Gpu's dense 16-bit tensor peak implies, so the two never disagree. Sources
    are in MACHINE_SOURCES; "assumed" figures await a GPU to calibrate."""

    name: str
    arch: int
    gpu: Gpu
    sms: int
    l2_bytes_per_s: float  # L2 -> SMs
    l2_bytes_per_s_low: float  # the pessimistic edge of the public L2 -> SM figures
    l2_size: float
    macs_per_clock: dict  # dense tensor-core MACs per SM per clock: "16bit" (fp16/bf16) and "tf32"
    smem_per_sm: int
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_ctas_per_sm: int = 32
    issue_per_clock: int = 4  # warp-instructions per SM per clock: 4 schedulers, 1 each
    mufu_per_clock: int = 16  # special-function results per SM per clock

    @property
    def clock_hz(self) -> float:
        return self.gpu.tensor_flops["bf16"] / (2 * self.macs_per_clock["16bit"] * self.sms)

    @property
    def hbm_bytes_per_s(self) -> float:
        return self.gpu.hbm_bytes_per_s


MACHINES = {
    90: Machine("H100 SXM", 90, H100_SXM, 132, 9.5e12, 8.0e12, 50e6, {"16bit": 2048, "tf32": 1024}, 228 * 1024),
    80: Machine("A100 SXM", 80, A100_SXM, 108, 5.4e12, 5.35e12, 40e6, {"16bit": 1024, "tf32": 512}, 164 * 1024),
}

MACHINE_SOURCES = (
    "H100 SXM: 132 SMs; 3.35 TB/s HBM3 and 989 TFLOP/s dense bf16 (NVIDIA H100 datasheet); 1.83 GHz is the "
    "clock that peak implies at 4096 FLOP/clk/SM; 50 MB L2, 228 KB shared memory per SM (Hopper tuning guide).",
    "H100 SXM L2->SM 9.5 TB/s, 8.0 TB/s as the pessimistic edge: not measured by this project. CUDA L2 read "
    "benchmarks on 132-SM parts of the same die (RRZE-HPC gpu-benches, gpu-l2-cache: H200 9.7-10.2 TB/s, H100 "
    "PCIe 6.9-7.0 TB/s on its lower clock) and a published Triton persistent matmul with a 128x256 tile (tritonbench "
    "PR 894: 689 TFLOP/s at 8192x8192x16384, which needs >= 8.1 TB/s from L2) put it at about 9-9.5 TB/s.",
    "A100 SXM: 108 SMs, 1.41 GHz, 2.039 TB/s HBM2e, 312 TFLOP/s dense bf16 = 1024 MAC/clk/SM (NVIDIA A100 "
    "datasheet/whitepaper); 40 MB L2; 164 KB shared memory per SM. L2->SM 5.4 TB/s (5.35 as the low edge): "
    "RRZE-HPC gpu-benches gpu-l2-cache on A100-80 measured 5.35-5.45 TB/s; not measured by this project.",
    "Both: 4 warp-instructions issued per SM per clock (4 schedulers), 16 MUFU results per SM per clock, "
    "65536 registers, 64 warps and 32 CTAs per SM (CUDA programming guide, compute capability 8.0/9.0).",
    "Tensor-core efficiency by load path (fastconvnext.tooling.sass_report.tensor_efficiency): a GEMM whose "
    "operands come through plain pointer loads reaches about 0.6 of the dense peak in public Triton H100 results, "
    "about 0.7 with TMA descriptor loads (Triton PR 5461's persistent matmul); mma.sync (HMMA) on sm_90 runs at "
    "half of the wgmma rate. Not measured by this project: fastconvnext.tooling.calibrate measures the tl.dot "
    "loop's fraction on a GPU.",
    "Launches with one CTA per SM: the epilogue (the instructions outside the hot loops) runs after the matmul, "
    "not under it, so its issue time is added to the tensor term.",
    "torch GEMMs inside a fused op (the ConvNeXt V2 MLP's backward matmuls) run at the eager estimate's cuBLAS "
    "fraction of the dense peak (EAGER_EFFICIENCY matmul, EAGER_SOURCES), fp32 without TF32 (torch's default).",
)

# Other parts a measurement may run on, matched by name to put achieved bandwidth against the peak.
_KNOWN_GPUS = (
    ("H100 PCIe", Gpu("H100 PCIe", 2.0e12, {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12}, 51e12)),
    ("H200", Gpu("H200 SXM", 4.8e12, {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12}, 67e12)),
    ("H100", H100_SXM),
    ("H800", H100_SXM),
    ("A100-SXM4-40GB", Gpu("A100 SXM 40GB", 1.555e12, A100_SXM.tensor_flops, 19.5e12)),
    ("A100 80GB PCIe", Gpu("A100 PCIe 80GB", 1.935e12, A100_SXM.tensor_flops, 19.5e12)),
    ("A100", A100_SXM),
)


def gpu_for_device_name(name):
    """The peak figures for a CUDA device name (torch.cuda.get_device_name), or None when unknown."""
    for key, gpu in _KNOWN_GPUS:
        if all(part in name for part in key.split()):
            return gpu
    return None


# ------------------------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class StageShape:
    """The activation of one ConvNeXt stage: [N, H, W, C]."""

    model: str  # "tiny", "base", ...
    stage: int  # 1..4
    batch: int
    size: int  # H = W
    channels: int

    @property
    def pixels(self):
        return self.batch * self.size * self.size

    @property
    def label(self):
        return f"{self.model[0].upper()}-s{self.stage} C={self.channels}@{self.size}²"

    @property
    def dims(self):
        return (self.batch, self.size, self.size, self.channels)


STAGE_SIZES = (56, 28, 14, 7)  # at 224x224 input
STAGE_CHANNELS = {"tiny": (96, 192, 384, 768), "base": (128, 256, 512, 1024)}


def stage_shapes(models=("tiny", "base"), batch=64):
    return [
        StageShape(model, i + 1, batch, size, channels)
        for model in models
        for i, (size, channels) in enumerate(zip(STAGE_SIZES, STAGE_CHANNELS[model]))
    ]


# -------------------------------------------------------------------------------------------- steps


@dataclass(frozen=True)
class Step:
    """One kernel: HBM bytes read and written, FLOPs, and which unit does the FLOPs: "vector" (CUDA cores, fp32),
    "matmul" (tensor cores), "dwconv" / "dwconv_bwd" (CUDA cores; PyTorch's depthwise conv forward / backward,
    whose eager estimate has its own efficiency)."""

    name: str
    read: float
    written: float
    flops: float = 0.0
    unit: str = "vector"

    @property
    def bytes(self):
        return self.read + self.written

    def _peak(self, gpu, dtype, allow_tf32):
        return gpu.matmul_peak(dtype, allow_tf32) if self.unit == "matmul" else gpu.vector_flops

    def seconds(self, gpu, dtype, allow_tf32=False):
        """The floor: every byte at the HBM peak, every FLOP at its unit's peak."""
        return max(self.bytes / gpu.hbm_bytes_per_s, self.flops / self._peak(gpu, dtype, allow_tf32))

    def estimate_seconds(self, gpu, dtype, allow_tf32=False):
        """What eager PyTorch is estimated to take: the floor's terms at the public efficiencies of EAGER_EFFICIENCY."""
        compute = EAGER_EFFICIENCY.get(self.unit, 1.0)
        return max(self.bytes / (gpu.hbm_bytes_per_s * EAGER_EFFICIENCY["hbm"]),
                   self.flops / (self._peak(gpu, dtype, allow_tf32) * compute))


# Eager PyTorch's achieved fraction of the peaks, from public measurements (EAGER_SOURCES), for the eager estimate.
EAGER_EFFICIENCY = {"hbm": 0.8, "matmul": 0.78, "dwconv": 0.15, "dwconv_bwd": 0.05}
EAGER_SOURCES = (
    "Eager floor: every eager kernel at the HBM peak and its unit's FLOP peak. Public timm results put torch.compile "
    "ConvNeXt-T at 1.06-1.18x this kind of bound and eager at 1.47-1.90x (RTX 4090/5090), so the floor is a "
    "torch.compile-class bound, not eager PyTorch.",
    "Eager estimate: cuBLAS GEMMs at 0.78 of the dense tensor peak (published cuBLAS bf16 GEMM throughput on H100 SXM "
    "is about 0.78-0.80 of peak at large sizes); LayerNorm, GELU and element-wise passes at 0.8 of the HBM peak "
    "(what bandwidth-bound PyTorch kernels typically reach); PyTorch's 7x7 depthwise conv at 0.15 of the FP32 peak "
    "forward and 0.05 backward (implied by InceptionNeXt's A100 throughput table, Yu et al. 2023). These are other "
    "projects' measurements on other code, not measurements of fastconvnext; a GPU run replaces them "
    "(fastconvnext bench, fastconvnext.tooling.calibrate).",
)


@dataclass
class Traffic:
    """The steps of one implementation of one op for one pass."""

    op: str
    impl: str
    pass_: str
    shape: StageShape
    dtype: str
    steps: list = field(default_factory=list)

    @property
    def bytes(self):
        return sum(step.bytes for step in self.steps)

    @property
    def flops(self):
        return sum(step.flops for step in self.steps)

    def seconds(self, gpu, allow_tf32=False):
        return sum(step.seconds(gpu, self.dtype, allow_tf32) for step in self.steps)

    def estimate_seconds(self, gpu, allow_tf32=False):
        return sum(step.estimate_seconds(gpu, self.dtype, allow_tf32) for step in self.steps)

    def limited_by(self, gpu, allow_tf32=False):
        """"memory" or "compute": what bounds the steps that take most of the time."""
        memory = sum(s.seconds(gpu, self.dtype, allow_tf32) for s in self.steps
                     if s.bytes / gpu.hbm_bytes_per_s >= s.seconds(gpu, self.dtype, allow_tf32))
        return "memory" if memory >= 0.5 * self.seconds(gpu, allow_tf32) else "compute"


# ------------------------------------------------------------------------------- dwconv + LayerNorm


@dataclass(frozen=True)
class DwconvFusedLayout:
    """What kernels/dwconv_layernorm_kernel.py does in backward, as far as HBM traffic goes.

    Backward runs two kernels and fixed-order sums: (1) recompute the conv, LayerNorm backward, write
    g = d(conv output) in fp32 plus per-program partial sums of the LN weight/bias and conv bias grads;
    (2) from one read of g and x: dx = conv of g with flipped taps, and per-program partial sums of the
    tap gradients; then the partials are summed. Programs: at most `partial_programs`, each over whole
    tiles of `*_block_p` pixels. (An approximation of the launches fastconvnext/tooling/sass_report.py models exactly.)
    """

    g_bytes: int = 4
    partial_programs: int = 1024
    norm_bwd_tile_elements: int = 2048  # BLOCK_P = max(1, 2048 // BLOCK_C), BLOCK_C = next_pow2(C) >= 16
    wgrad_block_p: int = 32

    def programs(self, pixels, block_p):
        tiles = math.ceil(pixels / block_p)
        per_program = math.ceil(tiles / self.partial_programs)
        return math.ceil(tiles / per_program)

    def norm_bwd_block_p(self, channels):
        block_c = max(16, 1 << (channels - 1).bit_length())
        return max(1, self.norm_bwd_tile_elements // block_c)


DWCONV_FUSED = DwconvFusedLayout()


def _dwconv_conv_flops(p, c, k):
    return 2 * k * k * p * c


def dwconv_layernorm_steps(shape, dtype, impl, pass_, k=KERNEL_SIZE):
    """Steps of LayerNorm_C(depthwise KxK conv(x) + bias) for impl in eager / eager_nchw / fused / fused_min.

    eager (channels-last, the fastconvnext eager path):
      fwd: conv reads x, writes y1; layer_norm reads y1, writes y2 and mean/rstd (PyTorch's CUDA
           LayerNorm always writes them).
      bwd: LayerNorm backward is two kernels in PyTorch (dx; dgamma/dbeta), each reading dy and y1;
           the conv's bias grad is a sum over dy1; dgrad reads dy1 writes dx; wgrad reads dy1 and x.
    eager_nchw (transformers' order: NCHW conv, then permute): as eager, plus the copy LayerNorm makes
      of its permuted (non-contiguous) input (read + write), and in backward the copy of the NHWC
      gradient back to NCHW for the conv's backward (read + write).
    fused (as built): fwd is one kernel reading x (halo counted 1x) and writing y plus fp32 mean/rstd;
      before it, the params are cast to fp32 (taps transposed). bwd: see `DwconvFusedLayout`.
    fused_min: fwd as fused; bwd one kernel reading x, dy, mean/rstd and writing dx (g recomputed on
      chip, halo included), param-sized partials ignored.
    """
    s = DTYPE_BYTES[dtype]
    p, c = shape.pixels, shape.channels
    act = p * c * s
    stats = 2 * p * STAT_BYTES
    taps = k * k * c
    conv_flops = _dwconv_conv_flops(p, c, k)
    ln_params = 2 * c * s
    steps = []
    training = pass_ == "fwd+bwd"
    if impl in ("eager", "eager_nchw"):
        steps.append(Step("depthwise conv", act + (taps + c) * s, act, conv_flops + p * c, "dwconv"))
        if impl == "eager_nchw":
            steps.append(Step("permute copy (LayerNorm input made contiguous)", act, act))
        steps.append(Step("layer_norm", act + ln_params, act + stats, LN_FWD_FLOPS * p * c))
        if training:
            steps.append(Step("layer_norm bwd: dx", 2 * act + stats + c * s, act, LN_BWD_DX_FLOPS * p * c))
            steps.append(Step("layer_norm bwd: dgamma, dbeta", 2 * act + stats, ln_params, LN_BWD_DW_FLOPS * p * c))
            if impl == "eager_nchw":
                steps.append(Step("grad copy NHWC -> NCHW for the conv backward", act, act))
            steps.append(Step("conv bwd: bias grad (sum of dy)", act, c * s, p * c))
            steps.append(Step("conv bwd: input grad", act + taps * s, act, conv_flops, "dwconv_bwd"))
            steps.append(Step("conv bwd: weight grad", 2 * act, taps * s, conv_flops, "dwconv_bwd"))
        return steps
    if impl not in ("fused", "fused_min"):
        raise ValueError(f"dwconv_layernorm impl must be eager, eager_nchw, fused or fused_min, got {impl!r}")
    param_fp32 = (taps + 3 * c) * STAT_BYTES
    if impl == "fused":
        steps.append(Step("param casts to fp32 (taps transposed)", (taps + 3 * c) * s, param_fp32))
    steps.append(Step("fused dwconv+LN fwd", act + param_fp32, act + stats,
                      conv_flops + p * c + LN_FWD_FLOPS * p * c))
    if not training:
        return steps
    if impl == "fused_min":
        steps.append(Step("one-pass bwd (g recomputed on chip)", 2 * act + stats + param_fp32, act,
                          3 * conv_flops + (LN_BWD_DX_FLOPS + LN_BWD_DW_FLOPS + 1) * p * c))
        return steps
    layout = DWCONV_FUSED
    g = p * c * layout.g_bytes
    norm_partials = layout.programs(p, layout.norm_bwd_block_p(c)) * 3 * c * STAT_BYTES
    tap_partials = layout.programs(p, layout.wgrad_block_p) * taps * STAT_BYTES
    steps.append(Step("bwd 1: recompute conv, LN bwd -> g (fp32) + partials", 2 * act + stats + param_fp32,
                      g + norm_partials,
                      conv_flops + p * c + (LN_BWD_DX_FLOPS + LN_BWD_DW_FLOPS) * p * c))
    steps.append(Step("bwd 2: dx = conv(g, flipped taps) and tap-grad partials, one read of g and x",
                      g + act + taps * STAT_BYTES, act + tap_partials, 2 * conv_flops))
    steps.append(Step("fixed-order sum of partials", norm_partials + tap_partials, (3 * c + taps) * STAT_BYTES,
                      (norm_partials + tap_partials) / STAT_BYTES))
    return steps


# ---------------------------------------------------------------------------------------------- MLP


@dataclass(frozen=True)
class MlpTiles:
    fwd_c_tiles: int  # C-out tiles of the forward grid: fc1 is recomputed for each
    dx_c_tiles: int  # C tiles of the dx kernel: fc1 and dh recomputed for each, x and dy re-read
    dw_c_tiles: int  # C tiles of the dW kernel: fc1 and dh recomputed for each
    dw_segments: int  # M segments of the dW kernel: partial copies of dW1, dW2, db1
    part_rows: int = 16  # rows per partial sum of db2 / dgamma in the dx kernel


def mlp_fused_tiles(c, dtype, m):
    """Tiling of kernels/convnext_mlp_kernel.py: its widest (first) autotune candidate per (C, dtype).

    Forward / dx: BLOCK_N = next_pow2(C) up to 128, else min(next_pow2(C), 256) for 16-bit dtypes,
    min(next_pow2(C), 64) for fp32. dW: BLOCK_C = next_pow2(C) up to 128, else min(next_pow2(C), 256)
    (fp32: 64). dW segments: min(64, ceil(M / 8192)). The autotuner may pick a narrower candidate,
    which means more recomputation than counted here.
    """
    cp = max(16, 1 << (c - 1).bit_length())
    if dtype == "fp32":
        block_n = block_c = min(cp, 64)
    else:
        block_n = block_c = cp if cp <= 128 else min(cp, 256)
    segments = max(1, min(64, math.ceil(m / 8192)))
    return MlpTiles(math.ceil(c / block_n), math.ceil(c / block_n), math.ceil(c / block_c), segments)


def convnext_mlp_steps(shape, dtype, impl, pass_):
    """Steps of residual + gamma * (GELU(x W1^T + b1) W2^T + b2) for impl in eager / fused / fused_min.

    eager: fc1 (bias in the GEMM epilogue) reads x, W1 and writes h [M, 4C]; GELU reads h, writes a;
      fc2 reads a, W2, writes y; layer scale reads y, writes gamma*y; residual add reads 2, writes 1.
      bwd (autograd): dz = dy*gamma (read 1 write 1); dgamma = sum(dy*y) as a product (read 2 write 1)
      and a sum (read 1); fc2 dgrad (reads dz, W2, writes da [M, 4C]), wgrad (reads dz and a), bias
      grad (reads dz); GELU bwd (reads da and h, writes dh); fc1 dgrad, wgrad, bias grad likewise.
      The residual's gradient is dy itself (no copy).
    fused (as built, see `mlp_fused_tiles`): fwd one kernel reading x once per C-out tile, residual
      once, W1/W2 once, writing out (+ y2 = fc2 output in training, for dgamma). bwd: the dx kernel reads
      x and dy once per C tile (both are needed whole to recompute the hidden and dh), y2 once, writes dx
      and fp32 partial sums of db2/dgamma every 16 rows; the dW kernel reads x and dy once per C tile
      (re-reads across hidden chunks served by L2), writes fp32 partial dW1/dW2/db1 per M segment;
      torch sums the partials and casts them to the parameters' dtype.
    fused_min: fwd reads x, residual, W1, W2 once and writes out; bwd reads x, dy, W1, W2 once,
      writes dx, dW1, dW2 once; FLOPs: fc1 recomputed once, then dh, dx, dW1, dW2 (dgamma needs no y2:
      it is a row sum of W2 * (dy^T a), a by-product of dW2).
    """
    s = DTYPE_BYTES[dtype]
    m, c = shape.pixels, shape.channels
    d = MLP_RATIO * c
    act = m * c * s
    hid = m * d * s
    w = d * c * s  # one weight matrix
    gemm = 2 * m * c * d  # FLOPs of one [M, C] x [C, D] product
    training = pass_ == "fwd+bwd"
    steps = []
    if impl == "eager":
        steps += [
            Step("fc1 (bias in epilogue)", act + w + d * s, hid, gemm, "matmul"),
            Step("gelu", hid, hid, GELU_FWD_FLOPS * m * d),
            Step("fc2 (bias in epilogue)", hid + w + c * s, act, gemm, "matmul"),
            Step("layer scale", act + c * s, act, m * c),
            Step("residual add", 2 * act, act, m * c),
        ]
        if training:
            steps += [
                Step("layer scale bwd: dz = dy*gamma", act + c * s, act, m * c),
                Step("layer scale bwd: dy*y", 2 * act, act, m * c),
                Step("layer scale bwd: dgamma = sum", act, c * s, m * c),
                Step("fc2 bwd: input grad", act + w, hid, gemm, "matmul"),
                Step("fc2 bwd: weight grad", act + hid, w, gemm, "matmul"),
                Step("fc2 bwd: bias grad", act, c * s, m * c),
                Step("gelu bwd", 2 * hid, hid, GELU_BWD_FLOPS * m * d),
                Step("fc1 bwd: input grad", hid + w, act, gemm, "matmul"),
                Step("fc1 bwd: weight grad", hid + act, w, gemm, "matmul"),
                Step("fc1 bwd: bias grad", hid, d * s, m * d),
            ]
        return steps
    if impl == "fused_min":
        steps.append(Step("fused MLP fwd", 2 * act + 2 * w, act, 2 * gemm, "matmul"))
        if training:
            steps.append(Step("fused MLP bwd", 2 * act + 2 * w, act + 2 * w, 5 * gemm, "matmul"))
        return steps
    if impl != "fused":
        raise ValueError(f"convnext_mlp impl must be eager, fused or fused_min, got {impl!r}")
    tiles = mlp_fused_tiles(c, dtype, m)
    small = (d + 2 * c) * STAT_BYTES  # b1, b2, gamma in fp32
    steps.append(Step("fused MLP fwd", act * tiles.fwd_c_tiles + act + 2 * w + small,
                      act + (act if training else 0), gemm * (tiles.fwd_c_tiles + 1), "matmul"))
    if not training:
        return steps
    row_partials = 2 * math.ceil(m / tiles.part_rows) * c * STAT_BYTES
    steps.append(Step("bwd dx kernel (recompute fc1, dh)", 2 * act * tiles.dx_c_tiles + act + 2 * w + small,
                      act + row_partials, gemm * (2 * tiles.dx_c_tiles + 1), "matmul"))
    steps.append(Step("db2, dgamma partial sums", row_partials, 2 * c * STAT_BYTES, row_partials / STAT_BYTES))
    weight_partials = tiles.dw_segments * (2 * d * c + d) * STAT_BYTES
    steps.append(Step("bwd dW kernel (recompute fc1, dh)", 2 * act * tiles.dw_c_tiles + 2 * w + small,
                      weight_partials, gemm * (2 * tiles.dw_c_tiles + 2), "matmul"))
    fp32_grads = (2 * d * c + d) * STAT_BYTES
    steps.append(Step("dW partial sums + cast to param dtype", weight_partials + fp32_grads,
                      fp32_grads + (2 * d * c + d) * s, weight_partials / STAT_BYTES))
    return steps


# ------------------------------------------------------------------------------------ ConvNeXt V2 MLP


def _v2_eager_forward(m, c, d, n, s, act, hid, w):
    """The forward kernels of transformers' ConvNextV2Layer MLP (fc1, act, GRN as written, fc2, residual add)."""
    norms = n * d * s  # G, Nx: [N, D] in the activation dtype
    return [
        Step("fc1 (bias in epilogue)", act + w + d * s, hid, 2 * m * c * d, "matmul"),
        Step("gelu", hid, hid, GELU_FWD_FLOPS * m * d),
        Step("GRN: G = vector_norm of h over H, W", hid, norms, 2 * m * d),
        Step("GRN: mean of G over channels, + eps, Nx = G / (mean + eps) (3 small kernels)",
             2 * norms + 2 * n * s, 2 * n * s + norms, 2 * n * d + n),
        Step("GRN: h * Nx", hid + norms, hid, m * d),
        Step("GRN: w * (h * Nx)", hid + d * s, hid, m * d),
        Step("GRN: + b", hid + d * s, hid, m * d),
        Step("GRN: + h", 2 * hid, hid, m * d),
        Step("fc2 (bias in epilogue)", hid + w + c * s, act, 2 * m * c * d, "matmul"),
        Step("residual add", 2 * act, act, m * c),
    ]


def _v2_eager_backward(m, c, d, n, s, act, hid, w):
    """autograd's backward kernels of `_v2_eager_forward`, in the order it runs them."""
    norms = n * d * s
    gemm = 2 * m * c * d
    return [
        Step("fc2 bwd: input grad dA", act + w, hid, gemm, "matmul"),
        Step("fc2 bwd: weight grad", act + hid, w, gemm, "matmul"),
        Step("fc2 bwd: bias grad", act, c * s, m * c),
        Step("GRN bwd: db = sum of dA", hid, d * s, m * d),
        Step("GRN bwd: dA * (h * Nx)", 2 * hid, hid, m * d),
        Step("GRN bwd: dw = sum", hid, d * s, m * d),
        Step("GRN bwd: dA * w", hid + d * s, hid, m * d),
        Step("GRN bwd: (dA * w) * Nx", hid + norms, hid, m * d),
        Step("GRN bwd: (dA * w) * h", 2 * hid, hid, m * d),
        Step("GRN bwd: dNx = sum over H, W", hid, norms, m * d),
        Step("GRN bwd: dG from dNx through the channel mean (4 small kernels)", 5 * norms + 3 * n * s,
             3 * norms + n * s, 6 * n * d),
        Step("GRN bwd: norm path h * dG / G", hid + 2 * norms, hid, 2 * m * d),
        Step("accumulate dh: dA + (dA * w) * Nx", 2 * hid, hid, m * d),
        Step("accumulate dh: + the norm path", 2 * hid, hid, m * d),
        Step("gelu bwd", 2 * hid, hid, GELU_BWD_FLOPS * m * d),
        Step("fc1 bwd: input grad", hid + w, act, gemm, "matmul"),
        Step("fc1 bwd: weight grad", hid + act, w, gemm, "matmul"),
        Step("fc1 bwd: bias grad", hid, d * s, m * d),
    ]


def convnext_v2_mlp_steps(shape, dtype, impl, pass_):
    """Steps of residual + (GRN(GELU(x W1^T + b1)) W2^T + b2) (ConvNeXt V2) for impl in eager / fused_min.

    GRN(h) = w * (h * Nx) + b + h, Nx = G / (mean over channels of G + 1e-6), G = ||h||_2 over H, W per image and
    channel; n = N images, [N, D] tensors (G, Nx and their gradients) are n*D elements.
    eager (transformers' ConvNextV2Layer, as fastconvnext's eager reference runs it): fc1 (bias in the GEMM
      epilogue) reads x, W1, writes h [M, 4C]; GELU reads h, writes h; GRN: vector_norm reads h, writes G [N, D];
      the channel mean, + eps and G / (mean + eps) are three [N, D]-sized kernels; then four elementwise passes
      over [M, D] as the expression is written: h * Nx, w * that, + b, + h; fc2 reads A, W2, writes y; residual
      add reads 2, writes 1. Drop path is off (as for V1) and V2 has no layer scale.
      bwd (autograd): fc2 dgrad (dA [M, D]), wgrad (reads dy and A), bias grad; GRN: db = sum of dA, dw = sum of
      dA * (h * Nx) (a product and a sum), dA * w, then (dA * w) * Nx and (dA * w) * h, dNx = its sum over H, W;
      dG from dNx through the channel mean (four [N, D]-sized kernels: dNx / den, the sum over D of
      -dNx * G / den^2, the mean's expand, the accumulation); the norm's gradient h * dG / G; autograd adds h's
      three gradients (direct, through h * Nx, through G) with two adds; GELU bwd; fc1 dgrad, wgrad, bias grad.
    fused_min: the floor any fusion could reach: x, residual, W1, W2 read once, out written once, h never leaves
      the chip and fc1 runs once (GRN's whole-image reduction makes any real kernel store h or recompute it: both
      cost more); the per-image sums of h^2 ([N, D] fp32) written and read once. bwd reads x, dy, W1, W2 and the
      saved [N, D] norms once, writes dx, dW1, dW2 once, plus the per-image sums of dA * h and dA ([N, 2D] fp32)
      written and read once; FLOPs: fc1 recomputed, dA, dx, dW1, dW2 (5 products; the GRN parameter gradients are
      per-image sums of those). Only matmul FLOPs are counted, as for V1's fused steps. The kernels as built are
      modelled by the static SASS model (fastconvnext/tooling/sass_report.py), not here.
    """
    s = DTYPE_BYTES[dtype]
    n, m, c = shape.batch, shape.pixels, shape.channels
    d = MLP_RATIO * c
    sizes = (m, c, d, n, s, m * c * s, m * d * s, d * c * s)
    training = pass_ == "fwd+bwd"
    if impl == "eager":
        return _v2_eager_forward(*sizes) + (_v2_eager_backward(*sizes) if training else [])
    if impl != "fused_min":
        raise ValueError(f"convnext_v2_mlp impl must be eager or fused_min (the kernels as built are modelled by "
                         f"fastconvnext.tooling.sass_report), got {impl!r}")
    act, w, sums = m * c * s, d * c * s, n * d * STAT_BYTES
    gemm = 2 * m * c * d
    steps = [Step("fused MLP fwd (two passes, h kept on chip)", 2 * act + 2 * w + sums, act + sums, 2 * gemm,
                  "matmul")]
    if training:
        steps.append(Step("fused MLP bwd", 2 * act + 2 * w + sums + 2 * sums, act + 2 * w + 2 * sums, 5 * gemm,
                          "matmul"))
    return steps


# -------------------------------------------------------------------------------------------- table

IMPLS = {
    "dwconv_layernorm": ("eager", "eager_nchw", "fused", "fused_min"),
    "convnext_mlp": ("eager", "fused", "fused_min"),
    "convnext_v2_mlp": ("eager", "fused_min"),
}
_STEPS = {"dwconv_layernorm": dwconv_layernorm_steps, "convnext_mlp": convnext_mlp_steps,
          "convnext_v2_mlp": convnext_v2_mlp_steps}
# The ops of one block of each family, in order: what a "block" row and the whole-model sums add up.
BLOCKS = {"ConvNeXt": ("dwconv_layernorm", "convnext_mlp"), "ConvNeXt V2": ("dwconv_layernorm", "convnext_v2_mlp")}
BUILT_OPS = tuple(op for op in OPS if "fused" in IMPLS[op])  # ops with an analytic as-built ("fused") model


def traffic(op, impl, pass_, shape, dtype):
    """The modelled traffic of one op implementation; "block" = dwconv_layernorm + convnext_mlp."""
    if pass_ not in PASSES:
        raise ValueError(f"pass must be one of {PASSES}, got {pass_!r}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {tuple(DTYPE_BYTES)}, got {dtype!r}")
    if op == "block":
        mlp_impl = "eager" if impl == "eager_nchw" else impl
        steps = dwconv_layernorm_steps(shape, dtype, impl, pass_) + convnext_mlp_steps(shape, dtype, mlp_impl, pass_)
    elif op in _STEPS:
        steps = _STEPS[op](shape, dtype, impl, pass_)
    else:
        raise ValueError(f"op must be one of {OPS + ('block',)}, got {op!r}")
    return Traffic(op, impl, pass_, shape, dtype, steps)


@dataclass(frozen=True)
class RooflineRow:
    op: str
    shape: StageShape
    pass_: str
    dtype: str
    eager: Traffic
    fused: Traffic
    baseline: str  # which eager variant `eager` is

    def bound_us(self, which, gpu, allow_tf32=False):
        return getattr(self, which).seconds(gpu, allow_tf32) * 1e6

    def speedup(self, gpu, allow_tf32=False):
        return self.eager.seconds(gpu, allow_tf32) / self.fused.seconds(gpu, allow_tf32)


ROW_OPS = (
    ("dwconv_layernorm", "eager"),
    ("convnext_mlp", "eager"),
    ("block", "eager"),
)


def roofline_rows(batch=64, dtype="bf16", models=("tiny", "base"), ops=ROW_OPS, fused_impl="fused", passes=PASSES):
    """One row per (stage shape, op, pass): eager vs fused traffic."""
    rows = []
    for shape in stage_shapes(models, batch):
        for op, eager_impl in ops:
            for pass_ in passes:
                rows.append(RooflineRow(
                    op, shape, pass_, dtype, traffic(op, eager_impl, pass_, shape, dtype),
                    traffic(op, fused_impl, pass_, shape, dtype), eager_impl,
                ))
    return rows


OP_LABELS = {"dwconv_layernorm": "dwconv+LN", "convnext_mlp": "MLP", "convnext_v2_mlp": "V2 MLP", "block": "block"}
