"""Compile-only checks, no GPU needed: every kernel of deepport.kernels built with triton.compile for H100 (sm_90),
MI300 (gfx942) and MI355 (gfx950) with the instructions its assembly must contain (the specs check); every tuning
config on every target of the launch check (sm_80/89/90/100, gfx942/950) within the per-block shared memory / LDS
(docs/backends/launch_limits.md); plus the fp8 dtype policy that refuses wrong formats before compiling."""
import json
import os
import subprocess
import sys

from pathlib import Path

import pytest
import torch

import deepport.kernels as kernels
from deepport.core.errors import BackendError
from deepport.core.formats import E4M3FN, E4M3FNUZ
from deepport.kernels import compile_check, launch_table
from deepport.kernels.compile_check import SPEC_TARGETS, TARGETS
from deepport.kernels.targets import check_fp8_format, fp8_format_for

MODULES = [m.__name__.rsplit(".", 1)[1] for m in kernels.kernel_modules()]
TOOL_MISSING = ("ptxas", "ld.lld", "lld", "No such file or directory")
ROOT = Path(__file__).resolve().parents[1]
LAUNCH_JSON, LAUNCH_MD = ROOT / "docs/backends/launch_limits.json", ROOT / "docs/backends/launch_limits.md"


def compile_env(tmp_path) -> dict:
    """No TRITON_INTERPRET (real JITFunctions) and a fresh Triton cache: a real compile, not a cache hit."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """One subprocess (no TRITON_INTERPRET: real JITFunctions) compiles every spec for every target."""
    env = compile_env(tmp_path_factory.mktemp("specs"))
    proc = subprocess.run([sys.executable, "-m", "deepport.kernels.compile_check"], env=env,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode not in (0, 1):
        pytest.fail(f"compile_check crashed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


@pytest.mark.slow  # one subprocess compiles every spec for three targets: minutes on a 2-core CI machine
@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("target", SPEC_TARGETS)  # the targets compile_specs' assembly patterns are written for
def test_kernel_compiles_for_target(compiled, target, module):
    results = {k: v for k, v in compiled.items() if k.startswith(f"{target}/{module}/") or k == f"{target}/{module}"}
    assert results, f"{module}.compile_specs returned no spec for {target}"
    for name, r in results.items():
        if not r["ok"] and any(t in r["error"] for t in TOOL_MISSING):
            pytest.skip(f"{name}: a tool triton needs for this target is missing here: {r['error'][:300]}")
        assert r["ok"], f"{name} failed to compile: {r['error']}"
        missing = [p for p, hit in r["expect"].items() if not hit]
        assert not missing, f"{name}: expected instructions {missing} not found in the {target} assembly"
        present = [p for p, hit in r.get("forbid", {}).items() if hit]
        assert not present, f"{name}: forbidden instructions {present} found in the {target} assembly"
        assert r["binary"], f"{name}: no cubin/hsaco was produced"


@pytest.mark.slow
def test_fp8_gemm_uses_fp8_matrix_instructions(compiled):
    """The fast path is really fp8 on each target (not an upcast to f16 MMA)."""
    expect = {"cuda:90": "wgmma", "hip:gfx942": "_fp8_fp8", "hip:gfx950": "f8f6f4"}
    for target, word in expect.items():
        (r,) = [v for k, v in compiled.items() if k.startswith(f"{target}/fp8_gemm/")]
        assert r["ok"] and any(word in p for p, hit in r["expect"].items() if hit), (target, r)


# ---- the launch check: every tuning config on every target (compile_check --launch) ----

OVER_LIMIT = """
import json, sys
from deepport.kernels import compile_check as cc
from deepport.kernels.tuning import Tuning
(spec,) = [s for s in cc.launch_specs("cuda:89")
           if s[0] == "mla_decode" and s[3] is not None and s[3].name.startswith("mla_decode[")]
table = json.loads((cc.Path(cc.__file__).parents[1] / "backends/cuda/tuning.json").read_text())
(default,) = Tuning(table, None).ops["mla_decode"]  # what sm89 would read without its own section
shipped = cc.check_launch(spec[3], "cuda:89")
over = cc.check_launch(cc.config_spec("mla_decode", spec[3], default), "cuda:89")
print(json.dumps({"shipped": shipped, "over": over, "default": default, "shipped_config": spec[2]}))
"""


def test_launch_check_refuses_a_config_over_the_shared_memory_limit(tmp_path):
    """sm_89 allows 99 KiB of shared memory per block: mla_decode's default BLOCK_N 32 tile needs more and cannot
    launch there (the check says so, with the numbers); the config tuning.json's sm89 section ships launches."""
    proc = subprocess.run([sys.executable, "-c", OVER_LIMIT], env={**compile_env(tmp_path), "TRITON_ALWAYS_COMPILE": "1",
                                                                  "TRITON_DUMP_PTXAS_LOG": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    if not r["shipped"]["ok"] and any(t in r["shipped"]["error"] for t in TOOL_MISSING):
        pytest.skip(f"ptxas is missing here: {r['shipped']['error'][:300]}")
    limit = compile_check.SHARED_LIMIT["cuda:89"]
    assert r["default"]["BLOCK_N"] > r["shipped_config"]["BLOCK_N"]
    assert r["over"]["ok"] and not r["over"]["launches"], r["over"]
    assert r["over"]["usage"]["shared"] > limit and f"per-block limit is {limit}" in r["over"]["problems"][0]
    assert r["shipped"]["launches"] and r["shipped"]["usage"]["shared"] <= limit, r["shipped"]
    assert "registers" in r["shipped"]["usage"], "ptxas -v's report was not read"


def _rows_wanted():
    """(target, op, config index, kernel, config) the launch check covers for the tuning files as they are now."""
    return {(t, op, i, spec.name if spec else None, json.dumps(config, sort_keys=True))
            for t in TARGETS for op, i, config, spec, _ in compile_check.launch_specs(t)}


def test_launch_limits_doc_is_generated_and_covers_every_tuning_config():
    """docs/backends/launch_limits.md is the rendering of launch_limits.json (no hand-written numbers), the JSON
    covers every config of every tuned op on every target as tuning.json is now, and every one launches."""
    doc = json.loads(LAUNCH_JSON.read_text())
    regen = f"regenerate both with: {launch_table.COMMAND}"
    assert LAUNCH_MD.read_text() == launch_table.markdown(doc), f"launch_limits.md was edited by hand; {regen}"
    have = {(r["target"], r["op"], r["config"], r["kernel"], json.dumps(r["config_values"], sort_keys=True))
            for r in doc["rows"]}
    want = _rows_wanted()
    assert have == want, (f"launch_limits.json is stale (missing {sorted(want - have)[:5]}, "
                          f"extra {sorted(have - want)[:5]}); {regen}")
    cannot = [(r["target"], r["op"], r["config"], r["kernel"], r["problems"]) for r in doc["rows"]
              if r["launches"] is False]
    assert not cannot, f"configs that cannot launch: {cannot}; remove them from that target's tuning section"
    refused = {(r["target"], r["op"]) for r in doc["rows"] if r["launches"] is None}
    assert refused == {("cuda:80", op) for op in ("act_quant", "fp8_gemm", "weight_dequant")}, refused


@pytest.mark.slow
def test_every_tuning_config_launches_on_every_target(tmp_path):
    """The whole launch check, compiled afresh (minutes on 2 cores): every config launches, and the committed
    launch_limits.json says what this Triton says (its numbers when it is the same Triton, else the verdicts)."""
    out = tmp_path / "launch.json"
    proc = subprocess.run([sys.executable, "-m", "deepport.kernels.compile_check", "--launch", "--json", str(out)],
                          env=compile_env(tmp_path), capture_output=True, text=True, timeout=3000)
    results = json.loads(proc.stdout)
    missing = [k for k, r in results.items() if not r.get("ok") and any(t in r["error"] for t in TOOL_MISSING)]
    if missing:
        pytest.skip(f"a compiler tool is missing here: {missing[:3]}")
    bad = {k: r["problems"] for k, r in results.items() if not r.get("refused") and not r.get("launches")}
    assert not bad and proc.returncode == 0, bad or proc.stderr[-3000:]
    fresh, committed = json.loads(out.read_text()), json.loads(LAUNCH_JSON.read_text())
    if fresh["triton"] == committed["triton"]:
        assert fresh == committed, f"launch_limits.json differs from a fresh run; {launch_table.COMMAND}"
    else:
        verdicts = lambda d: {(r["target"], r["op"], r["config"], r["kernel"], r["launches"]) for r in d["rows"]}  # noqa: E731
        assert verdicts(fresh) == verdicts(committed)


@pytest.mark.parametrize("backend,arch,fmt", [
    ("cuda", 90, "e4m3fn"), ("cuda", (8, 9), "e4m3fn"), ("cuda", 100, "e4m3fn"),
    ("hip", "gfx942:sramecc+:xnack-", "e4m3fnuz"), ("hip", "gfx950", "e4m3fn"),
])
def test_fp8_policy_per_arch(backend, arch, fmt):
    assert fp8_format_for(backend, arch) == fmt
    check_fp8_format(backend, arch, fmt)


@pytest.mark.parametrize("backend,arch,fmt,match", [
    ("cuda", 90, "e4m3fnuz", "computes in e4m3fn"),
    ("hip", "gfx942:sramecc+:xnack-", "e4m3fn", "fn_to_fnuz"),
    ("hip", "gfx950", "e4m3fnuz", "computes in e4m3fn"),
    ("cuda", 80, "e4m3fn", "sm89"),
    ("hip", "gfx90a", "e4m3fnuz", "gfx942 or gfx950"),
])
def test_fp8_policy_refuses_wrong_format(backend, arch, fmt, match):
    with pytest.raises(BackendError, match=match):
        check_fp8_format(backend, arch, fmt)


@pytest.fixture
def fake_amd_gpu(monkeypatch):
    """A ROCm torch with one AMD GPU whose gcnArchName the test sets (no device needed)."""
    from deepport.backends.rocm import ops as rocm_ops

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.version, "hip", "6.4.0", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    rocm_ops._device_arch.cache_clear()
    name = {}

    class Props:
        @property
        def gcnArchName(self):
            return name["arch"]

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: Props())
    yield lambda arch: name.__setitem__("arch", arch)
    rocm_ops._device_arch.cache_clear()


@pytest.mark.parametrize("arch,fmt", [("gfx942:sramecc+:xnack-", "e4m3fnuz"), ("gfx950", "e4m3fn"), ("gfx90a", None)])
def test_rocm_descriptor_picks_format_from_gcn_arch(fake_amd_gpu, arch, fmt):
    from deepport.backends import rocm

    fake_amd_gpu(arch)
    assert rocm.fp8_format() == fmt


@pytest.mark.parametrize("arch,bad", [("gfx942:sramecc+:xnack-", E4M3FN), ("gfx950", E4M3FNUZ)])
def test_rocm_ops_refuse_wrong_format_before_launch(fake_amd_gpu, arch, bad):
    from deepport.backends.rocm import ops as rocm_ops

    fake_amd_gpu(arch)
    assert rocm_ops.arch() == arch
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(0))
    with pytest.raises(BackendError, match=f"{bad.name} is not supported on hip"):
        rocm_ops.OPS["act_quant"](x, bad)  # refused by the policy: nothing is compiled or launched


def test_cuda_ops_refuse_fnuz_under_the_interpreter():
    from deepport.backends.cuda import ops as cuda_ops

    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(0))
    with pytest.raises(BackendError, match="e4m3fnuz is not supported on cuda sm90"):
        cuda_ops.OPS["act_quant"](x, E4M3FNUZ)
