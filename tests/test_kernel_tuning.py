"""Tuning data as configs per backend/arch (deepport/kernels/tuning.py) and the launcher's autotune path."""
import json

import pytest
import torch
import triton

from deepport.backends.cuda import ops as cuda_ops
from deepport.backends.rocm import ops as rocm_ops
from deepport.core.errors import ConfigError
from deepport.kernels import silu_mul as k_silu_mul
from deepport.kernels.launch import _autotuned, launch
from deepport.kernels.tuning import Tuning, split_config

TABLE = {
    "default": {"fp8_gemm": [{"BLOCK_M": 64, "num_warps": 4, "num_stages": 2, "waves_per_eu": 2},
                             {"BLOCK_M": 128, "num_warps": 8}],
                "rope": [{"BLOCK_H": 16, "num_warps": 4}]},
    "gfx942": {"fp8_gemm": [{"BLOCK_M": 32, "num_warps": 4, "kpack": 2}]},
}


def test_arch_section_overrides_default_op_by_op(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    t = Tuning(TABLE, "gfx942")
    assert t.configs("fp8_gemm") == [{"BLOCK_M": 32, "num_warps": 4, "kpack": 2}]
    assert t.configs("rope") == [{"BLOCK_H": 16, "num_warps": 4}]
    assert len(Tuning(TABLE, "gfx950").configs("fp8_gemm")) == 2  # no gfx950 section: the defaults


def test_interpreter_uses_one_config_without_hardware_knobs(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert Tuning(TABLE, None).configs("fp8_gemm") == [{"BLOCK_M": 64, "num_warps": 4}]


def test_kpack_must_be_one_on_gfx950():
    table = {"gfx950": {"fp8_gemm": [{"BLOCK_M": 64, "kpack": 2}]}}
    with pytest.raises(ConfigError, match="kpack=1"):
        Tuning(table, "gfx950")


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="unknown keys"):
        split_config({"BLOCK_M": 64, "num_wraps": 4})
    with pytest.raises(ConfigError, match="no configs for op 'moe_gate'"):
        Tuning(TABLE, None).configs("moe_gate")
    bad = tmp_path / "tuning.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read tuning file"):
        Tuning.load(bad, "sm90")


@pytest.mark.parametrize("ops,arches", [(cuda_ops, ["sm90", "sm89", "sm100"]), (rocm_ops, ["gfx942", "gfx950"])])
def test_shipped_tuning_files_cover_every_bound_kernel(monkeypatch, ops, arches):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    table = json.loads(ops.TUNING_PATH.read_text())
    for arch in arches:
        t = Tuning(table, arch, str(ops.TUNING_PATH))  # validates every config (kpack on gfx950, keys)
        for op in ("rms_norm", "rope", "silu_mul", "act_quant", "weight_dequant", "fp8_gemm", "moe_gate"):
            assert t.configs(op), (arch, op)


def test_several_configs_autotune_with_a_benchmark_stub():
    """The hardware path (triton.autotune over the configs) runs under the interpreter with a stub do_bench."""
    timings = {64: 2.0, 128: 1.0}  # the stub says BLOCK_I=128 is faster
    chosen = []

    def do_bench(fn, quantiles=None, **_):
        fn()
        t = timings[chosen[-1]] if chosen else 1.0
        return [t, t, t] if quantiles else t

    def grid(meta):
        chosen.append(meta["BLOCK_I"])
        return (3, triton.cdiv(300, meta["BLOCK_I"]))

    x = torch.randn(3, 600, generator=torch.Generator().manual_seed(0))
    out = torch.empty(3, 300)
    configs = [{"BLOCK_I": 64, "num_warps": 4}, {"BLOCK_I": 128, "num_warps": 2}]
    launch(k_silu_mul.silu_mul_kernel, grid, configs,
           dict(x_ptr=x, out_ptr=out, I=300, stride_x_m=600, stride_out_m=300, OUT_BF16=False),
           key=("I",), do_bench=do_bench)
    torch.testing.assert_close(out, torch.nn.functional.silu(x[:, :300]) * x[:, 300:])
    assert {64, 128} <= set(chosen)  # both configs were benchmarked
    tuner = [k for k in _autotuned.values() if k.fn is k_silu_mul.silu_mul_kernel][-1]
    assert tuner.best_config.kwargs["BLOCK_I"] == 128


def test_kernels_never_read_device_identity():
    """Tiling and formats come from the caller: no kernel module asks torch or triton which device it runs on."""
    import re
    from pathlib import Path

    import deepport.kernels as kernels

    probes = re.compile(r"torch\.cuda\.|torch\.version\.|get_device_(capability|properties|name)|"
                        r"driver\.active|get_current_target|is_hip\(|is_cuda\(")
    offenders = {}
    for path in sorted(Path(kernels.__file__).parent.glob("*.py")):
        code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
        hits = sorted({m.group(0) for m in probes.finditer(code)})
        if hits:
            offenders[path.name] = hits
    assert not offenders, f"kernel modules read device identity: {offenders}; let the backend's ops.py decide"
