"""Config checks before anything is allocated: config.json field types and ranges, the relations between
ModelArgs fields, the products that bound work and memory, and the model's size against this machine.

Every check names the field, the value it saw and what would work; all problems are reported at once.
"""
from __future__ import annotations

import math
import os

from deepport.core.errors import ConfigError

# config.json integer fields and their smallest legal value (None values mean "absent" and are skipped).
HF_INTS = {
    "vocab_size": 1, "hidden_size": 1, "intermediate_size": 1, "moe_intermediate_size": 1,
    "num_hidden_layers": 1, "first_k_dense_replace": 0, "num_nextn_predict_layers": 0,
    "num_attention_heads": 1, "n_routed_experts": 1, "n_shared_experts": 0, "num_experts_per_tok": 1,
    "n_group": 1, "topk_group": 1, "kv_lora_rank": 1, "q_lora_rank": 0, "qk_nope_head_dim": 0,
    "qk_rope_head_dim": 2, "v_head_dim": 1, "max_position_embeddings": 1,
}
# config.json real fields: (lower bound, exclusive?, upper bound or None).
HF_FLOATS = {
    "rms_norm_eps": (0.0, True, 1.0), "rope_theta": (1.0, True, None), "routed_scaling_factor": (0.0, True, None),
}
YARN_FLOATS = {"factor": (0.0, True), "beta_fast": (0.0, True), "beta_slow": (0.0, True),
               "mscale": (0.0, False), "mscale_all_dim": (0.0, False)}

# The largest published DeepSeek-V3 checkpoint has 6.7e11 parameters and ~92k tensors (with scales). A config
# two orders of magnitude beyond either is a typo (1e9 for 64), refused before any table is built.
MAX_PARAMETERS = 10 ** 14
MAX_TENSORS = 10 ** 7


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int_problem(key: str, v, low: int) -> str | None:
    if not _is_int(v):
        hint = f"; write {int(v)}" if _is_real(v) and math.isfinite(v) and v == int(v) and abs(v) < 1e6 else ""
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            hint = f"; write {v.strip()} without quotes"
        return f"{key} must be an integer, got {v!r} ({type(v).__name__}){hint}"
    if v < low:
        return f"{key} must be >= {low}, got {v}"
    return None


def _real_problem(key: str, v, low: float, exclusive: bool, high: float | None = None) -> str | None:
    if not _is_real(v):
        return f"{key} must be a number, got {v!r} ({type(v).__name__})"
    if not math.isfinite(v):
        return f"{key} must be finite, got {v}"
    if (v <= low) if exclusive else (v < low):
        return f"{key} must be {'>' if exclusive else '>='} {low:g}, got {v:g}"
    if high is not None and v > high:
        return f"{key} must be <= {high:g}, got {v:g}"
    return None


def check_hf(cfg) -> None:
    """ConfigError listing every config.json field of the wrong type or out of range (before any conversion)."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"config.json must hold a JSON object, got {type(cfg).__name__}")
    problems = []
    for key, low in HF_INTS.items():
        if cfg.get(key) is not None:
            problems.append(_int_problem(key, cfg[key], low))
    for key, (low, exclusive, high) in HF_FLOATS.items():
        if cfg.get(key) is not None:
            problems.append(_real_problem(key, cfg[key], low, exclusive, high))
    for key in ("bos_token_id", "eos_token_id"):
        v = cfg.get(key)
        ids = v if isinstance(v, list) else [v]
        if v is not None and (not ids or not all(_is_int(i) and i >= 0 for i in ids)):
            problems.append(f"{key} must be a token id (an integer >= 0) or a list of them, got {v!r}")
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if rope is not None and not isinstance(rope, dict):
        problems.append(f"rope_scaling must be an object or null, got {rope!r}")
    elif rope and (rope.get("type") or rope.get("rope_type")) == "yarn":
        if rope.get("factor") is None:
            problems.append("rope_scaling of type yarn needs a factor (the context extension, 40 in DeepSeek-V3); "
                            "add it, or remove rope_scaling")
        for key, (low, exclusive) in YARN_FLOATS.items():
            if rope.get(key) is not None:
                problems.append(_real_problem(f"rope_scaling.{key}", rope[key], low, exclusive))
        if rope.get("original_max_position_embeddings") is not None:
            problems.append(_int_problem("rope_scaling.original_max_position_embeddings",
                                         rope["original_max_position_embeddings"], 1))
    if cfg.get("original_max_position_embeddings") is not None:
        problems.append(_int_problem("original_max_position_embeddings", cfg["original_max_position_embeddings"], 1))
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError("invalid config.json: " + "; ".join(problems))


# ModelArgs fields (DeepSeek names) -> (HF name for messages, smallest legal value).
_ARG_INTS = {
    "vocab_size": ("vocab_size", 1), "dim": ("hidden_size", 1), "inter_dim": ("intermediate_size", 1),
    "moe_inter_dim": ("moe_intermediate_size", 1), "n_layers": ("num_hidden_layers", 1),
    "n_dense_layers": ("first_k_dense_replace", 0), "n_mtp_layers": ("num_nextn_predict_layers", 0),
    "n_heads": ("num_attention_heads", 1), "n_routed_experts": ("n_routed_experts", 1),
    "n_shared_experts": ("n_shared_experts", 0), "n_activated_experts": ("num_experts_per_tok", 1),
    "n_expert_groups": ("n_group", 1), "n_limited_groups": ("topk_group", 1), "q_lora_rank": ("q_lora_rank", 0),
    "kv_lora_rank": ("kv_lora_rank", 1), "qk_nope_head_dim": ("qk_nope_head_dim", 0),
    "qk_rope_head_dim": ("qk_rope_head_dim", 2), "v_head_dim": ("v_head_dim", 1),
    "original_seq_len": ("rope_scaling.original_max_position_embeddings", 1),
    "max_seq_len": ("max_position_embeddings", 1),
}
_ARG_FLOATS = {
    "norm_eps": ("rms_norm_eps", 0.0, True, 1.0), "rope_theta": ("rope_theta", 1.0, True, None),
    "route_scale": ("routed_scaling_factor", 0.0, True, None),
}


def check_args(a) -> None:
    """ConfigError listing every ModelArgs field out of range and every broken relation between fields."""
    problems = [_int_problem(hf, getattr(a, f), low) for f, (hf, low) in _ARG_INTS.items()]
    problems += [_real_problem(hf, getattr(a, f), low, ex, high) for f, (hf, low, ex, high) in _ARG_FLOATS.items()]
    if a.yarn:
        problems.append(_real_problem("rope_scaling.factor", a.rope_factor, 0.0, True))
        problems.append(_real_problem("rope_scaling.beta_fast", a.beta_fast, 0.0, True))
        problems.append(_real_problem("rope_scaling.beta_slow", a.beta_slow, 0.0, True))
    if a.fp8_block not in (None, 128):
        problems.append(f"fp8 block {a.fp8_block} is not supported; DeepSeek-V3 checkpoints use 128x128 blocks")
    problems = [p for p in problems if p]
    if problems:  # relations below assume well-typed, positive fields
        raise ConfigError("invalid model config: " + "; ".join(problems))
    if a.qk_rope_head_dim % 2:
        problems.append(f"qk_rope_head_dim {a.qk_rope_head_dim} must be even (rope rotates pairs)")
    if a.n_dense_layers > a.n_layers:
        problems.append(f"first_k_dense_replace {a.n_dense_layers} exceeds num_hidden_layers {a.n_layers}")
    if a.n_routed_experts % a.n_expert_groups:
        problems.append(f"n_routed_experts {a.n_routed_experts} is not divisible by n_group {a.n_expert_groups}")
    if a.n_limited_groups > a.n_expert_groups:
        problems.append(f"topk_group {a.n_limited_groups} exceeds n_group {a.n_expert_groups}")
    if a.n_activated_experts > a.n_routed_experts:
        problems.append(f"num_experts_per_tok {a.n_activated_experts} exceeds n_routed_experts {a.n_routed_experts}")
    elif not problems and a.n_activated_experts > a.n_limited_groups * (a.n_routed_experts // a.n_expert_groups):
        problems.append(f"num_experts_per_tok {a.n_activated_experts} exceeds the experts in the kept groups "
                        f"(topk_group {a.n_limited_groups} x {a.n_routed_experts // a.n_expert_groups} per group)")
    if a.bos_token_id is not None and not (_is_int(a.bos_token_id) and 0 <= a.bos_token_id < a.vocab_size):
        problems.append(f"bos_token_id {a.bos_token_id!r} is outside the vocabulary [0, {a.vocab_size})")
    if a.eos_token_id is not None and not (_is_int(a.eos_token_id) and 0 <= a.eos_token_id < a.vocab_size):
        problems.append(f"eos_token_id {a.eos_token_id!r} is outside the vocabulary [0, {a.vocab_size})")
    if not problems:
        n = parameter_count(a)["total"]
        if n > MAX_PARAMETERS:
            problems.append(f"the config describes {_count(n)} parameters, more than 100x DeepSeek-V3 (671B); "
                            f"check the widths and counts (a value such as 1e9 where 64 was meant)")
        tensors = (a.n_layers + a.n_mtp_layers) * (6 * a.n_routed_experts + 30)
        if tensors > MAX_TENSORS:
            problems.append(f"the config describes ~{tensors:,} checkpoint tensors (layers x experts); "
                            f"DeepSeek-V3 has ~92,000: check num_hidden_layers and n_routed_experts")
    if problems:
        raise ConfigError("invalid model config: " + "; ".join(problems))


def parameter_count(a) -> dict[str, int]:
    """Parameters of the model `a` describes, from the formulas (no tensor is built): total, and the part held
    by fp8-quantisable linears ("fp8"), by the rest ("plain") and by fp32 router biases ("fp32")."""
    d, h = a.dim, a.n_heads
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    attn = d * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank * h * (a.qk_nope_head_dim + a.v_head_dim)
    attn += h * a.v_head_dim * d
    attn += (d * a.q_lora_rank + a.q_lora_rank * h * qk) if a.q_lora_rank else d * h * qk
    attn_norms = a.kv_lora_rank + 2 * d + (a.q_lora_rank or 0)
    dense = 3 * d * a.inter_dim
    moe_fp8 = 3 * d * a.moe_inter_dim * (a.n_routed_experts + a.n_shared_experts)
    moe_plain = a.n_routed_experts * d  # router weight (never quantised)
    n_moe = a.n_layers - a.n_dense_layers + a.n_mtp_layers  # every MTP block is an MoE layer
    n_all = a.n_layers + a.n_mtp_layers
    fp8 = n_all * attn + a.n_dense_layers * dense + n_moe * moe_fp8
    plain = 2 * a.vocab_size * d + d + n_all * attn_norms + n_moe * moe_plain + a.n_mtp_layers * (3 * d + 2 * d * d)
    fp32 = n_moe * a.n_routed_experts
    return {"total": fp8 + plain + fp32, "fp8": fp8, "plain": plain, "fp32": fp32}


def weight_bytes(a, dtype: str) -> int:
    """Bytes the loaded weights take in `dtype` ("fp8": fp8 linears + fp32 128x128 block scales, bf16 rest)."""
    n = parameter_count(a)
    if dtype == "fp8":
        return n["fp8"] + 4 * -(-n["fp8"] // (128 * 128)) + 2 * n["plain"] + 4 * n["fp32"]
    width = 4 if dtype == "fp32" else 2
    return width * (n["fp8"] + n["plain"]) + 4 * n["fp32"]


def _count(n: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.1f} GiB" if n >= 2 ** 27 else f"{n / 2 ** 20:.1f} MiB"


def memory_of(device) -> tuple[int | None, str]:
    """(bytes, what) of the memory that will hold the weights: the accelerator's, else this host's RAM."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory, f"cuda:{index} memory"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host memory"
    except (ValueError, OSError, AttributeError):
        return None, "host memory"


def describe_size(a, dtype: str) -> str:
    """"6.2M parameters, 9.4 MiB in fp8": the expected size of the model, for messages."""
    return f"{_count(parameter_count(a)['total'])} parameters, {_gib(weight_bytes(a, dtype))} in {dtype}"


def check_fits(a, dtype: str, device, ranks: int = 1) -> None:
    """ConfigError, before anything is allocated, when this rank's share of the weights exceeds the memory of
    the device that will hold them (a rank holds about 1/ranks of the model under tensor/expert parallelism)."""
    need = weight_bytes(a, dtype) / max(ranks, 1)
    have, what = memory_of(device)
    if have is not None and need > have:
        share = f" (1/{ranks} of it per rank)" if ranks > 1 else ""
        raise ConfigError(f"the model has {describe_size(a, dtype)}{share}, more than the {_gib(have)} of {what}; "
                          f"check config.json's widths, or run it with more --tp/--ep ranks or on a larger machine")
