"""Tensor and expert parallelism applied to a built (meta-device) Transformer from outside the graph.

gpt-fast style: `apply` shrinks each parameter to this rank's shard, adds the collectives as forward
hooks or small wrapper modules, and returns the ShardPlan that checkpoint.load_into uses to read only
this rank's slices. Layout (TP x EP grid, see distributed.py):

- attention: heads split over the TP group (wq/wq_b, wkv_b column-parallel; wo row-parallel + all_reduce);
  the latent KV cache is not split (every TP rank caches all C + R per token: see docs/parallel.md);
- dense MLP and shared expert: w1/w3 column-parallel, w2 row-parallel;
- embedding vocab-parallel (masked lookup + all_reduce); head vocab-parallel, logits all-gathered
  (an all_to_all that sends the local block to every rank);
- routed experts: E/ep whole experts per EP rank, their I dimension split over the TP group; each EP
  rank routes its slice of the tokens and dispatches / combines them with all_to_all;
- sampling on rank 0 in fp32, the token broadcast (an all_reduce with zeros elsewhere).

All collectives go through the bound op table's `all_reduce` / `all_to_all` contracts.
"""
from __future__ import annotations

import dataclasses
import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from deepport.core import distributed
from deepport.core.config import ModelArgs
from deepport.core.distributed import Layout, World
from deepport.core.errors import CheckpointError, ConfigError
from deepport.core.model import MLA, MLP, Linear, MoE, Transformer

BLOCK = 128  # fp8 weight block: every fp8 shard boundary must fall on it

# Split rules on a parameter's target path (checkpoint.Spec.target): tensor dim split over the TP group.
_SPLIT_DIM = [
    (re.compile(r"(^|\.)(embed|head)\.weight$"), 0),  # vocab
    (re.compile(r"attn\.(wq|wq_b|wkv_b)\.weight$"), 0),  # heads (column-parallel)
    (re.compile(r"attn\.wo\.weight$"), 1),  # heads (row-parallel)
    (re.compile(r"ffn\.(shared_experts\.)?(w1|w3)\.weight$"), 0),  # dense MLP / shared expert (column)
    (re.compile(r"ffn\.(shared_experts\.)?w2\.weight$"), 1),  # (row)
    (re.compile(r"ffn\.experts\.(w1|w3)$"), 0),  # one routed expert's I rows
    (re.compile(r"ffn\.experts\.w2$"), 1),
]

_ITEMSIZE = {"F8_E4M3": 1, "F8_E5M2": 1, "U8": 1, "I8": 1, "BF16": 2, "F16": 2, "F32": 4, "I32": 4,
             "F64": 8, "I64": 8}


# ---------------------------------------------------------------------------------------------- checks

def _split_problems(args: ModelArgs, tp: int, ep: int, fp8: bool) -> list[str]:
    problems = []
    if tp > 1:
        widths = {"n_heads": args.n_heads, "vocab_size": args.vocab_size, "moe_inter_dim": args.moe_inter_dim,
                  "shared expert width (n_shared_experts x moe_inter_dim)": args.n_shared_experts * args.moe_inter_dim}
        if args.n_dense_layers:
            widths["inter_dim (dense FFN)"] = args.inter_dim
        problems += [f"{what} {n} is not divisible by --tp {tp}" for what, n in widths.items() if n % tp]
    if ep > 1 and args.n_routed_experts % ep:
        problems.append(f"n_routed_experts {args.n_routed_experts} is not divisible by --ep {ep}")
    if fp8 and tp > 1 and not problems:
        h = args.n_heads // tp
        shards = {"wq_b rows (heads x qk_head_dim)": h * args.qk_head_dim,
                  "wkv_b rows (heads x (qk_nope_head_dim + v_head_dim))": h * (args.qk_nope_head_dim + args.v_head_dim),
                  "wo K (heads x v_head_dim)": h * args.v_head_dim,
                  "routed expert I (moe_inter_dim)": args.moe_inter_dim // tp,
                  "shared expert I": args.n_shared_experts * args.moe_inter_dim // tp}
        if args.n_dense_layers:
            shards["dense FFN I (inter_dim)"] = args.inter_dim // tp
        problems += [f"fp8 shard of {what} is {n} per rank, not a multiple of the {BLOCK}-wide fp8 block"
                     for what, n in shards.items() if n % BLOCK]
    return problems


def check_split(args: ModelArgs, layout: Layout, fp8: bool) -> None:
    """ConfigError (naming every problem and the sizes that work) unless `layout` splits this model cleanly.

    Pure function of the config: every rank reaches the same verdict before any collective runs.
    """
    problems = _split_problems(args, layout.tp, layout.ep, fp8)
    if not problems:
        return
    sizes = [1, 2, 4, 8, 16, 32, 64]
    tps = [t for t in sizes if not _split_problems(args, t, 1, fp8)]
    eps = [e for e in sizes if not _split_problems(args, 1, e, fp8)]
    hint = f"--tp sizes that fit this model: {', '.join(map(str, tps))}; --ep sizes: {', '.join(map(str, eps))}"
    if fp8 and any("fp8" in p for p in problems):
        hint += "; or use --dtype bf16 (bf16 shards need no 128 alignment)"
    raise ConfigError(f"cannot split the model for --tp {layout.tp} --ep {layout.ep}: " + "; ".join(problems)
                      + f". {hint}")


# ------------------------------------------------------------------------------------ checkpoint slices

class ShardPlan:
    """Which slice of each checkpoint tensor this rank reads (memory-mapped), and where it goes."""

    def __init__(self, args: ModelArgs, layout: Layout):
        self.args, self.layout = args, layout
        n_local = args.n_routed_experts // layout.ep
        self.experts = range(layout.ep_rank * n_local, (layout.ep_rank + 1) * n_local)
        self.bytes_read = 0  # what this rank read from the safetensors files
        self.bytes_total = 0  # what the files hold
        self._windowed: set[str] = set()  # fp8 tensors read in whole 128-blocks, trimmed by place()

    def split(self, spec) -> tuple[int, int, int] | None:
        """(dim, start, stop) of this rank's TP slice of the tensor `spec` describes, or None (whole)."""
        if self.layout.tp == 1:
            return None
        for rule, dim in _SPLIT_DIM:
            if rule.search(spec.target):
                per = spec.shape[dim] // self.layout.tp
                start = self.layout.tp_rank * per
                return dim, start, start + per
        return None

    @staticmethod
    def _window(start: int, stop: int, n: int) -> tuple[int, int]:
        """The fp8-block-aligned rows covering [start, stop): a block-scaled tensor is read whole blocks at a time."""
        return start // BLOCK * BLOCK, min(-(-stop // BLOCK) * BLOCK, n)

    def region(self, name: str, spec, shape: tuple, dtype: str):
        """Slices to read for tensor `name` (or its `_scale_inv`); None: not on this rank; (): whole."""
        size = _ITEMSIZE.get(dtype, 4)
        self.bytes_total += math.prod(shape) * size
        if spec is None:
            self.bytes_read += math.prod(shape) * size
            return ()
        if spec.expert is not None and spec.expert not in self.experts:
            return None
        split = self.split(spec)
        if split is None:
            self.bytes_read += math.prod(shape) * size
            return ()
        dim, start, stop = split
        lo, hi = start, stop
        if dtype.startswith("F8") or name.endswith("_scale_inv"):  # block-scaled: read whole blocks
            lo, hi = self._window(start, stop, spec.shape[dim])
            self._windowed.add(name.removesuffix("_scale_inv"))
            if name.endswith("_scale_inv"):
                lo, hi = lo // BLOCK, -(-hi // BLOCK)
        part = list(shape)
        part[dim] = hi - lo
        self.bytes_read += math.prod(part) * size
        return (slice(None),) * dim + (slice(lo, hi),)

    def place(self, name: str, value: torch.Tensor, scale: torch.Tensor | None, spec):
        """Trim a read window to this rank's exact slice; renumber a routed expert to its local index."""
        split = self.split(spec)
        if split is not None:
            dim, start, stop = split
            lo = self._window(start, stop, spec.shape[dim])[0] if name in self._windowed else start
            if scale is not None and (start % BLOCK or (stop % BLOCK and stop != spec.shape[dim])):
                raise CheckpointError(f"{name}: rows [{start}, {stop}) cut fp8 blocks of {BLOCK}; use --dtype bf16 "
                                      f"or a --tp that keeps 128-aligned shards")
            if (start - lo, stop - start) != (0, value.shape[dim]):
                value = value.narrow(dim, start - lo, stop - start).clone()  # drop the window's extra rows
        if spec.expert is not None:
            spec = dataclasses.replace(spec, expert=spec.expert - self.experts.start)
        return value, scale, spec


# ------------------------------------------------------------------------------ module transformations

def _meta(shape, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=like.dtype, device="meta"), requires_grad=False)


def _resize(lin: Linear, out_features: int, in_features: int) -> None:
    lin.out_features, lin.in_features = out_features, in_features
    lin.weight = _meta((out_features, in_features), lin.weight)
    if lin.scale_inv is not None:
        lin.scale_inv = _meta((-(-out_features // lin.block), -(-in_features // lin.block)), lin.scale_inv)


def _row_parallel(lin: Linear, ops, group) -> None:
    """Row-parallel output: partial products summed over the group in fp32, rounded once to x.dtype.

    An fp8 weight takes its partial in fp32 straight from fp8_gemm (act_quant of the fp32 copy of x gives
    the same codes and scales), so TP differs from one device only in the fp32 summation order.
    """
    fp8 = lin.scale_inv is not None
    out_dtype = []

    def widen(module, inputs):
        out_dtype.append(inputs[0].dtype)
        return (inputs[0].float(), *inputs[1:]) if fp8 else None

    def reduce(module, inputs, out):
        return ops.all_reduce(out.float(), group).to(out_dtype.pop())

    lin.register_forward_pre_hook(widen)
    lin.register_forward_hook(reduce)


def _shard_mlp(mlp: MLP, tp: int) -> None:
    """w1/w3 column-parallel, w2 row-parallel (its partial output is reduced by the caller)."""
    inter = mlp.w1.out_features // tp
    _resize(mlp.w1, inter, mlp.w1.in_features)
    _resize(mlp.w3, inter, mlp.w3.in_features)
    _resize(mlp.w2, mlp.w2.out_features, inter)


def _shard_attention(attn: MLA, tp: int, group, ops) -> None:
    attn.n_heads //= tp
    h = attn.n_heads
    q = attn.wq_b if hasattr(attn, "wq_b") else attn.wq
    _resize(q, h * attn.qk_head_dim, q.in_features)
    _resize(attn.wkv_b, h * (attn.qk_nope_head_dim + attn.v_head_dim), attn.wkv_b.in_features)
    _resize(attn.wo, attn.wo.out_features, h * attn.v_head_dim)
    _row_parallel(attn.wo, ops, group)


def _vocab_parallel(model: Transformer, world: World) -> None:
    ops, group, tp, r = model.ops, world.tp_group, world.layout.tp, world.layout.tp_rank
    vocab = model.args.vocab_size // tp
    model.embed.weight = _meta((vocab, model.args.dim), model.embed.weight)
    _resize(model.head, vocab, model.head.in_features)

    def embed_tokens(ids):
        local = ids - r * vocab
        outside = (local < 0) | (local >= vocab)
        e = F.embedding(local.masked_fill(outside, 0), model.embed.weight).masked_fill(outside.unsqueeze(-1), 0)
        return ops.all_reduce(e, group)  # one rank holds each row; the others add zeros (exact)

    def gather_logits(module, inputs, out):  # out: [..., V/tp] -> [..., V]
        lead, v = out.shape[:-1], out.shape[-1]
        local = out.reshape(-1, v)
        n = local.shape[0]
        send = local.unsqueeze(0).expand(tp, n, v).reshape(tp * n, v)  # the same block to every rank
        got = ops.all_to_all(send, [n] * tp, [n] * tp, group)  # [tp * n, v]: block q from rank q
        return got.view(tp, n, v).permute(1, 0, 2).reshape(*lead, tp * v)

    model.embed_tokens = embed_tokens
    model.head.register_forward_hook(gather_logits)


class ParallelMoE(nn.Module):
    """DeepSeekMoE over the TP x EP grid: each EP rank routes its slice of the tokens, dispatches them to the
    experts' owners with all_to_all, combines the weighted outputs (fp32) and all_reduces the [M, D] result."""

    def __init__(self, moe: MoE, world: World):
        super().__init__()
        self.ops, self.world = moe.ops, world
        lay = world.layout
        self.gate, self.experts, self.shared_experts = moe.gate, moe.experts, moe.shared_experts
        self.n_local = moe.experts.w1.shape[0] // lay.ep
        inter = moe.experts.w1.shape[1] // lay.tp
        dim = moe.experts.w1.shape[2]
        for name, shape in (("w1", (self.n_local, inter, dim)), ("w3", (self.n_local, inter, dim)),
                            ("w2", (self.n_local, dim, inter))):
            setattr(self.experts, name, _meta(shape, getattr(self.experts, name)))
            s = getattr(self.experts, name + "_scale_inv")
            if s is not None:
                b = self.experts.block
                setattr(self.experts, name + "_scale_inv",
                        _meta((self.n_local, -(-shape[1] // b), -(-shape[2] // b)), s))
        if lay.tp > 1:
            _shard_mlp(self.shared_experts, lay.tp)  # reduced with the routed output in forward
        self.last_topk_ids = None

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [M, D]
        m, d = x.shape
        lay = self.world.layout
        lo, hi = m * lay.ep_rank // lay.ep, m * (lay.ep_rank + 1) // lay.ep  # this EP rank's tokens
        xc = x[lo:hi]
        if hi > lo:
            weights, ids = self.gate(xc)
        else:
            k = self.gate.args.n_activated_experts
            weights = torch.empty(0, k, dtype=torch.float32, device=x.device)
            ids = torch.empty(0, k, dtype=torch.int64, device=x.device)
        self.last_topk_ids = ids
        e = self.experts
        if lay.ep > 1:
            routed = self._dispatch_combine(xc, weights, ids)
        elif hi > lo:
            routed = self.ops.moe_experts(xc, weights, ids, e.get("w1"), e.get("w2"), e.get("w3")).float()
        out = torch.zeros(m, d, dtype=torch.float32, device=x.device)
        if hi > lo:
            if lay.tp == 1:  # whole experts: round as one device does (routed sum, then + shared, in x.dtype)
                routed = routed.to(x.dtype).float()
            out[lo:hi] = routed + self.shared_experts(xc).float()
        # Sums TP partials (expert and shared I shards) and places every EP rank's token slice.
        return self.ops.all_reduce(out, self.world.group).to(x.dtype).view(shape)

    def _dispatch_combine(self, xc, weights, ids):
        """Routed output [m, D] fp32 for this rank's tokens; their (token, expert) pairs travel to the owners."""
        ops, group, ep = self.ops, self.world.ep_group, self.world.layout.ep
        k = ids.shape[1]
        owner = (ids // self.n_local).flatten()
        order = torch.argsort(owner, stable=True)  # pairs grouped by destination rank
        token = order // k
        send = torch.bincount(owner, minlength=ep)
        recv = ops.all_to_all(send, [1] * ep, [1] * ep, group)
        send_n, recv_n = send.tolist(), recv.tolist()
        x_in = ops.all_to_all(xc[token], recv_n, send_n, group)  # [P, D]
        ids_in = ops.all_to_all((ids.flatten()[order] % self.n_local).contiguous(), recv_n, send_n, group)
        y = x_in
        if x_in.shape[0]:
            e = self.experts
            ones = torch.ones(x_in.shape[0], 1, dtype=torch.float32, device=x_in.device)
            y = self.ops.moe_experts(x_in, ones, ids_in.unsqueeze(1), e.get("w1"), e.get("w2"), e.get("w3"))
        back = ops.all_to_all(y, send_n, recv_n, group)  # each pair's expert output, in `order`
        w = weights.flatten()[order].float().unsqueeze(1)
        out = torch.zeros(xc.shape[0], xc.shape[1], dtype=torch.float32, device=xc.device)
        return out.index_add_(0, token, back.float() * w)


def _broadcast_sampling(ops, world: World) -> None:
    """`sample` runs on every rank (generators stay in step) but rank 0's token is the one all ranks use."""
    base = ops.sample

    def sample(logits, temperature, top_p, generator):
        tok = base(logits.float(), temperature, top_p, generator)
        if not world.is_rank0:
            tok = torch.zeros_like(tok)
        return ops.all_reduce(tok, world.group)

    object.__setattr__(ops, "sample", sample)


def apply(model: Transformer, world: World, fp8: bool) -> ShardPlan:
    """Shard a meta-device Transformer for this rank in place; returns the plan for checkpoint.load_into."""
    lay = world.layout
    check_split(model.args, lay, fp8)
    ops = model.ops
    if lay.tp > 1:
        _vocab_parallel(model, world)
    for block in [*model.layers, *(m.block for m in model.mtp)]:
        if lay.tp > 1:
            _shard_attention(block.attn, lay.tp, world.tp_group, ops)
        if isinstance(block.ffn, MoE):
            block.ffn = ParallelMoE(block.ffn, world)
        elif lay.tp > 1:
            _shard_mlp(block.ffn, lay.tp)
            _row_parallel(block.ffn.w2, ops, world.tp_group)
    if lay.world_size > 1:
        _broadcast_sampling(ops, world)
    return ShardPlan(model.args, lay)


def shard(model: Transformer, layout: Layout, backend, fp8: bool, timeout_s: float = 300.0):
    """Validate the split (before any collective), join the process group, apply: -> (World, ShardPlan).

    `backend` is the registry Backend (its dist_backend and device_type pick the collective library)."""
    check_split(model.args, layout, fp8)
    device_type = backend.device().type  # cpu for a Triton backend under TRITON_INTERPRET=1
    dist_backend = "gloo" if device_type == "cpu" else backend.dist_backend
    world = distributed.init(layout, dist_backend, device_type, timeout_s)
    return world, apply(model, world, fp8)


# ---------------------------------------------------------------------------------------------- memory

def weight_bytes(model: nn.Module) -> int:
    """Bytes of this rank's parameters (its share of the weights)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def latent_cache_bytes(args: ModelArgs, tokens: int, bytes_per_value: int = 2, mtp: bool = False) -> int:
    """Per-rank bytes of the paged latent KV cache for `tokens` cached tokens: (C + R) per token per layer,
    the same on every TP rank (MLA caches one latent shared by all heads, so heads split nothing)."""
    layers = args.n_layers + (args.n_mtp_layers if mtp else 0)
    return tokens * layers * (args.kv_lora_rank + args.qk_rope_head_dim) * bytes_per_value
