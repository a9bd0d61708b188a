"""Exact rounding helpers in fp32: make the interpreter's truncating fp8/bf16 casts exact (and hardware's too)."""
import triton
import triton.language as tl


@triton.jit
def round_to_fp8_grid(y, FP8_EMIN: tl.constexpr, FP8_MAX: tl.constexpr, NEG_ZERO: tl.constexpr):
    """Round fp32 y to the nearest e4m3 value (3 mantissa bits, min normal exponent FP8_EMIN), ties to even;
    clamp to +-FP8_MAX; keep the sign of a zero only where the format has -0 (NEG_ZERO: e4m3fn; in e4m3fnuz
    that bit pattern is NaN). Scaling by powers of two is exact and the magic-number add rounds to nearest
    even, so the later cast to fp8 has nothing left to round."""
    bits = y.to(tl.int32, bitcast=True)
    exp = ((bits >> 23) & 0xFF) - 127
    exp = tl.maximum(exp, FP8_EMIN)  # fp8 subnormals share the min-normal exponent's spacing
    up = ((127 + 3 - exp) << 23).to(tl.float32, bitcast=True)  # 2^(3 - exp): the fp8 ulp becomes 1
    down = ((127 - 3 + exp) << 23).to(tl.float32, bitcast=True)  # 2^(exp - 3)
    t = y * up
    r = (t + 12582912.0) - 12582912.0  # 1.5 * 2^23: round to an integer, ties to even
    r = tl.minimum(tl.maximum(r * down, -FP8_MAX), FP8_MAX)
    if NEG_ZERO:  # values that round to zero keep their sign, as torch's cast does
        r = (r.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)
    else:
        r = r + 0.0  # -0.0 + 0.0 = +0.0
    return r


@triton.jit
def round_scale_up_pow2(s):
    """2^ceil(log2 s) for positive normal fp32 s, exactly (ue8m0 scales): a non-zero mantissa bumps the exponent."""
    bits = s.to(tl.int32, bitcast=True)
    exp = (bits >> 23) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    return (exp << 23).to(tl.float32, bitcast=True)


@triton.jit
def round_to_bf16(y):
    """Round fp32 y to the nearest bf16 value (ties to even), still as fp32."""
    bits = y.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def round_for_store(y, OUT_BF16: tl.constexpr):
    """Round fp32 y for a store into the output dtype (bf16: RTNE here; fp32: unchanged)."""
    if OUT_BF16:
        y = round_to_bf16(y)
    return y
