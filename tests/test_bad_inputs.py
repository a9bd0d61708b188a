"""Bad inputs, one parametrised test per family (docs/robustness.md): each gives one line naming the fix, exit 2.

Families: command-line arguments, environment variables, config.json fields, checkpoint files (corrupt
safetensors, shard paths, NaN weights and fp8 scales), non-finite numbers while running, training state,
plugins (import failure, probe that hangs, load failure under auto, duplicate names)."""
import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import deepport
from deepport import cli
from deepport.core import registry
from deepport.core.errors import CheckpointError, DeepportError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "deepport" / "models" / "tiny" / "fp8"
EXPERT = "model.layers.1.mlp.experts.3.up_proj.weight"


def main(argv, capsys) -> tuple[int, str]:
    """Run the CLI in-process: (exit code, stderr)."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def assert_one_line(rc, err, needle):
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert rc == 2, err
    assert len(errors) == 1 and needle in errors[0], err
    assert "Traceback" not in err


def model_dir(tmp_path, edit_config=None, edit_tensors=None, name="m") -> Path:
    """A copy of the embedded model; edit_config(cfg) / edit_tensors(tensors) change it in place."""
    d = tmp_path / name
    d.mkdir()
    for f in ("tokenizer.json",):
        (d / f).write_bytes((TINY / f).read_bytes())
    cfg = json.loads((TINY / "config.json").read_text())
    if edit_config:
        edit_config(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    if edit_tensors:
        tensors = load_file(str(TINY / "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(d / "model.safetensors"))
    else:
        (d / "model.safetensors").symlink_to(TINY / "model.safetensors")
    return d


# --- command-line arguments -----------------------------------------------------------------------------------

GEN = ["generate", "--backend", "cpu_ref", "--max-new-tokens", "2"]
CLI_CASES = [
    (GEN + ["--prompt", "a\udcff"], "not valid UTF-8 (byte 0xff"),  # what Python makes of a non-UTF-8 argv byte
    (GEN + ["--prompt-ids", "a,b"], "give comma-separated integers"),
    (GEN + ["--prompt-ids", "1,-2"], "token ids must be >= 0"),
    (GEN + ["--seed", "1e23"], "is not an integer seed"),
    (GEN + ["--seed", "-1"], "outside [0, 2**63)"),
    (GEN + ["--tp", "0"], "must be at least 1"),
    (GEN + ["--ep", "-3"], "must be at least 1"),
    (GEN + ["--temperature", "-1"], "finite number >= 0 (0: greedy)"),
    (GEN + ["--temperature", "nan"], "finite number >= 0"),
    (GEN + ["--top-p", "0"], "must be in (0, 1]"),
    (GEN + ["--max-new-tokens", "0"], "must be at least 1"),
    (["bench", "--batch", "0"], "must be at least 1"),
    (["export-onnx", "--output", "x.onnx", "--block-size", "0"], "must be at least 1"),
    (["train-tiny", "--steps", "0"], "must be at least 1"),
    (["train-tiny", "--threads", "0"], "must be at least 1"),
    (["train-tiny", "--lr", "nan"], "must be a finite number"),
    (["train-tiny", "--warmup", "-5"], "must be >= 0"),
    (["train-tiny", "--heldout-every", "0"], "must be at least 1"),
    (["train-tiny", "--max-minutes", "-1"], "must be > 0"),
    (["bench", "--threads", "0"], "must be at least 1"),
    (["hardware-report", "--budget-s", "0"], "must be > 0"),
    (["conformance", "--backend", "cpu_ref", "--json", "/nonexistent-dir/r.json"], "create it first"),
    (["conformance", "--backend", "cpu_ref", "--junit", "{tmp}"], "is a directory; give a file name"),
    (["conformance", "--backend", "cpu_ref", "--markdown", "/proc/deepport.md"], "choose another path"),
    (["generate", "--backend", "nosuch"], "known backends: cpu_ref"),
]


@pytest.mark.parametrize("argv,needle", CLI_CASES, ids=[" ".join(a[-2:]) for a, _ in CLI_CASES])
def test_cli_argument_errors_are_one_line_exit_2(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    start = time.time()
    rc, err = main([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    assert_one_line(rc, err, needle)
    assert time.time() - start < 15, "refused only after long work"


@pytest.fixture(scope="module")
def tiny():
    return deepport.load(backend="cpu_ref", dtype="fp32")


@pytest.mark.parametrize("kwargs,needle", [
    (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(seed=10 ** 23), "seed must be an integer in [0, 2**63)"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(prompt=[5, 1024]), "token id 1024 is outside the vocabulary"),
    (dict(prompt=[]), "empty prompt"),
], ids=["temp-1", "temp-nan", "top_p0", "seed1e23", "seed1.5", "id-oov", "empty"])
def test_api_sampling_arguments_are_checked(tiny, kwargs, needle):
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt", "def f():")
    with pytest.raises(DeepportError) as e:
        tiny.generate(prompt, max_new_tokens=2, **kwargs)
    assert needle in str(e.value)


def test_non_utf8_prompt_bytes_from_a_real_command_line():
    env = dict(os.environ, DEEPPORT_PROGRESS="0")
    r = subprocess.run([sys.executable, "-m", "deepport", *GEN, "--prompt", b"caf\xe9"], capture_output=True,
                       env=env, timeout=120)
    err = r.stderr.decode()
    assert r.returncode == 2 and "not valid UTF-8 (byte 0xe9 at character 3)" in err and "--prompt-ids" in err, err
    assert len(err.strip().splitlines()) == 1


NO_ONNX = ("import sys; sys.modules['onnx'] = sys.modules['onnxruntime'] = None  # as if the extra were absent\n"
           "from deepport.cli import main; sys.exit(main(sys.argv[1:]))")


@pytest.mark.parametrize("argv,needle", [
    (["export-onnx", "--output", "{tmp}/m.onnx"], "export-onnx needs the onnx extra"),
    (["conformance", "--backend", "cpu_ref", "--ops", "silu_mul", "--cross-check", "onnxruntime"], "the onnx extra"),
], ids=["export-onnx", "cross-check"])
def test_missing_onnx_extra_is_one_line(argv, needle, tmp_path):
    env = dict(os.environ, DEEPPORT_PROGRESS="0")
    r = subprocess.run([sys.executable, "-c", NO_ONNX, *[a.replace("{tmp}", str(tmp_path)) for a in argv]],
                       capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert_one_line(r.returncode, r.stderr, needle)
    assert "pip install 'deepport[onnx]'" in r.stderr


def test_closed_pipe_ends_quietly():
    env = dict(os.environ, DEEPPORT_PROGRESS="0")
    p = subprocess.Popen([sys.executable, "-m", "deepport", "conformance", "--list"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    p.stdout.readline()
    p.stdout.close()  # `| head -1`
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_help_describes_every_option_with_its_default(capsys):
    import argparse

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, p in sub.choices.items():
        text = p.format_help().split("options:", 1)[1]
        for a in p._actions:
            if not a.option_strings or a.help == argparse.SUPPRESS or "-h" in a.option_strings:
                continue
            if not a.help:
                missing.append(f"{name} {a.option_strings[0]}: no description")
            elif a.default not in (None, False, True, argparse.SUPPRESS):
                block = text.split(a.option_strings[-1], 1)[1].split("\n  -", 1)[0]
                if "default" not in block:
                    missing.append(f"{name} {a.option_strings[0]}: default {a.default!r} not shown")
    assert not missing, missing


# --- environment ------------------------------------------------------------------------------------------------

ENV_CASES = [
    ({"DEEPPORT_DEVICE": "garbage"}, GEN, "DEEPPORT_DEVICE='garbage' is not a torch device"),
    ({"DEEPPORT_CACHE": "{file}"}, GEN[:1] + ["--model", "tiny"] + GEN[1:], "is a file, not a directory"),
    ({"DEEPPORT_PROBE_TIMEOUT": "soon"}, ["generate", "--max-new-tokens", "2"], "positive number of seconds"),
]


@pytest.mark.parametrize("env,argv,needle", ENV_CASES, ids=[next(iter(e)) for e, _, _ in ENV_CASES])
def test_environment_errors_are_one_line(env, argv, needle, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("not a directory")
    for k, v in env.items():
        monkeypatch.setenv(k, v.replace("{file}", str(tmp_path / "file")))
    rc, err = main(argv, capsys)
    assert_one_line(rc, err, needle)


# --- config.json ------------------------------------------------------------------------------------------------

def _set(**kv):
    return lambda c: c.update(kv)


def _no_yarn_factor(c):
    del c["rope_scaling"]["factor"]


CONFIG_CASES = [
    ("n_group_0", _set(n_group=0), "n_group must be >= 1, got 0"),
    ("hidden_size_str", _set(hidden_size="256"), "write 256 without quotes"),
    ("yarn_no_factor", _no_yarn_factor, "rope_scaling of type yarn needs a factor"),
    ("topk_group_gt_n_group", _set(topk_group=5), "topk_group 5 exceeds n_group 4"),
    ("rms_norm_eps_neg", _set(rms_norm_eps=-1), "rms_norm_eps must be > 0, got -1"),
    ("experts_per_tok_0", _set(num_experts_per_tok=0), "num_experts_per_tok must be >= 1"),
    ("rope_dim_1e9", _set(qk_rope_head_dim=10 ** 9), "parameters"),
    ("layers_1e5", _set(num_hidden_layers=10 ** 5), "check num_hidden_layers and n_routed_experts"),
    ("experts_1e6", _set(n_routed_experts=10 ** 6, n_group=1, topk_group=1), "checkpoint tensors"),
    ("eps_nan", _set(rms_norm_eps=float("nan")), "rms_norm_eps must be finite"),
    ("vocab_float", _set(vocab_size=1024.0), "vocab_size must be an integer"),
]


@pytest.mark.parametrize("name,edit,needle", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_is_refused_before_allocation(name, edit, needle, tmp_path, capsys):
    d = model_dir(tmp_path, edit_config=edit)
    start = time.time()
    rc, err = main(["generate", "--model", str(d), "--backend", "cpu_ref", "--max-new-tokens", "2"], capsys)
    assert_one_line(rc, err, needle)
    assert time.time() - start < 10, f"{name}: refused only after {time.time() - start:.0f}s"


def test_prompt_past_max_position_embeddings_warns(tmp_path, capsys):
    d = model_dir(tmp_path, edit_config=_set(max_position_embeddings=8))
    ids = ",".join(str(i) for i in torch.randint(2, 1000, (6,), generator=torch.Generator().manual_seed(3)).tolist())
    rc, err = main(["generate", "--model", str(d), "--backend", "cpu_ref", "--prompt-ids", ids,
                    "--max-new-tokens", "4"], capsys)
    assert rc == 0, err
    assert "exceeds max_position_embeddings 8" in err


# --- checkpoint files -------------------------------------------------------------------------------------------

def _nan_in_expert(t):
    w = t[EXPERT].view(torch.uint8).clone()
    w[5, 7] = 0x7F  # e4m3fn NaN code
    t[EXPERT] = w.view(torch.float8_e4m3fn)


def _scale(value):
    def edit(t):
        s = t[EXPERT + "_scale_inv"].clone()
        s.view(-1)[0] = value
        t[EXPERT + "_scale_inv"] = s
    return edit


def _inf_in_norm(t):
    w = t["model.layers.2.input_layernorm.weight"].clone()
    w[3] = float("inf")
    t["model.layers.2.input_layernorm.weight"] = w


WEIGHT_CASES = [
    ("nan_fp8_expert", _nan_in_expert, f"tensor {EXPERT} holds 1 non-finite values"),
    ("zero_scale", _scale(0.0), "block scales that are not positive and finite (e.g. 0.0)"),
    ("negative_scale", _scale(-2.0), "not positive and finite (e.g. -2.0)"),
    ("nan_scale", _scale(float("nan")), "not positive and finite"),
    ("inf_norm", _inf_in_norm, "input_layernorm.weight holds 1 non-finite values"),
]


@pytest.mark.parametrize("name,edit,needle", WEIGHT_CASES, ids=[c[0] for c in WEIGHT_CASES])
def test_non_finite_weights_are_refused_and_can_be_skipped(name, edit, needle, tmp_path, capsys):
    d = model_dir(tmp_path, edit_tensors=edit)
    rc, err = main(["generate", "--model", str(d), "--backend", "cpu_ref", "--max-new-tokens", "2"], capsys)
    assert_one_line(rc, err, needle)
    assert "--no-check-weights" in err
    deepport.load(d, backend="cpu_ref", dtype="bf16", check_weights=False)  # the flag skips the check
    rc, err = main(["generate", "--model", str(d), "--backend", "cpu_ref", "--max-new-tokens", "2",
                    "--no-check-weights"], capsys)
    assert "non-finite values (NaN/inf) of" not in err and "block scales" not in err


def _sharded(tmp_path, shard_name):
    d = model_dir(tmp_path)
    tensors = load_file(str(TINY / "model.safetensors"))
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[:10]}, str(d / "model-00001-of-00002.safetensors"))
    save_file({k: tensors[k] for k in names[10:]}, str(tmp_path / "outside.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in names[:10]}
    weight_map.update({k: shard_name.replace("{tmp}", str(tmp_path)) for k in names[10:]})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


@pytest.mark.parametrize("shard", ["../outside.safetensors", "{tmp}/outside.safetensors", "sub/../../outside.safetensors"])
def test_shard_paths_stay_inside_the_checkpoint(shard, tmp_path, capsys):
    d = _sharded(tmp_path, shard)
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        deepport.load(d, backend="cpu_ref", dtype="bf16")
    rc, err = main(["generate", "--model", str(d), "--backend", "cpu_ref", "--max-new-tokens", "2"], capsys)
    assert_one_line(rc, err, "shard paths must be relative names inside")


CORRUPT_CASES = [
    ("garbage_header", lambda b: b"\xff" * 8 + b"not json" + b[16:]),
    ("zero_length", lambda b: b""),
    ("truncated", lambda b: b[: len(b) // 3]),
    ("header_only", lambda b: b[:8 + int.from_bytes(b[:8], "little")]),
]


@pytest.mark.parametrize("name,damage", CORRUPT_CASES, ids=[c[0] for c in CORRUPT_CASES])
def test_corrupt_safetensors_is_one_line(name, damage, tmp_path, capsys):
    d = model_dir(tmp_path)
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").write_bytes(damage((TINY / "model.safetensors").read_bytes()))
    rc, err = main(["generate", "--model", str(d), "--backend", "cpu_ref", "--max-new-tokens", "2"], capsys)
    assert_one_line(rc, err, "model.safetensors")


# --- training state ---------------------------------------------------------------------------------------------

class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_train_state_never_unpickles(tmp_path):
    from deepport import train_state

    marker = tmp_path / "code-ran"
    state = tmp_path / "state.pt"
    state.write_bytes(pickle.dumps({"model": _Payload(str(marker))}))
    torch.save({"step": 3, "payload": _Payload(str(marker))}, tmp_path / "torch_state.pt")
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    for f in (state, tmp_path / "torch_state.pt"):
        with pytest.raises(DeepportError, match="pickled states from older versions are never loaded"):
            train_state.load(f, model, opt)
    assert not marker.exists()
    # and a real state round-trips: parameters and optimizer moments
    model(torch.randn(2, 4, generator=torch.Generator().manual_seed(0))).sum().backward()
    opt.step()
    train_state.save(tmp_path / "ok.safetensors", model, opt, 7, {"loss": [1.5]})
    model2 = torch.nn.Linear(4, 4)
    opt2 = torch.optim.AdamW(model2.parameters())
    assert train_state.load(tmp_path / "ok.safetensors", model2, opt2) == (7, {"loss": [1.5]})
    assert torch.equal(model2.weight, model.weight)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_no_pickle_loading_anywhere():
    offenders = []
    for f in (ROOT / "deepport").rglob("*.py"):
        text = f.read_text()
        for bad in ("weights_only=False", "pickle.load", "import pickle", "torch.load("):
            if bad in text:
                offenders.append(f"{f.relative_to(ROOT)}: {bad}")
    assert not offenders, offenders


# --- plugins ----------------------------------------------------------------------------------------------------

def _plugin(site: Path, package: str, module: str, body: str, entry: str | None = None) -> None:
    """A pip-installed-looking plugin: module + dist-info with a `deepport` entry point."""
    (site / module).mkdir(parents=True)
    (site / module / "__init__.py").write_text(textwrap.dedent(body))
    dist = site / f"{package}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[deepport]\n{entry or module} = {module}\n")


BACKEND = '''
    from deepport.core.plugins import hookimpl
    from deepport.core.registry import Backend, Probe
    {extra}
    @hookimpl
    def deepport_backends():
        return [Backend(name="{name}", device_type="{device}", probe={probe}, load={load},
                        dtypes=frozenset({{"bf16", "fp32"}}))]
'''


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A directory on sys.path (as site-packages is) for throwaway plugins; modules are forgotten afterwards."""
    s = tmp_path / "site"
    s.mkdir()
    monkeypatch.syspath_prepend(str(s))
    before = set(sys.modules)
    yield s
    for name in set(sys.modules) - before:
        if name.startswith("dp13_"):
            del sys.modules[name]


def _rows(capsys):
    assert cli.main(["backends", "--json"]) == 0
    return {r["name"]: r for r in json.loads(capsys.readouterr().out)}


PLUGIN_CASES = [
    ("import_error", [("dp13-broken", "dp13_broken", "raise ImportError('needs libfoo.so')", None)],
     "dp13_broken", "failed to import: ImportError: needs libfoo.so"),
    ("system_exit", [("dp13-exits", "dp13_exits", "raise SystemExit(3)", None)],
     "dp13_exits", "failed to import: SystemExit: 3"),
    ("hook_raises", [("dp13-hook", "dp13_hook", BACKEND.format(
        extra="", name="x", device="cpu", probe="None", load="None").replace(
        "return [", "raise RuntimeError('no config'); return ["), None)],
     "dp13_hook", "raised in deepport_backends(): RuntimeError: no config"),
    ("duplicate_name", [
        ("dp13-one", "dp13_one", BACKEND.format(extra="", name="twin", device="cpu",
                                                 probe="lambda: Probe(True)", load="lambda: {}"), None),
        ("dp13-two", "dp13_two", BACKEND.format(extra="", name="twin", device="cpu",
                                                 probe="lambda: Probe(True)", load="lambda: {}"), None)],
     "twin", "provided by both package"),
]


@pytest.mark.parametrize("name,plugins,backend,needle", PLUGIN_CASES, ids=[c[0] for c in PLUGIN_CASES])
def test_broken_plugin_is_an_unavailable_backend_not_a_crash(name, plugins, backend, needle, site, capsys):
    for package, module, body, entry in plugins:
        _plugin(site, package, module, body, entry)
    rows = _rows(capsys)
    assert not rows[backend]["available"] and needle in rows[backend]["reason"], rows[backend]
    assert "DEEPPORT_PLUGINS_AUTOLOAD=0" in rows[backend]["reason"]
    if name == "duplicate_name":
        assert "dp13-one" in rows[backend]["reason"] and "dp13-two" in rows[backend]["reason"]
    assert rows["cpu_ref"]["available"]
    rc, err = main(GEN, capsys)
    assert rc == 0, err
    rc, err = main(["generate", "--backend", backend, "--max-new-tokens", "2"], capsys)
    assert_one_line(rc, err, "is not available here")


def test_hanging_probe_times_out(site, capsys, monkeypatch):
    _plugin(site, "dp13-slow", "dp13_slow", BACKEND.format(
        extra="import time", name="slowchip", device="npu", probe="lambda: time.sleep(30) or Probe(True)",
        load="lambda: {}"))
    monkeypatch.setenv("DEEPPORT_PROBE_TIMEOUT", "0.5")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # else cuda and rocm count as available under auto
    start = time.time()
    rows = _rows(capsys)
    assert not rows["slowchip"]["available"] and "probe timed out after 0.5s" in rows["slowchip"]["reason"]
    rc, err = main(["generate", "--max-new-tokens", "2"], capsys)  # auto probes it too: not hung, not picked
    assert rc == 0, err
    assert time.time() - start < 20


def test_auto_skips_a_plugin_whose_load_fails(site, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # else cuda and rocm count as available under auto
    _plugin(site, "dp13-noload", "dp13_noload", BACKEND.format(
        extra="def _load():\n        raise OSError('libchip.so: cannot open shared object file')\n", name="noload",
        device="npu", probe="lambda: Probe(True, 'chip found')", load="_load"))
    rc, err = main(["generate", "--max-new-tokens", "2"], capsys)
    assert rc == 0, err
    assert "auto selection skips backend 'noload'" in err and "libchip.so" in err
    assert "DEEPPORT_PLUGINS_AUTOLOAD=0" in err
    assert registry.select().name in registry.CPU_DEFAULTS


# --- numbers while running --------------------------------------------------------------------------------------

NAN_OP = '''
    import torch
    from deepport.core.plugins import hookimpl
    from deepport.core.registry import Backend, Probe

    def _load():
        from deepport.backends.cpu_ref import ops

        def silu_mul(x):
            y = ops.silu_mul(x)
            return y.masked_fill(torch.arange(y.shape[-1], device=y.device) == 3, float("nan"))
        return {"silu_mul": silu_mul}

    @hookimpl
    def deepport_backends():
        return [Backend(name="nanchip", device_type="cpu", probe=lambda: Probe(True), load=_load,
                        dtypes=frozenset({"bf16", "fp32"}))]
'''


@pytest.mark.parametrize("mtp", [False, True])
@pytest.mark.parametrize("check_finite", ["0", "1"])
def test_nan_from_an_op_names_the_op(check_finite, mtp, site, capsys, monkeypatch):
    _plugin(site, "dp13-nan", "dp13_nan", NAN_OP)
    monkeypatch.setenv("DEEPPORT_CHECK_FINITE", check_finite)
    rc, err = main(["generate", "--backend", "nanchip", "--dtype", "fp32", "--max-new-tokens", "3"]
                   + (["--mtp"] if mtp else []), capsys)
    assert_one_line(rc, err, "op 'silu_mul' of backend 'nanchip'")
    assert "produced" in err and "non-finite" in err and "deepport conformance --backend nanchip --ops silu_mul" in err
    if check_finite == "0":
        assert "logits are NaN/inf" in err  # found by the decode loop, then located by the replay
