"""PEFT export proven on the mlx-lm architectures transformers has: a model made by transformers,
trained here with LoRA, exported, loaded by transformers + PEFT, gives our logits."""

import json

import mlx.core as mx
import numpy as np
import pytest

import mlx_dft
from mlx_dft import api
from mlx_dft.interop import convert
from tests.arch_models import mlx_gpt_oss, write_hf_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

IDS = [[1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]]
# (model type, --lora-keys or None for the defaults: every linear layer of every block kind, the
# experts included, the routers not; --num-layers)
CASES = [
    *[(t, None, -1) for t in ("qwen3_moe", "phi3", "smollm3", "lfm2", "granite", "olmo2", "gemma3_text",
                              "ministral3", "gemma4_text", "qwen3_5", "gpt_oss")],
    # experts' gate without up (PEFT fuses them for transformers 5: up gets a LoRA of zeros)
    ("qwen3_moe", ["self_attn.q_proj", "mlp.switch_mlp.gate_proj"], 1),
    ("qwen3_moe", ["self_attn.q_proj", "mlp.switch_mlp.gate_proj"], -1),
    ("qwen3_moe", None, 1),
    # one expert parameter of gpt_oss (no nesting), the last layer only
    ("gpt_oss", ["self_attn.k_proj", "mlp.experts.down_proj"], 1),
    ("gpt_oss", ["mlp.experts.up_proj", "mlp.experts.down_proj"], -1),
]  # fmt: skip


def _logits_torch(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.float().numpy()


def _logits_mlx(path, adapter=None) -> np.ndarray:
    net, _ = api.load(str(path), adapter)
    return np.array(net(mx.array(IDS)))


@pytest.mark.slow
@pytest.mark.parametrize(("model_type", "keys", "num_layers"), CASES)
def test_exported_lora_gives_our_logits_in_transformers_peft(
    model_type, keys, num_layers, arith_data, tmp_path
):
    hf_path = write_hf_model(tmp_path / "base", model_type)
    # gpt_oss: mlx-lm reads the experts split (as mlx-community converts them), transformers fused
    path = mlx_gpt_oss(hf_path, tmp_path / "mlx") if model_type == "gpt_oss" else hf_path
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_path), dtype=torch.float32).eval()
    base = _logits_mlx(path)
    np.testing.assert_allclose(_logits_torch(hf), base, atol=1e-4, err_msg="the base models differ")
    run = mlx_dft.train(model=str(path), data=str(arith_data), output=str(tmp_path / "run"), lora_rank=4,
                        num_layers=num_layers, iters=3, batch_size=4, learning_rate=3e-2, progress=False,
                        max_seq_length=128, **({"lora_keys": keys} if keys else {}))  # fmt: skip
    out = convert.export_adapter(run.output, tmp_path / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    trained = json.loads((run.output / "adapter_config.json").read_text())["lora_parameters"]["keys"]
    dense = sorted(k for k in trained if "switch_mlp" not in k and "experts" not in k)
    assert sorted(t for t in cfg["target_modules"] if ".experts." not in t) == dense  # block paths
    model = peft.PeftModel.from_pretrained(hf, str(out)).eval()
    ours = _logits_mlx(path, run.output)
    np.testing.assert_allclose(_logits_torch(model), ours, atol=1e-4)
    assert np.abs(ours - base).max() > 1e-3  # the adapter matters
    if any("switch_mlp" in k or "experts" in k for k in trained):  # PEFT put LoRA on the experts
        assert any("experts" in n and "lora_" in n for n, _ in model.named_parameters())


def test_lfm2_targets_name_the_attention_out_proj_only_when_only_it_trained(arith_data, tmp_path):
    """lfm2 has ``self_attn.out_proj`` and ``conv.out_proj``: a bare ``out_proj`` target would make
    PEFT adapt both; the export names the block path."""
    from tests.arch_models import write_arch_model

    path = write_arch_model(tmp_path / "lfm2", "lfm2")
    run = mlx_dft.train(model=str(path), data=str(arith_data), output=str(tmp_path / "run"), iters=1,
                        batch_size=2, progress=False, lora_keys=["self_attn.out_proj"])  # fmt: skip
    out = convert.export_adapter(run.output, tmp_path / "peft")
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["self_attn.out_proj"]


def test_export_of_experts_without_a_proven_peft_form_is_refused_by_name(arith_data, tmp_path, monkeypatch):
    from mlx_dft.adapters.lora import peft as lora_peft
    from tests.arch_models import write_arch_model

    monkeypatch.delitem(lora_peft.EXPERT_LAYOUT, "qwen3_moe")
    path = write_arch_model(tmp_path / "qwen3_moe", "qwen3_moe")
    run = mlx_dft.train(model=str(path), data=str(arith_data), output=str(tmp_path / "run"), iters=1,
                        batch_size=2, progress=False)  # fmt: skip
    why = "LoRA on the mixture-of-experts layers of model type 'qwen3_moe'"
    with pytest.raises(mlx_dft.UserError, match=why):
        convert.export_adapter(run.output, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_qwen3_5_adapters_go_to_peft_and_back_under_the_blocks_mlx_lm_names(arith_data, tmp_path):
    """mlx-lm keeps qwen3_5's blocks under ``language_model.model.layers``, PEFT (transformers'
    ``Qwen3_5ForCausalLM``) under ``model.layers``: exported and imported again, the adapter is
    the same tensors under the same names, and gives the same logits."""
    from tests.arch_models import write_arch_model

    path = write_arch_model(tmp_path / "q35", "qwen3_5")
    run = mlx_dft.train(model=str(path), data=str(arith_data), output=str(tmp_path / "run"), iters=2,
                        batch_size=2, progress=False, learning_rate=3e-2)  # fmt: skip
    out = convert.export_adapter(run.output, tmp_path / "peft")
    names = safetensors_names(out / "adapter_model.safetensors")
    assert names and all(n.startswith("base_model.model.model.layers.") for n in names)
    assert any(".linear_attn.in_proj_qkv." in n for n in names)  # the linear-attention blocks too
    back = convert.import_adapter(str(out), tmp_path / "back", model=str(path))
    a = mx.load(str(run.output / "adapters.safetensors"))
    b = mx.load(str(back / "adapters.safetensors"))
    assert a.keys() == b.keys() and all(k.startswith("language_model.model.layers.") for k in a)
    for k in a:
        np.testing.assert_array_equal(np.array(a[k]), np.array(b[k]), err_msg=k)
    np.testing.assert_array_equal(_logits_mlx(path, run.output), _logits_mlx(path, back))


def safetensors_names(path) -> list[str]:
    return list(mx.load(str(path)).keys())
