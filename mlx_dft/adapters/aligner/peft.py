"""The Aligner as Hugging Face PEFT's adaption prompt (``peft_type: ADAPTION_PROMPT``).

PEFT's adaption prompt (LLaMA-Adapter) gives each adapted layer its own prompt and one gate; an
Aligner with one gate per layer is exactly that with the shared prefix copied into every layer,
on the architectures whose adaption prompt PEFT implements (``models.ARCHITECTURES``). Per-head
gates have no PEFT counterpart and are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from mlx_dft.adapters.aligner.hf import DEFAULT_PREFIX, GATE_NAME, gated_layers
from mlx_dft.adapters.lora.peft import PEFT_CONFIG, PEFT_PREFIX, PEFT_WEIGHTS
from mlx_dft.errors import UserError
from mlx_dft.files import save_safetensors, staged_folder
from mlx_dft.models import ARCHITECTURES


def export_adaption_prompt(
    config: dict, tensors: dict[str, mx.array], out: Path, base_model: str | None
) -> Path:
    """Aligner with one gate per layer on llama/mistral -> PEFT adaption prompt: the shared
    prefix copied into every adapted layer, the layer's gate as its adaption gate. Exact."""
    a = config["aligner"]
    mt = (config.get("model_signature") or {}).get("model_type") or a.get("model_type")
    arch = ARCHITECTURES.get(mt)
    reasons = []
    if a.get("gate", "head") != "layer":
        reasons.append(
            "its gates are per head (PEFT adaption prompt has one gate per layer; "
            "train with --aligner-gate layer)"
        )
    if arch is None or not arch.adaption_prompt:
        supported = " and ".join(k for k, v in ARCHITECTURES.items() if v.adaption_prompt)
        reasons.append(f"PEFT adaption prompt supports {supported}, not {mt}")
    n_layers, layers = int(a["num_hidden_layers"]), gated_layers(a)
    start = layers[0] if layers else n_layers
    if layers != list(range(start, n_layers)):
        reasons.append(f"its gated blocks {layers} are not the top ones (PEFT adapts the top adapter_layers)")
    if reasons:
        raise UserError("cannot export this Aligner as PEFT adaption prompt: " + "; ".join(reasons))
    prefix = tensors["aligner.prefix"]
    blocks = a.get("layers_prefix") or DEFAULT_PREFIX
    out_tensors = {}
    for i in layers:
        gate = tensors[GATE_NAME.format(prefix=blocks, i=i)].reshape(1)
        out_tensors[f"{PEFT_PREFIX}model.layers.{i}.self_attn.adaption_prompt"] = prefix[None]
        out_tensors[f"{PEFT_PREFIX}model.layers.{i}.self_attn.adaption_gate"] = gate
    peft_config = {
        "peft_type": "ADAPTION_PROMPT",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or config.get("base_model"),
        "target_modules": "self_attn",
        "adapter_len": int(prefix.shape[0]),
        "adapter_layers": n_layers - start,
        "inference_mode": True,
        "revision": None,
    }
    with staged_folder(out) as tmp:
        save_safetensors(tmp / PEFT_WEIGHTS, out_tensors, metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
    return out
