"""The cpu backend's per-machine choice of weight layout for decode GEMMs (backends/cpu/gemm_layout.py): both
layouts give cpu_ref's results on every GEMM path, the choice is measured once and kept in the cache file,
and a bad setting or cache file is handled."""
import json
import sys
from pathlib import Path

import pytest
import torch

from deepport.backends.cpu import gemm_layout
from deepport.backends.cpu import ops as cpu
from deepport.backends.cpu_ref import ops as ref
from deepport.core.errors import ConfigError, ContractError

sys.path.insert(0, str(Path(__file__).parent))
from test_cpu_backend import _experts  # noqa: E402  (x, topk weights, ids, w1, w2, w3 on a seeded generator)


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    """One torch thread, an empty DEEPPORT_CACHE, and no remembered choices before and after each test. The MoE
    runs its torch strategies, whose weight layouts these tests check (the C kernel reads weights as stored and
    is tested in test_cpu_native.py)."""
    monkeypatch.setattr(cpu, "_use_native", lambda *a: False)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("DEEPPORT_CACHE", str(tmp_path))
    monkeypatch.delenv("DEEPPORT_CPU_GEMM_LAYOUT", raising=False)
    gemm_layout.reset()
    yield
    gemm_layout.reset()
    torch.set_num_threads(n)


def _no_measuring(*a):
    raise AssertionError("measured, but the choice should have come from the rule, the setting or the cache")


@pytest.mark.parametrize("layout", ["kmajor", "nk", "onednn"])
@pytest.mark.parametrize("m", [1, 2, 5, 16, 40])
def test_linear_matches_cpu_ref_in_every_layout(monkeypatch, layout, m):
    monkeypatch.setenv("DEEPPORT_CPU_GEMM_LAYOUT", layout)
    g = torch.Generator().manual_seed(31 + m)
    x, w = torch.randn(m, 96, generator=g), torch.randn(160, 96, generator=g)
    torch.testing.assert_close(cpu.linear(x, w).double(), ref.linear(x.double(), w.double()), rtol=1e-5, atol=1e-5)
    x3 = x.view(1, m, 96)  # [B, S, D] activations take the same path
    torch.testing.assert_close(cpu.linear(x3, w), cpu.linear(x, w).view(1, m, 160), rtol=0, atol=0)
    xt = torch.randn(96, m, generator=g).t()  # a non-contiguous activation
    torch.testing.assert_close(cpu.linear(xt, w).double(), ref.linear(xt.double(), w.double()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["kmajor", "nk", "onednn"])
@pytest.mark.parametrize("m", [1, 2, 8, 24])
def test_moe_experts_match_cpu_ref_in_every_layout(monkeypatch, layout, m):
    """m = 1, 2: the per-token loop; 8, 24: sorted groups with 1..n rows an expert (several row buckets). onednn
    is for dense weights: the experts read [N, K] then."""
    monkeypatch.setenv("DEEPPORT_CPU_GEMM_LAYOUT", layout)
    x, wts, ids, w1, w2, w3 = _experts(torch.Generator().manual_seed(7 + m), m, i=48, d=80)
    ids[0, 0] = -1  # an expert on another rank contributes nothing
    want = ref.moe_experts(x.double(), wts, ids, w1.double(), w2.double(), w3.double())
    torch.testing.assert_close(cpu.moe_experts(x, wts, ids, w1, w2, w3).double(), want, rtol=1e-5, atol=1e-5)


def test_nk_makes_no_kmajor_copy(monkeypatch):
    import gc

    gc.collect()
    monkeypatch.setenv("DEEPPORT_CPU_GEMM_LAYOUT", "nk")
    g = torch.Generator().manual_seed(3)
    before = cpu._layout_bytes[0]
    cpu.linear(torch.randn(4, 64, generator=g), torch.randn(32, 64, generator=g))
    cpu.linear(torch.randn(40, 64, generator=g), torch.randn(32, 64, generator=g))  # prefill-sized too
    assert cpu._layout_bytes[0] == before


def test_small_weights_and_prefill_sized_gemms_are_not_measured(monkeypatch):
    monkeypatch.setattr(gemm_layout, "measure", _no_measuring)
    assert gemm_layout.layout(1, 256, 128, torch.float32) == "kmajor"  # 128 KiB: K-major, no measuring
    assert gemm_layout.layout(64, 4096, 4096, torch.float32) == "kmajor"  # M > 16: compute-bound
    assert not (gemm_layout.cache_path()).exists()


def test_a_measured_choice_is_kept_in_the_cache_file_and_read_back(monkeypatch):
    calls = []
    real = gemm_layout.measure

    def counting(m, k, n, dtype):
        calls.append((m, k, n))
        return real(m, k, n, dtype)

    monkeypatch.setattr(gemm_layout, "_STREAM_BYTES", 8 << 20)  # a quick measurement
    monkeypatch.setattr(gemm_layout, "measure", counting)
    first = gemm_layout.layout(3, 1024, 512, torch.float32)  # 2 MiB weight, 3 rows: bucket 4
    assert calls == [(4, 1024, 512)] and first in gemm_layout.LAYOUTS
    assert gemm_layout.layout(4, 1024, 512, torch.float32) == first and len(calls) == 1  # same bucket
    rates = json.loads(gemm_layout.cache_path().read_text())[gemm_layout.machine()]["4x1024x512:float32"]
    assert {"nk", "kmajor"} <= set(rates) and all(v > 0 for v in rates.values())  # GB/s of each way

    gemm_layout.reset()  # a new process: the file answers, nothing is measured
    monkeypatch.setattr(gemm_layout, "measure", _no_measuring)
    assert gemm_layout.layout(4, 1024, 512, torch.float32) == first


def test_the_choice_follows_the_rates(monkeypatch):
    """[N, K] unless another way is >= 3% faster; oneDNN only for dense weights."""
    rates = {"8x1024x512:float32": {"nk": 5.0, "kmajor": 5.1, "onednn": 7.0},
             "1x1024x512:float32": {"nk": 5.0, "kmajor": 9.0, "onednn": 5.0},
             "2x1024x512:float32": {"nk": 5.0, "kmajor": 4.0}}
    monkeypatch.setattr(gemm_layout, "measure", lambda m, k, n, dtype: rates[f"{m}x{k}x{n}:float32"])
    f32 = torch.float32
    assert gemm_layout.layout(8, 1024, 512, f32) == "onednn"
    assert gemm_layout.layout(8, 1024, 512, f32, dense=False) == "nk"
    assert not gemm_layout.kmajor_faster(8, 1024, 512, f32)
    assert gemm_layout.layout(1, 1024, 512, f32) == "kmajor" and gemm_layout.kmajor_faster(1, 1024, 512, f32)
    assert gemm_layout.layout(2, 1024, 512, f32) == "nk"


def test_the_setting_fixes_the_layout_without_measuring(monkeypatch):
    monkeypatch.setattr(gemm_layout, "measure", _no_measuring)
    for value in ("nk", "kmajor", "onednn"):
        gemm_layout.reset()
        monkeypatch.setenv("DEEPPORT_CPU_GEMM_LAYOUT", value)
        assert gemm_layout.layout(1, 4096, 4096, torch.float32) == value
        assert gemm_layout.kmajor_faster(1, 4096, 4096, torch.float32) is (value == "kmajor")


def test_a_bad_setting_names_the_choices(monkeypatch):
    monkeypatch.setenv("DEEPPORT_CPU_GEMM_LAYOUT", "fast")
    with pytest.raises(ConfigError, match="tuned .*kmajor.*nk.*onednn"):
        gemm_layout.layout(1, 4096, 4096, torch.float32)


@pytest.mark.parametrize("content", ["{not json", '{"%s": {"1x2048x1024:float32": true}}', "[1, 2]"])
def test_a_corrupt_or_stale_cache_file_is_measured_again_and_rewritten(monkeypatch, content):
    path = gemm_layout.cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content.replace("%s", gemm_layout.machine()))
    monkeypatch.setattr(gemm_layout, "measure", lambda *a: {"nk": 1.0, "kmajor": 2.0})
    assert gemm_layout.layout(1, 2048, 1024, torch.float32) == "kmajor"
    assert json.loads(path.read_text())[gemm_layout.machine()] == {"1x2048x1024:float32": {"nk": 1.0, "kmajor": 2.0}}


def test_the_measurement_announces_itself_once(monkeypatch, capsys):
    monkeypatch.setattr(gemm_layout, "_STREAM_BYTES", 4 << 20)
    monkeypatch.setattr(gemm_layout, "_announced", [False])
    gemm_layout.layout(1, 1024, 1024, torch.float32)
    gemm_layout.layout(2, 1024, 1024, torch.float32)
    err = capsys.readouterr().err
    assert err.count("measuring how this CPU's decode GEMMs read their weights") == 1
    assert str(gemm_layout.cache_path()) in err


@pytest.mark.parametrize("m", [1, 8])
def test_the_fused_gate_up_copy_follows_in_place_updates_of_either_weight(monkeypatch, m):
    """K-major w1/w3 means one copy of [w1 ; w3]: remade when w1 or w3 changes in place, gone with w1."""
    import gc
    import weakref

    gc.collect()
    monkeypatch.setenv("DEEPPORT_CPU_GEMM_LAYOUT", "kmajor")
    x, wts, ids, w1, w2, w3 = _experts(torch.Generator().manual_seed(40 + m), m, e=8, i=32, d=48, k=2)
    before = cpu._layout_bytes[0]
    for change in (None, lambda: w3.mul_(-1.5), lambda: w1[ids[0, 0]].add_(0.25)):
        if change:
            change()
        want = ref.moe_experts(x.double(), wts, ids, w1.double(), w2.double(), w3.double())
        torch.testing.assert_close(cpu.moe_experts(x, wts, ids, w1, w2, w3).double(), want, rtol=1e-5, atol=1e-5)
    assert ("gate_up", id(w1)) in cpu._LAYOUT
    alive = weakref.ref(w1)
    del w1, w2, w3
    gc.collect()
    assert alive() is None and cpu._layout_bytes[0] == before


def test_gradients_reach_expert_weights_that_need_them(monkeypatch):
    """A weight that needs grad is read through views of itself (no cached copy, no detached alias)."""
    monkeypatch.setenv("DEEPPORT_CPU_GEMM_LAYOUT", "nk")
    g = torch.Generator().manual_seed(11)
    e, i, d, k = 4, 16, 24, 2
    w1, w3 = (torch.randn(e, i, d, generator=g).mul(0.1).requires_grad_() for _ in range(2))
    w2 = torch.randn(e, d, i, generator=g).mul(0.1).requires_grad_()
    x, ids, wts = torch.randn(1, d, generator=g), torch.tensor([[1, 3]]), torch.tensor([[0.6, 0.4]])
    cpu.moe_experts(x, wts, ids, w1, w2, w3).sum().backward()
    want = [torch.autograd.grad(ref.moe_experts(x, wts, ids, w1, w2, w3).sum(), w)[0] for w in (w1, w2, w3)]
    for w, gw in zip((w1, w2, w3), want):
        torch.testing.assert_close(w.grad, gw, rtol=1e-5, atol=1e-6)


def test_bf16_measures_all_three_ways(monkeypatch):
    monkeypatch.setattr(gemm_layout, "_STREAM_BYTES", 4 << 20)
    rates = gemm_layout.measure(2, 1024, 512, torch.bfloat16)
    assert set(rates) == ({"nk", "kmajor", "onednn"} if torch.backends.mkldnn.is_available() else {"nk", "kmajor"})


def test_a_cache_that_cannot_be_written_is_said_once(monkeypatch, capsys):
    from deepport.core import output_dir

    def refuse(*a, **k):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(output_dir, "write_text", refuse)
    monkeypatch.setattr(gemm_layout, "_save_failed", [False])
    monkeypatch.setattr(gemm_layout, "measure", lambda *a: {"nk": 1.0, "kmajor": 2.0})
    assert gemm_layout.layout(1, 2048, 1024, torch.float32) == "kmajor"  # the run goes on with what it measured
    assert gemm_layout.layout(2, 2048, 1024, torch.float32) == "kmajor"
    err = capsys.readouterr().err
    assert err.count("could not keep the measured GEMM layouts") == 1 and "read-only file system" in err


def test_expert_weights_in_another_dtype_than_x_are_refused():
    x, wts, ids, w1, w2, w3 = _experts(torch.Generator().manual_seed(5), 2, e=4, i=16, d=32, k=2)
    with pytest.raises(ContractError, match="expert weights are torch.bfloat16.*x is torch.float32.*once at load"):
        cpu.moe_experts(x, wts, ids, w1.bfloat16(), w2.bfloat16(), w3.bfloat16())
