"""Build transformers' DeepseekV3ForCausalLM (the independent oracle) with a tiny random config and save it."""
from __future__ import annotations

import torch

TINY_HF = dict(
    vocab_size=512, hidden_size=256, intermediate_size=384, moe_intermediate_size=128,
    num_hidden_layers=3, first_k_dense_replace=1, num_nextn_predict_layers=0,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=128,
    qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, n_shared_experts=1,
    num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
    hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=False, rope_interleave=True,
    max_position_embeddings=1024,
    rope_scaling={"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 128, "beta_fast": 32,
                  "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0},
    rope_theta=10000.0,
)


def build(seed: int = 0, **overrides):
    """overrides: DeepseekV3Config keys replacing TINY_HF's (a config style of the family)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    cfg = DeepseekV3Config(**{**TINY_HF, **overrides})
    model = DeepseekV3ForCausalLM(cfg).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))  # perturbed norms
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    return model
