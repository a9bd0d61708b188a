"""Where a compiled decode step's time goes: ms a step in a loop, and optionally a cProfile of it.

Usage: python benchmarks/compiled_step.py [--batch 1] [--steps 150] [--profile 25] [--inductor cpp_wrapper=True]
                                         [--model PATH] [--backend cpu] [--threads 1]

It loads the model with compile=True, prefills `--batch` distinct random prompts, and times `--steps` decode steps
through the model's DecodeStep (after 10 warm steps that compile). `--profile N` then profiles 100 more steps and
prints the N entries with the most own time, and the count per step of Inductor's buffer calls
(`empty_strided_<device>`, `reinterpret_tensor`). `--inductor KEY=VALUE` sets `torch._inductor.config.KEY` before
compiling (e.g. `cpp_wrapper=True`, `freezing=True`, `memory_planning=True`): to compare, run each variant in its
own process, alternating, each with its own TORCHINDUCTOR_CACHE_DIR (not every setting is in Inductor's cache
key). Prints one JSON object; docs/performance.md (compiled part) records what it measured.
"""
import argparse
import ast
import cProfile
import io
import json
import pstats
import time

import torch

import deepport
from deepport.bench_step import decoder


def _set_inductor(options: list[str]) -> dict:
    import torch._inductor.config as cfg

    done = {}
    for item in options:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--inductor takes KEY=VALUE, e.g. cpp_wrapper=True; got {item!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        *parents, name = key.split(".")  # e.g. cpp.enable_kernel_profile
        target = cfg
        for part in parents:
            target = getattr(target, part)
        if not hasattr(target, name):
            raise SystemExit(f"torch._inductor.config has no {key!r}")
        setattr(target, name, value)
        done[key] = value
    return done


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", type=int, default=0, metavar="N")
    ap.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    options = _set_inductor(a.inductor)
    m = deepport.load(a.model, backend=a.backend, compile=True)
    step = m.step
    device = m.transformer.embed.weight.device

    def sync():  # a GPU step only launches kernels: time what it runs
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.inference_mode():
        one = decoder(m, a.batch, 8 + 10 + a.steps + (100 if a.profile else 0))  # 8 prompt tokens, 10 warm steps
        t0 = time.perf_counter()
        for _ in range(10):
            one()
        sync()
        warm_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(a.steps):
            one()
        sync()
        out = {"backend": m.backend, "model": str(m.path), "batch": a.batch, "inductor": options,
               "step": step.describe(), "warm_up_s": round(warm_s, 2),
               "step_ms": (time.perf_counter() - t0) / a.steps * 1e3}
        if a.profile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(100):
                one()
            prof.disable()
            stats = pstats.Stats(prof)
            calls = {name: n / 100 for (_, _, name), (n, *_rest) in stats.stats.items()
                     if "_empty_strided_" in name or "_reinterpret_tensor" in name}
            out["calls_per_step"] = {k.strip("<>").split(".")[-1]: v for k, v in calls.items()}
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(a.profile)
            out["profile_top"] = [ln for ln in text.getvalue().splitlines() if ln.strip()][-(a.profile + 1):]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
