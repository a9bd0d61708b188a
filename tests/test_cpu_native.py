"""The cpu backend's C kernels (deepport/backends/cpu/native: MoE experts, expert selection, MLA decode, linear by
fp8 codes): their values against cpu_ref on seeded inputs, fp32 and read from fp8 codes; when the ops use them;
the fp8 codes load keeps; the portable build; and what happens without a compiler or a writable cache."""
import sys
from pathlib import Path

import pytest
import torch

import deepport
from deepport.backends.cpu import native
from deepport.backends.cpu import ops as cpu
from deepport.backends.cpu_ref import ops as ref
from deepport.core import checkpoint
from deepport.core.errors import ContractError
from deepport.core.formats import Fp8Weight, dequantize_weight, fp8_format, quantize_weight

pytestmark = pytest.mark.skipif(not native.available(), reason=f"C kernel not built here: {native.status()}")

sys.path.insert(0, str(Path(__file__).parent))
from test_cpu_backend import one_thread  # noqa: E402,F401  (autouse: one torch thread, as the kernels' rules assume)


def _fp8(w):
    """Stacked [E, N, K] -> (Fp8Weight of e4m3fn codes, the fp32 weight those codes dequantise to)."""
    fmt = fp8_format("e4m3fn")
    codes, scales = zip(*(quantize_weight(w[i], fmt) for i in range(w.shape[0])))
    c, s = torch.stack(codes), torch.stack(scales).float()
    return Fp8Weight(c, s), dequantize_weight(c, s, 128, torch.float32)


def _case(seed, m, d, i, e, k):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=g)
    (c1, w1), (c3, w3) = (_fp8(torch.randn(e, i, d, generator=g) / d ** 0.5) for _ in range(2))
    c2, w2 = _fp8(torch.randn(e, d, i, generator=g) / i ** 0.5)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(m)])
    return x, torch.rand(m, k, generator=g), ids, (w1, w2, w3), (c1, c2, c3)


# odd sizes: K tails past the 8-lane vectors, an odd I (last gate/up row pair), D not a multiple of 4 rows, more
# than 128 columns (two fp8 scale blocks a row), 1-16 tokens (blocks of 1, 2, 3 and 4 tokens an expert)
@pytest.mark.parametrize("m,d,i,e,k", [(1, 256, 128, 16, 4), (2, 256, 128, 16, 4), (3, 136, 17, 3, 3),
                                       (8, 300, 200, 9, 2), (16, 40, 24, 7, 3), (5, 7, 5, 2, 2)])
@pytest.mark.parametrize("codes", [False, True])
def test_c_kernel_matches_cpu_ref(m, d, i, e, k, codes):
    x, w, ids, (w1, w2, w3), fp8 = _case(100 * m + d, m, d, i, e, k)
    ids[0, 0] = -1  # an unused slot contributes nothing
    want = ref.moe_experts(x.double(), w.double(), ids, w1.double(), w2.double(), w3.double())
    got = native.moe_experts(x, w, ids, w1, w2, w3, fp8 if codes else None)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert got.abs().max() > 0.1  # not a zero output passing by tolerance


def test_c_kernel_refuses_an_expert_id_past_the_experts():
    x, w, ids, (w1, w2, w3), _ = _case(7, 2, 32, 16, 4, 2)
    ids[1, 1] = 4
    with pytest.raises(ContractError, match="expert id >= 4"):
        native.moe_experts(x, w, ids, w1, w2, w3)


def test_op_uses_the_kernel_up_to_16_tokens_and_the_torch_strategies_past_it(monkeypatch):
    calls = []
    monkeypatch.setattr(native, "moe_experts", lambda *a: calls.append(a[0].shape[0]) or ref.moe_experts(*a[:6]))
    for m in (1, 16, 17):
        x, w, ids, (w1, w2, w3), _ = _case(m, m, 64, 32, 8, 2)
        cpu.moe_experts(x, w, ids, w1, w2, w3)
    assert calls == [1, 16]
    big = torch.zeros(2, 1024, 512)  # 6 MiB an expert: C for fp8 codes or <= 2 tokens, on one thread or in a
    assert cpu._use_native(torch.zeros(8, 512), big, big.transpose(1, 2).contiguous(), big, fp8=True)  # parallel build
    assert not cpu._use_native(torch.zeros(8, 512), big, big.transpose(1, 2).contiguous(), big, fp8=False)
    torch.set_num_threads(2)
    assert cpu._use_native(torch.zeros(1, 512), big, big.transpose(1, 2).contiguous(), big, fp8=True) == \
        native.parallel()


def test_load_keeps_the_fp8_expert_codes_the_weights_were_dequantised_from():
    m = deepport.load(backend="cpu")
    experts = m.transformer.layers[1].ffn.experts
    for name in ("w1", "w2", "w3"):
        w = getattr(experts, name)
        codes = checkpoint.fp8_codes_of(w)
        assert codes is not None and codes.weight.dtype == torch.float8_e4m3fn
        assert torch.equal(dequantize_weight(codes.weight, codes.scale_inv, 128, torch.float32), w)
    with torch.no_grad():
        experts.w1.mul_(2)  # changed in place: the codes no longer hold its values
    assert checkpoint.fp8_codes_of(experts.w1) is None and checkpoint.fp8_codes_of(experts.w2) is not None
    assert "native: C (" in m.op_sources()["moe_experts"]


def test_greedy_tokens_and_logits_with_and_without_the_kernel(monkeypatch):
    m = deepport.load(backend="cpu")
    prompts = ["def fibonacci(n):\n", "import os\nimport sys\n"]
    ids = torch.tensor([m.encode(prompts[0])])
    with_c = m.generate_batch(prompts, max_new_tokens=16)
    logits_c = m.logits(ids)
    monkeypatch.setattr(cpu, "_use_native", lambda *a: False)
    monkeypatch.setattr(cpu, "_native_rms", lambda *a: False)
    without = m.generate_batch(prompts, max_new_tokens=16)
    assert [r.tokens for r in with_c] == [r.tokens for r in without]
    torch.testing.assert_close(logits_c, m.logits(ids), rtol=1e-4, atol=1e-4)


def test_without_a_compiler_the_torch_strategies_run_and_the_sources_say_why(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("DEEPPORT_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_compiler", lambda: None)
    native._loaded.cache_clear()
    try:
        assert not native.available() and "no C compiler" in native.status()
        assert "C kernels are not in use: no C compiler found" in capsys.readouterr().err
        x, w, ids, (w1, w2, w3), _ = _case(3, 4, 64, 32, 8, 2)
        want = ref.moe_experts(x, w, ids, w1, w2, w3)
        torch.testing.assert_close(cpu.moe_experts(x, w, ids, w1, w2, w3), want, rtol=1e-5, atol=1e-5)
        m = deepport.load(backend="cpu")
        assert "no C compiler" in m.op_sources()["moe_experts"]
        assert checkpoint.fp8_codes_of(m.transformer.layers[1].ffn.experts.w1) is None  # no codes kept for nothing
        monkeypatch.setenv("DEEPPORT_CPU_NATIVE", "0")
        native._loaded.cache_clear()
        assert native.status() == "off (DEEPPORT_CPU_NATIVE=0)"
        assert "C kernels" not in capsys.readouterr().err
    finally:
        native._loaded.cache_clear()


def test_the_kernel_builds_into_the_cache_once(monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPPORT_CACHE", str(tmp_path))
    native._loaded.cache_clear()
    try:
        assert native.available()
        built = list((tmp_path / "native").glob("kernels-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        native._loaded.cache_clear()
        assert native.available() and built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
        assert list((tmp_path / "native").iterdir()) == built  # no temporary file left behind
    finally:
        native._loaded.cache_clear()


def test_every_e4m3_code_reads_as_its_value():
    """One-hot tokens pick one column each: over 256 columns, every non-NaN code (subnormals, -0, both signs)
    of w1 and w3 meets the kernel's conversion, against cpu_ref on the dequantised weights."""
    e, i, d = 1, 8, 256
    raw = (torch.arange(d).unsqueeze(0) + 37 * torch.arange(i).unsqueeze(1)) % 256
    raw[(raw == 0x7F) | (raw == 0xFF)] = 0  # NaN codes are refused at load
    codes = raw.to(torch.uint8).view(torch.float8_e4m3fn).unsqueeze(0)
    scale = torch.full((e, 1, 2), 0.5)
    c13 = Fp8Weight(codes, scale)
    c2 = Fp8Weight(codes.transpose(1, 2).contiguous()[:, :, :i].contiguous(), torch.full((e, 2, 1), 0.25))
    w13 = dequantize_weight(codes, scale, 128, torch.float32)
    w2 = dequantize_weight(c2.weight, c2.scale_inv, 128, torch.float32)
    for start in range(0, d, 16):
        x = torch.zeros(16, d)
        x[torch.arange(16), start + torch.arange(16)] = 1.0
        ids, wts = torch.zeros(16, 1, dtype=torch.int64), torch.ones(16, 1)
        want = ref.moe_experts(x.double(), wts.double(), ids, w13.double(), w2.double(), w13.double())
        got = native.moe_experts(x, wts, ids, w13, w2, w13, (c13, c2, c13))
        # fp32 sums of 8 products cancel near 0: the bound is relative to the largest output (a misread code is off
        # by at least one code step, about 6% of its value)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("e,groups,topk_groups,k", [(16, 4, 2, 4), (256, 8, 4, 8), (64, 1, 1, 6), (8, 8, 3, 3)])
@pytest.mark.parametrize("m", [1, 2, 5, 16])
def test_c_routing_picks_what_cpu_ref_picks(e, groups, topk_groups, k, m):
    g = torch.Generator().manual_seed(e + m)
    x, w, bias = torch.randn(m, 64, generator=g), torch.randn(e, 64, generator=g), torch.randn(e, generator=g) * 0.01
    for norm in (True, False):
        want_w, want_ids = ref.moe_gate(x, w, bias, groups, topk_groups, k, 2.5, norm)
        got_w, got_ids = cpu.moe_gate(x, w, bias, groups, topk_groups, k, 2.5, norm)
        assert torch.equal(got_ids, want_ids)
        torch.testing.assert_close(got_w, want_w.float(), rtol=1e-5, atol=1e-6)
    # exact ties (equal biased scores, equal group sums) go to the lower index, as the host selection picks
    biased = torch.sigmoid(x @ w.T) + bias
    biased[:, 3] = biased[:, 1]
    biased[:, e - 1] = biased[:, 0]
    if groups >= 2:
        biased[:, e // groups: 2 * (e // groups)] = biased[:, : e // groups]  # groups 0 and 1: equal sums
    want = cpu._route_on_host(biased, groups, topk_groups, k)
    tail_w, tail_ids = native.moe_gate_tail(biased, torch.zeros(e), groups, topk_groups, k, 2.5, True)  # same ties
    assert torch.equal(tail_ids, want)
    torch.testing.assert_close(tail_w, biased.gather(1, want) * (2.5 / biased.gather(1, want).sum(-1, keepdim=True)))


def test_gate_routes_in_c_up_to_16_tokens_without_grad(monkeypatch):
    calls = []
    real = native.moe_gate_tail
    monkeypatch.setattr(native, "moe_gate_tail", lambda s, *a: calls.append(s.shape[0]) or real(s, *a))
    g = torch.Generator().manual_seed(0)
    w, bias = torch.randn(16, 32, generator=g), torch.zeros(16)
    for m in (1, 16, 17):
        cpu.moe_gate(torch.randn(m, 32, generator=g), w, bias, 4, 2, 4, 1.0)
    weights, _ = cpu.moe_gate(torch.randn(2, 32, generator=g, requires_grad=True), w, bias, 4, 2, 4, 1.0)
    assert calls == [1, 16] and weights.requires_grad  # training: torch's path, the weights keep their gradient


def _attention_case(seed, b, s, h, c, r, p, lens, nb=32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, h, c, generator=g), torch.randn(b, s, h, r, generator=g)
    kv, pe = torch.randn(nb, p, c, generator=g), torch.randn(nb, p, r, generator=g)
    blocks = max(-(-n // p) for n in lens) + 1
    table = torch.stack([torch.randperm(nb, generator=g)[:blocks] for _ in range(b)]).int()
    return (*q, kv, pe, table, torch.tensor(lens, dtype=torch.int32))


# ragged rows, S new queries each (causal among them), heads not a multiple of the kernel's block of 4, latent
# and rope widths off the 8-lane vectors, a length on a block edge, a long row
@pytest.mark.parametrize("b,s,h,c,r,p,lens", [(1, 1, 4, 128, 16, 16, [37]), (3, 2, 4, 128, 16, 16, [5, 40, 16]),
                                              (2, 3, 5, 33, 7, 4, [3, 9]), (8, 1, 4, 128, 16, 16, [70] * 8),
                                              (1, 2, 3, 64, 8, 64, [900])])
def test_c_decode_matches_cpu_ref(b, s, h, c, r, p, lens):
    args = _attention_case(b + s + c, b, s, h, c, r, p, lens)
    want = ref.mla_decode(*(a.double() if a.is_floating_point() else a for a in args), 0.125)
    got = native.mla_decode(*args, 0.125)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cpu.mla_decode(*args, 0.125).double(), want, rtol=1e-5, atol=1e-5)  # via the op


@pytest.mark.parametrize("b,s,h,c,r", [(1, 2, 4, 128, 16), (3, 2, 4, 128, 16), (2, 1, 4, 128, 16),
                                       (1, 2, 128, 512, 64)])  # the last: DeepSeek-V3's heads and widths, S=2 (MTP)
def test_c_decode_reads_strided_queries_in_place_and_writes_heads_first(b, s, h, c, r):
    """The decode graph hands the kernel views: q_latent heads-first ([H, B*S, C] memory, the batched product's
    output), q_pe a split of rope's [.., H + 1, R]. Same values as contiguous copies; the output's memory is
    heads-first (the next batched product reads it without a copy)."""
    ql, qp, kv, pe, table, lens = _attention_case(b * 10 + s, b, s, h, c, r, 16, [20 + 3 * i for i in range(b)])
    heads_first = ql.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)  # [B, S, H, C] over [H, B, S, C]
    with_key = torch.cat((qp, torch.randn(b, s, 1, r)), dim=2)[:, :, :h]  # [B, S, H, R] over [B, S, H + 1, R]
    assert not heads_first.is_contiguous() and not with_key.is_contiguous()
    want = ref.mla_decode(*(a.double() if a.is_floating_point() else a for a in (ql, qp, kv, pe, table, lens)), 0.125)
    got = native.mla_decode(heads_first, with_key, kv, pe, table, lens, 0.125)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert got.permute(2, 0, 1, 3).is_contiguous()
    last_dim_strided = torch.randn(b, s, h, 2 * c)[..., ::2].copy_(ql)  # no unit stride: copied once, same values
    torch.testing.assert_close(native.mla_decode(last_dim_strided, qp, kv, pe, table, lens, 0.125), got,
                               rtol=0, atol=0)


def test_decode_with_a_query_part_not_in_fp32_does_not_reach_the_kernel():
    """The kernel reads both query parts' bytes as fp32: a q_pe of another dtype takes the torch path (in fp32)."""
    ql, qp, kv, pe, table, lens = _attention_case(9, 2, 2, 4, 128, 16, 16, [20, 33])
    want = ref.mla_decode(ql.double(), qp.double(), kv.double(), pe.double(), table, lens, 0.125)
    for other in (torch.float64, torch.bfloat16):
        q = qp.to(other)
        got = cpu.mla_decode(ql, q, kv, pe, table, lens, 0.125)
        assert got.dtype == torch.float32
        tol = 1e-5 if other == torch.float64 else 2e-2
        torch.testing.assert_close(got.double(), ref.mla_decode(ql.double(), q.double(), kv.double(), pe.double(),
                                                                table, lens, 0.125), rtol=tol, atol=tol)
    torch.testing.assert_close(cpu.mla_decode(ql, qp, kv, pe, table, lens, 0.125).double(), want, rtol=1e-5,
                               atol=1e-5)


def test_c_decode_refuses_a_block_id_outside_the_pool():
    ql, qp, kv, pe, table, lens = _attention_case(5, 2, 1, 4, 16, 8, 4, [6, 3])
    table[0, 1] = kv.shape[0]  # in use: row 0 holds 6 tokens in blocks of 4
    with pytest.raises(ContractError, match="block id outside"):
        native.mla_decode(ql, qp, kv, pe, table, lens, 0.5)


def test_op_uses_the_c_decode_on_one_thread_or_in_a_parallel_build(monkeypatch):
    calls = []
    monkeypatch.setattr(native, "mla_decode", lambda *a: calls.append(a[0].shape[0]) or ref.mla_decode(*a))
    case = _attention_case(1, 2, 1, 4, 16, 8, 4, [6, 3])
    cpu.mla_decode(*case, 0.5)
    torch.set_num_threads(2)  # torch's batched GEMMs split across threads; a serial build's kernel does not
    cpu.mla_decode(*case, 0.5)
    assert calls == ([2, 2] if native.parallel() else [2])


@pytest.mark.skipif(not native.parallel(), reason=f"no parallel (OpenMP) build here: {native.status()}")
def test_the_parallel_build_runs_on_torchs_own_openmp_and_gives_one_threads_values():
    """Built with -fopenmp, the library resolves libgomp.so.1 to the copy torch loaded (one OpenMP runtime in the
    process, one thread count); on two threads each kernel's values are bit for bit those of one thread (every
    output is summed in the same order) and match cpu_ref. The shapes are large enough to split."""
    import re

    maps = Path("/proc/self/maps").read_text()
    runtimes = {Path(line.split()[-1]).resolve() for line in maps.splitlines() if re.search(r"lib[gi]?omp", line)}
    assert len(runtimes) == 1, runtimes
    x, w, ids, (w1, w2, w3), fp8 = _case(21, 8, 264, 136, 12, 3)
    lin_codes, lin_w = _fp8(torch.randn(1, 520, 520, generator=torch.Generator().manual_seed(5)) / 520 ** 0.5)
    lin_codes = Fp8Weight(lin_codes.weight[0], lin_codes.scale_inv[0])
    xl = torch.randn(3, 520, generator=torch.Generator().manual_seed(6))
    att = _attention_case(8, 2, 1, 8, 64, 16, 8, [300, 97], nb=96)

    w16 = lin_w[0].bfloat16()

    def run():
        return (native.moe_experts(x, w, ids, w1, w2, w3), native.moe_experts(x, w, ids, w1, w2, w3, fp8),
                native.linear_e4m3(xl, lin_codes), native.mla_decode(*att, 0.3), native.linear_bf16(xl, w16))

    one = run()
    torch.set_num_threads(2)
    two = run()
    for a, b in zip(one, two):
        assert torch.equal(a, b)
    # the loops use torch's count, also when called from another Python thread (OpenMP's own default there would
    # be the machine's core count, whatever torch.set_num_threads said)
    import ctypes
    import threading

    used = []
    for n in (1, 2):
        torch.set_num_threads(n)
        worker = threading.Thread(target=lambda: (run(), used.append(
            ctypes.c_int.in_dll(native._loaded()[0], "deepport_threads").value)))
        worker.start()
        worker.join()
    assert used == [1, 2]
    want = ref.moe_experts(x.double(), w.double(), ids, w1.double(), w2.double(), w3.double())
    torch.testing.assert_close(two[1].double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(two[2].double(), xl.double() @ lin_w[0].double().T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(two[3], ref.mla_decode(*att, 0.3), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(two[4].double(), xl.double() @ w16.double().T, rtol=1e-5, atol=1e-5)


def test_the_portable_build_matches_cpu_ref(monkeypatch, tmp_path):
    """Built without -march=native (x86-64's baseline: no AVX2), the kernels take their generic vector code, the
    code an ARM compiler builds; it must give the same values."""
    monkeypatch.setenv("DEEPPORT_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_arch_flags", lambda cc: ())
    native._loaded.cache_clear()
    try:
        assert native.available() and "-march" not in native.status()
        x, w, ids, (w1, w2, w3), fp8 = _case(9, 5, 136, 40, 6, 3)
        want = ref.moe_experts(x.double(), w.double(), ids, w1.double(), w2.double(), w3.double())
        for codes in (None, fp8):
            got = native.moe_experts(x, w, ids, w1, w2, w3, codes)
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        biased = torch.rand(5, 16)
        assert torch.equal(native.moe_gate_tail(biased, torch.zeros(16), 4, 2, 4, 1.0, True)[1],
                           cpu._route_on_host(biased, 4, 2, 4))
        args = _attention_case(3, 2, 2, 5, 33, 7, 4, [3, 9])
        want = ref.mla_decode(*(a.double() if a.is_floating_point() else a for a in args), 0.125)
        torch.testing.assert_close(native.mla_decode(*args, 0.125).double(), want, rtol=1e-5, atol=1e-5)
        xn, rn, wn = torch.randn(3, 37), torch.randn(3, 37), torch.rand(37) + 0.5
        y, r = native.rms_norm(xn, wn, 1e-6, rn)
        want = ref.rms_norm(xn.double(), wn.double(), 1e-6, rn.double())
        torch.testing.assert_close(y.double(), want[0], rtol=1e-5, atol=1e-6)
        w16, xl = torch.randn(70, 300).bfloat16(), torch.randn(3, 300)
        torch.testing.assert_close(native.linear_bf16(xl, w16).double(), xl.double() @ w16.double().T, rtol=1e-5,
                                   atol=1e-5)
    finally:
        native._loaded.cache_clear()


def test_an_unwritable_cache_leaves_the_torch_paths_and_says_where(monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("DEEPPORT_CACHE", str(tmp_path / "file" / "cache"))  # under a file: cannot be created
    native._loaded.cache_clear()
    try:
        assert not native.available()
        assert "cannot write the build to" in native.status() and "DEEPPORT_CACHE" in native.status()
    finally:
        native._loaded.cache_clear()


# widths off the 8-lane vectors, V3's dim, one to sixteen rows; rows of near-zero (eps decides) and very large values
@pytest.mark.parametrize("m,d", [(1, 256), (2, 37), (16, 7168), (3, 1536)])
@pytest.mark.parametrize("residual", [False, True])
def test_c_rms_norm_matches_cpu_ref(m, d, residual):
    g = torch.Generator().manual_seed(m * d + residual)
    x = torch.randn(m, d, generator=g) * torch.tensor([1e-4, 3e4, 1.0, 0.5] * 4)[:m].view(-1, 1)
    w = torch.randn(d, generator=g) * 0.2 + 1
    res = torch.randn(m, d, generator=g) if residual else None
    want = ref.rms_norm(x.double(), w.double(), 1e-6, None if res is None else res.double())
    got = native.rms_norm(x.view(1, m, d), w, 1e-6, None if res is None else res.view(1, m, d))
    if residual:
        assert torch.equal(got[1].view(m, d), x + res)  # r = x + residual, the fp32 sum
        got, want = got[0], want[0]
    assert got.shape == (1, m, d)
    torch.testing.assert_close(got.view(m, d).double(), want, rtol=1e-5, atol=1e-6)


def test_op_uses_the_c_norm_up_to_16_rows_without_grad(monkeypatch):
    calls = []
    real = native.rms_norm
    monkeypatch.setattr(native, "rms_norm", lambda x, *a: calls.append(x.numel() // x.shape[-1]) or real(x, *a))
    w = torch.rand(64) + 0.5
    for rows in (1, 16, 17):
        y, r = cpu.rms_norm(torch.randn(rows, 64), w, 1e-6, torch.randn(rows, 64))
        assert y.shape == r.shape == (rows, 64)
    cpu.rms_norm(torch.randn(2, 64, requires_grad=True), w, 1e-6)  # training: torch's path (autograd)
    cpu.rms_norm(torch.randn(2, 64).bfloat16(), w.bfloat16(), 1e-6)  # bf16: torch's path
    assert calls == [1, 16]


def test_bf16_serving_keeps_no_codes_it_would_not_read():
    m = deepport.load(backend="cpu", dtype="bf16")
    assert checkpoint.fp8_codes_of(m.transformer.layers[1].ffn.experts.w1) is None
    assert checkpoint.bf16_of(m.transformer.head.weight) is None  # a bf16 weight is its own bf16 values


@pytest.mark.parametrize("lead,n,k", [((1,), 1024, 256), ((2,), 258, 300), ((3, 5), 130, 136), ((16,), 7, 9)])
def test_c_linear_reads_bf16_values_as_their_fp32_values(lead, n, k):
    g = torch.Generator().manual_seed(n * k)
    w16 = (torch.randn(n, k, generator=g) / k ** 0.5).bfloat16()
    x = torch.randn(*lead, k, generator=g)
    want = ref.linear(x.double(), w16.double())
    got = native.linear_bf16(x, w16)
    assert got.shape == (*lead, n)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_load_keeps_the_bf16_head_and_linear_reads_it_for_up_to_two_rows(monkeypatch):
    """An FP8 checkpoint's lm_head is bf16 (2^18 weights on the embedded model): served as fp32, load keeps its
    bf16 values too, and linear reads those in C for 1-2 rows (decode, MTP verification); more rows, or after an
    in-place change of the weight, MKL on the fp32 copy."""
    m = deepport.load(backend="cpu")
    head = m.transformer.head.weight
    w16 = checkpoint.bf16_of(head)
    assert w16 is not None and w16.dtype == torch.bfloat16 and torch.equal(w16.float(), head)
    assert checkpoint.bf16_of(m.transformer.embed.weight) is None  # read a row per token: nothing to gain
    calls = []
    real = native.linear_bf16
    monkeypatch.setattr(native, "linear_bf16", lambda x, w: calls.append(x.shape[0]) or real(x, w))
    g = torch.Generator().manual_seed(8)
    for rows in (1, 2, 3):
        x = torch.randn(rows, head.shape[1], generator=g)
        torch.testing.assert_close(cpu.linear(x, head), x @ head.T, rtol=1e-5, atol=1e-5)
    assert calls == [1, 2]
    with torch.no_grad():
        head.mul_(1.0)  # changed in place: the bf16 values may no longer be its values
    assert checkpoint.bf16_of(head) is None


@pytest.mark.parametrize("lead,n,k", [((1,), 512, 640), ((2,), 258, 300), ((3, 5), 130, 136), ((16,), 7, 9)])
def test_c_linear_reads_the_codes_as_their_values(lead, n, k):
    g = torch.Generator().manual_seed(n + k)
    codes, w = _fp8(torch.randn(1, n, k, generator=g) / k ** 0.5)
    codes = Fp8Weight(codes.weight[0], codes.scale_inv[0])
    x = torch.randn(*lead, k, generator=g)
    want = ref.linear(x.double(), w[0].double())
    torch.testing.assert_close(native.linear_e4m3(x, codes).double(), want, rtol=1e-5, atol=1e-5)


def test_linear_reads_codes_load_kept_for_large_weights_only(monkeypatch):
    calls = []
    real = native.linear_e4m3
    monkeypatch.setattr(native, "linear_e4m3", lambda x, c: calls.append(x.shape[0]) or real(x, c))
    g = torch.Generator().manual_seed(2)
    codes, w = _fp8(torch.randn(1, 512, 512, generator=g) / 512 ** 0.5)  # 2^18 weights: the smallest kept
    w = w[0].clone()
    checkpoint.attach_fp8_codes(w, Fp8Weight(codes.weight[0], codes.scale_inv[0]))
    for m in (1, 16, 17):
        assert cpu.linear(torch.randn(m, 512, generator=g), w).shape == (m, 512)
    assert calls == [1, 16]  # past 16 tokens MKL's GEMM on the dequantised weight
    m = deepport.load(backend="cpu")  # the embedded model: every linear under 2^18 weights keeps no codes
    kept = {n for n, p in m.transformer.named_parameters() if checkpoint.fp8_codes_of(p) is not None}
    assert kept and all(".experts." in n for n in kept)


def test_conformance_served_cases_reach_the_codes_paths(monkeypatch):
    """The suite's *_fp8served (*_bf16served) cases carry the codes (bf16 values) to the backend (to_device re-attaches
    them), so the kernels that read them are judged by conformance, at V3's dimensions in the full tier."""
    from deepport.conformance.runner import run

    seen = []
    real_moe, real_lin, real_16 = native.moe_experts, native.linear_e4m3, native.linear_bf16
    monkeypatch.setattr(native, "moe_experts", lambda *a: seen.append(("moe", a[6] is not None)) or real_moe(*a))
    monkeypatch.setattr(native, "linear_e4m3", lambda x, c: seen.append(("linear", True)) or real_lin(x, c))
    monkeypatch.setattr(native, "linear_bf16", lambda x, w: seen.append(("bf16", True)) or real_16(x, w))
    rep = run("cpu", tier="quick", ops=["moe_experts", "linear"], dtypes=("bf16",), fallback="error")
    served = [r for r in rep.results if "served" in r.case]
    assert len(served) == 6 and all(r.status == "pass" for r in served), [(r.case, r.reason) for r in served]
    assert seen.count(("moe", True)) == 2 and seen.count(("linear", True)) == 2 and seen.count(("bf16", True)) == 2


def test_linear_with_codes_refuses_a_mismatched_input_width():
    """x's K must match the weight's before the C path reads the codes (no read past them)."""
    g = torch.Generator().manual_seed(4)
    codes, w = _fp8(torch.randn(1, 512, 512, generator=g) / 512 ** 0.5)
    w = w[0].clone()
    checkpoint.attach_fp8_codes(w, Fp8Weight(codes.weight[0], codes.scale_inv[0]))
    with pytest.raises(RuntimeError, match="shape"):
        cpu.linear(torch.randn(1, 640, generator=g), w)
