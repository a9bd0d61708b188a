"""The DeepSeek-V3 graph: RMSNorm, MLA, MLP, Gate, MoE, Block, MTP, Transformer (bottom-up).

It names no hardware: every op goes through the bound op table `ops` (deepport/core/ops.py contracts).
Parallelism is applied from outside (core/parallel.py); weights arrive from core/checkpoint.py.
Imports torch and deepport.core only (a test checks that).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deepport.core.cache import PagedLatentCache
from deepport.core.config import ModelArgs
from deepport.core.formats import Fp8Weight


def _param(shape, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T through ops.linear; W is a plain tensor, or fp8 codes + 128x128 block scales (`scale_inv`)."""

    scale_fmt = "fp32"  # the checkpoint's block-scale format (Transformer sets args.scale_fmt)

    def __init__(self, ops, in_features: int, out_features: int, dtype, fp8=None, device="meta", block: int = 128):
        super().__init__()
        self.ops, self.block = ops, block
        self.in_features, self.out_features = in_features, out_features
        if fp8 is not None:
            self.weight = _param((out_features, in_features), fp8.dtype, device)
            self.scale_inv = _param((-(-out_features // block), -(-in_features // block)), torch.float32, device)
        else:
            self.weight = _param((out_features, in_features), dtype, device)
            self.scale_inv = None

    def w(self):
        return self.weight if self.scale_inv is None else Fp8Weight(self.weight, self.scale_inv, self.block,
                                                                    self.scale_fmt)

    def dense(self, dtype) -> torch.Tensor:
        """The weight as a plain tensor (dequantised through ops.weight_dequant when fp8)."""
        if self.scale_inv is None:
            return self.weight.to(dtype)
        return self.ops.weight_dequant(self.weight, self.scale_inv, self.block, out_dtype=dtype)

    def forward(self, x):
        return self.ops.linear(x, self.w())


class RMSNorm(nn.Module):
    def __init__(self, ops, dim: int, eps: float, dtype, device="meta"):
        super().__init__()
        self.ops, self.eps = ops, eps
        self.weight = _param((dim,), dtype, device)

    def forward(self, x, residual=None):
        return self.ops.rms_norm(x, self.weight, self.eps, residual)


def yarn_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Rotary inverse frequencies [R/2] for the rope part, YaRN-blended when args.yarn."""
    dim = args.qk_rope_head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if not args.yarn or args.rope_factor <= 1:
        return freqs

    def correction_dim(rotations):
        return dim * math.log(args.original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(args.rope_theta))

    low = max(math.floor(correction_dim(args.beta_fast)), 0)
    high = min(math.ceil(correction_dim(args.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: original frequency (high-frequency pairs), 0: divided by the factor
    return freqs / args.rope_factor * (1 - keep) + freqs * keep


@dataclass
class AttnContext:
    """Where this forward's tokens go: positions' cos/sin, and the cache rows and slots (None: no cache)."""

    cos: torch.Tensor  # [B, S, R/2] fp32
    sin: torch.Tensor
    cache: PagedLatentCache | None = None
    rows: list | None = None
    slots: torch.Tensor | None = None  # [B, S]
    block_table: torch.Tensor | None = None  # [B, max_blocks] for `rows`
    seq_lens: torch.Tensor | None = None  # [B] lengths after this forward
    fresh: bool = True  # no earlier tokens in the cache: expanded-K/V prefill ("MHA mode")


class MLA(nn.Module):
    """Multi-head Latent Attention: caches kv_norm(c_kv) and rotated k_pe; absorbed attention over the cache."""

    def __init__(self, ops, args: ModelArgs, dtype, fp8=None, device="meta"):
        super().__init__()
        self.ops = ops
        self.n_heads, self.kv_lora_rank = args.n_heads, args.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = args.qk_nope_head_dim, args.qk_rope_head_dim
        self.qk_head_dim, self.v_head_dim = args.qk_head_dim, args.v_head_dim
        self.softmax_scale = args.softmax_scale
        lin = dict(dtype=dtype, fp8=fp8, device=device)
        if args.q_lora_rank:
            self.wq_a = Linear(ops, args.dim, args.q_lora_rank, **lin)
            self.q_norm = RMSNorm(ops, args.q_lora_rank, args.norm_eps, dtype, device)
            self.wq_b = Linear(ops, args.q_lora_rank, self.n_heads * self.qk_head_dim, **lin)
        else:
            self.wq = Linear(ops, args.dim, self.n_heads * self.qk_head_dim, **lin)
        self.wkv_a = Linear(ops, args.dim, self.kv_lora_rank + self.qk_rope_head_dim, **lin)
        self.kv_norm = RMSNorm(ops, self.kv_lora_rank, args.norm_eps, dtype, device)
        self.wkv_b = Linear(ops, self.kv_lora_rank, self.n_heads * (self.qk_nope_head_dim + self.v_head_dim), **lin)
        self.wo = Linear(ops, self.n_heads * self.v_head_dim, args.dim, **lin)
        self.layer_id = 0
        self._absorbed = None

    def absorbed(self, dtype):
        """W_UK [H, nope, C] and W_UV^T [H, C, v] (contiguous) from wkv_b, dequantised once (recomputed when
        training): the two batched GEMMs of absorbed decode."""
        if torch.compiler.is_compiling() and self._absorbed is not None and self._absorbed[0][2] == dtype:
            return self._absorbed[1], self._absorbed[2]  # warmed before compiling (core/step.py); no data_ptr
        key = (self.wkv_b.weight.data_ptr(), self.wkv_b.weight._version, dtype)
        if self._absorbed is None or self._absorbed[0] != key or self.wkv_b.weight.requires_grad:
            w = self.wkv_b.dense(dtype).view(self.n_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
            w_uv_t = w[:, self.qk_nope_head_dim:].transpose(1, 2).contiguous()
            self._absorbed = (key, w[:, :self.qk_nope_head_dim], w_uv_t)
        return self._absorbed[1], self._absorbed[2]

    def forward(self, x, ctx: AttnContext):
        b, s, _ = x.shape
        q = self.wq_b(self.q_norm(self.wq_a(x))) if hasattr(self, "wq_a") else self.wq(x)
        q = q.view(b, s, self.n_heads, self.qk_head_dim)  # q: [B, S, H, nope + rope]
        q_nope, q_pe = q.split_with_sizes([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        kv = self.wkv_a(x)  # [B, S, C + R]
        c, k_pe = kv.split_with_sizes([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        c = self.kv_norm(c)  # the norm covers the latent only, never k_pe
        # one rope call rotates the H query heads and the one key head shared by all (k_pe: [B, S, 1, R])
        q_pe, k_pe = self.ops.rope(torch.cat((q_pe, k_pe.unsqueeze(2)), dim=2), ctx.cos, ctx.sin).split_with_sizes(
            [self.n_heads, 1], dim=2)  # split_with_sizes: Tensor.split's Python wrapper costs more than the split
        if ctx.cache is not None:
            ctx.cache.write(self.layer_id, ctx.slots, c, k_pe.squeeze(2))
        if ctx.fresh:
            kvb = self.wkv_b(c).view(b, s, self.n_heads, self.qk_nope_head_dim + self.v_head_dim)
            k_nope, v = kvb.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
            k = torch.cat((k_nope, k_pe.expand(-1, -1, self.n_heads, -1)), dim=-1)
            o = self.ops.mla_prefill(torch.cat((q_nope, q_pe), dim=-1), k, v, True, self.softmax_scale)
        else:
            w_uk, w_uv_t = self.absorbed(x.dtype)  # [H, nope, C], [H, C, v]
            heads_first = q_nope.reshape(b * s, self.n_heads, -1).transpose(0, 1)  # [H, B*S, nope]
            q_latent = torch.bmm(heads_first, w_uk).transpose(0, 1).reshape(b, s, self.n_heads, -1)  # [B, S, H, C]
            o_latent = self.ops.mla_decode(q_latent, q_pe, ctx.cache.kv[self.layer_id], ctx.cache.pe[self.layer_id],
                                           ctx.block_table, ctx.seq_lens, self.softmax_scale)
            o = torch.bmm(o_latent.reshape(b * s, self.n_heads, -1).transpose(0, 1), w_uv_t)  # [H, B*S, v]
            return self.wo(o.transpose(0, 1).reshape(b, s, -1))
        return self.wo(o.flatten(2))


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x); dense layers and the shared experts."""

    def __init__(self, ops, dim: int, inter_dim: int, dtype, fp8=None, device="meta"):
        super().__init__()
        self.ops = ops
        lin = dict(dtype=dtype, fp8=fp8, device=device)
        self.w1 = Linear(ops, dim, inter_dim, **lin)
        self.w3 = Linear(ops, dim, inter_dim, **lin)
        self.w2 = Linear(ops, inter_dim, dim, **lin)

    def forward(self, x):
        return self.w2(self.ops.silu_mul(torch.cat((self.w1(x), self.w3(x)), dim=-1)))


class Gate(nn.Module):
    """Sigmoid router with e_score_correction_bias (selection only), group top-2 sums; weight stays unquantised."""

    def __init__(self, ops, args: ModelArgs, dtype, device="meta"):
        super().__init__()
        self.ops, self.args = ops, args
        self.weight = _param((args.n_routed_experts, args.dim), dtype, device)
        self.bias = _param((args.n_routed_experts,), torch.float32, device)

    def forward(self, x):
        a = self.args
        return self.ops.moe_gate(x, self.weight, self.bias, a.n_expert_groups, a.n_limited_groups,
                                 a.n_activated_experts, a.route_scale, a.norm_topk_prob)


class Experts(nn.Module):
    """Routed experts stacked: w1, w3 [E, I, D]; w2 [E, D, I] (+ fp8 scale_inv [E, ceil(N/128), ceil(K/128)])."""

    scale_fmt = "fp32"  # as Linear.scale_fmt

    def __init__(self, n: int, dim: int, inter_dim: int, dtype, fp8=None, device="meta", block: int = 128):
        super().__init__()
        self.block = block
        for name, (rows, cols) in (("w1", (inter_dim, dim)), ("w3", (inter_dim, dim)), ("w2", (dim, inter_dim))):
            setattr(self, name, _param((n, rows, cols), fp8.dtype if fp8 else dtype, device))
            setattr(self, name + "_scale_inv",
                    _param((n, -(-rows // block), -(-cols // block)), torch.float32, device) if fp8 else None)

    def get(self, name: str):
        w, s = getattr(self, name), getattr(self, name + "_scale_inv")
        return w if s is None else Fp8Weight(w, s, self.block, self.scale_fmt)


class MoE(nn.Module):
    """DeepSeekMoE: routed experts (weights sum to route_scale) plus always-on shared experts."""

    def __init__(self, ops, args: ModelArgs, dtype, fp8=None, device="meta"):
        super().__init__()
        self.ops = ops
        self.gate = Gate(ops, args, dtype, device)
        self.experts = Experts(args.n_routed_experts, args.dim, args.moe_inter_dim, dtype, fp8, device)
        self.shared_experts = MLP(ops, args.dim, args.n_shared_experts * args.moe_inter_dim, dtype, fp8, device)
        self.last_topk_ids = None  # read by training for the auxiliary-loss-free bias update

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [M, D]
        weights, ids = self.gate(x)
        self.last_topk_ids = ids
        e = self.experts
        y = self.ops.moe_experts(x, weights, ids, e.get("w1"), e.get("w2"), e.get("w3"))
        return (y + self.shared_experts(x)).view(shape)


class Block(nn.Module):
    """Pre-norm decoder layer; the residual stream is carried through ops.rms_norm's fused add."""

    def __init__(self, ops, layer_id: int, args: ModelArgs, dtype, fp8=None, device="meta", moe: bool | None = None):
        super().__init__()
        self.attn_norm = RMSNorm(ops, args.dim, args.norm_eps, dtype, device)
        self.attn = MLA(ops, args, dtype, fp8, device)
        self.attn.layer_id = layer_id
        self.ffn_norm = RMSNorm(ops, args.dim, args.norm_eps, dtype, device)
        moe = layer_id >= args.n_dense_layers if moe is None else moe
        self.ffn = MoE(ops, args, dtype, fp8, device) if moe else MLP(ops, args.dim, args.inter_dim, dtype, fp8, device)

    def forward(self, h, residual, ctx: AttnContext, last_only: bool = False):
        """last_only: every position is attended and cached, but only the last goes on through the feed-forward
        (MTP drafting reads the last position's output; the others are needed only for their cache entries)."""
        if residual is None:
            residual, x = h, self.attn_norm(h)
        else:
            x, residual = self.attn_norm(h, residual)
        h = self.attn(x, ctx)
        if last_only and h.shape[1] > 1:
            h, residual = h[:, -1:], residual[:, -1:]
        x, residual = self.ffn_norm(h, residual)
        return self.ffn(x), residual


class MTP(nn.Module):
    """Multi-Token Prediction module: eh_proj([enorm(emb(t_{i+1})) ; hnorm(h_i)]) -> one MoE block -> norm."""

    def __init__(self, ops, depth: int, args: ModelArgs, dtype, fp8=None, device="meta"):
        super().__init__()
        self.enorm = RMSNorm(ops, args.dim, args.norm_eps, dtype, device)
        self.hnorm = RMSNorm(ops, args.dim, args.norm_eps, dtype, device)
        self.eh_proj = Linear(ops, 2 * args.dim, args.dim, dtype, None, device)  # never fp8
        self.block = Block(ops, depth, args, dtype, fp8, device, moe=True)
        self.norm = RMSNorm(ops, args.dim, args.norm_eps, dtype, device)  # shared_head.norm


class Transformer(nn.Module):
    """Embedding, n_layers blocks (first n_dense_layers dense), final norm, head; plus the MTP modules."""

    def __init__(self, args: ModelArgs, ops, dtype=torch.bfloat16, fp8=None, device="meta"):
        super().__init__()
        self.args, self.ops, self.dtype = args, ops, dtype
        self.embed = nn.Module()
        self.embed.weight = _param((args.vocab_size, args.dim), dtype, device)
        self.layers = nn.ModuleList(Block(ops, i, args, dtype, fp8, device) for i in range(args.n_layers))
        self.norm = RMSNorm(ops, args.dim, args.norm_eps, dtype, device)
        self.head = Linear(ops, args.dim, args.vocab_size, dtype, None, device)  # never fp8
        self.mtp = nn.ModuleList(MTP(ops, d, args, dtype, fp8, device) for d in range(args.n_mtp_layers))
        self.register_buffer("inv_freq", yarn_inv_freq(args), persistent=False)
        if fp8 is not None and args.scale_fmt != Linear.scale_fmt:
            for m in self.modules():
                if isinstance(m, (Linear, Experts)):
                    m.scale_fmt = args.scale_fmt

    def embed_tokens(self, ids):
        return F.embedding(ids, self.embed.weight)

    def rope_tables(self, pos: torch.Tensor):
        """cos, sin [B, S, R/2] fp32 of positions pos [B, S] (YaRN's attention factor folded in)."""
        angles = pos.float().unsqueeze(-1) * self.inv_freq.to(pos.device)  # [B, S, R/2]
        factor = self.args.rope_attention_factor
        return torch.cos(angles) * factor, torch.sin(angles) * factor

    def cache_context(self, cache: PagedLatentCache, start: torch.Tensor, block_table: torch.Tensor, s: int,
                      rows: list | None = None, starts: tuple | None = None) -> AttnContext:
        """Decode metadata computed on the device from the cache's tensors (no host sync, static shapes):
        start [B] tokens already cached, block_table [B, max_blocks]; S new tokens per row. starts: the same
        lengths as host ints where the caller has them: the rope tables of the last such positions are reused
        (an MTP draft runs at the positions its verification just ran at)."""
        page = cache.block_size
        pos = start.long().unsqueeze(1) + torch.arange(s, device=start.device)  # [B, S]
        if starts is not None and not torch.compiler.is_compiling():  # eager only: a traced step reads no memo
            cos, sin = self._rope_at(starts, s, pos.device, lambda: pos)
        else:
            cos, sin = self.rope_tables(pos)
        slots = block_table.long().gather(1, torch.div(pos, page, rounding_mode="floor")) * page + pos % page
        return AttnContext(cos, sin, cache, rows, slots, block_table, (start + s).to(torch.int32), fresh=False)

    def _rope_at(self, starts: tuple, s: int, device, positions):
        """cos, sin on `device` of S positions from each of `starts` (host ints); positions() makes the [B, S]
        position tensor there. The tables of the last such positions are reused (an MTP draft runs at its
        verification's positions)."""
        key, memo = (starts, s, device), self.__dict__.get("_rope_memo")
        if memo is not None and memo[0] == key:
            return memo[1], memo[2]
        cos, sin = self.rope_tables(positions())
        self._rope_memo = (key, cos, sin)
        return cos, sin

    def _host_context(self, cache: PagedLatentCache, rows: list, starts: tuple, s: int) -> AttnContext:
        """cache_context's metadata from the cache's host mirror (lengths, owned blocks) where the cache lives in host
        memory: a few tensors made from ints instead of a dozen small ops on the device's tensors (same values)."""
        idx = cache.index(rows)
        device = cache.block_table.device
        cos, sin = self._rope_at(starts, s, device, lambda: torch.tensor([[st + i for i in range(s)] for st in starts],
                                                                         device=device))
        lens = torch.tensor([st + s for st in starts], dtype=torch.int32, device=device)
        return AttnContext(cos, sin, cache, rows, cache.slots(rows, s), cache.block_table[idx], lens, fresh=False)

    def _context(self, b: int, s: int, cache: PagedLatentCache | None, rows: list | None, device) -> AttnContext:
        if cache is None:
            pos = torch.arange(s, device=device).expand(b, s)  # [B, S]
            return AttnContext(*self.rope_tables(pos), fresh=True)
        rows = list(range(cache.batch)) if rows is None else list(rows)
        if len(rows) != b:
            raise ValueError(f"{len(rows)} cache rows given for a batch of {b}")
        starts = tuple(cache.lens[r] for r in rows)  # host mirror: no sync
        cache.reserve(rows, s)
        if cache.seq_lens.device.type == "cpu" and not torch.compiler.is_compiling():
            ctx = self._host_context(cache, rows, starts, s)
        else:
            idx = cache.index(rows)
            ctx = self.cache_context(cache, cache.seq_lens[idx], cache.block_table[idx], s, rows, starts)
        ctx.fresh = not any(starts)
        return ctx

    def hidden(self, h, ctx: AttnContext):
        """The blocks and the final norm over embedded tokens h [B, S, D]."""
        residual = None
        for layer in self.layers:
            h, residual = layer(h, residual, ctx)
        return self.norm(h, residual)[0]

    def forward(self, input_ids, cache: PagedLatentCache | None = None, rows: list | None = None):
        """Hidden states after the final norm, [B, S, D]; with a cache, the new tokens are appended to it."""
        b, s = input_ids.shape  # input_ids: [B, S]
        h = self.embed_tokens(input_ids)
        ctx = self._context(b, s, cache, rows, h.device)
        h = self.hidden(h, ctx)
        if cache is not None:
            cache.advance(ctx.rows, s)
        return h

    def decode_step(self, input_ids, cache: PagedLatentCache):
        """One step over *every* row of `cache` (S new tokens each): (hidden [B, S, D], fp32 logits [B, S, V]).

        Static shapes and no host sync: this is what torch.compile and device graphs capture (core/step.py).
        The caller reserves room first (cache.reserve) and advances the lengths after (cache.advance).
        """
        s = input_ids.shape[1]
        ctx = self.cache_context(cache, cache.seq_lens, cache.block_table, s)
        h = self.hidden(self.embed_tokens(input_ids), ctx)
        return h, self.logits(h)

    def prepare_decode(self) -> None:
        """Derive what absorbed decode reads (W_UK, W_UV^T per MLA layer) before a decode step is traced: the
        traced step then reads them as they are. Without it, a step traced after a fresh prefill (which never
        needs them) derives them inside its graph, stores them, and is traced a second time (a recompile)."""
        for m in self.modules():
            if isinstance(m, MLA):
                m.absorbed(self.dtype)

    def logits(self, hidden):
        """fp32 logits [.., V] from post-norm hidden states (the head is never fp8)."""
        return self.head(hidden).float()

    def mtp_forward(self, hidden, next_ids, cache: PagedLatentCache | None = None, rows: list | None = None,
                    depth: int = 0, last_only: bool = False):
        """MTP hidden [B, S, D] predicting t_{i+2} from main hidden h_i (post-norm) and the token t_{i+1}.
        last_only: [B, 1, D] for the last position alone (drafting); every position still enters the cache."""
        m = self.mtp[depth]
        b, s = next_ids.shape
        e = self.embed_tokens(next_ids)
        u = m.eh_proj(torch.cat((m.enorm(e), m.hnorm(hidden)), dim=-1))  # embedding half first
        ctx = self._context(b, s, cache, rows, u.device)
        u, residual = m.block(u, None, ctx, last_only)
        if cache is not None:
            cache.advance(ctx.rows, s)
        return m.norm(u, residual)[0]

    def mtp_decode_step(self, hidden, next_ids, cache: PagedLatentCache, depth: int = 0):
        """MTP drafting over *every* row of an MTP cache (S positions each): (MTP hidden [B, S, D], fp32 logits
        [B, S, V]). Static shapes and no host sync, as decode_step: what a compiled MTP run traces (core/step.py).
        The caller reserves room first and advances (then rolls back what it does not keep) after."""
        m = self.mtp[depth]
        s = next_ids.shape[1]
        e = self.embed_tokens(next_ids)
        u = m.eh_proj(torch.cat((m.enorm(e), m.hnorm(hidden)), dim=-1))
        ctx = self.cache_context(cache, cache.seq_lens, cache.block_table, s)
        u, residual = m.block(u, None, ctx)
        u = m.norm(u, residual)[0]
        return u, self.logits(u)

    def new_cache(self, batch: int, max_tokens: int, block_size: int = 16, mtp: bool = False) -> PagedLatentCache:
        """A paged latent cache for the main layers (or, with mtp=True, for the MTP modules)."""
        n = self.args.n_mtp_layers if mtp else self.args.n_layers
        return PagedLatentCache(n, batch, max_tokens, self.args.kv_lora_rank, self.args.qk_rope_head_dim,
                                self.dtype, self.embed.weight.device, block_size)
