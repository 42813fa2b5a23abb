"""Untrusted files: crafted PyTorch checkpoints are refused before they can read memory."""

from __future__ import annotations

import collections
import io
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from mlx_dft.errors import UserError
from mlx_dft.interop import torch_pickle

torch = pytest.importorskip("torch")

STORAGE = object()  # stands for the one storage of the crafted file


class _Tensor:
    """Pickles as torch does it: _rebuild_tensor_v2(storage, offset, size, stride, ...)."""

    def __init__(self, offset, size, stride):
        self.args = (offset, size, stride)

    def __reduce__(self):
        offset, size, stride = self.args
        return (
            torch._utils._rebuild_tensor_v2,
            (STORAGE, offset, size, stride, False, collections.OrderedDict()),
        )


def write_pth(path, tensors: dict, numel: int = 4, data: bytes | None = None):
    """A zip checkpoint like torch.save's, with one float32 storage of ``numel`` elements (0..n-1)."""

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel) if obj is STORAGE else None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(collections.OrderedDict(tensors))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        zf.writestr("archive/version", "3\n")
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/data/0", np.arange(numel, dtype="<f4").tobytes() if data is None else data)
    return path


def test_a_well_formed_crafted_file_reads_like_torch(tmp_path):
    path = write_pth(tmp_path / "ok.pth", {"a": _Tensor(0, (2, 2), (2, 1)), "t": _Tensor(1, (2,), (2,))})
    ours = torch_pickle.load(path)
    theirs = torch.load(path, weights_only=True)
    for k in ("a", "t"):
        np.testing.assert_array_equal(ours[k], theirs[k].numpy())
    np.testing.assert_array_equal(ours["t"], [1.0, 3.0])


@pytest.mark.parametrize(
    "tensor,numel,data,message",
    [
        (_Tensor(0, (1, 2**25), (2**25, 1)), 4, None, "reaches element"),  # would segfault
        (_Tensor(0, (1, 1024), (1024, 1)), 4, None, "reaches element"),  # would copy process memory
        (_Tensor(2**20, (2,), (1,)), 4, None, "reaches element"),  # offset far outside
        (_Tensor(3, (2,), (1,)), 4, None, "reaches element"),  # one past the end
        (_Tensor(-1, (2,), (1,)), 4, None, "invalid"),
        (_Tensor(0, (2,), (-1,)), 4, None, "invalid"),
        (_Tensor(0, (2, 2), (1,)), 4, None, "invalid"),
        (_Tensor(0, (2,), (1,)), 8, np.zeros(4, "<f4").tobytes(), "holds 16 bytes"),  # numel > data
        (_Tensor(0, (2**20, 2**20), (0, 0)), 4, None, "too many elements"),
    ],
)
def test_crafted_tensor_records_are_refused(tmp_path, tensor, numel, data, message):
    path = write_pth(tmp_path / "bad.pth", {"w": tensor}, numel=numel, data=data)
    with pytest.raises(UserError, match=message):
        torch_pickle.load(path)


def test_the_cli_refuses_a_crafted_checkpoint_in_one_line(tmp_path):
    path = write_pth(
        tmp_path / "evil.pth",
        {"global_value_embedding.weight": _Tensor(0, (1, 2**25), (2**25, 1))},
    )
    p = subprocess.run(
        [sys.executable, "-m", "mlx_dft", "import", str(path), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 1 and "reaches element" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "model_type", ["os", "base", "rope_utils", "switch_layers", "llama.evil", "../../tmp/x", 3, ["llama"]]
)
def test_a_config_cannot_choose_the_module_mlx_lm_imports(tiny_model, tmp_path, model_type):
    """mlx-lm imports ``mlx_lm.models.<model_type>``: only its architecture modules are accepted."""
    import json
    import shutil

    from mlx_dft.models import load_model

    folder = tmp_path / "m"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    with pytest.raises(UserError, match=r"is not an architecture mlx-lm [0-9.]+ supports"):
        load_model(str(folder))
    assert "mlx_lm.models.os" not in sys.modules


def test_a_peft_folder_cannot_choose_the_module_either(tiny_model, tmp_path):
    """Importing a PEFT adapter builds its base model's layout: the same check applies."""
    import json
    import shutil

    from mlx_dft.interop.convert import read_source

    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "model_type": "rope_utils"}))
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(base), "r": 4, "lora_alpha": 8,
                    "target_modules": ["q_proj"]})  # fmt: skip
    )
    with pytest.raises(UserError, match=r"is not an architecture mlx-lm [0-9.]+ supports"):
        read_source(str(peft), None)


@pytest.mark.slow
def test_a_zip_bomb_is_refused_without_inflating_it(tmp_path):
    """A .pth whose 4-element storage member inflates to 1 GiB: refused after reading 17 bytes of
    it, under a 400 MB address-space cap (the whole file used to be inflated before any check)."""
    path = tmp_path / "bomb.pth"
    write_pth(path, {"a": _Tensor(0, (4,), (1,))}, numel=4)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        names = zf.namelist()
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in names if n != "archive/data/0"}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for n, b in members.items():
            zf.writestr(n, b)
        with zf.open("archive/data/0", "w", force_zip64=True) as f:
            chunk = bytes(1 << 24)
            for _ in range(64):  # 1 GiB of zeros, about 1 MB compressed
                f.write(chunk)
    assert path.stat().st_size < 8 << 20
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (400 << 20, 400 << 20))\n"
        "from mlx_dft.interop import torch_pickle\n"
        "from mlx_dft.errors import UserError\n"
        "try:\n"
        "    torch_pickle.load(sys.argv[1])\n"
        "except UserError as e:\n"
        "    print(e)\n"
    )
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", code, str(path)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    assert "archive/data/0 holds more bytes, 16 expected" in p.stdout, p.stdout


def test_tensors_that_claim_more_than_a_checkpoint_may_hold_are_refused(tmp_path):
    path = write_pth(tmp_path / "big.pth", {"a": _Tensor(0, (4,), (1,))}, numel=10**12, data=b"")
    with pytest.raises(UserError, match="its tensors claim 4,000,000,000,000 bytes"):
        torch_pickle.load(path)
