"""Runtime core: graph purity, registry, binding, checkpoints and their errors, CLI behaviour."""
import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import deepport
from deepport.core import registry
from deepport.core.errors import BackendError, CheckpointError, ContractError
from deepport.core.formats import E4M3FN, dequantize_weight, fn_to_fnuz, quantize_weight
from deepport.core.registry import Backend, Probe

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, env=None):
    import os

    e = dict(os.environ, DEEPPORT_PROGRESS="0")
    e.pop("TRITON_INTERPRET", None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "deepport", *args], capture_output=True, text=True, env=e,
                          cwd=ROOT, timeout=300)


def test_model_imports_only_torch_and_core():
    tree = ast.parse((ROOT / "deepport/core/model.py").read_text())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mods.add(node.module)
    bad = {m for m in mods if not (m in ("__future__", "math", "dataclasses") or m.split(".")[0] == "torch"
                                   or m.startswith("deepport.core"))}
    assert not bad, bad
    text = (ROOT / "deepport/core/model.py").read_text()
    import re

    assert not re.search(r"\b(cuda|rocm|npu|triton|hip|gfx\w*|sm_?\d+)\b", text.lower())


def test_builtin_backends_listed_with_reasons():
    r = run_cli("backends", "--json")
    assert r.returncode == 0, r.stderr
    rows = {b["name"]: b for b in json.loads(r.stdout)}
    assert {"cpu_ref", "cuda", "rocm", "ascend"} <= set(rows)
    assert rows["cpu_ref"]["available"] and rows["cpu_ref"]["ops"]["fallback"] == 0
    for name in ("cuda", "rocm", "ascend"):
        assert not rows[name]["available"] and rows[name]["reason"], rows[name]
    assert "torch_npu" in rows["ascend"]["reason"]


def test_throwaway_plugin_is_discovered_through_entry_points(tmp_path):
    pkg = tmp_path / "site"
    (pkg / "toyport").mkdir(parents=True)
    (pkg / "toyport" / "__init__.py").write_text(textwrap.dedent('''
        from deepport.core.plugins import hookimpl
        from deepport.core.registry import Backend, Probe

        def _load():
            import torch
            def silu_mul(x):
                a, b = x.float().chunk(2, -1)
                return (torch.nn.functional.silu(a) * b).to(x.dtype)
            return {"silu_mul": silu_mul}

        @hookimpl
        def deepport_backends():
            return [Backend(name="toy", device_type="cpu", probe=lambda: Probe(True, "toy"), load=_load,
                            dtypes=frozenset({"bf16", "fp32"}))]
    '''))
    dist = pkg / "toyport-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toyport\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[deepport]\ntoy = toyport\n")
    r = run_cli("backends", "--json", env={"PYTHONPATH": str(pkg)})
    rows = {b["name"]: b for b in json.loads(r.stdout)}
    assert rows["toy"]["origin"] == "plugin" and rows["toy"]["ops"] == {"native": 1, "composite": 1, "fallback": 12}
    r = run_cli("backends", "--json", env={"PYTHONPATH": str(pkg), "DEEPPORT_PLUGINS_AUTOLOAD": "0"})
    assert "toy" not in {b["name"] for b in json.loads(r.stdout)}
    r = run_cli("generate", "--backend", "toy", "--dtype", "fp32", "--max-new-tokens", "3", "--fallback", "error",
                env={"PYTHONPATH": str(pkg)})
    assert r.returncode == 2 and "lacks ops" in r.stderr and "Traceback" not in r.stderr


def _backend(ops, name="bad"):
    return Backend(name=name, device_type="cpu", probe=lambda: Probe(True), load=lambda: ops,
                   dtypes=frozenset({"bf16"}))


def test_signature_mismatch_is_refused():
    def rms_norm(x, w, eps, residual=None):
        return x

    with pytest.raises(ContractError, match=r"rms_norm\(x, w, eps, residual\) does not match"):
        registry.bind(_backend({"rms_norm": rms_norm}))
    with pytest.raises(ContractError, match="unknown op 'flash'"):
        registry.bind(_backend({"flash": lambda q: q}))


def test_fallback_report_and_error_policy():
    from deepport.backends.cpu_ref import ops as ref

    table = registry.bind(_backend({"silu_mul": ref.silu_mul}), fallback="reference")
    assert table.report["silu_mul"] == "native" and table.report["linear"] == "composite"
    assert table.report["mla_decode"] == "fallback"
    with pytest.raises(BackendError, match="--fallback error"):
        registry.bind(_backend({"silu_mul": ref.silu_mul}), fallback="error")


def test_unknown_and_unavailable_backend_and_dtype_errors():
    for args, needle in ((("--backend", "tpu"), "unknown backend 'tpu'"),
                         (("--backend", "ascend"), "not available"),
                         (("--backend", "cpu_ref", "--dtype", "fp64"), "invalid choice")):
        r = run_cli("generate", *args, "--max-new-tokens", "2")
        assert r.returncode == 2, r
        assert needle in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(BackendError, match="does not support dtype fp8"):
        registry.check_dtype(_backend({}), "fp8")


def test_generate_json_and_ragged_batch():
    r = run_cli("generate", "--backend", "cpu_ref", "--max-new-tokens", "5", "--json", "--prompt", "x = ")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"text", "tokens", "stats"} <= set(out) and len(out["tokens"]) == 5
    assert out["stats"]["decode_tokens_per_s"] > 0 and out["stats"]["prefill_tokens_per_s"] > 0
    m = deepport.load(None, backend="cpu_ref", dtype="bf16")
    prompts = ["a", "for i in range(10):\n    print(i)\n"]
    batch = m.generate_batch(prompts, max_new_tokens=6)
    for p, b in zip(prompts, batch):
        assert m.generate(p, max_new_tokens=6).tokens == b.tokens


def test_logits_shape_and_op_report():
    m = deepport.load("tiny", backend="cpu_ref", dtype="fp8")
    ids = torch.randint(0, 1024, (2, 5))
    assert m.logits(ids).shape == (2, 5, 1024) and m.logits(ids).dtype == torch.float32
    assert m.backend == "cpu_ref" and set(m.op_report().values()) <= {"native", "composite"}


def test_fp8_helpers_roundtrip_and_fnuz():
    w = torch.randn(200, 300)
    codes, s = quantize_weight(w, E4M3FN)
    assert s.shape == (2, 3)
    assert (dequantize_weight(codes, s) - w).abs().max() < 0.07 * w.abs().max()
    nz, s2 = fn_to_fnuz(codes, s)
    assert torch.equal(dequantize_weight(nz, s2), dequantize_weight(codes, s))


def _tiny_dir(tmp_path, fp8=True):
    from deepport.models import materialise

    import shutil

    src = materialise("tiny", fp8)
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_missing_tensor_wrong_shape_and_truncated_file(tmp_path):
    from safetensors.torch import load_file, save_file

    d = _tiny_dir(tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"], tensors["model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lacks 1 tensors, e.g. model.layers.1.mlp.experts.3.up_proj.weight"):
        deepport.load(d, backend="cpu_ref", dtype="bf16")
    tensors["model.layers.1.mlp.experts.3.up_proj.weight"] = torch.zeros(64, 256, dtype=torch.bfloat16)
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"has shape \(64, 256\), expected \(128, 256\)"):
        deepport.load(d, backend="cpu_ref", dtype="bf16")
    d2 = _tiny_dir(tmp_path / "t")
    data = (d2 / "model.safetensors").read_bytes()
    (d2 / "model.safetensors").write_bytes(data[: len(data) // 2])
    r = run_cli("generate", "--model", str(d2), "--backend", "cpu_ref", "--max-new-tokens", "2")
    assert r.returncode == 2 and "corrupt or truncated" in r.stderr and "Traceback" not in r.stderr


def test_unsupported_config_is_refused(tmp_path):
    d = _tiny_dir(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["scoring_func"] = "softmax"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(deepport.DeepportError, match="scoring_func='softmax' is not supported"):
        deepport.load(d, backend="cpu_ref")


def test_convert_fp8_to_bf16_and_fnuz(tmp_path):
    src = _tiny_dir(tmp_path)
    ids = torch.randint(0, 1024, (1, 9), generator=torch.Generator().manual_seed(1))
    ref = deepport.load(src, backend="cpu_ref", dtype="fp32").logits(ids)
    r = run_cli("convert", str(src), str(tmp_path / "bf16"), "--dtype", "bf16")
    assert r.returncode == 0, r.stderr
    assert "quantization_config" not in json.loads((tmp_path / "bf16" / "config.json").read_text())
    got = deepport.load(tmp_path / "bf16", backend="cpu_ref", dtype="fp32").logits(ids)
    assert ((got - ref).abs().max() / ref.abs().max()) < 2e-2  # only the bf16 rounding of dequantised weights
    r = run_cli("convert", str(src), str(tmp_path / "fnuz"), "--dtype", "fp8", "--fp8-format", "e4m3fnuz")
    assert r.returncode == 0, r.stderr
    from safetensors import safe_open

    with safe_open(str(tmp_path / "fnuz" / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.0.self_attn.kv_a_proj_with_mqa.weight")
        assert w.dtype == torch.float8_e4m3fnuz
    got = deepport.load(tmp_path / "fnuz", backend="cpu_ref", dtype="fp32").logits(ids)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)  # same values: bits reread, scales doubled
