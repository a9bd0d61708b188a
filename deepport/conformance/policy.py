"""A backend's own conformance.toml: `[[xfail]]` and `[[tolerance]]` entries, each with a required reason."""
from __future__ import annotations

import fnmatch
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from deepport.core.errors import ConfigError
from deepport.core.ops import CONTRACTS


@dataclass(frozen=True)
class Entry:
    """One policy entry. kind: xfail | tolerance; target: a case name (fnmatch pattern allowed) or an op."""

    kind: str
    reason: str
    case: str | None = None
    op: str | None = None
    rtol: float | None = None
    atol: float | None = None

    def matches(self, case) -> bool:
        return case.op == self.op if self.op else fnmatch.fnmatchcase(case.name, self.case)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class Policy:
    source: str | None = None
    entries: list[Entry] = field(default_factory=list)

    def xfail_reason(self, case) -> str | None:
        for e in self.entries:
            if e.kind == "xfail" and e.matches(case):
                return e.reason
        return None

    def overrides(self, case) -> dict:
        """{op or case name: {"rtol", "atol"}} for tolerances.tolerance(); case entries after op entries."""
        out = {}
        for e in sorted((e for e in self.entries if e.kind == "tolerance" and e.matches(case)), key=lambda e: e.case is not None):
            key = case.op if e.op else case.name
            out[key] = {k: v for k, v in (("rtol", e.rtol), ("atol", e.atol)) if v is not None}
        return out

    def as_list(self) -> list[dict]:
        return [dict(e.as_dict(), source=self.source) for e in self.entries]


def load(path, known_cases: set[str]) -> Policy:
    """Parse and validate a conformance.toml; a missing file is an empty policy. Errors name the file and entry."""
    if path is None or not Path(path).is_file():
        return Policy(str(path) if path else None)
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e}); fix the file") from None
    unknown = set(data) - {"xfail", "tolerance"}
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {', '.join(sorted(unknown))}; use [[xfail]] or [[tolerance]]")
    entries = []
    for kind in ("xfail", "tolerance"):
        for i, raw in enumerate(data.get(kind, [])):
            entries.append(_entry(path, kind, i, raw, known_cases))
    return Policy(str(path), entries)


def _entry(path, kind, i, raw, known_cases) -> Entry:
    where = f"{path}: [[{kind}]] entry {i + 1}"
    allowed = {"case", "op", "reason"} | ({"rtol", "atol"} if kind == "tolerance" else set())
    extra = set(raw) - allowed
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(extra))}; allowed: {', '.join(sorted(allowed))}")
    reason = str(raw.get("reason", "")).strip()
    if not reason:
        raise ConfigError(f"{where}: missing reason; every xfail or loosened tolerance must say why")
    case, op = raw.get("case"), raw.get("op")
    if (case is None) == (op is None):
        raise ConfigError(f"{where}: give exactly one of case = \"<op>_<variant>_<dtype>\" or op = \"<op>\"")
    if op is not None and op not in CONTRACTS:
        raise ConfigError(f"{where}: unknown op {op!r}; known ops: {', '.join(CONTRACTS)}")
    if case is not None and not fnmatch.filter(known_cases, case):
        raise ConfigError(f"{where}: case {case!r} matches no conformance case; "
                          f"list them with `deepport conformance --list`")
    rtol, atol = raw.get("rtol"), raw.get("atol")
    if kind == "tolerance":
        if rtol is None and atol is None:
            raise ConfigError(f"{where}: a tolerance entry needs rtol and/or atol")
        for name, v in (("rtol", rtol), ("atol", atol)):
            if v is not None and (not isinstance(v, (int, float)) or v < 0):
                raise ConfigError(f"{where}: {name} must be a non-negative number, got {v!r}")
    return Entry(kind, reason, case, op, None if rtol is None else float(rtol), None if atol is None else float(atol))
