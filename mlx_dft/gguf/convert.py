"""GGUF -> a Hugging Face-layout model folder that mlx-lm (and, dequantized, transformers) loads.

:func:`convert_gguf` checks everything it can before writing: the file (:mod:`.reader`), the
architecture and its parameters, the tokenizer (:mod:`.tokenizer`), and every tensor's name and
shape against the mlx-lm model the config describes. Then it writes ``config.json``,
``model.safetensors`` and the tokenizer files into a staged folder renamed into place whole.

- The architecture's table entry (:mod:`.archs`) gives the model type, its own metadata and
  llama.cpp's departures from the model's layout: tensor names are those the mlx-lm model's
  parameters have in gguf-py's tables (:func:`names.gguf_names`); llama.cpp's rotary row order of
  q/k is undone with :func:`names.to_hf_rows` (packed weights, scales and biases alike); Gemma's
  norms, stored as 1 + w, lose their 1 (in float32: a weight w comes back within 2^-24 of itself).
- Q4_0/Q4_1/Q8_0 tensors stay MLX-quantized (affine, groups of 32): ``quantization`` in
  config.json gives the most common bit width, and every module whose width differs its own
  entry, which mlx-lm's loader takes as a per-module override.
- ``dequantize=True`` writes float32 weights, dequantized with scales and biases cast to float32
  first (the file's float16 ones cost ~1e-1 in the logits; float32 ones ~1e-4).
- Types MLX has no layout for (K-quants, IQ, MXFP4, Q5_x) are dequantized by gguf-py to float16
  (float32 with ``dequantize``), or with ``requantize=True`` re-quantized to MLX's affine layout
  (:mod:`.requant`: Q4_K and Q5_K keep their codes, a Q4_K_M file stays 4-bit), the error that
  adds measured per type against the file's own values and said in one line. ``--model
  FILE.gguf`` requantizes on a GPU, where MLX's quantized products are fast.

:func:`cached_conversion` is what ``--model FILE.gguf`` uses: one converted folder per file
version under ``$MLX_DFT_CACHE/gguf`` (default ``~/.cache/mlx_dft/gguf``), reused when present.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_dft.architectures import check_sizes
from mlx_dft.errors import UserError
from mlx_dft.files import TMP_PREFIX, atomic_write_json, check_apart, save_safetensors, staged_folder
from mlx_dft.gguf import names, requant
from mlx_dft.gguf.archs import ARCHS, LOG_MULTIPLIER_ARCHS, model_type_of
from mlx_dft.gguf.reader import GROUP_SIZE, GGUFHeader, load_tensors, read_header
from mlx_dft.gguf.tokenizer import build_tokenizer, token_id_list, write_tokenizer


def _number(meta: dict, key: str, kind: type, default=None):
    value = meta.get(key, default)
    if value is None:
        raise UserError(f"the GGUF file has no {key}, which a model needs")
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and not isinstance(value, int))
    ):
        raise UserError(f"GGUF metadata {key} = {str(value)[:60]} is not a single {kind.__name__}")
    if value <= 0 and kind is int:
        raise UserError(f"GGUF metadata {key} = {value} must be positive")
    return kind(value)


def draft_blocks(header: GGUFHeader) -> int:
    """How many of the file's last blocks are multi-token-prediction (draft) blocks, which
    llama.cpp runs only to draft tokens ahead and mlx-lm's models do not have."""
    arch = header.metadata.get("general.architecture")
    key = f"{arch}.nextn_predict_layers"
    return _number(header.metadata, key, int) if header.metadata.get(key) else 0


def _block(name: str) -> int | None:
    head, _, rest = name.partition(".")
    number = rest.partition(".")[0]
    return int(number) if head == "blk" and number.isdigit() else None


def model_config(header: GGUFHeader) -> dict:
    """config.json (without tokenizer ids and quantization) from a GGUF's metadata and tensors."""
    meta, tensors = header.metadata, header.tensors
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise UserError(f"{header.path} has no general.architecture")
    model_type = model_type_of(arch)
    prefix = f"{arch}."
    keys = names.CONFIG_KEYS
    cfg: dict = {"model_type": model_type, "architectures": [ARCHS[model_type].hf_class]}
    for hf_key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        value = meta.get(prefix + keys[hf_key])
        if hf_key == "intermediate_size" and isinstance(value, list) and value:  # per layer (gemma4's)
            cfg[hf_key] = _number({"ff": min(value)}, "ff", int)  # (the architecture reads the rest)
            continue
        cfg[hf_key] = _number(meta, prefix + keys[hf_key], int)
    # llama.cpp counts multi-token-prediction blocks (Qwen3.5's draft head) among the blocks, last
    drafts = draft_blocks(header)
    if drafts >= cfg["num_hidden_layers"]:
        raise UserError(f"the GGUF file's {drafts} multi-token-prediction blocks leave no model blocks")
    cfg["num_hidden_layers"] -= drafts
    heads = cfg["num_attention_heads"]
    kv = meta.get(prefix + keys["num_key_value_heads"], heads)
    if isinstance(kv, list):  # per layer (lfm2: 0 for its convolution layers; gemma4: two counts)
        counts = [v for v in kv if v]
        # (several counts: the architecture's read says which layers have which, as gemma4's does;
        # elsewhere the tensors' shapes refuse them)
        if len(kv) != cfg["num_hidden_layers"] or not counts:
            raise UserError(f"GGUF per-layer key/value head counts {str(kv)[:60]} are not one per layer")
        cfg["num_key_value_heads"] = _number({"kv": counts[0]}, "kv", int)
    else:
        cfg["num_key_value_heads"] = _number(meta, prefix + keys["num_key_value_heads"], int, heads)
    cfg["rms_norm_eps"] = _number(meta, prefix + keys["rms_norm_eps"], float)
    cfg["rope_theta"] = _number(meta, prefix + keys["rope_theta"], float, 10000.0)
    check_sizes(cfg, header.path)  # before any size is divided by or allocated from
    cfg["max_position_embeddings"] = _number(meta, prefix + keys["max_position_embeddings"], int, 4096)
    head_dim = _number(meta, prefix + keys["head_dim"], int, cfg["hidden_size"] // heads)
    if _number(meta, f"{prefix}attention.value_length", int, head_dim) != head_dim:
        raise UserError("GGUF keys and values of different head sizes are not supported")
    if heads % cfg["num_key_value_heads"] or head_dim % 2:
        raise UserError(
            f"GGUF head counts {heads}/{cfg['num_key_value_heads']} and head size {head_dim} do not fit"
        )
    cfg["head_dim"] = head_dim
    rotary = _number(meta, f"{prefix}rope.dimension_count", int, head_dim)
    if rotary != head_dim:
        if rotary > head_dim or rotary % 2:
            raise UserError(f"GGUF rope.dimension_count {rotary} does not fit the head size {head_dim}")
        cfg["partial_rotary_factor"] = rotary / head_dim
    scaling = meta.get(f"{prefix}rope.scaling.type", "none")
    if scaling == "linear":
        factor = _number(meta, f"{prefix}rope.scaling.factor", float)
        cfg["rope_scaling"] = {"type": "linear", "rope_type": "linear", "factor": factor}
    elif scaling == "yarn":  # (llama.cpp's fixed correction range and magnitude: export._yarn)
        for key, fixed in (("yarn_beta_fast", 32.0), ("yarn_beta_slow", 1.0)):
            value = meta.get(f"{prefix}rope.scaling.{key}", fixed)
            if value != fixed:
                raise UserError(f"GGUF YaRN with rope.scaling.{key} = {str(value)[:20]} is not supported")
        factor = _number(meta, f"{prefix}rope.scaling.factor", float)
        original = _number(meta, f"{prefix}rope.scaling.original_context_length", int)
        cfg["rope_scaling"] = {"type": "yarn", "rope_type": "yarn", "factor": factor, "beta_fast": 32.0,
                               "beta_slow": 1.0, "original_max_position_embeddings": original}  # fmt: skip
        # llama.cpp's magnitude m(1) / m(log multiplier): mlx-lm's with mscale 1, mscale_all_dim
        all_dims = _number(meta, f"{prefix}rope.scaling.yarn_log_multiplier", float, 0.0)
        if all_dims < 0 or (all_dims and prefix.rstrip(".") not in LOG_MULTIPLIER_ARCHS):
            raise UserError(f"GGUF YaRN with rope.scaling.yarn_log_multiplier = {all_dims} is not supported"
                            f" for {prefix.rstrip('.')}")  # fmt: skip
        if all_dims:
            cfg["rope_scaling"].update(mscale=1.0, mscale_all_dim=all_dims)
    elif scaling != "none":
        raise UserError(f"GGUF RoPE scaling {scaling!r} is not supported (supported: none, linear, yarn)")
    if "token_embd.weight" not in tensors:
        raise UserError(f"{header.path} has no token_embd.weight tensor")
    cfg["vocab_size"] = tensors["token_embd.weight"].shape[0]
    cfg["tie_word_embeddings"] = "output.weight" not in tensors
    def get(key: str, kind: type, default=None):  # (an absent key's default is taken as it is)
        if kind is np.ndarray:  # a small float tensor's values (gemma4's rope_freqs)
            return _small_tensor(header, key)
        key = key.format(arch=arch)
        if key not in meta and default is not None:
            return default
        if kind is object:  # as stored: a number or a list (the architecture checks it)
            return meta.get(key)
        if kind is list:  # (of counts, or of flags: bools are ints here)
            value = meta.get(key)
            if not isinstance(value, list) or not all(type(v) in (int, bool) and v >= 0 for v in value):
                raise UserError(f"GGUF metadata {key} = {str(value)[:60]} is not a list of counts")
            return [int(v) for v in value]
        return _number(meta, key, kind)

    cfg.update(ARCHS[model_type].read(get, cfg, tensors))
    derived = ARCHS[model_type].derived(cfg)
    if "rope_freqs.weight" in tensors and "rope_freqs.weight" not in derived:
        raise UserError(
            "the GGUF file has rope_freqs.weight (per-frequency RoPE factors, as in Llama 3.1), "
            "which mlx_dft does not convert"
        )
    for name, values in derived.items():  # (what the config read back implies: the file's own)
        if name not in tensors or not np.array_equal(_small_tensor(header, name), values):
            raise UserError(f"the GGUF file's {name} is not what its metadata implies for mlx-lm's model")
    check_sizes(cfg, header.path)
    return cfg


SMALL_TENSOR_TYPES = {"F32": "<f4", "F16": "<f2"}


def _small_tensor(header: GGUFHeader, name: str) -> np.ndarray:
    """The float32 values of a 1-D F32/F16 tensor (the header checked its place in the file)."""
    info = header.tensors.get(name)
    if info is None or info.type not in SMALL_TENSOR_TYPES or len(info.shape) != 1 or info.shape[0] > 1 << 16:
        raise UserError(f"the GGUF file has no {name} of F32 or F16 values (a vector), which the model needs")
    raw = np.fromfile(header.path, SMALL_TENSOR_TYPES[info.type], count=info.shape[0], offset=info.offset)
    return raw.astype(np.float32)


def _build(cfg: dict) -> nn.Module:
    """The mlx-lm model ``cfg`` describes, its weights lazy (never computed)."""
    from mlx_dft import compat

    compat.require()
    from mlx_lm.utils import _get_classes

    try:
        model_cls, args_cls = _get_classes(cfg)
        return model_cls(args_cls.from_dict(copy.deepcopy(cfg)))  # (qwen3_5's edits its rope_parameters)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot build a {cfg['model_type']} model from the GGUF metadata: {e}") from None


def _hf_rows(a: mx.array, heads: int | None) -> mx.array:
    """Undo llama.cpp's q/k row order (``heads`` from :func:`names.reordered_heads`; None: as is)."""
    return names.to_hf_rows(a, heads) if heads else a


FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


def _convert_tensors(
    header: GGUFHeader, cfg: dict, dequantize: bool, requantize: bool = False
) -> tuple[dict[str, mx.array], dict, requant.RequantizeError]:
    """(weights under Hugging Face names, per-module bits of the quantized ones, the error
    re-quantizing added), checked against the parameters of the model ``cfg`` describes."""
    model = _build(cfg)
    expected = dict(tree_flatten(model.parameters()))
    modules = dict(model.named_modules())
    known = names.gguf_names(expected, cfg["model_type"], cfg["num_hidden_layers"])
    missing = sorted(set(expected) - set(known.values()))
    if missing:
        raise UserError(f"a {cfg['model_type']} model's {missing[0]} has no GGUF name in gguf-py's tables")
    # tensors llama.cpp holds fused that the model has apart (gemma4's experts' gate and up):
    # read as the tensors they hold, split along their rows
    pieces = {name: parts for name in header.tensors if (parts := ARCHS[cfg["model_type"]].unfused(name))}
    tensors = {}
    for name, info in header.tensors.items():
        parts = pieces.get(name, ())
        if parts and (len(info.shape) < 2 or info.shape[-2] % len(parts)):
            raise UserError(f"GGUF tensor {name} of shape {info.shape} does not hold {len(parts)} tensors")
        rows = (*info.shape[:-2], info.shape[-2] // len(parts), info.shape[-1]) if parts else info.shape
        tensors.update({part: dataclasses.replace(info, name=part, shape=rows) for part in parts or (name,)})
    missing = sorted(hf for name, hf in known.items() if name not in tensors)
    if missing:
        raise UserError(f"the GGUF file lacks {len(missing)} tensors of the model, e.g. {missing[0]}")
    hf_names = {}
    drafts = set()
    if draft_blocks(header):  # (llama.cpp's draft blocks, numbered after the model's)
        drafts = {n for n in {*header.tensors, *tensors} if (_block(n) or 0) >= cfg["num_hidden_layers"]}
    derived = ARCHS[cfg["model_type"]].derived(cfg)  # (checked against the file by model_config)
    for name in tensors:
        if name in drafts or name in derived:
            continue
        if name not in known:
            raise UserError(f"GGUF tensor {name} has no counterpart in a {cfg['model_type']} model")
        hf_names[name] = known[name]
    for name, hf in hf_names.items():
        # (as llama.cpp holds it: lfm2's convolution without its 1-sized axis, reshaped below)
        shape = names.stored_shape(hf, tuple(expected[hf].shape), cfg["model_type"])
        if shape != tensors[name].shape:
            raise UserError(
                f"GGUF tensor {name} has shape {tensors[name].shape}, "
                f"the model expects {shape}"
            )
    errors = requant.RequantizeError()

    def quantizable(hf: str) -> bool:
        """Whether the model holds this tensor as an MLX quantized layer: a layer's weight, in
        whole groups of 32 wherever llama.cpp orders its columns otherwise (qwen3_5's out_proj)."""
        _, cols = names.model_order(hf, cfg)
        whole = cols is None or _group_order(cols) is not None
        layer = modules.get(hf[: -len(".weight")])
        return hf.endswith(".weight") and whole and hasattr(layer, "to_quantized")

    requantized = {
        name for name, hf in hf_names.items()
        if requantize and not header.native and tensors[name].type not in FLOAT_TYPES
        and quantizable(hf)
    }  # fmt: skip

    def each(info, arr: mx.array, raw):
        """A re-quantized tensor's MLX (weight, scales, biases, bits), made as it is read (a fused
        one: split below); the file's other block-type tensors as float16; a draft block's tensors
        not kept."""
        if info.name in drafts:
            return mx.zeros((0,))
        if (pieces.get(info.name) or (info.name,))[0] in requantized:
            return requant.requantize(info, arr, raw, errors)
        return arr.astype(mx.float16) if requantize and info.type not in FLOAT_TYPES else arr

    dtype = mx.float32 if dequantize or requantize else mx.float16
    arrays = load_tensors(header, dtype, each if requantize or drafts else None)
    for fused, parts in pieces.items():  # (its weight, or packed weight, scales and biases: rows)
        base = fused[: -len(".weight")]
        for key in [k for k in arrays if k == fused or k.startswith(base + ".")]:
            for part, piece in zip(parts, _split_rows(arrays.pop(key), len(parts))):
                arrays[part[: -len(".weight")] + key[len(base) :]] = piece
    weights, bits = {}, {}
    for name, hf in hf_names.items():
        info = tensors[name]
        if name in requantized:
            hf_base = hf[: -len(".weight")]
            *quantized, bits[hf_base] = arrays[name]
            packed, scales, biases = _quantized_order(*quantized, hf, cfg, bits[hf_base])
            weights[hf], weights[f"{hf_base}.scales"], weights[f"{hf_base}.biases"] = packed, scales, biases
            continue
        shape = tuple(expected[hf].shape)
        if not info.quantized or not header.native:  # (a file read through gguf-py is all floats)
            w = arrays[name]
            weights[hf] = names.from_gguf_array(hf, w.astype(mx.float32) if dequantize else w, cfg, shape)
            continue
        base, hf_base = name[: -len(".weight")], hf[: -len(".weight")]
        w, scales, biases = (arrays[f"{base}.{leaf}"] for leaf in ("weight", "scales", "biases"))
        b = w.shape[-1] * 32 // info.shape[-1]
        if dequantize or not quantizable(hf):
            # float32 scales and biases before the products: the float16 ones round each group's
            # values to float16 precision (gguf.md: 0.08 vs 8.8e-5 in the logits).
            full = mx.dequantize(w, scales.astype(mx.float32), biases.astype(mx.float32), GROUP_SIZE, b)
            full = full if dequantize else full.astype(scales.dtype)
            weights[hf] = names.from_gguf_array(hf, full, cfg, shape)
        else:
            w, scales, biases = _quantized_order(w, scales, biases, hf, cfg, b)
            weights[hf], weights[f"{hf_base}.scales"], weights[f"{hf_base}.biases"] = w, scales, biases
            bits[hf_base] = b
    return weights, bits, errors


def _group_order(cols: np.ndarray) -> np.ndarray | None:
    """A column order as an order of whole groups of 32 (None where it splits a group)."""
    if cols.size % GROUP_SIZE:
        return None
    runs = cols.reshape(-1, GROUP_SIZE)
    starts = runs[:, :1]
    if (starts % GROUP_SIZE).any() or (runs != starts + np.arange(GROUP_SIZE)).any():
        return None
    return starts[:, 0] // GROUP_SIZE


def _quantized_order(w: mx.array, scales: mx.array, biases: mx.array, hf: str, cfg: dict, bits: int):
    """An MLX-quantized tensor read from a file (packed weight, scales, biases) in the model's
    order: llama.cpp's q/k rows undone, its row and column orders (whole groups) undone."""
    heads = names.reordered_heads(hf, cfg)
    rows, cols = names.model_order(hf, cfg)
    out = []
    for a in (w, scales, biases):
        a = _hf_rows(a, heads)
        out.append(a if rows is None else mx.take(a, mx.array(rows), axis=0))
    if cols is not None:  # (whole groups: ``quantizable`` checked)
        groups = mx.array(_group_order(cols))
        packed = out[0].reshape(out[0].shape[0], -1, bits)  # a group of 32 values is ``bits`` words
        out[0] = mx.take(packed, groups, axis=1).reshape(out[0].shape)
        out[1], out[2] = (mx.take(a, groups, axis=1) for a in out[1:])
    return tuple(out)


def _split_rows(value, k: int) -> list:
    """An array split into ``k`` along its rows; a re-quantized (weight, scales, biases, bits)
    into ``k`` such tuples."""
    if isinstance(value, tuple):
        *arrays, b = value
        return [(*split, b) for split in zip(*(mx.split(a, k, axis=-2) for a in arrays))]
    return mx.split(value, k, axis=-2)


def _quantization(bits: dict[str, int]) -> dict | None:
    if not bits:
        return None
    default = Counter(bits.values()).most_common(1)[0][0]
    q = {"group_size": GROUP_SIZE, "bits": default}
    q.update({m: {"group_size": GROUP_SIZE, "bits": b} for m, b in sorted(bits.items()) if b != default})
    return q


def convert_gguf(
    path: str | Path, out: str | Path, dequantize: bool = False, overwrite: bool = False,
    requantize: bool = False,
) -> Path:
    """Convert the GGUF file ``path`` into the model folder ``out``; returns ``out``."""
    if dequantize and requantize:
        raise UserError("--dequantize and --requantize ask for opposite things: choose one")
    check_apart(Path(out).expanduser(), {"GGUF file": path}, what="--out")
    header = read_header(path)
    cfg = model_config(header)
    meta = header.metadata
    _, special = build_tokenizer(meta)  # fail on the tokenizer before any tensor is read
    if len(meta["tokenizer.ggml.tokens"]) > cfg["vocab_size"]:
        raise UserError(
            f"the GGUF tokenizer has {len(meta['tokenizer.ggml.tokens'])} tokens, "
            f"the embedding only {cfg['vocab_size']} rows"
        )
    for key, names_ in (("bos_token_id", ("bos_token",)), ("eos_token_id", ("eos_token", "eot_token"))):
        ids = token_id_list(special, *names_)
        if ids:
            cfg[key] = ids[0] if len(ids) == 1 else ids
    if not header.native and not requantize:
        print(
            f"note: {Path(path).name}: {', '.join(header.dequantized_types())} tensors are dequantized "
            f"with gguf-py to {'float32' if dequantize else 'float16'} (MLX has no layout for their blocks)",
            file=sys.stderr,
        )
    if drafts := draft_blocks(header):
        print(
            f"note: {Path(path).name}: its {drafts} multi-token-prediction block(s) (llama.cpp's draft "
            f"head) are left out: mlx-lm's {cfg['model_type']} has none",
            file=sys.stderr,
        )
    weights, bits, errors = _convert_tensors(header, cfg, dequantize, requantize)
    if errors.sums:
        print(errors.line(Path(path).name), file=sys.stderr)
    elif requantize:  # asked for, with nothing to do: say so rather than pass over it
        print(
            f"note: {Path(path).name}: no tensor of a type MLX has no layout for, nothing to re-quantize "
            "(float tensors stay float; Q4_0/Q4_1/Q8_0 are MLX-quantized as they are)",
            file=sys.stderr,
        )
    if (q := _quantization(bits)) is not None:
        cfg["quantization"] = q
    else:
        # the dtype of most of the weights (a float16 file keeps its norms in float32)
        sizes = Counter()
        for v in weights.values():
            sizes[v.dtype] += v.size
        cfg["torch_dtype"] = str(sizes.most_common(1)[0][0]).rpartition(".")[2]
    out = Path(out)
    with staged_folder(out, overwrite=overwrite) as tmp:
        save_safetensors(tmp / "model.safetensors", weights, metadata={"format": "pt"})
        write_tokenizer(meta, tmp, cfg["max_position_embeddings"])
        atomic_write_json(tmp / "config.json", _nested(cfg))
    return out


def _nested(cfg: dict) -> dict:
    """config.json as the Hub lays it out for the architecture: a multimodal checkpoint's text
    settings under ``text_config`` (qwen3_5; ids, quantization and dtype stay outside)."""
    if not ARCHS[cfg["model_type"]].nested:
        return cfg
    outer = ("model_type", "architectures", "bos_token_id", "eos_token_id", "quantization", "torch_dtype",
             "tie_word_embeddings")  # fmt: skip
    inner = {k: v for k, v in cfg.items() if k not in outer or k == "tie_word_embeddings"}
    return {k: cfg[k] for k in outer if k in cfg} | {
        "text_config": {"model_type": f"{cfg['model_type']}_text", **inner}
    }


def cache_root() -> Path:
    """Where converted GGUF files are kept: ``$MLX_DFT_CACHE/gguf``, else ``~/.cache/mlx_dft/gguf``."""
    return Path(os.environ.get("MLX_DFT_CACHE") or Path.home() / ".cache" / "mlx_dft") / "gguf"


def cached_conversion(
    path: str | Path, dequantize: bool, root: Path | None = None, requantize: bool = False
) -> Path:
    """The converted folder of the GGUF file ``path`` under ``root`` (default :func:`cache_root`),
    converting it on first use.

    Keyed by the file's name, size and modification time (a new download converts again), and
    by the variant. Concurrent processes (data-parallel ranks) may both convert: the first
    rename wins, the other discards its copy; a folder under the final name is always whole."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    variant = "float32" if dequantize else "requantized" if requantize else "quantized"
    root = Path(root) if root is not None else cache_root()
    out = root / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}-{variant}"
    if (out / "config.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=root, prefix=f"{TMP_PREFIX}{out.name}."))
    try:
        convert_gguf(path, work / "model", dequantize, requantize=requantize)
        try:
            os.rename(work / "model", out)
        except OSError:
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
