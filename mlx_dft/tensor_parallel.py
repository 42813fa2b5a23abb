"""Tensor-parallel training (``--shard tensor``): each process holds a slice of every block's
linear layers, and all of them together are one replica of the model.

mlx-lm's ``Model.shard(group)`` (llama, qwen2, qwen3, ministral3, ...) says which linear layers
split along their outputs (``all-to-sharded``: q, k, v, gate, up) and which along their inputs
(``sharded-to-all``: o, down), and divides the attention's head counts by N. While it runs, its
``shard_linear`` only records; the layers are then sharded in place, keeping their parameter names
(so adapters, the optimizer and checkpoints see the names they know), and given a class whose call
does the training's communication (Megatron's: a sum of the input's gradient over the processes
before an all-to-sharded layer, a sum of the outputs after a sharded-to-all one):

- plain linear layers (the frozen base, or full fine-tuning's trained ones): MLX's
  ``AllToShardedLinear`` / ``ShardedToAllLinear`` computations;
- LoRA on all-to-sharded layers: A whole, B split along the outputs, the gradient of ``x A``
  summed over the processes; on sharded-to-all ones: A split along the inputs, ``x A`` summed, B
  whole. DoRA: its magnitude split with B's outputs (all-to-sharded) or whole, the row norm of the
  adapted weight then summed over the processes (sharded-to-all).

Every process trains on the same batch: there is nothing to average. The whole parameters
(norms, embeddings, the whole factor of each LoRA pair) get the same gradient on every process
and stay the same (checked at every checkpoint). Checkpoints hold whole arrays, gathered for the
save, so they are ordinary folders that any number of processes resumes.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.nn.layers.distributed import sum_gradients
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlx_dft.errors import UserError

_AXES = "_mlx_dft_tensor_axes"  # on a sharded module: {key: axis} of its split arrays
_FROM = "_mlx_dft_tensor_from"  # on a sharded module: its class before
_STATE = "_mlx_dft_tensor_parallel"  # on the model: its :class:`TensorParallel`
COLS, ROWS = "all-to-sharded", "sharded-to-all"


class _OneReplica:
    """The data-parallel group of a tensor-parallel run: the processes are one model replica."""

    def rank(self) -> int:
        return 0

    def size(self) -> int:
        return 1


def of(model: nn.Module) -> TensorParallel | None:
    """The tensor parallelism of ``model`` while it is sharded, else None."""
    return getattr(model, _STATE, None)


def data_group(model: nn.Module, world: mx.distributed.Group):
    """The processes that split the batches between them: ``world``, or one replica (rank 0 of 1)
    while ``model`` is tensor-parallel (every process then reads the same batch)."""
    return _OneReplica() if of(model) is not None else world


# ------------------------------------------------------------------ the layers


def _part(a: mx.array, axis: int, n: int, r: int) -> mx.array:
    return mx.contiguous(mx.split(a, n, axis=axis)[r])


def _whole(a: mx.array, axis: int, group: mx.distributed.Group) -> mx.array:
    """The parts of ``a`` along ``axis`` gathered (all_gather joins along the first axis)."""
    if axis == 0:
        return mx.distributed.all_gather(a, group=group)
    front = mx.distributed.all_gather(mx.contiguous(mx.moveaxis(a, axis, 0)), group=group)
    return mx.moveaxis(front, 0, axis)


def _dropout_part(drop: nn.Dropout, x: mx.array, group: mx.distributed.Group) -> mx.array:
    """``drop`` on this process's part of the features of ``x``: the mask one process draws for the
    whole row, and this part of it (the same random draws as one process)."""
    if drop._p_1 == 1 or not drop.training:
        return x
    n, r = group.size(), group.rank()
    k = x.shape[-1]
    mask = mx.random.bernoulli(drop._p_1, (*x.shape[:-1], k * n))[..., r * k : (r + 1) * k]
    return (mask * x) * (1 / drop._p_1)


class _Cols(nn.Linear):
    """A linear layer split along its outputs (MLX's ``AllToShardedLinear``)."""

    def __call__(self, x: mx.array) -> mx.array:
        return super().__call__(sum_gradients(self._mlx_dft_group)(x))


class _Rows(nn.Linear):
    """A linear layer split along its inputs (MLX's ``ShardedToAllLinear``)."""

    def __call__(self, x: mx.array) -> mx.array:
        y = mx.distributed.all_sum(x @ self["weight"].T, group=self._mlx_dft_group)
        return y + self["bias"] if "bias" in self else y


@functools.cache
def _lora_classes() -> dict:
    """(mlx-lm class, split) -> the class that trains it tensor-parallel."""
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.tuner.lora import LoRALinear

    class LoRACols(LoRALinear):
        def __call__(self, x):
            g = self._mlx_dft_group
            y = self.linear(x)
            z = sum_gradients(g)(self.dropout(x) @ self.lora_a) @ self.lora_b
            return y + (self.scale * z).astype(x.dtype)

    class LoRARows(LoRALinear):
        def __call__(self, x):
            g = self._mlx_dft_group
            y = self.linear(x)
            z = mx.distributed.all_sum(_dropout_part(self.dropout, x, g) @ self.lora_a, group=g) @ self.lora_b
            return y + (self.scale * z).astype(x.dtype)

    class DoRACols(DoRALinear):
        def __call__(self, x):
            g = self._mlx_dft_group
            w = self.linear.weight
            y = sum_gradients(g)(x) @ w.T
            z = sum_gradients(g)(self.dropout(x) @ self.lora_a) @ self.lora_b
            out = y + (self.scale * z).astype(x.dtype)
            # this process's rows of the adapted weight are whole: their norms are local
            adapted = w + (self.scale * self.lora_b.T) @ self.lora_a.T
            denom = mx.stop_gradient(mx.linalg.norm(adapted, axis=1))
            out = (self.m / denom).astype(x.dtype) * out
            return out + self.linear.bias if "bias" in self.linear else out

    class DoRARows(DoRALinear):
        def __call__(self, x):
            g = self._mlx_dft_group
            w = self.linear.weight
            y = mx.distributed.all_sum(x @ w.T, group=g)
            z = mx.distributed.all_sum(_dropout_part(self.dropout, x, g) @ self.lora_a, group=g) @ self.lora_b
            out = y + (self.scale * z).astype(x.dtype)
            # each row of the adapted weight is split over the processes: its squares summed
            adapted = w + (self.scale * self.lora_b.T) @ self.lora_a.T
            squares = mx.distributed.all_sum(mx.sum(adapted * adapted, axis=1), group=g)
            denom = mx.stop_gradient(mx.sqrt(squares))
            out = (self.m / denom).astype(x.dtype) * out
            return out + self.linear.bias if "bias" in self.linear else out

    return {
        (LoRALinear, COLS): LoRACols,
        (LoRALinear, ROWS): LoRARows,
        (DoRALinear, COLS): DoRACols,
        (DoRALinear, ROWS): DoRARows,
    }


def _split_module(m: nn.Module, axes: dict[str, int], cls: type, group: mx.distributed.Group) -> None:
    n, r = group.size(), group.rank()
    for k, axis in axes.items():
        m[k] = _part(m[k], axis, n, r)
    object.__setattr__(m, _AXES, axes)
    object.__setattr__(m, _FROM, type(m))
    object.__setattr__(m, "_mlx_dft_group", group)
    m.__class__ = cls


def _shard_layer(m: nn.Module, how: str, group: mx.distributed.Group) -> None:
    """Shard the linear (or LoRA/DoRA) layer ``m`` in place, ``how`` mlx-lm's split."""
    cols = how == COLS
    base = m.linear if "linear" in m else m
    axes = {"weight": 0, **({"bias": 0} if "bias" in base else {})} if cols else {"weight": 1}
    _split_module(base, axes, _Cols if cols else _Rows, group)
    if base is m:
        return
    magnitude = {"m": 0} if "m" in m else {}  # DoRA's, one per output
    axes = {"lora_b": 1, **magnitude} if cols else {"lora_a": 0}
    _split_module(m, axes, _lora_classes()[type(m), how], group)  # plan() checked type(m)


# ------------------------------------------------------------------ what mlx-lm's shard() does


class _Size:
    """Stands for the group while mlx-lm's ``shard()`` only says what it would split."""

    def __init__(self, n: int):
        self.n = n

    def size(self) -> int:
        return self.n

    def rank(self) -> int:
        return 0


def _trainable_type(m: nn.Module) -> bool:
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.tuner.lora import LoRALinear

    if type(m) is nn.Linear:
        return True
    return type(m) in (LoRALinear, DoRALinear) and type(m.linear) is nn.Linear


def plan(model: nn.Module, n: int) -> tuple[list, list]:
    """What ``--shard tensor`` over ``n`` processes does to ``model``: [(module, split)] of its
    linear layers and [(module, attribute, value before, after)] of the counts mlx-lm's ``shard()``
    divides; refuses, in one line, what it cannot train. Leaves the model as it was."""
    kind = type(model).__module__.rsplit(".", 1)[-1]
    if any(type(m).__name__ == "AlignerPrefix" for m in model.modules()):
        raise UserError(
            "--shard tensor with the Aligner is not implemented (its prefix keys and values would be "
            "split with the heads): use --shard fsdp, or LoRA/DoRA/full fine-tuning"
        )
    if not callable(getattr(model, "shard", None)):
        raise UserError(
            f"--shard tensor needs mlx-lm's shard() for the model, which its {kind} module lacks "
            "(llama, qwen2, qwen3, ministral3 have it): use --shard fsdp"
        )
    names = {id(m): name for name, m in model.named_modules()}
    before = {id(m): (m, _counts(m)) for m in model.modules()}
    calls: list = []

    def record_linear(module, sharding, *, segments=1, group=None):
        calls.append((module, sharding, segments))
        return module

    def record_inplace(module, sharding, *, segments=1, group=None):
        calls.append((module, "in place", segments))

    patched = [mod for name, mod in list(sys.modules.items()) if name.startswith("mlx_lm.models.")]
    saved = [(mod, k, getattr(mod, k)) for mod in patched for k in ("shard_linear", "shard_inplace")
             if hasattr(mod, k)]  # fmt: skip
    for mod, k, _ in saved:
        setattr(mod, k, record_linear if k == "shard_linear" else record_inplace)
    try:
        model.shard(_Size(n))
    except Exception as e:  # noqa: BLE001  (a shard() that talks to the group itself)
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"--shard tensor cannot use the {kind} model's shard(): {why}") from None
    finally:
        for mod, k, f in saved:
            setattr(mod, k, f)
        changed = [(m, k, v, vars(m)[k]) for m, counts in before.values() for k, v in counts.items()
                   if vars(m).get(k) != v]  # fmt: skip
        for m, k, v, _ in changed:
            setattr(m, k, v)
    odd = [c for c in calls if c[1] not in (COLS, ROWS) or c[2] != 1]
    if odd or not calls:
        raise UserError(
            f"--shard tensor cannot train the {kind} model: its shard() splits "
            f"{'experts or fused layers in place' if odd else 'nothing'}, which training does not support "
            "(llama, qwen2, qwen3, ministral3 train): use --shard fsdp"
        )
    for m, how, _ in calls:
        where = names.get(id(m), type(m).__name__)
        if not _trainable_type(m):
            raise UserError(
                f"--shard tensor trains float linear layers and LoRA/DoRA on them; {where} is "
                f"{type(m).__name__}{' on ' + type(m.linear).__name__ if 'linear' in m else ''} "
                "(a quantized model: load it in float)"
            )
        base = m.linear if "linear" in m else m
        out_dims, in_dims = base.weight.shape
        dims, what = (out_dims, "outputs") if how == COLS else (in_dims, "inputs")
        if dims % n:
            raise UserError(
                f"--shard tensor over {n} processes: {where} has {dims} {what}, which {n} does not divide"
            )
    for m, k, v, _ in sorted(changed, key=lambda c: _natural(names.get(id(c[0]), ""))):
        if v % n:
            where = names.get(id(m), type(m).__name__)
            raise UserError(
                f"--shard tensor over {n} processes: {where}.{k} is {v}, which {n} does not divide"
            )
    return [(m, how) for m, how, _ in calls], changed


def _natural(name: str) -> list:
    """``name`` sorted as a person reads it (layers.2 before layers.10)."""
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def _counts(m: nn.Module) -> dict:
    return {k: v for k, v in vars(m).items() if type(v) is int}


# ------------------------------------------------------------------ the run's state


class TensorParallel:
    """The tensor parallelism of a model: its split layers and the axes of their arrays."""

    def __init__(self, model: nn.Module, group: mx.distributed.Group, layers: list, changed: list):
        self.group, self.layers, self.changed = group, layers, changed
        self.axes: dict[str, int] = {}  # parameter path -> the axis it is split along
        split = set()
        for name, m in model.named_modules():
            for k, axis in getattr(m, _AXES, {}).items():
                self.axes[f"{name}.{k}" if name else k] = axis
            if getattr(m, _AXES, None) and not name.endswith(".linear"):
                split.add(name)
        # The whole parameters of the modules holding split layers (qwen3's q_norm and k_norm):
        # each process applies them to its own heads only, so their gradients are partial sums.
        holders, inside = tuple(f"{n.rsplit('.', 1)[0]}." for n in split), tuple(f"{n}." for n in split)
        self.partial = [
            k for k, _ in tree_flatten(model.parameters())
            if k.startswith(holders) and not k.startswith(inside)
        ]  # fmt: skip

    # -------------------------------------------------------------- the step's gradients

    def average(self, grads: dict) -> dict:
        """The one replica's gradient (every process read the same batch: nothing to average): the
        gradients of the whole parameters applied to split heads summed over the processes."""
        flat = tree_flatten(grads)
        if not any(k in self.partial for k, _ in flat):
            return grads
        return tree_unflatten([
            (k, mx.distributed.all_sum(g, group=self.group) if k in self.partial else g) for k, g in flat
        ])

    def clip(self, grads: dict, max_norm: float) -> tuple[dict, mx.array]:
        """``optim.clip_grad_norm`` over the whole gradient: the split arrays' squares summed over
        the processes, the whole ones (the same on every process) counted once."""
        flat = tree_flatten(grads)
        split = [g for k, g in flat if k in self.axes]
        local = sum((g.astype(mx.float32) ** 2).sum() for g in split) if split else mx.array(0.0)
        total = mx.distributed.all_sum(local, group=self.group)
        whole = [g for k, g in flat if k not in self.axes]
        if whole:
            total = total + sum((g.astype(mx.float32) ** 2).sum() for g in whole)
        norm = mx.sqrt(total)
        if max_norm <= 0:
            return grads, norm
        normalizer = max_norm / (norm + 1e-6)
        return tree_map(lambda g: mx.where(norm < max_norm, g, g * normalizer), grads), norm

    # -------------------------------------------------------------- arrays in and out

    def _optimizer_leaves(self, optimizer: optim.Optimizer) -> Iterator[tuple[dict, str, int]]:
        """(container, key, axis) of each optimizer-state array of a split parameter."""
        for path, _ in tree_flatten(optimizer.state):
            param = path.rsplit(".", 1)[0]
            if param in self.axes:
                *where, key = path.split(".")
                node = optimizer.state
                for part in where:
                    node = node[int(part)] if isinstance(node, list) else node[part]
                yield node, key, self.axes[param]

    def check_same(self, model: nn.Module) -> None:
        """Refuse, on every process, trained whole parameters that differ between processes
        (they get the same gradient and update everywhere; a difference is a bug, not noise)."""
        whole = [(k, v) for k, v in tree_flatten(model.trainable_parameters()) if k not in self.axes]
        if not whole or self.group.size() < 2:
            return
        mine = mx.stack([v.astype(mx.float32).sum() for _, v in whole])
        every = mx.distributed.all_gather(mine[None], group=self.group, stream=mx.cpu)
        apart = mx.any(every != every[:1], axis=0).tolist()
        if any(apart):
            name = whole[apart.index(True)][0]
            raise UserError(
                f"--shard tensor: the processes' copies of {name} differ (a bug: please report it)"
            )

    @contextmanager
    def gathered(self, model: nn.Module, optimizer: optim.Optimizer) -> Iterator[None]:
        """While it lasts, the trained parameters and the optimizer state are whole arrays, what a
        checkpoint writes (a collective: every process enters it; the frozen base stays split)."""
        self.check_same(model)
        held = []
        for node, key, axis in list(self._optimizer_leaves(optimizer)):
            held.append((node, key, node[key]))
            node[key] = _whole(node[key], axis, self.group)
        for m in model.modules():
            for k, axis in getattr(m, _AXES, {}).items():
                if k not in m._no_grad:
                    held.append((m, k, m[k]))
                    m[k] = _whole(m[k], axis, self.group)
        mx.eval([x[0][x[1]] for x in held])
        try:
            yield
        finally:
            for node, key, part in held:
                node[key] = part

    def shard(self, model: nn.Module, optimizer: optim.Optimizer) -> None:
        n, r = self.group.size(), self.group.rank()
        for node, key, axis in list(self._optimizer_leaves(optimizer)):  # a resumed run's whole state
            node[key] = _part(node[key], axis, n, r)
        # Dropout draws the same masks on every process (one replica): rank 0's random state, which
        # its draws alone (generating the accuracy report's answers) may have moved on.
        hi, lo = mx.distributed.all_gather(mx.random.state[0][None], group=self.group)[0].tolist()
        mx.random.seed((hi << 32) | lo)  # the key (hi, lo) itself
        object.__setattr__(model, _STATE, self)
        mx.eval(model.parameters(), optimizer.state)

    def unshard(self, model: nn.Module, optimizer: optim.Optimizer) -> None:
        """The whole weights back on every process, the layers and head counts as they were (what
        follows training reads the model); the optimizer keeps its step and learning rate but drops
        the moments, whose whole copy training did not need (the last checkpoint holds it)."""
        for m in list(model.modules()):
            axes = getattr(m, _AXES, None)
            if not axes:
                continue
            for k, axis in axes.items():
                m[k] = _whole(m[k], axis, self.group)
                mx.eval(m[k])
            m.__class__ = getattr(m, _FROM)
            for attr in (_AXES, _FROM, "_mlx_dft_group"):
                object.__delattr__(m, attr)
        for m, k, v, _ in self.changed:
            setattr(m, k, v)
        optimizer.state = {k: v for k, v in optimizer.state.items() if isinstance(v, mx.array)}
        object.__delattr__(model, _STATE)


def shard(model: nn.Module, optimizer: optim.Optimizer, group: mx.distributed.Group) -> TensorParallel:
    """Split ``model`` (its adapter applied) and ``optimizer``'s state over ``group``."""
    layers, changed = plan(model, group.size())
    for m, k, _, after in changed:
        setattr(m, k, after)
    for m, how in layers:
        _shard_layer(m, how, group)
    state = TensorParallel(model, group, layers, changed)
    state.shard(model, optimizer)
    return state


@contextmanager
def sharded(model: nn.Module, optimizer: optim.Optimizer, group: mx.distributed.Group) -> Iterator[Callable]:
    """While it lasts, ``model`` and ``optimizer`` are tensor-parallel over ``group``; yields
    ``wrap(save)``, which makes a checkpoint saver write whole arrays. When training ends well the
    model is whole again on every process; after an error it stays split."""
    state = shard(model, optimizer, group)

    def wrap(save: Callable | None) -> Callable | None:
        if save is None:
            return None

        def save_whole(*args, **kwargs):
            with state.gathered(model, optimizer):
                return save(*args, **kwargs)

        return save_whole

    yield wrap
    state.unshard(model, optimizer)
