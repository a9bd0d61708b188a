"""cpu: the fast default path on x86 and ARM CPUs (torch's kernels, fp32 compute where bf16 is emulated)."""
from pathlib import Path

from deepport.core.registry import Backend, Probe


def _probe() -> Probe:
    from deepport.backends.cpu import capability

    return Probe(True, f"{capability.describe()}; computes in {capability.compute_dtype()}")


def _load():
    from deepport.backends.cpu import ops

    return {name: getattr(ops, name) for name in ops.__all__}


def _evidence() -> str:
    from deepport.backends.cpu import capability

    return f"hardware: cpu ({capability.describe()})"


def _compute_dtype() -> str:
    from deepport.backends.cpu import capability

    return capability.compute_dtype()


def _keeps_fp8_codes(dtype: str) -> bool:
    """fp32 only: the C kernels compute in fp32 (bf16 serving keeps no codes it would not read)."""
    from deepport.backends.cpu import native

    return dtype == "fp32" and native.available()


def _sources() -> dict:
    from deepport.backends.cpu import native

    return {"rms_norm": "up to 16 fp32 rows: one C call with the residual add; else torch layer_norm on [x ; -x] "
                        "(fp32; + fused residual add)", "rope": "torch complex product (in reals under torch.compile)",
            "act_quant": "torch", "weight_dequant": "torch", "fp8_gemm": "torch bmm per 128-K block",
            "linear": "torch F.linear (fp8: act_quant + fp8_gemm); FP8 checkpoints' weights of 2^18+: C on their "
                      "codes; bf16 weights of 2^18+ served as fp32 (the lm_head), 1-2 rows: C on their bf16 values",
            "mla_prefill": "torch scaled_dot_product_attention",
            "mla_decode": "one C call over the paged latent cache (on one thread, or on torch's threads in an OpenMP "
                          "build); else torch batched gather + bmm",
            "moe_gate": "torch scores; expert selection up to 16 tokens in one C call (else torch topk)",
            "moe_experts": f"up to 16 tokens: one C call a layer, reading FP8 checkpoints' expert codes (native: "
                           f"{native.status()}); else torch: per-token expert loop (M <= 2) / sorted groups; "
                           f"compiling: gathered pairs or those as one opaque op",
            "silu_mul": "torch", "sample": "torch", "all_reduce": "torch.distributed (gloo)",
            "all_to_all": "torch.distributed (gloo)"}


BACKEND = Backend(
    name="cpu",
    device_type="cpu",
    probe=_probe,
    load=_load,
    # fp32 everywhere; bf16 = bf16 storage and rounding per the contracts, arithmetic in fp32 (native bf16
    # dot products only on AVX512-BF16/AMX/ARM bf16). No fp8: FP8 checkpoints are served as the compute dtype.
    dtypes=frozenset({"bf16", "fp32"}),
    fp8_format=None,
    dist_backend="gloo",
    origin="builtin",
    conformance_toml=Path(__file__).with_name("conformance.toml"),
    description="fast CPU path (torch kernels, SDPA, vectorised paged decode, batched MoE)",
    evidence=_evidence,
    sources=_sources,
    compute_dtype=_compute_dtype,
    keeps_fp8_codes=_keeps_fp8_codes,  # the C kernels read an FP8 checkpoint's codes (native/)
    traceable=True,  # --compile traces these torch ops into one Inductor graph (docs/compile.md, measured 1.7-2.1x)
)
