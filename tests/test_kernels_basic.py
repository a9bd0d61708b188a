"""deepport/kernels under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), checked against cpu_ref."""
import pytest
import torch

from deepport.backends.cpu_ref import ops as ref
from deepport.core.errors import BackendError, ContractError
from deepport.core.formats import E4M3FN, E4M3FNUZ, quantize_weight
from deepport.kernels import (act_quant as k_act_quant, fp8_gemm as k_fp8_gemm, moe_gate as k_moe_gate,
                              rms_norm as k_rms_norm, rope as k_rope, silu_mul as k_silu_mul,
                              weight_dequant as k_weight_dequant)

DTYPES = [torch.float32, torch.bfloat16]
FORMATS = [E4M3FN, E4M3FNUZ]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _assert_close(got, want, dtype):
    assert got.dtype == want.dtype and got.shape == want.shape
    if dtype == torch.bfloat16:  # both round the same fp32 value once (RTNE): equal, or one ulp apart
        torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=1e-5)
    else:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 300), (1, 7168), (4, 130)])
def test_rms_norm(dtype, shape):
    g = _gen(1)
    x = torch.randn(*shape, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    _assert_close(k_rms_norm.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_fused_residual(dtype):
    g = _gen(2)
    x, res = (torch.randn(2, 3, 200, generator=g).to(dtype) for _ in range(2))
    w = torch.randn(200, generator=g).to(dtype)
    y, r = k_rms_norm.rms_norm(x, w, 1e-6, res)
    y_ref, r_ref = ref.rms_norm(x, w, 1e-6, res)
    assert torch.equal(r, r_ref)  # one rounding of an exact fp32 sum: bit-identical
    _assert_close(y, y_ref, dtype)


def test_rms_norm_refuses_mismatched_weight():
    x = torch.randn(2, 64, generator=_gen(3))
    with pytest.raises(ContractError, match="weight dim"):
        k_rms_norm.rms_norm(x, torch.ones(32), 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 600), (1, 2 * 2048), (2, 2 * 1100)])
def test_silu_mul(dtype, shape):
    x = (3 * torch.randn(*shape, generator=_gen(4))).to(dtype)
    _assert_close(k_silu_mul.silu_mul(x), ref.silu_mul(x), dtype)


def test_silu_mul_refuses_odd_width():
    with pytest.raises(ContractError, match="even"):
        k_silu_mul.silu_mul(torch.randn(2, 7, generator=_gen(5)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_interleaved_on_strided_view(dtype):
    g = _gen(6)
    x = torch.randn(2, 3, 5, 64 + 16, generator=g).to(dtype)[..., 16:]  # the rope part of a wider row
    angle = 6 * torch.rand(2, 3, 32, generator=g)
    got = k_rope.rope(x, angle.cos(), angle.sin())
    _assert_close(got, ref.rope(x, angle.cos(), angle.sin()), dtype)


def test_rope_refuses_odd_dim():
    with pytest.raises(ContractError, match="even"):
        k_rope.rope(torch.randn(1, 1, 1, 5, generator=_gen(7)), torch.ones(1, 1, 2), torch.ones(1, 1, 2))


def _codes_equal(a, b):
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", DTYPES)
def test_act_quant_codes_and_scales_exact(fmt, dtype):
    g = _gen(8)
    x = (torch.randn(3, 5, 512, generator=g) * torch.logspace(-5, 3, 512)).to(dtype)  # wide dynamic range
    x[0, 0, :128] = 0  # an all-zero block: amax floor 1e-4
    x[1, 0, 128:256] *= 1e-6  # tiny values rounding to (signed) zero and fp8 subnormals
    codes, s = k_act_quant.act_quant(x, fmt)
    codes_ref, s_ref = ref.act_quant(x, fmt)
    assert codes.dtype == fmt.dtype and s.shape == (3, 5, 4)
    assert torch.equal(s, s_ref)
    assert _codes_equal(codes, codes_ref)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_act_quant_rounds_ties_to_even_and_keeps_signed_zero(fmt):
    # x / s lands exactly on fp8 midpoints: the interpreter's own cast rounds these away from zero
    grid = torch.arange(0, 128, dtype=torch.uint8).view(fmt.dtype).float()
    grid = grid[torch.isfinite(grid)]
    mids = (grid[:-1] + grid[1:]) / 2
    mids = mids[mids < fmt.act_max][-120:]  # the largest midpoints: the normal range
    row = torch.zeros(128)
    row[: mids.numel()] = mids
    row[127] = fmt.act_max  # amax -> s = 1 exactly
    row[100:120] = -row[100:120]
    row[126] = -1e-30  # rounds to zero: -0 in e4m3fn, +0 in e4m3fnuz (its 0x80 is NaN)
    codes, s = k_act_quant.act_quant(row.unsqueeze(0), fmt)
    codes_ref, _ = ref.act_quant(row.unsqueeze(0), fmt)
    assert float(s) == 1.0
    assert _codes_equal(codes, codes_ref)


def test_act_quant_refuses_ragged_k():
    with pytest.raises(ContractError, match="multiple of the block"):
        k_act_quant.act_quant(torch.randn(2, 100, generator=_gen(9)), E4M3FN)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_weight_dequant_ragged_blocks(fmt, out_dtype):
    codes, scale = quantize_weight(torch.randn(200, 300, generator=_gen(10)), fmt)  # partial edge blocks
    got = k_weight_dequant.weight_dequant(codes, scale, 128, out_dtype)
    assert torch.equal(got, ref.weight_dequant(codes, scale, 128, out_dtype))


def test_weight_dequant_refuses_wrong_grid():
    codes, scale = quantize_weight(torch.randn(200, 300, generator=_gen(11)))
    with pytest.raises(ContractError, match="ceil"):
        k_weight_dequant.weight_dequant(codes, scale[:1], 128)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("m,n,k", [(5, 200, 256), (70, 130, 384), (1, 64, 128)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_fp8_gemm_ragged_edges(fmt, m, n, k, out_dtype):
    g = _gen(12)
    a, a_scale = ref.act_quant(torch.randn(m, k, generator=g), fmt)
    b, b_scale = quantize_weight(torch.randn(n, k, generator=g), fmt)
    got = k_fp8_gemm.fp8_gemm(a, a_scale, b, b_scale, out_dtype)
    want = ref.fp8_gemm(a, a_scale, b, b_scale, out_dtype)
    assert got.shape == (m, n) and got.dtype == out_dtype
    # per-block dots are exact in fp32; only the promotion sum's order may differ
    torch.testing.assert_close(got.float(), want.float(), rtol=8e-3 if out_dtype == torch.bfloat16 else 1e-5,
                               atol=1e-4 * k ** 0.5)


def test_fp8_gemm_refuses_mixed_formats_and_ragged_k():
    a, a_scale = ref.act_quant(torch.randn(4, 256, generator=_gen(13)), E4M3FN)
    b, b_scale = quantize_weight(torch.randn(64, 256, generator=_gen(14)), E4M3FNUZ)
    with pytest.raises(ContractError, match="share one fp8 dtype"):
        k_fp8_gemm.fp8_gemm(a, a_scale, b, b_scale)
    with pytest.raises(ContractError, match="multiple of 128"):
        k_fp8_gemm.fp8_gemm(a[:, :200], a_scale, b.view(torch.uint8)[:, :200].view(E4M3FN.dtype), b_scale)


def _same_routing(got, want):
    (w, ids), (w_ref, ids_ref) = got, want
    ids_sorted, order = ids.sort(1)
    ids_ref_sorted, order_ref = ids_ref.sort(1)
    assert torch.equal(ids_sorted, ids_ref_sorted)
    torch.testing.assert_close(w.gather(1, order), w_ref.gather(1, order_ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("m,d,e,n_groups,topk_groups,topk,dtype", [
    (5, 100, 16, 4, 2, 4, torch.float32),     # ragged D, 4 groups
    (33, 64, 256, 8, 4, 8, torch.bfloat16),   # DeepSeek-V3's routing shape, ragged M
    (3, 40, 8, 1, 1, 2, torch.float32),       # no groups
    (4, 32, 12, 3, 2, 3, torch.bfloat16),     # E not a power of two
    (4, 32, 8, 8, 4, 4, torch.float32),       # one expert per group: group score is that expert's
])
def test_moe_gate_matches_reference(m, d, e, n_groups, topk_groups, topk, dtype):
    g = _gen(15)
    x = torch.randn(m, d, generator=g).to(dtype)
    weight = (0.1 * torch.randn(e, d, generator=g)).to(dtype)
    bias = 0.1 * torch.randn(e, generator=g)
    got = k_moe_gate.moe_gate(x, weight, bias, n_groups, topk_groups, topk, 2.5)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.int64
    _same_routing(got, ref.moe_gate(x, weight, bias, n_groups, topk_groups, topk, 2.5))


def test_moe_gate_bias_selects_but_does_not_weight():
    # a large bias on experts 1 and 2 forces their choice; their weights still come from unbiased scores
    g = _gen(16)
    x, weight = torch.randn(3, 32, generator=g), torch.randn(8, 32, generator=g)
    bias = torch.zeros(8)
    bias[[1, 2]] = 10.0
    w, ids = k_moe_gate.moe_gate(x, weight, bias, 1, 1, 2, 1.0)
    assert sorted(ids[0].tolist()) == [1, 2]
    scores = torch.sigmoid(x @ weight.T)[:, [1, 2]]
    torch.testing.assert_close(w.sort(1).values, (scores / scores.sum(1, keepdim=True)).sort(1).values)


def test_moe_gate_refuses_inconsistent_groups():
    with pytest.raises(ContractError, match="inconsistent"):
        k_moe_gate.moe_gate(torch.randn(2, 16), torch.randn(8, 16), torch.zeros(8), 3, 1, 2, 1.0)
