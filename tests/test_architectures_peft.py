"""PEFT export proven on the mlx-lm architectures transformers has: a model made by transformers,
trained here with LoRA, exported, loaded by transformers + PEFT, gives our logits."""

import json

import mlx.core as mx
import numpy as np
import pytest

import mlx_dft
from mlx_dft import api
from mlx_dft.interop import convert
from tests.arch_models import write_hf_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

IDS = [[1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]]
# Keys: the defaults (every linear layer of every block kind) but the experts, which have no
# PEFT form transformers loads (their export is refused, tested below).
TYPES = {
    "qwen3_moe": ["self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj"],
    "phi3": None, "smollm3": None, "lfm2": None, "granite": None, "olmo2": None,
    "gemma3_text": None, "ministral3": None, "gemma4_text": None,
}  # fmt: skip


def _logits_torch(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.float().numpy()


def _logits_mlx(path, adapter=None) -> np.ndarray:
    net, _ = api.load(str(path), adapter)
    return np.array(net(mx.array(IDS)))


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(TYPES))
def test_exported_lora_gives_our_logits_in_transformers_peft(model_type, arith_data, tmp_path):
    path = write_hf_model(tmp_path / "base", model_type)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    base = _logits_mlx(path)
    np.testing.assert_allclose(_logits_torch(hf), base, atol=1e-4, err_msg="the base models differ")
    keys = TYPES[model_type]
    run = mlx_dft.train(model=str(path), data=str(arith_data), output=str(tmp_path / "run"), lora_rank=4,
                        num_layers=-1, iters=3, batch_size=4, learning_rate=3e-2, progress=False,
                        max_seq_length=128, **({"lora_keys": keys} if keys else {}))  # fmt: skip
    out = convert.export_adapter(run.output, tmp_path / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    trained = json.loads((run.output / "adapter_config.json").read_text())["lora_parameters"]["keys"]
    assert cfg["target_modules"] == sorted(trained)  # block-relative paths: unambiguous
    model = peft.PeftModel.from_pretrained(hf, str(out)).eval()
    ours = _logits_mlx(path, run.output)
    np.testing.assert_allclose(_logits_torch(model), ours, atol=1e-4)
    assert np.abs(ours - base).max() > 1e-3  # the adapter matters


def test_lfm2_targets_name_the_attention_out_proj_only_when_only_it_trained(arith_data, tmp_path):
    """lfm2 has ``self_attn.out_proj`` and ``conv.out_proj``: a bare ``out_proj`` target would make
    PEFT adapt both; the export names the block path."""
    from tests.arch_models import write_arch_model

    path = write_arch_model(tmp_path / "lfm2", "lfm2")
    run = mlx_dft.train(model=str(path), data=str(arith_data), output=str(tmp_path / "run"), iters=1,
                        batch_size=2, progress=False, lora_keys=["self_attn.out_proj"])  # fmt: skip
    out = convert.export_adapter(run.output, tmp_path / "peft")
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["self_attn.out_proj"]


@pytest.mark.parametrize(
    ("model_type", "keys", "message"),
    [
        ("gpt_oss", ["q_proj"], "does not support model type 'gpt_oss'"),
        ("qwen3_5", ["q_proj"], "does not support model type 'qwen3_5'"),
        ("qwen3_moe", None, "LoRA on mixture-of-experts layers"),
    ],
)
def test_exports_not_yet_proven_are_refused_by_name(arith_data, tmp_path, model_type, keys, message):
    from tests.arch_models import write_arch_model

    path = write_arch_model(tmp_path / model_type, model_type)
    run = mlx_dft.train(model=str(path), data=str(arith_data), output=str(tmp_path / "run"), iters=1,
                        batch_size=2, progress=False, **({"lora_keys": keys} if keys else {}))  # fmt: skip
    with pytest.raises(mlx_dft.UserError, match=message):
        convert.export_adapter(run.output, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
