"""Run an Aligner trained with mlx_dft on a Hugging Face transformers model (PyTorch).

    from transformers import AutoModelForCausalLM
    from mlx_dft.torch_aligner import attach_aligner

    model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen3-0.6B")
    attach_aligner(model, "exported-aligner/")     # a folder from `mlx_dft export`, or a Hub repo id

The maths of mlx_dft's MLX implementation (the folder format and the maths are in :mod:`.hf`), on
any architecture whose attention goes through transformers' attention interface (every decoder
of transformers 5): transformers' attention modules compute their queries, keys and values (and
RoPE, q/k norms, shared KV, ...) themselves and then call
``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)``
with them. :func:`attach_aligner` registers an attention function (``mlx_dft_aligner``) and
points each gated layer at it (through its own copy of the config, so that the model's masks and
every check of its implementation's name stay the base model's); it calls the function the layer
called before (eager, sdpa, flash, ...) unchanged and adds the prefix term::

    out_h += g_h * softmax(q_h k^T * scaling [soft-capped if the layer soft-caps]) v

with q the queries exactly as handed to the kernel, ``scaling`` the layer's own, and k, v the
prefix through the layer's key/value maps, found on the module by name and checked by shape
(:func:`prefix_maps`): ``k_proj``/``v_proj`` or phi3's fused ``qkv_proj``, biases, the key norm
per head (``k_norm``, lfm2's ``k_layernorm``) or over the whole key width (olmo2), gemma4's
scale-less ``v_norm``, its ``k_proj``-as-values layers (no ``v_proj``) and its KV-shared layers
(the maps of the layer they share with). The term enters before anything the layer does after
the kernel (qwen3_5's output gate, ``o_proj``). Sinks, sliding windows and the causal mask belong
to the layer's own attention only. Layers without a gate pass through.

torch and transformers are needed here only; importing mlx_dft does not import them.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

from mlx_dft.adapters.aligner import hf
from mlx_dft.errors import UserError
from mlx_dft.files import local_or_hub
from mlx_dft.models import SHAPE_KEYS

NAME = "mlx_dft_aligner"  # the attention function gated layers call
STATE = "_mlx_dft_aligner"  # on each gated attention module: (holder, gate key, prefix maps, own function)


class AlignerError(UserError, ValueError):
    """An Aligner that cannot run on this model (one line: what and why)."""


# ------------------------------------------------------------------ the maths


def prefix_maps(attn, layer: int, d: int, heads: int):
    """A function P [N, C] -> (keys, values) [n_kv, N, d] applying ``attn``'s own key/value maps
    (no RoPE); ``d``/``heads``: the head size and count of the layer's queries. Refuses, naming the
    layer and the module class, an attention whose maps it cannot recognise."""
    import torch
    from torch import nn

    what = f"layer {layer}'s attention ({type(attn).__name__})"

    def linear_out(name: str) -> int | None:
        """Output width of a linear layer (``out_features``: quantized layers pack their weight)."""
        m = getattr(attn, name, None)
        if not isinstance(m, nn.Module):
            return None
        if isinstance(getattr(m, "out_features", None), int):
            return m.out_features
        w = getattr(m, "weight", None)
        return int(w.shape[0]) if w is not None and w.ndim == 2 else None

    if linear_out("qkv_proj") is not None:  # phi3: [q | k | v] rows, split as the layer splits them
        width = (linear_out("qkv_proj") - heads * d) // 2
        if width <= 0 or heads * d + 2 * width != linear_out("qkv_proj"):
            raise AlignerError(f"{what}: qkv_proj has {linear_out('qkv_proj')} outputs, not q + 2 kv widths")

        def project(p):
            kv = attn.qkv_proj(p)[..., heads * d :]
            return kv[..., :width], kv[..., width:]

    elif linear_out("k_proj") is not None:
        width = linear_out("k_proj")
        v_width = linear_out("v_proj")
        if getattr(attn, "v_proj", None) is not None and v_width != width:
            raise AlignerError(f"{what}: v_proj has {v_width} outputs, k_proj {width}")

        def project(p):
            k = attn.k_proj(p)
            return k, (attn.v_proj(p) if getattr(attn, "v_proj", None) is not None else k)

    else:
        raise AlignerError(
            f"{what} has no k_proj/v_proj or qkv_proj that the Aligner knows; its prefix keys and "
            "values cannot be computed"
        )
    n_kv = width // d
    if n_kv < 1 or n_kv * d != width or heads % n_kv:
        raise AlignerError(
            f"{what}: key width {width} is not a whole number of KV groups of {d} for {heads} heads"
        )
    k_norm = next(
        (getattr(attn, n) for n in ("k_norm", "k_layernorm") if getattr(attn, n, None) is not None), None
    )
    v_norm = getattr(attn, "v_norm", None)
    whole_width = False
    if k_norm is not None:
        w = getattr(k_norm, "weight", None)
        size = None if w is None else int(w.numel())
        if size == width and width != d:
            whole_width = True  # olmo2: one RMSNorm over all KV heads, before the split
        elif size not in (None, d):
            raise AlignerError(
                f"{what}: key norm of {size} values fits neither the head ({d}) nor the keys ({width})"
            )

    def maps(prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = prefix.shape[0]
        k, v = project(prefix)
        if k_norm is not None and whole_width:
            k = k_norm(k)
        k, v = k.reshape(n, n_kv, d), v.reshape(n, n_kv, d)
        if k_norm is not None and not whole_width:
            k = k_norm(k)
        if v_norm is not None:
            v = v_norm(v)
        return k.transpose(0, 1), v.transpose(0, 1)

    maps.n_kv = n_kv
    return maps


def prefix_term(query, keys, values, gate, scaling: float, softcap: float | None = None):
    """``gate_h * softmax(q_h k^T * scaling) v`` for queries [B, H, L, d] and prefix keys/values
    [n_kv, N, d] (head h reads group h // (H / n_kv)); returns [B, L, H, d], the layout of the
    attention functions' outputs."""
    import torch

    heads, n_kv = query.shape[1], keys.shape[0]
    keys = keys.repeat_interleave(heads // n_kv, dim=0).to(query.dtype)
    values = values.repeat_interleave(heads // n_kv, dim=0).to(query.dtype)
    scores = torch.matmul(query, keys.transpose(-1, -2)) * scaling  # [B, H, L, N]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    # the softmax in float32 at least (half-precision models), float64 for float64 ones
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(query.dtype)
    term = torch.matmul(probs, values) * gate.to(query.dtype).view(1, -1, 1, 1)
    return term.transpose(1, 2)


# ------------------------------------------------------------------ the attention function


def _attention_function(module, query, key, value, attention_mask, **kwargs):
    """What a gated layer calls instead of its own attention function: that function, unchanged,
    plus the prefix term."""
    holder, gate_key, maps, own = module.__dict__[STATE]
    out, weights = own(module, query, key, value, attention_mask, **kwargs)
    if not holder.enabled:
        return out, weights
    # to the query's device and dtype: layers may sit on several devices (device_map)
    keys, values = maps(holder.prefix.to(device=query.device, dtype=query.dtype))
    scaling = kwargs.get("scaling")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    gate = holder.gates[gate_key].to(query.device)
    term = prefix_term(query, keys, values, gate, scaling, kwargs.get("softcap"))
    return out + term.to(out.dtype), weights


def _calls_the_interface(attn) -> bool:
    """Whether ``attn``'s forward (its own or an inherited one) looks up transformers' attention
    interface: an attention that computes its scores itself would never call ours. True when the
    source cannot be read."""
    import inspect

    for cls in type(attn).__mro__:
        if "forward" in vars(cls):
            try:
                src = inspect.getsource(vars(cls)["forward"])
            except (OSError, TypeError):
                return True
            if "ALL_ATTENTION_FUNCTIONS" in src or "get_interface" in src:
                return True
            if "super()" not in src:
                return False
    return False


def _own_function(attn):
    """The attention function ``attn`` calls now, looked up as transformers' modules look it up
    (``eager``: its modeling file's ``eager_attention_forward``, which knows the layer's sinks and
    soft-capping)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    inner = attn.config._attn_implementation
    eager = getattr(sys.modules[type(attn).__module__], "eager_attention_forward", None)
    if inner == NAME:
        raise AlignerError(f"{type(attn).__name__} already runs an Aligner")
    if inner in (None, "eager") and eager is None:
        raise AlignerError(f"{type(attn).__name__}'s modeling file has no eager_attention_forward")
    return ALL_ATTENTION_FUNCTIONS.get_interface(inner or "eager", eager)


# ------------------------------------------------------------------ attaching


def _config_value(config, key: str):
    """``config.key`` of the text config, or None (also where transformers refuses a global read
    of a per-layer value, as gemma4's ``num_key_value_heads``)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        return getattr(text, key, None)
    except Exception:  # noqa: BLE001  (AmbiguousGlobalPerLayerAttributeError)
        return None


def _blocks(model):
    """The model's decoder blocks: the ``layers`` ModuleList (the language model's, in a
    multimodal model)."""
    from torch import nn

    n = _config_value(model.config, "num_hidden_layers")
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and name.split(".")[-1] == "layers" and (n is None or len(m) == n)
    ]
    if not found:
        raise AlignerError(f"{type(model).__name__} has no list of decoder layers that the Aligner knows")
    found.sort(key=lambda nm: ("language_model" not in nm[0], len(nm[0])))
    return found[0][1]


def _attention(block):
    """A block's softmax attention module, or None (qwen3_5's gated-delta, lfm2's conv blocks)."""
    for name in ("self_attn", "attention", "attn"):
        if getattr(block, name, None) is not None:
            return getattr(block, name)
    return None


def _kv_source(blocks, layer: int, attn):
    """The module whose key/value maps ``attn`` uses: itself, or for a layer that reuses another
    layer's keys and values (gemma4's KV-shared layers, no ``k_proj`` of their own) the last
    earlier layer of its type that stores them, as transformers picks it."""
    if not getattr(attn, "is_kv_shared_layer", False):
        return attn
    kind = getattr(attn, "layer_type", None)
    for j in range(layer - 1, -1, -1):
        other = _attention(blocks[j])
        if getattr(other, "store_full_length_kv", False) and getattr(other, "layer_type", None) == kind:
            return other
    raise AlignerError(f"layer {layer} shares keys and values, but no earlier layer of its type stores them")


def _layer_maps(blocks, i: int, heads: int):
    """(attention module, module of its key/value maps, the maps) of block ``i``."""
    attn = _attention(blocks[i])
    if attn is None:
        raise AlignerError(
            f"layer {i} ({type(blocks[i]).__name__}) has no attention module, yet the Aligner gates it"
        )
    d = getattr(attn, "head_dim", None)
    if not isinstance(d, int):
        q = getattr(getattr(attn, "q_proj", None), "weight", None)
        if q is None:
            raise AlignerError(f"layer {i}'s attention ({type(attn).__name__}) has no head_dim")
        d = int(q.shape[0]) // heads
    if not _calls_the_interface(attn):
        raise AlignerError(
            f"layer {i}'s attention ({type(attn).__name__}) computes its scores without transformers' "
            "attention interface: the Aligner cannot enter it"
        )
    source = _kv_source(blocks, i, attn)
    return attn, source, prefix_maps(source, i, d, heads)


def _model_types(model) -> set[str]:
    config = model.config
    return {t for t in (getattr(config, "model_type", None), _config_value(config, "model_type")) if t}


def _shapes(model, blocks) -> dict[str, int | None]:
    """The model's sizes as mlx_dft records them: the key/value heads of its first attention layer."""
    heads = _config_value(model.config, "num_attention_heads")
    first = next((i for i, b in enumerate(blocks) if _attention(b) is not None), None)
    n_kv = None
    if first is not None and isinstance(heads, int):
        try:
            n_kv = _layer_maps(blocks, first, heads)[2].n_kv
        except AlignerError:
            n_kv = _config_value(model.config, "num_key_value_heads")
    return {
        "hidden_size": _config_value(model.config, "hidden_size"),
        "num_attention_heads": heads,
        "num_key_value_heads": n_kv,
        "num_hidden_layers": len(blocks),
    }


def _check_base(model, blocks, spec: dict, folder: Path) -> None:
    """One line naming both models when this Aligner was made for another one."""
    mt = spec.get("model_type")
    have_types, have = _model_types(model), _shapes(model, blocks)
    want = {k: int(spec[k]) for k in SHAPE_KEYS}
    # transformers names a text-only model ``<type>_text`` (qwen3_5 -> qwen3_5_text)
    type_ok = mt is None or bool({mt, f"{mt}_text", mt.removesuffix("_text")} & have_types)
    if type_ok and want == have:
        return
    ours = ", ".join(f"{k}={v}" for k, v in want.items())
    theirs = ", ".join(f"{k}={v}" for k, v in have.items())
    raise AlignerError(
        f"{folder}: this Aligner is for a {mt or 'model'} with {ours}; this model is a "
        f"{model.config.model_type} with {theirs}"
    )


def attach_aligner(model, source: str | Path):
    """Attach the Aligner in ``source`` to ``model`` (in place); returns the model.

    The prefix and gates become ``model.aligner`` (an ``nn.Module``; trainable if you wish;
    ``model.aligner.enabled = False`` gives the base model). Each gated layer calls the attention
    function ``mlx_dft_aligner``, which calls the function the layer called until then (choose
    the model's ``attn_implementation`` before attaching)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from torch import nn

    if hasattr(model, "aligner"):
        raise AlignerError(f"{type(model).__name__} already has an Aligner attached")
    folder = local_or_hub(source, ["*.json", "*.safetensors"], "Aligner")
    spec = hf.read_config(folder)
    weights = folder / hf.HF_WEIGHTS
    if not weights.is_file():
        raise AlignerError(f"{folder}: no {hf.HF_WEIGHTS}")
    with safe_open(str(weights), framework="pt") as f:
        hf.check_tensors(spec, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, weights)
    blocks = _blocks(model)
    _check_base(model, blocks, spec, folder)
    tensors = load_file(str(weights))
    first = next(model.parameters())
    heads = int(spec["num_attention_heads"])
    attached = [(*_layer_maps(blocks, i, heads), str(i)) for i in spec["layers"]]

    holder = nn.Module()
    holder.enabled = True
    holder.prefix = nn.Parameter(tensors["prefix"].to(first.device, first.dtype), requires_grad=False)
    per = heads if spec["gate"] == "head" else 1
    holder.gates = nn.ParameterDict(
        {
            str(i): nn.Parameter(
                tensors[f"layers.{i}.gate"].reshape(per).to(first.device, first.dtype), requires_grad=False
            )
            for i in spec["layers"]
        }
    )
    from transformers import AttentionInterface

    own = [_own_function(attn) for attn, *_ in attached]
    AttentionInterface.register(NAME, _attention_function)
    for (attn, _, maps, key), fn in zip(attached, own):
        # Only the gated layers switch, each through a copy of its config: the model keeps its own
        # implementation's name, masks, and every check of that name (gemma4 slices its last
        # layers' queries for sdpa only, ...).
        config = copy.copy(attn.config)
        config._attn_implementation_internal = NAME
        attn.config = config
        # plain attributes (not submodules): the prefix and gates are parameters of model.aligner only
        attn.__dict__[STATE] = (holder, key, maps, fn)
    model.aligner = holder
    return model
