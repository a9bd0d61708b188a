"""ascend under the CPU torch_npu stand-in: probe, labels, and the argument plumbing of each fused op.

The stand-in (tests/npu_standin) implements the documented semantics and limits of the torch_npu ops the
backend calls and records every call, so these tests check which op ran, with which arguments and
layouts, and that the result matches cpu_ref. They prove plumbing, not Ascend kernels ("stand-in").
"""
import re

import pytest
import torch

from ascend_standin import npu  # noqa: F401  (fixture)
from deepport.backends import ascend
from deepport.backends.cpu_ref import ops as ref
from deepport.core import ops as contracts
from deepport.core import registry
from deepport.core.errors import BackendError

BF = torch.bfloat16


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _rn(g, *shape, dtype=BF, std=1.0):
    return (torch.randn(*shape, generator=g) * std).to(dtype)


def _close(a, b, rtol=1.6e-2, atol=1e-2):
    torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol)


def _ops():
    from deepport.backends.ascend import ops

    return ops


def test_probe_and_label_say_stand_in(npu):
    p = ascend.probe()
    assert p.available and "stand-in" in p.reason and "910B" in p.reason and "bf16 only" in p.reason
    b = ascend.BACKEND
    assert b.evidence_label() == "stand-in"
    assert b.device() == torch.device("cpu")  # DEEPPORT_DEVICE maps the stand-in's npu to CPU tensors


def test_probe_reports_failed_import(npu, monkeypatch):
    def broken():
        raise ImportError("libhccl.so: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(ascend, "_torch_npu", broken)
    p = ascend.probe()
    assert not p.available
    assert p.reason.startswith("torch_npu failed to import (ImportError: libhccl.so")
    assert "set_env.sh" in p.reason and "TORCH_DEVICE_BACKEND_AUTOLOAD=0" in p.reason


def test_probe_reports_missing_device(npu, monkeypatch):
    monkeypatch.setattr(npu.npu, "is_available", lambda: False)
    p = ascend.probe()
    assert not p.available and "no Ascend NPU is visible" in p.reason


def test_probe_refuses_310p(npu, monkeypatch):
    monkeypatch.setenv("NPU_STANDIN_SOC", "202")
    p = ascend.probe()
    assert not p.available and "310P" in p.reason and "910B, 910C and 950" in p.reason


@pytest.mark.parametrize("soc, fmt", [("223", None), ("250", None), ("260", "e4m3fn")])
def test_fp8_only_on_950(npu, monkeypatch, soc, fmt):
    monkeypatch.setenv("NPU_STANDIN_SOC", soc)
    f = ascend.BACKEND.resolve_fp8_format()
    assert (f.name if f else None) == fmt
    if fmt is None:
        with pytest.raises(BackendError, match="no fp8 format on this device; use --dtype bf16"):
            registry.check_dtype(ascend.BACKEND, "fp8")
    else:
        registry.check_dtype(ascend.BACKEND, "fp8")


def test_every_contract_bound_and_named(npu):
    ops = _ops()
    table = registry.bind(ascend.BACKEND, fallback="error")
    assert table.report == {op: ("composite" if op == "linear" else "native") for op in contracts.CONTRACTS}
    assert set(ops.PROVENANCE) == set(contracts.PRIMITIVES)
    for op, what in ops.PROVENANCE.items():
        assert what.startswith(("torch_npu.npu_", "generic torch", "torch.distributed", "torch native")), (op, what)
        if what == ops.GENERIC:
            assert op in ops.GENERIC_ONLY


def test_rms_norm_plumbing(npu):
    ops, g = _ops(), _g(1)
    x, w, r = _rn(g, 3, 5, 64), _rn(g, 64, dtype=torch.float32), _rn(g, 3, 5, 64)
    _close(ops.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6))
    y, res = ops.rms_norm(x, w, 1e-5, r)
    y_ref, res_ref = ref.rms_norm(x, w, 1e-5, r)
    _close(y, y_ref)
    assert torch.equal(res, res_ref)  # x + residual rounded once to bf16 either way
    (plain,), (fused,) = npu.calls("npu_rms_norm"), npu.calls("npu_add_rms_norm")
    assert plain["kwargs"] == {"epsilon": 1e-6} and fused["kwargs"] == {"epsilon": 1e-5}
    assert fused["args"][2][2] == BF  # gamma passed in x's dtype
    assert ops.paths() == {("rms_norm", "npu_rms_norm"): 1, ("rms_norm", "npu_add_rms_norm"): 1}


def test_interleave_rope_layout(npu):
    """npu_interleave_rope returns the de-interleaved (rotate-half) layout; the backend re-interleaves."""
    g = _g(2)
    x = _rn(g, 1, 2, 3, 64)
    one, zero = torch.ones(1, 1, 3, 64, dtype=BF), torch.zeros(1, 1, 3, 64, dtype=BF)
    raw = npu.npu_interleave_rope(x, one, zero)  # identity rotation exposes the permutation
    assert torch.equal(raw, torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1))
    npu.reset_calls()

    ops = _ops()
    x = _rn(g, 2, 3, 4, 64)  # [B, S, H, R]
    ang = torch.rand(2, 3, 32, generator=g) * 6
    out = ops.rope(x, torch.cos(ang), torch.sin(ang))
    _close(out, ref.rope(x, torch.cos(ang), torch.sin(ang)))
    (call,) = npu.calls("npu_interleave_rope")
    assert call["args"][0] == ("tensor", (2, 4, 3, 64), BF, True)  # (B, N, S, D), contiguous
    assert call["args"][1] == ("tensor", (2, 1, 3, 64), BF, True)  # cos (B, 1, S, D)


def test_op_table_names_the_generic_ops(npu):
    table = registry.bind(ascend.BACKEND, fallback="error")
    assert table.sources["rms_norm"].startswith("torch_npu.npu_rms_norm")
    assert {op for op, src in table.sources.items() if src.startswith("generic")} == set(_ops().GENERIC_ONLY)
    assert table.sources["linear"] == "act_quant + fp8_gemm"


def test_rope_outside_limits_is_generic(npu):
    ops, g = _ops(), _g(3)
    x = _rn(g, 2, 3, 4, 16)
    ang = torch.rand(2, 3, 8, generator=g)
    with pytest.warns(RuntimeWarning, match="rope runs the generic torch path"):
        out = ops.rope(x, torch.cos(ang), torch.sin(ang))
    assert torch.equal(out, ref.rope(x, torch.cos(ang), torch.sin(ang)))
    assert not npu.calls() and ops.paths() == {("rope", "generic torch"): 1}
    assert "D = 64" in ops.last_reason["rope"]


def _gate_inputs(g, e=256, m=6, d=64):
    return _rn(g, m, d), _rn(g, e, d, std=0.3), (torch.randn(e, generator=g) * 0.05).float()


def _same_routing(a, b):
    (wa, ia), (wb, ib) = a, b
    assert ia.dtype == torch.int64 and wa.dtype == torch.float32
    oa, ob = ia.sort(-1), ib.sort(-1)
    assert torch.equal(oa.values, ob.values)
    _close(wa.gather(1, oa.indices), wb.gather(1, ob.indices), rtol=1e-5, atol=1e-6)


def test_moe_gate_plumbing(npu):
    ops, g = _ops(), _g(4)
    x, w, bias = _gate_inputs(g)
    _same_routing(ops.moe_gate(x, w, bias, 8, 4, 8, 2.5), ref.moe_gate(x, w, bias, 8, 4, 8, 2.5))
    (call,) = npu.calls("npu_moe_gating_top_k")
    assert call["args"] == [("tensor", (6, 256), torch.float32, True), 8]  # router logits in fp32, k
    kw = call["kwargs"]
    assert (kw["norm_type"], kw["group_select_mode"], kw["renorm"], kw["out_flag"]) == (1, 1, 0, False)
    assert (kw["k_group"], kw["group_count"], kw["routed_scaling_factor"]) == (4, 8, 2.5)
    assert kw["bias"] == ("tensor", (256,), torch.float32, True)



def test_moe_gate_without_renormalisation(npu):
    """norm_topk_prob=false (HF config): the fused op still selects; weights come from its normOut (sigmoid)."""
    ops, g = _ops(), _g(5)
    x, w, bias = _gate_inputs(g)
    got = ops.moe_gate(x, w, bias, 8, 4, 8, 2.5, False)
    _same_routing(got, ref.moe_gate(x, w, bias, 8, 4, 8, 2.5, False))
    (call,) = npu.calls("npu_moe_gating_top_k")
    assert call["kwargs"]["out_flag"] is True
    assert not torch.allclose(got[0], ref.moe_gate(x, w, bias, 8, 4, 8, 2.5, True)[0])  # the flag matters

def test_moe_gate_chip_limits(npu, monkeypatch):
    ops, g = _ops(), _g(5)
    x, w, bias = _gate_inputs(g, e=16)
    with pytest.raises(RuntimeError, match="only 256 experts"):  # the stand-in enforces the A2 limit itself
        npu.npu_moe_gating_top_k(x.float() @ w.float().T, 4, bias=bias, k_group=2, group_count=4,
                                 group_select_mode=1, norm_type=1)
    npu.reset_calls()
    _same_routing(ops.moe_gate(x, w, bias, 4, 2, 4, 2.5), ref.moe_gate(x, w, bias, 4, 2, 4, 2.5))
    assert not npu.calls() and "256 experts" in ops.last_reason["moe_gate"]
    monkeypatch.setenv("NPU_STANDIN_SOC", "260")  # Ascend 950: the general limits admit 16 experts
    _same_routing(ops.moe_gate(x, w, bias, 4, 2, 4, 2.5), ref.moe_gate(x, w, bias, 4, 2, 4, 2.5))
    assert len(npu.calls("npu_moe_gating_top_k")) == 1


def test_moe_experts_plumbing(npu):
    ops, g = _ops(), _g(6)
    m, k, e, d, i = 7, 3, 6, 32, 16
    x = _rn(g, m, d)
    ids = torch.randint(0, e, (m, k), generator=g)
    ids[0, 1] = ids[4, 2] = -1  # experts on another rank: contribute nothing
    tw = torch.rand(m, k, generator=g)
    w1, w3, w2 = _rn(g, e, i, d, std=0.2), _rn(g, e, i, d, std=0.2), _rn(g, e, d, i, std=0.2)
    _close(ops.moe_experts(x, tw, ids, w1, w2, w3), ref.moe_experts(x, tw, ids, w1, w2, w3))
    (route,) = npu.calls("npu_moe_init_routing_v2")
    assert route["args"][1] == ("tensor", (m, k), torch.int32, True)
    kw = route["kwargs"]
    assert (kw["active_num"], kw["expert_num"], kw["expert_tokens_num_type"], kw["expert_tokens_num_flag"]) == \
        (m * k, e, 1, True)
    assert (kw["active_expert_range"], kw["quant_mode"], kw["row_idx_type"], kw["drop_pad_mode"]) == ([0, e], -1, 0, 0)
    gmms = npu.calls("npu_grouped_matmul")
    assert [c["args"][1][0][1] for c in gmms] == [(e, d, i), (e, d, i), (e, i, d)]  # weights as (E, K, N)
    assert all((c["kwargs"]["group_list_type"], c["kwargs"]["split_item"], c["kwargs"]["group_type"]) == (1, 2, 0)
               for c in gmms)
    assert npu.calls("npu_swiglu")[0]["args"][0][1] == (m * k, 2 * i)  # [gate ; up]
    (unperm,) = npu.calls("npu_moe_token_unpermute")
    assert unperm["args"][1] == ("tensor", (m * k,), torch.int32, True)  # expanded_row_idx (gather index)
    assert unperm["kwargs"]["probs"] == ("tensor", (m, k), torch.float32, True)  # fp32 weighted sum


def test_moe_experts_fp32_is_generic(npu):
    ops, g = _ops(), _g(7)
    x = _rn(g, 4, 8, dtype=torch.float32)
    ids, tw = torch.randint(0, 2, (4, 2), generator=g), torch.rand(4, 2, generator=g)
    w = _rn(g, 2, 6, 8, dtype=torch.float32)
    w2 = _rn(g, 2, 8, 6, dtype=torch.float32)
    assert torch.equal(ops.moe_experts(x, tw, ids, w, w2, w), ref.moe_experts(x, tw, ids, w, w2, w))
    assert not npu.calls() and "dtype" in ops.last_reason["moe_experts"]


def test_silu_mul_plumbing(npu):
    ops, g = _ops(), _g(8)
    x = _rn(g, 4, 6, 32)
    assert torch.equal(ops.silu_mul(x), ref.silu_mul(x))
    (call,) = npu.calls("npu_swiglu")
    assert call["kwargs"] == {"dim": -1}


def _decode_case(g, s, h, page, lens, dtype=BF):
    b, nb = len(lens), sum(-(-n // page) for n in lens) + 2
    table = torch.randint(0, nb, (b, max(-(-n // page) for n in lens) + 1), generator=g).to(torch.int32)
    return (_rn(g, b, s, h, 512, dtype=dtype, std=0.2), _rn(g, b, s, h, 64, dtype=dtype, std=0.2),
            _rn(g, nb, page, 512, dtype=dtype), _rn(g, nb, page, 64, dtype=dtype), table,
            torch.tensor(lens, dtype=torch.int32), 0.07)


@pytest.mark.parametrize("s, h", [(1, 3), (2, 4)])
def test_mla_decode_plumbing(npu, s, h):
    ops = _ops()
    args = _decode_case(_g(9), s, h, 16, [5, 17, 33])
    _close(ops.mla_decode(*args), ref.mla_decode(*args), atol=2e-2)
    (call,) = npu.calls("npu_fused_infer_attention_score")
    kw = call["kwargs"]
    hp = 4  # 3 heads are padded to 4, an accepted MLA head count
    assert call["args"][0] == ("tensor", (3, s, hp, 512), BF, True)
    assert call["args"][1] == call["args"][2] == ("tensor", args[2].shape, BF, True)  # key = value = latent cache
    assert kw["query_rope"][1] == (3, s, hp, 64) and kw["key_rope"][1] == tuple(args[3].shape)
    assert (kw["input_layout"], kw["num_heads"], kw["num_key_value_heads"], kw["block_size"]) == ("BSND", hp, 1, 16)
    assert kw["actual_seq_lengths_kv"] == [5, 17, 33] and kw["scale"] == 0.07
    if s == 1:
        assert kw["sparse_mode"] == 0 and kw["atten_mask"] is None
    else:
        assert kw["sparse_mode"] == 3 and kw["atten_mask"][1] == (2048, 2048) and kw["actual_seq_lengths"] == [s] * 3


@pytest.mark.parametrize("page, dtype, why", [(4, BF, "block size 4"), (16, torch.float32, "dtype")])
def test_mla_decode_outside_limits_is_generic(npu, page, dtype, why):
    ops = _ops()
    args = _decode_case(_g(10), 1, 2, page, [5, 9], dtype=dtype)
    assert torch.equal(ops.mla_decode(*args), ref.mla_decode(*args))
    assert not npu.calls() and why in ops.last_reason["mla_decode"]


@pytest.mark.parametrize("causal", [True, False])
def test_mla_prefill_plumbing(npu, causal):
    ops, g = _ops(), _g(11)
    q, k, v = _rn(g, 2, 3, 4, 192, std=0.3), _rn(g, 2, 5, 4, 192, std=0.3), _rn(g, 2, 5, 4, 128)
    _close(ops.mla_prefill(q, k, v, causal, 0.1), ref.mla_prefill(q, k, v, causal, 0.1))
    (call,) = npu.calls("npu_fused_infer_attention_score")
    assert [a[1] for a in call["args"]] == [(6, 4, 192), (10, 4, 192), (10, 4, 128)]  # TND
    kw = call["kwargs"]
    assert (kw["input_layout"], kw["actual_seq_lengths"], kw["actual_seq_lengths_kv"]) == ("TND", [3, 6], [5, 10])
    assert kw["sparse_mode"] == (3 if causal else 0) and (kw["atten_mask"] is None) != causal


def test_mla_prefill_small_heads_are_generic(npu):
    ops, g = _ops(), _g(12)
    q, k, v = _rn(g, 1, 3, 2, 48), _rn(g, 1, 3, 2, 48), _rn(g, 1, 3, 2, 32)
    assert torch.equal(ops.mla_prefill(q, k, v, True, 0.2), ref.mla_prefill(q, k, v, True, 0.2))
    assert "Dk = 192" in ops.last_reason["mla_prefill"]


def test_stand_in_refuses_calls_outside_documented_limits(npu):
    """The stand-in is strict: the backend's pre-checks, not the stand-in's leniency, keep calls inside the limits."""
    g = _g(13)
    kv4, kv16 = _rn(g, 2, 4, 512), _rn(g, 2, 16, 512)
    bad = {
        "D must all be 64": lambda: npu.npu_interleave_rope(_rn(g, 1, 1, 2, 16), torch.ones(1, 1, 2, 16, dtype=BF),
                                                  torch.zeros(1, 1, 2, 16, dtype=BF)),
        "gamma dtype": lambda: npu.npu_rms_norm(_rn(g, 2, 8), torch.ones(8)),
        "block_size 4": lambda: npu.npu_fused_infer_attention_score(
            _rn(g, 1, 1, 4, 512), kv4, kv4, query_rope=_rn(g, 1, 1, 4, 64),
            key_rope=_rn(g, 2, 4, 64), block_table=torch.zeros(1, 2, dtype=torch.int32), block_size=4,
            actual_seq_lengths_kv=[3], num_heads=4, num_key_value_heads=1, input_layout="BSND"),
        "not in (1, 2, 4": lambda: npu.npu_fused_infer_attention_score(
            _rn(g, 1, 1, 3, 512), kv16, kv16, query_rope=_rn(g, 1, 1, 3, 64),
            key_rope=_rn(g, 2, 16, 64), block_table=torch.zeros(1, 2, dtype=torch.int32), block_size=16,
            actual_seq_lengths_kv=[3], num_heads=3, num_key_value_heads=1, input_layout="BSND"),
        "covers 3 rows": lambda: npu.npu_grouped_matmul(
            [_rn(g, 4, 8)], [_rn(g, 2, 8, 6)], group_list=torch.tensor([1, 2]), group_list_type=1, group_type=0,
            split_item=2),
        "probs must be": lambda: npu.npu_moe_token_unpermute(
            _rn(g, 4, 8), torch.arange(4, dtype=torch.int32), probs=torch.rand(2, 2, generator=g)),
        "2048x2048": lambda: npu.npu_fused_infer_attention_score(
            _rn(g, 3, 2, 192), _rn(g, 3, 2, 192), _rn(g, 3, 2, 128), actual_seq_lengths=[3],
            actual_seq_lengths_kv=[3], num_heads=2, input_layout="TND", sparse_mode=3),
    }
    for message, call in bad.items():
        with pytest.raises(RuntimeError, match=re.escape(message)):
            call()
