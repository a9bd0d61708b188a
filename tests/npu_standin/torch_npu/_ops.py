"""Documented semantics of the torch_npu ops deepport calls, with their argument checks and chip limits.

Sources: Ascend/op-plugin docs torch_npu-<op>.md, the aclnn docs (MoeTokenUnpermute), and
shared/reference/hardware_specifics.md section B3. Anything deepport does not call (quant modes, drop
modes, NZ layouts, softmax norm) is refused loudly rather than guessed. Math is fp32, outputs rounded once.
"""
import torch
import torch.nn.functional as F

from torch_npu import npu
from torch_npu._record import record

HALF = (torch.float16, torch.bfloat16)
FLOATS = (torch.float16, torch.bfloat16, torch.float32)
MLA_HEADS = (1, 2, 4, 8, 16, 32, 64, 128)  # query heads allowed in MLA mode (vllm-ascend pads to these)
MASK_SIDE = 2048  # sparse_mode 2/3/4 take an "optimised" 2048x2048 lower-triangular mask


def _fail(op: str, msg: str):
    raise RuntimeError(f"torch_npu stand-in: {op}: {msg}")


def _need(cond: bool, op: str, msg: str) -> None:
    if not cond:
        _fail(op, msg)


def _rms(x, gamma, eps):
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf * rstd * gamma.float(), rstd


def npu_rms_norm(x, gamma, epsilon=1e-6):
    record("npu_rms_norm", (x, gamma), {"epsilon": epsilon})
    op = "npu_rms_norm"
    _need(x.dtype in FLOATS, op, f"x dtype {x.dtype} unsupported (float16, bfloat16, float32)")
    _need(1 <= x.dim() <= 8, op, f"x must have 1 to 8 dims, got {x.dim()}")
    _need(gamma.dtype == x.dtype, op, f"gamma dtype {gamma.dtype} must equal x dtype {x.dtype}")
    _need(gamma.dim() == 1 and gamma.shape[0] == x.shape[-1], op,
          f"gamma {tuple(gamma.shape)} must be [D={x.shape[-1]}]")
    y, rstd = _rms(x, gamma, epsilon)
    return y.to(x.dtype), rstd


def npu_add_rms_norm(x1, x2, gamma, epsilon=1e-6):
    record("npu_add_rms_norm", (x1, x2, gamma), {"epsilon": epsilon})
    op = "npu_add_rms_norm"
    _need(x1.dtype in FLOATS and x2.dtype == x1.dtype, op, f"x1/x2 dtypes {x1.dtype}/{x2.dtype} must match, float")
    _need(x1.shape == x2.shape, op, f"x1 {tuple(x1.shape)} and x2 {tuple(x2.shape)} must have one shape")
    _need(gamma.dtype == x1.dtype and gamma.shape == x1.shape[-1:], op, "gamma must be [D] in x1's dtype")
    x = (x1.float() + x2.float()).to(x1.dtype)  # x_out = x1 + x2 in x's dtype; op-plugin's golden normalises it
    y, rstd = _rms(x, gamma, epsilon)
    return y.to(x1.dtype), rstd, x


def npu_interleave_rope(x, cos, sin):
    record("npu_interleave_rope", (x, cos, sin), {})
    op = "npu_interleave_rope"
    _need(x.dim() == 4, op, f"x must be 4-D (B, N, S, D), got {tuple(x.shape)}")
    _need(x.dtype in HALF, op, f"x dtype {x.dtype} unsupported (bfloat16, float16)")
    _need(cos.dtype == x.dtype and sin.dtype == x.dtype, op, "cos/sin must have x's dtype")
    _need(x.is_contiguous() and cos.is_contiguous() and sin.is_contiguous(), op, "non-contiguous tensors unsupported")
    b, n, s, d = x.shape
    _need(d == 64 and cos.shape[-1] == 64 and sin.shape == cos.shape, op, "x, cos and sin D must all be 64")
    _need(cos.dim() == 4 and cos.shape[0] == b and cos.shape[1] == 1 and cos.shape[2] in (1, s), op,
          f"cos/sin must be (B, 1, S or 1, 64), got {tuple(cos.shape)}")
    # de-interleave the pairs (x0 x1 x2 ... -> x0 x2 ... x1 x3 ...), then rotate-half: output in "half" layout
    xh = x.float().unflatten(-1, (d // 2, 2)).transpose(-1, -2).flatten(-2)
    rot = torch.cat((-xh[..., d // 2:], xh[..., :d // 2]), dim=-1)
    return (xh * cos.float() + rot * sin.float()).to(x.dtype)


def _gating_limits(op, e, k, k_group, group_count, bias, renorm):
    _need(e <= 2048, op, f"expert count {e} > 2048")
    _need(group_count > 0 and e % group_count == 0 and e // group_count > 2, op,
          f"x last dim {e} must split into group_count={group_count} groups of more than 2")
    _need(-(-(e // group_count) // 32) * 32 * group_count <= 2048, op, "32-aligned group size * group_count > 2048")
    _need(1 <= k_group <= group_count, op, f"k_group={k_group} must be in [1, group_count={group_count}]")
    _need(1 <= k <= e // group_count * k_group, op, f"k={k} must be in [1, {e // group_count * k_group}]")
    _need(renorm == 0, op, "renorm must be 0")
    if npu.chip() in ("910B", "910C"):  # A2/A3 doc limits: DeepSeek-V3's values exactly
        _need(e == 256 and 1 <= k <= 32 and k_group == 4 and group_count == 8 and bias is not None, op,
              f"on Ascend {npu.chip()} only 256 experts, k<=32, k_group=4, group_count=8 with bias are supported "
              f"(got {e}, {k}, {k_group}, {group_count}, bias {'set' if bias is not None else 'None'})")


def npu_moe_gating_top_k(x, k, *, bias=None, k_group=1, group_count=1, group_select_mode=0, renorm=0, norm_type=0,
                         out_flag=False, routed_scaling_factor=1.0, eps=1e-20):
    record("npu_moe_gating_top_k", (x, k), dict(bias=bias, k_group=k_group, group_count=group_count,
                                                group_select_mode=group_select_mode, renorm=renorm,
                                                norm_type=norm_type, out_flag=out_flag,
                                                routed_scaling_factor=routed_scaling_factor, eps=eps))
    op = "npu_moe_gating_top_k"
    _need(x.dim() == 2 and x.dtype in FLOATS, op, f"x must be 2-D float, got {tuple(x.shape)} {x.dtype}")
    _need(bias is None or (bias.shape == x.shape[-1:] and bias.dtype == x.dtype), op,
          "bias must be [E] with x's dtype")
    _need(norm_type == 1, op, "the stand-in models norm_type=1 (sigmoid) only, the mode deepport calls")
    _need(group_select_mode in (0, 1), op, f"group_select_mode {group_select_mode} must be 0 or 1")
    m, e = x.shape
    _gating_limits(op, e, k, k_group, group_count, bias, renorm)
    score = torch.sigmoid(x.float())
    sel = score + (bias.float() if bias is not None else 0.0)  # bias: selection only
    grouped = sel.view(m, group_count, -1)
    if group_select_mode == 1:
        gscore = grouped.topk(2, dim=-1).values.sum(-1)
    else:
        gscore = grouped.amax(-1)
    keep = gscore.topk(k_group, dim=-1).indices
    drop = torch.ones(m, group_count, dtype=torch.bool).scatter_(1, keep, False)
    sel = grouped.masked_fill(drop.unsqueeze(-1), float("-inf")).flatten(1)
    idx = sel.topk(k, dim=-1).indices
    y = score.gather(1, idx)  # weights from the unbiased sigmoid scores, always renormalised for sigmoid
    y = y / (y.sum(-1, keepdim=True) + eps) * routed_scaling_factor
    norm_out = score.to(x.dtype) if out_flag else torch.empty(0, dtype=x.dtype)  # normOut only with out_flag
    return y.to(x.dtype), idx.to(torch.int32), norm_out


def npu_moe_init_routing_v2(x, expert_idx, *, scale=None, offset=None, active_num=-1, expert_capacity=-1,
                            expert_num=-1, drop_pad_mode=0, expert_tokens_num_type=0, expert_tokens_num_flag=False,
                            quant_mode=0, active_expert_range=[], row_idx_type=0):  # noqa: B006 (schema default)
    record("npu_moe_init_routing_v2", (x, expert_idx), dict(
        scale=scale, offset=offset, active_num=active_num, expert_capacity=expert_capacity, expert_num=expert_num,
        drop_pad_mode=drop_pad_mode, expert_tokens_num_type=expert_tokens_num_type,
        expert_tokens_num_flag=expert_tokens_num_flag, quant_mode=quant_mode,
        active_expert_range=list(active_expert_range), row_idx_type=row_idx_type))
    op = "npu_moe_init_routing_v2"
    _need(x.dim() == 2 and x.dtype in FLOATS, op, f"x must be 2-D (NUM_ROWS, H) float, got {tuple(x.shape)}")
    _need(expert_idx.dim() == 2 and expert_idx.dtype == torch.int32 and expert_idx.shape[0] == x.shape[0], op,
          f"expert_idx must be int32 (NUM_ROWS, K), got {tuple(expert_idx.shape)} {expert_idx.dtype}")
    _need(drop_pad_mode == 0, op, "the stand-in models dropless mode (drop_pad_mode=0) only")
    _need(quant_mode == -1 and scale is None and offset is None, op,
          "the stand-in models quant_mode=-1 (no quant) only")
    _need(expert_tokens_num_type in (0, 1), op, "expert_tokens_num_type must be 0 (cumsum) or 1 (count)")
    _need(row_idx_type in (0, 1), op, "row_idx_type must be 0 (gather) or 1 (scatter)")
    _need(expert_num > 0, op, "expert_num must be given")
    first, last = active_expert_range if active_expert_range else (0, expert_num)
    _need(0 <= first < last <= expert_num, op, f"active_expert_range {active_expert_range} outside [0, {expert_num}]")
    rows, k = expert_idx.shape
    n = rows * k
    _need(active_num in (-1, n) or active_num > 0, op, f"active_num {active_num} invalid")
    flat = expert_idx.flatten().long()
    inside = (flat >= first) & (flat < last)
    key = torch.where(inside, flat, torch.full_like(flat, last))  # out-of-range pairs sort last and are dropped
    sorted_row_idx = torch.argsort(key, stable=True)
    n_valid = int(inside.sum())
    take = sorted_row_idx[:n_valid]
    expanded_x = x[take // k]
    if row_idx_type == 0:  # gather index: expanded_row_idx[pair] = its row in expanded_x, -1 if dropped
        expanded_row_idx = torch.full((n,), -1, dtype=torch.int32)
        expanded_row_idx[take] = torch.arange(n_valid, dtype=torch.int32)
    else:
        expanded_row_idx = sorted_row_idx.to(torch.int32)
    counts = torch.bincount(flat[inside] - first, minlength=last - first)
    tokens = counts if expert_tokens_num_type == 1 else counts.cumsum(0)
    if not expert_tokens_num_flag:
        tokens = torch.empty(0, dtype=torch.int64)
    return expanded_x, expanded_row_idx, tokens.to(torch.int64), torch.empty(0, dtype=torch.float32)


def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None, antiquant_offset=None,
                       per_token_scale=None, group_list=None, activation_input=None, activation_quant_scale=None,
                       activation_quant_offset=None, split_item=0, group_type=None, group_list_type=0, act_type=0,
                       output_dtype=None, tuning_config=None):
    record("npu_grouped_matmul", (x, weight), dict(
        bias=bias, scale=scale, per_token_scale=per_token_scale, group_list=group_list, split_item=split_item,
        group_type=group_type, group_list_type=group_list_type, act_type=act_type, output_dtype=output_dtype))
    op = "npu_grouped_matmul"
    _need(isinstance(x, (list, tuple)) and isinstance(weight, (list, tuple)), op, "x and weight are lists of tensors")
    _need(all(v is None for v in (bias, scale, offset, antiquant_scale, antiquant_offset, per_token_scale)), op,
          "the stand-in models the unquantised, bias-free form only")
    _need(act_type == 0, op, "the stand-in models act_type=0 only")
    _need(split_item in (2, 3) and group_type == 0, op,
          "the stand-in models the MoE form: split_item=2/3 (one output), group_type=0 (group along M)")
    _need(len(x) == 1 and len(weight) == 1 and weight[0].dim() == 3, op, "MoE form: x=[X (M, K)], weight=[W (E, K, N)]")
    xx, w = x[0], weight[0]
    _need(xx.dtype in HALF and w.dtype == xx.dtype, op,
          f"x/weight dtypes {xx.dtype}/{w.dtype}: bfloat16 or float16, equal")
    e, kdim, ndim = w.shape
    _need(xx.dim() == 2 and xx.shape[1] == kdim, op, f"x {tuple(xx.shape)} does not match weight (E, K={kdim}, N)")
    _need(group_list is not None and group_list.dim() == 1 and group_list.shape[0] == e, op,
          f"group_list must be 1-D with E={e} entries")
    _need(group_list_type in (0, 1), op, "group_list_type must be 0 (cumsum) or 1 (count)")
    _need(e <= 1024, op, f"{e} groups: at most 1024")
    _need(max(kdim, ndim, xx.shape[1]) < 65536, op, "inner dimension reaches the 65536 limit")
    _need(xx.is_contiguous(), op, "x must not be transposed (weight may be)")
    ends = group_list.long() if group_list_type == 0 else group_list.long().cumsum(0)
    _need(bool((ends[1:] >= ends[:-1]).all()) and bool((group_list >= 0).all()), op, "group_list must be non-negative")
    _need(int(ends[-1]) == xx.shape[0], op, f"group_list covers {int(ends[-1])} rows, x has {xx.shape[0]}")
    out = torch.zeros(xx.shape[0], ndim, dtype=output_dtype or xx.dtype)
    start = 0
    for g, end in enumerate(ends.tolist()):
        if end > start:
            out[start:end] = (xx[start:end].float() @ w[g].float()).to(out.dtype)
        start = end
    return [out]


def npu_swiglu(x, dim=-1):
    record("npu_swiglu", (x,), {"dim": dim})
    op = "npu_swiglu"
    _need(x.dtype in FLOATS, op, f"x dtype {x.dtype} unsupported")
    _need(x.shape[dim] % 2 == 0, op, f"x.shape[{dim}]={x.shape[dim]} must be even")
    gate, up = x.float().chunk(2, dim=dim)  # gate first, matching a [gate ; up] concatenation
    return (F.silu(gate) * up).to(x.dtype)


def npu_moe_token_unpermute(permuted_tokens, sorted_indices, probs=None, padded_mode=False, restore_shape=None):
    record("npu_moe_token_unpermute", (permuted_tokens, sorted_indices),
           dict(probs=probs, padded_mode=padded_mode, restore_shape=restore_shape))
    op = "npu_moe_token_unpermute"
    _need(not padded_mode, op, "padded_mode=True is unsupported")
    _need(permuted_tokens.dtype in FLOATS, op, f"permuted_tokens dtype {permuted_tokens.dtype} unsupported")
    _need(sorted_indices.dim() == 1 and sorted_indices.dtype == torch.int32, op, "sorted_indices must be 1-D int32")
    n = sorted_indices.shape[0]
    k = 1 if probs is None else probs.shape[1]
    _need(probs is None or (probs.dim() == 2 and probs.numel() == n and probs.dtype == permuted_tokens.dtype), op,
          f"probs must be (tokens, topk) with tokens*topk={n} and permuted_tokens' dtype")
    _need(bool((sorted_indices >= 0).all()) and int(sorted_indices.max()) < permuted_tokens.shape[0], op,
          "sorted_indices out of range of permuted_tokens")
    rows = permuted_tokens.float()[sorted_indices.long()]  # T'[i] = T[S[i]]
    if probs is not None:
        rows = rows * probs.float().reshape(-1, 1)
    return rows.view(n // k, k, -1).sum(1).to(permuted_tokens.dtype)


def npu_fused_infer_attention_score(query, key, value, *, pse_shift=None, atten_mask=None, actual_seq_lengths=None,
                                    actual_seq_lengths_kv=None, block_table=None, query_rope=None, key_rope=None,
                                    num_heads=1, scale=1.0, pre_tokens=2147483647, next_tokens=2147483647,
                                    input_layout="BSH", num_key_value_heads=0, sparse_mode=0, inner_precise=0,
                                    block_size=0, antiquant_mode=0, softmax_lse_flag=False, **quant):
    record("npu_fused_infer_attention_score", (query, key, value), dict(
        pse_shift=pse_shift, atten_mask=atten_mask, actual_seq_lengths=actual_seq_lengths,
        actual_seq_lengths_kv=actual_seq_lengths_kv, block_table=block_table, query_rope=query_rope,
        key_rope=key_rope, num_heads=num_heads, scale=scale, input_layout=input_layout,
        num_key_value_heads=num_key_value_heads, sparse_mode=sparse_mode, block_size=block_size,
        softmax_lse_flag=softmax_lse_flag, **quant))
    op = "npu_fused_infer_attention_score"
    _need(pse_shift is None and not any(v is not None for v in quant.values()), op,
          "pse / quantisation / prefix arguments are not modelled by the stand-in")
    _need(not softmax_lse_flag, op, "the stand-in models softmax_lse_flag=False only")
    _need((query_rope is None) == (key_rope is None), op, "query_rope and key_rope must be given together")
    if query_rope is not None:
        out = _mla_paged(op, query, key, value, query_rope, key_rope, atten_mask, actual_seq_lengths,
                         actual_seq_lengths_kv, block_table, num_heads, scale, input_layout, num_key_value_heads,
                         sparse_mode, block_size)
    else:
        out = _tnd(op, query, key, value, atten_mask, actual_seq_lengths, actual_seq_lengths_kv, block_table,
                   num_heads, scale, input_layout, num_key_value_heads, sparse_mode)
    return out, torch.zeros(1, dtype=torch.float32)


def _check_mask(op, sparse_mode, atten_mask, s):
    if s == 1:
        _need(sparse_mode == 0 and atten_mask is None, op, "Q_S=1 with rope: sparse_mode=0 and no atten_mask")
        return
    _need(sparse_mode in (0, 3), op, f"sparse_mode {sparse_mode}: only 0 (no mask) or 3 (rightDownCausal) modelled")
    if sparse_mode == 3:
        _need(atten_mask is not None and tuple(atten_mask.shape[-2:]) == (MASK_SIDE, MASK_SIDE)
              and atten_mask.dtype in (torch.bool, torch.int8, torch.uint8), op,
              "sparse_mode=3 needs the optimised 2048x2048 bool/int8 lower-triangular atten_mask")
        ref = torch.triu(torch.ones(MASK_SIDE, MASK_SIDE, dtype=torch.bool), diagonal=1)
        _need(bool((atten_mask.reshape(MASK_SIDE, MASK_SIDE).bool() == ref).all()), op,
              "atten_mask must be 1 strictly above the diagonal (1 = masked out)")
    else:
        _need(atten_mask is None, op, "sparse_mode=0 is modelled without a mask only")


def _attend(q, k, v, scale, causal, extra=None):
    """q [S, N, D], k [L, D'], v [L, Dv] shared by all heads (MLA) or k [L, N, D], v [L, N, Dv]."""
    if k.dim() == 2:
        scores = torch.einsum("snd,ld->snl", q.float(), k.float())
    else:
        scores = torch.einsum("snd,lnd->snl", q.float(), k.float())
    if extra is not None:
        scores = scores + extra
    scores = scores * scale
    s, length = q.shape[0], k.shape[0]
    if causal:  # rightDownCausal: query i sees keys j <= L - S + i
        i = torch.arange(s).view(s, 1, 1)
        j = torch.arange(length).view(1, 1, length)
        scores = scores.masked_fill(j > length - s + i, float("-inf"))
    p = scores.softmax(-1)
    return torch.einsum("snl,lv->snv", p, v.float()) if v.dim() == 2 else torch.einsum("snl,lnv->snv", p, v.float())


def _mla_paged(op, query, key, value, query_rope, key_rope, atten_mask, actual_seq_lengths, actual_seq_lengths_kv,
               block_table, num_heads, scale, input_layout, num_key_value_heads, sparse_mode, block_size):
    _need(input_layout == "BSND", op, f"the stand-in models MLA mode with input_layout BSND only, got {input_layout}")
    _need(query.dtype in HALF and key.dtype == query.dtype and query_rope.dtype == query.dtype
          and key_rope.dtype == key.dtype, op, "MLA mode: query/key/rope tensors must share float16/bfloat16")
    _need(query.is_contiguous() and query_rope.is_contiguous() and key.is_contiguous(), op, "non-contiguous input")
    b, s, n, d = query.shape
    _need(d == 512 and query_rope.shape == (b, s, n, 64), op, "MLA mode: query d must be 512, query_rope d 64")
    _need(1 <= s <= 16, op, f"MLA mode: query S must be 1..16, got {s}")
    _need(n == num_heads and n in MLA_HEADS, op,
          f"MLA mode: query heads {n} (num_heads={num_heads}) not in {MLA_HEADS}")
    _need(num_key_value_heads == 1, op, "MLA mode: num_key_value_heads must be 1")
    _need(key is value or torch.equal(key, value), op, "MLA mode: key and value are the same latent cache")
    _need(block_table is not None and block_table.dtype == torch.int32 and block_table.dim() == 2
          and block_table.shape[0] == b, op, "MLA mode needs PageAttention: block_table int32 (B, max_blocks)")
    _need(key.dim() == 3 and key.shape[1] == block_size and key.shape[2] == 512, op,
          f"paged cache must be (blocknum, block_size={block_size}, 512), got {tuple(key.shape)}")
    _need(key_rope.shape == key.shape[:2] + (64,), op, "key_rope must be (blocknum, block_size, 64)")
    _need(block_size % 16 == 0 and 0 < block_size <= 1024, op, f"block_size {block_size}: multiple of 16, at most 1024")
    _need(actual_seq_lengths_kv is not None and len(actual_seq_lengths_kv) == b, op,
          "PageAttention needs actual_seq_lengths_kv with one length per batch")
    _check_mask(op, sparse_mode, atten_mask, s)
    out = torch.empty(b, s, n, d, dtype=torch.float32)
    for i, length in enumerate(actual_seq_lengths_kv):
        nblk = -(-int(length) // block_size)
        _need(nblk <= block_table.shape[1], op, f"batch {i}: {length} tokens need more than the table's blocks")
        ids = block_table[i, :nblk].long()
        ckv = key[ids].flatten(0, 1)[:length]
        kpe = key_rope[ids].flatten(0, 1)[:length]
        extra = torch.einsum("snr,lr->snl", query_rope[i].float(), kpe.float())
        out[i] = _attend(query[i], ckv, ckv, scale, causal=sparse_mode == 3, extra=extra)
    return out.to(query.dtype)


def _tnd(op, query, key, value, atten_mask, actual_seq_lengths, actual_seq_lengths_kv, block_table, num_heads, scale,
         input_layout, num_key_value_heads, sparse_mode):
    _need(input_layout == "TND", op, "the stand-in models the rope-free path with input_layout TND only")
    _need(block_table is None, op, "TND with D != 512: page attention is unsupported")
    _need(query.dtype == torch.bfloat16 and key.dtype == query.dtype and value.dtype == query.dtype, op,
          "TND with D != 512: bfloat16 only")
    tq, n, d = query.shape
    _need(d == 192 and key.shape[1:] == (n, 192) and value.shape[1] == n and value.shape[2] in (128, 192), op,
          f"TND without rope: Q_D = K_D = 192 and V_D 128 or 192, got {d}, {key.shape[-1]}, {value.shape[-1]}")
    _need(num_heads == n and num_key_value_heads in (0, n), op, "TND: Q_N, K_N and V_N must be equal")
    _need(actual_seq_lengths is not None and actual_seq_lengths_kv is not None
          and len(actual_seq_lengths) == len(actual_seq_lengths_kv) <= 4096, op,
          "TND: actual_seq_lengths and actual_seq_lengths_kv (cumulative, at most 4096) are required")
    _need(list(actual_seq_lengths)[-1] == tq and list(actual_seq_lengths_kv)[-1] == key.shape[0], op,
          "TND: the last cumulative length must equal T")
    _need(tq <= 1 << 20, op, "TND: T must be at most 1M")
    _need(sparse_mode in (0, 3), op, "TND: sparse_mode 0 (no mask) or 3 (with mask) only")
    _check_mask(op, sparse_mode, atten_mask, 2)
    out = torch.empty(tq, n, value.shape[2], dtype=torch.float32)
    q0 = k0 = 0
    for q1, k1 in zip(actual_seq_lengths, actual_seq_lengths_kv):
        _need(q1 >= q0 and k1 >= k0, op, "cumulative lengths must not decrease")
        if sparse_mode == 3:
            _need(q1 - q0 <= k1 - k0, op, "sparse_mode=3: each batch needs actual_seq_lengths <= actual_seq_lengths_kv")
        out[q0:q1] = _attend(query[q0:q1], key[k0:k1], value[k0:k1], scale, causal=sparse_mode == 3)
        q0, k0 = q1, k1
    return out.to(query.dtype)
