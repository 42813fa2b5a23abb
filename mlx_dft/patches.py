"""Where mlx_dft reaches into mlx-lm's models, all in one place.

mlx_dft never copies or forks an mlx-lm model; it changes how a model runs from outside, at these
points only, each undone when the training loss returns:

- **the blocks** (:func:`wrapped_blocks`): while the loss runs, the body's list of blocks holds
  stand-ins that call the real blocks: with a block-diagonal mask and per-example RoPE positions
  for packed rows (:class:`Packed`), recomputed in the backward pass for gradient checkpointing,
  or replaced by a recorded value for ASFT's reference pass (:class:`StandIn`). Nothing on a
  class changes, so generation and other models in the process are untouched.
- **RoPE** of each attention module (its ``rope`` entry) inside a packed block: rotated by each
  token's position within its example (:class:`TokenPositions`).
- **the SwiGLU** of the model's MLP modules (:func:`lean_swiglu`): one with a leaner backward pass
  (:mod:`mlx_dft.fused`), the same forward values.
- **the gated delta rule** of gated-delta layers (qwen3_5, qwen3_next, olmo_hybrid...;
  :func:`chunked_gated_delta`): their mlx-lm module's ``gated_delta_update`` computes the
  recurrence in chunks (:mod:`mlx_dft.gated_delta`) instead of a step at a time, and in a packed
  row restarts the state at each example.
- **attention hooks** (:func:`hook_attention`): an mlx-lm module's attention class marks the layer
  running, and its ``scaled_dot_product_attention`` adds the terms hooks give for that layer (the
  Aligner's prefix term, :mod:`mlx_dft.adapters.aligner.layer`); a pass-through elsewhere. These
  are the only class-level patches besides the fixes below, installed once per module and inert
  without a hook's term.
- **mlx-lm bug fixes** (:func:`fix_mlx_lm`, on import): gemma2's attention receives a batched
  mask with the shape its grouped-query layout broadcasts correctly (mlx-lm 0.32.2 got it wrong
  for batched generation and packed rows).

:func:`check_mlx_lm` (run on import) checks that the mlx-lm functions these points rely on have
the signatures they were written for, so an mlx-lm release that changes them is refused in one
line instead of training something else.
"""

from __future__ import annotations

import contextvars
import importlib
import inspect
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType

import mlx.core as mx
import mlx.nn as nn

from mlx_dft.errors import UserError

# mlx-lm's functions (module, attribute path) and the parameters this module relies on.
EXPECTED = {
    ("mlx_lm.models.base", "scaled_dot_product_attention"): ("queries", "keys", "values", "cache", "mask"),
    ("mlx_lm.models.base", "create_attention_mask"): ("h", "cache"),
    ("mlx_lm.models.activations", "swiglu"): ("gate", "x"),
    ("mlx_lm.tuner.lora", "LoRASwitchLinear.from_base"): ("linear", "r", "dropout", "scale"),
    ("mlx_lm.models.gated_delta", "gated_delta_update"): (
        "q",
        "k",
        "v",
        "a",
        "b",
        "A_log",
        "dt_bias",
        "state",
        "mask",
        "use_kernel",
        "lower_bound",
        "allow_neg_eigval",
    ),
    ("mlx_lm.models.gated_delta", "gated_delta_ops"): ("q", "k", "v", "g", "beta", "state", "mask"),
    ("mlx_lm.models.gated_delta", "compute_g"): ("A_log", "a", "dt_bias"),
}


def check_mlx_lm() -> None:
    """Refuse an mlx-lm whose patched functions lost the parameters mlx_dft passes or reads."""
    import mlx_lm

    for (module, path), names in EXPECTED.items():
        obj: object = importlib.import_module(module)
        for part in path.split("."):
            obj = getattr(obj, part, None)
        params = set(inspect.signature(obj).parameters) if callable(obj) else set()
        missing = [n for n in names if n not in params]
        if missing:
            raise UserError(
                f"mlx-lm {mlx_lm.__version__}: {module}.{path} lacks {', '.join(missing)}; mlx_dft was "
                "written for mlx-lm's tested range (see mlx_dft.compat)"
            )


# ------------------------------------------------------------------ stand-ins


class StandIn(nn.Module):
    """Takes a block's place in the body's list of blocks: calls ``fn`` instead, and reads as the
    block otherwise (mlx-lm's models read attributes such as ``use_sliding`` off their blocks). A
    module holding the block, so that the model's module tree still reaches the block's layers
    while it stands in (an adapter's switch to the base model walks that tree)."""

    def __init__(self, block: nn.Module, fn):
        super().__init__()
        self.block = block
        object.__setattr__(self, "_fn", fn)

    def __call__(self, x, *args, **kwargs):
        return self._fn(x, *args, **kwargs)

    def __getattr__(self, name: str):
        if name in self:
            return self[name]
        if "block" not in self:
            raise AttributeError(name)
        return getattr(self["block"], name)


# ------------------------------------------------------------------ packing


def block_causal_mask(segments: mx.array) -> mx.array:
    """[B, 1, T, T] boolean attention mask of packed rows: position i sees position j when j <= i
    and both belong to the same example (padding, segment 0, sees only padding, so no row of the
    mask is empty)."""
    t = segments.shape[1]
    same = segments[:, :, None] == segments[:, None, :]
    causal = mx.arange(t)[:, None] >= mx.arange(t)[None, :]
    return (same & causal)[:, None]


class TokenPositions(nn.Module):
    """A RoPE module applied at one position per token: ``rope`` (mlx-lm's, any variant; NoPE
    too) sees each token as a one-token sequence at its own offset."""

    def __init__(self, rope: nn.Module, positions: mx.array):
        super().__init__()
        self.rope = rope
        object.__setattr__(self, "_positions", positions)  # an input, not a parameter

    def __call__(self, x: mx.array, offset=0) -> mx.array:
        b, h, t, d = x.shape
        y = x.transpose(0, 2, 1, 3).reshape(b * t, h, 1, d)
        y = self.rope(y, offset=self._positions.reshape(-1) + (0 if offset is None else offset))
        return y.reshape(b, t, h, d).transpose(0, 2, 1, 3)


def arg_index(block: nn.Module, name: str = "mask") -> int | None:
    """The position of parameter ``name`` among a block's arguments after the hidden state
    (ministral3 passes an attention scale before the mask); None when it has none."""
    names = list(inspect.signature(type(block).__call__).parameters)[2:]  # after self and x
    return names.index(name) if name in names else None


def mask_index(block: nn.Module) -> int | None:
    """The position of the ``mask`` parameter among a block's arguments (:func:`arg_index`)."""
    return arg_index(block, "mask")


def position_scale(block: nn.Module, body: nn.Module, positions: mx.array) -> mx.array | None:
    """The [B, 1, T, 1] query scale of a block that scales attention by each token's position
    (ministral3's llama 4 scaling, ``1 + beta log(1 + floor(pos / original_max))``), computed by
    its mlx-lm module's own function at ``positions`` (each example's own); None for a block that
    takes no ``attn_scale``."""
    if arg_index(block, "attn_scale") is None:
        return None
    rope = getattr(getattr(body, "args", None), "rope_parameters", None) or {}
    fn = getattr(sys.modules.get(type(block).__module__), "_get_llama_4_attn_scale", None)
    if not callable(fn) or "llama_4_scaling_beta" not in rope:
        return None
    b, t = positions.shape
    beta, original = rope["llama_4_scaling_beta"], rope["original_max_position_embeddings"]
    scale = fn(1, positions.reshape(-1), beta, original)
    return scale.reshape(b, t)[:, None, :, None]


def combine(given, packed: mx.array) -> mx.array:
    """The mask a block of a packed row uses: ``packed`` (block-causal) where the model asks for
    plain causal attention, and both where it gives its own (a sliding window): each example sees
    the window within itself, as it would alone."""
    if given is None or isinstance(given, str):
        return packed
    if given.dtype == mx.bool_:
        return given & packed
    return mx.where(packed, given, mx.array(mx.finfo(given.dtype).min, dtype=given.dtype))


class Packed:
    """What a block of a packed batch needs: the block-causal mask and each token's position
    within its example (``segments`` [B, T] numbers each position's example)."""

    def __init__(self, segments: mx.array):
        self.segments = segments
        self.mask = block_causal_mask(segments)
        self.positions = self.mask[:, 0].sum(axis=-1).astype(mx.int32) - 1  # [B, T]
        # 0 at each example's first token: a gated-delta state decays to nothing there
        self.keep = (self.positions > 0).astype(mx.float32)
        self.scale: mx.array | None = None  # per-position attention scale (:func:`position_scale`)

    def same_back(self, shift: int) -> mx.array:
        """[B, T] bool: position t and position t - ``shift`` belong to the same example."""
        b, t = self.segments.shape
        earlier = mx.concatenate([mx.full((b, shift), -1, self.segments.dtype), self.segments[:, :-shift]], 1)
        return self.segments == earlier


def _ropes(block: nn.Module) -> list[nn.Module]:
    """The modules of ``block`` that own a ``rope`` (its attention)."""
    return [m for _, m in block.named_modules() if isinstance(m, nn.Module) and "rope" in m]


@contextmanager
def _positions(block: nn.Module, positions: mx.array) -> Iterator[None]:
    owners = _ropes(block)
    ropes = [m["rope"] for m in owners]
    for m, rope in zip(owners, ropes):
        m["rope"] = TokenPositions(rope, positions)
    try:
        yield
    finally:
        for m, rope in zip(owners, ropes):
            m["rope"] = rope


class SegmentConv(nn.Module):
    """A causal depthwise ``nn.Conv1d`` (lfm2's short convolution, the gated-delta layers' conv)
    applied to a packed row: each output reads only inputs of its own example. Called as mlx-lm
    calls the conv, on the input with its ``kernel - 1`` leading (zero) positions:

        out[t] = conv(x)[t] - sum_{s >= 1} W[:, K-1-s] * x[t - s] * [t - s is in another example]
    """

    def __init__(self, conv: nn.Conv1d, packed: Packed):
        super().__init__()
        self.conv = conv
        object.__setattr__(self, "_packed", packed)

    def __call__(self, padded: mx.array) -> mx.array:
        # mlx-lm's own convolution, less the terms that reach into an earlier example: bitwise
        # the convolution wherever a position's window lies within its example, which is all
        # but the first kernel - 1 positions of each.
        out = self.conv(padded)
        w = self.conv.weight  # [C, K, 1]
        k = w.shape[1]
        t = padded.shape[1] - (k - 1)
        for i in range(k - 1):
            shift = k - 1 - i
            xs = padded[:, i : i + t]
            leak = mx.where(self._packed.same_back(shift)[..., None], mx.zeros_like(xs), xs * w[:, i, 0])
            out = out - leak
        return out


def _depthwise(conv: object) -> bool:
    """An ``nn.Conv1d`` that :class:`SegmentConv` computes exactly: one channel a group, stride,
    dilation and padding as mlx-lm's short convolutions use them."""
    if not isinstance(conv, nn.Conv1d):
        return False
    w = conv.weight
    return (
        w.shape[2] == 1
        and conv.stride == 1
        and conv.dilation == 1
        and conv.padding == 0
        and conv.groups == w.shape[0]
    )


def _log_gates(a: mx.array, A_log: mx.array, dt_bias: mx.array, lower_bound: float | None) -> mx.array:
    """The logarithm of mlx-lm's gates (``compute_g``, ``compute_lower_bound_g``), computed without
    the exponential, which rounds strong decays to 0."""
    if lower_bound is None:
        return -mx.exp(A_log.astype(mx.float32)) * nn.softplus(a + dt_bias)
    return lower_bound * mx.sigmoid(mx.exp(A_log.astype(mx.float32)) * (a.astype(mx.float32) + dt_bias))


def _gated_delta_update(packed: Packed | None = None) -> Callable:
    """mlx-lm's ``gated_delta_update`` for training: the same gates and betas, the recurrence
    computed in chunks (:func:`mlx_dft.gated_delta.chunk_gated_delta`; scalar or per-dimension
    gates) instead of a step at a time; inputs with a padding mask (generation's, never training's)
    keep mlx-lm's ``gated_delta_ops``. For a packed row the gate is 0 at each example's first token,
    so no state crosses into the next example (``state * 0`` is exactly the zero state an example
    starts from)."""
    from mlx_lm.models import gated_delta as gd

    from mlx_dft.gated_delta import LOG_ZERO, chunk_gated_delta

    def update(q, k, v, a, b, A_log, dt_bias, state=None, mask=None, *, use_kernel=True,
               lower_bound=None, allow_neg_eigval=False):  # fmt: skip
        beta = mx.sigmoid(b)
        if allow_neg_eigval:
            beta = beta * 2.0
        log_g = _log_gates(a, A_log, dt_bias, lower_bound)
        if packed is not None:
            keep = packed.keep.reshape(*packed.keep.shape, *([1] * (log_g.ndim - 2)))
            log_g = mx.where(keep, log_g, LOG_ZERO)
        if mask is None:
            return chunk_gated_delta(q, k, v, log_g, beta, state)
        return gd.gated_delta_ops(q, k, v, mx.exp(log_g), beta, state, mask)

    return update


def is_gated_delta(m: object) -> bool:
    """Whether ``m`` is a gated-delta layer (qwen3_5's ``GatedDeltaNet``, Kimi's delta attention...):
    the module holding the gates' ``A_log`` and ``dt_bias``."""
    return isinstance(m, nn.Module) and "A_log" in m and "dt_bias" in m


def _gated_delta_modules(root: nn.Module) -> set[ModuleType]:
    """The mlx-lm modules (``mlx_lm.models.qwen3_5``...) of the gated-delta layers under ``root``:
    each calls its module's ``gated_delta_update``."""
    return {
        sys.modules[type(m).__module__]
        for _, m in root.named_modules()
        if is_gated_delta(m)
        and callable(getattr(sys.modules[type(m).__module__], "gated_delta_update", None))
    }  # fmt: skip


@contextmanager
def chunked_gated_delta(model: nn.Module) -> Iterator[bool]:
    """While it lasts, ``model``'s gated-delta layers run the chunked recurrence (a training step
    traced inside keeps it; generation keeps mlx-lm's kernels); yields whether the model has any."""
    modules = _gated_delta_modules(model)
    previous = [(mod, mod.gated_delta_update) for mod in modules]
    try:
        for mod in modules:
            mod.gated_delta_update = _gated_delta_update()
        yield bool(modules)
    finally:
        for mod, update in previous:
            mod.gated_delta_update = update


def _stateful(block: nn.Module) -> tuple[list[tuple[nn.Module, str]], list[nn.Module]]:
    """The block's causal convolutions (owner, key) and its gated-delta layers."""
    convs, deltas = [], []
    for _, m in block.named_modules():
        if not isinstance(m, nn.Module):
            continue
        for key, child in m.children().items():
            if isinstance(child, nn.Conv1d):
                convs.append((m, key))
        if is_gated_delta(m):
            deltas.append(m)
    return convs, deltas


@contextmanager
def _segmented(block: nn.Module, packed: Packed) -> Iterator[None]:
    """Inside: the block's convolutions read only their own example, and its gated-delta layers
    restart their state at each example (their mlx-lm module's ``gated_delta_update`` replaced)."""
    convs, deltas = _stateful(block)
    originals = [owner[key] for owner, key in convs]
    modules = {sys.modules[type(m).__module__] for m in deltas}
    updates = [(mod, mod.gated_delta_update) for mod in modules]
    for owner, key in convs:
        owner[key] = SegmentConv(owner[key], packed)
    for mod, _ in updates:
        mod.gated_delta_update = _gated_delta_update(packed)
    try:
        yield
    finally:
        for (owner, key), conv in zip(convs, originals):
            owner[key] = conv
        for mod, update in updates:
            mod.gated_delta_update = update


def _run(block: nn.Module, packed: Packed | None, at: int | None, x, args: tuple, kwargs: dict):
    """``block(x, *args, **kwargs)``, the packed way when ``packed``: attention blocks with the
    block-diagonal mask and per-example positions, convolution and gated-delta blocks with their
    state kept within each example (their own mask, for padding, left as the model gives it)."""
    if packed is None:
        return block(x, *args, **kwargs)
    if not _ropes(block):
        with _segmented(block, packed):
            return block(x, *args, **kwargs)
    args = list(args)
    if packed.scale is not None:  # the model's scale is at positions 0..T-1 of the row
        at_scale = arg_index(block, "attn_scale")
        if "attn_scale" in kwargs or at_scale is None or at_scale >= len(args):
            given = kwargs.get("attn_scale")
            dtype = given.dtype if given is not None else packed.scale.dtype
            kwargs = {**kwargs, "attn_scale": packed.scale.astype(dtype)}
        else:
            args[at_scale] = packed.scale.astype(args[at_scale].dtype)
    if "mask" in kwargs:
        kwargs = {**kwargs, "mask": combine(kwargs["mask"], packed.mask)}
    elif at is not None and at < len(args):
        args[at] = combine(args[at], packed.mask)
    else:
        kwargs = {**kwargs, "mask": packed.mask}
    with _positions(block, packed.positions):
        return block(x, *args, **kwargs)


def _wrapped(block: nn.Module, packed: Packed | None, checkpoint: bool, tiled: bool = False) -> StandIn:
    at = mask_index(block) if packed is not None else None
    if not checkpoint:
        return StandIn(block, lambda x, *args, **kwargs: _run(block, packed, at, x, args, kwargs))

    def checkpointed(x, *args, **kwargs):
        # mx.checkpoint takes the arguments as they are (arrays differentiated, "causal" or None
        # passed through) and recomputes the block in the backward pass by running ``inner``
        # again: with the packed mask and positions it closes over, exactly as forward.
        def inner(params, x, *args, **kwargs):
            block.update(params)
            # The backward pass runs this again after the loss has returned and undone its
            # patches: the recomputation puts the block's own back (the same code as forward).
            with lean_swiglu(block), chunked_gated_delta(block), tiled_feed_forward(block, x, tiled):
                return _run(block, packed, at, x, args, kwargs)

        return mx.checkpoint(inner)(block.trainable_parameters(), x, *args, **kwargs)

    return StandIn(block, checkpointed)


# Bytes of one float32 [tokens, width] array of a block's feed-forward (its widest layer's output)
# up to which a checkpointed block runs its feed-forward over all tokens at once; past it, the
# tokens go through in tiles of about this size, each recomputed in the backward pass.
FEED_FORWARD_TILE_BYTES = 16 * 1024 * 1024
FEED_FORWARD_NAMES = ("mlp", "feed_forward")


def feed_forward_width(module: nn.Module) -> int:
    """The widest output of the linear layers in ``module`` (dense ``[out, in]`` weights, experts'
    ``[experts, out, in]``, quantized ones alike): the floats a token holds in its widest
    activation (an expert layer counted once, not once per expert a token is routed to)."""
    width = 0
    for _, m in module.named_modules():
        w = m.get("weight") if "weight" in m else None
        if isinstance(w, mx.array) and w.ndim >= 2:
            width = max(width, int(w.shape[-2]))
    return width


def feed_forward_tiles(tokens: int, width: int, tile_bytes: int = FEED_FORWARD_TILE_BYTES) -> int:
    """Tiles a checkpointed block splits ``tokens`` into for a feed-forward ``width`` wide."""
    return max(1, -(-(tokens * width * 4) // max(tile_bytes, 1)))


@contextmanager
def tiled_feed_forward(block: nn.Module, x: mx.array, on: bool = True) -> Iterator[int]:
    """While it lasts, ``block``'s feed-forward (its ``mlp`` or ``feed_forward``, a per-token
    function of one [batch, length, hidden] array) runs over the sequence in tiles, each
    recomputed in the backward pass (``mx.checkpoint``) and chained to the previous tile, so the
    backward pass of a checkpointed block holds one tile's activations, not the whole
    sequence's (the widest [tokens, width] arrays of a GeGLU or SwiGLU MLP, several of them:
    about 1 GB at 4 x 486 tokens of Gemma-3-1B's 6,912-wide MLP). Exact: a feed-forward sees
    each token alone. Costs one more forward pass of the feed-forward. Yields the tile count
    (1: nothing changed)."""
    name = next((n for n in FEED_FORWARD_NAMES if n in block and isinstance(block[n], nn.Module)), None)
    if not on or name is None or x.ndim != 3:
        yield 1
        return
    ff = block[name]
    width = feed_forward_width(ff)
    tiles = min(x.shape[1], feed_forward_tiles(x.shape[0] * x.shape[1], width, FEED_FORWARD_TILE_BYTES))
    if tiles <= 1:
        yield 1
        return
    size = -(-x.shape[1] // tiles)

    def run(params, h):
        ff.update(params)
        with lean_swiglu(ff):  # the backward pass recomputes a tile after the block's patches are undone
            return ff(h)

    def tiled(h, *args, **kwargs):
        if args or kwargs or h.ndim != 3:
            return ff(h, *args, **kwargs)
        outs: list[mx.array] = []
        for i in range(0, h.shape[1], size):
            part = h[:, i : i + size]
            if outs:  # evaluated one tile after another, forward and backward
                part = part + 0.0 * outs[-1].sum().astype(part.dtype)
            outs.append(mx.checkpoint(run)(ff.trainable_parameters(), part))
        return mx.concatenate(outs, axis=1)

    setattr(block, name, StandIn(ff, tiled))
    try:
        yield tiles
    finally:
        setattr(block, name, ff)


def feed_forward_tiling(model: nn.Module, tokens: int, length: int) -> tuple[int, int] | None:
    """(tiles, width) :func:`tiled_feed_forward` gives the MLP of ``model``'s first block with one
    for a batch of ``tokens`` tokens in rows of ``length`` (None when no block has one)."""
    block = model.layers[0] if getattr(model, "layers", None) else None
    name = next((n for n in FEED_FORWARD_NAMES if block is not None and n in block), None)
    if name is None or not isinstance(block[name], nn.Module):
        return None
    width = feed_forward_width(block[name])
    return min(length, feed_forward_tiles(tokens, width, FEED_FORWARD_TILE_BYTES)), width


def gradient_checkpointing(model: nn.Module) -> bool:
    """Whether ``model`` recomputes its blocks in the backward pass (:func:`set_checkpointing`)."""
    return bool(getattr(model, "_mlx_dft_checkpoint", False))


def tiled_mlp(model: nn.Module) -> bool:
    """Whether ``model``'s recomputed blocks run their MLP in tiles (:func:`set_checkpointing`)."""
    return gradient_checkpointing(model) and bool(getattr(model, "_mlx_dft_tiled_mlp", False))


def set_checkpointing(model: nn.Module, on: bool = True, tiled: bool = False) -> None:
    """Recompute each block in the backward pass while the training loss runs (what mlx-lm's
    ``grad_checkpoint`` does by patching the block class; here only inside :func:`wrapped_blocks`);
    with ``tiled``, each recomputed block's MLP in tiles (:func:`tiled_feed_forward`)."""
    object.__setattr__(model, "_mlx_dft_checkpoint", bool(on))
    object.__setattr__(model, "_mlx_dft_tiled_mlp", bool(on and tiled))


@contextmanager
def wrapped_blocks(
    body: nn.Module, segments: mx.array | None, checkpoint: bool = False, tiled: bool = False
) -> Iterator[None]:
    """While it lasts, every block of ``body`` runs the packed way when ``segments`` is given
    (block-diagonal attention, each example's RoPE positions from 0; the model's own sliding
    windows kept) and is recomputed in the backward pass when ``checkpoint`` (its MLP in tiles
    when ``tiled``: :func:`tiled_feed_forward`). Nothing changes when neither is asked."""
    layers = getattr(body, "layers", None)
    if (segments is None and not checkpoint) or not isinstance(layers, list):
        yield
        return
    packed = Packed(segments) if segments is not None else None
    if packed is not None and layers:
        packed.scale = position_scale(layers[0], body, packed.positions)
    original = list(layers)
    layers[:] = [_wrapped(b, packed, checkpoint, tiled) for b in original]
    try:
        yield
    finally:
        layers[:] = original


def packing_refusal(kind: str, model: nn.Module, body: nn.Module | None) -> str:
    """'' when every block of ``model`` (of model type ``kind``) can run packed rows exactly; else
    why not: attention blocks need a RoPE module and a mask argument; convolution blocks a causal
    depthwise ``nn.Conv1d``; gated-delta blocks mlx-lm's ``gated_delta_update`` in their module;
    anything else that carries state along the sequence (state-space layers) is refused."""
    if body is None:
        return f"{kind} has no body that yields hidden states"
    for i, block in enumerate(body.layers):
        convs, deltas = _stateful(block)
        if any(not _depthwise(owner[key]) for owner, key in convs):
            return f"{kind} block {i} has a convolution other than a causal depthwise one"
        for m in deltas:
            module = sys.modules.get(type(m).__module__)
            if not callable(getattr(module, "gated_delta_update", None)):
                return f"{kind} block {i}: its gated-delta layer calls no mlx-lm gated_delta_update"
        names = set(block.keys()) if isinstance(block, nn.Module) else set()
        if names & {"mamba", "mixer", "ssm"}:
            return f"{kind} block {i} has state-space layers: their state runs from one example into the next"
        if _ropes(block):
            if mask_index(block) is None:
                return f"{kind} block {i} takes no attention mask"
        elif not (convs or deltas):
            return f"{kind} block {i} has no attention with a RoPE module mlx_dft can re-position"
    rope = getattr(getattr(model, "args", None), "rope_parameters", None) or {}
    if isinstance(rope, dict) and rope.get("llama_4_scaling_beta"):
        if any(position_scale(b, body, mx.zeros((1, 1), mx.int32)) is None for b in body.layers):
            return f"{kind} scales attention by each token's absolute position outside an attn_scale argument"
    return ""


# ------------------------------------------------------------------ attention hooks

_RUNNING: contextvars.ContextVar = contextvars.ContextVar("mlx_dft_attention", default=None)
_HOOKS: dict[type, dict[str, Callable]] = {}  # attention class -> {hook name: term}


def hook_attention(attention_cls: type, name: str, term: Callable, queries: Callable | None = None) -> None:
    """Add ``term(attention_module, queries, scale) -> array | None`` (None adds nothing) to the
    output of every attention of class ``attention_cls`` (its ``__call__`` is patched once; a hook
    of the same name is replaced).

    Where the class calls mlx-lm's attention kernel, the term is added to the kernel's output, for
    the queries and scale the layer hands it: the ``scaled_dot_product_attention`` of the mlx-lm
    module that defines the class is wrapped (qwen3_5 uses qwen3_next's attention, which calls
    qwen3_next's kernel). An attention that computes its scores itself (gemma2) gives
    ``queries(attention_module, x, cache) -> (queries, scale)``, the queries as it computes them,
    before it runs; the term then reaches the output through the layer's output projection
    (linear: ``o_proj(a + t) = o_proj(a) + o_proj(t) - o_proj(0)``).
    """
    hooks = _HOOKS.get(attention_cls)
    if hooks is not None:
        hooks[name] = term
        return
    mod = sys.modules[attention_cls.__module__]
    original_call = attention_cls.__call__
    original_sdpa = getattr(mod, "scaled_dot_product_attention", None)
    if not callable(original_sdpa) and queries is None:
        raise ValueError(f"{attention_cls.__qualname__} calls no attention kernel and no queries were given")
    hooks = _HOOKS[attention_cls] = {name: term}

    if callable(original_sdpa):

        def __call__(self, *args, **kwargs):
            token = _RUNNING.set(self)
            try:
                return original_call(self, *args, **kwargs)
            finally:
                _RUNNING.reset(token)

        def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, **kwargs):
            out = original_sdpa(queries, keys, values, cache=cache, scale=scale, mask=mask, **kwargs)
            attn = _RUNNING.get()
            if attn is None or type(attn) not in _HOOKS:
                return out
            for fn in _HOOKS[type(attn)].values():
                extra = fn(attn, queries, scale)
                if extra is not None:
                    out = out + extra.astype(out.dtype)
            return out

        if not getattr(original_sdpa, "_mlx_dft_hooked", False):
            scaled_dot_product_attention._mlx_dft_hooked = True  # type: ignore[attr-defined]
            mod.scaled_dot_product_attention = scaled_dot_product_attention
    else:
        signature = inspect.signature(original_call)

        def __call__(self, *args, **kwargs):
            cache = signature.bind(self, *args, **kwargs).arguments.get("cache")
            q, scale = queries(self, args[0] if args else kwargs["x"], cache)  # before the cache grows
            out = original_call(self, *args, **kwargs)
            extras = [e for fn in _HOOKS[attention_cls].values() if (e := fn(self, q, scale)) is not None]
            if not extras:
                return out
            t = sum(extras[1:], extras[0])  # [B, H, L, d]
            b, _, length, _ = t.shape
            t = t.transpose(0, 2, 1, 3).reshape(b, length, -1).astype(out.dtype)
            return out + self.o_proj(t) - self.o_proj(mx.zeros_like(t[:1, :1]))

    attention_cls.__call__ = __call__


# ------------------------------------------------------------------ the SwiGLU


def _mlp_modules(model: nn.Module) -> list[ModuleType]:
    """The mlx-lm modules of the model's layers that call mlx-lm's own ``swiglu`` (not another
    function of that name: gpt_oss has a clamped one)."""
    from mlx_lm.models.activations import swiglu

    out: list[ModuleType] = []
    for _, m in model.named_modules():  # a model, or one block (a checkpoint's recomputation)
        module = sys.modules.get(type(m).__module__)
        if (
            module is not None
            and module.__name__.startswith("mlx_lm.models.")
            and getattr(module, "swiglu", None) is swiglu
            and module not in out
        ):
            out.append(module)
    return out


@contextmanager
def lean_swiglu(model: nn.Module) -> Iterator[bool]:
    """While it lasts, ``model``'s MLPs call :data:`mlx_dft.fused.swiglu` (a training step traced
    inside keeps it); yields whether any does (architectures with a GeGLU or plain MLP keep theirs:
    a lean GeLU for gemma was tried and saved 0.01 GB a layer in the compiled step, not kept)."""
    from mlx_dft import fused

    modules = _mlp_modules(model)
    previous = [m.swiglu for m in modules]
    for m in modules:
        m.swiglu = fused.swiglu
    try:
        yield bool(modules)
    finally:
        for m, p in zip(modules, previous):
            m.swiglu = p


# ------------------------------------------------------------------ mlx-lm bug fixes


def _grouped_mask_fix(attention_cls: type) -> None:
    """mlx-lm 0.32's gemma2 attention (grouped queries as [B, kv heads, repeats, L, d]) broadcasts
    a [B, 1, L, S] mask array over its kv heads instead of its batch (mlx-lm pull request 1903,
    open): an error for most batch sizes (batched generation) and silently wrong when the batch
    size equals the number of kv heads (packed rows). A mask of rank 4 is handed to it as
    [B, 1, 1, L, S], which broadcasts as meant; anything else passes unchanged."""
    if getattr(attention_cls.__call__, "_mlx_dft_mask_fix", False):
        return
    original = attention_cls.__call__

    def __call__(self, x, mask=None, cache=None):
        if isinstance(mask, mx.array) and mask.ndim == 4 and getattr(self, "repeats", 1) > 1:
            mask = mask[:, :, None]
        return original(self, x, mask, cache)

    __call__._mlx_dft_mask_fix = True  # type: ignore[attr-defined]
    attention_cls.__call__ = __call__


def fix_mlx_lm() -> None:
    """Work around the mlx-lm bugs mlx_dft's features run into (each named where it is fixed)."""
    gemma2 = importlib.import_module("mlx_lm.models.gemma2")
    if list(inspect.signature(gemma2.Attention.__call__).parameters) == ["self", "x", "mask", "cache"]:
        _grouped_mask_fix(gemma2.Attention)


check_mlx_lm()
fix_mlx_lm()
