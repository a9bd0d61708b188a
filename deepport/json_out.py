"""One `--json` convention for every subcommand.

`--json` alone: the command's JSON document is the only thing on stdout (one document `json.loads` accepts);
the human-readable output goes to stderr. `--json FILE`: the document is written to FILE (a temporary sibling
renamed over it, so a reader never sees half a report) and the human output prints as usual. `--json -` is
stdout, as the bare flag. FILE is checked writable when the command line is parsed, before any work.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

from deepport.core.errors import ConfigError

STDOUT = "-"
_real_stdout = None  # while a bare --json command runs: the stdout that only emit_json writes to


def _destination(text: str) -> str:
    """--json FILE: refused now (one line, exit 2) when FILE cannot be written."""
    if text == STDOUT:
        return text
    from deepport import cli_checks

    try:
        cli_checks.check_writable(text, "")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).strip()) from None
    return text


def add_json_argument(parser, what: str = "the report") -> None:
    """Add `--json [FILE]` to an argparse parser (dest `json`: None, "-" for stdout, or a path)."""
    parser.add_argument("--json", nargs="?", const=STDOUT, default=None, metavar="FILE", type=_destination,
                        help=f"{what} as one JSON document: on stdout with a bare --json (other output goes to "
                             f"stderr), or written to FILE (the usual output still prints)")


@contextlib.contextmanager
def stdout_reserved(dest):
    """Around a command: with a bare --json everything it prints to stdout goes to stderr instead, so that
    stdout carries only the document emit_json writes. A no-op otherwise."""
    global _real_stdout
    if dest != STDOUT:
        yield
        return
    _real_stdout = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _real_stdout = None


def emit_json(doc, dest, *, indent: int = 2, **dumps_kwargs) -> None:
    """Write `doc` to dest: None does nothing, "-" prints it on stdout, a path is replaced atomically (and
    `wrote PATH` goes to stderr). dumps_kwargs go to json.dumps (e.g. default=str, allow_nan=False)."""
    if dest is None:
        return
    text = json.dumps(doc, indent=indent, **dumps_kwargs) + "\n"
    if dest == STDOUT:
        out = _real_stdout or sys.stdout
        out.write(text)
        out.flush()
        return
    from deepport.core import output_dir

    output_dir.write_text(dest, text)
    print(f"wrote {dest}", file=sys.stderr)
