"""Outputs never mix or overwrite silently: convert, train-tiny, export-onnx and preset materialisation."""
import gc
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from deepport import cli, models
from deepport.core import convert as convert_mod
from deepport.core import output_dir
from deepport.core.checkpoint import convert
from deepport.core.output_dir import OutputError

SHIPPED = models.TINY_DIR / "fp8"
ROOT = Path(__file__).resolve().parent.parent


def _digest(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def _old_sharded(d: Path) -> None:
    """An older sharded bf16 checkpoint (index + 6 shards) in d."""
    convert(SHIPPED, d, "bf16", max_shard_bytes=4 << 20)
    assert (d / "model.safetensors.index.json").is_file() and len(list(d.glob("model-*.safetensors"))) > 1


def _run(*argv, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "deepport", *argv], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "DEEPPORT_PROGRESS": "0", **(env or {})}, timeout=300)


def test_convert_refuses_old_checkpoint_and_force_replaces_it(tmp_path, capsys):
    dst = tmp_path / "out"
    _old_sharded(dst)
    before = _digest(dst)
    rc = cli.main(["convert", str(SHIPPED), str(dst), "--dtype", "fp32"])
    err = capsys.readouterr().err
    assert rc == 2 and "is not empty" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert _digest(dst) == before
    assert cli.main(["convert", str(SHIPPED), str(dst), "--dtype", "fp32", "--force"]) == 0
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "float32"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporaries left behind"


def test_convert_refuses_its_source(tmp_path):
    src = tmp_path / "src"
    _old_sharded(src)
    before = _digest(src)
    for dst in (src, src / "inner", tmp_path):
        with pytest.raises(OutputError, match="source"):
            convert(src, dst, "fp32", force=True)
    assert _digest(src) == before


def test_convert_into_empty_dir_streams_shards_with_the_same_tensors(tmp_path):
    from safetensors.torch import load_file

    dst = tmp_path / "empty"
    dst.mkdir()
    convert(SHIPPED, dst, "bf16", max_shard_bytes=4 << 20)
    convert(SHIPPED, tmp_path / "one", "bf16")
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in dst.glob("model-*.safetensors")}
    whole = load_file(tmp_path / "one" / "model.safetensors")
    sharded = {}
    for p in dst.glob("model-*.safetensors"):
        sharded.update(load_file(p))
    assert sharded.keys() == whole.keys() and all(torch.equal(sharded[k], whole[k]) for k in whole)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in whole.values())


def _live_tensor_bytes() -> int:
    storages = {}
    with warnings.catch_warnings():  # isinstance() on every object wakes deprecated module attributes
        warnings.simplefilter("ignore")
        objects = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for o in objects:
        if o.device.type == "cpu":
            try:
                s = o.untyped_storage()
                storages[s.data_ptr()] = s.nbytes()
            except RuntimeError:  # fake tensors an earlier torch.compile test left alive hold no data
                continue
    return sum(storages.values())


def test_convert_holds_one_output_shard_at_a_time(tmp_path, monkeypatch):
    """fp8 -> fp32 quadruples the bytes: the whole output (46 MiB) must never be held, only ~one 2 MiB shard."""
    held, real_save = [], convert_mod.save_file

    def spy(tensors, path, metadata=None):
        held.append(_live_tensor_bytes() - base)
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(convert_mod, "save_file", spy)
    gc.collect()
    base = _live_tensor_bytes()
    shard = 2 << 20
    convert(SHIPPED, tmp_path / "fp32", "fp32", max_shard_bytes=shard)
    total = sum(p.stat().st_size for p in (tmp_path / "fp32").glob("*.safetensors"))
    largest = 4 * _largest_numel()  # the biggest fp32 tensor written
    assert len(held) > 10 and total > 40 << 20
    assert max(held) <= shard + 3 * largest, (max(held), shard, largest, total)


def _largest_numel() -> int:
    from safetensors import safe_open

    with safe_open(str(SHIPPED / "model.safetensors"), framework="pt") as f:
        return max(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())


KILL_MID_CONVERT = textwrap.dedent("""
    import os, signal, sys
    import deepport.core.checkpoint as ck
    import deepport.core.convert as cv
    real = cv.save_file
    def save_then_die(*a, **k):
        real(*a, **k)
        os.kill(os.getpid(), signal.SIGKILL)  # a kill after the first shard hit the disk
    cv.save_file = ck.save_file = save_then_die
    ck.convert(sys.argv[1], sys.argv[2], "fp32", force=True, max_shard_bytes=1 << 20)
""")


def test_killed_convert_leaves_destination_untouched_and_is_cleaned(tmp_path):
    dst = tmp_path / "out"
    _old_sharded(dst)
    before = _digest(dst)
    p = subprocess.run([sys.executable, "-c", KILL_MID_CONVERT, str(SHIPPED), str(dst)], capture_output=True)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert _digest(dst) == before, "a killed convert changed the destination"
    stale = [q for q in tmp_path.iterdir() if output_dir.TMP_TAG in q.name]
    assert len(stale) == 1 and list(stale[0].glob("part-*.safetensors"))
    convert(SHIPPED, dst, "fp32", force=True)
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".")], "stale temporary not cleaned"
    assert not (dst / "model.safetensors.index.json").exists()


def test_stale_cleaning_keeps_live_writers_and_restores_an_interrupted_replace(tmp_path):
    dst = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    live_tmp = tmp_path / f".out{output_dir.TMP_TAG}{host}-{os.getpid()}-aaaa"
    dead_tmp = tmp_path / f".out{output_dir.TMP_TAG}{host}-{dead.pid}-bbbb"
    dead_old = tmp_path / f".out{output_dir.OLD_TAG}{host}-{dead.pid}-cccc"
    for d in (live_tmp, dead_tmp, dead_old):
        d.mkdir()
        (d / "config.json").write_text("{}")
    output_dir.clean_stale(dst)
    assert live_tmp.is_dir() and not dead_tmp.exists() and not dead_old.exists()
    assert (dst / "config.json").is_file(), "the previous output of a replace killed between its renames is back"


def test_failed_writer_leaves_nothing(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with output_dir.staged_dir(dst) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("writer died")
    assert list(tmp_path.iterdir()) == []


def test_train_tiny_refuses_the_installed_model_before_training(capsys):
    before = _digest(SHIPPED)
    t0 = time.perf_counter()
    rc = cli.main(["train-tiny", "--steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "inside the installed deepport package" in err and "--force" in err
    assert time.perf_counter() - t0 < 5, "refused only after training"
    assert _digest(SHIPPED) == before


def test_train_tiny_refuses_a_non_empty_output(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert cli.main(["train-tiny", "--micro", "--steps", "1", "--output", str(tmp_path)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_outputs_refuse_paths_holding_the_package_or_the_cwd(tmp_path, monkeypatch):
    pkg = output_dir.package_dir()
    with pytest.raises(OutputError, match="contains the deepport package"):
        output_dir.check(pkg.parent, force=True)
    with pytest.raises(OutputError, match="inside the installed deepport package"):
        output_dir.check(pkg / "models" / "new")
    output_dir.check(pkg / "models" / "new", force=True)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x").write_text("x")
    with pytest.raises(OutputError, match="current directory"):
        output_dir.check(tmp_path, force=True)


def test_export_onnx_refuses_existing_file_before_tracing(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")
    t0 = time.perf_counter()
    assert cli.main(["export-onnx", "--output", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == b"old"
    assert time.perf_counter() - t0 < 5


def test_staged_files_replace_never_merge(tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")
    (tmp_path / "m.onnx.data").write_bytes(b"old weights")
    with pytest.raises(OutputError, match="exists"):
        with output_dir.staged_files(out, companions=(".data",)):
            pass
    with output_dir.staged_files(out, force=True, companions=(".data",)) as tmp:
        tmp.write_bytes(b"new")  # this export keeps its weights inside: the old .data must go
    assert out.read_bytes() == b"new" and not (tmp_path / "m.onnx.data").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


MATERIALISE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from deepport.models import materialise
    Path(sys.argv[2]).write_text("ready")
    while not Path(sys.argv[1]).exists():
        time.sleep(0.01)
    print(materialise("tiny", True))
""")


def test_concurrent_materialisation_both_succeed(tmp_path):
    cache = tmp_path / "cache"
    go = tmp_path / "go"
    env = {**os.environ, "DEEPPORT_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", MATERIALISE, str(go), str(tmp_path / f"ready{i}")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)) and time.time() < deadline:
        time.sleep(0.02)
    go.write_text("go")
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-1500:] for o in outs]
    assert outs[0][0] == outs[1][0]
    entry = Path(outs[0][0].strip())
    assert sorted(p.name for p in entry.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert not [p for p in cache.iterdir() if output_dir.TMP_TAG in p.name or p.name.endswith(".tmp")]
