"""ModelArgs (DeepSeek's field names), conversion from/to HF config.json, YaRN constants, named presets."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

from deepport.core import config_checks
from deepport.core.errors import ConfigError


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int = 129280
    dim: int = 7168
    inter_dim: int = 18432
    moe_inter_dim: int = 2048
    n_layers: int = 61
    n_dense_layers: int = 3
    n_mtp_layers: int = 1
    n_heads: int = 128
    # MoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 8
    n_expert_groups: int = 8
    n_limited_groups: int = 4
    route_scale: float = 2.5
    norm_topk_prob: bool = True  # False: routing weights are s[ids] * route_scale, not renormalised (HF key)
    # MLA
    q_lora_rank: int = 1536  # 0: no low-rank q (a single wq)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # RoPE / YaRN
    rope_theta: float = 10000.0
    yarn: bool = True
    rope_factor: float = 40.0
    original_seq_len: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0  # softmax mscale coefficient (HF mscale_all_dim)
    rope_mscale: float = 1.0  # cos/sin mscale (HF mscale)
    max_seq_len: int = 163840
    norm_eps: float = 1e-6
    # checkpoint
    fp8_block: int | None = 128  # None: the checkpoint is not FP8
    scale_fmt: str = "fp32"  # "ue8m0" (DeepSeek-V3.1): power-of-two block scales, activations' rounded up
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times m^2 with m = 0.1 * mscale * ln(factor) + 1 under YaRN."""
        s = self.qk_head_dim ** -0.5
        if self.yarn and self.rope_factor > 1 and self.mscale:
            m = 0.1 * self.mscale * math.log(self.rope_factor) + 1.0
            s *= m * m
        return s

    @property
    def rope_attention_factor(self) -> float:
        """Multiplier on cos/sin (HF attention_factor): m(mscale)/m(mscale_all_dim), 1.0 for V3."""
        if not self.yarn or self.rope_factor <= 1:
            return 1.0

        def m(c):
            return 0.1 * c * math.log(self.rope_factor) + 1.0

        if self.rope_mscale and self.mscale:
            return m(self.rope_mscale) / m(self.mscale)
        return m(1.0)

    def validate(self) -> "ModelArgs":
        config_checks.check_args(self)  # types, ranges, relations, size bounds (core/config_checks.py)
        problems = []
        if self.n_routed_experts % self.n_expert_groups:
            problems.append(f"n_routed_experts {self.n_routed_experts} not divisible by n_group {self.n_expert_groups}")
        if self.n_activated_experts > self.n_limited_groups * self.n_routed_experts // self.n_expert_groups:
            problems.append("num_experts_per_tok exceeds the experts in the kept groups")
        if self.qk_rope_head_dim % 2:
            problems.append(f"qk_rope_head_dim {self.qk_rope_head_dim} must be even")
        if self.n_dense_layers > self.n_layers:
            problems.append("first_k_dense_replace exceeds num_hidden_layers")
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))
        return self


# HF config keys that change the math and that deepport reads (everything else is ignored).
_HF_KEYS = {
    "vocab_size": "vocab_size", "hidden_size": "dim", "intermediate_size": "inter_dim",
    "moe_intermediate_size": "moe_inter_dim", "num_hidden_layers": "n_layers",
    "first_k_dense_replace": "n_dense_layers", "num_nextn_predict_layers": "n_mtp_layers",
    "num_attention_heads": "n_heads", "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts", "num_experts_per_tok": "n_activated_experts",
    "n_group": "n_expert_groups", "topk_group": "n_limited_groups", "routed_scaling_factor": "route_scale",
    "kv_lora_rank": "kv_lora_rank", "qk_nope_head_dim": "qk_nope_head_dim",
    "qk_rope_head_dim": "qk_rope_head_dim", "v_head_dim": "v_head_dim", "rope_theta": "rope_theta",
    "max_position_embeddings": "max_seq_len", "rms_norm_eps": "norm_eps",
    "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
}


def from_hf_config(cfg: dict) -> ModelArgs:
    """Build ModelArgs from a Hugging Face DeepSeek-V3 config.json dict, refusing settings we cannot honour."""
    config_checks.check_hf(cfg)  # field types and ranges before any conversion
    if cfg.get("model_type") not in (None, *DEEPSEEK_V3_MODEL_TYPES):
        raise ConfigError(f"config.json has model_type {cfg.get('model_type')!r}; deepport runs "
                          f"DeepseekV3ForCausalLM checkpoints (model_type {' or '.join(DEEPSEEK_V3_MODEL_TYPES)})")
    checks = [
        ("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"), ("hidden_act", "silu"),
    ]
    for key, want in checks:
        if cfg.get(key, want) != want:
            raise ConfigError(f"config.json {key}={cfg[key]!r} is not supported (DeepSeek-V3 uses {want!r})")
    _refuse_unsupported(cfg)
    if cfg.get("rope_interleave", True) is False:
        raise ConfigError("config.json rope_interleave=false: the checkpoint's rope rows would need permuting; "
                          "deepport uses DeepSeek's interleaved layout (set rope_interleave true)")
    if cfg.get("tie_word_embeddings", False):
        raise ConfigError("config.json tie_word_embeddings=true is not supported by DeepSeek-V3 checkpoints")
    kw = {}
    for hf, ours in _HF_KEYS.items():
        if cfg.get(hf) is not None:
            kw[ours] = cfg[hf]
    for k in ("bos_token_id", "eos_token_id"):
        if isinstance(kw.get(k), list):
            kw[k] = kw[k][0]
    kw["q_lora_rank"] = cfg.get("q_lora_rank") or 0
    kw.setdefault("n_mtp_layers", 0)
    kw["norm_topk_prob"] = bool(cfg.get("norm_topk_prob", True))  # as transformers: a null value does not renormalise
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if "rope_theta" in rope:
        kw["rope_theta"] = rope["rope_theta"]
    rtype = rope.get("type") or rope.get("rope_type")
    if rtype in (None, "default"):
        kw["yarn"] = False
    elif rtype == "yarn":
        # transformers: a top-level original_max_position_embeddings wins, then rope_scaling's, then
        # max_position_embeddings (its class default 4096); a missing factor is the ratio of the two.
        max_pos = cfg.get("max_position_embeddings") or 4096
        orig = int(cfg.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") or max_pos)
        factor = rope.get("factor")
        kw.update(yarn=True, rope_factor=float(factor if factor is not None else max_pos / orig),
                  original_seq_len=orig,
                  beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
                  mscale=float(rope.get("mscale_all_dim") or 0), rope_mscale=float(rope.get("mscale") or 0))
        if rope.get("attention_factor") is not None:
            raise ConfigError("rope attention_factor overrides are not supported; remove it from rope_scaling")
    else:
        raise ConfigError(f"rope type {rtype!r} is not supported; DeepSeek-V3 uses 'yarn'")
    q = cfg.get("quantization_config")
    if q:
        if q.get("quant_method") != "fp8" or q.get("fmt", "e4m3") != "e4m3":
            raise ConfigError(f"quantization_config {q} is not supported; deepport reads DeepSeek's fp8 e4m3 blocks")
        if list(q.get("weight_block_size", [128, 128])) != [128, 128]:
            raise ConfigError(f"weight_block_size {q.get('weight_block_size')} is not supported; use [128, 128]")
        if q.get("scale_fmt") not in (None, "fp32", "float32", "ue8m0"):
            raise ConfigError(f"quantization_config scale_fmt {q['scale_fmt']!r} is not supported; "
                              f"deepport reads fp32 scales or 'ue8m0' (power-of-two) scales")
        if q.get("activation_scheme", "dynamic") != "dynamic":
            raise ConfigError(f"quantization_config activation_scheme {q['activation_scheme']!r} is not supported; "
                              f"deepport quantises activations dynamically (1x128 blocks), as DeepSeek does")
        kw["fp8_block"] = 128
        kw["scale_fmt"] = "ue8m0" if q.get("scale_fmt") == "ue8m0" else "fp32"
    else:
        kw["fp8_block"] = None
    return ModelArgs(**kw).validate()


# model_type values of DeepseekV3ForCausalLM checkpoints: Kimi-K2 ships "kimi_k2" for the same architecture.
DEEPSEEK_V3_MODEL_TYPES = ("deepseek_v3", "kimi_k2")


def _refuse_unsupported(cfg: dict) -> None:
    """Refuse, by name, config keys of the DeepseekV3 family that change the math and that deepport does not run."""
    heads, kv_heads = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
    if kv_heads is not None and heads is not None and kv_heads != heads:
        raise ConfigError(f"config.json num_key_value_heads={kv_heads} != num_attention_heads={heads}: MLA has one "
                          f"K/V per head (transformers would repeat them); set num_key_value_heads to {heads}")
    if cfg.get("attention_bias", False):
        raise ConfigError("config.json attention_bias=true (biases on q_a/kv_a/o projections) is not supported; "
                          "DeepSeek-V3 checkpoints have none")
    if cfg.get("moe_layer_freq", 1) != 1:
        raise ConfigError(f"config.json moe_layer_freq={cfg['moe_layer_freq']} is not supported; deepport makes "
                          f"every layer after first_k_dense_replace an MoE layer (moe_layer_freq 1)")
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if rope.get("partial_rotary_factor", 1.0) != 1.0 or cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError("config.json partial_rotary_factor != 1 is not supported; DeepSeek-V3 rotates the whole "
                          "qk_rope_head_dim part")
    if rope.get("truncate", True) is False:
        raise ConfigError("rope_scaling truncate=false (YaRN without floor/ceil of the correction range) is not "
                          "supported; remove it (DeepSeek-V3 truncates)")


def to_hf_config(args: ModelArgs, fp8: bool = False, fp8_format: str = "e4m3fn") -> dict:
    """The HF DeepSeek-V3 config.json for these args (fp8: with DeepSeek's quantization_config)."""
    inv = {v: k for k, v in _HF_KEYS.items()}
    cfg = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}
    for f in fields(args):
        if f.name in inv and getattr(args, f.name) is not None:
            cfg[inv[f.name]] = getattr(args, f.name)
    cfg.update(
        q_lora_rank=args.q_lora_rank or None, num_key_value_heads=args.n_heads, scoring_func="sigmoid",
        topk_method="noaux_tc", norm_topk_prob=args.norm_topk_prob, hidden_act="silu", tie_word_embeddings=False,
        rope_interleave=True, torch_dtype="bfloat16", moe_layer_freq=1, attention_bias=False,
    )
    if args.yarn:
        cfg["rope_scaling"] = {
            "type": "yarn", "factor": args.rope_factor, "original_max_position_embeddings": args.original_seq_len,
            "beta_fast": args.beta_fast, "beta_slow": args.beta_slow, "mscale": args.rope_mscale,
            "mscale_all_dim": args.mscale,
        }
    if fp8:
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}
        if args.scale_fmt == "ue8m0":
            cfg["quantization_config"]["scale_fmt"] = "ue8m0"
        if fp8_format != "e4m3fn":
            cfg["quantization_config"]["deepport_fp8_format"] = fp8_format
    return cfg


PRESETS: dict[str, ModelArgs] = {
    # DeepSeek-V3 / R1 671B (HF config.json values).
    "v3-671b": ModelArgs(),
    # Tiny-A: every structural feature, every GEMM K a multiple of 128, two ragged output dims.
    "tiny": ModelArgs(
        vocab_size=1024, dim=256, inter_dim=384, moe_inter_dim=128, n_layers=3, n_dense_layers=1, n_mtp_layers=1,
        n_heads=4, n_routed_experts=16, n_shared_experts=1, n_activated_experts=4, n_expert_groups=4,
        n_limited_groups=2, route_scale=2.5, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, rope_factor=8.0, original_seq_len=128, max_seq_len=1024,
    ),
    # Tiny-B: every tensor/expert-parallel split stays 128-aligned per rank at TP=2.
    "tiny-b": ModelArgs(
        vocab_size=1024, dim=256, inter_dim=512, moe_inter_dim=256, n_layers=3, n_dense_layers=1, n_mtp_layers=1,
        n_heads=4, n_routed_experts=16, n_shared_experts=1, n_activated_experts=4, n_expert_groups=4,
        n_limited_groups=2, route_scale=2.5, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64,
        qk_rope_head_dim=64, v_head_dim=64, rope_factor=8.0, original_seq_len=128, max_seq_len=1024,
    ),
    # V3-200M: DeepSeek-V3's shape at ~200M parameters (800 MB fp32), so decode on a CPU is bound by reading
    # weights (~270 MB per token at batch 1), not by per-op overhead: the benchmark beside the embedded model.
    "v3-200m": ModelArgs(
        vocab_size=8192, dim=1024, inter_dim=2816, moe_inter_dim=512, n_layers=6, n_dense_layers=1, n_mtp_layers=1,
        n_heads=8, n_routed_experts=16, n_shared_experts=1, n_activated_experts=4, n_expert_groups=4,
        n_limited_groups=2, route_scale=2.5, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64,
        qk_rope_head_dim=32, v_head_dim=64, rope_factor=8.0, original_seq_len=512, max_seq_len=4096,
    ),
}


def preset(name: str) -> ModelArgs:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; use a checkpoint directory or one of {', '.join(PRESETS)}") from None

