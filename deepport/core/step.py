"""The capturable decode step: batch buckets, step-owned caches, torch.compile and CUDA/HIP graph capture.

`Transformer.decode_step(input_ids, cache)` runs S new tokens for every row of a paged cache with static
shapes and no host sync: its metadata (positions, cos/sin, slots) is computed on the device from the
cache's `seq_lens` and `block_table`, preallocated tensors the generation loop updates in place
(cache.reserve writes block ids, cache.advance adds to seq_lens). A DecodeStep adds what capture needs:

- buckets: a batch of b sequences runs as the next power of two (`bucket(b)`); the spare rows have length 0
  and a block table that points only at the cache's scratch block, so they write and read nothing real;
- step-owned caches, one per (bucket, capacity rounded up to a power of two of blocks), reset and reused
  across generate() calls, so compiled graphs (which specialise on shapes) and device graphs (which
  specialise on addresses) stay valid;
- compile=True: torch.compile(decode_step, fullgraph=True); when a backend's code breaks the graph, one
  line per break names it and the step runs compiled with the breaks (docs/compile.md);
- graphs=True (cuda/rocm): one CUDA graph (a HIP graph on ROCm) per (bucket, S, cache), captured on first
  use and replayed after; when capture fails the step runs without graphs and says why, once.

Prefill stays eager. The MTP verification forward (S=2) is the same step with S=2; MTP drafting has its own
step (`draft`, Transformer.mtp_decode_step: S=2 for every row, compiled like the main step, never captured).
"""
from __future__ import annotations

import sys
import time

import torch

from deepport.core import settings
from deepport.core.cache import PagedLatentCache
from deepport.core.errors import DeepportError


def _untraceable() -> type:
    """The error that means torch.compile cannot trace a step at all (not a break it can split the graph at): a
    guard on a value only known at run time, such as the length of .tolist() of a bincount."""
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    return GuardOnDataDependentSymNode


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def graph_breaks(fn, *args) -> list[str]:
    """One line per graph break torch.compile would make in fn(*args) (torch._dynamo.explain; runs fn once)."""
    import torch._dynamo

    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args)
    lines = []
    for r in explained.break_reasons:
        where = r.user_stack[-1] if r.user_stack else None
        at = f" at {where.filename}:{where.lineno} ({where.name})" if where is not None else ""
        lines.append(f"graph break{at}: {r.reason.strip().splitlines()[0]}")
    return lines


class DecodeStep:
    """A model's decode step for generate(): bucketed batches, reused caches, optionally compiled and captured."""

    def __init__(self, model, compile: bool = False, graphs: bool = False, fullgraph: bool = True,
                 max_bucket: int = 256, compile_backend: str = "inductor"):
        device = model.embed.weight.device
        if graphs and device.type != "cuda":
            raise DeepportError(f"--graphs captures CUDA/HIP graphs, but the model runs on {device.type}; "
                                f"drop --graphs (--compile works on every backend)")
        self.model, self.compile, self.graphs, self.fullgraph = model, compile, graphs, fullgraph
        self.max_bucket, self.compile_backend = max_bucket, compile_backend  # e.g. "aot_eager" in quick tests
        self.report: list[str] = []  # what happened: graph breaks, capture failures (also printed once each)
        self.compile_s = 0.0  # seconds spent in first calls of new shapes (tracing and code generation)
        self._fns = {"decode": model.decode_step, "mtp": model.mtp_decode_step}  # what each kind of step runs
        self._compiled = {}  # "decode" / "mtp" -> the torch.compile'd function
        self._eager = set()  # kinds that could not be compiled at all: they run eager (reported once)
        self._caches: dict[tuple, PagedLatentCache] = {}
        self._graphs: dict[tuple, tuple] = {}
        self._no_graphs = False
        self._seen: set[tuple] = set()
        self._pool = None

    # ---- batch buckets and caches ------------------------------------------------------------------------

    def bucket(self, batch: int) -> int:
        """The padded batch a step of `batch` sequences runs as: the next power of two."""
        if batch > self.max_bucket:
            raise DeepportError(f"batch {batch} is larger than the largest decode bucket ({self.max_bucket}); "
                                f"split the prompts into batches of at most {self.max_bucket}")
        return _pow2(batch)

    def cache(self, batch: int, max_tokens: int, block_size: int = 16, mtp: bool = False) -> PagedLatentCache:
        """An empty cache of bucket(batch) rows holding at least max_tokens per row, owned by the step."""
        blocks = _pow2(-(-max_tokens // block_size))
        key = (self.bucket(batch), blocks, block_size, mtp)
        cache = self._caches.get(key)
        if cache is None:
            self._caches[key] = cache = self.model.new_cache(key[0], blocks * block_size, block_size, mtp=mtp)
        else:
            cache.reset()
        return cache

    def pad(self, input_ids: torch.Tensor, cache: PagedLatentCache) -> torch.Tensor:
        """input_ids [b, S] for the first b rows -> [cache.batch, S] (padding rows feed token 0)."""
        b, s = input_ids.shape
        if b == cache.batch:
            return input_ids
        out = input_ids.new_zeros(cache.batch, s)
        out[:b] = input_ids
        return out

    # ---- the step ----------------------------------------------------------------------------------------

    def _warn(self, line: str) -> None:
        if line not in self.report:
            self.report.append(line)
            print(f"deepport: {line}", file=sys.stderr)

    def _inductor_options(self) -> dict | None:
        """Options for Inductor (None for other torch.compile backends, which would reject them):
        - its wrapper checks the size, stride and alignment of every fallback op's output on every call (154
          Python checks in the embedded model's batch-1 step; without them the compiled step ran 5% faster on the
          development CPU). They guard against Inductor's own layout bugs; the compiled-equals-eager token tests
          stand in for them here, and DEEPPORT_COMPILE_ASSERTS=1 turns them back on for debugging;
        - on a CPU, one-row matrix products with both weight dims <= 2048 become Inductor's own fused reductions
          instead of a BLAS call each (its `decompose_mm_pass`): fewer calls and buffers per decode step, fused
          with the norm before them (embedded model, batch 1: 604-614 -> 672-677 tok/s; v3-200m: +1-2%)."""
        if self.compile_backend != "inductor":
            return None
        o = {}
        if not settings.compile_asserts():
            o.update(size_asserts=False, alignment_asserts=False, scalar_asserts=False)
        if self.model.embed.weight.device.type == "cpu":
            o["post_grad_fusion_options"] = {"decompose_mm_pass": {}}
        return o or None

    def _first_compile(self, kind, *args):
        """Compile on the first call (fullgraph; on a break: one line per break, then compiled with them)."""
        import torch._dynamo

        cfg = torch._dynamo.config  # one graph per (bucket, S, cache): more than torch's default of 8
        cfg.recompile_limit = max(getattr(cfg, "recompile_limit", 8), 64)
        self.model.prepare_decode()  # else the first graph derives the absorbed weights and a second is traced
        fn = self._fns[kind]
        try:
            if self.fullgraph:
                compiled = torch.compile(fn, fullgraph=True, dynamic=False, backend=self.compile_backend,
                                         options=self._inductor_options())
                try:
                    out = compiled(*args)  # traces and generates code now: a break surfaces here
                    self._compiled[kind] = compiled
                    return out
                except torch._dynamo.exc.Unsupported:
                    pass  # reported below, then compiled with the breaks
            for line in graph_breaks(fn, *args) or ["graph break (reason not reported)"]:
                self._warn(line)
            self._compiled[kind] = torch.compile(fn, dynamic=False, backend=self.compile_backend,
                                                 options=self._inductor_options())
            return self._compiled[kind](*args)
        except _untraceable() as e:  # e.g. a shape read from tensor values (.tolist() of a bincount) in traced code
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            where = next((ln for ln in lines if ln.startswith("Caused by:")), lines[0] if lines else "")[:240]
            self._warn(f"could not compile the {kind} step ({type(e).__name__}: {where}); this step runs eager. "
                       f"Fix: keep data-dependent shapes out of traced op code (docs/compile.md, 'what traced "
                       f"port code should avoid'), or wrap that code in a torch.library custom op")
            self._compiled[kind] = fn
            self._eager.add(kind)
            return fn(*args)

    def _eager_or_compiled(self, input_ids, cache, kind="decode", hidden=None, warm=False):
        """warm: this (shape, cache) ran compiled before, so a graph for it exists: Dynamo checks only the guards
        that tell its graphs apart (`skip_guard_eval_unsafe`), not every guard of every weight (the embedded
        model's compiled step: +5% tok/s). DEEPPORT_COMPILE_GUARDS=1 keeps every guard."""
        args = (input_ids, cache) if kind == "decode" else (hidden, input_ids, cache)
        if not self.compile:
            return self._fns[kind](*args)
        if kind not in self._compiled:
            return self._first_compile(kind, *args)
        if warm and not settings.compile_guards():
            try:
                with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                    return self._compiled[kind](*args)
            except RuntimeError as e:  # it needs a new graph after all (e.g. after torch._dynamo.reset()): Dynamo
                if "skip_guard_eval_unsafe" not in str(e):  # refuses before running anything; compile normally
                    raise
        return self._compiled[kind](*args)

    def draft(self, hidden: torch.Tensor, next_ids: torch.Tensor, cache: PagedLatentCache):
        """MTP drafting (Transformer.mtp_decode_step) for every row of an MTP cache made by cache(..., mtp=True):
        (MTP hidden [B, S, D], fp32 logits [B, S, V]); hidden [B, S, D] comes from this step's verification.
        Compiled with compile=True (one graph per (bucket, S, cache)); never graph-captured (it is a single layer)."""
        next_ids = self.pad(next_ids, cache)
        if hidden.shape[0] != cache.batch:
            raise DeepportError(f"draft: hidden has {hidden.shape[0]} rows, the MTP cache {cache.batch}")
        shape_key = ("mtp", tuple(next_ids.shape), id(cache))
        t0 = time.perf_counter() if shape_key not in self._seen else None
        if t0 is not None and self.compile:
            b, s = next_ids.shape
            print(f"deepport: compiling the MTP draft step for {b} row(s) x {s} token(s) (first use of this shape)",
                  file=sys.stderr)
        try:
            return self._eager_or_compiled(next_ids, cache, "mtp", hidden, warm=t0 is None)
        finally:
            if t0 is not None:
                self._seen.add(shape_key)
                self.compile_s += time.perf_counter() - t0

    def _capture(self, key, input_ids, cache):
        """Warm up on a side stream, then capture one replayable graph of the step for these buffers."""
        static_in = input_ids.clone()
        stream = torch.cuda.Stream(device=static_in.device)
        stream.wait_stream(torch.cuda.current_stream(static_in.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # writes land at the rows' next positions, which the real step overwrites
                self._eager_or_compiled(static_in, cache)
        torch.cuda.current_stream(static_in.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._eager_or_compiled(static_in, cache)
        self._graphs[key] = (graph, static_in, out)

    def __call__(self, input_ids: torch.Tensor, cache: PagedLatentCache):
        """(hidden [B, S, D], fp32 logits [B, S, V]) for every row of `cache` (input_ids padded to its rows).

        The caller reserves room first (cache.reserve) and advances the real rows after (cache.advance).
        """
        input_ids = self.pad(input_ids, cache)
        shape_key = (tuple(input_ids.shape), id(cache))
        t0 = time.perf_counter() if shape_key not in self._seen else None
        if t0 is not None and self.compile:  # tens of seconds on a CPU: say so before, not only after
            b, s = input_ids.shape
            print(f"deepport: compiling the decode step for {b} row(s) x {s} token(s), a cache of "
                  f"{cache.max_blocks * cache.block_size} tokens a row (first use of this shape; Inductor keeps the "
                  f"code for later runs)", file=sys.stderr)
        try:
            if self.graphs and not self._no_graphs:
                key = shape_key
                if key not in self._graphs:
                    try:
                        self._capture(key, input_ids, cache)
                    except Exception as e:  # noqa: BLE001 - reported; the step runs without graphs
                        self._no_graphs = True
                        why = str(e).splitlines()[0] if str(e) else ""
                        self._warn(f"graph capture failed ({type(e).__name__}: {why}); decoding without device graphs")
                        return self._eager_or_compiled(input_ids, cache)
                graph, static_in, out = self._graphs[key]
                static_in.copy_(input_ids)
                graph.replay()
                return out
            return self._eager_or_compiled(input_ids, cache, warm=t0 is None)
        finally:
            if t0 is not None:
                self._seen.add(shape_key)
                self.compile_s += time.perf_counter() - t0

    def describe(self) -> str:
        """One line: how decode steps run."""
        ops = "custom ops" if self.model.ops.custom_ops else "ops traced"
        how = ("compiled (torch.compile" + (", fullgraph" if self.fullgraph else "") + f", {ops})" if self.compile
               else "eager")
        if self._eager:
            how += f"; could not compile, eager: {', '.join(sorted(self._eager))}"
        if self.graphs:
            how += ", device graphs" + (" (capture failed: without)" if self._no_graphs else "")
        return how
