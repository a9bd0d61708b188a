"""THE op contracts: the porting surface of deepport.

Each contract is a typed function with no body (in the style of pluggy hookspecs). Its docstring states
what it computes, the shapes (letter legend below), dtypes, preconditions with the error raised, and
its tolerance class (see deepport/conformance/tolerances.py). A backend implements any subset with the
*same parameter names, in the same order*; `registry.py` checks that at registration. `cpu_ref`
implements every one and is the executable spec.

Letter legend:
  B batch (sequences)      S new tokens per sequence   T total tokens (cache + new)
  H attention heads        D model width (dim)         C kv_lora_rank (latent width, 512 at 671B)
  R qk_rope_head_dim (64)  Dk q/k head dim (nope+rope) Dv v_head_dim
  M rows of a GEMM (tokens) N output features          K reduction length
  E routed experts         I expert/ffn width          k experts per token (topk)
  NB cache blocks          P tokens per cache block    V vocabulary

Composites (`linear`) are built from primitives by the op table when a backend does not override them.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch

from deepport.core.formats import Fp8Format, Fp8Weight


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """Root-mean-square norm, with an optional fused residual add.

    Without residual: ``y = x / sqrt(mean(x**2, -1) + eps) * weight`` -> returns y.
    With residual:    ``r = x + residual``; ``y = rms_norm(r)`` -> returns ``(y, r)``.
    Math in fp32; y and r are returned in x.dtype (r rounded once, after the fp32 add).

    Shapes: x, residual [..., D]; weight [D]. dtypes: fp32 or bf16 (x and residual alike); weight any float.
    Preconditions: x.shape[-1] == weight.shape[0], else ContractError.
    Tolerance class: ``norm``.
    """


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """DeepSeek's interleaved (pairwise) rotary embedding.

    For each pair i of the last dim:
      ``out[..., 2i]   = x[..., 2i] * cos[..., i] - x[..., 2i+1] * sin[..., i]``
      ``out[..., 2i+1] = x[..., 2i] * sin[..., i] + x[..., 2i+1] * cos[..., i]``
    (the complex product of (x[2i] + j x[2i+1]) with e^{j theta}). This is *not* rotate-half: the
    checkpoint's rope rows are interleaved pairs, and q, k and the cache share this convention.

    Shapes: x [B, S, H, R]; cos, sin [B, S, R/2] fp32 (per-position tables, YaRN already applied,
    gathered by the caller so each sequence may sit at a different position). Returns x's shape and dtype.
    Math in fp32.
    Preconditions: R even and cos/sin last dim == R/2, else ContractError.
    Tolerance class: ``elementwise``.
    """


def act_quant(x: torch.Tensor, fmt: Fp8Format, block: int = 128, scale_fmt: str = "fp32"):
    """Per-token, per-`block`-channel fp8 quantisation of activations.

    For each row and each block of `block` channels: ``amax = max(|x|)``,
    ``s = max(amax, 1e-4) / fmt.act_max`` (fp32); with ``scale_fmt="ue8m0"`` (DeepSeek-V3.1's checkpoints)
    s is then rounded *up* to a power of two, ``s = 2^ceil(log2 s)`` exactly (the next power of two unless s
    already is one), so x / s is exact and stays within +-act_max. ``codes = fp8(x / s)`` rounded to nearest
    even on the fp8 grid (values are within range by construction). Returns ``(codes, s)``.

    Shapes: x [..., K]; codes [..., K] with dtype fmt.dtype; s [..., K/block] fp32.
    dtypes: x fp32 or bf16; fmt e4m3fn (act_max 448) or e4m3fnuz (act_max 224); scale_fmt "fp32" or "ue8m0".
    Preconditions: K % block == 0; scale_fmt known, else ContractError.
    Tolerance class: ``quant``: scales equal to fp32 rounding (ue8m0: equal); codes equal, or one fp8 ulp apart
    where x/s lies within fp32 rounding of a tie.
    """


def weight_dequant(w: torch.Tensor, scale_inv: torch.Tensor, block: int = 128,
                   out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Dequantise a block-scaled fp8 weight: ``W[n, k] = float(w[n, k]) * scale_inv[n // block, k // block]``.

    Shapes: w [N, K] fp8 (e4m3fn or e4m3fnuz); scale_inv [ceil(N/block), ceil(K/block)] fp32 (edge blocks
    partial). Returns [N, K] in out_dtype (product in fp32, rounded once).
    Preconditions: scale_inv has exactly the ceil-rounded grid, else ContractError.
    Tolerance class: ``elementwise``.
    """


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Block-scaled fp8 GEMM ``C = A @ B^T`` (DeepSeek's / DeepGEMM's "promote every 128 K" scheme).

    ``C[m, n] = sum_kb a_scale[m, kb] * b_scale[n // 128, kb] * sum_{k in block kb} A[m, k] * B[n, k]``
    with fp32 accumulation; C rounded once to out_dtype.

    Shapes: a [M, K] fp8 with a_scale [M, K/128] fp32 (1x128 activation scales, from act_quant);
    b [N, K] fp8 with b_scale [ceil(N/128), K/128] fp32 (128x128 weight blocks). Returns [M, N].
    a and b share one fp8 format. N may be ragged (partial last block); M any.
    Preconditions: K % 128 == 0; shapes and formats consistent, else ContractError.
    Tolerance class: ``gemm`` (atol scaled by K).
    """


def linear(x: torch.Tensor, w: torch.Tensor | Fp8Weight) -> torch.Tensor:
    """Composite ``y = x @ W^T`` (no bias).

    For a plain tensor w [N, K]: a matmul in x.dtype with fp32 accumulation.
    For an Fp8Weight: ``codes, s = act_quant(x, w.fmt, scale_fmt=w.scale_fmt)``; ``y = fp8_gemm(codes, s,
    w.weight, w.scale_inv, out_dtype=x.dtype)`` (W8A8, DeepSeek's serving numerics; w.scale_fmt "ue8m0" gives
    power-of-two activation scales). A backend may override it as one fused op.

    Shapes: x [..., K]; returns [..., N] in x.dtype.
    Tolerance class: ``gemm``.
    """


def mla_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    """Attention over expanded per-head K/V (MLA's "MHA mode", used for prefill).

    ``p = softmax(scale * q @ k^T + mask)`` over T in fp32; ``out = p @ v``.
    With causal, query i (of S) sees keys j <= (T - S) + i (bottom-right aligned, so a prefix already in
    K/V is fully visible).

    Shapes: q [B, S, H, Dk]; k [B, T, H, Dk]; v [B, T, H, Dv] (Dk = nope + rope = 192, Dv = 128 at 671B;
    Dv may differ from Dk). Returns [B, S, H, Dv] in q.dtype. T >= S when causal.
    Tolerance class: ``attention``.
    """


def mla_decode(q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, pe_cache: torch.Tensor,
               block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Absorbed MLA over the paged latent cache ("MQA mode"; FlashMLA's problem, 576/512 split).

    For sequence b with L = seq_lens[b] cached tokens (the S new ones included, already written) and
    token j stored at ``kv_cache[block_table[b, j // P], j % P]``:
      ``score[b, i, h, j] = scale * (<q_latent[b,i,h], c_j> + <q_pe[b,i,h], pe_j>)`` for j <= L - S + i
      (causal among the S new queries), softmax over j in fp32,
      ``out[b, i, h] = sum_j p[b, i, h, j] * c_j`` (V is the latent itself).
    The output is the latent ``o~`` [.., C]; the caller applies W_UV and wo.

    Shapes: q_latent [B, S, H, C]; q_pe [B, S, H, R]; kv_cache [NB, P, C]; pe_cache [NB, P, R];
    block_table [B, max_blocks] int32; seq_lens [B] int32 with S <= seq_lens[b] <= max_blocks * P.
    Returns [B, S, H, C] in q_latent.dtype. Sequences in a batch may have different lengths; unused
    block_table entries may hold any value and must not be read. q_latent and q_pe may arrive as strided
    views (the graph passes a heads-first product's transpose and a split), and the result's strides are the
    backend's choice (cpu returns it heads-first in memory): callers must not assume it contiguous.
    `scale` is the full softmax scale (qk_head_dim^-0.5 * mscale^2 with YaRN), never 576^-0.5.
    Tolerance class: ``attention``.
    """


def moe_gate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, n_groups: int, topk_groups: int,
             topk: int, route_scale: float, norm_topk_prob: bool = True):
    """DeepSeek-V3's auxiliary-loss-free sigmoid router (noaux_tc), in fp32.

    ``s = sigmoid(x @ weight^T)``; ``s_b = s + bias`` (bias for *selection only*);
    group score = sum of the top-2 ``s_b`` in each of n_groups equal groups; keep the topk_groups best
    groups, mask the others with -inf; ``ids = topk(s_b_masked, topk)``;
    ``w = s[ids] / sum(s[ids])`` (unbiased scores, renormalised) ``* route_scale``; with
    ``norm_topk_prob=False`` (HF config key of the same name) no renormalisation: ``w = s[ids] * route_scale``.
    Returns ``(weights, ids)``: weights [M, k] fp32, ids [M, k] int64 (order within a row unspecified).

    Shapes: x [M, D] (fp32 or bf16, upcast); weight [E, D]; bias [E] fp32. E % n_groups == 0.
    Preconditions: topk_groups <= n_groups, topk <= topk_groups * E / n_groups, else ContractError.
    Tolerance class: ``routing``: selected sets equal except where biased scores are within 1e-5 of a
    tie; weights compared per selected expert.
    """


def moe_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                w1: torch.Tensor | Fp8Weight, w2: torch.Tensor | Fp8Weight,
                w3: torch.Tensor | Fp8Weight) -> torch.Tensor:
    """Routed experts (SwiGLU), weighted and summed.

    ``y[m] = sum_k topk_weights[m, k] * E_{topk_ids[m, k]}(x[m])`` with
    ``E_e(x) = linear(silu_mul([linear(x, w1[e]) ; linear(x, w3[e])]), w2[e])`` where each `linear` is the
    contract above (for Fp8Weight: act_quant with the weights' scale_fmt, then fp8_gemm, W8A8). Gate/up outputs and the SwiGLU
    product are rounded to x.dtype; the weighted sum is accumulated in fp32 and rounded once to x.dtype.
    Ids < 0 (tokens routed to experts on another rank under expert parallelism) contribute nothing.
    No host synchronisation is required by the contract.

    Shapes: x [M, D]; topk_weights [M, k] fp32; topk_ids [M, k] int64; w1, w3 [E, I, D]; w2 [E, D, I]
    (tensors in x.dtype, or Fp8Weight with scales [E, ceil(N/128), ceil(K/128)]). Returns [M, D] in x.dtype.
    Tolerance class: ``gemm`` (atol scaled by D + I).
    """


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation: ``silu(x[..., :I]) * x[..., I:]`` with x [..., 2I]; math in fp32, out x.dtype.

    Preconditions: last dim even, else ContractError.
    Tolerance class: ``elementwise``.
    """


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Pick the next token per row from fp32 logits [B, V]; returns [B] int64.

    temperature <= 0: argmax (lowest index wins a tie). Otherwise ``p = softmax(logits / temperature)``
    in fp32; with top_p < 1 keep the smallest set of most probable tokens whose mass reaches top_p
    (the top token always kept), renormalise; draw one token per row from p using `generator`
    (exponential race ``argmax(p / Exp(1))``, an exact categorical draw; seeded -> reproducible).
    Tolerance class: ``exact`` for greedy; distributional for sampling.
    """


def all_reduce(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum x over the ranks of `group` (torch.distributed) and return it (in place where possible).

    Identity when torch.distributed is not initialised or the group has one rank. fp8 tensors must be
    upcast by the caller (sums of fp8 are not defined). Tolerance class: ``collective``.
    """


def all_to_all(x: torch.Tensor, output_split_sizes: list[int], input_split_sizes: list[int], group=None) -> torch.Tensor:
    """Exchange rows of x [M, ...]: rank r sends input_split_sizes[q] consecutive rows to rank q and
    receives output_split_sizes[q] rows from rank q; returns [sum(output_split_sizes), ...].

    fp8 tensors travel as uint8 views where the collective backend lacks fp8 (gloo). Identity when
    torch.distributed is not initialised. Tolerance class: ``exact``.
    """


CONTRACTS: dict[str, Callable] = {
    f.__name__: f
    for f in (rms_norm, rope, act_quant, weight_dequant, fp8_gemm, linear, mla_prefill, mla_decode,
              moe_gate, moe_experts, silu_mul, sample, all_reduce, all_to_all)
}
COMPOSITES = ("linear",)
PRIMITIVES = tuple(n for n in CONTRACTS if n not in COMPOSITES)

TOLERANCE_CLASS = {
    "rms_norm": "norm", "rope": "elementwise", "act_quant": "quant", "weight_dequant": "elementwise",
    "fp8_gemm": "gemm", "linear": "gemm", "mla_prefill": "attention", "mla_decode": "attention",
    "moe_gate": "routing", "moe_experts": "gemm", "silu_mul": "elementwise", "sample": "exact",
    "all_reduce": "collective", "all_to_all": "exact",
}


def parameter_names(fn: Callable) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _late_defaults(op: str, got: list[str]) -> dict:
    """The contract's parameters after `got` when `got` is a prefix of it and all the rest have defaults."""
    params = list(inspect.signature(CONTRACTS[op]).parameters.values())
    names = [p.name for p in params]
    if names[:len(got)] != got:
        return {}
    rest = params[len(got):]
    if not rest or any(p.default is inspect.Parameter.empty for p in rest):
        return {}
    return {p.name: p.default for p in rest}


def check_signature(op: str, fn: Callable, backend: str) -> Callable:
    """Raise ContractError unless `fn` takes exactly the contract's parameter names, in order.

    A backend written before a contract gained trailing parameters with defaults (act_quant's scale_fmt,
    moe_gate's norm_topk_prob) is accepted: the returned callable runs it while those parameters keep
    their defaults and raises ContractError naming the parameter otherwise. Otherwise returns fn itself.
    """
    from deepport.core.errors import ContractError

    if op not in CONTRACTS:
        raise ContractError(f"backend {backend!r} provides unknown op {op!r}; known ops: {', '.join(CONTRACTS)}")
    want, got = parameter_names(CONTRACTS[op]), parameter_names(fn)
    if want == got:
        return fn
    late = _late_defaults(op, got)
    if not late:
        raise ContractError(
            f"backend {backend!r}: {op}({', '.join(got)}) does not match the contract "
            f"{op}({', '.join(want)}); rename the parameters to match deepport/core/ops.py")
    n = len(got)

    def older(*args, **kwargs):
        given = dict(zip(list(late), args[n:]))
        given.update((k, kwargs.pop(k)) for k in list(kwargs) if k in late)
        for name, value in given.items():
            if value != late[name]:
                raise ContractError(f"backend {backend!r}: {op} predates the contract parameter {name} and cannot "
                                    f"run {name}={value!r}; add {name} to its {op} (deepport/core/ops.py) or use "
                                    f"--backend cpu_ref")
        return fn(*args[:n], **kwargs)

    older.__name__, older.__doc__, older.__wrapped__ = getattr(fn, "__name__", op), fn.__doc__, fn
    return older
