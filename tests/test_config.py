"""ModelArgs from DeepSeek-V3's published config.json: the derived constants the semantics notes pin down."""
import math

import pytest
import torch

from deepport.core.config import PRESETS, from_hf_config, to_hf_config
from deepport.core.errors import ConfigError
from deepport.core.model import yarn_inv_freq

V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128,
    "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512,
    "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1,
    "first_k_dense_replace": 3, "norm_topk_prob": True, "scoring_func": "sigmoid", "aux_loss_alpha": 0.001,
    "seq_aux": True, "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False, "rope_theta": 10000, "bos_token_id": 0, "eos_token_id": 1,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}


def test_v3_config_matches_preset_and_constants():
    args = from_hf_config(V3_CONFIG)
    assert args == PRESETS["v3-671b"]
    assert args.qk_head_dim == 192
    assert math.isclose(args.softmax_scale, 192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2, rel_tol=1e-12)
    assert abs(args.softmax_scale - 0.1352338) < 1e-6
    assert args.rope_attention_factor == 1.0


def test_yarn_frequencies_keep_low_pairs_and_divide_high_pairs():
    args = PRESETS["v3-671b"]
    f = yarn_inv_freq(args)
    base = 1.0 / (10000 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    assert torch.allclose(f[:11], base[:11])  # low = 10: pairs 0..10 keep the original frequency
    assert torch.allclose(f[23:], base[23:] / 40)  # high = 23: pairs >= 23 divided by the factor
    assert ((f[11:23] < base[11:23]) & (f[11:23] > base[11:23] / 40)).all()


def test_roundtrip_and_refusals():
    for name in ("tiny", "tiny-b", "v3-671b"):
        assert from_hf_config(to_hf_config(PRESETS[name], fp8=True)) == PRESETS[name]
    for key, value, needle in (("scoring_func", "softmax", "scoring_func"), ("topk_method", "greedy", "topk_method"),
                               ("rope_interleave", False, "rope_interleave"), ("model_type", "llama", "model_type")):
        with pytest.raises(ConfigError, match=needle):
            from_hf_config(dict(V3_CONFIG, **{key: value}))
    bad_q = dict(V3_CONFIG["quantization_config"], scale_fmt="e5m3")
    with pytest.raises(ConfigError, match="scale_fmt 'e5m3'"):
        from_hf_config(dict(V3_CONFIG, quantization_config=bad_q))
    v31_q = dict(V3_CONFIG["quantization_config"], scale_fmt="ue8m0")  # DeepSeek-V3.1
    assert from_hf_config(dict(V3_CONFIG, quantization_config=v31_q)).scale_fmt == "ue8m0"
    with pytest.raises(ConfigError, match="not divisible"):
        from_hf_config(dict(V3_CONFIG, n_group=7))
