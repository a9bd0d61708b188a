"""Ahead-of-time compile checks with no GPU (python -m deepport.kernels.compile_check [--launch]).

Two checks, both run without TRITON_INTERPRET (the kernels must be real JITFunctions):

- specs (default): every kernel module's CompileSpecs for sm_90, gfx942 and gfx950, with the instructions
  their assembly must (or must not) contain.
- launch (--launch): every config of every op in the backend's tuning.json for the section a target reads,
  compiled exactly as the host wrapper launches it, for sm_80 (bf16 only: fp8 is refused), sm_89, sm_90,
  sm_100, gfx942 and gfx950; the shared memory / LDS the compiled kernel needs is checked against the
  target's per-block limit, and registers and spills are read from ptxas -v (cuda) or the AMDGCN kernel
  metadata (hip). A config that does not compile or needs more shared memory than a block may have cannot
  launch on that target (exit code 1); spills are reported (they cost speed, not correctness).

Results print as JSON. tests/test_compile_targets.py runs this in a subprocess. docs/backends/launch_limits.md,
the table of what launches where, is generated (never hand-edited) by
    python -m deepport.kernels.compile_check --launch --json docs/backends/launch_limits.json \\
        --markdown docs/backends/launch_limits.md
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import sys
import time
from pathlib import Path

from deepport import json_out

# name -> GPUTarget(backend, arch, warp size)
TARGETS = {"cuda:80": ("cuda", 80, 32), "cuda:89": ("cuda", 89, 32), "cuda:90": ("cuda", 90, 32),
           "cuda:100": ("cuda", 100, 32), "hip:gfx942": ("hip", "gfx942", 64), "hip:gfx950": ("hip", "gfx950", 64)}
SPEC_TARGETS = ("cuda:90", "hip:gfx942", "hip:gfx950")  # the assembly patterns of compile_specs are written for these
# Per-block shared memory (cuda: the opt-in maximum of dynamic shared memory) / LDS per workgroup, in bytes.
SHARED_LIMIT = {"cuda:80": 166912, "cuda:89": 101376, "cuda:90": 232448, "cuda:100": 232448,
                "hip:gfx942": 65536, "hip:gfx950": 163840}
# Which backend's tuning.json, and which arch string its sections are matched against (backends/*/ops.py).
TUNING_OF = {"cuda:80": ("cuda", "sm80"), "cuda:89": ("cuda", "sm89"), "cuda:90": ("cuda", "sm90"),
             "cuda:100": ("cuda", "sm100"), "hip:gfx942": ("rocm", "gfx942"), "hip:gfx950": ("rocm", "gfx950")}
# Kernel modules each tuned op launches (moe_experts sorts its pairs with moe_align at the config's BLOCK_M).
OP_MODULES = {"moe_experts": ("moe_experts", "moe_align")}


def _target(name):
    from triton.backends.compiler import GPUTarget

    return GPUTarget(*TARGETS[name])


def _resource_usage(target, compiled, ptxas_log: str) -> dict:
    """Shared memory (bytes), registers and spills of one compiled kernel."""
    usage = {"shared": int(compiled.metadata.shared)}
    if target.backend == "cuda":
        m = re.search(r"Used (\d+) registers", ptxas_log)
        s = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
        if m:
            usage["registers"] = int(m.group(1))
        if s:
            usage["stack"], usage["spill_stores"], usage["spill_loads"] = (int(g) for g in s.groups())
    else:
        asm = compiled.asm.get("amdgcn", "")
        asm = asm.decode(errors="replace") if isinstance(asm, bytes) else asm
        for key, pat in (("vgprs", r"; NumVgprs: (\d+)"), ("agprs", r"; NumAgprs: (\d+)"),
                         ("sgprs", r"; TotalNumSgprs: (\d+)"), ("scratch", r"; ScratchSize: (\d+)"),
                         ("vgpr_spills", r"\.vgpr_spill_count:\s*(\d+)"), ("sgpr_spills", r"\.sgpr_spill_count:\s*(\d+)"),
                         ("occupancy", r"; Occupancy: (\d+)")):
            m = re.search(pat, asm)
            if m:
                usage[key] = int(m.group(1))
    return usage


def spilled(usage: dict) -> int:
    """What spilled to memory: bytes of spill stores (cuda, ptxas -v) or VGPRs spilled to scratch (hip); 0 if none.

    SGPR spills on AMD go to VGPR lanes, not to memory; they are reported (usage["sgpr_spills"]) but not counted."""
    return usage.get("spill_stores", 0) + usage.get("vgpr_spills", 0)


def compile_spec(spec, target) -> dict:
    import triton
    from triton.compiler import ASTSource

    from deepport.kernels.targets import asm_kind

    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        src = ASTSource(spec.kernel, spec.signature, spec.constexprs)
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v here
            compiled = triton.compile(src, target=target, options=dict(spec.options))
    except Exception as e:  # reported, not raised: one failing kernel must not hide the others
        return {"ok": False, "error": f"{type(e).__name__}: {str(e).strip()[:2000]}",
                "seconds": round(time.perf_counter() - t0, 2)}
    asm = compiled.asm.get(asm_kind(target), "")
    if isinstance(asm, bytes):
        asm = asm.decode(errors="replace")
    found = {p: bool(re.search(p, asm)) for p in spec.expect}
    forbidden = {p: bool(re.search(p, asm)) for p in spec.forbid}
    return {"ok": True, "expect": found, "forbid": forbidden, "binary": sorted(k for k in compiled.asm if k in ("cubin", "hsaco")),
            "usage": _resource_usage(target, compiled, log.getvalue()), "seconds": round(time.perf_counter() - t0, 2)}


def run(target_names, modules=None) -> dict:
    """The specs check: each module's compile_specs for each target."""
    import deepport.kernels as kernels

    results = {}
    for name in target_names:
        target = _target(name)
        for mod in kernels.kernel_modules():
            short = mod.__name__.rsplit(".", 1)[1]
            if modules and short not in modules:
                continue
            try:
                specs = mod.compile_specs(target)
            except Exception as e:
                results[f"{name}/{short}"] = {"ok": False, "error": f"compile_specs: {type(e).__name__}: {e}"}
                continue
            for spec in specs:
                results[f"{name}/{short}/{spec.name}"] = compile_spec(spec, target)
    return results


# ---- launch checks: every tuning config, compiled as the host wrappers launch it ----

def tuning_for(target_name):
    """The Tuning a backend reads on this target (its tuning.json, the arch's section over "default")."""
    from deepport.kernels.tuning import Tuning

    backend, arch = TUNING_OF[target_name]
    path = Path(__file__).resolve().parents[1] / "backends" / backend / "tuning.json"
    return Tuning.load(path, arch)


def config_spec(op: str, spec, config: dict):
    """The CompileSpec `spec` with `config` applied the way the host wrapper of `op` applies it."""
    from dataclasses import replace

    from deepport.kernels.tuning import split_config

    constexprs, options = split_config(config)
    kernel_consts = {k: v for k, v in constexprs.items() if spec.signature.get(k) == "constexpr"}
    name = spec.name
    if op == "moe_experts" and spec.constexprs.get("FP8"):
        kernel_consts.pop("BLOCK_K", None)  # fp8 experts step K by the 128-wide scale block, whatever the config says
    if name.startswith("mla_decode_combine"):  # launched with the config's num_warps and the widest split count
        kernel_consts = {"BLOCK_SPLITS": max(2, 1 << (constexprs.get("MAX_SPLITS", 16) - 1).bit_length())}
        options = {"num_warps": options.get("num_warps", 4)}
    elif name.startswith("moe_align"):  # only the row padding comes from moe_experts' config
        kernel_consts = {"BLOCK_M": constexprs["BLOCK_M"]} if "BLOCK_M" in constexprs else {}
        options = dict(spec.options)
    else:
        options = {**{k: v for k, v in spec.options.items() if k not in ("num_warps", "num_stages")}, **options}
    return replace(spec, constexprs={**spec.constexprs, **kernel_consts}, options=options)


def launch_specs(target_name):
    """(op, config index, config, CompileSpec | None, refusal) for every config of every tuned op on the target."""
    import importlib

    from deepport.core.errors import DeepportError

    target = _target(target_name)
    tuning = tuning_for(target_name)
    out = []
    for op in sorted(tuning.ops):
        specs, refusals = [], []
        for mod_name in OP_MODULES.get(op, (op,)):
            mod = importlib.import_module(f"deepport.kernels.{mod_name}")
            try:
                specs += mod.compile_specs(target)
            except DeepportError as e:  # the dtype policy refuses fp8 here (sm_80): keep the module's bf16 kernels
                refusals.append(str(e))
                specs += [s for s in _fp8_sibling_specs(mod, target) if not _has_fp8_operand(s)]
        for i, config in enumerate(tuning.ops[op]):
            if not specs:
                out.append((op, i, config, None, "; ".join(refusals)))
            for spec in specs:
                out.append((op, i, config, config_spec(op, spec, config), None))
    return out


def _fp8_sibling_specs(mod, target) -> list:
    """The specs of a target of the same backend that has fp8 (sm_89 for cuda), for their bf16 kernels."""
    from triton.backends.compiler import GPUTarget

    if target.backend != "cuda":
        return []
    return mod.compile_specs(GPUTarget("cuda", 89, target.warp_size))


def _has_fp8_operand(spec) -> bool:
    return any(str(t).lstrip("*").startswith("fp8") for t in spec.signature.values())


def _cache_key(spec, target_name) -> str:
    import triton

    ident = json.dumps([target_name, spec.kernel.cache_key, spec.signature, spec.constexprs, spec.options,
                        triton.__version__], sort_keys=True, default=str)
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def verdict(r: dict, target_name: str) -> dict:
    """Whether a compiled config can launch on the target (compiled, shared memory / LDS within the per-block
    limit) and what it spills; a spill slows a kernel down but does not stop it launching."""
    r = {k: v for k, v in r.items() if k not in ("expect", "forbid", "launches", "problems", "spill", "shared_limit")}
    if not r["ok"]:
        return {**r, "launches": False, "problems": [r["error"]], "spill": 0}
    limit, u = SHARED_LIMIT[target_name], r["usage"]
    problems = []
    if u["shared"] > limit:
        problems.append(f"needs {u['shared']} bytes of shared memory, the per-block limit is {limit}")
    return {**r, "shared_limit": limit, "launches": not problems, "problems": problems, "spill": spilled(u)}


def check_launch(spec, target_name, cache_dir: Path | None = None) -> dict:
    """Compile one config's spec and judge it (verdict); `cache_dir` keeps compile results between runs."""
    path = cache_dir / f"{_cache_key(spec, target_name)}.json" if cache_dir else None
    if path and path.exists():
        return {**verdict(json.loads(path.read_text()), target_name), "cached": True}
    r = compile_spec(spec, _target(target_name))
    if path and r["ok"]:  # a toolchain failure is not cached: it may be fixed by installing the tool
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({k: v for k, v in r.items() if k not in ("expect", "forbid")}))
    return verdict(r, target_name)


def run_launch(target_names, ops=None, configs=None, cache_dir: Path | None = None) -> dict:
    """The launch check: results keyed "target/op/config index/spec name" ("target/op/index" when refused)."""
    results = {}
    for name in target_names:
        for op, i, config, spec, refusal in launch_specs(name):
            if (ops and op not in ops) or (configs is not None and i not in configs):
                continue
            if spec is None:
                results[f"{name}/{op}/{i}"] = {"ok": True, "launches": None, "refused": refusal, "config": config}
                continue
            r = check_launch(spec, name, cache_dir)
            results[f"{name}/{op}/{i}/{spec.name}"] = {**r, "config": config}
    return results


def launch_good(results: dict) -> bool:
    """Every checked config launches (a refusal by the dtype policy, e.g. fp8 on sm_80, is not a failure)."""
    return all(r.get("refused") or r.get("launches") for r in results.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", action="append", choices=sorted(TARGETS),
                    help=f"default: {', '.join(SPEC_TARGETS)} (specs) or all (--launch)")
    ap.add_argument("--module", action="append", help="kernel module names (specs check; default: all)")
    ap.add_argument("--launch", action="store_true", help="check every tuning config of every op instead")
    ap.add_argument("--op", action="append", help="tuned op names (--launch; default: all)")
    ap.add_argument("--config", action="append", type=int, help="config indices (--launch; default: all)")
    ap.add_argument("--cache", default=None, metavar="DIR",
                    help="--launch: reuse results of identical compiles (kernel source, config, target, triton)")
    json_out.add_json_argument(ap, "--launch: the launch table (docs/backends/launch_limits.json)")
    ap.add_argument("--markdown", default=None, metavar="FILE", help="--launch: write the table of what launches "
                    "where (docs/backends/launch_limits.md)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
        print("compile_check needs real JITFunctions: run it with TRITON_INTERPRET unset", file=sys.stderr)
        return 2
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v's report (registers, spills) comes back on stdout
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # a Triton cache hit would skip ptxas and lose that report
    if args.json and not args.launch:
        ap.error("--json writes the launch table: add --launch")
    with json_out.stdout_reserved(args.json):  # a bare --json: the table alone on stdout, the results on stderr
        if args.launch:
            results = run_launch(args.target or sorted(TARGETS), args.op, args.config,
                                 Path(args.cache) if args.cache else None)
            good = launch_good(results)
            if args.json or args.markdown:
                from deepport.kernels import launch_table

                doc = launch_table.document(results)
                json_out.emit_json(doc, args.json, indent=1)
                if args.markdown:
                    Path(args.markdown).write_text(launch_table.markdown(doc))
        else:
            results = run(args.target or SPEC_TARGETS, args.module)
            good = all(r["ok"] and all(r.get("expect", {}).values()) and not any(r.get("forbid", {}).values())
                       for r in results.values())
        print(json.dumps(results, indent=1))
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
