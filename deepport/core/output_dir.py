"""Writing outputs without mixing or silent overwrites: checks, a temporary sibling renamed into place, a lock.

Every writer (convert, train-tiny, export-onnx, preset materialisation) goes through here:
`check()` refuses a destination that is a source (or holds one), lies inside the installed package, or is
not empty, before any long work; `staged_dir()` / `staged_files()` write into `.<name>.deepport-tmp-...`
beside the destination and rename it into place only when the writer finished, so a killed run leaves
the destination absent or untouched. With --force the destination is replaced as a whole, never merged.
Temporaries left by dead processes are cleaned by the next writer of the same destination.
"""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from deepport.core.errors import DeepportError

TMP_TAG = ".deepport-tmp-"
OLD_TAG = ".deepport-old-"
FOREIGN_STALE_S = 24 * 3600  # another host's temporaries: cleaned only when older than this


class OutputError(DeepportError):
    """An output path deepport refuses to write (it would mix with or destroy other files)."""


def package_dir() -> Path:
    """The installed deepport package directory (the checkout's deepport/ under an editable install)."""
    import deepport

    return Path(deepport.__file__).resolve().parent


def _inside(p: Path, root: Path) -> bool:
    return p == root or root in p.parents


def check(dst: str | Path, *, force: bool = False, sources=(), what: str = "output", kind: str = "dir",
          companions=()) -> Path:
    """Refuse `dst` (a directory, or a file with `kind="file"` plus `companions` beside it) before any work.

    Always refused: the source itself, a path inside a source or holding one, a path holding the package or
    the working directory. Refused unless force: a non-empty directory / an existing file, a path inside the
    installed package. Returns dst as a Path."""
    dst = Path(dst).expanduser()
    real = dst.resolve()
    flag = "--force"
    for s in sources:
        s = Path(s).expanduser().resolve()
        if _inside(real, s) or _inside(s, real):
            rel = "is" if real == s else ("is inside" if _inside(real, s) else "contains")
            raise OutputError(f"{what} {dst} {rel} the source {s}; write to a separate new directory")
    pkg = package_dir()
    if real != pkg and _inside(pkg, real):
        raise OutputError(f"{what} {dst} contains the deepport package ({pkg}); choose a directory of its own")
    if _inside(Path.cwd().resolve(), real) and real.exists():
        raise OutputError(f"{what} {dst} contains the current directory; choose a directory of its own")
    if _inside(real, pkg) and not force:
        raise OutputError(f"{what} {dst} is inside the installed deepport package ({pkg}); choose another "
                          f"path, or pass {flag} to replace the files shipped there")
    if kind == "dir":
        if real.exists() and not real.is_dir():
            raise OutputError(f"{what} {dst} exists and is not a directory; choose a directory path")
        if real.is_dir() and not force:
            entries = sorted(e.name for e in real.iterdir())
            if entries:
                raise OutputError(f"{what} {dst} is not empty ({len(entries)} entries, e.g. {entries[0]}); choose "
                                  f"a new or empty directory, or pass {flag} to replace it as a whole")
    else:
        for p in (real, *(real.with_name(real.name + c) for c in companions)):
            if p.is_dir():
                raise OutputError(f"{what} {p} is a directory; give a file path")
            if p.exists() and not force:
                raise OutputError(f"{what} {p} exists; choose another path, or pass {flag} to replace it")
    parent = real.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {dst}: cannot write in {parent} (permission denied); choose another path")
    return dst


def _alive(host: str, pid: int, path: Path) -> bool:
    """Whether the writer that made a temporary may still be running (other hosts: judged by age)."""
    if host != socket.gethostname():
        try:
            return time.time() - path.lstat().st_mtime < FOREIGN_STALE_S
        except FileNotFoundError:
            return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tag(tag: str) -> str:
    return f"{tag}{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def clean_stale(dst: str | Path) -> list[Path]:
    """Remove `dst`'s temporaries left by dead writers; an interrupted replace whose new copy never landed
    gets its old copy back. Returns what was removed or restored."""
    dst = Path(dst)
    done = []
    if not dst.parent.is_dir():
        return done
    for p in sorted(dst.parent.glob(f".{dst.name}.deepport-*-*")):
        tag = TMP_TAG if TMP_TAG in p.name else OLD_TAG if OLD_TAG in p.name else None
        if tag is None:
            continue
        try:
            host, pid, _ = p.name.split(tag, 1)[1].rsplit("-", 2)
            pid = int(pid)
        except ValueError:
            continue
        if _alive(host, pid, p):
            continue
        if tag == OLD_TAG and not dst.exists():
            os.rename(p, dst)  # the replace died between its two renames: keep the previous output
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        done.append(p)
    return done


def _new_sibling(dst: Path, tag: str) -> Path:
    return dst.with_name(f".{dst.name}{_tag(tag)}")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def commit_dir(tmp: Path, dst: Path) -> Path:
    """Rename the finished temporary `tmp` to `dst`, moving an existing dst aside first and deleting it after."""
    old = None
    if dst.exists() or dst.is_symlink():
        old = _new_sibling(dst, OLD_TAG)
        os.rename(dst, old)
    os.rename(tmp, dst)
    if old is not None:
        _remove(old)
    return dst


def write_text(dst: str | Path, text: str) -> Path:
    """Replace the small file `dst` (a report) atomically: written to a temporary sibling, then renamed over
    dst, so a reader sees the old file or the new one, never half of either. Overwrites, as reports do."""
    dst = Path(dst)
    clean_stale(dst)
    tmp = _new_sibling(dst, TMP_TAG)
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dst


@contextmanager
def staged_dir(dst: str | Path, *, force: bool = False, sources=(), what: str = "output"):
    """Yield a fresh temporary directory beside `dst`; on success it replaces dst as a whole, on any
    failure (exception, Ctrl-C) it is deleted and dst is untouched."""
    dst = check(dst, force=force, sources=sources, what=what)
    dst.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(dst)
    tmp = _new_sibling(dst, TMP_TAG)
    tmp.mkdir()
    try:
        yield tmp
        # re-checked at commit time: another writer may have filled dst while this one worked
        check(dst, force=force, sources=sources, what=what)
        commit_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def staged_files(dst: str | Path, *, force: bool = False, sources=(), what: str = "output", companions=()):
    """Yield a path `<tmpdir>/<dst.name>` for a file output; the writer may also write `dst.name + c` for c in
    `companions` (e.g. ".data"). On success every written file replaces its destination (companions first,
    the main file last) and companions of an old dst that this run did not write are deleted."""
    dst = check(dst, force=force, sources=sources, what=what, kind="file", companions=companions)
    dst.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(dst)
    tmp = _new_sibling(dst, TMP_TAG)
    tmp.mkdir()
    try:
        yield tmp / dst.name
        check(dst, force=force, sources=sources, what=what, kind="file", companions=companions)
        written = {p.name for p in tmp.iterdir()}
        for c in companions:
            name = dst.name + c
            if name in written:
                os.replace(tmp / name, dst.with_name(name))
            else:
                dst.with_name(name).unlink(missing_ok=True)
        if dst.name not in written:
            raise OutputError(f"{what} {dst}: the writer produced no file")
        os.replace(tmp / dst.name, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def file_lock(path: str | Path):
    """An exclusive advisory lock on `path` (flock; a no-op where fcntl is missing, e.g. Windows)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
