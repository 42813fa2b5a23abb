"""Run an Aligner trained with mlx_dft on a Hugging Face transformers model (PyTorch).

    from transformers import AutoModelForCausalLM
    from mlx_dft.torch_aligner import attach_aligner

    model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen3-0.6B")
    attach_aligner(model, "exported-aligner/")     # a folder from `mlx_dft export`, or a Hub repo id

Exactly the maths of mlx_dft's MLX implementation (the folder format is in :mod:`.hf`): in every
adapted layer, each query head adds ``gate * softmax(q k^T / sqrt(d)) v`` over the N prefix
tokens to its attention output before ``o_proj``; prefix keys/values go through the layer's
k/v projections (with biases, and Qwen3's ``k_norm`` on keys), without RoPE. Implemented as
forward hooks on the attention modules of the architectures in ``models.ARCHITECTURES``: the layer's
attention itself is untouched, and the hook adds ``o_proj``'s weight times the prefix term.

torch and transformers are needed here only; importing mlx_dft does not import them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mlx_dft.files import local_or_hub
from mlx_dft.models import ARCHITECTURES, SHAPE_KEYS


def attach_aligner(model, source: str | Path):
    """Attach the Aligner in ``source`` to ``model`` (in place); returns the model.

    The prefix and gates become ``model.aligner`` (an ``nn.Module``, trainable if you wish)."""
    import torch
    from safetensors.torch import load_file
    from torch import nn

    folder = local_or_hub(source, ["*.json", "*.safetensors"], "Aligner")
    cfg = json.loads((folder / "aligner_config.json").read_text())
    tensors = load_file(str(folder / "aligner_model.safetensors"))
    mc = model.config
    if mc.model_type not in ARCHITECTURES:
        raise ValueError(f"Aligner supports {', '.join(ARCHITECTURES)} models, not {mc.model_type}")
    for key in SHAPE_KEYS:
        if int(getattr(mc, key)) != int(cfg[key]):
            raise ValueError(f"this Aligner needs {key}={cfg[key]}, the model has {getattr(mc, key)}")
    start, n_layers = int(cfg["start_layer"]), int(cfg["num_hidden_layers"])
    dtype = next(model.parameters()).dtype

    holder = nn.Module()
    holder.prefix = nn.Parameter(tensors["prefix"].to(dtype), requires_grad=False)
    holder.gates = nn.ParameterDict(
        {
            str(i): nn.Parameter(tensors[f"layers.{i}.gate"].to(dtype), requires_grad=False)
            for i in range(start, n_layers)
        }
    )
    model.aligner = holder
    layers = model.model.layers
    for i in range(start, n_layers):
        attn = layers[i].self_attn
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb

        def hook(module, args, kwargs, output, i=i, rope=rope):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"]
            b, length, _ = hidden.shape
            d = module.head_dim
            q = module.q_proj(hidden).view(b, length, -1, d)
            if hasattr(module, "q_norm"):
                q = module.q_norm(q)
            q = q.transpose(1, 2)
            q, _ = rope(q, q, cos, sin)
            heads, n_kv = q.shape[1], mc.num_key_value_heads
            prefix = model.aligner.prefix
            k = module.k_proj(prefix).view(prefix.shape[0], n_kv, d)
            if hasattr(module, "k_norm"):
                k = module.k_norm(k)
            v = module.v_proj(prefix).view(prefix.shape[0], n_kv, d)
            k = k.transpose(0, 1).repeat_interleave(heads // n_kv, dim=0)  # [H, N, d]
            v = v.transpose(0, 1).repeat_interleave(heads // n_kv, dim=0)
            scores = torch.matmul(q, k.transpose(-1, -2)) * module.scaling  # [B, H, L, N]
            probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
            term = torch.matmul(probs, v) * model.aligner.gates[str(i)].view(1, -1, 1, 1)
            term = term.transpose(1, 2).reshape(b, length, heads * d)
            delta = torch.nn.functional.linear(term, module.o_proj.weight)
            return (output[0] + delta, *output[1:])

        attn.register_forward_hook(hook, with_kwargs=True)
    return model
