"""FP8 formats, 128x128 block quantisation of weights, and the Fp8Weight container."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from deepport.core.errors import ConfigError, ContractError

FP8_BLOCK = 128
AMAX_FLOOR = 1e-4  # DeepSeek's act_quant clamp: s = max(amax, 1e-4) / max
# Block-scale formats (HF quantization_config.scale_fmt): fp32 scales as computed, or "ue8m0" (DeepSeek-V3.1):
# every scale is a power of two, activation scales rounded *up* so x / s stays within the fp8 range.
SCALE_FMTS = ("fp32", "ue8m0")


def check_scale_fmt(scale_fmt: str, where: str) -> None:
    if scale_fmt not in SCALE_FMTS:
        raise ContractError(f"{where}: scale_fmt {scale_fmt!r} is unknown; use one of {', '.join(SCALE_FMTS)}")


def round_scale_up_pow2(s: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2 s) for positive normal fp32 s, exactly (from the bits: a non-zero mantissa bumps the exponent)."""
    bits = s.float().view(torch.int32)
    up = (bits & 0x7FFFFF) != 0
    exp = (bits >> 23) + up.to(torch.int32)
    return (exp << 23).view(torch.float32).to(s.dtype)


@dataclass(frozen=True)
class Fp8Format:
    """One fp8 encoding: torch dtype, largest finite value, and the max used for activation scales."""

    name: str
    dtype: torch.dtype
    max: float
    act_max: float  # e4m3fnuz quantises activations to 224 (headroom below 240), as vLLM/aiter do


E4M3FN = Fp8Format("e4m3fn", torch.float8_e4m3fn, 448.0, 448.0)
E4M3FNUZ = Fp8Format("e4m3fnuz", torch.float8_e4m3fnuz, 240.0, 224.0)
FORMATS = {f.name: f for f in (E4M3FN, E4M3FNUZ)}


def fp8_format(name: str | Fp8Format) -> Fp8Format:
    """Look up a format by name ('e4m3fn' or 'e4m3fnuz')."""
    if isinstance(name, Fp8Format):
        return name
    try:
        return FORMATS[name]
    except KeyError:
        raise ConfigError(f"unknown fp8 format {name!r}; use one of {sorted(FORMATS)}") from None


def format_of(dtype: torch.dtype) -> Fp8Format:
    """The Fp8Format whose torch dtype is `dtype`."""
    for f in FORMATS.values():
        if f.dtype == dtype:
            return f
    raise ContractError(f"{dtype} is not a supported fp8 dtype; use float8_e4m3fn or float8_e4m3fnuz")


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


def scale_grid(n: int, k: int, block: int = FP8_BLOCK) -> tuple[int, int]:
    """Shape of a weight's block-scale grid: ceil(n/block) x ceil(k/block)."""
    return (-(-n // block), -(-k // block))


def _expand_blocks(scale: torch.Tensor, n: int, k: int, block: int) -> torch.Tensor:
    return scale.repeat_interleave(block, dim=-2)[..., :n, :].repeat_interleave(block, dim=-1)[..., :k]


def quantize_weight(w: torch.Tensor, fmt: Fp8Format | str = E4M3FN, block: int = FP8_BLOCK, scale_fmt: str = "fp32"):
    """Block-quantise w [..., N, K] to fp8 codes and fp32 scale_inv [..., ceil(N/b), ceil(K/b)] (W = codes * s);
    scale_fmt "ue8m0" rounds each scale up to a power of two (DeepSeek-V3.1's checkpoints)."""
    fmt = fp8_format(fmt)
    check_scale_fmt(scale_fmt, "quantize_weight")
    n, k = w.shape[-2:]
    gn, gk = scale_grid(n, k, block)
    wf = w.float()
    pad = torch.zeros(*w.shape[:-2], gn * block, gk * block, dtype=torch.float32, device=w.device)
    pad[..., :n, :k] = wf
    blocks = pad.unflatten(-1, (gk, block)).unflatten(-3, (gn, block))  # [..., gn, b, gk, b]
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., gn, gk]
    scale = torch.clamp(amax, min=AMAX_FLOOR) / fmt.max
    if scale_fmt == "ue8m0":
        scale = round_scale_up_pow2(scale)
    codes = (wf / _expand_blocks(scale, n, k, block)).clamp(-fmt.max, fmt.max).to(fmt.dtype)
    return codes, scale


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, block: int = FP8_BLOCK,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes [..., N, K] * scale [..., ceil(N/b), ceil(K/b)] -> dtype."""
    n, k = codes.shape[-2:]
    return (codes.float() * _expand_blocks(scale.float(), n, k, block)).to(dtype)


def fn_to_fnuz(codes: torch.Tensor, scale: torch.Tensor):
    """Re-encode e4m3fn codes as e4m3fnuz: same bits read as half the value, -0 (0x80, NaN in fnuz) -> 0, scales x2."""
    if codes.dtype != torch.float8_e4m3fn:
        raise ContractError(f"fn_to_fnuz expects float8_e4m3fn codes, got {codes.dtype}")
    bits = codes.view(torch.int8).clone()
    bits[bits == -128] = 0
    return bits.view(torch.float8_e4m3fnuz), scale * 2.0


@dataclass
class Fp8Weight:
    """A block-quantised weight: fp8 codes [..., N, K] and fp32 scale_inv [..., ceil(N/block), ceil(K/block)].

    scale_fmt is the checkpoint's scale format; "ue8m0" also makes the activations it meets take power-of-two
    scales (act_quant's scale_fmt), as DeepSeek-V3.1 was served."""

    weight: torch.Tensor
    scale_inv: torch.Tensor
    block: int = FP8_BLOCK
    scale_fmt: str = "fp32"

    def __post_init__(self):
        check_scale_fmt(self.scale_fmt, "Fp8Weight")
        if not is_fp8(self.weight):
            raise ContractError(f"Fp8Weight.weight must be fp8, got {self.weight.dtype}")
        want = (*self.weight.shape[:-2], *scale_grid(*self.weight.shape[-2:], self.block))
        if tuple(self.scale_inv.shape) != want:
            raise ContractError(
                f"Fp8Weight scale_inv has shape {tuple(self.scale_inv.shape)}, expected {want} for a weight "
                f"{tuple(self.weight.shape)} with {self.block}x{self.block} blocks (ceil-rounded grid)")

    @property
    def fmt(self) -> Fp8Format:
        return format_of(self.weight.dtype)

    @property
    def shape(self):
        return self.weight.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_weight(self.weight, self.scale_inv, self.block, dtype)

    def __getitem__(self, i) -> "Fp8Weight":
        """Select along leading (expert) dims."""
        return Fp8Weight(self.weight[i], self.scale_inv[i], self.block, self.scale_fmt)
