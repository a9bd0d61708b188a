"""deepport/kernels under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), checked against cpu_ref."""
import pytest
import torch

from deepport.backends.cpu_ref import ops as ref
from deepport.core.errors import ContractError
from deepport.kernels import rms_norm as k_rms_norm, silu_mul as k_silu_mul

DTYPES = [torch.float32, torch.bfloat16]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _assert_close(got, want, dtype):
    assert got.dtype == want.dtype and got.shape == want.shape
    if dtype == torch.bfloat16:  # both round the same fp32 value once (RTNE): equal, or one ulp apart
        torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=1e-5)
    else:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 300), (1, 7168), (4, 130)])
def test_rms_norm(dtype, shape):
    g = _gen(1)
    x = torch.randn(*shape, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    _assert_close(k_rms_norm.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_fused_residual(dtype):
    g = _gen(2)
    x, res = (torch.randn(2, 3, 200, generator=g).to(dtype) for _ in range(2))
    w = torch.randn(200, generator=g).to(dtype)
    y, r = k_rms_norm.rms_norm(x, w, 1e-6, res)
    y_ref, r_ref = ref.rms_norm(x, w, 1e-6, res)
    assert torch.equal(r, r_ref)  # one rounding of an exact fp32 sum: bit-identical
    _assert_close(y, y_ref, dtype)


def test_rms_norm_refuses_mismatched_weight():
    x = torch.randn(2, 64, generator=_gen(3))
    with pytest.raises(ContractError, match="weight dim"):
        k_rms_norm.rms_norm(x, torch.ones(32), 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 600), (1, 2 * 2048), (2, 2 * 1100)])
def test_silu_mul(dtype, shape):
    x = (3 * torch.randn(*shape, generator=_gen(4))).to(dtype)
    _assert_close(k_silu_mul.silu_mul(x), ref.silu_mul(x), dtype)


def test_silu_mul_refuses_odd_width():
    with pytest.raises(ContractError, match="even"):
        k_silu_mul.silu_mul(torch.randn(2, 7, generator=_gen(5)))
