"""Judge a backend's output against cpu_ref's Expected: allclose, quant codes/scales, routing sets, sampling."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from deepport.conformance.tolerances import SAMPLE_ALPHA, SAMPLE_MIN_EXPECTED, SAMPLE_TV, TIE_EPS, Tol


@dataclass
class Outcome:
    ok: bool
    max_abs: float | None = None
    max_rel: float | None = None
    detail: str = ""


def compare(case, got, expected, tol: Tol) -> Outcome:
    """Compare `got` (CPU tensors) with `expected` (reference.Expected) the way `case.compare` says."""
    outs = got if isinstance(got, tuple) else (got,)
    bad = _structure(case, outs, expected)
    if bad:
        return Outcome(False, detail=bad)
    return _KINDS[case.compare](outs, expected, tol)


def _structure(case, outs, expected) -> str:
    if len(outs) != len(expected.dtypes):
        return f"{case.op} returned {len(outs)} output(s), the contract returns {len(expected.dtypes)}"
    for i, (o, dt, shape) in enumerate(zip(outs, expected.dtypes, expected.shapes)):
        if not isinstance(o, torch.Tensor):
            return f"output {i} is {type(o).__name__}, expected a tensor"
        if o.dtype != dt:
            return f"output {i} has dtype {o.dtype}, the contract says {dt}"
        if tuple(o.shape) != shape:
            return f"output {i} has shape {tuple(o.shape)}, expected {shape}"
    return ""


def _where(idx: torch.Tensor, shape) -> tuple:
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), tuple(shape)))


def _close(g: torch.Tensor, e: torch.Tensor, tol: Tol, label: str = "") -> Outcome:
    g, e = g.double(), e.double()
    if g.numel() == 0:
        return Outcome(True, 0.0, 0.0)
    diff = (g - e).abs()
    nonfinite = ~torch.isfinite(g) & torch.isfinite(e)
    diff = torch.where(nonfinite, torch.full_like(diff, float("inf")), diff)
    diff = torch.where(torch.isnan(g) & torch.isnan(e), torch.zeros_like(diff), diff)
    bound = tol.atol + tol.rtol * e.abs()
    over = diff > bound
    big = e.abs() > max(tol.atol, 1e-30)
    max_rel = float((diff[big] / e.abs()[big]).max()) if big.any() else 0.0
    out = Outcome(not bool(over.any()), float(diff.max()), max_rel)
    if not out.ok:
        worst = int(((diff - bound) / (bound + 1e-30)).flatten().argmax())
        at = _where(worst, g.shape)
        out.detail = (f"{label}{int(over.sum())} of {g.numel()} elements outside rtol={tol.rtol:g} atol={tol.atol:g}; "
                      f"worst at {at}: got {float(g.flatten()[worst]):.6g}, expected {float(e.flatten()[worst]):.6g}")
    return out


def _allclose(outs, expected, tol) -> Outcome:
    exps = expected.value if isinstance(expected.value, tuple) else (expected.value,)
    results = [_close(o, e, tol, f"output {i}: " if len(outs) > 1 else "") for i, (o, e) in enumerate(zip(outs, exps))]
    return Outcome(all(r.ok for r in results), max(r.max_abs for r in results), max(r.max_rel for r in results),
                   "; ".join(r.detail for r in results if not r.ok))


def _quant(outs, expected, tol) -> Outcome:
    codes, s = outs
    e_codes, e_s = expected.value
    scale = _close(s, e_s, Tol(tol.rtol * 1.01, 0.0), "scales: ")
    gv, ev = codes.float().double(), e_codes.float().double()
    diff = (codes.view(torch.uint8) != e_codes.view(torch.uint8)) & ~((gv == 0) & (ev == 0))  # raw bits; +0 == -0
    detail = [scale.detail] if not scale.ok else []
    if diff.any():
        gb = codes.view(torch.uint8)[diff].int()
        eb = e_codes.view(torch.uint8)[diff].int()
        one_ulp = ((gb - eb).abs() == 1) & ((gb & 0x80) == (eb & 0x80))
        q = expected.extra["quotient"][diff]
        mid = (gv[diff] + ev[diff]) / 2
        at_tie = (q - mid).abs() <= 2.0 ** -22 * q.abs()
        wrong = ~(one_ulp & at_tie)
        if wrong.any():
            first = int(diff.flatten().nonzero()[int(wrong.nonzero()[0])])
            detail.append(f"codes: {int(wrong.sum())} of {codes.numel()} differ (beyond one ulp at an fp32 tie); "
                          f"first at {_where(first, codes.shape)}: got {float(gv.flatten()[first]):g}, "
                          f"expected {float(ev.flatten()[first]):g} (x/s = {float(expected.extra['quotient'].flatten()[first]):.9g})")
    max_code = float((gv - ev).abs().max()) if codes.numel() else 0.0
    return Outcome(not detail, max_code, scale.max_rel, "; ".join(detail))


def _routing(outs, expected, tol) -> Outcome:
    w, ids = outs
    e_w, e_ids = expected.value
    g_ids, g_order = ids.sort(-1)
    x_ids, x_order = e_ids.sort(-1)
    same = (g_ids == x_ids).all(-1)
    ties = expected.extra["tie_rows"]
    wrong = ~same & ~ties
    detail = []
    if wrong.any():
        r = int(wrong.nonzero()[0])
        detail.append(f"{int(wrong.sum())} of {ids.shape[0]} rows select other experts with no tie within {TIE_EPS:g}; "
                      f"row {r}: got {g_ids[r].tolist()}, expected {x_ids[r].tolist()}")
    gw, xw = w.gather(1, g_order)[same], e_w.gather(1, x_order)[same]
    close = _close(gw, xw, tol, "weights (rows with equal sets): ")
    if not close.ok:
        detail.append(close.detail)
    n_tie = int((~same & ties).sum())
    note = f"{n_tie} near-tie row(s) selected differently (allowed)" if n_tie and not detail else ""
    return Outcome(not detail, close.max_abs, close.max_rel, "; ".join(detail) or note)


def _exact(outs, expected, tol) -> Outcome:
    exps = expected.value if isinstance(expected.value, tuple) else (expected.value,)
    for i, (o, e) in enumerate(zip(outs, exps)):
        ob, eb = o.contiguous().view(torch.uint8), e.contiguous().view(torch.uint8)
        if not torch.equal(ob, eb):
            n = int((o.double() != e.double()).sum()) if o.dtype != torch.int64 else int((o != e).sum())
            first = int((o.flatten().double() != e.flatten().double()).nonzero()[0]) if n else 0
            return Outcome(False, float((o.double() - e.double()).abs().max()), None,
                           f"output {i}: {n} of {o.numel()} values differ (compared bit for bit); first at "
                           f"{_where(first, o.shape)}: got {o.flatten()[first].item()}, expected {e.flatten()[first].item()}")
    return Outcome(True, 0.0, 0.0)


def _nucleus(outs, expected, tol) -> Outcome:
    (tok,) = outs
    inside = expected.extra["nucleus"].gather(1, tok.view(-1, 1).clamp(0, expected.extra["nucleus"].shape[1] - 1))
    inside &= (tok.view(-1, 1) >= 0) & (tok.view(-1, 1) < expected.extra["nucleus"].shape[1])
    if not inside.all():
        r = int((~inside.flatten()).nonzero()[0])
        return Outcome(False, None, None, f"{int((~inside).sum())} of {tok.numel()} drawn tokens lie outside the "
                       f"top-p nucleus; row {r} drew token {int(tok[r])}")
    return Outcome(True, None, None)


def chi_square(tok: torch.Tensor, p: torch.Tensor) -> tuple[float, int, float]:
    """Pearson's goodness-of-fit of the draws `tok` against the distribution `p` (fp64): (statistic, degrees of
    freedom, p-value). Cells expecting fewer than SAMPLE_MIN_EXPECTED draws are pooled into one."""
    n = tok.numel()
    observed = torch.bincount(tok, minlength=p.numel()).double()
    want = p.double() * n
    big = want >= SAMPLE_MIN_EXPECTED
    obs, exp = observed[big], want[big]
    small = (~big) & (p > 0)
    if small.any():
        obs = torch.cat([obs, observed[small].sum().view(1)])
        exp = torch.cat([exp, want[small].sum().view(1)])
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = max(int(exp.numel()) - 1, 1)
    pval = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))
    return stat, df, pval


def _distribution(outs, expected, tol) -> Outcome:
    """Every draw in the nucleus, and the draws fit the nucleus distribution: chi-square p-value >= SAMPLE_ALPHA."""
    bad = _nucleus(outs, expected, tol)
    if not bad.ok:
        return bad
    (tok,) = outs
    p = expected.extra["probs"][0]
    freq = torch.bincount(tok, minlength=p.numel()).double() / tok.numel()
    tv = 0.5 * float((freq - p).abs().sum())
    stat, df, pval = chi_square(tok, p)
    said = f"chi-square {stat:.1f} on {df} df (p = {pval:.2g}), total variation {tv:.3f}"
    if pval < SAMPLE_ALPHA:
        worst = int(((freq - p).abs() / p.clamp(min=1e-12).sqrt()).argmax())
        return Outcome(False, tv, None, f"drawn frequencies do not fit the nucleus distribution: {said}, below "
                       f"p = {SAMPLE_ALPHA:g}; token {worst} drawn {float(freq[worst]):.4f} of the time, expected "
                       f"{float(p[worst]):.4f} (is temperature ignored, or the nucleus cut at the wrong token?)")
    if tv > SAMPLE_TV:
        return Outcome(False, tv, None, f"drawn frequencies are {tv:.3f} (total variation) from the nucleus "
                       f"distribution, more than {SAMPLE_TV}; is temperature or top_p ignored?")
    return Outcome(True, tv, None, said)


def _seeded(outs, expected, tol) -> Outcome:
    """Three draws: the case's generator, a fresh one with its seed, one with another seed. The first two must be
    equal, the third must differ, all inside the nucleus: the op draws from the generator it is given."""
    for i, draw in enumerate(outs):
        bad = _nucleus((draw,), expected, tol)
        if not bad.ok:
            return Outcome(False, None, None, f"draw {i + 1}: {bad.detail}")
    first, again, other = outs
    if not torch.equal(first, again):
        n = int((first != again).sum())
        return Outcome(False, float(n), None, f"{n} of {first.numel()} rows drew other tokens from a fresh generator "
                       f"with the same seed; sample must draw from the `generator` argument only (not the global RNG)")
    if torch.equal(first, other):
        return Outcome(False, 0.0, None, f"a generator with another seed drew the same {first.numel()} tokens; sample "
                       f"must draw from the `generator` argument (not a fixed seed of its own)")
    return Outcome(True, 0.0, None, f"same seed: same draws; another seed: {int((first != other).sum())} of "
                   f"{first.numel()} rows differ")


_KINDS = {"allclose": _allclose, "quant": _quant, "routing": _routing, "exact": _exact, "nucleus": _nucleus,
          "distribution": _distribution, "seeded": _seeded}
