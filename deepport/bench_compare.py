"""`deepport bench --compare transformers`: deepport against transformers' DeepseekV3ForCausalLM, side by side.

Same checkpoint (an FP8 one is converted once to fp32 for transformers, whose fp8 path wants a GPU), same
prompt, batch, new tokens and torch threads; greedy decoding; runs interleaved (deepport, transformers,
deepport, ...) so machine load hits both alike; medians. Also the weight-streaming limit of decode: the
weight bytes one decode step reads divided by the bandwidth of streaming a large tensor once.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from deepport.core import settings
from deepport.core.checkpoint import bf16_of, fp8_codes_of
from deepport.core.errors import DeepportError


def hf_checkpoint(path: Path) -> Path:
    """`path` itself, or (FP8 checkpoints) an fp32 copy made once under DEEPPORT_CACHE."""
    from deepport.core import checkpoint

    args, _ = checkpoint.read_config(path)
    if args.fp8_block is None:
        return path
    out = settings.cache_dir() / f"hf-fp32-{Path(path).resolve().parent.name}-{Path(path).name}"
    if not (out / "config.json").is_file():
        checkpoint.convert(path, out, "fp32")
    return out


def load_transformers(path: Path):
    try:
        from transformers import DeepseekV3ForCausalLM
    except ImportError as e:
        raise DeepportError(f"--compare transformers needs transformers with DeepseekV3 ({e}); "
                            f"pip install 'transformers>=4.57'") from None
    import logging

    logging.getLogger("transformers.modeling_utils").setLevel(logging.ERROR)  # the MTP layer's keys are unused
    return DeepseekV3ForCausalLM.from_pretrained(hf_checkpoint(path), torch_dtype=torch.float32).eval()


@torch.inference_mode()
def hf_generate(hf, rows: list[list[int]], new_tokens: int) -> dict:
    """Greedy decoding with transformers' own KV cache: one batched prefill of the equal-length rows, then one
    step per token."""
    x = torch.tensor(rows)
    batch, n = x.shape
    t0 = time.perf_counter()
    out = hf(input_ids=x, use_cache=True)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    t1 = time.perf_counter()
    past, toks = out.past_key_values, [tok]
    for _ in range(new_tokens - 1):
        out = hf(input_ids=tok, past_key_values=past, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        toks.append(tok)
    t2 = time.perf_counter()
    return {"prefill_tokens_per_s": batch * n / (t1 - t0),
            "decode_tokens_per_s": batch * (new_tokens - 1) / (t2 - t1),
            "tokens": torch.cat(toks, 1).tolist()}


def batch_rows(ids: list[int], batch: int, distinct: bool) -> list[list[int]]:
    """The batch's prompts: `ids` in every row, or (distinct) row r holds ids rotated left by r - the same
    length and tokens, a different sequence, so the rows route to different experts as a real batch does
    (identical rows all pick one token's experts)."""
    if not distinct:
        return [list(ids)] * batch
    return [ids[r % len(ids):] + ids[:r % len(ids)] for r in range(batch)]


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s streamed by reading a large fp32 tensor once (a vectorised sum, at the run's torch threads), best
    of `repeats`: what a weight-bound decode step does. (A copy also writes, which costs more than it moves.)"""
    a = torch.ones(nbytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return a.numel() * a.element_size() / best


def decode_weight_bytes(transformer, batch: int = 1, codes: bool = True) -> int:
    """Weight bytes one decode step of the main model reads: everything but the embedding table (one row
    per token) and the MTP modules, with routed experts counted by the expected number touched by `batch`
    tokens (E * (1 - (1 - k/E)^batch)); codes=True: as the fp8 codes and scales where load kept them for the
    backend's kernels (param.fp8_codes; bf16 values likewise, param.bf16_values), else as the dequantised
    weights (what transformers reads)."""
    a = transformer.args
    total = 0
    for name, p in transformer.named_parameters():
        if name.startswith(("mtp.", "embed.")):
            continue
        nbytes = p.numel() * p.element_size()
        kept = fp8_codes_of(p) if codes else None  # kept by a backend that reads them instead (cpu's C kernels)
        if kept is not None:
            nbytes = kept.weight.numel() * kept.weight.element_size() + kept.scale_inv.numel() * 4
        elif codes and bf16_of(p) is not None:  # bf16 values kept likewise (an FP8 checkpoint's lm_head)
            nbytes = p.numel() * 2
        if ".experts." in name:
            nbytes *= 1 - (1 - a.n_activated_experts / a.n_routed_experts) ** batch
        total += nbytes
    return int(total)


def _ids(model, prompt: str) -> list[int]:
    return model.encode(prompt)


def compare(model, prompt: str, batch: int, new_tokens: int, repeats: int, distinct: bool = False) -> dict:
    """Median prefill/decode tokens/s of deepport (`model`) and transformers, interleaved, and their ratios."""
    rows = batch_rows(_ids(model, prompt), batch, distinct)
    hf = load_transformers(model.path)
    # warm-up with the timed runs' shapes: a compiled step compiles one graph per cache size, so a shorter warm-up
    # left the first timed run compiling (`--compile --repeats 1` read 0.02x so)
    model.generate_batch(rows, max_new_tokens=new_tokens)
    hf_generate(hf, rows, new_tokens)
    dp_runs, hf_runs = [], []
    for _ in range(repeats):
        r = model.generate_batch(rows, max_new_tokens=new_tokens)
        dp_runs.append(dict(r[0].stats, tokens=[x.tokens for x in r]))
        hf_runs.append(hf_generate(hf, rows, new_tokens))
    out = {}
    for side, runs in (("deepport", dp_runs), ("transformers", hf_runs)):
        out[side] = {k: statistics.median(r[k] for r in runs) for k in ("prefill_tokens_per_s", "decode_tokens_per_s")}
    for k in ("prefill", "decode"):
        out[f"{k}_ratio"] = out["deepport"][f"{k}_tokens_per_s"] / out["transformers"][f"{k}_tokens_per_s"]
    out["greedy_tokens_equal"] = all(  # every row (a row may end early at eos on deepport's side)
        d == h[:len(d)] for d, h in zip(dp_runs[0]["tokens"], hf_runs[0]["tokens"]))
    out["distinct_rows"] = distinct
    # codes kept for the backend's kernels (only cpu keeps them) are read by its eager decode of up to MAX_TOKENS
    # rows; a compiled step and larger batches read the dequantised weights
    from deepport.backends.cpu.native import MAX_TOKENS

    codes = model.step is None and batch <= MAX_TOKENS
    touched = batch if distinct else 1  # identical rows: one token's experts
    wbytes = decode_weight_bytes(model.transformer, touched, codes=codes)
    stored = decode_weight_bytes(model.transformer, touched, codes=False)
    bw = read_bandwidth()
    rate = out["deepport"]["decode_tokens_per_s"]
    out["weight_streaming"] = {"decode_weight_bytes_per_step": wbytes, "read_bandwidth_bytes_per_s": bw,
                               "limit_decode_tokens_per_s": batch * bw / wbytes,
                               "deepport_fraction_of_limit": rate * wbytes / (batch * bw),
                               "dequantised_weight_bytes_per_step": stored,
                               "deepport_fraction_of_dequantised_limit": rate * stored / (batch * bw)}
    return out


def print_comparison(report: dict) -> None:
    c = report["compare"]
    d, t = c["deepport"], c["transformers"]
    print(f"{'':<14} {'prefill tok/s':>14} {'decode tok/s':>13}")
    print(f"{'deepport':<14} {d['prefill_tokens_per_s']:>14.1f} {d['decode_tokens_per_s']:>13.1f}"
          + (f"  ({report['deepport_step']})" if report.get("deepport_step", "eager") != "eager" else ""))
    print(f"{'transformers':<14} {t['prefill_tokens_per_s']:>14.1f} {t['decode_tokens_per_s']:>13.1f}")
    print(f"{'ratio':<14} {c['prefill_ratio']:>13.2f}x {c['decode_ratio']:>12.2f}x")
    w = c["weight_streaming"]
    rows = "" if report.get("batch", 1) == 1 else (" (distinct rows)" if c.get("distinct_rows") else
                                                  " (identical rows: one token's experts; --distinct-rows for a real batch)")
    print(f"weight streaming{rows}: {w['decode_weight_bytes_per_step'] / 1e6:.1f} MB read per decode step, read bandwidth "
          f"{w['read_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s -> limit {w['limit_decode_tokens_per_s']:.1f} tok/s; "
          f"deepport at {w['deepport_fraction_of_limit']:.2f} of it")
    if w["dequantised_weight_bytes_per_step"] != w["decode_weight_bytes_per_step"]:
        print(f"  (deepport reads the fp8 codes (and bf16 head) kept for its kernels; the weights as dequantised, "
              f"which transformers reads, are {w['dequantised_weight_bytes_per_step'] / 1e6:.1f} MB a step: "
              f"deepport at {w['deepport_fraction_of_dequantised_limit']:.2f} of that limit)")
    print(f"greedy tokens equal: {c['greedy_tokens_equal']}")
