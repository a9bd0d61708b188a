"""Command-line checks that run before any work: argument types with one-line errors, output paths that must
be writable, and the parser every subcommand uses (defaults shown in --help, one-line usage errors)."""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from deepport.core.errors import ConfigError


class Formatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already states its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default is None
                or action.default is argparse.SUPPRESS or isinstance(action.default, bool)):
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with defaults in --help and usage errors on one line (exit 2), as deepport's own errors."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} must be at least {low}" if low else f"{value} must be >= 0")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (counts, sizes, ranks)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0 (warm-up steps, optional counts)."""
    return _int_at_least(text, 0)


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (rates, time budgets)."""
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (loss weights, update speeds)."""
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return value


def seed(text: str) -> int:
    """A random seed: an integer in [0, 2**63)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer seed") from None
    if not 0 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"{value} is outside [0, 2**63)")
    return value


def temperature(text: str) -> float:
    """A sampling temperature: finite and >= 0 (0 is greedy)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0 (0: greedy)")
    return value


def top_p(text: str) -> float:
    """Nucleus mass in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} must be in (0, 1] (1 keeps every token)")
    return value


def token_ids(text: str) -> list[int]:
    """Comma-separated non-negative token ids, e.g. 1,2,3."""
    parts = [p.strip() for p in text.split(",")]
    try:
        ids = [int(p) for p in parts]
    except ValueError:
        bad = next(p for p in parts if not p.lstrip("-").isdigit())
        raise argparse.ArgumentTypeError(f"{bad!r} is not a token id; give comma-separated integers such as 1,2,3") \
            from None
    if any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError("token ids must be >= 0")
    return ids


def utf8_text(text: str) -> str:
    """Text from the command line that is valid UTF-8 (undecodable bytes arrive as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = os.fsencode(text[e.start:e.start + 1])
        raise argparse.ArgumentTypeError(f"is not valid UTF-8 (byte 0x{byte.hex()} at character {e.start}); "
                                         f"pass UTF-8 text, or token ids with --prompt-ids") from None
    return text


def check_writable(path: str | None, flag: str) -> None:
    """ConfigError now, before a long run, if a report cannot be written to `path`."""
    if not path:
        return
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; give a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path}: directory {parent} does not exist; create it first")
    existed = p.exists()
    try:  # really open it: os.access says yes to root for read-only mounts and /proc
        with open(p, "a"):
            pass
    except OSError as e:
        raise ConfigError(f"{flag} {path} is not writable ({e.strerror}); choose another path") from None
    if not existed:
        p.unlink(missing_ok=True)


def quiet_broken_pipe() -> int:
    """stdout's reader went away (`deepport ... | head`): stop quietly, without a traceback at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 0


def docs_dir() -> str:
    """Where the docs named in messages (docs/*.md) are: deepport/docs in a wheel, the checkout's docs/ otherwise."""
    pkg = Path(__file__).resolve().parent
    for d in (pkg / "docs", pkg.parent / "docs"):
        if d.is_dir():
            return str(d)
    return "docs/ in the source distribution"


def version_text() -> str:
    """`deepport --version`: the version (one source: deepport.__version__) and where the docs are."""
    from deepport import __version__

    return f"deepport {__version__} (docs: {docs_dir()})"
