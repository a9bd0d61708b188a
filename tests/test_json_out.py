"""One --json convention for every subcommand (deepport/json_out.py): a bare `--json` puts exactly one JSON
document on stdout (everything else goes to stderr); `--json FILE` writes it there atomically and the usual
output still prints. Each subcommand is run with its cheapest arguments."""
import json
import os
import subprocess
import sys
import pytest

from deepport import cli, json_out
from deepport.core import output_dir

# subcommand -> argv without --json (tiny shapes, 2 new tokens, one op). "{tmp}" is the test's directory.
COMMANDS = {
    "backends": ["backends"],
    "generate": ["generate", "--backend", "cpu_ref", "--max-new-tokens", "2", "--prompt", "def f("],
    "bench": ["bench", "--backend", "cpu_ref", "--max-new-tokens", "2", "--repeats", "1", "--prompt", "def f("],
    "bench ops": ["bench", "ops", "--backend", "cpu_ref", "--smoke", "--op", "fp8_gemm"],
    "conformance": ["conformance", "--backend", "cpu_ref", "--ops", "silu_mul,rms_norm"],
    "conformance --list": ["conformance", "--list", "--ops", "silu_mul"],
    "export-onnx": ["export-onnx", "--output", "{tmp}/m.onnx", "--force"],
    "hardware-report": ["hardware-report", "--smoke", "--backend", "cpu_ref", "--stages", "backends",
                        "--budget-s", "60", "--output", "{tmp}/hw"],
}
# entry points run as modules (their own parsers, same helper): a subprocess each
MODULES = {
    "compile_check --launch": ["deepport.kernels.compile_check", "--launch", "--target", "cuda:90", "--op", "silu_mul",
                               "--config", "0"],
    "hardware_report model-check": ["deepport.hardware_report", "model-check", "--backend", "cpu_ref", "--dtypes",
                                    "bf16", "--steps", "2"],
}


def _run(argv, tmp_path, capfd):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc = cli.main(argv)
    out, err = capfd.readouterr()
    assert rc == 0, err[-3000:]
    return out, err


def _shape(doc):
    return sorted(doc) if isinstance(doc, dict) else (type(doc).__name__, sorted(doc[0]) if doc else None)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_bare_json_is_one_document_on_stdout_and_json_file_is_written(name, tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out, err = _run(COMMANDS[name] + ["--json"], tmp_path, capfd)
    doc = json.loads(out)  # the whole of stdout: one document, nothing else
    assert doc, out

    report = tmp_path / "sub" / "r.json"
    report.parent.mkdir()
    report.write_text("an older report")  # replaced, as reports are
    out, err = _run(COMMANDS[name] + ["--json", str(report)], tmp_path, capfd)
    assert _shape(json.loads(report.read_text())) == _shape(doc)
    assert out.strip(), "the usual output must still print with --json FILE"
    assert f"wrote {report}" in err
    assert sorted(p.name for p in report.parent.iterdir()) == ["r.json"], "a temporary was left beside the report"


def _module_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile_check: real JITFunctions
    return {**env, "OMP_NUM_THREADS": "1", "DEEPPORT_PROGRESS": "0", "TRITON_CACHE_DIR": str(tmp_path / "tc")}


@pytest.mark.parametrize("name", list(MODULES))
def test_module_entry_points_follow_the_same_convention(name, tmp_path):
    cmd = [sys.executable, "-m", *MODULES[name]]
    r = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=300, env=_module_env(tmp_path),
                       cwd=tmp_path)
    if r.returncode and name.startswith("compile_check") and any(t in r.stdout for t in ("ptxas", "No such file")):
        pytest.skip(f"a compiler tool is missing here: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    report = tmp_path / "r.json"
    r = subprocess.run(cmd + ["--json", str(report)], capture_output=True, text=True, timeout=300,
                       env=_module_env(tmp_path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _shape(json.loads(report.read_text())) == _shape(doc) and r.stdout.strip()


def test_generate_json_in_a_real_process_keeps_notices_off_stdout():
    """The served-as notice and the generated text go to stderr: stdout is the document alone."""
    r = subprocess.run([sys.executable, "-m", "deepport", *COMMANDS["generate"][:-2], "--backend", "cpu",
                        "--json"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["backend"] == "cpu" and len(doc["tokens"]) == 2
    assert "FP8 checkpoint served as fp32" in r.stderr and "# prefill" in r.stderr


def test_dash_means_stdout_and_help_states_the_convention(capsys):
    assert cli.build_parser().parse_args(["backends", "--json", "-"]).json == json_out.STDOUT
    with pytest.raises(SystemExit):
        cli.main(["conformance", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--json [FILE]" in text and "on stdout with a bare --json" in text


@pytest.mark.parametrize("argv", [["generate", "--max-new-tokens", "2"], ["bench"], ["bench", "ops", "--smoke"],
                                  ["export-onnx", "--output", "x.onnx"], ["backends"]])
def test_unwritable_json_file_is_refused_before_any_work(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv + ["--json", str(tmp_path / "missing" / "r.json")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "does not exist; create it first" in err and len(err.strip().splitlines()) == 1


def test_a_failed_write_leaves_the_old_report_and_no_temporary(tmp_path, monkeypatch):
    report = tmp_path / "r.json"
    report.write_text('{"old": true}')

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(output_dir.os, "replace", crash)
    with pytest.raises(OSError):
        json_out.emit_json({"new": True}, str(report))
    assert json.loads(report.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_bench_json_before_ops_is_refused_with_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a bare --json before a sub-command takes it as FILE: said, not written to
    assert cli.main(["bench", "--json", "ops"]) == 2
    assert "deepport bench ops --json" in capsys.readouterr().err and not (tmp_path / "ops").exists()


@pytest.mark.parametrize("writer,name", [("write_junit", "r.xml"), ("write_markdown", "r.md")])
def test_junit_and_markdown_reports_are_replaced_atomically(writer, name, tmp_path, monkeypatch):
    """--junit and --markdown reports go through the same temporary sibling + rename as --json FILE: the new
    report replaces the old one whole, and a failed write leaves the old one and no temporary."""
    import xml.etree.ElementTree as ET

    from deepport.conformance import report as rep

    r = rep.Report("cpu_ref", "reference", "quick", [rep.CaseResult("rms_norm", "rms_norm_bf16", "bf16", "pass",
                                                                     "native", 1e-3, 1e-3, 1e-2, 1e-2)])
    path = tmp_path / name
    path.write_text("old report")
    getattr(rep, writer)(r, str(path))
    text = path.read_text()
    assert "rms_norm_bf16" in text or "rms_norm" in text
    if name.endswith(".xml"):
        assert ET.fromstring(text.encode()).attrib["tests"] == "1"
    assert [p.name for p in tmp_path.iterdir()] == [name]

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(output_dir.os, "replace", crash)
    path.write_text("old report")
    with pytest.raises(OSError):
        getattr(rep, writer)(r, str(path))
    assert path.read_text() == "old report"
    assert [p.name for p in tmp_path.iterdir()] == [name]
