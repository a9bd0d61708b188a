"""`deepport bench --compile/--graphs`: decode tok/s eager vs compiled (vs captured), and the host-overhead share.

Host overhead of a decode step, from torch.profiler: the share of the step's wall time covered by no
compute, where compute is any ATen op or compiled (Inductor) kernel the profiler records; what is left is
Python (the model's modules, the backends' op functions, the deepport:: custom-op trampolines, guards) and
dispatch between them. Eager and compiled steps are measured the same way. On an accelerator the device
runs asynchronously, so this is the time the host needs to issue a step.
"""
from __future__ import annotations

import statistics
import time

import torch

from deepport.core.generate import cache_room

_OP_PREFIXES = ("aten::", "cpp_fused", "triton_", "graph_", "cuda")


def _is_op(name: str) -> bool:
    return name.startswith(_OP_PREFIXES) or "cpp_fused" in name or "kernel" in name.lower()


def _union_us(intervals) -> float:
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def decoder(m, batch: int, room: int, prompt_len: int = 8):
    """Decode steps one at a time, as generate() runs them, over `batch` rows prefilled with seeded random ids
    (call it, and what it returns, under torch.inference_mode()): returns one(), which runs a step and returns the
    greedy ids [batch, 1] it fed back. room: the cache's tokens a row; a compiled step compiles one graph per
    cache size, so give the room of the runs whose graph should be measured."""
    t, step = m.transformer, m.step
    device = t.embed.weight.device
    ids = torch.randint(0, t.args.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    rows = list(range(batch))
    cache = step.cache(batch, room) if step is not None else t.new_cache(batch, room)
    for r in rows:
        t(ids[r:r + 1], cache, rows=[r])
    tok = ids[:, -1:]

    def one():
        nonlocal tok
        if step is not None:  # the caller of a step reserves and advances (core/step.py)
            cache.reserve(rows, 1)
            logits = step(tok, cache)[1][:batch, -1]
            cache.advance(rows, 1)
        else:  # the eager forward reserves and advances itself
            logits = t.logits(t(tok, cache)[:, -1])
        tok = logits.argmax(-1, keepdim=True)
        return tok

    one.cache = cache
    return one


def host_overhead(m, batch: int, steps: int = 8, prompt_len: int = 8, max_tokens: int = 0) -> dict:
    """Profile `steps` decode steps of model m (its DecodeStep when it has one): wall ms per step, the
    share of it outside op bodies, and the op-body ms. max_tokens: the cache's room a row (at least what the
    steps need); give the timed runs' room so that a compiled step profiles the graph they ran, not a new one."""
    device = m.transformer.embed.weight.device
    with torch.inference_mode():
        one = decoder(m, batch, max(max_tokens, prompt_len + steps + 2), prompt_len)
        for _ in range(2):  # warm (compiles or captures new shapes)
            one()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        acts = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(steps):
                with torch.profiler.record_function("deepport.decode_step"):
                    one()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    marks = [e for e in events if e.name == "deepport.decode_step"]
    shares, walls, bodies = [], [], []
    for mark in marks:
        a, b = mark.time_range.start, mark.time_range.end
        ops = [(max(e.time_range.start, a), min(e.time_range.end, b)) for e in events
               if e is not mark and _is_op(e.name) and e.time_range.end > a and e.time_range.start < b]
        body = _union_us(ops)
        walls.append((b - a) / 1e3)
        bodies.append(body / 1e3)
        shares.append(1.0 - body / max(b - a, 1e-9))
    return {"step_ms": statistics.median(walls), "op_body_ms": statistics.median(bodies),
            "host_overhead_share": statistics.median(shares), "steps_profiled": len(marks)}


def compare(load, prompts, max_new_tokens: int, repeats: int, graphs: bool) -> dict:
    """Eager vs compiled (vs compiled + graphs with graphs=True): decode tok/s, tokens identical, host share.

    `load(compile=..., graphs=...)` returns a Model; the runs interleave so a busy machine slows both alike."""
    torch._inductor.config.cpp.enable_kernel_profile = True  # compiled kernels appear in the profile
    variants = {"eager": load(compile=False, graphs=False)}
    t0 = time.perf_counter()
    variants["compiled"] = load(compile=True, graphs=False)
    if graphs:
        variants["graphs"] = load(compile=True, graphs=True)
    out: dict = {}
    first: dict = {}
    for name, m in variants.items():  # warm-up: the compiled step's first call compiles
        t1 = time.perf_counter()
        first[name] = m.generate_batch(prompts, max_new_tokens=max_new_tokens)
        out.setdefault(name, {})["first_run_s"] = time.perf_counter() - t1
    out["compiled"]["load_and_compile_s"] = (time.perf_counter() - t0) - out["eager"]["first_run_s"]
    runs = {name: [] for name in variants}
    for _ in range(repeats):
        for name, m in variants.items():
            runs[name].append(m.generate_batch(prompts, max_new_tokens=max_new_tokens)[0].stats["decode_tokens_per_s"])
    batch = len(prompts)
    room = cache_room(prompts, max_new_tokens)  # the timed runs' cache size: profile the graph they ran
    for name, m in variants.items():
        out[name]["decode_tokens_per_s"] = statistics.median(runs[name])
        out[name]["tokens_equal_eager"] = [r.tokens for r in first[name]] == [r.tokens for r in first["eager"]]
        out[name].update(host_overhead(m, batch, max_tokens=room))
        if m.step is not None:
            out[name]["step"] = m.step.describe()
            out[name]["step_report"] = list(m.step.report)
    base = out["eager"]["decode_tokens_per_s"]
    for name in variants:
        out[name]["speedup_vs_eager"] = out[name]["decode_tokens_per_s"] / max(base, 1e-9)
    return out


def print_report(report: dict) -> None:
    c = report["step_compare"]
    for name in ("eager", "compiled", "graphs"):
        if name not in c:
            continue
        r = c[name]
        print(f"{name:<9} decode {r['decode_tokens_per_s']:8.1f} tok/s  x{r['speedup_vs_eager']:.2f}  "
              f"step {r['step_ms']:.2f} ms, host overhead {100 * r['host_overhead_share']:.0f}%  "
              f"tokens==eager {r['tokens_equal_eager']}  first run {r['first_run_s']:.1f} s")
    for line in c.get("compiled", {}).get("step_report", []):
        print(f"  {line}")
