"""Portable Triton kernels shared by the cuda and rocm backends.

Conventions (every kernel module here follows them; the tests iterate over this package):

- One module per op, named exactly like the op contract in deepport/core/ops.py: ``<op>.py`` holds
  ``<op>_kernel`` (the ``@triton.jit`` math) and ``<op>(...)``, the host wrapper with the contract's
  parameter names in the contract's order, which checks the preconditions (ContractError naming the fix),
  allocates and launches. Extra wrapper arguments are keyword-only (``*, configs=None``).
- Kernels never read device identity. Tiling and launch knobs (BLOCK_* constexprs, num_warps,
  num_stages, and AMD's waves_per_eu / matrix_instr_nonkdim / kpack) come from the caller as a list of
  config dicts (deepport/kernels/tuning.py reads them per backend and arch from the backend's
  tuning.json); ``launch.launch`` runs one config directly or autotunes over several on hardware, and
  uses only the first under TRITON_INTERPRET=1.
- The fp8 format follows the output/input tensor's dtype (``x.to(out_ptr.dtype.element_ty)``): fp8e4nv
  for torch.float8_e4m3fn, fp8e4b8 for torch.float8_e4m3fnuz. Which format a device may use is the
  policy in deepport/kernels/targets.py, checked before any launch or compile.
- Interpreter rules (DESIGN.md): upcast every bf16/fp8 load to fp32 before arithmetic (tl.dot on fp8
  operands is fine); no bf16 atomics; no inline asm; quantisers round to the fp8 grid in fp32 (RTNE,
  rounding.round_to_fp8_grid) before the cast, and bf16 outputs are rounded in fp32
  (rounding.round_to_bf16) before the store, so the interpreter's truncating casts are exact.
- Compile-only checks: each kernel module defines ``compile_specs(target) -> list[CompileSpec]``
  (deepport/kernels/targets.py) for a ``triton.backends.compiler.GPUTarget``: the kernel, its
  signature (argument name -> Triton type such as ``*fp8e4nv``, ``*bf16``, ``i32``, ``fp32``), its
  constexprs, compile options, and regex patterns that must appear in the target's assembly (PTX for
  cuda, AMDGCN for hip), e.g. ``wgmma.*e4m3.e4m3`` or ``v_mfma_f32_\\w+_fp8_fp8``. Return [] for a
  target the kernel does not support. tests/test_compile_targets.py compiles every spec of every module
  of this package that defines ``compile_specs`` (no test edit needed for a new kernel).
"""
import importlib
import pkgutil


def kernel_modules() -> list:
    """Every module of this package that defines ``compile_specs`` (imported, sorted by name)."""
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        mod = importlib.import_module(f"{__name__}.{info.name}")
        if callable(getattr(mod, "compile_specs", None)):
            found.append(mod)
    return found
