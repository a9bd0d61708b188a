"""The built-in `cpu` backend: conformance, auto selection, the served-as label, greedy equality with cpu_ref,
and each of its fast paths against cpu_ref on seeded inputs."""
import json
import sys
import textwrap

import pytest
import torch

import deepport
from deepport.backends.cpu import capability, gemm_layout
from deepport.backends.cpu import ops as cpu
from deepport.backends.cpu_ref import ops as ref
from deepport.conformance.runner import run
from deepport.core import registry
from deepport.core.registry import Backend, Probe

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from test_core import run_cli  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared, oversubscribed machine two OpenMP threads wait on each other (6x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_quick_conformance_bf16_and_fp32_with_no_fallback():
    rep = run("cpu", tier="quick", dtypes=("bf16", "fp32"), fallback="error")
    bad = [(r.case, r.status, r.reason) for r in rep.results if r.status != "pass"]
    assert not bad and len(rep.results) > 40, bad
    assert rep.label.startswith("hardware: cpu (") and capability.isa() in rep.label
    assert rep.meta["fp8_checkpoints_served_as"] == "fp32"


@pytest.mark.slow
def test_model_check_fp32_and_bf16_passes_with_served_as_label():
    rep = run("cpu", tier="quick", dtypes=("fp8", "bf16", "fp32"), ops=[], fallback="error", model_check=True)
    by = {r.case: r for r in rep.results}
    for d in ("bf16", "fp32"):
        for check in ("logits", "decode", "mtp", "greedy"):
            r = by[f"model_{check}_{d}"]
            assert r.status == "pass", (r.case, r.reason)
            assert f"FP8 checkpoint served as {d}" in r.reason
    skipped = by["model_logits_fp8"]
    assert skipped.status == "skip" and "served as fp32" in skipped.reason


def test_auto_picks_cpu_and_a_cpu_device_plugin_never_wins(monkeypatch):
    monkeypatch.delenv("DEEPPORT_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # no interpreted cuda/rocm: no accelerator here
    assert registry.select().name == "cpu"
    builtin = registry.discover

    def with_plugin():
        found = dict(builtin())
        found["toycpu"] = Backend(name="toycpu", device_type="cpu", probe=lambda: Probe(True, "toy"),
                                  load=lambda: {"silu_mul": ref.silu_mul}, dtypes=frozenset({"fp32"}), origin="plugin")
        return found

    monkeypatch.setattr(registry, "discover", with_plugin)
    assert registry.select().name == "cpu"
    assert registry.select("toycpu").name == "toycpu"  # still usable by name


def test_installed_cpu_plugin_does_not_take_over_generate(tmp_path):
    pkg = tmp_path / "site"
    (pkg / "toycpu").mkdir(parents=True)
    (pkg / "toycpu" / "__init__.py").write_text(textwrap.dedent('''
        from deepport.core.plugins import hookimpl
        from deepport.core.registry import Backend, Probe

        @hookimpl
        def deepport_backends():
            return [Backend(name="toycpu", device_type="cpu", probe=lambda: Probe(True, "toy"), load=lambda: {},
                            dtypes=frozenset({"fp32"}))]
    '''))
    dist = pkg / "toycpu-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toycpu\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[deepport]\ntoycpu = toycpu\n")
    r = run_cli("generate", "--max-new-tokens", "4", "--json", env={"PYTHONPATH": str(pkg)})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    # the default path: cpu, fp32, the embedded FP8 checkpoint labelled as served in fp32 (and warned about)
    assert out["backend"] == "cpu" and out["dtype"] == "fp32" and out["served_as"] == "fp32"
    assert "FP8 checkpoint served as fp32" in r.stderr


def test_greedy_tokens_equal_cpu_ref_fp32():
    prompts = ["def fibonacci(n):\n", "import os\nimport sys\n\n\nclass Config:\n"]  # ragged batch
    got = deepport.load(backend="cpu")
    want = deepport.load(backend="cpu_ref", dtype="fp32")
    assert got.dtype == "fp32" and got.served_as == "fp32"
    a = got.generate_batch(prompts, max_new_tokens=24)
    b = want.generate_batch(prompts, max_new_tokens=24)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert got.generate(prompts[0], max_new_tokens=24).tokens == b[0].tokens  # batch 1: the one-token MoE path
    same = got.generate_batch([prompts[1], prompts[0], prompts[1]], max_new_tokens=24)  # rows 0, 2 prefill together
    assert [r.tokens for r in same] == [b[1].tokens, b[0].tokens, b[1].tokens]


def _experts(g, m, e=16, i=64, d=128, k=4, dtype=torch.float32):
    x = torch.randn(m, d, generator=g).to(dtype)
    w1, w3 = (torch.randn(e, i, d, generator=g).mul(0.1).to(dtype) for _ in range(2))
    w2 = torch.randn(e, d, i, generator=g).mul(0.1).to(dtype)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(m)])
    return x, torch.rand(m, k, generator=g), ids, w1, w2, w3


@pytest.mark.parametrize("path,m", [("_experts_per_token", 1), ("_experts_per_token", 2), ("_experts_grouped", 8),
                                    ("_experts_pairs", 3), ("moe_experts", 1), ("moe_experts", 8), ("moe_experts", 70)])
def test_moe_paths_match_cpu_ref_fp32(path, m):
    g = torch.Generator().manual_seed(12 + m)
    x, w, ids, w1, w2, w3 = _experts(g, m)
    ids[0, 1] = -1  # an unused slot contributes nothing
    want = ref.moe_experts(x.double(), w.double(), ids, w1.double(), w2.double(), w3.double())
    got = getattr(cpu, path)(x, w, ids, w1, w2, w3)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_traced_moe_picks_pairs_for_few_or_small_experts_and_the_host_op_otherwise():
    """Measured (docs/performance.md): gathered pairs under Inductor win on the embedded model's experts at batch
    8 and on v3-200m's at batch 1; the opaque host op wins on v3-200m's at batch 8 (122 vs 91 tok/s) and is the
    only graph-break-free choice past _PAIR_MAX pairs."""
    def ids(m, k=4):
        return torch.zeros(m, k, dtype=torch.long)

    small = torch.empty(16, 128, 256)  # the embedded model's expert [I, D]: 384 KB an expert
    large = torch.empty(16, 512, 1024)  # v3-200m's: 6 MB an expert
    assert cpu._traced_strategy(torch.empty(8, 256), ids(8), small, small.transpose(1, 2), small) == "pairs"
    assert cpu._traced_strategy(torch.empty(1, 1024), ids(1), large, large.transpose(1, 2), large) == "pairs"
    assert cpu._traced_strategy(torch.empty(2, 1024), ids(2), large, large.transpose(1, 2), large) == "pairs"
    assert cpu._traced_strategy(torch.empty(8, 1024), ids(8), large, large.transpose(1, 2), large) == "host"
    assert cpu._traced_strategy(torch.empty(32, 256), ids(32), small, small.transpose(1, 2), small) == "host"
    w = small.requires_grad_()  # the host op has no autograd formula: training traces the pairs
    assert cpu._traced_strategy(torch.empty(32, 256), ids(32), w, w.transpose(1, 2), w) == "pairs"


@pytest.mark.parametrize("m,dtype", [(1, torch.float32), (2, torch.float32), (24, torch.float32),
                                     (24, torch.bfloat16)])
def test_moe_host_op_traces_as_one_node_and_matches_cpu_ref(m, dtype, monkeypatch):
    """Under torch.compile with the host strategy, moe_experts is one deepport_cpu::moe_experts_host node (no
    graph break: its host reads happen inside the op) and gives the eager strategies' values."""
    monkeypatch.setattr(cpu, "_traced_strategy", lambda *a: "host")
    g = torch.Generator().manual_seed(40 + m)
    x, w, ids, w1, w2, w3 = _experts(g, m, dtype=dtype)
    ids[0, 1] = -1
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.inference_mode():
        got = torch.compile(cpu.moe_experts, backend=keep, fullgraph=True)(x, w, ids, w1, w2, w3)
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert targets.count("deepport_cpu.moe_experts_host") == 1 and not any("bincount" in t for t in targets)
    assert got.dtype == dtype and got.shape == x.shape
    want = ref.moe_experts(x.double(), w.double(), ids, w1.double(), w2.double(), w3.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    torch.library.opcheck(torch.ops.deepport_cpu.moe_experts_host, (x, w, ids, w1, w2, w3))
    torch._dynamo.reset()


def test_compiled_cpu_step_past_the_pair_limit_has_no_graph_break():
    """Batch 32 (128 (token, expert) pairs): the traced step is one graph; `bench --compile --batch 32` crashed
    before (the grouped path's .tolist() of a bincount, traced)."""
    from deepport.core.step import graph_breaks

    m = deepport.load(None, backend="cpu", dtype="fp32")
    t = m.transformer
    g = torch.Generator().manual_seed(5)
    cache = t.new_cache(32, 64)
    with torch.inference_mode():
        t(torch.randint(0, t.args.vocab_size, (32, 6), generator=g), cache)
        cache.reserve(list(range(32)), 1)
        assert graph_breaks(t.decode_step, torch.randint(0, t.args.vocab_size, (32, 1), generator=g), cache) == []
    torch._dynamo.reset()


@pytest.mark.parametrize("e,groups,topk_groups,k", [(16, 4, 2, 4), (64, 8, 4, 6), (256, 8, 4, 8), (8, 1, 1, 2)])
def test_traced_routing_by_ranks_picks_what_cpu_ref_picks(e, groups, topk_groups, k):
    """Traced, moe_gate ranks scores by pairwise comparisons (fused by Inductor) instead of 3 topk fallback calls
    a layer (compiled step +6%): same ids, in the same order, as the spec's topk path; ties to the lower index;
    and the traced graph holds no topk."""
    import torch._dynamo

    g = torch.Generator().manual_seed(e * k)
    for t in range(40):
        x, w = torch.randn(1 + t % 9, 32, generator=g), torch.randn(e, 32, generator=g)
        bias = torch.randn(e, generator=g) * 0.1
        biased = torch.sigmoid(torch.nn.functional.linear(x, w)) + bias
        assert torch.equal(cpu._route_by_ranks(biased, groups, topk_groups, k),
                           ref.moe_gate(x, w, bias, groups, topk_groups, k, 2.5, True)[1])
    tied = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.5, 3.0, 1.0]])
    assert cpu._route_by_ranks(tied, 1, 1, 3).tolist() == [[1, 2, 4]]
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    got = torch.compile(cpu.moe_gate, backend=keep, fullgraph=True)(x, w, bias, groups, topk_groups, k, 2.5, True)
    want = ref.moe_gate(x, w, bias, groups, topk_groups, k, 2.5, True)
    assert torch.equal(got[1], want[1]) and torch.allclose(got[0], want[0].float(), rtol=1e-6, atol=1e-7)
    assert not any("topk" in str(n.target) for n in graphs[0].graph.nodes)
    torch._dynamo.reset()


def test_traced_rms_norm_is_one_fusable_formula():
    """Eager fp32 rms_norm goes through layer_norm([r ; -r]) (one kernel instead of a composite); traced, that cat
    is a buffer and views Inductor's wrapper handles every call, while the plain formula fuses into one kernel
    (compiled step +10%, batch 8 +20%): the traced graph holds no cat, and agrees with eager."""
    import torch._dynamo

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    g = torch.Generator().manual_seed(5)
    x, res, w = torch.randn(3, 256, generator=g), torch.randn(3, 256, generator=g), torch.randn(256, generator=g)
    torch._dynamo.reset()
    got = torch.compile(cpu.rms_norm, backend=keep, fullgraph=True)(x, w, 1e-6, res)
    want = cpu.rms_norm(x, w, 1e-6, res)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert graphs and not any("cat" in str(n.target) for n in graphs[0].graph.nodes)
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_tokens_sharing_experts_run_each_shared_expert_once(dtype, monkeypatch):
    """MTP verification's two tokens: an expert both chose runs once as a 2-row GEMM (3 GEMMs fewer), and every
    token still gets its own weighted sum, with an unused slot skipped."""
    g = torch.Generator().manual_seed(41)
    x, w, _, w1, w2, w3 = _experts(g, 2, dtype=dtype)
    ids = torch.tensor([[3, 5, 7, 1], [5, 2, 3, -1]])  # 3 and 5 shared, in different slots
    want = ref.moe_experts(x.double(), w.double(), ids, w1.double(), w2.double(), w3.double())
    calls = []
    mm = torch.mm
    monkeypatch.setattr(cpu.torch, "mm", lambda a, b, **kw: calls.append(a.shape[0]) or mm(a, b, **kw))
    got = cpu._experts_per_token(x, w, ids, w1, w2, w3)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    per_expert = len(calls) // 5  # 5 distinct experts: 3, 5, 7, 1, 2
    assert len(calls) == 5 * per_expert and calls.count(2) == 2 * per_expert, calls


@pytest.mark.parametrize("e,groups,topk_groups,k", [(16, 4, 2, 4), (64, 8, 4, 6), (256, 8, 4, 8), (8, 1, 1, 2)])
def test_one_token_host_routing_picks_what_cpu_ref_picks(e, groups, topk_groups, k):
    """Batch-1 decode and MTP verification route on the host (Python sort of E floats): same ids and weights
    as the spec's torch path over many seeded tokens, with group sums rounded to fp32 as torch's are."""
    g = torch.Generator().manual_seed(e + k)
    for t in range(200):
        x = torch.randn(1 + t % 2, 32, generator=g)  # 1 row: batch-1 decode; 2: MTP verification
        w = torch.randn(e, 32, generator=g)
        bias = torch.randn(e, generator=g) * 0.1
        got_w, got_ids = cpu.moe_gate(x, w, bias, groups, topk_groups, k, 2.5, True)
        want_w, want_ids = ref.moe_gate(x, w, bias, groups, topk_groups, k, 2.5, True)
        assert torch.equal(got_ids, want_ids)
        torch.testing.assert_close(got_w, want_w.float(), rtol=1e-6, atol=1e-7)


def test_moe_grouped_bf16_rounds_like_the_contract():
    g = torch.Generator().manual_seed(5)
    args = _experts(g, 8, dtype=torch.bfloat16)
    torch.testing.assert_close(cpu.moe_experts(*args).float(), ref.moe_experts(*args).float(), rtol=2e-2, atol=6e-3)


def test_kmajor_copy_follows_in_place_weight_updates():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 64, generator=g)
    x = torch.randn(5, 64, generator=g)
    torch.testing.assert_close(cpu.linear(x, w), x @ w.t())
    w.mul_(-2.0)  # in place: the cached K-major copy must be rebuilt
    torch.testing.assert_close(cpu.linear(x, w), x @ w.t())
    assert cpu.linear(x[:1], w).shape == (1, 96)


def test_grouped_experts_follow_in_place_updates_of_their_kmajor_views():
    """The sorted-groups path reads per-expert views of the K-major copies (kept with the copy): an in-place change
    of one expert's weight must reach them."""
    g = torch.Generator().manual_seed(8)
    x, w, ids, w1, w2, w3 = _experts(g, 8)
    for _ in range(2):
        want = ref.moe_experts(x.double(), w.double(), ids, w1.double(), w2.double(), w3.double())
        torch.testing.assert_close(cpu._experts_grouped(x, w, ids, w1, w2, w3).double(), want, rtol=1e-5, atol=1e-5)
        w2[int(ids[3, 0])].mul_(-3.0)  # an expert the batch uses
        w1[int(ids[5, 1])].add_(0.5)


def _paged(g, lens, s, b_blocks=6, p=4, c=32, r=8, h=3):
    b = len(lens)
    nb = b * b_blocks + 1
    kv = torch.randn(nb, p, c, generator=g)
    pe = torch.randn(nb, p, r, generator=g)
    table = torch.randperm(nb - 1, generator=g)[:b * b_blocks].view(b, b_blocks).int()
    for i, n in enumerate(lens):  # entries past a row's length: any value, never read
        table[i, -(-n // p):] = 10 ** 6
        kv[table[i, :-(-n // p)].long()[-1], n % p or p:] = float("nan")  # poison the tail of the last block
    return (torch.randn(b, s, h, c, generator=g), torch.randn(b, s, h, r, generator=g), kv, pe, table,
            torch.tensor(lens, dtype=torch.int32), 0.3)


@pytest.mark.parametrize("lens,s", [([9], 1), ([9, 9], 3), ([5, 13, 9], 1), ([7, 12], 2)])
def test_mla_decode_fast_and_masked_paths_match_cpu_ref(lens, s):
    args = _paged(torch.Generator().manual_seed(sum(lens) + s), lens, s)
    got = cpu.mla_decode(*args)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref.mla_decode(*args), rtol=1e-5, atol=1e-5)


def test_rope_in_reals_matches_the_spec_at_v3_dims():
    """The path torch.compile traces (the complex product written in reals; the conformance suite runs eager
    only) against cpu_ref at DeepSeek-V3's rope dims: 128 query heads + the shared key head, R = 64, YaRN tables."""
    from deepport.conformance.case import v3_args
    from deepport.core.model import yarn_inv_freq

    args = v3_args()
    g = torch.Generator().manual_seed(64)
    x = torch.randn(2, 5, 129, args.qk_rope_head_dim, generator=g)
    pos = torch.tensor([[0, 1, 2, 3, 4], [4000, 4001, 70000, 163839, 9]])
    angles = pos.float().unsqueeze(-1) * yarn_inv_freq(args)
    cos, sin = angles.cos() * args.rope_attention_factor, angles.sin() * args.rope_attention_factor
    want = ref.rope(x, cos, sin)
    torch.testing.assert_close(cpu._rope_reals(x, cos, sin), want.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cpu.rope(x, cos, sin), want.float(), rtol=1e-6, atol=1e-6)


def test_rope_rotation_cache_is_per_table_pair():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, 4, 16, generator=g)
    tables = [(torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)) for _ in range(2)]
    for cos, sin in tables + tables:
        torch.testing.assert_close(cpu.rope(x, cos, sin), ref.rope(x, cos, sin))


def test_decode_weight_bytes_counts_expected_experts():
    from deepport import bench_compare

    from deepport.core.checkpoint import bf16_of, fp8_codes_of

    m = deepport.load(backend="cpu")
    a = m.transformer.args

    def read(p):  # the routed experts are read as the fp8 codes (and scales) load kept for the C kernel, the head
        c = fp8_codes_of(p)  # as its bf16 values
        if c is not None:
            return c.weight.numel() + 4 * c.scale_inv.numel()
        return p.numel() * (2 if bf16_of(p) is not None else p.element_size())

    params = {n: read(p) for n, p in m.transformer.named_parameters()}
    assert sum(fp8_codes_of(p) is not None for p in m.transformer.parameters()) > 0
    assert bf16_of(m.transformer.head.weight) is not None
    experts = sum(v for n, v in params.items() if ".experts." in n and not n.startswith("mtp."))
    other = sum(v for n, v in params.items() if ".experts." not in n and not n.startswith(("mtp.", "embed.")))
    stored = {n: p.numel() * p.element_size() for n, p in m.transformer.named_parameters()}
    experts_stored = sum(v for n, v in stored.items() if ".experts." in n and not n.startswith("mtp."))
    other_stored = sum(v for n, v in stored.items() if ".experts." not in n and not n.startswith(("mtp.", "embed.")))
    for batch in (1, 8):
        frac = 1 - (1 - a.n_activated_experts / a.n_routed_experts) ** batch
        assert bench_compare.decode_weight_bytes(m.transformer, batch) == pytest.approx(other + experts * frac, rel=1e-6)
        assert bench_compare.decode_weight_bytes(m.transformer, batch, codes=False) == pytest.approx(
            other_stored + experts_stored * frac, rel=1e-6)  # the dequantised weights, as transformers reads them


@pytest.mark.slow
def test_bench_compare_transformers_runs_and_agrees():
    r = run_cli("bench", "--compare", "transformers", "--threads", "1", "--max-new-tokens", "6", "--repeats", "1", "--json")
    assert r.returncode == 0, r.stderr
    c = json.loads(r.stdout)["compare"]
    assert c["greedy_tokens_equal"] is True
    for side in ("deepport", "transformers"):
        assert c[side]["decode_tokens_per_s"] > 0 and c[side]["prefill_tokens_per_s"] > 0
    w = c["weight_streaming"]
    assert w["read_bandwidth_bytes_per_s"] > 1e8 and w["decode_weight_bytes_per_step"] > 1e6
    r = run_cli("bench", "--compare", "transformers", "--threads", "1", "--max-new-tokens", "6", "--repeats", "1",
                "--batch", "3", "--distinct-rows", "--json")
    assert r.returncode == 0, r.stderr
    c = json.loads(r.stdout)["compare"]
    assert c["distinct_rows"] is True and c["greedy_tokens_equal"] is True  # every row, against transformers'


@pytest.mark.slow
def test_bench_compare_transformers_with_the_compiled_step():
    """--compare with --compile: the compiled step (not eager) runs against transformers, and says so."""
    r = run_cli("bench", "--compare", "transformers", "--compile", "--threads", "1", "--max-new-tokens", "4",
                "--repeats", "1", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["deepport_step"].startswith("compiled (torch.compile"), report["deepport_step"]
    assert report["compare"]["greedy_tokens_equal"] is True
    assert "step_compare" not in report  # not the eager-vs-compiled report
    r = run_cli("bench", "--compile", "--mtp", "--threads", "1", "--max-new-tokens", "4", "--repeats", "1", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)  # plain and MTP decoding, both through the compiled steps
    assert report["deepport_step"].startswith("compiled (torch.compile") and report["mtp"]["acceptance_rate"] > 0


def test_bench_rows_identical_by_default_or_rotated():
    from deepport import bench_compare

    assert bench_compare.batch_rows([4, 5, 6], 2, False) == [[4, 5, 6], [4, 5, 6]]
    assert bench_compare.batch_rows([4, 5, 6], 4, True) == [[4, 5, 6], [5, 6, 4], [6, 4, 5], [4, 5, 6]]


def test_grouped_experts_over_the_copy_budget_read_the_rest_as_stored(monkeypatch):
    """With room for only two K-major expert stacks the sorted-groups path copies at most those two (and uses
    them), reads the third as stored, and copies nothing per call (no K-major copy of transient per-expert
    views): a second call adds no copy."""
    import gc

    gc.collect()
    monkeypatch.setenv("DEEPPORT_CPU_GEMM_LAYOUT", "kmajor")
    gemm_layout.reset()
    g = torch.Generator().manual_seed(9)
    x, w, ids, w1, w2, w3 = _experts(g, 8)
    budget = cpu._layout_bytes[0] + 2 * w1.numel() * 4  # room for two stacks
    monkeypatch.setattr(cpu, "_LAYOUT_BUDGET", budget)
    want = ref.moe_experts(x.double(), w.double(), ids, w1.double(), w2.double(), w3.double())
    torch.testing.assert_close(cpu._experts_grouped(x, w, ids, w1, w2, w3).double(), want, rtol=1e-5, atol=1e-5)
    after_one = (cpu._layout_bytes[0], len(cpu._LAYOUT))
    assert after_one[0] <= budget
    torch.testing.assert_close(cpu._experts_grouped(x, w, ids, w1, w2, w3).double(), want, rtol=1e-5, atol=1e-5)
    assert (cpu._layout_bytes[0], len(cpu._LAYOUT)) == after_one
    gemm_layout.reset()


def test_distinct_rows_says_when_the_prompt_is_too_short_for_the_batch():
    r = run_cli("bench", "--batch", "4", "--distinct-rows", "--prompt", "ab", "--max-new-tokens", "2", "--repeats", "1",
                "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "of the 4 rows differ" in r.stderr and "--prompt of at least 4 tokens" in r.stderr


def test_derived_weights_do_not_keep_their_weight_alive_and_follow_updates():
    """rms_norm's doubled weight and moe_experts' per-expert views live on the weight: gone with it (no
    reference cycle through a view's base), remade after an in-place change."""
    import weakref

    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 1, 64, generator=g)
    w = torch.randn(64, generator=g)
    alive = weakref.ref(w)
    a = cpu.rms_norm(x, w, 1e-6)
    torch.testing.assert_close(a, ref.rms_norm(x, w, 1e-6), rtol=1e-6, atol=1e-6)
    w.mul_(2.0)  # the cached [w ; w] must follow
    torch.testing.assert_close(cpu.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6), rtol=1e-6, atol=1e-6)
    del w
    assert alive() is None

    e, i, d = 4, 8, 64
    w1, w3, w2 = (torch.randn(*shape, generator=g) / 8 for shape in ((e, i, d), (e, i, d), (e, d, i)))
    xs = torch.randn(1, d, generator=g)
    ids, wts = torch.tensor([[2, 0]]), torch.tensor([[0.7, 0.3]])
    refs = [weakref.ref(t) for t in (w1, w2, w3)]
    y = cpu.moe_experts(xs, wts, ids, w1, w2, w3)
    torch.testing.assert_close(y, ref.moe_experts(xs, wts, ids, w1, w2, w3), rtol=1e-5, atol=1e-6)
    w2[2].add_(1.0)
    torch.testing.assert_close(cpu.moe_experts(xs, wts, ids, w1, w2, w3),
                               ref.moe_experts(xs, wts, ids, w1, w2, w3), rtol=1e-5, atol=1e-6)
    del w1, w2, w3
    assert all(r() is None for r in refs)


def test_kmajor_copies_are_freed_with_the_model():
    import gc

    gc.collect()
    before = cpu._layout_bytes[0]
    m = deepport.load(backend="cpu")
    m.generate_batch(["def f(x):\n", "def g(y):\n"], max_new_tokens=3)  # batched: M > 1 GEMMs make copies
    assert cpu._layout_bytes[0] > before
    del m
    gc.collect()
    assert cpu._layout_bytes[0] == before


def test_bench_alternates_plain_and_mtp_runs():
    """`bench --mtp` alternates plain and MTP runs (after a warm-up of each), so a machine's drift lands on both."""
    from types import SimpleNamespace

    from deepport.bench import bench_interleaved

    calls = []

    class Fake:
        def generate_batch(self, prompts, max_new_tokens, mtp):
            calls.append((mtp, max_new_tokens))
            stats = {"decode_tokens_per_s": 3.0 if mtp else 2.0, "prefill_tokens_per_s": 1.0,
                     "acceptance_rate": 0.9, "tokens_per_forward": 1.9}
            return [SimpleNamespace(stats=stats)]

    out = bench_interleaved(Fake(), [[1, 2]], 8, 3)
    assert calls == [(False, 8), (True, 8)] * 4  # warm-ups run the timed shapes (compiled: a graph per cache size)
    assert out[False] == {"decode_tokens_per_s": 2.0, "prefill_tokens_per_s": 1.0}
    assert out[True]["acceptance_rate"] == 0.9 and out[True]["decode_tokens_per_s"] == 3.0
    r = run_cli("bench", "--mtp", "--repeats", "1", "--max-new-tokens", "6", "--threads", "1", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["mtp_speedup"] > 0 and rep["mtp"]["tokens_per_forward"] >= 1.0


def test_bench_compare_warm_up_runs_the_shapes_the_timed_runs_run(monkeypatch):
    """A compiled step compiles one graph per cache size, and the cache size follows the new tokens: a warm-up
    shorter than the timed runs left the first timed run compiling (`bench --compare transformers --compile
    --repeats 1` read 0.02x so). Every run on both sides, warm-up included, has the timed length."""
    from types import SimpleNamespace

    from deepport import bench_compare

    dp_calls, hf_calls = [], []

    class Fake:
        path = "model"
        transformer = None
        step = None

        def encode(self, prompt):
            return [5, 6, 7]

        def generate_batch(self, rows, max_new_tokens):
            dp_calls.append(max_new_tokens)
            stats = {"decode_tokens_per_s": 1.0, "prefill_tokens_per_s": 1.0}
            return [SimpleNamespace(stats=stats, tokens=[1] * max_new_tokens) for _ in rows]

    def hf_generate(hf, rows, new_tokens):
        hf_calls.append(new_tokens)
        return {"decode_tokens_per_s": 1.0, "prefill_tokens_per_s": 1.0, "tokens": [[1] * new_tokens for _ in rows]}

    monkeypatch.setattr(bench_compare, "load_transformers", lambda path: object())
    monkeypatch.setattr(bench_compare, "hf_generate", hf_generate)
    monkeypatch.setattr(bench_compare, "read_bandwidth", lambda: 1e10)
    monkeypatch.setattr(bench_compare, "decode_weight_bytes", lambda t, batch, codes: 1e6)
    out = bench_compare.compare(Fake(), "def f():", 2, 24, repeats=2)
    assert dp_calls == [24, 24, 24] and hf_calls == [24, 24, 24]
    assert out["decode_ratio"] == 1.0 and out["greedy_tokens_equal"] is True
