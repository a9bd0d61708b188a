"""Prefill/decode loop over the paged latent cache, sampling, and MTP speculative decoding."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from deepport.core import finite
from deepport.core.errors import DeepportError


@dataclass
class Generation:
    tokens: list[list[int]]  # generated ids only, per prompt (eos excluded)
    stats: dict = field(default_factory=dict)
    cache: object = None  # the main model's paged cache at the end (for inspection and tests)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Sampler:
    """Samples on fp32 logits through the bound `sample` op; one seeded generator for the whole run.

    defer=True: the finite check of each call's logits stays on the device until flush() (no host sync per
    decode step); flush() raises NonFiniteLogits for the first bad call, as the immediate check would.
    """

    def __init__(self, ops, temperature: float, top_p: float, seed: int | None, defer: bool = False):
        check_sampling(temperature, top_p, seed)
        self.ops, self.temperature, self.top_p = ops, temperature, top_p
        self.generator = torch.Generator().manual_seed(seed if seed is not None else 0)
        self.fed = []  # the tokens each call returned, in order: what a replay feeds (core/finite.py)
        self.defer, self._pending = defer, []  # (call, device count of non-finite logits, numel)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.defer:
            self._pending.append((len(self.fed), (~torch.isfinite(logits)).sum(), logits.numel()))
        else:
            finite.check_logits(logits, len(self.fed), self.fed)
        tokens = self.ops.sample(logits.float(), self.temperature, self.top_p, self.generator)
        self.fed.append(tokens)
        return tokens

    def flush(self) -> None:
        """Check the deferred calls' logits (one host sync)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        for (call, _, numel), bad in zip(pending, torch.stack([p[1] for p in pending]).tolist()):
            if bad:
                raise finite.NonFiniteLogits(f"{bad:,} of {numel:,} logits are NaN/inf at sampling step {call}",
                                             call, self.fed[:call])


def check_sampling(temperature: float, top_p: float, seed: int | None) -> None:
    """DeepportError for a temperature that is NaN, inf or negative, a top_p outside (0, 1], or a seed out of range."""
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise DeepportError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
        raise DeepportError(f"top_p must be in (0, 1] (1: keep every token), got {top_p!r}")
    if seed is not None and not (isinstance(seed, int) and 0 <= seed < 2 ** 63):
        raise DeepportError(f"seed must be an integer in [0, 2**63), got {seed!r}")


EOS_CHECK_EVERY = 8  # decode steps between the loop's host syncs (only when an eos id can end rows early)


def _trim(row: list[int], eos_id: int | None, max_new_tokens: int) -> list[int]:
    """A row's sampled ids up to (excluding) its first eos, at most max_new_tokens."""
    if eos_id is not None and eos_id in row:
        row = row[:row.index(eos_id)]
    return row[:max_new_tokens]


def _same_length_groups(prompts: list[list[int]]) -> list[list[int]]:
    """Row indices grouped by prompt length, in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for r, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(r)
    return list(groups.values())


def cache_room(prompts: list[list[int]], max_new_tokens: int) -> int:
    """Tokens a row the plain loop's cache holds (a compiled step has one graph per cache size: `bench` sizes the
    caches it profiles with this too)."""
    return max(len(p) for p in prompts) + max_new_tokens + 1


@torch.inference_mode()
def generate(model, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, eos_id: int | None = None, block_size: int = 16, step=None) -> Generation:
    """Plain autoregressive decoding: prompts of equal length prefilled together (each length group in one
    forward), then one batched decode step per token.

    step: a core.step.DecodeStep (bucketed, compiled and/or graph-captured); None: the eager forward. The
    loop keeps sampled tokens on the device and reads them back only every EOS_CHECK_EVERY steps (when an
    eos id can end rows early) and at the end.
    """
    if any(len(p) == 0 for p in prompts):
        raise DeepportError("empty prompt; give at least one token")
    if max_new_tokens < 1:
        raise DeepportError("max_new_tokens must be at least 1")
    device = model.embed.weight.device
    b = len(prompts)
    room = cache_room(prompts, max_new_tokens)
    cache = step.cache(b, room, block_size) if step is not None else model.new_cache(b, room, block_size)
    real = list(range(b))
    sampler = Sampler(model.ops, temperature, top_p, seed, defer=True)
    t0 = time.perf_counter()
    last = [None] * b
    for rows in _same_length_groups(prompts):  # prompts of one length prefill together, others on their own
        h = model(torch.tensor([prompts[r] for r in rows], device=device), cache, rows=rows)
        for j, r in enumerate(rows):
            last[r] = model.logits(h[j:j + 1, -1])
    next_tok = sampler(torch.cat(last))
    picked = [next_tok]
    _sync(device)
    t1 = time.perf_counter()
    steps = 0
    while len(picked) < max_new_tokens:
        if eos_id is not None and (len(picked) == 1 or len(picked) % EOS_CHECK_EVERY == 0):
            sampler.flush()
            if bool(torch.stack(picked).eq(eos_id).any(0).all()):  # every row has ended
                break
        ids = next_tok.view(b, 1).to(device)
        if step is not None:
            cache.reserve(real, 1)
            logits = step(ids, cache)[1][:b, -1]
            cache.advance(real, 1)
        else:
            logits = model.logits(model(ids, cache)[:, -1])
        next_tok = sampler(logits)
        picked.append(next_tok)
        steps += 1
    sampler.flush()
    out = [_trim(row, eos_id, max_new_tokens) for row in torch.stack(picked, 1).tolist()]
    _sync(device)
    t2 = time.perf_counter()
    n_prefill = sum(len(p) for p in prompts)
    n_decode = sum(len(o) for o in out)
    stats = {
        "prefill_tokens": n_prefill, "prefill_s": t1 - t0, "prefill_tokens_per_s": n_prefill / max(t1 - t0, 1e-9),
        "decode_tokens": n_decode, "decode_s": t2 - t1, "decode_steps": steps,
        "decode_tokens_per_s": max(n_decode - b, 0) / max(t2 - t1, 1e-9) if steps else 0.0,
    }
    return Generation(out, stats, cache=cache)
