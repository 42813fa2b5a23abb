"""Tested versions: what set-up installs is pinned, the runtime bounds agree with the start-up
check, and an untested mlx-lm is refused in one line (or run, warned, when the user says so)."""

import importlib.metadata
import os
import re

import pytest

from conftest import BUNDLED, ROOT, run_cli
from mlx_dft import compat

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
CONSTRAINTS = ROOT / "scripts" / "constraints.txt"


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    found = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version and not name.startswith("-"), f"not an exact pin: {line!r}"
            found[norm(name)] = version
    return found


def test_tested_ranges_follow_pep_440():
    def r(version):
        return compat.in_range(version, "0.32.2", "0.33")

    assert r("0.32.2") and r("0.32.10") and r("0.32.2.post1")
    assert not r("0.32.1") and not r("0.33") and not r("0.33.0") and not r("0.33.0rc1") and not r("1.0")
    assert compat.in_range("2.13.0+cpu", "2.13", "2.14")


def test_runtime_bounds_are_the_start_up_range_and_the_pins_lie_inside():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = {norm(re.split(r"[\[<>=;]", d, maxsplit=1)[0].strip()): d.split(";")[0] for d in deps}
    for name, (low, high) in compat.TESTED.items():
        assert f">={low},<{high}" in spec[name], (name, spec[name])
        assert compat.in_range(pins()[name], low, high), name
    for d in deps:  # every runtime dependency has a lower and an upper bound
        assert ">=" in d and "<" in d, d


def test_every_installed_package_is_the_pinned_version():
    """The environment the suite runs in is the one scripts/constraints.txt describes (set-up
    passes it to pip): a new release on the index cannot change it."""
    if os.environ.get(compat.ENV, "") not in ("", "0"):
        pytest.skip(f"{compat.ENV} is set: trying untested releases (setup.sh --latest)")
    pinned = pins()
    assert pinned["mlx-lm"] and pinned["torch"] and pinned["llama-cpp-python"]
    off = []
    for dist in importlib.metadata.distributions():
        name = norm(dist.metadata["Name"])
        if name == "mlx-dft":
            continue
        if name not in pinned:
            off.append(f"{name} {dist.version} (not pinned)")
        elif dist.version.split("+")[0] != pinned[name]:
            off.append(f"{name} {dist.version} (pinned {pinned[name]})")
    ignorable = {"pip", "setuptools", "wheel"}  # the venv's own tools, when a venv is reused
    assert [o for o in off if o.split()[0] not in ignorable] == []


def fake_release(tmp_path, name: str, version: str):
    """A site folder whose dist-info makes importlib.metadata report `name` at `version`."""
    site = tmp_path / "site"
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return {"PYTHONPATH": str(site)}


def test_an_untested_mlx_lm_is_refused_in_one_line_and_nothing_is_written(tmp_path):
    env = fake_release(tmp_path, "mlx-lm", "0.33.0")
    out = tmp_path / "gen"
    p = run_cli("generate", "--model", BUNDLED, "--prompt", "1 + 1 =", "--max-tokens", "1", env=env)
    assert p.returncode == 1, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("mlx_dft: error: untested mlx-lm 0.33.0 (tested: >=0.32.2,<0.33)")
    assert "MLX_DFT_ALLOW_UNTESTED=1" in lines[0] and "pip install 'mlx-lm>=0.32.2,<0.33'" in lines[0]
    p = run_cli("train", "--model", BUNDLED, "--iters", "1", "--output", out, env=env)
    assert p.returncode == 1 and "untested mlx-lm 0.33.0" in p.stderr and not out.exists()
    assert run_cli("--version", env=env).returncode == 0  # what needs no model still answers


def test_allowing_untested_releases_runs_with_one_warning(tmp_path):
    env = {**fake_release(tmp_path, "mlx-lm", "0.31.3"), compat.ENV: "1"}
    p = run_cli("generate", "--model", BUNDLED, "--prompt", "1 + 1 =", "--max-tokens", "2", env=env)
    assert p.returncode == 0, p.stderr
    warnings = [line for line in p.stderr.splitlines() if "untested" in line]
    assert warnings == [
        "mlx_dft: warning: untested mlx-lm 0.31.3 (tested: >=0.32.2,<0.33); results may be wrong "
        "(MLX_DFT_ALLOW_UNTESTED=1)"
    ]


def test_the_python_api_refuses_too(monkeypatch):
    monkeypatch.setattr(compat, "installed", lambda name: {"mlx": "0.40.1"}.get(name, "0.32.2"))
    monkeypatch.delenv(compat.ENV, raising=False)
    with pytest.raises(compat.UserError, match=r"untested mlx 0\.40\.1 \(tested: >=0\.32\.4,<0\.33\)"):
        compat.require()
