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
