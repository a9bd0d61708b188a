"""What every op benchmark shares: timing (do_bench / CUDA graphs on a GPU, torch.utils.benchmark on a CPU), the
device's measured limits (copy bandwidth, matmul peaks), rooflines, errors against cpu_ref and the device name."""
from __future__ import annotations

import torch

from deepport.core import settings


def time_ms(fn, device: torch.device, smoke: bool = False, graph: bool = True) -> tuple[float, str]:
    """Median milliseconds of fn() and the timer that measured it.

    On CUDA/HIP: triton.testing.do_bench_cudagraph when `graph` and the call can be captured (no host sync),
    else triton.testing.do_bench. On a CPU: torch.utils.benchmark (one run in smoke mode)."""
    if device.type == "cuda":
        import triton.testing

        if graph and not torch.version.hip:
            try:
                return float(triton.testing.do_bench_cudagraph(fn, rep=50 if smoke else 100,
                                                               return_mode="median")), "cudagraph"
            except Exception:  # a host sync or an allocation the capture refuses: time it eagerly
                torch.cuda.synchronize()
        return float(triton.testing.do_bench(fn, warmup=5 if smoke else 25, rep=20 if smoke else 100,
                                             return_mode="median")), "do_bench"
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    m = timer.timeit(1) if smoke else timer.blocked_autorange(min_run_time=0.2)
    return m.median * 1e3, "torch.utils.benchmark"


def errors(got: torch.Tensor, want: torch.Tensor) -> dict:
    """Max abs and max relative (to the reference's max magnitude) difference, in fp32."""
    d = (got.float() - want.float()).abs().max()
    scale = want.float().abs().max().clamp_min(1e-12)
    return {"max_abs_err": float(d), "max_rel_err": float(d / scale)}


def measure_limits(device: torch.device, smoke: bool, fp8_dtype=None) -> dict:
    """The device's physical limits as plain torch reaches them: copy GB/s (read + write), bf16 and fp8 TFLOP/s."""
    n_bytes = (8 << 20) if smoke else (1 << 30)
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms, _ = time_ms(lambda: dst.copy_(src), device, smoke, graph=False)
    limits = {"copy_gbs": 2 * n_bytes / (ms * 1e-3) / 1e9}
    del src, dst
    n = 256 if smoke else 8192
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(torch.bfloat16)
    b = torch.randn(n, n, device=device, generator=gen).to(torch.bfloat16)
    ms, _ = time_ms(lambda: a @ b, device, smoke, graph=False)
    limits["bf16_tflops"] = 2 * n ** 3 / (ms * 1e-3) / 1e12
    limits["fp8_tflops"], limits["fp8_tflops_note"] = None, "no fp8 format on this backend"
    if fp8_dtype is not None:
        try:  # tensorwise-scaled fp8 GEMM: the fastest fp8 path torch has on this device
            a8, b8 = a.to(fp8_dtype), b.to(fp8_dtype).t()
            one = torch.ones((), device=device)
            torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
            ms, _ = time_ms(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                            device, smoke, graph=False)
            limits["fp8_tflops"], limits["fp8_tflops_note"] = 2 * n ** 3 / (ms * 1e-3) / 1e12, "torch._scaled_mm tensorwise"
        except Exception as e:  # CPU builds and pre-sm89 GPUs have no fp8 GEMM
            limits["fp8_tflops_note"] = f"torch._scaled_mm unavailable: {type(e).__name__}: {str(e)[:160]}"
    limits["matmul_n"], limits["copy_bytes"] = n, n_bytes
    return limits


def roofline_ms(flops: float, nbytes: float, peak_tflops: float | None, copy_gbs: float) -> float:
    """The shortest time the device allows: compute at the peak, or moving the bytes at copy bandwidth."""
    t_mem = nbytes / (copy_gbs * 1e9) * 1e3
    t_flop = flops / (peak_tflops * 1e12) * 1e3 if peak_tflops else 0.0
    return max(t_mem, t_flop)


def tflops(flops: float, ms: float | None) -> float | None:
    return None if not ms else flops / (ms * 1e-3) / 1e12


def gbs(nbytes: float, ms: float | None) -> float | None:
    return None if not ms else nbytes / (ms * 1e-3) / 1e9


def device_name(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return cpu_model()
    return device.type


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else platform's answer) and its core count."""
    import os
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def timings_meaningful(smoke: bool) -> bool:
    return not smoke and not settings.triton_interpret()


def timing_label(device: torch.device, smoke: bool) -> str:
    """Whether the numbers mean anything: only a hardware run at full shapes does."""
    if settings.triton_interpret():
        return "meaningless: Triton interpreter on the CPU" + (", smoke shapes" if smoke else "")
    if smoke:
        return "meaningless: smoke shapes"
    return f"measured on {device.type}"
