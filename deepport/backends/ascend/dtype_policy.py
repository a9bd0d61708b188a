"""Which Ascend chip is present and which dtypes it serves: fp8 only on the 950; 910B/910C serve BF16.

SoC version ranges follow vllm-ascend's naming (A2 = 910B, A3 = 910C, A5 = 950). An FP8 checkpoint on a
chip without FP8 matmul is dequantised to BF16 at load: the backend's fp8_format callable resolves None
there, so `api.load` picks bf16, the checkpoint loader dequantises, and a one-line notice says so.
"""
from __future__ import annotations

# (first soc, last soc, chip): torch_npu.npu.get_soc_version() values
SOC_RANGES = ((200, 205, "310P"), (220, 225, "910B"), (250, 255, "910C"), (260, 260, "950"))
SERVING_CHIPS = frozenset({"910B", "910C", "950"})  # 310P (Atlas inference series) computes float16 only
FP8_CHIPS = frozenset({"950"})  # float8_e4m3fn matmul (and MXFP8 / HiFloat8); A2/A3 have int8/int4 only


def chip_of_soc(soc: int) -> str | None:
    """The chip family ("910B", "910C", "950", "310P") of a SoC version number, or None if unknown."""
    for first, last, chip in SOC_RANGES:
        if first <= soc <= last:
            return chip
    return None


def current_soc() -> int | None:
    """SoC version of the visible NPU through torch_npu, or None when torch_npu or the device is missing."""
    try:
        import torch_npu

        return int(torch_npu.npu.get_soc_version())
    except Exception:  # no torch_npu / CANN / device: the probe reports why
        return None


def current_chip() -> str | None:
    soc = current_soc()
    return None if soc is None else chip_of_soc(soc)


def dtypes_for(chip: str | None) -> frozenset:
    """Serving dtypes on a chip: bf16 everywhere, fp8 only where the chip has FP8 matmul."""
    return frozenset({"fp8", "bf16"}) if chip in FP8_CHIPS else frozenset({"bf16"})


def fp8_format_for(chip: str | None) -> str | None:
    """The fp8 format a chip computes in: e4m3fn on the 950 (DeepSeek's checkpoint format), else None."""
    return "e4m3fn" if chip in FP8_CHIPS else None


def fp8_format() -> str | None:
    """Backend.fp8_format callable: resolved on the present device."""
    return fp8_format_for(current_chip())


def describe(chip: str | None) -> str:
    """One line for the probe: the chip and the dtypes it serves."""
    if chip in FP8_CHIPS:
        return f"Ascend {chip}: fp8 (e4m3fn) and bf16"
    return f"Ascend {chip or '(unknown chip)'}: bf16 only (FP8 checkpoints are dequantised to BF16 at load)"


def unsupported_reason(chip: str | None) -> str | None:
    """Why deepport cannot serve on this chip, or None; unknown SoCs are tried with the strict 910B limits."""
    if chip == "310P":
        return ("Ascend 310P (Atlas inference series) runs float16 only (no bf16 grouped matmul); deepport's "
                "ascend backend serves on 910B, 910C and 950")
    return None
