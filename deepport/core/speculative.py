"""MTP speculative decoding: draft t_{n+2} with the MTP module, verify with one S=2 main forward, roll back.

Invariant per sequence: the main cache holds every committed token but the last (which is fed next, with
the draft); the MTP cache holds one entry per main position (position j processed (h_j, t_{j+1})).
Greedy output is token-for-token the plain loop's; with temperature > 0 the standard speculative-sampling
rule (accept d with probability min(1, p(d)/q(d)), else resample from norm(max(p - q, 0))) keeps the
output distribution unchanged.
"""
from __future__ import annotations

import time

import torch

from deepport.core import finite
from deepport.core.errors import DeepportError
from deepport.core.generate import Generation, Sampler, _sync


def probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution `sample` draws from (fp32): softmax(logits / T), top-p filtered and renormalised."""
    p = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = p.sort(dim=-1, descending=True)
        sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p >= top_p, 0.0)
        p = torch.zeros_like(p).scatter_(-1, idx, sorted_p)
        p = p / p.sum(-1, keepdim=True)
    return p


def speculative_accept(p: torch.Tensor, q: torch.Tensor, draft: int, generator: torch.Generator):
    """One draft token d ~ q checked against target p (both [V]): returns (token, accepted)."""
    u = torch.rand((), generator=generator).item()
    if u * q[draft].item() <= p[draft].item():
        return draft, True
    residual = torch.clamp(p - q, min=0)
    total = residual.sum()
    if total <= 0:  # p == q: acceptance was certain; numerically unreachable, keep p
        residual, total = p, p.sum()
    return int(torch.multinomial((residual / total).cpu(), 1, generator=generator)), False


class _Drafter:
    """Turns MTP logits into a draft token (and, when sampling, keeps q for the acceptance test)."""

    def __init__(self, sampler: Sampler):
        self.sampler = sampler

    def __call__(self, logits: torch.Tensor):
        s = self.sampler
        if s.temperature <= 0:
            return s(logits).tolist(), [None] * logits.shape[0]
        finite.check_logits(logits)
        q = probs(logits, s.temperature, s.top_p).cpu()
        return torch.multinomial(q, 1, generator=s.generator).view(-1).tolist(), list(q)


def _draft_every_row(step, mtp_cache, h_every, active, ok, first, second, done, drafter, draft, q):
    """MTP drafting through step.draft: every row of the MTP cache runs 2 positions (the verification's hidden
    states with the tokens after them). A row whose draft was accepted keeps both and drafts from the second;
    a rejected row keeps the first (its second input is a filler the causal mask hides from the first) and
    drafts from it; a finished row keeps neither."""
    device = h_every.device
    rows = range(len(done))
    where = {r: i for i, r in enumerate(active)}
    ids = [[first[where[r]], second[where[r]] if ok[where[r]] else first[where[r]]] if r in where else [0, 0]
           for r in rows]
    every = list(rows)
    mtp_cache.reserve(every, 2)
    _, logits = step.draft(h_every, torch.tensor(ids, device=device), mtp_cache)
    mtp_cache.advance(every, 2)
    for r in rows:
        keep = (2 if ok[where[r]] else 1) if r in where else 0
        if keep < 2:
            mtp_cache.truncate(r, mtp_cache.lens[r] - 2 + keep)
    for good in (True, False):  # accepted rows first, as the eager loop draws them (same sampled tokens)
        group = [r for r in active if ok[where[r]] == good]
        if group:
            d, qq = drafter(logits[torch.tensor(group, device=device), 1 if good else 0])  # [G, V]
            for j, r in enumerate(group):
                draft[r], q[r] = d[j], qq[j]


@torch.inference_mode()
def generate_mtp(model, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, eos_id: int | None = None, block_size: int = 16, step=None) -> Generation:
    """step: a core.step.DecodeStep for the S=2 verification forward over every row (rows that are done
    are fed too and rolled back: the step's shapes stay static); None: eager, active rows only."""
    if any(len(p) == 0 for p in prompts):
        raise DeepportError("empty prompt; give at least one token")
    if max_new_tokens < 1:
        raise DeepportError("max_new_tokens must be at least 1")
    device = model.embed.weight.device
    b = len(prompts)
    room = max(len(p) for p in prompts) + max_new_tokens + 3
    cache = step.cache(b, room, block_size) if step is not None else model.new_cache(b, room, block_size)
    mtp_cache = step.cache(b, room, block_size, mtp=True) if step is not None else model.new_cache(b, room, block_size,
                                                                                                    mtp=True)
    sampler = Sampler(model.ops, temperature, top_p, seed)
    drafter = _Drafter(sampler)
    out = [[] for _ in range(b)]
    done = [False] * b
    last, draft, q = [0] * b, [0] * b, [None] * b

    def commit(r, tok) -> bool:
        if done[r]:
            return False
        if (eos_id is not None and tok == eos_id) or len(out[r]) >= max_new_tokens:
            done[r] = True
            return False
        out[r].append(tok)
        done[r] = len(out[r]) >= max_new_tokens
        return True

    t0 = time.perf_counter()
    for r, p in enumerate(prompts):
        ids = torch.tensor([p], device=device)
        h = model(ids, cache, rows=[r])
        tok = int(sampler(model.logits(h[:, -1]))[0])
        commit(r, tok)
        last[r] = tok
        nxt = torch.tensor([p[1:] + [tok]], device=device)
        u = model.mtp_forward(h, nxt, mtp_cache, rows=[r], last_only=True)
        d, qq = drafter(model.logits(u[:, -1]))
        draft[r], q[r] = d[0], qq[0]
    _sync(device)
    t1 = time.perf_counter()
    forwards = drafted = accepted = 0
    while True:
        active = [r for r in range(b) if not done[r]]
        if not active:
            break
        if step is not None:
            every = list(range(b))
            cache.reserve(every, 2)
            h_every, logits = step(torch.tensor([[last[r], draft[r]] for r in every], device=device), cache)
            cache.advance(every, 2)
            for r in every:
                if done[r]:
                    cache.truncate(r, cache.lens[r] - 2)
            pick = torch.tensor(active, device=device)
            h, logits = h_every[pick], logits[pick]  # [A, 2, D], [A, 2, V]
        else:
            inp = torch.tensor([[last[r], draft[r]] for r in active], device=device)
            h = model(inp, cache, rows=active)  # [A, 2, D]
            logits = model.logits(h)  # [A, 2, V]
        forwards += 1
        drafted += len(active)
        picked = None  # greedy: the tokens as a device tensor [A, 2], the MTP forward's next ids as they are
        if temperature <= 0:  # both positions in one sampler call: one finite check, one argmax, one read-back
            picked = sampler(logits.flatten(0, 1)).view(-1, 2)
            pairs = picked.tolist()
            first, second = [p[0] for p in pairs], [p[1] for p in pairs]
            ok = [first[i] == draft[r] for i, r in enumerate(active)]
        else:
            finite.check_logits(logits, forwards - 1)  # the acceptance test below bypasses the sampler's check
            first, ok = [], []
            for i, r in enumerate(active):
                p = probs(logits[i, 0], temperature, top_p).cpu()
                tok, good = speculative_accept(p, q[r], draft[r], sampler.generator)
                first.append(tok)
                ok.append(good)
            second = sampler(logits[:, 1]).tolist()
        groups = {True: [], False: []}
        for i, r in enumerate(active):
            groups[ok[i]].append(i)
            accepted += ok[i]
            commit(r, first[i])
            if ok[i]:
                commit(r, second[i])
                last[r] = second[i]
            else:
                cache.truncate(r, cache.lens[r] - 1)  # drop the rejected draft's slot
                last[r] = first[i]
        if step is not None:  # the draft step over every row, S=2 (static shapes), then roll back what is not kept
            _draft_every_row(step, mtp_cache, h_every, active, ok, first, second, done, drafter, draft, q)
            continue
        for good, idx in groups.items():
            if not idx:
                continue
            rows = [active[i] for i in idx]
            every = len(idx) == len(active)  # (batch 1 always): no gather of h, the sampled ids reused
            hg = h if every else h[idx]
            if good:
                nxt = picked if every and picked is not None else torch.tensor([[first[i], second[i]] for i in idx],
                                                                                device=device)
                u = model.mtp_forward(hg, nxt, mtp_cache, rows=rows, last_only=True)
            else:
                nxt = picked[:, :1] if every and picked is not None else torch.tensor([[first[i]] for i in idx],
                                                                                      device=device)
                u = model.mtp_forward(hg[:, :1], nxt, mtp_cache, rows=rows)
            d, qq = drafter(model.logits(u[:, -1]))
            for j, r in enumerate(rows):
                draft[r], q[r] = d[j], qq[j]
    _sync(device)
    t2 = time.perf_counter()
    n_prefill = sum(len(p) for p in prompts)
    n_decode = sum(len(o) for o in out)
    decoded_in_loop = max(n_decode - b, 0)
    stats = {
        "prefill_tokens": n_prefill, "prefill_s": t1 - t0, "prefill_tokens_per_s": n_prefill / max(t1 - t0, 1e-9),
        "decode_tokens": n_decode, "decode_s": t2 - t1, "decode_steps": forwards,
        "decode_tokens_per_s": decoded_in_loop / max(t2 - t1, 1e-9) if forwards else 0.0,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        # tokens committed per main-model forward of one sequence (1.0 without MTP, up to 2.0)
        "tokens_per_forward": decoded_in_loop / drafted if drafted else 0.0,
        "main_forwards": forwards, "drafted": drafted, "accepted": accepted,
    }
    return Generation(out, stats, cache=cache)
