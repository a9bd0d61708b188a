"""Every command in README.md's ```bash blocks runs as written, or is in PLANS with what is changed and why.

Each command runs in a fresh temporary directory with HOME and DEEPPORT_CACHE there, so nothing is written into
the checkout or the user's cache. What this machine lacks is substituted, the same way everywhere (SUBSTITUTE,
FIXTURES), or named in a plan (an environment variable, a cheaper option appended, or a skip with the reason).
A README command with no plan fails test_every_readme_command_has_a_plan: the README cannot gain a command
that nobody runs. `[--opt]` in the README is optional: the command runs without it and once with each.
The set-up line (`bash scripts/setup.sh && ...`) and the test command are what CI runs (.ci/run).
"""
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
EMBEDDED = ROOT / "deepport" / "models" / "tiny" / "fp8"

# Placeholders in the README -> what runs here (token for token).
SUBSTITUTE = {
    "/path/to/DeepSeek-V3": "tiny",  # the DeepSeek-V3-shaped preset, materialised in the temporary DEEPPORT_CACHE
    "NAME": "cpu_ref",  # "your backend": the reference backend, always available
    "DIR": "trained",  # a new directory in the temporary working directory
}
# Files the commands expect in the working directory: `DeepSeek-V3` (convert's source) is the embedded FP8
# checkpoint, a real Hugging Face DeepSeek-V3-format directory with 128x128 block scales.
FIXTURES = {"DeepSeek-V3": EMBEDDED}
# Commands CI runs itself: .ci/run must run each (checked below), the test does not rerun set-up.
CI = ("bash scripts/setup.sh", "bash scripts/test.sh")
INTERPRETER = {"TRITON_INTERPRET": "1"}  # the Triton kernels on CPU tensors: --backend cuda/rocm without a GPU


@dataclass
class Plan:
    note: str = ""  # what differs from the README and why ("" = exactly as written, after SUBSTITUTE)
    env: dict = field(default_factory=dict)
    extra: tuple = ()  # appended options, only where the command as written would take long
    slow: bool = False
    skip: str = ""  # not run here: why
    expect: tuple = ()  # files it must write in the working directory


PLANS = {
    "bash scripts/setup.sh": Plan(skip="set-up: CI runs it (.ci/run, checked by test_ci_runs_the_readme_set_up)"),
    "bash scripts/test.sh": Plan(skip="the fast suite itself: CI runs it (.ci/run, checked)"),
    ".venv/bin/deepport generate": Plan(),  # the console script of the venv running the tests (setup.sh's .venv)
    "deepport backends": Plan(),
    "deepport generate --prompt 'def quicksort(xs):' --max-new-tokens 64": Plan(),
    "deepport generate --backend cuda --dtype fp8 --model tiny": Plan(
        "no GPU: the Triton kernels under the interpreter, 2 new tokens (the interpreter is slow)",
        INTERPRETER, ("--max-new-tokens", "2"), slow=True),
    "deepport generate --mtp --json": Plan(),
    "deepport convert DeepSeek-V3 out-bf16 --dtype bf16": Plan(expect=("out-bf16/config.json",)),
    "deepport convert DeepSeek-V3 out-fnuz --dtype fp8 --fp8-format e4m3fnuz": Plan(expect=("out-fnuz/config.json",)),
    "deepport bench --mtp": Plan(),
    "deepport generate --compile": Plan("torch.compile takes ~40 s here", slow=True),
    "deepport generate --compile --graphs": Plan(skip="CUDA/HIP graphs need a GPU (on cpu: a one-line error, "
                                                      "tests/test_compile.py)"),
    "deepport bench --compile": Plan("8 new tokens, 1 repeat: it compiles and profiles each variant (~80 s)",
                                     extra=("--max-new-tokens", "8", "--repeats", "1"), slow=True),
    "deepport bench --compile --graphs": Plan(skip="CUDA/HIP graphs need a GPU"),
    "deepport bench --compare transformers": Plan("6 new tokens, 1 repeat: transformers runs beside it (~20 s)",
                                                  extra=("--max-new-tokens", "6", "--repeats", "1"), slow=True),
    "deepport bench --compare transformers --compile": Plan(
        "4 new tokens, 1 repeat: it compiles the step, then runs transformers beside it",
        extra=("--max-new-tokens", "4", "--repeats", "1"), slow=True),
    "deepport bench --mtp --compile": Plan("4 new tokens, 1 repeat: it compiles the verification and draft steps",
                                           extra=("--max-new-tokens", "4", "--repeats", "1"), slow=True),
    "deepport export-onnx --output tiny.onnx": Plan(expect=("tiny.onnx",)),
    "deepport export-onnx --output tiny.onnx --decode": Plan(expect=("tiny.onnx",)),
    "deepport export-onnx --output tiny.onnx --dtype fp8": Plan(expect=("tiny.onnx",)),
    "deepport train-tiny --output trained": Plan("2 optimizer steps instead of 1500 (~17-20 min)",
                                                 extra=("--steps", "2"), slow=True, expect=("trained/config.json",)),
    "deepport conformance --backend cpu_ref --tier quick": Plan(),
    "deepport conformance --backend cuda --dtype all --json r.json --junit r.xml --markdown r.md": Plan(
        "no GPU: under the interpreter", INTERPRETER, slow=True, expect=("r.json", "r.xml", "r.md")),
    "deepport conformance --backend cpu_ref --tier full --model-check": Plan(
        "two ops of the full tier (every op at full dims: ~4-5 min, tests/test_conformance.py's slow test)",
        extra=("--ops", "silu_mul,rms_norm"), slow=True),
    "TRITON_INTERPRET=1 deepport conformance --backend rocm --dtype all": Plan(slow=True),
    "deepport conformance --backend cpu_ref --cross-check onnxruntime": Plan(),
    "pytest --deepport-backend cpu_ref --pyargs deepport.conformance.suite": Plan(),
    "torchrun --nproc-per-node 8 -m deepport generate --model DeepSeek-V3 --tp 8": Plan(
        skip="8 ranks on a DeepSeek-V3 checkpoint (TP generate on 2 ranks: tests/test_parallel.py)"),
    "torchrun --nproc-per-node 8 -m deepport generate --model DeepSeek-V3 --tp 2 --ep 4": Plan(
        skip="8 ranks on a DeepSeek-V3 checkpoint (TP=2+EP=2 on 4 ranks: tests/test_parallel.py, slow)"),
    "torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id run1 -m deepport "
    "generate --model DeepSeek-V3 --ep 16 --dp-attention": Plan(skip="two nodes"),
    "torchrun --nproc-per-node 2 -m deepport conformance --backend cpu_ref --model-check --tp 2": Plan(slow=True),
}


def _variants(tokens):
    """`[--opt]` / `[--opt value]` groups: the command without them, then with each one."""
    base, groups, group = [], [], None
    for t in tokens:
        if group is None and t.startswith("["):
            group, t = [], t[1:]
        if group is None:
            base.append(t)
            continue
        closed = t.endswith("]")
        group.append(t[:-1] if closed else t)
        if closed:
            groups.append((len(base), group))
            group = None
    out = [base]
    for at, g in groups:
        out.append(base[:at] + g + base[at:])
    return out


def readme_commands(text: str) -> list[str]:
    """Each command of the ```bash blocks of `text` (`&&` splits, `[...]` expanded, SUBSTITUTE applied)."""
    cmds = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            while tokens:
                part = tokens[:tokens.index("&&")] if "&&" in tokens else tokens
                tokens = tokens[len(part) + 1:]
                for v in _variants(part):
                    cmds.append(shlex.join(SUBSTITUTE.get(t, t) for t in v))
    return cmds


COMMANDS = readme_commands(README.read_text())


def unplanned(commands):
    """(README commands without a plan, plans for commands the README no longer has)."""
    return [c for c in commands if c not in PLANS], [c for c in PLANS if c not in commands]


def test_every_readme_command_has_a_plan():
    missing, stale = unplanned(COMMANDS)
    assert not missing, ("README commands that nobody runs; add each to PLANS (run as written, with a stated "
                         f"substitution, or a skip with the reason): {missing}")
    assert not stale, f"PLANS entries for commands the README no longer has: {stale}"
    assert all(p.skip or not p.extra or p.note for p in PLANS.values()), "an override without its reason"


def test_a_new_readme_command_is_caught():
    text = README.read_text() + "\n```bash\ndeepport serve --port 8000 [--tp 2]   # a new command\n```\n"
    missing, stale = unplanned(readme_commands(text))
    assert missing == ["deepport serve --port 8000", "deepport serve --port 8000 --tp 2"] and not stale


def test_ci_runs_the_readme_set_up_and_test_command():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for cmd in CI:
        assert cmd in lines, f".ci/run does not run README's `{cmd}`"
    assert lines.index(CI[0]) < lines.index(CI[1])


def _program(tokens):
    """argv for a README command: `deepport`, `torchrun`, `pytest` (and `.venv/bin/...`) from this venv."""
    name = tokens[0].removeprefix(".venv/bin/")
    if name in ("deepport", "torchrun", "pytest"):
        exe = BIN / name
        return ([str(exe)] if exe.exists() else [sys.executable, "-m", name]) + tokens[1:]
    return tokens


def _env(home: Path, plan: Plan, prefix: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEEPPORT_", "TRITON_"))}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), DEEPPORT_CACHE=str(home / "deepport-cache"),
               TORCHINDUCTOR_CACHE_DIR=str(home / "inductor"), OMP_NUM_THREADS="1")
    return {**env, **prefix, **plan.env}


def _snapshot():
    return sorted((str(p), p.stat().st_mtime_ns) for p in EMBEDDED.rglob("*"))


def _run(cmd: str, tmp_path: Path):
    plan = PLANS[cmd]
    tokens = shlex.split(cmd)
    prefix = {}
    while tokens and re.fullmatch(r"[A-Z_]+=\S*", tokens[0]):
        k, v = tokens.pop(0).split("=", 1)
        prefix[k] = v
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    for name, target in FIXTURES.items():
        (work / name).symlink_to(target)
    before = _snapshot()
    r = subprocess.run(_program(tokens + list(plan.extra)), cwd=work, env=_env(home, plan, prefix),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert _snapshot() == before, "the shipped model was written"
    for f in plan.expect:
        assert (work / f).is_file(), f"{cmd}: {f} was not written"
    if "--json" in tokens and (tokens[-1] == "--json" or tokens[tokens.index("--json") + 1].startswith("-")):
        json.loads(r.stdout)  # bare --json: stdout is one JSON document
    if tokens[0] == "pytest":
        assert re.search(r"\d+ passed", r.stdout) and " skipped" not in r.stdout, r.stdout[-2000:]
    if "tiny" in tokens:
        assert any((home / "deepport-cache").iterdir()), "the preset was not materialised in the temporary cache"


def _params(slow: bool):
    return [c for c in dict.fromkeys(COMMANDS) if c in PLANS and not PLANS[c].skip and PLANS[c].slow == slow]


@pytest.mark.parametrize("cmd", _params(slow=False))
def test_readme_command_runs(cmd, tmp_path):
    _run(cmd, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("cmd", _params(slow=True))
def test_readme_command_runs_slow(cmd, tmp_path):
    _run(cmd, tmp_path)
