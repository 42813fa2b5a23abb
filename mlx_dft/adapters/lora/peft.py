"""LoRA and DoRA in Hugging Face PEFT's format: export from, and import into, mlx_dft/mlx-lm folders.

    mlx (y = x W^T + scale * (x A) B)          PEFT (y = x W^T + s * x A_p^T B_p^T)
    model.layers.3.self_attn.q_proj.lora_a     base_model.model.<same>.lora_A.weight = lora_a^T
    ...lora_b                                  ...lora_B.weight = lora_b^T
    ...m (DoRA)                                ...lora_magnitude_vector
    scale                                      lora_alpha / r  (lora_alpha / sqrt(r) with use_rslora)
    num_layers (last N) / layers               layers_to_transform
    per-module ranks/scales                    rank_pattern / alpha_pattern

PEFT variants with no mlx counterpart are refused by name, never converted into something
else. Every writer assembles its folder under a temporary name and renames it whole.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import mlx.core as mx

from mlx_dft.errors import UserError
from mlx_dft.files import (
    read_json,
    read_safetensors,
    safetensors_metadata,
    save_safetensors,
    staged_folder,
    time_limit,
)
from mlx_dft.models import (
    block_linear_paths,
    build_model,
    last_layers,
    model_config,
    model_signature,
    resolve_model_path,
    text_config,
)

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# PEFT LoRA options that change the maths or the files in ways mlx cannot represent.
REFUSED = {
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "trainable_token_indices": "trainable_token_indices",
    "target_parameters": "target_parameters (LoRA on raw parameters, e.g. MoE experts)",
    "alora_invocation_tokens": "aLoRA (activated LoRA)",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "BD-LoRA",
    "runtime_config": None,
}


# ------------------------------------------------------------------ export


def export_lora(adapter_dir: Path, config: dict, out: Path, base_model: str | None = None) -> Path:
    """Write a PEFT LoRA/DoRA folder from an mlx_dft (or mlx-lm) LoRA/DoRA folder."""
    kind = config.get("fine_tune_type", "lora")
    p = config["lora_parameters"]
    n_layers = (config.get("model_signature") or {}).get("num_hidden_layers")
    if p.get("layers") is not None:
        layers = sorted(int(i) for i in p["layers"])
    elif n_layers is not None:
        layers = last_layers(n_layers, config["num_layers"])
    else:
        raise UserError(f"{adapter_dir}: cannot tell which layers are adapted (no model_signature)")
    arch = (config.get("model_signature") or {}).get("model_type")
    if arch is not None:
        from mlx_dft.support import PEFT_PROVEN

        why = PEFT_PROVEN.get(arch, "not yet proven against transformers + PEFT")
        if why:
            raise UserError(f"mlx_dft export (PEFT) does not support model type {arch!r}: {why}")
    weights = read_safetensors(adapter_dir / "adapters.safetensors")
    experts = sorted({k.rsplit(".", 1)[0] for k, w in weights.items() if w.ndim == 3})
    if experts:
        raise UserError(
            f"{adapter_dir}: LoRA on mixture-of-experts layers ({experts[0]}, ...) has no PEFT form "
            "transformers loads (it stores experts fused); train with --lora-keys that leave the "
            "experts out, or merge the adapter: `mlx_dft fuse`"
        )
    keys = p.get("keys")
    if not keys:
        keys = sorted(
            {k.split(".", 3)[3].rsplit(".", 1)[0] for k in weights if k.startswith("model.layers.")}
        )
    # Block-relative paths (``self_attn.out_proj``), not last names: PEFT matches a target by the
    # end of a module's name, and a last name can be shared by a layer that was not trained
    # (lfm2's ``self_attn.out_proj`` and ``conv.out_proj``).
    targets = sorted(set(keys))
    rank, scale = int(p["rank"]), float(p["scale"])
    out_tensors: dict[str, mx.array] = {}
    for name, w in weights.items():
        if not name.startswith("model.layers."):
            raise UserError(
                f"{adapter_dir}: tensor {name} is outside the transformer blocks; PEFT export "
                "covers LoRA/DoRA on block linear layers only"
            )
        module, leaf = name.rsplit(".", 1)
        base = PEFT_PREFIX + module
        if leaf == "lora_a":
            out_tensors[base + ".lora_A.weight"] = w.T
        elif leaf == "lora_b":
            out_tensors[base + ".lora_B.weight"] = w.T
        elif leaf == "m":
            out_tensors[base + ".lora_magnitude_vector"] = w
        else:
            raise UserError(f"{adapter_dir}: unexpected tensor {name}")
    rank_pattern, alpha_pattern = {}, {}
    for full, r in (p.get("module_ranks") or {}).items():
        if int(r) != rank:
            rank_pattern[re.escape(full)] = int(r)
    module_scales = p.get("module_scales") or {}
    for name in {k.rsplit(".", 1)[0] for k in weights}:
        r = int((p.get("module_ranks") or {}).get(name, rank))
        s = float(module_scales.get(name, scale))
        if r != rank or s != scale:
            alpha_pattern[re.escape(name)] = s * r
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or config.get("base_model"),
        "r": rank,
        "lora_alpha": scale * rank,
        "lora_dropout": float(p.get("dropout", 0.0)),
        "target_modules": targets,
        "layers_to_transform": None if n_layers is not None and len(layers) == n_layers else layers,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_dora": kind == "dora",
        "use_rslora": False,
        "bias": "none",
        "modules_to_save": None,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "revision": None,
    }
    # The exact mlx values travel in the safetensors metadata, so mlx -> PEFT -> mlx is bitwise.
    meta = {
        "format": "pt",
        "mlx_dft": json.dumps(
            {
                "scale": scale,
                "keys": keys,
                "layers": layers,
                "module_scales": module_scales,
                "module_ranks": p.get("module_ranks") or {},
            }
        ),
    }
    with staged_folder(out) as tmp:
        save_safetensors(tmp / PEFT_WEIGHTS, out_tensors, metadata=meta)
        (tmp / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
    return out


# ------------------------------------------------------------------ import


def is_peft_folder(path: Path) -> bool:
    """A folder whose ``adapter_config.json`` is PEFT's (any PEFT type: unsupported ones are
    refused by name on import)."""
    if not (path.is_dir() and (path / PEFT_CONFIG).is_file()):
        return False
    return "peft_type" in read_json(path / PEFT_CONFIG)


def lora_config(folder: Path) -> dict | None:
    """The PEFT config of a LoRA/DoRA folder, or None for anything else."""
    if not is_peft_folder(folder):
        return None
    cfg = read_json(folder / PEFT_CONFIG)
    return cfg if cfg.get("peft_type") == "LORA" else None


def usage(base: str | None, repo_id: str) -> list[str]:
    """The model card's "Use" snippet for a PEFT folder."""
    return [
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{base}")',
        f'model = PeftModel.from_pretrained(model, "{repo_id}")',
        "```",
    ]


def _refuse(config: dict, src: Path) -> None:
    ptype = str(config.get("peft_type", "?")).upper()
    if ptype != "LORA":
        raise UserError(f"{src}: PEFT type {ptype} is not supported (LORA with or without DoRA is)")
    for key, label in REFUSED.items():
        value = config.get(key)
        if label and value not in (None, False, [], {}, ""):
            raise UserError(f"{src}: unsupported PEFT variant: {label}")
    if str(config.get("bias", "none")) != "none":
        raise UserError(f"{src}: unsupported PEFT variant: bias training (bias={config['bias']})")
    if config.get("fan_in_fan_out"):
        raise UserError(f"{src}: unsupported PEFT variant: fan_in_fan_out (Conv1D layers)")
    for name in ("lora_bias", "use_alora"):
        if config.get(name):
            raise UserError(f"{src}: unsupported PEFT variant: {name}")


# A PEFT config's rank_pattern / alpha_pattern keys are regular expressions from a stranger: at most
# this many, this long, and all the matching of one import within this many seconds (a pattern
# like (a+)+$ backtracks for hours).
PATTERN_LIMITS = (1000, 1000, 5.0)


def _pattern_value(patterns: dict, full: str, default, where: object = "adapter_config.json"):
    count, length, seconds = PATTERN_LIMITS
    if not isinstance(patterns, dict) or len(patterns) > count:
        raise UserError(f"{where}: rank_pattern/alpha_pattern must map at most {count} patterns to values")
    for key, value in patterns.items():
        if not isinstance(key, str) or len(key) > length:
            raise UserError(f"{where}: pattern {str(key)[:40]!r}... is longer than {length} characters")
        try:
            regex = re.compile(rf"(.*\.)?({key})$")
        except re.error as e:
            raise UserError(f"{where}: pattern {key!r} is not a regular expression ({e})") from None
        slow = f"{where}: pattern {key[:40]!r} ran past {seconds:g} s (catastrophic backtracking)"
        with time_limit(seconds, slow):
            if regex.match(full):
                return value
    return default


def import_lora(src: Path, model_cfg: dict, base_model: str, block_paths: list[str]) -> dict:
    """Convert a PEFT LoRA/DoRA folder into an mlx_dft folder; returns the mlx adapter config.

    ``block_paths``: block-relative paths of the base model's linear layers (e.g.
    ``self_attn.q_proj``); ``model_cfg``: its config.json (for the layer count)."""
    config = read_json(src / PEFT_CONFIG)
    _refuse(config, src)
    tensors = read_safetensors(src / PEFT_WEIGHTS)
    n_layers = int(text_config(model_cfg)["num_hidden_layers"])
    # Which modules carry LoRA, from the tensors themselves (what PEFT actually saved).
    modules: dict[str, dict[str, mx.array]] = {}
    for name, w in tensors.items():
        if not name.startswith(PEFT_PREFIX):
            raise UserError(f"{src}: unexpected tensor {name}")
        rest = name[len(PEFT_PREFIX) :]
        for suffix, leaf in (
            (".lora_A.weight", "lora_a"),
            (".lora_B.weight", "lora_b"),
            (".lora_magnitude_vector", "m"),
            (".lora_magnitude_vector.weight", "m"),
        ):
            if rest.endswith(suffix):
                modules.setdefault(rest[: -len(suffix)], {})[leaf] = w
                break
        else:
            what = "embedding LoRA" if "lora_embedding" in name else f"tensor {name}"
            raise UserError(f"{src}: unsupported PEFT variant: {what}")
    if not modules:
        raise UserError(f"{src}: no LoRA tensors found")
    layer_re = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
    layers, keys = set(), set()
    for module in modules:
        m = layer_re.match(module)
        if not m:
            raise UserError(f"{src}: LoRA on {module} (outside the transformer blocks) is not supported")
        i, path = int(m.group(1)), m.group(2)
        if "experts" in path:
            raise UserError(f"{src}: unsupported PEFT variant: LoRA on MoE experts ({module})")
        if path not in block_paths:
            raise UserError(
                f"{src}: {module} is not a linear layer of this base model (another architecture?)"
            )
        if i >= n_layers:
            raise UserError(f"{src}: layer {i} does not exist in the {n_layers}-layer base model")
        layers.add(i)
        keys.add(path)
    r = int(config.get("r", 8))
    alpha = float(config.get("lora_alpha", r))
    rs = bool(config.get("use_rslora"))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}

    def scale_of(rank: int, a: float) -> float:
        return a / math.sqrt(rank) if rs else a / rank

    meta = _metadata(src / PEFT_WEIGHTS)
    default_scale = float(meta["scale"]) if meta else scale_of(r, alpha)
    module_ranks, module_scales = {}, {}
    weights = {}
    dora = bool(config.get("use_dora"))
    for module, parts in sorted(modules.items()):
        if "lora_a" not in parts or "lora_b" not in parts:
            raise UserError(f"{src}: {module} lacks lora_A or lora_B")
        if dora and "m" not in parts:
            raise UserError(f"{src}: {module} lacks the DoRA magnitude vector")
        rank = int(_pattern_value(rank_pattern, module, r, src / "adapter_config.json"))
        if parts["lora_a"].shape[0] != rank or parts["lora_b"].shape[1] != rank:
            raise UserError(f"{src}: {module} has rank {parts['lora_a'].shape[0]}, the config says {rank}")
        a = float(_pattern_value(alpha_pattern, module, alpha, src / "adapter_config.json"))
        scale = float(meta.get("module_scales", {}).get(module, default_scale)) if meta else scale_of(rank, a)
        if rank != r:
            module_ranks[module] = rank
        if scale != default_scale:
            module_scales[module] = scale
        weights[f"{module}.lora_a"] = parts["lora_a"].T
        weights[f"{module}.lora_b"] = parts["lora_b"].T
        if dora:
            weights[f"{module}.m"] = parts["m"].reshape(-1)
    layers = sorted(layers)
    ordered_keys = [k for k in block_paths if k in keys]
    if meta and set(meta.get("keys") or []) == keys:
        ordered_keys = list(meta["keys"])
    contiguous_top = layers == list(range(n_layers - len(layers), n_layers))
    lora_parameters = {
        "rank": r,
        "scale": default_scale,
        "dropout": float(config.get("lora_dropout", 0.0)),
        "keys": ordered_keys,
    }
    if not contiguous_top:
        lora_parameters["layers"] = layers
    if module_ranks:
        lora_parameters["module_ranks"] = module_ranks
    if module_scales:
        lora_parameters["module_scales"] = module_scales
    return {
        "fine_tune_type": "dora" if dora else "lora",
        "adapter": "dora" if dora else "lora",
        "num_layers": len(layers),
        "lora_parameters": lora_parameters,
        "base_model": base_model,
        "weights": {"adapters.safetensors": weights},
    }


def _metadata(path: Path) -> dict:
    """mlx_dft's own exact values, when the PEFT file was written by mlx_dft."""
    try:
        return json.loads(safetensors_metadata(path).get("mlx_dft", "{}"))
    except ValueError:
        return {}


def import_folder(src: Path, model: str | None = None) -> dict:
    """A PEFT LoRA/DoRA folder -> an mlx_dft adapter config with its tensors under ``weights``;
    the base model (``model``, else the one the PEFT config names) is read for its layout only."""
    base = model or read_json(src / PEFT_CONFIG).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{src}: the PEFT config names no base model; pass --model")
    model_cfg = model_config(resolve_model_path(base))
    block_paths = block_linear_paths(build_model(model_cfg, base), with_routers=True)
    out = import_lora(src, model_cfg, base, block_paths)
    out["model_signature"] = model_signature(model_cfg)
    return out
