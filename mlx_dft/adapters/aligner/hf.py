"""Aligner on the Hugging Face side: our documented folder format, and the official checkpoints.

The Hugging Face Aligner format (version 2), a folder with:

``aligner_config.json``::

    {"format": "mlx_dft.aligner", "format_version": 2,
     "base_model_name_or_path": "Qwen/Qwen3-0.6B", "model_type": "qwen3",
     "num_tokens": N, "start_layer": S, "gate": "head" | "layer",
     "hidden_size": C, "num_attention_heads": H, "num_key_value_heads": K, "num_hidden_layers": L,
     "layers": [i, ...], "mlx_layers_prefix": "model.layers"}

``aligner_model.safetensors``: ``prefix`` [N, C] and, for every adapted block i of ``layers``,
``layers.{i}.gate`` [H] (head gates) or [1] (layer gates).

``model_type`` is the base model's (``config.json``'s, e.g. ``qwen3_5`` for a Qwen3.5 checkpoint);
``layers`` lists the blocks with a gate: from ``start_layer`` on, the softmax-attention blocks only
on hybrid models (qwen3_5's gated-delta blocks and lfm2's convolution blocks have none).
``mlx_layers_prefix`` is where mlx-lm keeps the blocks (``language_model.model.layers`` for
qwen3_5), so that an import gives back the very tensor names. Version 1 (still read) has neither
``layers`` nor ``mlx_layers_prefix``: its blocks are S..L-1 under ``model.layers``.

The maths (of :mod:`.layer`, and of the PyTorch runner :mod:`.torch_runner`): in an adapted block,
query head h adds ``gate * softmax(q_h k^T * scale) v`` to its attention output before the output
gate (if any) and ``o_proj``, where q_h are the queries the layer hands to its attention kernel and
``scale`` the scaling it passes; k, v are the prefix through the layer's own key/value maps (biases,
key norms, value norms, fused or shared projections as the layer has them), without RoPE and
without the block's input norm, read by each head from its KV group.

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

from mlx_dft.adapters.aligner.layer import parameter_count
from mlx_dft.architectures import check_sizes
from mlx_dft.errors import UserError
from mlx_dft.files import read_json, read_safetensors, save_safetensors, staged_folder
from mlx_dft.interop import torch_pickle
from mlx_dft.models import LLAMA2_BY_SHAPE, SHAPE_KEYS

HF_CONFIG = "aligner_config.json"
HF_WEIGHTS = "aligner_model.safetensors"
FORMAT = "mlx_dft.aligner"
FORMAT_VERSION = 2
DEFAULT_PREFIX = "model.layers"
GATE_NAME = "{prefix}.{i}.self_attn.aligner_gate"  # a gate in mlx_dft's aligner.safetensors


def is_hf_aligner(folder: Path) -> bool:
    return (folder / HF_CONFIG).is_file()


def gated_layers(a: dict) -> list[int]:
    """The blocks with a gate, of an mlx_dft ``aligner`` config section (configs older than
    ``layers``: every block from ``start_layer`` on)."""
    if a.get("layers") is not None:
        return sorted(int(i) for i in a["layers"])
    return list(range(int(a["start_layer"]), int(a["num_hidden_layers"])))


def export_hf(config: dict, tensors: dict[str, mx.array], out: Path, base_model: str | None = None) -> Path:
    a = config["aligner"]
    layers, prefix = gated_layers(a), a.get("layers_prefix") or DEFAULT_PREFIX
    hf = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model_name_or_path": base_model or config.get("base_model"),
        "model_type": (config.get("model_signature") or {}).get("model_type") or a.get("model_type"),
        "num_tokens": int(a["tokens"]),
        "start_layer": int(a["start_layer"]),
        "gate": a.get("gate", "head"),
        **{k: int(a[k]) for k in SHAPE_KEYS},
        "layers": layers,
        "mlx_layers_prefix": prefix,
    }
    names = {"prefix": "aligner.prefix"} | {
        f"layers.{i}.gate": GATE_NAME.format(prefix=prefix, i=i) for i in layers
    }
    want = set(names.values())
    if want != set(tensors):
        extra, missing = sorted(set(tensors) - want), sorted(want - set(tensors))
        raise UserError(
            f"the Aligner's tensors disagree with its config: extra {extra[:3]} / missing {missing[:3]}"
        )
    out_tensors = {hf_name: tensors[name] for hf_name, name in names.items()}
    with staged_folder(out) as tmp:
        save_safetensors(tmp / HF_WEIGHTS, out_tensors, metadata={"format": "pt"})
        (tmp / HF_CONFIG).write_text(json.dumps(hf, indent=2) + "\n")
    return out


def read_config(src: Path) -> dict:
    """Our HF Aligner config, checked: sizes in range, the gated blocks valid. Returns it with
    ``layers`` always present (version 1: S..L-1) and ``gate`` spelled out."""
    where = src / HF_CONFIG
    hf = read_json(where)
    if not isinstance(hf, dict) or hf.get("format") != FORMAT:
        found = hf.get("format") if isinstance(hf, dict) else type(hf).__name__
        raise UserError(f"{where}: not an mlx_dft Aligner folder (format {found!r})")
    version = hf.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise UserError(
            f"{src}: Aligner format version {version!r} is not one this mlx_dft reads (1 to {FORMAT_VERSION})"
        )
    check_sizes(hf, where)
    try:
        start, n_layers = int(hf["start_layer"]), int(hf["num_hidden_layers"])
        tokens = int(hf["num_tokens"])
        for k in SHAPE_KEYS:
            int(hf[k])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where}: missing or malformed size ({e!r})") from None
    if not (0 <= start < n_layers) or not 1 <= tokens <= 1 << 16:
        raise UserError(f"{where}: start_layer {start} or num_tokens {tokens} out of range")
    gate = hf.get("gate", "head")
    if gate not in ("head", "layer"):
        raise UserError(f"{where}: gate {gate!r} is neither head nor layer")
    layers = hf.get("layers") if version >= 2 else None
    if layers is None:
        layers = list(range(start, n_layers))
    if (
        not isinstance(layers, list)
        or not layers
        or any(isinstance(i, bool) or not isinstance(i, int) or not start <= i < n_layers for i in layers)
        or layers != sorted(set(layers))
    ):
        raise UserError(f"{where}: layers must be increasing block indices from {start} to {n_layers - 1}")
    mt = hf.get("model_type")
    if mt is not None and not isinstance(mt, str):
        raise UserError(f"{where}: model_type {mt!r} is not a string")
    prefix = hf.get("mlx_layers_prefix", DEFAULT_PREFIX)
    if not isinstance(prefix, str) or not all(part.isidentifier() for part in prefix.split(".")):
        raise UserError(f"{where}: mlx_layers_prefix {prefix!r} is not a module path")
    return {**hf, "gate": gate, "layers": layers, "mlx_layers_prefix": prefix}


def check_tensors(hf: dict, shapes: dict[str, tuple[int, ...]], where: Path) -> None:
    """The weight file holds exactly ``prefix`` [N, C] and one gate of H (or 1) values per
    gated block; ``shapes`` maps each tensor name to its shape."""
    per = int(hf["num_attention_heads"]) if hf["gate"] == "head" else 1
    expected = {"prefix"} | {f"layers.{i}.gate" for i in hf["layers"]}
    if set(shapes) != expected:
        extra, missing = sorted(set(shapes) - expected), sorted(expected - set(shapes))
        raise UserError(f"{where}: unexpected tensors {extra[:3]} / missing {missing[:3]}")
    if tuple(shapes["prefix"]) != (int(hf["num_tokens"]), int(hf["hidden_size"])):
        raise UserError(f"{where}: prefix shape {tuple(shapes['prefix'])} disagrees with the config")
    for i in hf["layers"]:
        size = int(np.prod(shapes[f"layers.{i}.gate"], dtype=np.int64))
        if size != per:
            raise UserError(f"{where}: layers.{i}.gate has {size} values, expected {per}")


def import_hf(src: Path) -> dict:
    """Our HF Aligner folder -> an mlx_dft adapter config with its tensors under ``weights``."""
    hf = read_config(src)
    tensors = read_safetensors(src / HF_WEIGHTS)
    check_tensors(hf, {k: tuple(v.shape) for k, v in tensors.items()}, src / HF_WEIGHTS)
    prefix = hf["mlx_layers_prefix"]
    per = int(hf["num_attention_heads"]) if hf["gate"] == "head" else 1
    weights = {"aligner.prefix": tensors["prefix"]}
    for i in hf["layers"]:
        weights[GATE_NAME.format(prefix=prefix, i=i)] = tensors[f"layers.{i}.gate"].reshape(per)
    return _mlx_config(hf, weights)


def _mlx_config(hf: dict, weights: dict) -> dict:
    aligner = {
        "tokens": int(hf["num_tokens"]),
        "start_layer": int(hf["start_layer"]),
        "gate": hf.get("gate", "head"),
        **{k: int(hf[k]) for k in SHAPE_KEYS},
        "layers": list(hf["layers"]),
        "layers_prefix": hf.get("mlx_layers_prefix", DEFAULT_PREFIX),
    }
    if hf.get("model_type"):
        aligner["model_type"] = hf["model_type"]
    aligner["parameters"] = parameter_count(
        aligner["tokens"], aligner["hidden_size"], len(aligner["layers"]), aligner["num_attention_heads"],
        aligner["gate"],
    )  # fmt: skip
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
        "layers": sorted(gates),
    }
    weights = {"aligner.prefix": mx.array(prefix)}
    for i, g in gates.items():
        weights[f"model.layers.{i}.self_attn.aligner_gate"] = mx.array(g)
    return _mlx_config(hf, weights)
