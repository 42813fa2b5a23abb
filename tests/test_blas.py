# ruff: noqa: I001  (mlx_dft must be imported before mlx: it puts OpenBLAS under MLX)
"""The BLAS under MLX on Linux: OpenBLAS when the system has it, and its thread count under our
control (scripts/profile_step.py times a step on one thread and on all of them)."""

import numpy as np
import pytest

from mlx_dft import _blas
import mlx.core as mx


def _openblas():
    if _blas.info().name != "OpenBLAS":
        pytest.skip(f"no OpenBLAS under MLX here ({_blas.info().describe()})")


def test_thread_count_is_set_and_restored_and_products_agree():
    _openblas()
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((300, 200), np.float32), rng.standard_normal((200, 250), np.float32)
    before = _blas.set_threads(1)
    try:
        assert before >= 1
        assert _blas.set_threads(1) == 1  # the count really changed
        one = np.array(mx.array(a) @ mx.array(b))
    finally:
        assert _blas.set_threads(before) == 1
    assert _blas.set_threads(before) == before
    many = np.array(mx.array(a) @ mx.array(b))
    np.testing.assert_allclose(one, a.astype(np.float64) @ b, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(many, one, rtol=1e-5, atol=1e-4)


def test_set_threads_without_openblas_says_why(monkeypatch):
    monkeypatch.setattr(_blas, "_INFO", _blas.BlasInfo("reference BLAS", None, "disabled"))
    with pytest.raises(RuntimeError, match="needs OpenBLAS"):
        _blas.set_threads(1)
