"""Finite checks on the numbers a run produces: logits in the decode loop, and (on demand) every bound op.

A non-finite logit stops generation with an error naming the first op that produced non-finite values:
the failing step is replayed with every op of the table checked (`checked`); an MTP run is rerun whole, eager.
DEEPPORT_CHECK_FINITE=1 checks every op from the start (`wrap`).
"""
from __future__ import annotations

import contextlib
import functools

import torch

from deepport.core import ops as contracts
from deepport.core.errors import DeepportError
from deepport.core.weight_checks import nonfinite_count

HINT = "set DEEPPORT_CHECK_FINITE=1 to check every op as it runs, or compare the backend with `deepport conformance`"


class NonFiniteError(DeepportError):
    """Logits or an op's output hold NaN/inf."""


class NonFiniteLogits(NonFiniteError):
    """Non-finite logits at sampling call `call`; `fed` holds the token batches fed before it (for a replay)."""

    def __init__(self, msg: str, call: int = 0, fed=()):
        super().__init__(msg)
        self.call, self.fed = call, list(fed)


class NonFiniteOp(NonFiniteError):
    """The first op whose output held NaN/inf."""


def check_logits(logits: torch.Tensor, call: int = 0, fed=()) -> None:
    """NonFiniteLogits when any logit is NaN/inf (one reduction; the token is read back right after anyway)."""
    if not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).sum())
        raise NonFiniteLogits(f"{bad:,} of {logits.numel():,} logits are NaN/inf at sampling step {call}", call, fed)


def _tensors(value):
    """Every tensor in an op's arguments or result (tuples, lists, Fp8Weight-like objects with .weight)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif hasattr(value, "weight") and isinstance(getattr(value, "weight"), torch.Tensor):
        yield value.weight
        if isinstance(getattr(value, "scale_inv", None), torch.Tensor):
            yield value.scale_inv


def _bad(value) -> tuple[int, int]:
    """(non-finite values, total values) over the floating tensors in `value`."""
    bad = total = 0
    for t in _tensors(value):
        if t.is_floating_point() or t.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
            bad += nonfinite_count(t.detach())
            total += t.numel()
    return bad, total


class _Counter:
    def __init__(self):
        self.calls = 0


def _checked(op: str, fn, backend: str, source: str, counter: _Counter):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        counter.calls += 1
        out = fn(*args, **kwargs)
        bad, total = _bad(out)
        if bad:
            bad_in, _ = _bad((args, kwargs))
            where = f"op {op!r} of backend {backend!r} ({source}, op call {counter.calls})"
            if bad_in:
                raise NonFiniteOp(f"{where} received {bad_in:,} non-finite input values that no checked op produced "
                                  f"(they come from the graph's own torch code or from the weights); "
                                  f"load with weight checks on and compare the backend with `deepport conformance`")
            raise NonFiniteOp(f"{where} produced {bad:,} non-finite values (NaN/inf) of {total:,} from finite "
                              f"inputs; it is the first op to do so: check that op with "
                              f"`deepport conformance --backend {backend} --ops {op}`")
        return out

    run.deepport_finite_checked = True
    return run


def _ops(table) -> list[str]:
    return [op for op in contracts.CONTRACTS if op in vars(table) and op != "sample"]


def wrap(table) -> None:
    """Check every bound op's outputs for NaN/inf for the table's lifetime (DEEPPORT_CHECK_FINITE=1)."""
    counter = _Counter()
    for op in _ops(table):
        fn = vars(table)[op]
        if not getattr(fn, "deepport_finite_checked", False):
            object.__setattr__(table, op, _checked(op, fn, table.backend, table.sources.get(op, ""), counter))


@contextlib.contextmanager
def checked(table):
    """Every bound op of `table` checks its outputs for NaN/inf inside the block; restored afterwards."""
    saved = {op: vars(table)[op] for op in _ops(table)}
    try:
        wrap(table)
        yield table
    finally:
        for op, fn in saved.items():
            object.__setattr__(table, op, fn)


@torch.inference_mode()
def locate(model, prompts: list[list[int]], err: NonFiniteLogits, block_size: int = 16) -> NonFiniteError:
    """Replay generate()'s steps up to the failing one with every op checked; the error names the first op
    that produced NaN/inf (or says that the replay did not reproduce the failure)."""
    device = model.embed.weight.device
    b = len(prompts)

    def replay():
        cache = model.new_cache(b, max(len(p) for p in prompts) + len(err.fed) + 1, block_size)
        last = [model.logits(model(torch.tensor([p], device=device), cache, rows=[r])[:, -1])
                for r, p in enumerate(prompts)]
        check_logits(torch.cat(last))
        for step, tokens in enumerate(err.fed):
            h = model(tokens.view(b, 1).to(device), cache)
            check_logits(model.logits(h[:, -1]), step + 1)

    return rerun_checked(model.ops, replay, err)


def rerun_checked(table, run, err: NonFiniteLogits) -> NonFiniteError:
    """run() (the failing work again, from its start: same seed, same steps) with every op of `table` checked:
    the error to raise instead of err, naming the first op that produced NaN/inf when one did. MTP decoding is
    located this way (its drafts are not in err.fed), by a whole eager rerun."""
    try:
        with checked(table):
            run()
    except NonFiniteOp as e:
        return NonFiniteOp(f"{err}: {e}")
    except NonFiniteLogits:
        return NonFiniteLogits(f"{err}: every op returned finite values, so the graph's own torch code made them "
                               f"non-finite; {HINT}")
    return NonFiniteLogits(f"{err}; a replay of the same steps with every op checked stayed finite (the failure "
                           f"is not deterministic); {HINT}")
