"""The PyTorch Aligner runner and the Hugging Face Aligner format on the architectures transformers
has: an Aligner applied in MLX (random non-zero gates and prefix) on a model made by transformers,
exported in our HF format and attached to the transformers model, gives MLX's logits (float32);
zero gates give transformers' own logits bitwise; a mismatched base is refused in one line."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_dft import adapters, api
from mlx_dft.adapters import aligner
from mlx_dft.adapters.aligner import hf as aligner_hf
from mlx_dft.config import TrainConfig
from mlx_dft.interop import convert
from mlx_dft.models import model_signature
from tests.arch_models import TYPES, mlx_gpt_oss, write_hf_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

IDS = [[1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [1, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70]]
# the largest |logit difference| torch vs MLX seen per model type (float32), with margin; the base
# models themselves agree to 1e-4 (tests/test_architectures_peft.py)
ATOL = dict.fromkeys(TYPES, 1e-4)
# what the MLX side does not run yet (mlx_dft.support): skipped with the reason, not failed
MLX_READY = {"llama", "qwen3"}


def _mlx_folder(hf_path, model_type, tmp_path):
    # gpt_oss: mlx-lm reads the experts split (as mlx-community converts them), transformers fused
    return mlx_gpt_oss(hf_path, tmp_path / "mlx") if model_type == "gpt_oss" else hf_path


def _with_aligner(path, tokens=3, start=0, gate="head", seed=1):
    """The MLX model at ``path`` with an Aligner: random prefix, random gates of both signs."""
    net, _ = api.load(str(path))
    cfg = TrainConfig(adapter="aligner", aligner_tokens=tokens, aligner_start_layer=start, aligner_gate=gate)
    settings = aligner.settings(cfg, net)
    adapters.apply_adapter(net, "aligner", settings)
    params = dict(tree_flatten(net.trainable_parameters()))
    new = {}
    for i, (k, v) in enumerate(sorted(params.items())):
        r = mx.random.uniform(-1, 1, v.shape, key=mx.random.key(seed * 1000 + i))
        new[k] = r if aligner.GATE_LEAF in k else 2 * r
    net.load_weights(list(new.items()), strict=False)
    return net, settings, new


def _save(path, settings, weights, out):
    """An mlx_dft adapter folder, as a run writes it."""
    out.mkdir()
    config = json.loads((path / "config.json").read_text())
    cfg = {
        **settings,
        "adapter": "aligner",
        "base_model": str(path),
        "model_signature": model_signature(config),
    }
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    mx.save_safetensors(str(out / aligner.WEIGHTS_FILE), weights)
    return out


def _torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.float().numpy()


def _hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.mark.slow
@pytest.mark.parametrize("model_type", TYPES)
def test_exported_aligner_gives_mlx_logits_in_transformers(model_type, tmp_path):
    from mlx_dft.torch_aligner import attach_aligner

    if model_type not in MLX_READY:
        pytest.skip(f"the MLX Aligner does not run {model_type} yet")
    hf_path = write_hf_model(tmp_path / "base", model_type)
    path = _mlx_folder(hf_path, model_type, tmp_path)
    net, settings, weights = _with_aligner(path)
    ours = np.array(net(mx.array(IDS)))
    run = _save(path, settings, weights, tmp_path / "run")
    exported = convert.export_adapter(run, tmp_path / "hf")
    spec = json.loads((exported / aligner_hf.HF_CONFIG).read_text())
    assert spec["format_version"] == 2 and spec["layers"] == aligner_hf.gated_layers(settings["aligner"])
    model = attach_aligner(_hf(hf_path), exported)
    theirs = _torch_logits(model)
    diff = float(np.abs(theirs - ours).max())
    print(f"{model_type}: max |logit difference| torch vs MLX {diff:.2e}")
    np.testing.assert_allclose(theirs, ours, atol=ATOL[model_type], rtol=0)
    model.aligner.enabled = False
    assert np.abs(ours - _torch_logits(model)).max() > 1e-2  # the Aligner matters
    back = convert.import_adapter(str(exported), tmp_path / "back")  # mlx -> HF -> mlx, bitwise
    a, b = (mx.load(str(p / aligner.WEIGHTS_FILE)) for p in (run, back))
    assert set(a) == set(b) and all(mx.array_equal(a[k], b[k]) for k in a)


def _export(path, tmp_path, settings_weights=None, **kw):
    net, settings, weights = settings_weights or _with_aligner(path, **kw)
    run = _save(path, settings, weights, tmp_path / "run")
    return convert.export_adapter(run, tmp_path / "hf")


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_zero_gates_give_the_transformers_base_model_bitwise(model_type, tmp_path):
    from mlx_dft.torch_aligner import attach_aligner

    hf_path = write_hf_model(tmp_path / "base", model_type)
    net, settings, weights = _with_aligner(hf_path)
    weights = {k: (mx.zeros_like(v) if aligner.GATE_LEAF in k else v) for k, v in weights.items()}
    exported = _export(hf_path, tmp_path, (net, settings, weights))
    base = _torch_logits(_hf(hf_path))
    model = attach_aligner(_hf(hf_path), exported)
    assert model.config._attn_implementation.startswith("mlx_dft_aligner_")
    np.testing.assert_array_equal(_torch_logits(model), base)


def test_a_mismatched_base_is_refused_in_one_line_naming_both(tmp_path):
    from mlx_dft.torch_aligner import attach_aligner

    exported = _export(write_hf_model(tmp_path / "base", "llama"), tmp_path)
    other = _hf(write_hf_model(tmp_path / "other", "qwen3"))
    with pytest.raises(
        ValueError, match=r"^\S+: this Aligner is for a llama with .*; this model is a qwen3 with"
    ) as e:
        attach_aligner(other, exported)
    assert "\n" not in str(e.value) and not hasattr(other, "aligner")
    assert other.config._attn_implementation in ("sdpa", "eager")
