"""Conformance cases, one module per op contract (named exactly like the op)."""
from __future__ import annotations

import importlib

from deepport.conformance.case import CASE_DTYPES, TIERS, Case
from deepport.core.errors import ConfigError
from deepport.core.ops import CONTRACTS


def op_cases(op: str, tier: str) -> list[Case]:
    return importlib.import_module(f"deepport.conformance.cases.{op}").cases(tier)


def all_cases(tier: str = "quick", ops=None, dtypes=None) -> list[Case]:
    """Every case of `tier`, in contract order, optionally filtered by op names and case dtypes."""
    if tier not in TIERS:
        raise ConfigError(f"unknown tier {tier!r}; use one of {', '.join(TIERS)}")
    ops = list(CONTRACTS) if ops is None else list(ops)
    unknown = [o for o in ops if o not in CONTRACTS]
    if unknown:
        raise ConfigError(f"unknown op(s) {', '.join(unknown)}; known ops: {', '.join(CONTRACTS)}")
    if dtypes is not None:
        bad = [d for d in dtypes if d not in CASE_DTYPES]
        if bad:
            raise ConfigError(f"unknown case dtype(s) {', '.join(bad)}; use {', '.join(CASE_DTYPES)}")
    out = [c for op in ops for c in op_cases(op, tier)]
    return [c for c in out if dtypes is None or c.dtype in dtypes]


def case_names(tiers=TIERS) -> set[str]:
    """Names of every case in the given tiers (policy files are validated against these)."""
    return {c.name for t in tiers for c in all_cases(t)}
