"""MTP module math, speculative decoding identity, cache rollback, and the speculative-sampling rule."""
import pytest
import torch

import deepport
from deepport.core.generate import generate
from deepport.core.speculative import generate_mtp, speculative_accept

PROMPTS = ["def f(x):\n", "import os\nimport sys\n", "class A:\n    def __init__(self, value):"]


@pytest.fixture(scope="module", params=["fp8", "bf16"])
def model(request):
    return deepport.load("tiny", backend="cpu_ref", dtype=request.param)


def test_mtp_module_matches_direct_formula():
    """logits_{i+2} = head(norm(Block(eh_proj([enorm(emb(t_{i+1})) ; hnorm(h_i)])))) (semantics doc 5.2)."""
    m = deepport.load("tiny", backend="cpu_ref", dtype="fp32")
    t = m.transformer
    ids = torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = t(ids[:, :-1])  # post-final-norm hidden h_i
        got = t.logits(t.mtp_forward(h, ids[:, 1:]))
        mtp = t.mtp[0]

        def rms(x, w):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

        e = t.embed.weight[ids[:, 1:]]
        u = torch.cat((rms(e, mtp.enorm.weight), rms(h, mtp.hnorm.weight)), -1) @ mtp.eh_proj.weight.T
        ctx = t._context(2, 11, None, None, u.device)
        y, res = mtp.block(u, None, ctx)
        want = rms(y + res, mtp.norm.weight) @ t.head.weight.T
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


class OracleMTP:
    """Stands in for a perfect MTP head on the chosen rows: drafts exactly the main model's next-next token."""

    def __init__(self, t, prompts, rows):
        self.t, self.real, self.rows = t, t.mtp_forward, set(rows)
        self.history = {r: [p[0]] for r, p in enumerate(prompts)}

    def __call__(self, hidden, next_ids, cache=None, rows=None, depth=0, last_only=False):
        u = self.real(hidden, next_ids, cache, rows, depth, last_only)
        for i, r in enumerate(rows):
            self.history[r] += next_ids[i].tolist()
            if r in self.rows:
                u[i, -1] = self.t(torch.tensor([self.history[r]]))[0, -1]
        return u


def test_greedy_speculative_equals_plain(model):
    t = model.transformer
    ids = [model.encode(p) for p in PROMPTS]
    plain = generate(t, ids, 24)
    spec_random = generate_mtp(t, ids, 24)  # random MTP head: drafts (almost) always rejected
    assert spec_random.tokens == plain.tokens
    oracle = OracleMTP(t, ids, rows=[0, 2])  # rows 0 and 2 always accept, row 1 never: mixed batch
    t.mtp_forward = oracle
    try:
        spec = generate_mtp(t, ids, 24)
    finally:
        del t.mtp_forward
    assert spec.tokens == plain.tokens
    assert spec.stats["accepted"] > 0 and spec.stats["acceptance_rate"] < 1.0
    assert spec.stats["tokens_per_forward"] > 1.3  # rows 0 and 2 commit two tokens per forward


@pytest.mark.parametrize("backend", ["cpu_ref", "cpu"])
def test_mtp_last_only_drafts_the_last_position_and_caches_every_one(backend):
    """last_only (drafting): the last position's MTP hidden state as the full forward gives it, and the MTP
    cache holds every position's entry as the full forward leaves it (only the feed-forward of the others is
    skipped; their attention entries are what later drafts read)."""
    t = deepport.load("tiny", backend=backend, dtype="fp32").transformer
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 1024, (2, 9), generator=g)
    with torch.inference_mode():
        h = t(ids[:, :-1])
        caches = []
        for last_only in (False, True):
            c = t.new_cache(2, 32, mtp=True)
            t.mtp_forward(h[:, :5], ids[:, 1:6], c)  # a prefix first: the S=3 call below is a decode-shaped one
            u = t.mtp_forward(h[:, 5:], ids[:, 6:], c, last_only=last_only)
            caches.append((u, c))
    (full, c_full), (last, c_last) = caches
    assert last.shape == (2, 1, full.shape[-1])
    torch.testing.assert_close(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)
    for r in range(2):
        assert c_last.lens[r] == c_full.lens[r] == 8
        for a, b in zip(c_last.contents(0, r), c_full.contents(0, r)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_decode_contexts_at_the_same_positions_share_rope_tables():
    """An MTP draft runs at the positions its verification just ran at: the second context reuses the first's
    cos/sin; other positions (or another S) get their own, equal to freshly computed tables."""
    t = deepport.load("tiny", backend="cpu", dtype="fp32").transformer
    main, mtp = t.new_cache(1, 64), t.new_cache(1, 64, mtp=True)
    for c in (main, mtp):
        c.reserve([0], 7)
        c.advance([0], 7)
    a = t._context(1, 2, main, [0], "cpu")
    b = t._context(1, 2, mtp, [0], "cpu")
    assert b.cos is a.cos and b.sin is a.sin
    main.advance([0], 2)
    c = t._context(1, 2, main, [0], "cpu")
    d = t._context(1, 1, mtp, [0], "cpu")
    assert c.cos is not a.cos and d.cos is not a.cos
    for ctx, first, s in ((c, 9, 2), (d, 7, 1)):
        cos, sin = t.rope_tables(torch.arange(first, first + s).unsqueeze(0))
        torch.testing.assert_close(ctx.cos, cos, rtol=0, atol=0)
        torch.testing.assert_close(ctx.sin, sin, rtol=0, atol=0)


def test_rollback_leaves_cache_as_if_never_drafted(model):
    t = model.transformer
    ids = [model.encode(p) for p in PROMPTS]
    plain = generate(t, ids, 16)
    spec = generate_mtp(t, ids, 16)
    assert spec.tokens == plain.tokens
    for r in range(len(ids)):
        n = min(plain.cache.lens[r], spec.cache.lens[r])
        assert n >= len(ids[r]) + 14
        for layer in range(t.args.n_layers):
            kv_a, pe_a = plain.cache.contents(layer, r)
            kv_b, pe_b = spec.cache.contents(layer, r)
            torch.testing.assert_close(kv_b[:n], kv_a[:n], rtol=2e-2, atol=2e-2)
            torch.testing.assert_close(pe_b[:n], pe_a[:n], rtol=2e-2, atol=2e-2)


def test_speculative_sampling_keeps_the_target_distribution():
    """Empirical frequencies of accept-or-resample match p within 4 standard errors (N=20000)."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.2, 0.1])
    q = torch.tensor([0.1, 0.6, 0.1, 0.2])
    n = 20000
    counts = torch.zeros(4)
    for _ in range(n):
        d = int(torch.multinomial(q, 1, generator=g))
        tok, _ = speculative_accept(p, q, d, g)
        counts[tok] += 1
    freq = counts / n
    se = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 4 * se).all(), (freq, p)
    # and a rule that ignores q would fail: taking the draft always gives q's frequencies
    assert ((q - p).abs() > 4 * se).any()


def test_sampled_speculative_runs_and_reports_stats(model):
    r = model.generate("def g():\n", max_new_tokens=10, temperature=0.8, seed=3, mtp=True)
    assert len(r.tokens) <= 10 and {"acceptance_rate", "tokens_per_forward"} <= set(r.stats)


def test_host_contexts_equal_the_device_computed_ones():
    """A cache in host memory gets its decode metadata from the host mirror (lengths, owned blocks): slots,
    lengths and rope tables equal cache_context's device arithmetic, for ragged rows, a subset of rows in any
    order, S = 1..3, across block edges."""
    t = deepport.load("tiny", backend="cpu", dtype="fp32").transformer
    cache = t.new_cache(3, 96, block_size=4)
    for r, n in enumerate((7, 15, 2)):
        cache.reserve([r], n)
        cache.advance([r], n)
    for rows in ([0], [2, 0], [0, 1, 2]):
        for s in (1, 2, 3):
            starts = tuple(cache.lens[r] for r in rows)
            cache.reserve(rows, s)
            t._rope_memo = None
            host = t._host_context(cache, rows, starts, s)
            idx = torch.tensor(rows)
            dev = t.cache_context(cache, cache.seq_lens[idx], cache.block_table[idx], s, rows)
            for name in ("slots", "seq_lens", "block_table", "cos", "sin"):
                a, b = getattr(host, name), getattr(dev, name)
                assert a.dtype == b.dtype and torch.equal(a, b), (rows, s, name)
    t._rope_memo = None
    seen = []
    orig = t._host_context
    t._host_context = lambda *a: seen.append(a[1]) or orig(*a)
    t._context(2, 1, cache, [1, 2], "cpu")
    assert seen == [[1, 2]]  # the eager path on a host cache takes it
