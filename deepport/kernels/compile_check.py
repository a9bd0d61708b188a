"""Ahead-of-time compile every kernel's CompileSpecs for GPU targets, with no GPU (python -m deepport.kernels.compile_check).

Run without TRITON_INTERPRET (the kernels must be real JITFunctions); tests/test_compile_targets.py runs it
in a subprocess and checks the JSON it prints: per target and spec, ok/error and the expected patterns found.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

TARGETS = {"cuda:90": ("cuda", 90, 32), "hip:gfx942": ("hip", "gfx942", 64), "hip:gfx950": ("hip", "gfx950", 64)}


def compile_spec(spec, target) -> dict:
    import triton
    from triton.compiler import ASTSource

    from deepport.kernels.targets import asm_kind

    t0 = time.perf_counter()
    try:
        src = ASTSource(spec.kernel, spec.signature, spec.constexprs)
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
            "seconds": round(time.perf_counter() - t0, 2)}


def run(target_names, modules=None) -> dict:
    from triton.backends.compiler import GPUTarget

    import deepport.kernels as kernels

    results = {}
    for name in target_names:
        target = GPUTarget(*TARGETS[name])
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", action="append", choices=sorted(TARGETS), help="default: all")
    ap.add_argument("--module", action="append", help="kernel module names (default: all)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
        print("compile_check needs real JITFunctions: run it with TRITON_INTERPRET unset", file=sys.stderr)
        return 2
    results = run(args.target or sorted(TARGETS), args.module)
    print(json.dumps(results, indent=1))
    good = all(r["ok"] and all(r.get("expect", {}).values()) and not any(r.get("forbid", {}).values())
               for r in results.values())
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
