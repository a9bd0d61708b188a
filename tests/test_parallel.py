"""Tensor / expert parallelism on CPU with gloo: ranks spawned as torchrun would (tests/parallel_worker.py),
compared with one process on the embedded default model and on Tiny-B (128-aligned per rank at TP=2)."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

import pytest
import torch

import deepport
from deepport import models
from deepport.core import distributed
from deepport.core.config import preset
from deepport.core.distributed import Layout
from deepport.core.errors import ConfigError
from deepport.core.parallel import check_split

from parallel_worker import IDS, collect, rows_for

WORKER = Path(__file__).with_name("parallel_worker.py")
ROOT = Path(__file__).resolve().parents[1]
# max |logits - one process| / max |one process|: fp32 is the 1e-5. bf16/fp8 row-parallel partials
# (and TP-split experts) round once per rank instead of once in total, and random tiny weights amplify
# one fp8 code flip; measured on Tiny-B TP=2: bf16 1.0e-2, fp8 3.0e-2 (EP alone: 0).
TOLERANCE = {"fp32": 1e-5, "bf16": 3e-2, "fp8": 6e-2}
WEIGHT_MARGIN = 0.05  # replicated per rank: norms, wq_a, wkv_a, router, eh_proj (2-4% of these models)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _materialise(model: str, dtype: str) -> None:
    """Write the preset before spawning, so ranks only read it."""
    if model != "collectives":
        models.resolve(None if model == "default" else model, fp8=dtype == "fp8")


def _spawn(tmp_path, model, dtype, tp, ep, timeout, extra):
    n = tp * ep
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(n),
           "OMP_NUM_THREADS": "1", "DEEPPORT_PROGRESS": "0", "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(tmp_path), model, dtype, str(tp), str(ep), *extra],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(n)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(1.0, timeout - (time.monotonic() - t0)))[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{n} ranks did not finish in {timeout}s (a hang)")
    return [p.returncode for p in procs], logs, time.monotonic() - t0


def run_ranks(tmp_path, model, dtype, tp, ep, timeout=300, extra=(), expect=0):
    """Spawn tp x ep ranks; every rank must exit with `expect`. Returns (per-rank results, return codes, seconds)."""
    _materialise(model, dtype)
    n = tp * ep
    codes, logs, seconds = _spawn(tmp_path, model, dtype, tp, ep, timeout, extra)
    if any(c != expect for c in codes) and any("address already in use" in log.lower() for log in logs):
        codes, logs, seconds = _spawn(tmp_path, model, dtype, tp, ep, timeout, extra)  # the port was taken meanwhile
    bad = [r for r in range(n) if codes[r] != expect]
    assert not bad, "\n".join(f"rank {r} exited {codes[r]}, expected {expect}:\n{logs[r][-3000:]}" for r in bad)
    results = []
    for r in range(n):
        f = tmp_path / f"rank{r}.pt"
        assert f.is_file(), f"rank {r} wrote no result (exit {codes[r]}):\n{logs[r][-3000:]}"
        results.append(torch.load(f))
    return results, codes, seconds


def _skip_unless_default_splits(model: str, dtype: str, tp: int, ep: int) -> None:
    """The embedded default may be replaced by a trained model whose widths do not split this way."""
    if model != "default":
        return
    from deepport.core.checkpoint import read_config
    from deepport.core.parallel import _split_problems

    args, _ = read_config(models.resolve(None, fp8=dtype == "fp8"))
    problems = _split_problems(args, tp, ep, dtype == "fp8")
    if problems:
        pytest.skip(f"the embedded default model does not split at --tp {tp} --ep {ep}: {'; '.join(problems)}")


@lru_cache(maxsize=None)
def one_process(model: str, dtype: str) -> dict:
    m = deepport.load(None if model == "default" else model, backend="cpu_ref", dtype=dtype)
    return collect(m)


def _max_rel(got, want) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def check_same_as_one_process(results, model, dtype, tp, ep):
    want = one_process(model, dtype)
    for r in results:
        assert "error" not in r, r.get("error")
        rel = _max_rel(r["logits"], want["logits"])
        assert rel <= TOLERANCE[dtype], f"rank {r['rank']}: logits differ by {rel:.2e} (> {TOLERANCE[dtype]})"
        assert r["tokens"] == want["tokens"], f"rank {r['rank']}: greedy tokens differ"
        assert r.get("mtp_tokens") == want.get("mtp_tokens"), f"rank {r['rank']}: MTP greedy tokens differ"
        # Rank 0 samples and broadcasts: every rank holds rank 0's draws.
        assert r["sampled"] == results[0]["sampled"]
        assert torch.equal(r["logits"], results[0]["logits"])
    if dtype == "fp32":
        assert results[0]["sampled"] == want["sampled"]
    return want


@pytest.mark.parametrize("model,dtype,tp,ep", [
    ("default", "fp32", 2, 1),
    ("default", "fp32", 1, 2),
    ("tiny-b", "bf16", 2, 1),
    ("tiny-b", "fp8", 1, 2),
])
def test_two_ranks_match_one_process(tmp_path, model, dtype, tp, ep):
    _skip_unless_default_splits(model, dtype, tp, ep)
    results, codes, _ = run_ranks(tmp_path, model, dtype, tp, ep)
    assert codes == [0] * (tp * ep)
    check_same_as_one_process(results, model, dtype, tp, ep)


def test_tp2_fp8_tiny_b_matches_and_each_rank_holds_half_the_weights(tmp_path):
    """Tiny-B at TP=2 in fp8 (every shard 128-aligned): same logits/tokens, and each rank's weights and the
    bytes it read from the safetensors files are about 1/2 of the whole (no rank materialises the model)."""
    results, codes, _ = run_ranks(tmp_path, "tiny-b", "fp8", 2, 1)
    assert codes == [0, 0]
    want = check_same_as_one_process(results, "tiny-b", "fp8", 2, 1)
    for r in results:
        share = r["weight_bytes"] / want["weight_bytes"]
        read = r["bytes_read"] / r["bytes_total"]
        assert 0.5 <= share <= 0.5 + WEIGHT_MARGIN, f"rank {r['rank']} holds {share:.3f} of the weights"
        assert read <= 0.5 + WEIGHT_MARGIN, f"rank {r['rank']} read {read:.3f} of the checkpoint"


@pytest.mark.slow  # 4 ranks on the shared 2-core CI machine: about 80 s
def test_tp2_ep2_four_ranks_match_one_process(tmp_path):
    results, codes, _ = run_ranks(tmp_path, "tiny-b", "fp32", 2, 2)
    assert codes == [0] * 4
    want = check_same_as_one_process(results, "tiny-b", "fp32", 2, 2)
    for r in results:  # attention/dense halved by TP, experts quartered (EP x TP-split I)
        assert r["weight_bytes"] / want["weight_bytes"] <= 0.25 + 2 * WEIGHT_MARGIN


@pytest.mark.slow
@pytest.mark.parametrize("model,dtype", [("tiny-b", "fp8"), ("default", "fp32")])
def test_tp2_ep2_four_ranks_slow_tier(tmp_path, model, dtype):
    _skip_unless_default_splits(model, dtype, 2, 2)
    results, codes, _ = run_ranks(tmp_path, model, dtype, 2, 2)
    assert codes == [0] * 4
    check_same_as_one_process(results, model, dtype, 2, 2)


# ------------------------------------------------------------------------------------- misconfiguration

def test_split_refusals_name_the_problem_and_the_sizes_that_fit():
    tiny, tiny_b = preset("tiny"), preset("tiny-b")
    with pytest.raises(ConfigError, match=r"n_heads 4 is not divisible by --tp 3.*--tp sizes that fit"):
        check_split(tiny, Layout(3, 1), fp8=False)
    with pytest.raises(ConfigError, match=r"n_routed_experts 16 is not divisible by --ep 3.*--ep sizes: 1, 2, 4, 8, 16"):
        check_split(tiny, Layout(1, 3), fp8=False)
    with pytest.raises(ConfigError, match=r"fp8 shard of .* is 96 per rank, not a multiple of the 128.*--dtype bf16"):
        check_split(tiny, Layout(2, 1), fp8=True)
    check_split(tiny, Layout(2, 1), fp8=False)  # bf16 shards need no alignment
    check_split(tiny_b, Layout(2, 2), fp8=True)
    with pytest.raises(ConfigError, match="fp8 shard"):
        check_split(tiny_b, Layout(4, 1), fp8=True)  # 64 rows per rank


def test_world_size_must_match_tp_times_ep(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match=r"needs 2 processes, but WORLD_SIZE is not set.*torchrun --nproc-per-node 2"):
        distributed.check_world(2, 1)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"--tp 2 x --ep 1 needs 2 processes, but this launch has 4"):
        distributed.check_world(2, 1)
    with pytest.raises(ConfigError, match="at least 1"):
        distributed.check_world(0, 1)


@pytest.mark.parametrize("dtype,tp,match", [
    ("fp8", 2, "fp8 shard of .* not a multiple of the 128"),  # Tiny-A: dense FFN 192 per rank
    ("fp32", 3, "n_heads 4 is not divisible by --tp 3"),
])
def test_misconfigured_run_fails_on_every_rank_without_hanging(tmp_path, dtype, tp, match):
    results, codes, seconds = run_ranks(tmp_path, "tiny", dtype, tp, 1, timeout=120, expect=3)
    assert codes == [3] * tp
    for r in results:
        assert "ConfigError" in r["error"]
        assert re.search(match, r["error"]), r["error"]
    assert seconds < 90  # refused before any collective, not after a timeout


# ----------------------------------------------------------------------------------------------- CLI

@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun is not installed beside this python")
def test_torchrun_generate_tp2_prints_once_and_matches_one_process(tmp_path):
    _skip_unless_default_splits("default", "fp32", 2, 1)
    _materialise("default", "fp32")
    want = one_process("default", "fp32")
    ids = ",".join(map(str, IDS[0].tolist()))
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DEEPPORT_PROGRESS": "0", "TMPDIR": str(tmp_path)}
    p = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "deepport", "generate", "--tp", "2",
                        "--backend", "cpu_ref", "--dtype", "fp32", "--prompt-ids", ids, "--max-new-tokens", "6",
                        "--json"], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [line for line in p.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected rank 0 alone to print, got:\n{p.stdout}"
    out = json.loads(lines[0])
    assert out["tokens"] == want["tokens"][0]
    assert out["parallel"] == {"tp": 2, "ep": 1}


@pytest.mark.slow  # two ranks compile their decode step: about a minute
@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun is not installed beside this python")
def test_torchrun_compiled_decode_tp2_matches_one_process(tmp_path):
    """`--compile` under torchrun: each rank compiles its own shard's step (the cpu backend's ops traced, the
    all-reduce inside the graph); the greedy tokens are one eager process's."""
    _skip_unless_default_splits("default", "fp32", 2, 1)
    _materialise("default", "fp32")
    want = one_process("default", "fp32")
    ids = ",".join(map(str, IDS[0].tolist()))
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DEEPPORT_PROGRESS": "0", "TMPDIR": str(tmp_path),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    p = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "deepport", "generate", "--tp", "2",
                        "--backend", "cpu", "--dtype", "fp32", "--compile", "--prompt-ids", ids,
                        "--max-new-tokens", "6", "--json"], env=env, capture_output=True, text=True, timeout=600,
                       cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["tokens"] == want["tokens"][0]
    assert out["parallel"] == {"tp": 2, "ep": 1}
    assert "graph break" not in p.stderr


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun is not installed beside this python")
def test_torchrun_conformance_model_check_tp2(tmp_path):
    """`deepport conformance --model-check --tp 2`: the sharded model's end-to-end checks against whole cpu_ref."""
    _skip_unless_default_splits("default", "bf16", 2, 1)
    _materialise("default", "bf16")
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DEEPPORT_PROGRESS": "0", "TMPDIR": str(tmp_path)}
    report = tmp_path / "report.json"
    p = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "deepport", "conformance",
                        "--backend", "cpu_ref", "--dtype", "bf16", "--ops", "silu_mul", "--model-check", "--tp", "2",
                        "--json", str(report)], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("deepport conformance: backend cpu_ref") == 1  # rank 0 reports
    rep = json.loads(report.read_text())
    model = [r for r in rep["results"] if r["op"] == "model"]
    from deepport.conformance.model_check import CHECKS

    assert {r["case"] for r in model} == {f"model_{c}_bf16" for c in CHECKS}
    assert all(r["status"] == "pass" for r in model)
    assert rep["parallel"] == {"tp": 2, "ep": 1}


def test_collective_contracts_carry_fp8_rows_with_uneven_splits(tmp_path):
    results, codes, _ = run_ranks(tmp_path, "collectives", "fp8", 1, 2)
    assert codes == [0, 0]
    for r in results:
        want = torch.cat([rows_for(q, r["rank"]) for q in range(2)])
        assert r["received"].dtype == torch.float8_e4m3fn
        assert torch.equal(r["received"].view(torch.uint8), want.view(torch.uint8))
        assert r["sum"].tolist() == [3.0, 3.0, 3.0]


@pytest.mark.parametrize("model,ckpt_fp8,dtype", [
    ("tiny", True, "fp32"),  # fp8 checkpoint dequantised at an unaligned split: whole blocks read, then trimmed
    ("tiny-b", True, "fp8"),  # fp8 kept: codes and their 128x128 scales sliced on block boundaries
    ("tiny-b", False, "bf16"),
])
def test_each_rank_loads_exactly_its_slices(model, ckpt_fp8, dtype):
    """In one process (no process group needed to load): every parameter of rank r under TP=2 and under
    EP=2 equals the matching slice of the whole model; the plan never reads another rank's experts."""
    from deepport.core import checkpoint, parallel, registry
    from deepport.core.distributed import World
    from deepport.core.model import Transformer

    path = models.resolve(model, fp8=ckpt_fp8)
    args, _ = checkpoint.read_config(path)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}[dtype]

    def build():
        table = registry.bind(registry.get_backend("cpu_ref"))
        fp8 = table.fp8 if dtype == "fp8" else None
        return Transformer(args, table, dtype=torch_dtype, fp8=fp8, device="meta"), fp8

    whole, fp8 = build()
    checkpoint.load_into(whole, path, torch_dtype, fp8, torch.device("cpu"))
    full = dict(whole.named_parameters())
    n_experts = args.n_routed_experts
    for tp, ep in ((2, 1), (1, 2)):
        for rank in range(tp * ep):
            lay = Layout(tp, ep, rank)
            t, _ = build()
            plan = parallel.apply(t, World(lay), fp8 is not None)
            checkpoint.load_into(t, path, torch_dtype, fp8, torch.device("cpu"), shard=plan)
            assert plan.bytes_read < plan.bytes_total
            for name, p in t.named_parameters():
                want = full[name]
                for d in range(p.dim()):
                    if p.shape[d] != want.shape[d]:
                        expert_dim = ".experts." in name and d == 0 and want.shape[0] == n_experts
                        part = lay.ep_rank if expert_dim else lay.tp_rank
                        want = want.narrow(d, part * p.shape[d], p.shape[d])
                assert p.shape == want.shape, name
                assert torch.equal(p.view(torch.uint8) if p.dtype.itemsize == 1 else p, want.view(torch.uint8)
                                   if want.dtype.itemsize == 1 else want), f"{name} differs on rank {rank} ({tp}x{ep})"


def test_ep2_data_parallel_attention_matches_and_caches_half_the_rows(tmp_path):
    """--dp-attention: each EP rank attends for its own sequences (row % 2) and its cache pools hold only those."""
    _skip_unless_default_splits("default", "fp32", 1, 2)
    results, codes, _ = run_ranks(tmp_path, "default", "fp32", 1, 2, extra=("dp",))
    assert codes == [0, 0]
    want = check_same_as_one_process(results, "default", "fp32", 1, 2)
    for r in results:  # IDS has 2 sequences: one per rank
        assert r["cache_bytes"] == want["cache_bytes"] // 2


def test_data_parallel_attention_needs_ep_without_tp():
    from deepport.core import dp_attention

    with pytest.raises(ConfigError, match="needs --tp 1 and --ep >= 2"):
        dp_attention.check(Layout(2, 1))
    with pytest.raises(ConfigError, match="needs --tp 1 and --ep >= 2"):
        dp_attention.check(None)
    dp_attention.check(Layout(1, 2))


def test_unused_checkpoint_tensors_are_never_read(tmp_path):
    """Layer-61-style copies of the embedding and extra MTP depths are skipped before reading, sharded or not."""
    from safetensors.torch import save_file

    from deepport.core import checkpoint, parallel, registry
    from deepport.core.distributed import World
    from deepport.core.model import Transformer

    src = models.resolve("tiny", fp8=False)
    args, _ = checkpoint.read_config(src)
    for f in ("config.json", "tokenizer.json", "model.safetensors"):
        shutil.copy(src / f, tmp_path / f)
    g = torch.Generator().manual_seed(5)
    extra = args.n_layers + args.n_mtp_layers
    save_file({f"model.layers.{args.n_layers}.embed_tokens.weight": torch.randn(args.vocab_size, args.dim, generator=g),
               f"model.layers.{extra}.mlp.gate.weight": torch.randn(args.n_routed_experts, args.dim, generator=g)},
              str(tmp_path / "extra.safetensors"))

    def load(path):
        t = Transformer(args, registry.bind(registry.get_backend("cpu_ref")), dtype=torch.float32, device="meta")
        plan = parallel.apply(t, World(Layout(2, 1, 0)), fp8=False)
        checkpoint.load_into(t, path, torch.float32, None, torch.device("cpu"), shard=plan)
        return t, plan

    (plain, plain_plan), (padded, padded_plan) = load(src), load(tmp_path)
    assert padded_plan.bytes_total == plain_plan.bytes_total  # the extra tensors were never offered to the plan
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), padded.parameters()))
    whole = deepport.load(src, backend="cpu_ref", dtype="fp32").transformer
    padded_whole = deepport.load(tmp_path, backend="cpu_ref", dtype="fp32").transformer  # unsharded: skipped too
    assert all(torch.equal(p, q) for p, q in zip(whole.parameters(), padded_whole.parameters()))


@pytest.mark.slow  # Triton interpreter: about a minute
@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun is not installed beside this python")
def test_torchrun_cuda_backend_tp2_under_the_interpreter(tmp_path):
    """The cuda backend's Triton kernels (TRITON_INTERPRET=1, so CPU tensors and gloo) at TP=2: the same
    greedy tokens as cpu_ref in one process. Evidence label: interpreter."""
    _skip_unless_default_splits("default", "bf16", 2, 1)
    _materialise("default", "bf16")
    prompt = [5, 6, 7, 8]
    want = deepport.load(None, backend="cpu_ref", dtype="bf16").generate(prompt, max_new_tokens=3).tokens
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "DEEPPORT_PROGRESS": "0",
           "TMPDIR": str(tmp_path)}
    p = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "deepport", "generate", "--tp", "2",
                        "--backend", "cuda", "--dtype", "bf16", "--prompt-ids", ",".join(map(str, prompt)),
                        "--max-new-tokens", "3", "--json"], env=env, capture_output=True, text=True, timeout=600,
                       cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["backend"] == "cuda" and out["tokens"] == want


_SHUTDOWN_SCRIPT = """
import os, sys, time
import torch.distributed as dist
from deepport.core import distributed
distributed.SHUTDOWN_BARRIER_S = 2.0
dist.init_process_group("gloo")
if int(os.environ["RANK"]) == 1:
    time.sleep(6)  # never reaches shutdown in time
    os._exit(0)
distributed.shutdown()
print("left", flush=True)
"""


def test_shutdown_says_when_a_peer_never_arrives_and_still_leaves(tmp_path):
    """gloo ranks meet at a barrier before leaving the group; when a peer does not come (it failed), the rank
    says so in one line and leaves anyway instead of hanging or staying silent."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", _SHUTDOWN_SCRIPT], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    out, err = procs[0].communicate(timeout=60)
    procs[1].communicate(timeout=60)
    assert procs[0].returncode == 0, err[-2000:]
    assert "left" in out
    assert "deepport: rank 0: not every rank reached the end within 2 s" in err


_EXIT_SCRIPT = """
import atexit, sys
import torch.distributed as dist
from deepport.core import distributed
assert distributed.exit_after_group(4) == 4  # no group left yet: a plain return
dist.init_process_group("gloo")
distributed.shutdown()
atexit.register(lambda: print(" and the teardown ran"))  # skipped: the process ends before teardown
print("printed before the exit", end="")  # unflushed: exit_after_group flushes it
sys.exit(distributed.exit_after_group(7))
"""


def test_a_rank_that_left_its_group_exits_with_its_code_and_its_output():
    """After leaving a gloo group the process ends at once (no interpreter teardown, where gloo's threads could
    abort a finished rank) with the code it was given and its printed output intact."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "1",
           "RANK": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 7, p.stderr[-2000:]
    assert p.stdout == "printed before the exit"
