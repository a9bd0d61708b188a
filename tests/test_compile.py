"""Issue 11: contracts as torch.library ops, the capturable decode step, torch.compile (docs/compile.md).

Quick tier: the S=1 decode step traces with zero graph breaks on cpu_ref; the step does no host sync
outside op bodies; every quick conformance case's fake implementation gives the real output's shapes and
dtypes. Slow tier (tracing costs tens of seconds per graph on the shared 2-core machine): S=2 and prefill
without breaks, the same through the plugin wrapper (a `deepport new-backend` package), the step through
aot_eager (Dynamo + functionalisation) and Inductor-compiled greedy tokens == eager, fp32/bf16/fp8, plain
and MTP, batch 1 and a ragged 3.
"""
import ast
import contextlib
import inspect
import sys
import textwrap
import threading

import pytest
import torch

import deepport
from deepport.conformance.case import to_device
from deepport.conformance.cases import all_cases
from deepport.core import custom_ops, registry
from deepport.core.formats import Fp8Weight
from deepport.core.generate import generate
from deepport.core.model import Transformer
from deepport.core.speculative import generate_mtp
from deepport.core.step import DecodeStep, graph_breaks

PROMPTS = [[5, 17, 301, 44, 9, 12], [88, 3], [640, 2, 77, 150, 31, 8, 96, 400, 21]]  # ragged


@pytest.fixture(scope="module")
def ref32():
    return deepport.load(None, backend="cpu_ref", dtype="fp32", compile=True)


def _decode_inputs(t: Transformer, batch: int, s: int):
    """A cache with `batch` prefilled rows (seeded ids) and room reserved for s more tokens."""
    g = torch.Generator().manual_seed(11)
    cache = t.new_cache(batch, 64)
    with torch.inference_mode():
        for r in range(batch):
            t(torch.randint(0, t.args.vocab_size, (1, 5 + r), generator=g), cache, rows=[r])
    cache.reserve(list(range(batch)), s)
    return torch.randint(0, t.args.vocab_size, (batch, s), generator=g), cache


def _assert_no_breaks(t: Transformer, decode_s=(1, 2), prefill=True):
    with torch.inference_mode():
        for s in decode_s:  # 1: plain decode, 2: MTP verification
            ids, cache = _decode_inputs(t, 2, s)
            assert graph_breaks(t.decode_step, ids, cache) == []
        if prefill:
            ids = torch.randint(0, t.args.vocab_size, (1, 7), generator=torch.Generator().manual_seed(3))
            assert graph_breaks(lambda x: t.logits(t(x)), ids) == []
    torch._dynamo.reset()


def test_decode_step_has_no_graph_breaks_on_cpu_ref(ref32):
    """Quick: the S=1 decode step traces as one graph (Dynamo only; about 10 s on 2 idle cores)."""
    assert ref32.table.custom_ops and ref32.step is not None
    _assert_no_breaks(ref32.transformer, decode_s=(1,), prefill=False)


@pytest.mark.slow
def test_mtp_verify_and_prefill_have_no_graph_breaks_on_cpu_ref(ref32):
    _assert_no_breaks(ref32.transformer, decode_s=(2,), prefill=True)


@pytest.mark.slow
def test_fp8_decode_has_no_graph_breaks_on_cpu_ref():
    """Fp8Weight crosses the op boundary as tensors plus plain fields, inside the graph."""
    m = deepport.load(None, backend="cpu_ref", dtype="fp8", compile=True)
    _assert_no_breaks(m.transformer, decode_s=(1,), prefill=False)


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The package `deepport new-backend` writes, importable and discovered (no pip install)."""
    from deepport.porting import new_backend

    new_backend("compilechip", tmp_path / "pkg")
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    import deepport_compilechip

    found = registry.discover()
    monkeypatch.setattr(registry, "discover", lambda: {**found, "compilechip": deepport_compilechip.BACKEND})
    yield deepport_compilechip.BACKEND
    sys.modules.pop("deepport_compilechip", None)
    sys.modules.pop("deepport_compilechip.ops", None)


@pytest.mark.slow
def test_plugin_backend_ops_become_custom_ops_without_graph_breaks(plugin):
    m = deepport.load(None, backend="compilechip", dtype="fp32", compile=True)
    assert m.table.report["silu_mul"] == "native"
    assert m.table.silu_mul.custom_op_key.startswith("compilechip.silu_mul")  # the plugin's code, as deepport::
    _assert_no_breaks(m.transformer)


# ---- no host sync in the step ------------------------------------------------------------------------------

_local = threading.local()
SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu")


@contextlib.contextmanager
def no_host_sync_outside_ops():
    """Tensor -> host conversions raise, except inside an op body (a backend's business, e.g. cpu_ref's MoE)."""
    saved_impls = dict(custom_ops._IMPLS)
    originals = {n: getattr(torch.Tensor, n) for n in SYNCS}

    def inside(fn):
        def run(*a, **k):
            _local.depth = getattr(_local, "depth", 0) + 1
            try:
                return fn(*a, **k)
            finally:
                _local.depth -= 1
        return run

    def guarded(name):
        orig = originals[name]

        def method(self, *a, **k):
            if getattr(_local, "depth", 0) == 0:
                raise AssertionError(f"host sync in the decode step: Tensor.{name}()")
            return orig(self, *a, **k)
        return method

    for k, fn in saved_impls.items():
        custom_ops._IMPLS[k] = inside(fn)
    for n in SYNCS:
        setattr(torch.Tensor, n, guarded(n))
    try:
        yield
    finally:
        for n, fn in originals.items():
            setattr(torch.Tensor, n, fn)
        custom_ops._IMPLS.update(saved_impls)


def test_the_decode_step_does_no_host_sync(ref32):
    t = ref32.transformer
    ids, cache = _decode_inputs(t, 3, 2)
    with torch.inference_mode():
        want = t.decode_step(ids, cache)[1]
        with no_host_sync_outside_ops():
            got = t.decode_step(ids, cache)[1]
        with pytest.raises(AssertionError, match="host sync"), no_host_sync_outside_ops():  # the detector works
            cache.seq_lens.tolist()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_step_functions_never_call_item_or_tolist():
    """Source check of everything a decode step runs outside op bodies."""
    import deepport.core.model as model
    import deepport.core.step as step

    fns = [model.Transformer.decode_step, model.Transformer.cache_context, model.Transformer.rope_tables,
           model.Transformer.hidden, model.Transformer.embed_tokens, model.Transformer.logits, model.Block.forward,
           model.MLA.forward, model.MLP.forward, model.MoE.forward, model.Gate.forward, model.RMSNorm.forward,
           model.Linear.forward, model.Linear.w, step.DecodeStep.__call__, step.DecodeStep.pad,
           step.DecodeStep._eager_or_compiled]
    for fn in fns:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                assert node.func.attr not in ("item", "tolist", "numpy", "cpu", "synchronize"), \
                    f"{fn.__qualname__} calls .{node.func.attr}()"


# ---- fake implementations ------------------------------------------------------------------------------

def _fake(value, mode):
    if isinstance(value, torch.Tensor):
        return mode.from_tensor(value)
    if isinstance(value, Fp8Weight):
        return Fp8Weight(mode.from_tensor(value.weight), mode.from_tensor(value.scale_inv), value.block,
                         value.scale_fmt)
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
        return type(value)(mode.from_tensor(v) for v in value)
    return value


def _outs(value):
    return [value] if isinstance(value, torch.Tensor) else list(value)


@pytest.mark.parametrize("case", all_cases("quick"), ids=lambda c: c.name)
def test_fake_impl_matches_real_shapes_and_dtypes(case):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from deepport.backends.cpu_ref import ops as ref

    op = custom_ops.as_custom_op(case.op, getattr(ref, case.op), "cpu_ref")
    inputs = case.make()
    with torch.inference_mode():
        real = _outs(op(**{k: to_device(v, "cpu") for k, v in inputs.items()}))
        mode = FakeTensorMode()
        fake_inputs = {k: _fake(v, mode) for k, v in inputs.items()}
        with mode:
            fake = _outs(op(**fake_inputs))
    # strides too: Inductor asserts a custom op's real output strides against the fake's
    layout = (lambda outs: [(tuple(o.shape), o.dtype, o.stride()) for o in outs])
    assert layout(real) == layout(fake)


# ---- compiled decode == eager decode ---------------------------------------------------------------------

def _tokens(m, step, prompts, mtp, n=8):
    gen = generate_mtp if mtp else generate
    return gen(m.transformer, prompts, n, eos_id=None, step=step).tokens


def test_a_step_compiled_after_a_fresh_prefill_is_traced_once(capsys):
    """A fresh prefill never derives the absorbed weights; before prepare_decode, the first traced step derived
    them inside its graph, stored them, and Dynamo traced the step again on the next call (a cold --compile took
    45 s instead of 27 s). One S=1 step over several tokens: one graph."""
    m = deepport.load(None, backend="cpu", dtype="fp32")
    graphs, inputs = [], []

    def count(gm, example_inputs):  # a torch.compile backend that runs the traced graph as it is
        graphs.append(gm)
        inputs.append(example_inputs)
        return gm.forward

    torch._dynamo.reset()
    step = DecodeStep(m.transformer, compile=True, compile_backend=count)
    assert _tokens(m, step, PROMPTS[:1], mtp=False, n=5) == _tokens(m, None, PROMPTS[:1], mtp=False, n=5)
    assert len(graphs) == 1
    # each cache pool enters the graph once: a second input aliasing a pool the step writes (the flat views
    # cache.write used) made AOT rebuild a "synthetic base" of every pool on every call (compiled step -6%)
    cache = next(iter(step._caches.values()))
    pools = {t.untyped_storage().data_ptr() for t in cache.kv + cache.pe}
    seen = [t.untyped_storage().data_ptr() for t in inputs[0] if isinstance(t, torch.Tensor)]
    assert all(seen.count(p) == 1 for p in pools), [seen.count(p) for p in pools]
    # the compile is announced before it starts, once per new shape
    assert capsys.readouterr().err.count("deepport: compiling the decode step for 1 row(s) x 1 token(s)") == 1
    torch._dynamo.reset()


def test_a_step_that_cannot_be_traced_runs_eager_and_says_where(monkeypatch, capsys):
    """A traced op that reads a data-dependent length (.tolist() of a bincount, as cpu's eager grouped MoE does)
    is no graph break Dynamo can split at: it raised out of generate (`bench --compile --batch 32` crashed
    before cpu's MoE became an opaque op past 64 pairs). The step says where and runs that kind eager."""
    from deepport.backends.cpu import ops as cpu

    m = deepport.load(None, backend="cpu", dtype="fp32")
    monkeypatch.setattr(cpu, "_experts_pairs", cpu._experts_grouped)  # the traced path now reads counts
    monkeypatch.setattr(cpu, "_traced_strategy", lambda *a: "pairs")
    torch._dynamo.reset()
    step = DecodeStep(m.transformer, compile=True, compile_backend="eager")
    want = _tokens(m, None, PROMPTS, mtp=False, n=4)
    assert _tokens(m, step, PROMPTS, mtp=False, n=4) == want
    err = capsys.readouterr().err
    assert "could not compile the decode step (GuardOnDataDependentSymNode" in err and "_experts_grouped" in err
    assert step._eager == {"decode"} and "could not compile, eager: decode" in step.describe()
    assert _tokens(m, step, PROMPTS, mtp=False, n=4) == want  # later calls run eager, no new attempt
    assert capsys.readouterr().err.count("could not compile") == 0
    torch._dynamo.reset()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_mtp_drafting_through_the_step_keeps_the_eager_tokens(temperature):
    """With a DecodeStep, MTP drafting runs step.draft over every row at S=2 (accepted rows keep both positions,
    rejected rows the first, finished rows none): the same tokens as the eager loop, greedy and sampled, for one
    row and a ragged batch whose drafts are partly rejected."""
    m = deepport.load(None, backend="cpu", dtype="fp32")
    t = m.transformer
    step = DecodeStep(t)  # eager step: the same bookkeeping as a compiled one, without compile time
    calls = []
    draft = step.draft
    step.draft = lambda h, ids, cache: calls.append(tuple(ids.shape)) or draft(h, ids, cache)
    for prompts in (PROMPTS[:1], PROMPTS):
        want = generate_mtp(t, prompts, 10, temperature, seed=3, eos_id=None)
        got = generate_mtp(t, prompts, 10, temperature, seed=3, eos_id=None, step=step)
        assert got.tokens == want.tokens and got.stats["accepted"] == want.stats["accepted"]
        assert want.stats["accepted"] < want.stats["drafted"] or len(prompts) == 1  # rejections were exercised
    assert set(calls) == {(1, 2), (3, 2)}  # every row, S=2 (the step pads them to the bucket)


def test_warm_steps_check_only_the_guards_that_tell_graphs_apart(monkeypatch, ref32):
    """A (shape, cache) that ran compiled before runs under skip_guard_eval_unsafe (+5% on the embedded model's
    compiled step); when Dynamo needs a new graph after all (here: after torch._dynamo.reset()), it refuses
    before running anything and the step compiles normally instead of failing."""
    graphs, stances = [], []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    real_stance = torch.compiler.set_stance
    monkeypatch.setattr(torch.compiler, "set_stance", lambda *a, **k: stances.append(k) or real_stance(*a, **k))
    step = DecodeStep(ref32.transformer, compile=True, compile_backend=count)
    monkeypatch.setattr(step, "_fns", {"decode": lambda ids, cache: ids * 2 + 1})
    ids = torch.arange(6).view(2, 3)
    torch._dynamo.reset()
    assert torch.equal(step._eager_or_compiled(ids, None), ids * 2 + 1) and len(graphs) == 1
    assert torch.equal(step._eager_or_compiled(ids, None, warm=True), ids * 2 + 1) and len(graphs) == 1
    assert stances == [{"skip_guard_eval_unsafe": True}]
    torch._dynamo.reset()
    assert torch.equal(step._eager_or_compiled(ids, None, warm=True), ids * 2 + 1) and len(graphs) == 2
    monkeypatch.setenv("DEEPPORT_COMPILE_GUARDS", "1")
    assert torch.equal(step._eager_or_compiled(ids, None, warm=True), ids * 2 + 1) and len(stances) == 2
    torch._dynamo.reset()


def test_inductor_wrapper_checks_are_off_unless_asked_for(monkeypatch, ref32):
    """Inductor's per-call size/stride/alignment checks cost 10% of a compiled CPU step: off for Inductor (the
    compiled-equals-eager token tests below stand in for them), back with DEEPPORT_COMPILE_ASSERTS=1, never
    passed to another torch.compile backend (which would reject Inductor options)."""
    import torch._inductor.config as inductor_config

    monkeypatch.delenv("DEEPPORT_COMPILE_ASSERTS", raising=False)
    opts = DecodeStep(ref32.transformer, compile=True)._inductor_options()
    assert opts and all(opts[k] is False for k in ("size_asserts", "alignment_asserts"))
    assert all(hasattr(inductor_config, k) for k in opts)  # names Inductor knows
    assert DecodeStep(ref32.transformer, compile=True, compile_backend="aot_eager")._inductor_options() is None
    monkeypatch.setenv("DEEPPORT_COMPILE_ASSERTS", "1")
    opts = DecodeStep(ref32.transformer, compile=True)._inductor_options()
    assert not any(k in opts for k in ("size_asserts", "alignment_asserts", "scalar_asserts"))


def test_one_row_products_become_inductor_reductions_on_a_cpu(ref32):
    """On a CPU the compiled step asks Inductor to turn one-row matrix products into its own fused reductions
    (decompose_mm_pass; embedded batch 1 +10%): a batch-1 projection leaves no mm in the generated code."""
    from torch._inductor.utils import run_and_get_code

    step = DecodeStep(ref32.transformer, compile=True)
    assert "decompose_mm_pass" in step._inductor_options()["post_grad_fusion_options"]
    torch._dynamo.reset()
    w, x = torch.randn(128, 256), torch.randn(1, 256)

    def norm_then_project(x):
        return torch.nn.functional.rms_norm(x, (256,), None, 1e-6) @ w.t()

    fn = torch.compile(norm_then_project, options=step._inductor_options(), fullgraph=True)
    got, code = run_and_get_code(fn, x)
    torch.testing.assert_close(got, norm_then_project(x), rtol=1e-5, atol=1e-5)
    assert "extern_kernels.mm" not in code[0]
    torch._dynamo.reset()


@pytest.mark.slow
def test_step_through_aot_eager_decodes_the_eager_tokens(ref32):
    """Dynamo + AOT functionalisation of the step (cache writes are input mutations) keep the tokens."""
    step = DecodeStep(ref32.transformer, compile=True, compile_backend="aot_eager")
    want = _tokens(ref32, None, PROMPTS, mtp=False)
    assert _tokens(ref32, step, PROMPTS, mtp=False) == want
    assert step.report == []
    torch._dynamo.reset()


@pytest.mark.slow  # Inductor code generation: about a minute per (bucket, S) on the 2-core machine
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp8"])
def test_inductor_compiled_tokens_equal_eager(dtype):
    m = deepport.load(None, backend="cpu_ref", dtype=dtype, compile=True)
    for prompts in (PROMPTS[:1], PROMPTS):
        for mtp in (False, True):
            want = _tokens(m, None, prompts, mtp)
            assert _tokens(m, m.step, prompts, mtp) == want, (dtype, len(prompts), mtp)
    assert m.step.report == []
    torch._dynamo.reset()


def test_compile_traces_a_traceable_backends_ops_and_wraps_the_others():
    """cpu's ops are torch code Inductor can fuse across: --compile traces them; cpu_ref (like any plugin) keeps the
    opaque deepport:: custom ops, and so does every backend under --graphs (checked in its refusal below)."""
    from deepport.core import registry

    assert registry.get_backend("cpu").traceable and not registry.get_backend("cpu_ref").traceable
    m = deepport.load(None, backend="cpu", dtype="fp32", compile=True)
    assert not m.table.custom_ops and "ops traced" in m.step.describe()
    with torch.inference_mode():  # the S=1 step of the traced ops is one graph too
        ids, cache = _decode_inputs(m.transformer, 2, 1)
        assert graph_breaks(m.transformer.decode_step, ids, cache) == []
    torch._dynamo.reset()


@pytest.mark.slow  # Inductor code generation of the traced cpu ops: about a minute per (bucket, S)
def test_traced_cpu_compiled_tokens_equal_eager():
    m = deepport.load(None, backend="cpu", dtype="fp32", compile=True)
    for prompts in (PROMPTS[:1], PROMPTS):
        for mtp in (False, True):
            want = _tokens(m, None, prompts, mtp)
            assert _tokens(m, m.step, prompts, mtp) == want, (len(prompts), mtp)
    assert m.step.report == [] and set(m.step._compiled) == {"decode", "mtp"}  # MTP drafts compiled too
    torch._dynamo.reset()


@pytest.mark.parametrize("flags", [{"compile": True}, {"graphs": True}])
def test_compile_and_graphs_refuse_the_per_op_finite_check(monkeypatch, flags):
    """DEEPPORT_CHECK_FINITE=1 syncs after every op: under --compile it broke the graph at every op and hit
    the recompile limit (a 45 s, 0.3 tok/s run). Now one line names both ways out, before any loading."""
    monkeypatch.setenv("DEEPPORT_CHECK_FINITE", "1")
    with pytest.raises(deepport.DeepportError, match=r"DEEPPORT_CHECK_FINITE=1 .*unset it .*or drop --compile"):
        deepport.load(None, backend="cpu", dtype="fp32", **flags)


def test_graphs_need_a_cuda_device():
    with pytest.raises(deepport.DeepportError, match=r"\(--graphs\) captures CUDA/HIP graphs.*--compile works"):
        deepport.load(None, backend="cpu_ref", dtype="fp32", graphs=True)


def test_buckets_pad_to_powers_of_two_and_caches_are_reused(ref32):
    step = DecodeStep(ref32.transformer)
    assert [step.bucket(b) for b in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]
    c = step.cache(3, 40)
    assert c.batch == 4 and c.max_blocks == 4  # 40 tokens -> 3 blocks -> 4 (power of two)
    c.reserve([0], 5)
    c.advance([0], 5)
    assert step.cache(4, 50) is c and c.lens == [0] * 4 and int(c.seq_lens.sum()) == 0
    assert (c.block_table == c.scratch).all()
    with pytest.raises(deepport.DeepportError, match="larger than the largest decode bucket"):
        step.bucket(1000)


def _compiled_step_bench(*args):
    import os
    import subprocess

    from test_core import ROOT

    env = dict(os.environ, DEEPPORT_PROGRESS="0")
    env.pop("TRITON_INTERPRET", None)  # else the interpreter's cuda/rocm are available too
    return subprocess.run([sys.executable, str(ROOT / "benchmarks/compiled_step.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)


def test_compiled_step_bench_refuses_an_unknown_inductor_setting_before_loading():
    r = _compiled_step_bench("--inductor", "no_such_setting=1")
    assert r.returncode != 0 and "torch._inductor.config has no 'no_such_setting'" in r.stderr
    r = _compiled_step_bench("--inductor", "cpp_wrapper")
    assert r.returncode != 0 and "--inductor takes KEY=VALUE" in r.stderr


@pytest.mark.slow  # Inductor code generation of the embedded model's batch-1 step (cached after the first run)
def test_compiled_step_bench_times_and_profiles_the_compiled_step():
    import json

    r = _compiled_step_bench("--backend", "cpu", "--steps", "3", "--profile", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["step"].startswith("compiled (torch.compile") and out["step_ms"] > 0
    assert out["calls_per_step"].get("_empty_strided_cpu", 0) > 0  # Inductor's wrapper allocates its buffers
    assert len(out["profile_top"]) == 5 and "tottime" in out["profile_top"][0]


def test_bench_profiles_the_graph_the_timed_runs_ran(ref32):
    """`bench --compile` profiles the host overhead on the cache size the timed runs used: with a cache of its own
    size, a compiled step compiled one more graph just to be profiled (about 20 s on the embedded cpu model)."""
    from types import SimpleNamespace

    from deepport import bench_step

    t = ref32.transformer
    step = DecodeStep(t, compile=True, compile_backend="eager")
    prompt, new = [5, 6, 7, 8], 40
    generate(t, [prompt], new, step=step)  # room 45 -> a 64-token cache
    seen = set(step._seen)
    m = SimpleNamespace(transformer=t, step=step)
    bench_step.host_overhead(m, 1, steps=2, max_tokens=len(prompt) + new + 1)  # the room generate used
    assert step._seen == seen
    bench_step.host_overhead(m, 1, steps=2)  # its own room (16 tokens): another cache, another graph
    assert len(step._seen) == len(seen) + 1
    torch._dynamo.reset()


def test_bench_decoder_writes_one_token_a_step_eager_and_through_a_step(ref32):
    """The bench's decode loop advances each row by one token a step on both paths (the eager forward advances the
    cache itself; the eager profile used to advance it a second time, attending over unwritten slots)."""
    from types import SimpleNamespace

    from deepport.bench_step import decoder

    t = ref32.transformer
    for step in (None, DecodeStep(t)):
        with torch.inference_mode():
            one = decoder(SimpleNamespace(transformer=t, step=step), 2, 16, prompt_len=5)
            for _ in range(3):
                assert one().shape == (2, 1)
        assert one.cache.lens[:2] == [8, 8] and one.cache.seq_lens[:2].tolist() == [8, 8], step
