"""mla_prefill and mla_decode Triton kernels under the interpreter (TRITON_INTERPRET=1), checked against cpu_ref."""
import pytest
import torch

from deepport.backends.cpu_ref import ops as ref
from deepport.core.errors import ContractError
from deepport.kernels import mla_decode as k_decode, mla_prefill as k_prefill

DTYPES = [torch.float32, torch.bfloat16]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _assert_close(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.dtype == torch.bfloat16:  # both round one fp32 result once: equal or an ulp apart
        torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=2e-3)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# (B, S, T, H, Dk, Dv, causal): tiny preset dims (48 = 32 + 16), 671B dims (192 = 128 + 64), prefix in K/V,
# S and T not multiples of the 32-row tiles, and full (non-causal) attention.
PREFILL = [(2, 5, 5, 2, 48, 32, True), (1, 37, 45, 2, 48, 32, True), (1, 9, 40, 1, 192, 128, True),
           (2, 7, 19, 3, 48, 32, False), (1, 1, 70, 2, 128, 64, True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,s,t,h,dk,dv,causal", PREFILL)
def test_mla_prefill(dtype, b, s, t, h, dk, dv, causal):
    g = _gen(s * 100 + t)
    q, k = (torch.randn(b, n, h, dk, generator=g).to(dtype) for n in (s, t))
    v = torch.randn(b, t, h, dv, generator=g).to(dtype)
    scale = dk ** -0.5 * 1.3
    _assert_close(k_prefill.mla_prefill(q, k, v, causal, scale), ref.mla_prefill(q, k, v, causal, scale))


def test_mla_prefill_strided_inputs_and_small_tiles():
    g = _gen(7)
    qkv = torch.randn(2, 11, 3, 48 + 48 + 32, generator=g)  # one buffer: q, k, v are strided views
    q, k, v = qkv[..., :48], qkv[..., 48:96], qkv[..., 96:]
    got = k_prefill.mla_prefill(q, k, v, True, 0.2, configs=[{"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 2}])
    _assert_close(got, ref.mla_prefill(q, k, v, True, 0.2))


def test_mla_prefill_preconditions():
    q = torch.randn(1, 8, 1, 48, generator=_gen(8))
    with pytest.raises(ContractError, match="T >= S"):
        k_prefill.mla_prefill(q, q[:, :4], q[:, :4, :, :32], True, 0.1)
    odd = torch.randn(1, 4, 1, 40, generator=_gen(9))  # 40 = 32 + 8: remainder too small for a dot
    with pytest.raises(ContractError, match="power of two"):
        k_prefill.mla_prefill(odd, odd, odd, True, 0.1)


def _paged(lens, s, h, c, r, page, max_blocks, dtype, seed):
    """Queries and a paged latent cache whose blocks are shuffled; unused table entries hold garbage."""
    g = _gen(seed)
    b = len(lens)
    n_blocks = b * max_blocks + 3
    q_latent = torch.randn(b, s, h, c, generator=g).to(dtype)
    q_pe = torch.randn(b, s, h, r, generator=g).to(dtype)
    kv_cache = torch.randn(n_blocks, page, c, generator=g).to(dtype)
    pe_cache = torch.randn(n_blocks, page, r, generator=g).to(dtype)
    block_table = torch.randperm(n_blocks, generator=g)[:b * max_blocks].view(b, max_blocks).to(torch.int32)
    ref_table = block_table.clone()
    for i, length in enumerate(lens):
        block_table[i, -(-length // page):] = 1 << 30  # must never be read
        ref_table[i, -(-length // page):] = 0
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    return (q_latent, q_pe, kv_cache, pe_cache, block_table, seq_lens), ref_table


# (seq_lens, S, H, C, R, P, max_blocks, config): lengths not multiples of the page or of BLOCK_N, several
# pages, a batch of different lengths, S > 1 (MTP verification), several KV splits with empty ones,
# and DeepSeek-V3's 512 + 64 latent.
DECODE = [
    ([5, 23], 1, 2, 64, 16, 8, 4, {"BLOCK_N": 16, "MIN_SPLIT_TOKENS": 8}),
    ([19, 3, 40], 3, 4, 128, 16, 16, 3, {"BLOCK_N": 16, "MIN_SPLIT_TOKENS": 16}),
    ([33], 2, 3, 64, 16, 16, 4, None),
    ([32, 16, 48], 1, 2, 64, 16, 16, 3, {"BLOCK_N": 16, "MIN_SPLIT_TOKENS": 16}),  # exact page/split multiples
    ([7, 2], 2, 2, 512, 64, 16, 1, None),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens,s,h,c,r,page,max_blocks,config", DECODE)
def test_mla_decode(dtype, lens, s, h, c, r, page, max_blocks, config):
    args, ref_table = _paged(lens, s, h, c, r, page, max_blocks, dtype, seed=sum(lens) + s)
    got = k_decode.mla_decode(*args, 0.11, configs=[config] if config else None)
    q_latent, q_pe, kv_cache, pe_cache, _, seq_lens = args
    _assert_close(got, ref.mla_decode(q_latent, q_pe, kv_cache, pe_cache, ref_table, seq_lens, 0.11))


def test_mla_decode_splits_agree_with_one_split():
    args, _ = _paged([61, 17], 2, 2, 64, 16, 8, 8, torch.float32, seed=11)
    one = k_decode.mla_decode(*args, 0.2, configs=[{"BLOCK_N": 16, "MAX_SPLITS": 1}])
    many = k_decode.mla_decode(*args, 0.2, configs=[{"BLOCK_N": 16, "MIN_SPLIT_TOKENS": 16, "MAX_SPLITS": 4}])
    assert k_decode.num_kv_splits(64, 4, 16) == 4
    assert k_decode.num_kv_splits(64, 4, 16, programs=100, target_programs=256) == 3  # enough programs: fewer splits
    assert k_decode.num_kv_splits(64, 4, 16, programs=300, target_programs=256) == 1
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-6)


def test_mla_decode_preconditions():
    args, _ = _paged([4], 1, 2, 64, 16, 8, 1, torch.float32, seed=12)
    q_latent, q_pe, kv_cache, pe_cache, block_table, seq_lens = args
    with pytest.raises(ContractError, match="inconsistent"):
        k_decode.mla_decode(q_latent, q_pe, kv_cache[..., :32], pe_cache, block_table, seq_lens, 0.1)
    with pytest.raises(ContractError, match="B=1 rows"):
        k_decode.mla_decode(q_latent, q_pe, kv_cache, pe_cache, block_table, seq_lens.repeat(2), 0.1)
