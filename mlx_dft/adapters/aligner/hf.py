"""Aligner on the Hugging Face side: our documented folder format, and the official checkpoints.

The Hugging Face Aligner format (version 1), a folder with:

``aligner_config.json``::

    {"format": "mlx_dft.aligner", "format_version": 1,
     "base_model_name_or_path": "Qwen/Qwen3-0.6B", "model_type": "qwen3",
     "num_tokens": N, "start_layer": S, "gate": "head" | "layer",
     "hidden_size": C, "num_attention_heads": H, "num_key_value_heads": K, "num_hidden_layers": L}

``aligner_model.safetensors``: ``prefix`` [N, C] and, for every layer i in S..L-1,
``layers.{i}.gate`` [H] (head gates) or [1] (layer gates).

The maths (of :mod:`.layer`, and of the PyTorch runner :mod:`.torch_runner`): in layer
i >= S, query head h adds ``gate * softmax(q_h k^T / sqrt(d)) v`` to its attention output before
``o_proj``, where k, v are the prefix through the layer's k/v projections (biases included,
Qwen3's ``k_norm`` on k, no RoPE), read by each head from its KV group.

The official checkpoints (lit-llama layout, LLaMA-2 7B/13B): ``global_value_embedding.weight``
[N, C] is the prefix, ``transformer.h.{i}.attn.gating_factor`` [1, H, 1, 1] the head gates of
layer i, and ``transformer.h.{i}.attn.adapter_wte.weight`` a per-layer copy of the prefix.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_dft.architectures import check_sizes
from mlx_dft.errors import UserError
from mlx_dft.files import read_json, read_safetensors, save_safetensors, staged_folder
from mlx_dft.interop import torch_pickle
from mlx_dft.models import LLAMA2_BY_SHAPE, SHAPE_KEYS

HF_CONFIG = "aligner_config.json"
HF_WEIGHTS = "aligner_model.safetensors"
FORMAT = "mlx_dft.aligner"


def is_hf_aligner(folder: Path) -> bool:
    return (folder / HF_CONFIG).is_file()


def export_hf(config: dict, tensors: dict[str, mx.array], out: Path, base_model: str | None = None) -> Path:
    a = config["aligner"]
    start, n_layers = int(a["start_layer"]), int(a["num_hidden_layers"])
    hf = {
        "format": FORMAT,
        "format_version": 1,
        "base_model_name_or_path": base_model or config.get("base_model"),
        "model_type": (config.get("model_signature") or {}).get("model_type") or a.get("model_type"),
        "num_tokens": int(a["tokens"]),
        "start_layer": start,
        "gate": a.get("gate", "head"),
        **{k: int(a[k]) for k in SHAPE_KEYS},
    }
    out_tensors = {"prefix": tensors["aligner.prefix"]}
    for i in range(start, n_layers):
        out_tensors[f"layers.{i}.gate"] = tensors[f"model.layers.{i}.self_attn.aligner_gate"]
    with staged_folder(out) as tmp:
        save_safetensors(tmp / HF_WEIGHTS, out_tensors, metadata={"format": "pt"})
        (tmp / HF_CONFIG).write_text(json.dumps(hf, indent=2) + "\n")
    return out


def import_hf(src: Path) -> dict:
    """Our HF Aligner folder -> an mlx_dft adapter config with its tensors under ``weights``."""
    hf = read_json(src / HF_CONFIG)
    if hf.get("format") != FORMAT:
        raise UserError(f"{src / HF_CONFIG}: not an mlx_dft Aligner folder (format {hf.get('format')!r})")
    if int(hf.get("format_version", 0)) > 1:
        raise UserError(
            f"{src}: Aligner format version {hf['format_version']} is newer than this mlx_dft reads"
        )
    check_sizes(hf, src / HF_CONFIG)
    try:
        start, n_layers = int(hf["start_layer"]), int(hf["num_hidden_layers"])
        heads, tokens = int(hf["num_attention_heads"]), int(hf["num_tokens"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{src / HF_CONFIG}: missing or malformed size ({e!r})") from None
    if not (0 <= start < n_layers) or not 1 <= tokens <= 1 << 16:
        raise UserError(f"{src / HF_CONFIG}: start_layer {start} or num_tokens {tokens} out of range")
    tensors = read_safetensors(src / HF_WEIGHTS)
    per = heads if hf.get("gate", "head") == "head" else 1
    expected = {"prefix"} | {f"layers.{i}.gate" for i in range(start, n_layers)}
    if set(tensors) != expected:
        extra, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
        raise UserError(f"{src / HF_WEIGHTS}: unexpected tensors {extra[:3]} / missing {missing[:3]}")
    if tuple(tensors["prefix"].shape) != (int(hf["num_tokens"]), int(hf["hidden_size"])):
        raise UserError(f"{src}: prefix shape {tuple(tensors['prefix'].shape)} disagrees with the config")
    weights = {"aligner.prefix": tensors["prefix"]}
    for i in range(start, n_layers):
        g = tensors[f"layers.{i}.gate"]
        if g.size != per:
            raise UserError(f"{src}: layers.{i}.gate has {g.size} values, expected {per}")
        weights[f"model.layers.{i}.self_attn.aligner_gate"] = g.reshape(per)
    return _mlx_config(hf, weights)


def _mlx_config(hf: dict, weights: dict) -> dict:
    aligner = {
        "tokens": int(hf["num_tokens"]),
        "start_layer": int(hf["start_layer"]),
        "gate": hf.get("gate", "head"),
        **{k: int(hf[k]) for k in SHAPE_KEYS},
    }
    return {
        "fine_tune_type": "aligner",
        "adapter": "aligner",
        "aligner": aligner,
        "base_model": hf.get("base_model_name_or_path"),
        "model_signature": {"model_type": hf.get("model_type"), **{k: int(hf[k]) for k in SHAPE_KEYS}},
        "weights": {"aligner.safetensors": weights},
    }


_OFFICIAL = re.compile(r"^transformer\.h\.(\d+)\.attn\.(gating_factor|adapter_wte\.weight)$")


def import_official(path: Path, base_model: str | None = None) -> dict:
    """An official Aligner ``.pth`` (read with a restricted unpickler) -> mlx_dft adapter config."""
    sd = torch_pickle.load(path)
    if "global_value_embedding.weight" not in sd:
        raise UserError(f"{path}: not an Aligner checkpoint (no global_value_embedding.weight)")
    prefix = sd["global_value_embedding.weight"].astype(np.float32)
    if prefix.ndim != 2:
        raise UserError(f"{path}: global_value_embedding.weight has shape {prefix.shape}, expected [N, C]")
    gates: dict[int, np.ndarray] = {}
    for key, value in sd.items():
        if key == "global_value_embedding.weight":
            continue
        m = _OFFICIAL.match(key)
        if not m:
            raise UserError(f"{path}: unexpected key {key}")
        i = int(m.group(1))
        if m.group(2) == "gating_factor":
            if value.ndim != 4 or value.shape[0] != 1 or value.shape[2:] != (1, 1):
                raise UserError(f"{path}: {key} has shape {value.shape}, expected [1, H, 1, 1]")
            gates[i] = value.reshape(-1).astype(np.float32)
        elif not np.array_equal(value, sd["global_value_embedding.weight"]):
            raise UserError(f"{path}: {key} differs from the global prefix (not a global-token Aligner)")
    if not gates:
        raise UserError(f"{path}: no gating factors found")
    start, last = min(gates), max(gates)
    if sorted(gates) != list(range(start, last + 1)):
        raise UserError(f"{path}: gated layers are not contiguous: {sorted(gates)}")
    heads = {g.size for g in gates.values()}
    if len(heads) != 1:
        raise UserError(f"{path}: layers have different head counts {sorted(heads)}")
    n_tokens, hidden = prefix.shape
    n_heads = heads.pop()
    n_layers = last + 1
    base = base_model or LLAMA2_BY_SHAPE.get((hidden, n_layers))
    if base is None:
        raise UserError(
            f"{path}: hidden size {hidden} and {n_layers} layers match no LLaMA-2 model; pass --model"
        )
    hf = {
        "base_model_name_or_path": base,
        "model_type": "llama",
        "num_tokens": n_tokens,
        "start_layer": start,
        "gate": "head",
        "hidden_size": hidden,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_heads,
        "num_hidden_layers": n_layers,
    }
    weights = {"aligner.prefix": mx.array(prefix)}
    for i, g in gates.items():
        weights[f"model.layers.{i}.self_attn.aligner_gate"] = mx.array(g)
    return _mlx_config(hf, weights)
