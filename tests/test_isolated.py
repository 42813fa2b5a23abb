"""The child-process harness for native parity code: a crash in another project's native library
fails the one test that called it, naming the signal, the library and its version, and pytest
goes on."""

import pytest

import isolated


def test_a_segfault_in_the_child_fails_only_the_calling_test_with_signal_library_and_version():
    library = isolated.library_version("numpy")
    with pytest.raises(pytest.fail.Exception) as e:
        isolated.call("isolated:segfault", library=library)
    first = str(e.value).splitlines()[0]
    assert first == f"{library} crashed with SIGSEGV in isolated:segfault (child process)", first
    assert "numpy " in first and "(not installed)" not in first
    assert "Segmentation fault" in str(e.value)  # faulthandler's stack of the child follows


def test_values_skips_errors_and_time_outs_cross_the_process_boundary():
    assert isolated.call("isolated:library_version", "numpy", library="x").startswith("numpy ")
    assert isolated.call("isolated:library_version", "no-such-dist-xyz", library="x") == (
        "no-such-dist-xyz (not installed)"
    )
    with pytest.raises(pytest.skip.Exception, match="bindings absent"):
        isolated.call("pytest:skip", "bindings absent", library="x")
    with pytest.raises(pytest.fail.Exception, match="ZeroDivisionError"):
        isolated.call("operator:truediv", 1, 0, library="x")
    with pytest.raises(pytest.fail.Exception, match="x: time:sleep timed out after 1 s"):
        isolated.call("time:sleep", 30, library="x", timeout=1)


CRASHING_SUITE = '''
import ctypes

import numpy as np


def test_before():
    assert True


def test_crash_in_numpy():
    p = ctypes.cast(ctypes.c_void_p(16), ctypes.POINTER(ctypes.c_float))
    np.ctypeslib.as_array(p, shape=(1 << 20,)).sum()


def test_after():
    assert True
'''


def test_a_crash_inside_a_library_under_xdist_fails_one_test_naming_signal_library_and_version(tmp_path):
    """The suite's own safety net (crash_report.py with pytest-xdist): a worker killed by a signal
    fails its test, the report names what crashed, and the other tests run."""
    import os
    import subprocess
    import sys

    (tmp_path / "test_crashing.py").write_text(CRASHING_SUITE)
    env = {**os.environ, "PYTHONPATH": str(isolated.TESTS)}
    env.pop("MLX_DFT_CRASH_DIR", None)
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "crash_report", "-n", "1",
         "test_crashing.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = p.stdout + p.stderr
    numpy = isolated.library_version("numpy")
    assert f"{numpy} crashed with SIGSEGV in this test" in out, out
    assert "1 failed, 2 passed" in out, out
    assert "in _sum" in out  # faulthandler's stack of the crash follows
