"""Public API: deepport.load(...) -> Model with logits(), generate(), backend and op_report()."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from deepport import models
from deepport.core import checkpoint, config_checks, distributed, finite, parallel, registry, settings
from deepport.core import dp_attention as dp_attention_mod
from deepport.core.errors import DeepportError
from deepport.core.generate import check_sampling
from deepport.core.generate import generate as _generate
from deepport.core.model import Transformer
from deepport.core.tokenizer import Tokenizer, require

TORCH_DTYPES = {"fp8": torch.bfloat16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    stats: dict = field(default_factory=dict)


class Model:
    """A DeepSeek-V3 model bound to one backend's op table."""

    def __init__(self, transformer: Transformer, tokenizer: Tokenizer | None, path: Path, dtype: str, table,
                 world=None):
        self.transformer, self.tokenizer, self.path, self.dtype, self.table = transformer, tokenizer, path, dtype, table
        self.world = world  # distributed.World under tensor/expert parallelism, else None
        self.shard_plan = None  # parallel.ShardPlan: what this rank read of the checkpoint
        self.served_as = None  # an FP8 checkpoint served in another dtype (dequantised at load): that dtype
        self.step = None  # core.step.DecodeStep when loaded with compile=True or graphs=True (else eager decode)

    @property
    def is_rank0(self) -> bool:
        """True on the rank that prints (always, without parallelism)."""
        return self.world is None or self.world.is_rank0

    @property
    def backend(self) -> str:
        return self.table.backend

    @property
    def args(self):
        return self.transformer.args

    def op_report(self) -> dict[str, str]:
        """Per op: 'native', 'composite' (built from the backend's primitives) or 'fallback' (cpu_ref code)."""
        return dict(self.table.report)

    def op_sources(self) -> dict[str, str]:
        """Per op: what runs it, as the backend describes it (e.g. a torch_npu kernel or 'generic torch')."""
        return dict(self.table.sources)

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full prefill, no state kept: fp32 logits [B, S, vocab]."""
        if input_ids.dim() != 2:
            raise DeepportError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
        self._check_ids(input_ids.flatten().tolist())
        t = self.transformer
        return t.logits(t(input_ids.to(t.embed.weight.device)))

    def _check_ids(self, ids) -> None:
        bad = [i for i in ids if not 0 <= i < self.args.vocab_size]
        if bad:
            raise DeepportError(f"token id {bad[0]} is outside the vocabulary [0, {self.args.vocab_size}); "
                                f"use ids from this model's tokenizer")

    def encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = require(self.tokenizer, self.path).encode(prompt)
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            raise DeepportError("empty prompt; give at least one token")
        self._check_ids(ids)
        return ids

    def generate(self, prompt, *, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, mtp: bool = False) -> GenerationResult:
        """Generate from text or a token-id list; returns .text, .tokens (generated ids only) and .stats."""
        results = self.generate_batch([prompt], max_new_tokens=max_new_tokens, temperature=temperature,
                                      top_p=top_p, seed=seed, mtp=mtp)
        return results[0]

    def generate_batch(self, prompts, *, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                       seed: int | None = None, mtp: bool = False) -> list[GenerationResult]:
        ids = [self.encode(p) for p in prompts]
        check_sampling(temperature, top_p, seed)
        longest = max(len(i) for i in ids) + max_new_tokens
        if longest > self.args.max_seq_len:
            registry.warn(f"prompt ({max(len(i) for i in ids)} tokens) plus --max-new-tokens {max_new_tokens} "
                          f"exceeds max_position_embeddings {self.args.max_seq_len} of {self.path}: positions "
                          f"past it were never trained and the output degrades")
        eos = self.args.eos_token_id
        if mtp:
            from deepport.core.speculative import generate_mtp

            if not self.args.n_mtp_layers:
                raise DeepportError(f"{self.path} has no MTP module (num_nextn_predict_layers=0); drop --mtp")
            try:
                gen = generate_mtp(self.transformer, ids, max_new_tokens, temperature, top_p, seed, eos, step=self.step)
            except finite.NonFiniteLogits as e:  # rerun it eager (same seed) with every op checked: name the culprit
                raise finite.rerun_checked(self.transformer.ops, lambda: generate_mtp(
                    self.transformer, ids, max_new_tokens, temperature, top_p, seed, eos), e) from None
        else:
            try:
                gen = _generate(self.transformer, ids, max_new_tokens, temperature, top_p, seed, eos, step=self.step)
            except finite.NonFiniteLogits as e:  # replay the steps with every op checked: name the culprit
                raise finite.locate(self.transformer, ids, e) from None
        decode = self.tokenizer.decode if self.tokenizer else (lambda t: "")
        return [GenerationResult(decode(t), t, dict(gen.stats)) for t in gen.tokens]


def _reads_codes(backend, dtype: str) -> bool:
    """Whether `backend`, serving an FP8 checkpoint as `dtype`, reads the expert codes (Backend.keeps_fp8_codes)."""
    return backend.keeps_fp8_codes is not None and backend.keeps_fp8_codes(dtype)


def _pick_dtype(dtype: str, backend, ckpt_fp8: bool) -> str:
    if dtype != "auto":
        registry.check_dtype(backend, dtype)
        return dtype
    if backend.compute_dtype is not None and backend.compute_dtype() in backend.dtypes:
        return backend.compute_dtype()  # e.g. cpu: fp32 where bf16 is emulated, bf16 where it is native
    for d in (("fp8", "bf16", "fp32") if ckpt_fp8 else ("bf16", "fp32", "fp8")):
        if d in backend.dtypes and (d != "fp8" or backend.resolve_fp8_format() is not None):
            return d
    raise DeepportError(f"backend {backend.name!r} declares no usable dtype")


def load(model=None, *, backend="auto", dtype="auto", fallback="reference", device=None, tp: int = 1, ep: int = 1,
         dp_attention: bool = False, timeout_s: float = 300.0, check_weights: bool = True, compile: bool = False,
         graphs: bool = False) -> Model:
    """tp/ep > 1: tensor/expert parallelism over torch.distributed; run under torchrun with tp x ep processes
    (see docs/parallel.md). Each rank reads only its shard of the checkpoint. dp_attention (tp=1, ep>=2):
    each rank attends for and caches only its own sequences. check_weights=False skips the NaN/inf weight and
    fp8 scale checks at load (docs/robustness.md). compile=True: decode steps run torch.compile'd (fullgraph);
    graphs=True (cuda/rocm): captured as CUDA/HIP graphs per batch bucket (docs/compile.md)."""
    if (compile or graphs) and settings.check_finite():
        raise DeepportError("DEEPPORT_CHECK_FINITE=1 checks every op's outputs on the host (a sync per op), which "
                            "torch.compile and device graphs cannot keep in one graph; unset it to decode with "
                            "--compile/--graphs, or drop --compile/--graphs to find the first op that makes NaN/inf")
    b = registry.select(backend)
    layout = distributed.check_world(tp, ep) if tp * ep > 1 else None
    if dp_attention:
        dp_attention_mod.check(layout)
    want_fp8 = dtype in ("fp8", "auto")
    # a backend that reads an FP8 checkpoint's codes (keeps_fp8_codes) gets presets in FP8 too, as DeepSeek-V3 ships
    fp8_preset = want_fp8 and ("fp8" in b.dtypes or _reads_codes(b, _pick_dtype(dtype, b, ckpt_fp8=True)))
    with distributed.one_rank_at_a_time(layout):  # presets are materialised once per host
        path = models.resolve(model, fp8=fp8_preset)
    args, cfg = checkpoint.read_config(path)
    dtype = _pick_dtype(dtype, b, ckpt_fp8=args.fp8_block is not None)
    if args.fp8_block is not None and dtype != "fp8" and "fp8" in b.dtypes and b.resolve_fp8_format() is None:
        registry.warn(f"backend {b.name!r} has no fp8 on this device: "
                      f"dequantising the FP8 checkpoint to {dtype} at load")
    elif args.fp8_block is not None and dtype != "fp8" and "fp8" not in b.dtypes:
        registry.warn(f"FP8 checkpoint served as {dtype} on backend {b.name!r} (no fp8 arithmetic here; "
                      f"weights dequantised once at load)")
    # --compile: a traceable backend's torch ops are traced into the graph (Inductor fuses across them); any
    # other backend's ops, and every op under --graphs, go through the opaque deepport:: custom ops
    table = registry.bind(b, fallback=fallback, custom_ops=graphs or (compile and not b.traceable))
    dev = torch.device(device) if device else table.device
    if graphs and dev.type != "cuda":
        raise DeepportError(f"graphs=True (--graphs) captures CUDA/HIP graphs, but backend {b.name!r} runs on "
                            f"{dev.type}; drop it (compile=True / --compile works on every backend)")
    fp8 = table.fp8 if dtype == "fp8" else None
    config_checks.check_fits(args, dtype, dev, ranks=tp * ep)  # refuse before any allocation
    t = Transformer(args, table, dtype=TORCH_DTYPES[dtype], fp8=fp8, device="meta")
    world = plan = None
    if layout is not None:
        world, plan = parallel.shard(t, layout, b, fp8 is not None, timeout_s)  # refuses before any collective
        if dp_attention:
            dp_attention_mod.apply(t, world)
        dev = distributed.device_for(world, dev)
    checkpoint.load_into(t, path, TORCH_DTYPES[dtype], fp8, dev, shard=plan, check_weights=check_weights,
                         keep_fp8_codes=fp8 is None and _reads_codes(b, dtype))
    t.inv_freq = t.inv_freq.to(dev)
    t.eval()
    m = Model(t, Tokenizer.from_dir(path), path, dtype, table, world)
    m.shard_plan = plan
    m.served_as = dtype if args.fp8_block is not None and dtype != "fp8" else None
    if compile or graphs:
        from deepport.core.step import DecodeStep

        m.step = DecodeStep(t, compile=compile, graphs=graphs)
    return m
