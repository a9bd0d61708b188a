"""deepport: the DeepSeek-V3 graph on any accelerator, through a backend registry."""
from deepport.core.errors import DeepportError

__version__ = "0.1.0"


def load(model=None, *, backend="auto", dtype="auto", fallback="reference", device=None, tp=1, ep=1,
         dp_attention=False, timeout_s=300.0, check_weights=True, compile=False, graphs=False):
    """Load a model (directory, preset name, or None for the embedded default) bound to a backend.

    tp / ep > 1: tensor / expert parallelism under torchrun with tp x ep processes (docs/parallel.md).
    check_weights=False skips the NaN/inf weight and fp8 scale checks at load. compile=True: decode steps
    run torch.compile'd; graphs=True (cuda/rocm): captured as CUDA/HIP graphs (docs/compile.md)."""
    from deepport.api import load as _load

    return _load(model, backend=backend, dtype=dtype, fallback=fallback, device=device, tp=tp, ep=ep,
                 dp_attention=dp_attention, timeout_s=timeout_s, check_weights=check_weights, compile=compile,
                 graphs=graphs)


__all__ = ["load", "DeepportError", "__version__"]
