"""Compile-only checks: every kernel of deepport.kernels built with triton.compile for H100 (sm_90), MI300 (gfx942)
and MI355 (gfx950), no GPU needed; plus the fp8 dtype policy that refuses wrong formats before compiling."""
import json
import os
import subprocess
import sys

import pytest
import torch

import deepport.kernels as kernels
from deepport.core.errors import BackendError
from deepport.core.formats import E4M3FN, E4M3FNUZ
from deepport.kernels.compile_check import TARGETS
from deepport.kernels.targets import check_fp8_format, fp8_format_for

MODULES = [m.__name__.rsplit(".", 1)[1] for m in kernels.kernel_modules()]
TOOL_MISSING = ("ptxas", "ld.lld", "lld", "No such file or directory")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """One subprocess (no TRITON_INTERPRET: real JITFunctions) compiles every spec for every target."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))  # a real compile, not a cache hit
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "deepport.kernels.compile_check"], env=env,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode not in (0, 1):
        pytest.fail(f"compile_check crashed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("target", sorted(TARGETS))
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


def test_fp8_gemm_uses_fp8_matrix_instructions(compiled):
    """The fast path is really fp8 on each target (not an upcast to f16 MMA)."""
    expect = {"cuda:90": "wgmma", "hip:gfx942": "_fp8_fp8", "hip:gfx950": "f8f6f4"}
    for target, word in expect.items():
        (r,) = [v for k, v in compiled.items() if k.startswith(f"{target}/fp8_gemm/")]
        assert r["ok"] and any(word in p for p, hit in r["expect"].items() if hit), (target, r)


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
