"""The DeepseekV3ForCausalLM family against transformers, one small random checkpoint per config style.

Styles covered here (docs/models/compatibility.md maps the published models onto them):
  v31_ue8m0     DeepSeek-V3.1: fp8 with quantization_config.scale_fmt "ue8m0" (power-of-two scales)
  no_renorm     norm_topk_prob=false: routing weights not renormalised
  yarn_default  YaRN without original_max_position_embeddings (transformers uses max_position_embeddings)
  kimi_k2       model_type "kimi_k2", one expert group, no MTP (Kimi-K2's config shape)
  moonlight     no q_lora, one expert group, two shared experts, no YaRN (Moonlight-16B-A3B's shape)
Bars: fp32 max rel <= 1e-4 and greedy tokens identical; bf16 within 1.5x transformers' own bf16 error;
fp8 W8A8 (transformers never quantises activations): deepport's W8A8 graph in fp32 activations against
transformers' graph with the same activation quantisation emulated around its linears (sharp bars, see
W8A8_FP32); the shipped bf16-activation fp8 path within 1.5x transformers' own bf16 W8A8 error.
"""
import copy
import json

import pytest
import torch

import deepport
from deepport.conformance.model_check import Threshold, compare_logits
from deepport.core.config import ConfigError, from_hf_config
from deepport.core.formats import E4M3FN, quantize_weight

import hf_oracle  # noqa: E402  (tests/ is on sys.path through rootdir conftest)

VOCAB = hf_oracle.TINY_HF["vocab_size"]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def mean_rel(a, ref):
    return ((a - ref).abs().mean() / ref.abs().mean()).item()


def _ids(seed, b=2, s=20):
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def _greedy(step_logits, prompt, steps=6):
    """Greedy continuation by full re-prefill: step_logits(ids [1, S]) -> logits [1, S, V]."""
    ids = prompt
    for _ in range(steps):
        nxt = step_logits(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat((ids, nxt), dim=1)
    return ids[0, prompt.shape[1]:].tolist()


def _save(model, d, edit=None):
    """save_pretrained, then edit config.json as a published checkpoint would have it."""
    model.save_pretrained(d)
    if edit is not None:
        cfg = json.loads((d / "config.json").read_text())
        edit(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
    return d


def _check_fp32_and_greedy(hf, d, seed):
    ours = deepport.load(d, backend="cpu_ref", dtype="fp32")
    ids = _ids(seed)
    with torch.no_grad():
        ref = hf(ids).logits.float()
        assert rel_err(ours.logits(ids), ref) < 1e-4
        prompt = ids[:1, :8]
        assert _greedy(ours.logits, prompt) == _greedy(lambda x: hf(x).logits, prompt)
    return ours, ids, ref


# ---- norm_topk_prob = false ----------------------------------------------------------------------

def test_norm_topk_prob_false_matches_transformers(tmp_path):
    hf = hf_oracle.build(seed=11, norm_topk_prob=False)
    d = _save(hf, tmp_path / "no_renorm")
    ours, ids, ref = _check_fp32_and_greedy(hf, d, seed=12)
    assert ours.transformer.args.norm_topk_prob is False
    with torch.no_grad():
        ref_bf16 = copy.deepcopy(hf).bfloat16()(ids).logits.float()
        got_bf16 = deepport.load(d, backend="cpu_ref", dtype="bf16").logits(ids)
    assert mean_rel(got_bf16, ref) < 1.5 * mean_rel(ref_bf16, ref)
    # the flag matters on this model: renormalising anyway is far off
    renorm = _save(hf, tmp_path / "renorm", edit=lambda c: c.update(norm_topk_prob=True))
    assert rel_err(deepport.load(renorm, backend="cpu_ref", dtype="fp32").logits(ids), ref) > 1e-2


# ---- YaRN without original_max_position_embeddings -----------------------------------------------

def _drop_original_max(cfg):
    for key in ("rope_scaling", "rope_parameters"):
        if cfg.get(key):
            cfg[key].pop("original_max_position_embeddings", None)
    cfg.pop("original_max_position_embeddings", None)


def test_yarn_without_original_max_position_embeddings_matches_transformers(tmp_path):
    d = _save(hf_oracle.build(seed=21), tmp_path / "yarn", edit=_drop_original_max)
    assert "original_max_position_embeddings" not in (d / "config.json").read_text()
    from transformers import DeepseekV3ForCausalLM

    hf = DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32).eval()  # transformers reads the config
    ours, ids, ref = _check_fp32_and_greedy(hf, d, seed=22)
    assert ours.transformer.args.original_seq_len == hf_oracle.TINY_HF["max_position_embeddings"]
    with torch.no_grad():
        ref_bf16 = copy.deepcopy(hf).bfloat16()(ids).logits.float()
        got_bf16 = deepport.load(d, backend="cpu_ref", dtype="bf16").logits(ids)
    assert mean_rel(got_bf16, ref) < 1.5 * mean_rel(ref_bf16, ref)
    # the old default (4096) would have moved most rotary frequencies: the logits must see it
    old = _save(hf, tmp_path / "yarn4096", edit=lambda c: (c.get("rope_scaling") or c["rope_parameters"]).update(
        original_max_position_embeddings=4096))
    assert rel_err(deepport.load(old, backend="cpu_ref", dtype="fp32").logits(ids), ref) > 1e-3


# ---- DeepSeek-V3.1: fp8 with ue8m0 scales --------------------------------------------------------

def _quantisable(name, t):
    return (t.dim() == 2 and name.endswith(".weight") and any(k in name for k in ("proj", "experts"))
            and "mlp.gate.weight" not in name and "eh_proj" not in name)


def _v31_checkpoint(hf, tmp_path):
    """The model's weights as 128x128 e4m3fn blocks with power-of-two (ue8m0) scales, V3.1's config."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "bf"
    hf.save_pretrained(src)
    out, deq = {}, {}
    for name, t in load_file(str(src / "model.safetensors")).items():
        if _quantisable(name, t):
            codes, s = quantize_weight(t, E4M3FN, scale_fmt="ue8m0")
            assert torch.equal(torch.exp2(torch.log2(s).round()), s)  # powers of two
            out[name], out[name + "_scale_inv"] = codes, s
            deq[name] = codes.float() * s.repeat_interleave(128, 0)[:t.shape[0]].repeat_interleave(128, 1)[:, :t.shape[1]]
        else:
            out[name] = t
    d = tmp_path / "v31"
    d.mkdir()
    save_file(out, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}  # as DeepSeek-V3.1's
    (d / "config.json").write_text(json.dumps(cfg))
    return d, deq


def _oracle_on(oracle, deq):
    """transformers' model `oracle` given the dequantised weights in place (routed experts rebuilt in its
    fused layout).

    Its experts run eagerly (one F.linear per expert): the default grouped_mm path never calls F.linear,
    so the activation quantisation emulated below would silently skip every routed expert."""
    oracle.set_experts_implementation("eager")
    with torch.no_grad():
        sd = oracle.state_dict()
        for name, w in deq.items():
            if name in sd:
                sd[name].copy_(w)
        oracle.load_state_dict(sd)
        for li in range(hf_oracle.TINY_HF["first_k_dense_replace"], hf_oracle.TINY_HF["num_hidden_layers"]):
            ex = oracle.model.layers[li].mlp.experts
            for e in range(hf_oracle.TINY_HF["n_routed_experts"]):
                p = f"model.layers.{li}.mlp.experts.{e}."
                ex.gate_up_proj[e].copy_(torch.cat((deq[p + "gate_proj.weight"], deq[p + "up_proj.weight"]), 0))
                ex.down_proj[e].copy_(deq[p + "down_proj.weight"])
    return oracle


def _fake_quant(x, ue8m0):
    """W8A8's activation side written independently of deepport: 1x128 blocks, DeepSeek's log2/ceil for ue8m0."""
    k = x.shape[-1]
    xb = x.float().unflatten(-1, (k // 128, 128))
    s = xb.abs().amax(-1, keepdim=True).clamp(min=1e-4) / 448.0
    if ue8m0:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    return ((xb / s).to(torch.float8_e4m3fn).float() * s).flatten(-2).to(x.dtype)


def _w8a8_logits(oracle, ids, monkeypatch, ue8m0):
    """The oracle with every fp8 GEMM's input activations quantised (the router and the head stay exact).

    transformers itself never quantises activations here (on CPU an fp8 checkpoint runs dequantised weights
    against bf16/fp32 activations), so W8A8 is emulated around its F.linear calls. Every attention, dense
    and shared-expert weight must be met, and routed experts too, or the emulation proves nothing."""
    quantised, experts, hit = set(), set(), set()
    for name, p in oracle.named_parameters():
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            experts |= {p[e].data_ptr() for e in range(p.shape[0])}
        elif _quantisable(name, p):
            quantised.add(p.data_ptr())
    linear = torch.nn.functional.linear

    def w8a8(x, w, b=None):
        if w.data_ptr() in quantised | experts:
            hit.add(w.data_ptr())
            x = _fake_quant(x, ue8m0)
        return linear(x, w, b)

    with monkeypatch.context() as m, torch.no_grad():
        m.setattr(torch.nn.functional, "linear", w8a8)
        logits = oracle(ids).logits.float()
    assert quantised <= hit and len(hit & experts) >= hf_oracle.TINY_HF["num_experts_per_tok"], "emulation missed GEMMs"
    return logits


# W8A8 with fp32 activations, deepport's graph against the emulation above on transformers' graph: the same
# fp8 codes wherever both compute the GEMM inputs to the fp32 ulp. An ulp apart at a rounding boundary moves
# one code by one e4m3 step (1/16 to 1/8 of that element), which max rel sees locally (measured 0.019 at one
# position; mean rel 7e-4, cosine 0.99999), while fp32 instead of ue8m0 activation scales moves every code
# (mean rel 0.31, cosine 0.94). Bars: cosine 0.9999 (the model check's fp32 bar), max rel 0.05, mean rel
# 1/30 of the fp32-scale emulation's.
W8A8_FP32 = Threshold(cosine=0.9999, max_rel=0.05)


def test_v31_ue8m0_checkpoint_matches_transformers(tmp_path, monkeypatch):
    hf = hf_oracle.build(seed=31)
    d, deq = _v31_checkpoint(hf, tmp_path)
    oracle = _oracle_on(hf, deq)  # written to the checkpoint first, then given its dequantised weights
    ours, ids, ref = _check_fp32_and_greedy(oracle, d, seed=32)  # fp32: dequantised exactly at load
    oracle_bf16 = copy.deepcopy(oracle).bfloat16()  # ue8m0 scales: the dequantised weights are exact in bf16
    with torch.no_grad():
        ref_bf16 = oracle_bf16(ids).logits.float()
    assert mean_rel(deepport.load(d, backend="cpu_ref", dtype="bf16").logits(ids), ref) < 1.5 * mean_rel(ref_bf16, ref)

    # W8A8 with power-of-two activation scales, judged in fp32 activations (the sharp check)
    want = _w8a8_logits(oracle, ids, monkeypatch, ue8m0=True)
    fp32_scales = _w8a8_logits(oracle, ids, monkeypatch, ue8m0=False)
    with torch.no_grad():
        sharp = _fp32_w8a8(d).logits(ids)
    assert compare_logits(sharp, want, W8A8_FP32).ok, compare_logits(sharp, want, W8A8_FP32).detail
    assert mean_rel(sharp, want) < mean_rel(fp32_scales, want) / 30, (mean_rel(sharp, want), mean_rel(fp32_scales, want))

    # deepport.load(dtype="fp8"): bf16 activations. Each activation's bf16 rounding moves some fp8 codes, and
    # this random 3-layer model amplifies that: transformers' own bf16 W8A8 sits at cosine 0.94 / mean rel
    # 0.32 from its fp32 W8A8, below the model check's fp8 bar (that bar compares two backends in one dtype).
    # So here the bar is the issue's bf16 rule, 1.5x transformers' own bf16 error; it catches a broken graph,
    # not the scale format (the fp32 check above and the act_quant ue8m0 conformance cases do).
    fp8 = deepport.load(d, backend="cpu_ref", dtype="fp8")
    assert fp8.transformer.layers[0].attn.wkv_a.w().scale_fmt == "ue8m0"
    assert fp8.transformer.layers[1].ffn.experts.get("w1").scale_fmt == "ue8m0"
    want_bf16 = _w8a8_logits(oracle_bf16, ids, monkeypatch, ue8m0=True)
    with torch.no_grad():
        got = fp8.logits(ids)
    assert mean_rel(got, want) < 1.5 * mean_rel(want_bf16, want), (mean_rel(got, want), mean_rel(want_bf16, want))


def _fp32_w8a8(d):
    """deepport's W8A8 graph with fp32 activations (deepport.load's fp8 runs bf16 activations)."""
    from deepport.core import checkpoint, registry
    from deepport.core.model import Transformer

    args, _ = checkpoint.read_config(d)
    table = registry.bind(registry.get_backend("cpu_ref"))
    t = Transformer(args, table, dtype=torch.float32, fp8=E4M3FN, device="meta")
    checkpoint.load_into(t, d, torch.float32, E4M3FN, torch.device("cpu"))

    class _M:
        @staticmethod
        def logits(ids):
            return t.logits(t(ids))
    return _M


# ---- config styles of the published models -------------------------------------------------------

def test_kimi_k2_style_loads_and_matches(tmp_path):
    """Kimi-K2: model_type kimi_k2, n_group 1 / topk_group 1, no MTP, rope_theta 50000, beta_fast 1."""
    rope = {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 64, "beta_fast": 1.0,
            "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 50000.0}
    hf = hf_oracle.build(seed=41, n_group=1, topk_group=1, n_routed_experts=12, num_experts_per_tok=4,
                         routed_scaling_factor=2.827, rope_scaling=rope, rope_theta=50000.0)
    d = _save(hf, tmp_path / "kimi", edit=lambda c: c.update(model_type="kimi_k2"))
    ours, _, _ = _check_fp32_and_greedy(hf, d, seed=42)
    assert ours.transformer.args.n_expert_groups == 1 and ours.transformer.args.route_scale == 2.827


def test_moonlight_style_loads_and_matches(tmp_path):
    """Moonlight-16B-A3B: no q_lora (q_proj), one expert group, two shared experts, plain rope (no YaRN)."""
    hf = hf_oracle.build(seed=51, q_lora_rank=None, n_group=1, topk_group=1, n_shared_experts=2,
                         num_experts_per_tok=6, routed_scaling_factor=2.446, rope_scaling=None, rope_theta=50000.0)
    d = _save(hf, tmp_path / "moonlight")
    ours, _, _ = _check_fp32_and_greedy(hf, d, seed=52)
    a = ours.transformer.args
    assert (a.q_lora_rank, a.n_expert_groups, a.n_shared_experts, a.yarn) == (0, 1, 2, False)


V3_KEYS = dict(hf_oracle.TINY_HF, model_type="deepseek_v3", scoring_func="sigmoid", topk_method="noaux_tc")


@pytest.mark.parametrize("key,value,needle", [
    ("num_key_value_heads", 1, "num_key_value_heads"),
    ("attention_bias", True, "attention_bias"),
    ("moe_layer_freq", 2, "moe_layer_freq"),
    ("partial_rotary_factor", 0.5, "partial_rotary_factor"),
    ("rope_scaling", dict(hf_oracle.TINY_HF["rope_scaling"], truncate=False), "truncate"),
    ("rope_scaling", dict(hf_oracle.TINY_HF["rope_scaling"], attention_factor=1.2), "attention_factor"),
    ("quantization_config", {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "static",
                             "weight_block_size": [128, 128]}, "activation_scheme"),
    ("quantization_config", {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue4m3",
                             "weight_block_size": [128, 128]}, "scale_fmt"),
    ("model_type", "deepseek_v32", "model_type"),
    ("scoring_func", "softmax", "scoring_func"),
    ("topk_method", "group_limited_greedy", "topk_method"),
    ("model_type", "deepseek_v2", "model_type 'deepseek_v2'"),
    ("hidden_act", "gelu", "hidden_act"),
    ("rope_interleave", False, "rope_interleave"),
    ("tie_word_embeddings", True, "tie_word_embeddings"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "rope type 'linear'"),
    ("rope_scaling", {"type": "yarn", "original_max_position_embeddings": 128}, "needs a factor"),
    ("quantization_config", {"quant_method": "compressed-tensors"}, "compressed-tensors"),
    ("quantization_config", {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [64, 64]},
     "weight_block_size"),
])
def test_unsupported_keys_are_refused_by_name(key, value, needle):
    with pytest.raises(ConfigError, match=needle):
        from_hf_config(dict(V3_KEYS, **{key: value}))


def test_family_config_keys_read_as_transformers_does():
    args = from_hf_config(dict(V3_KEYS, norm_topk_prob=False, model_type="kimi_k2"))
    assert args.norm_topk_prob is False
    rope = {k: v for k, v in V3_KEYS["rope_scaling"].items() if k != "original_max_position_embeddings"}
    assert from_hf_config(dict(V3_KEYS, rope_scaling=rope)).original_seq_len == V3_KEYS["max_position_embeddings"]
    top = from_hf_config(dict(V3_KEYS, rope_scaling=rope, original_max_position_embeddings=256))
    assert top.original_seq_len == 256  # a top-level key wins, as in transformers
    no_factor = {k: v for k, v in rope.items() if k != "factor"}
    with pytest.raises(ConfigError, match="needs a factor"):  # transformers: "Missing required keys ... factor"
        from_hf_config(dict(V3_KEYS, rope_scaling=dict(no_factor, original_max_position_embeddings=128)))
    q = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
         "scale_fmt": "ue8m0"}
    assert from_hf_config(dict(V3_KEYS, quantization_config=q)).scale_fmt == "ue8m0"
