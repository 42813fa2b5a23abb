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
    layers_prefix,
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


# A block's tensors in mlx-lm's adapter files (``language_model.`` before it for the multimodal
# layouts, qwen3_5) and in PEFT's, which names the modules of transformers' ``*ForCausalLM``.
MLX_BLOCK = re.compile(r"^(?:language_model\.)?model\.layers\.(\d+)\.(.+)$")
# How transformers (the pinned version) and PEFT hold the experts of a mixture-of-experts model:
#   "per_expert": a Linear per expert (``mlp.experts.<e>.gate_proj``), the layout of the model's Hub
#       checkpoints and of PEFT's LoRA for them (PEFT fuses it on loading into transformers 5);
#   "fused": ``mlp.experts.gate_up_proj`` [E, hidden, 2 x inter] with gate and up interleaved and
#       ``down_proj`` [E, inter, hidden], adapted through PEFT's ``target_parameters``.
EXPERT_LAYOUT = {"qwen3_moe": "per_expert", "gpt_oss": "fused"}
GATE_UP = ("gate_proj", "up_proj")


def _modules(weights: dict[str, mx.array], where: Path) -> dict[str, dict[str, mx.array]]:
    """{module name: {lora_a, lora_b[, m]}} of an mlx adapter file."""
    modules: dict[str, dict[str, mx.array]] = {}
    for name, w in weights.items():
        module, leaf = name.rsplit(".", 1)
        if not MLX_BLOCK.match(module):
            raise UserError(
                f"{where}: tensor {name} is outside the transformer blocks; PEFT export "
                "covers LoRA/DoRA on block linear layers only"
            )
        if leaf not in ("lora_a", "lora_b", "m"):
            raise UserError(f"{where}: unexpected tensor {name}")
        modules.setdefault(module, {})[leaf] = w
    for module, parts in modules.items():
        if "lora_a" not in parts or "lora_b" not in parts:
            raise UserError(f"{where}: {module} lacks lora_a or lora_b")
    return modules


def _fused_gate_up(gate, up, scales: tuple[float, float]) -> tuple[mx.array, mx.array, int]:
    """PEFT's LoRA factors of gpt_oss's ``gate_up_proj`` [E, hidden, 2 x inter] (gate in the even
    columns, up in the odd ones) from the gate and up LoRAs (either may be None: zeros), each
    (a [E, r, in], b [E, out, r]); each part's scale folded into its b relative to the first's.

    Per expert the fused delta is [A_gate; A_up] (rank r_g + r_u) times a block matrix whose even
    rows are [B_gate, 0] and odd rows [0, B_up]. PEFT stores lora_A [E * R, in] (expert-major) and
    lora_B [out, R * E] (rank-major)."""
    ref = gate if gate is not None else up
    n_e, inter, hidden = ref[0].shape[0], ref[1].shape[1], ref[0].shape[2]
    parts = []
    for lora, s in ((gate, scales[0]), (up, scales[1])):
        if lora is None:
            parts.append((mx.zeros((n_e, 1, hidden), ref[0].dtype), mx.zeros((n_e, inter, 1), ref[1].dtype)))
        else:
            parts.append((lora[0], lora[1] * (s / scales[0]) if s != scales[0] else lora[1]))
    (ag, bg), (au, bu) = parts
    rg, ru = ag.shape[1], au.shape[1]
    a = mx.concatenate([ag, au], axis=1)  # [E, R, hidden]
    b = mx.zeros((n_e, 2 * inter, rg + ru), ref[1].dtype)
    b[:, 0::2, :rg] = bg
    b[:, 1::2, rg:] = bu
    rank = rg + ru
    return a.reshape(n_e * rank, hidden), b.transpose(1, 2, 0).reshape(2 * inter, rank * n_e), rank


def _stacked(a: mx.array, b: mx.array) -> tuple[mx.array, mx.array]:
    """PEFT's ``target_parameters`` factors of an expert stack adapted as one: lora_A [E * r, in]
    (expert-major), lora_B [out, r * E] (rank-major)."""
    n_e, r, n_in = a.shape
    return a.reshape(n_e * r, n_in), b.transpose(1, 2, 0).reshape(b.shape[1], r * n_e)


def export_lora(adapter_dir: Path, config: dict, out: Path, base_model: str | None = None) -> Path:
    """Write a PEFT LoRA/DoRA folder from an mlx_dft (or mlx-lm) LoRA/DoRA folder, named as
    transformers' ``AutoModelForCausalLM`` names the model's modules; expert layers as
    :data:`EXPERT_LAYOUT` says for the model type."""
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
    modules = _modules(weights, adapter_dir)
    experts = sorted(m for m, parts in modules.items() if parts["lora_a"].ndim == 3)
    layout = EXPERT_LAYOUT.get(arch or "")
    if experts and layout is None:
        raise UserError(
            f"{adapter_dir}: LoRA on the mixture-of-experts layers of model type {arch!r} "
            f"({experts[0]}, ...) has no PEFT form proven yet; train with --lora-keys that leave the "
            "experts out, or merge the adapter: `mlx_dft fuse`"
        )
    keys = p.get("keys")
    if not keys:
        keys = sorted({MLX_BLOCK.match(m).group(2) for m in modules})
    rank, scale = int(p["rank"]), float(p["scale"])
    module_ranks = {k: int(v) for k, v in (p.get("module_ranks") or {}).items()}
    module_scales = {k: float(v) for k, v in (p.get("module_scales") or {}).items()}

    out_tensors: dict[str, mx.array] = {}
    targets: set[str] = set()
    target_parameters: list[str] = []
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}

    def add(name: str, a: mx.array, b: mx.array, r: int, s: float, pattern: str | None = None) -> None:
        """The LoRA factors (PEFT-shaped: a [r, in], b [out, r]) stored under ``name`` (a
        module; PEFT's nested wrapper of a second parameter of the module adds ``.base_layer``);
        a rank or scale other than the config's goes into rank_pattern / alpha_pattern under
        ``pattern`` (the module or parameter PEFT matches, default ``name``)."""
        out_tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a
        out_tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b
        key = re.escape(pattern or name)
        if r != rank:
            rank_pattern[key] = r
        if r != rank or s != scale:
            alpha_pattern[key] = s * r

    stacks: dict[tuple[str, str], dict] = {}  # (block, experts path) -> {leaf: (a, b, r, s)}
    for module, parts in sorted(modules.items()):
        i, path = MLX_BLOCK.match(module).groups()
        block = f"model.layers.{i}"
        r, s = module_ranks.get(module, rank), module_scales.get(module, scale)
        if parts["lora_a"].ndim == 2:
            add(f"{block}.{path}", parts["lora_a"].T, parts["lora_b"].T, r, s)
            targets.add(path)
            if "m" in parts:
                out_tensors[f"{PEFT_PREFIX}{block}.{path}.lora_magnitude_vector"] = parts["m"]
        else:
            parent, leaf = path.rsplit(".", 1)
            if leaf not in (*GATE_UP, "down_proj"):
                raise UserError(f"{adapter_dir}: expert layer {module} has no PEFT form (not gate/up/down)")
            stacks.setdefault((block, parent), {})[leaf] = (parts["lora_a"], parts["lora_b"], r, s)
    for (block, parent), found in sorted(stacks.items()):
        gate_up = [found.get(k) for k in GATE_UP]
        if layout == "per_expert":
            # PEFT (0.21) fuses gate and up for transformers 5 only when both are adapted, and
            # loads the fused pair only beside down_proj: the missing ones get LoRAs of zeros (no
            # change to the model).
            if any(gate_up):
                a, b, r, s = next(x for x in gate_up if x)
                for leaf in GATE_UP:
                    found.setdefault(leaf, (mx.zeros_like(a), mx.zeros_like(b), r, s))
                n_e, _, hidden = a.shape
                zeros = (mx.zeros((n_e, r, b.shape[1]), a.dtype), mx.zeros((n_e, hidden, r), b.dtype), r, s)
                found.setdefault("down_proj", zeros)
            container = (parent.rsplit(".", 1)[0] + "." if "." in parent else "") + "experts"
            for leaf, (a, b, r, s) in sorted(found.items()):
                for e in range(a.shape[0]):
                    add(f"{block}.{container}.{e}.{leaf}", a[e], b[e], r, s)
                    targets.add(f"{container}.{e}.{leaf}")
            continue
        adapted = []
        if any(gate_up):
            first = next(x for x in gate_up if x)
            scales = tuple(x[3] if x else first[3] for x in gate_up)
            a, b, r = _fused_gate_up(*(x[:2] if x else None for x in gate_up), scales)
            adapted.append(("gate_up_proj", a, b, r, first[3]))
        if "down_proj" in found:
            a, b, r, s = found["down_proj"]
            adapted.append(("down_proj", *_stacked(a, b), r, s))
        for param, a, b, r, s in adapted:
            # PEFT wraps a module once for each of its adapted parameters, the first one (in the
            # module's order: gate_up_proj) innermost, under ``base_layer``.
            nested = ".base_layer" if param == "gate_up_proj" and len(adapted) == 2 else ""
            add(f"{block}.{parent}{nested}", a, b, r, s, pattern=f"{block}.{parent}.{param}")
            # the parameter's path with its layer: PEFT applies layers_to_transform to modules only
            target_parameters.append(f"{block}.{parent}.{param}".removeprefix("model."))
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or config.get("base_model"),
        "r": rank,
        "lora_alpha": scale * rank,
        # (PEFT refuses dropout on target_parameters; it does nothing at inference)
        "lora_dropout": 0.0 if target_parameters else float(p.get("dropout", 0.0)),
        # block-relative paths (``self_attn.out_proj``), never last names: PEFT matches a target by
        # the end of a module's name, and a last name can be shared by a layer that was not trained
        # (lfm2's ``self_attn.out_proj`` and ``conv.out_proj``)
        "target_modules": sorted(targets),
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
    if target_parameters:  # (PEFT applies layers_to_transform to modules only: these name their layer)
        peft_config["target_parameters"] = target_parameters
    # The exact mlx values travel in the safetensors metadata, so mlx -> PEFT -> mlx is bitwise.
    meta = {
        "format": "pt",
        "mlx_dft": json.dumps(
            {
                "scale": scale,
                "keys": keys,
                "layers": layers,
                "module_scales": p.get("module_scales") or {},
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


def import_lora(
    src: Path, model_cfg: dict, base_model: str, block_paths: list[str], prefix: str = "model.layers"
) -> dict:
    """Convert a PEFT LoRA/DoRA folder into an mlx_dft folder; returns the mlx adapter config.

    ``block_paths``: block-relative paths of the base model's linear layers (e.g.
    ``self_attn.q_proj``); ``model_cfg``: its config.json (for the layer count); ``prefix``: where
    the mlx-lm model keeps its blocks (``language_model.model.layers`` for qwen3_5), while PEFT
    names them as transformers' ``*ForCausalLM`` does (``model.layers``)."""
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
    mlx_name = {}
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
        mlx_name[module] = f"{prefix}.{i}.{path}"
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
        name = mlx_name[module]
        scale = float(meta.get("module_scales", {}).get(name, default_scale)) if meta else scale_of(rank, a)
        if rank != r:
            module_ranks[name] = rank
        if scale != default_scale:
            module_scales[name] = scale
        weights[f"{name}.lora_a"] = parts["lora_a"].T
        weights[f"{name}.lora_b"] = parts["lora_b"].T
        if dora:
            weights[f"{name}.m"] = parts["m"].reshape(-1)
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
    net = build_model(model_cfg, base)
    out = import_lora(src, model_cfg, base, block_linear_paths(net, with_routers=True), layers_prefix(net))
    out["model_signature"] = model_signature(model_cfg)
    return out
