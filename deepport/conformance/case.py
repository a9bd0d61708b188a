"""A conformance case: one named, seeded input factory for one op contract, plus the builders cases share."""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from deepport.core.checkpoint import attach_bf16, attach_fp8_codes, bf16_of, fp8_codes_of
from deepport.core.formats import Fp8Format, Fp8Weight, dequantize_weight, quantize_weight
from deepport.core.formats import fp8_format as lookup_format

TIERS = ("quick", "full")
CASE_DTYPES = ("fp8", "bf16")
COMPARES = ("allclose", "quant", "routing", "exact", "nucleus", "distribution", "seeded")
OUT_DTYPES = ("", "fp32")


@dataclass(frozen=True)
class Case:
    """One case. `make(device="cpu", fp8_format="e4m3fn") -> dict` of keyword arguments for the contract.

    name: `<op>_<variant>_<dtype>`, unique. dtype: the capability the case needs (fp8 cases carry fp8
    codes; bf16 cases bf16 activations). compare: how compare.py judges it. reduction: the reduction
    length atol is scaled by (sqrt). reference: "fp64" (cpu_ref on fp64 upcasts) or "native" (cpu_ref
    on the case's own dtypes, for ops whose contract rounds intermediates, e.g. fp8 experts).
    out_dtype: "fp32" when the op's outputs are fp32 (fp32 inputs, or out_dtype=float32): the tolerance row is
    then fp32's (tolerances.py); "" = the case dtype's row. expect: optional `expect(inputs) -> value` that
    replaces cpu_ref's answer (collectives across ranks: the sum or exchange of every rank's seeded inputs).
    magnitude: the largest |intermediate| whose rounding sets the error where that is far from unit scale
    (attention: the largest |scaled score|); tolerances.MAGNITUDE_ATOL x magnitude is added to atol; 0 = unit scale.
    compare "seeded": the runner calls the op three times (the case's generator, a fresh one with the same
    seed, one with another seed) and compare.py judges the three draws.
    """

    name: str
    op: str
    dtype: str
    tier: str
    make: Callable[..., dict] = field(repr=False)
    compare: str = "allclose"
    reduction: int = 1
    note: str = ""
    reference: str = "fp64"
    out_dtype: str = ""
    magnitude: float = 0.0
    expect: Callable[[dict], object] | None = field(default=None, repr=False, compare=False)

    @property
    def seed(self) -> int:
        return case_seed(self.name)


def case_seed(name: str) -> int:
    """Stable per-case seed (crc32 of the name): reordering or adding cases never changes another's inputs."""
    return zlib.crc32(name.encode())


def to_device(value, device):
    """Move a case argument (tensor, Fp8Weight, list/tuple of them) to `device`; copies, so ops may write in place."""
    if isinstance(value, torch.Tensor):
        out = value.to(device, copy=True)
        codes = fp8_codes_of(value)  # an FP8 checkpoint's weight served dequantised keeps its codes (served_fp8_weight)
        if codes is not None:
            attach_fp8_codes(out, to_device(codes, device))
        w16 = bf16_of(value)  # and a bf16 weight served as fp32 its bf16 values (served_bf16_weight)
        if w16 is not None:
            attach_bf16(out, to_device(w16, device))
        return out
    if isinstance(value, Fp8Weight):
        return Fp8Weight(to_device(value.weight, device), to_device(value.scale_inv, device), value.block,
                         value.scale_fmt)
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (torch.Tensor, Fp8Weight)):
        return type(value)(to_device(v, device) for v in value)
    return value  # scalars, formats, int lists, torch.Generator (sampling draws on the host)


def case(op: str, variant: str, dtype: str, tier: str, build: Callable, **kw) -> Case:
    """Make a Case whose inputs come from `build(g, fmt) -> dict` with g seeded from the case name."""
    name = f"{op}_{variant}_{dtype}"

    def make(device="cpu", fp8_format: str | Fp8Format = "e4m3fn") -> dict:
        g = torch.Generator().manual_seed(case_seed(name))
        inputs = build(g, lookup_format(fp8_format))
        return {k: to_device(v, device) for k, v in inputs.items()}

    return Case(name, op, dtype, tier, make, **kw)



# ---- seeded builders (never zeros) -------------------------------------------------------------

def randn(g: torch.Generator, *shape, dtype=torch.bfloat16, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * std + mean).to(dtype)


def uniform(g: torch.Generator, *shape, lo: float = -1.0, hi: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    return (torch.rand(*shape, generator=g) * (hi - lo) + lo).to(dtype)


def fp8_weight(g: torch.Generator, *shape, fmt: Fp8Format, std: float = 1.0, scale_fmt: str = "fp32") -> Fp8Weight:
    """A block-quantised weight [..., N, K] from seeded normals (edge blocks partial when N, K are ragged);
    scale_fmt "ue8m0": power-of-two scales, and activations it meets get power-of-two scales too (DeepSeek-V3.1)."""
    if len(shape) > 2:  # expert stacks: one expert at a time keeps the fp32 staging small
        parts = [fp8_weight(g, *shape[1:], fmt=fmt, std=std, scale_fmt=scale_fmt) for _ in range(shape[0])]
        return Fp8Weight(torch.stack([p.weight for p in parts]), torch.stack([p.scale_inv for p in parts]),
                         scale_fmt=scale_fmt)
    codes, scale = quantize_weight(torch.randn(*shape, generator=g) * std, fmt, scale_fmt=scale_fmt)
    return Fp8Weight(codes, scale, scale_fmt=scale_fmt)


def served_fp8_weight(g: torch.Generator, *shape, std: float = 1.0) -> torch.Tensor:
    """An FP8 checkpoint's weight as a backend serving it in fp32 holds it: the e4m3fn block-quantised weight
    dequantised to fp32, its codes attached as load_into(keep_fp8_codes=True) attaches them (a backend may read
    them instead; cpu_ref reads the fp32 values)."""
    codes = fp8_weight(g, *shape, fmt=lookup_format("e4m3fn"), std=std)
    w = dequantize_weight(codes.weight, codes.scale_inv, codes.block, torch.float32)
    attach_fp8_codes(w, codes)
    return w


def served_bf16_weight(g: torch.Generator, *shape, std: float = 1.0) -> torch.Tensor:
    """A bf16 checkpoint weight (an FP8 checkpoint's lm_head) as a backend serving it in fp32 holds it: the fp32
    values, its bf16 values attached as load_into(keep_fp8_codes=True) attaches them (cpu reads those)."""
    w16 = randn(g, *shape, std=std, dtype=torch.bfloat16)
    w = w16.float()
    attach_bf16(w, w16)
    return w


def fp8_activation(g: torch.Generator, m: int, k: int, fmt: Fp8Format, std: float = 1.0):
    """Activation codes [M, K] and 1x128 scales [M, K/128], quantised by the reference act_quant."""
    from deepport.backends.cpu_ref.ops import act_quant

    return act_quant(randn(g, m, k, std=std), fmt)


def tie_rows(g: torch.Generator, rows: int, k: int, fmt: Fp8Format, dtype=torch.bfloat16, every: int = 1) -> torch.Tensor:
    """Rows [rows, k] whose 1x128 blocks sit on fp8 rounding ties: each block's amax a (a bf16 value in [1, 8), so
    s = a / act_max is inexact and so is 1/s) and elements bf16(m * s) for random fp8 midpoints m, random signs.
    Many x / s are then exact midpoints: dividing and multiplying by 1/s round them to codes one ulp apart.
    every: only every `every`-th element is put on a midpoint; the others are N(0, 1/3) x a, clamped under a."""
    vals = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fmt.dtype).float()  # every bit pattern
    vals = vals[torch.isfinite(vals) & (vals > 0) & (vals <= fmt.act_max)].unique()
    mids = (vals[1:] + vals[:-1]) / 2
    nb = k // 128
    amax = (torch.rand(rows, nb, 1, generator=g) * 7 + 1).to(dtype).float()
    s = amax / fmt.act_max
    m = mids[torch.randint(0, mids.numel(), (rows, nb, 128), generator=g)]
    sign = torch.randint(0, 2, (rows, nb, 128), generator=g).float() * 2 - 1
    x = (m * s * sign).to(dtype).float()
    if every > 1:
        free = torch.arange(128) % every != 0
        rest = (torch.randn(rows, nb, 128, generator=g) / 3 * amax).clamp(-0.99 * amax, 0.99 * amax)
        x = torch.where(free, rest.to(dtype).float(), x)
    x[..., 0] = amax[..., 0]
    return x.flatten(1).to(dtype)


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised torch.distributed group, (0, 1) outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def v3_args():
    """DeepSeek-V3 (671B) hyper-parameters: the dims and YaRN softmax scale cases use."""
    from deepport.core.config import preset

    return preset("v3-671b")
