"""Sharded training over ``mx.distributed`` (``--shard``): fully sharded data parallelism.

With ``--shard fsdp`` every parameter of the model's blocks (the frozen base and the trained
weights alike) is held 1/N a process: flattened, padded to a multiple of N and split, so any shape
shards. A block gathers its parameters (``all_gather``) when it runs, forward and, with
``--grad-checkpoint``, again in its recomputation; the gradients of the trained ones are
reduce-scattered (summed over the workers, each keeping its part, divided by N: the mean, as data
parallelism averages), so each process keeps and updates only its shard of them and of the
optimizer state. The embeddings, final norm and output projection shard the same way, each its
own unit; what else lies outside the blocks (the Aligner's prefix) stays whole on every process,
averaged as in plain data parallelism. Parameters keep their names and modules: only
the arrays are shards, so adapters (LoRA, DoRA, the Aligner), their switch to the base model,
packing and checkpointing see the model they know.

Checkpoints and the folders a run writes hold the whole arrays (:meth:`Sharding.save`: rank 0
writes them one tensor at a time, gathered as its writer reaches each): ordinary folders, which a
resume with any number of processes reads before the model is sharded. A process that stops
answering ends the others (:class:`Watchdog`, ``--shard-timeout``) instead of a hang.
It is MLX's ``fully_shard`` (``mlx.nn.layers.distributed``) done in place: that wraps each block
in a module of its own (renaming its parameters) and shards along the first axis only.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlx_dft import files
from mlx_dft.adapters.base import REFERENCE_COPY
from mlx_dft.errors import UserError

MODES = ("none", "fsdp", "tensor")
_FULL = "_mlx_dft_full_shapes"  # on a module: {key: full shape} of its sharded arrays
_STATE = "_mlx_dft_sharding"  # on the model: its :class:`Sharding`


def check(mode: str, world: mx.distributed.Group) -> None:
    """Refuse a ``--shard`` this launch cannot do, in one line."""
    if mode not in MODES:
        raise UserError(f"unknown --shard {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "none":
        return
    if world.size() < 2:
        raise UserError(
            f"--shard {mode} needs a distributed launch of 2 or more processes (mlx.launch -n 2 ...); "
            "this is one process"
        )


def check_same_everywhere(world: mx.distributed.Group, parts: dict[str, str]) -> None:
    """Refuse, on every worker in one line, a launch whose workers differ in any of ``parts``
    (name -> what this worker has: versions, the model's config), before they train apart or
    wait on each other's collectives."""
    if world.size() < 2:
        return
    mine = mx.array([zlib.crc32(v.encode()) & 0x7FFFFFFF for v in parts.values()], mx.int32)
    every = mx.distributed.all_gather(mine[None], group=world, stream=mx.cpu).tolist()
    for i, name in enumerate(parts):
        ranks = [r for r, row in enumerate(every) if row[i] != every[0][i]]
        if ranks:
            raise UserError(
                f"the workers differ in {name} (rank {ranks[0]}'s is not rank 0's; this worker's: "
                f"{parts[name][:80]}): install and load the same on every machine"
            )


def of(model: nn.Module) -> Sharding | None:
    """The sharding of ``model`` while it is sharded, else None."""
    return getattr(model, _STATE, None)


# ------------------------------------------------------------------ one array


def _shard_of(a: mx.array, n: int, rank: int) -> mx.array:
    k = -(-a.size // n)
    flat = a.reshape(-1)
    if k * n != a.size:
        flat = mx.concatenate([flat, mx.zeros((k * n - a.size,), a.dtype)])
    return mx.contiguous(flat[rank * k : (rank + 1) * k])


def _unpad(full: mx.array, shape: tuple) -> mx.array:
    size = math.prod(shape)
    return (full if full.size == size else full[:size]).reshape(shape)


@functools.cache
def _trained_gather(shape: tuple, group: mx.distributed.Group) -> Callable:
    """all_gather of a trained shard; its vjp reduce-scatters the gradient (mean over workers)."""
    n = group.size()

    @mx.custom_function
    def gather(shard):
        return _unpad(mx.distributed.all_gather(shard, group=group), shape)

    @gather.vjp
    def gather_vjp(shard, cotangent, _):
        # all_sum and keep this worker's part: MLX 0.32's ring backend has no sum_scatter
        # ("[ring] sum_scatter not supported"), so its own fully_shard cannot train over ring.
        k, r = shard.size, group.rank()
        flat = cotangent.reshape(-1)
        part = mx.distributed.all_sum(flat, group=group)[r * k : (r + 1) * k]
        if part.size < k:  # this worker's shard ends in padding
            part = mx.concatenate([part, mx.zeros((k - part.size,), part.dtype)])
        return (part / n).astype(shard.dtype)

    return gather


def _gather(shard: mx.array, shape: tuple, group: mx.distributed.Group, trained: bool) -> mx.array:
    if trained:
        return _trained_gather(tuple(shape), group)(shard)
    return _unpad(mx.distributed.all_gather(shard, group=group), shape)


# ------------------------------------------------------------------ blocks


def _own_arrays(m: nn.Module) -> Iterator[str]:
    """The keys of ``m``'s own parameters (arrays directly on it, not its children's)."""
    for k, v in m.items():
        if isinstance(v, mx.array) and not k.startswith("_"):
            yield k
        elif isinstance(v, (list, dict)) and not k.startswith("_"):
            leaves = tree_flatten(v, is_leaf=lambda x: isinstance(x, nn.Module))
            if any(isinstance(x, mx.array) for _, x in leaves):
                raise UserError(f"--shard fsdp: {type(m).__name__}.{k} holds arrays in a {type(v).__name__}")


@contextmanager
def _gathered_block(block: nn.Module, group: mx.distributed.Group) -> Iterator[None]:
    """While it lasts, ``block``'s sharded arrays are whole (its modules as they are now: an
    adapter switched off has put the base linears back in place)."""
    held = []
    for m in block.modules():
        full = getattr(m, _FULL, None)
        if not full:
            continue
        for k in list(_own_arrays(m)):
            if k in full:
                held.append((m, k, m[k]))
                m[k] = _gather(m[k], full[k], group, k not in m._no_grad)
    try:
        yield
    finally:
        for m, k, shard in held:
            m[k] = shard


@functools.cache
def _gathering_class(cls: type) -> type:
    """``cls`` whose call gathers the block's parameters first (the signature kept, for the
    patches that read it)."""
    def gathering(method):
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            with _gathered_block(self, self._mlx_dft_group):
                return method(self, *args, **kwargs)

        return run

    # Its module and name the original's: code that finds a block's mlx-lm module reads them.
    methods = {
        "__call__": gathering(cls.__call__),
        "_mlx_dft_sharded_from": cls,
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
    }
    if hasattr(cls, "as_linear"):  # a tied embedding is the output projection too
        methods["as_linear"] = gathering(cls.as_linear)
    return type(cls.__name__, (cls,), methods)


# The modules outside the blocks that shard too: their weights are read only by their own calls.
_LEAVES = (nn.Embedding, nn.Linear, nn.RMSNorm, nn.LayerNorm)


class Sharding:
    """The FSDP state of a model: its sharded modules (the blocks and the plain layers outside
    them) and the paths of their parameters."""

    def __init__(self, model: nn.Module, group: mx.distributed.Group):
        self.group = group
        inside = {id(m) for b in model.layers for m in b.modules()}
        # The blocks, then the plain embeddings, norms and projections outside them (anything
        # else there, such as the Aligner's prefix, which attention reads, stays whole).
        leaves = {id(m): m for _, m in model.named_modules() if id(m) not in inside and type(m) in _LEAVES}
        leaves = list(leaves.values())  # a module reached twice shards once
        self.blocks = [*model.layers, *leaves]
        names = {id(m): f"{name}." for name, m in model.named_modules()}
        self.prefixes = [names[id(b)] for b in self.blocks]
        self.paths = {k for k, _ in tree_flatten(model.parameters()) if k.startswith(tuple(self.prefixes))}

    # -------------------------------------------------------------- the step's gradients

    def split(self, grads: dict) -> tuple[list, list]:
        flat = tree_flatten(grads)
        return [(k, g) for k, g in flat if k in self.paths], [(k, g) for k, g in flat if k not in self.paths]

    def average(self, grads: dict) -> dict:
        """The replicated parameters' gradients averaged over the workers; the sharded ones were
        reduce-scattered (averaged) by the blocks' gathers already."""
        sharded, replicated = self.split(grads)
        if replicated:
            replicated = tree_flatten(average_gradients(tree_unflatten(replicated)))
        return tree_unflatten(sharded + replicated)

    def clip(self, grads: dict, max_norm: float) -> tuple[dict, mx.array]:
        """``optim.clip_grad_norm`` over the whole gradient: the shards' squares summed over the
        workers, the replicated arrays' counted once."""
        sharded, replicated = self.split(grads)
        local = sum((g.astype(mx.float32) ** 2).sum() for _, g in sharded) if sharded else mx.array(0.0)
        total = mx.distributed.all_sum(local, group=self.group)
        if replicated:
            total = total + sum((g.astype(mx.float32) ** 2).sum() for _, g in replicated)
        norm = mx.sqrt(total)
        if max_norm <= 0:
            return grads, norm
        normalizer = max_norm / (norm + 1e-6)
        return tree_map(lambda g: mx.where(norm < max_norm, g, g * normalizer), grads), norm

    # -------------------------------------------------------------- arrays in and out

    def _arrays(self) -> Iterator[tuple[nn.Module, str]]:
        for b in self.blocks:
            for m in b.modules():
                for k in getattr(m, _FULL, {}):
                    yield m, k

    def _optimizer_leaves(self, optimizer: optim.Optimizer) -> Iterator[tuple[dict, str, tuple]]:
        """(container, key, full shape) of each optimizer-state array of a sharded parameter."""
        shapes = self.full_shapes()
        for path, _ in tree_flatten(optimizer.state):
            param = path.rsplit(".", 1)[0]
            if param in shapes:
                *where, key = path.split(".")
                node = optimizer.state
                for part in where:
                    node = node[int(part)] if isinstance(node, list) else node[part]
                yield node, key, shapes[param]

    def full_shapes(self) -> dict[str, tuple]:
        names = {}
        for b, prefix in zip(self.blocks, self.prefixes):
            for name, m in b.named_modules():
                for k, shape in getattr(m, _FULL, {}).items():
                    names[f"{prefix}{name + '.' if name else ''}{k}"] = shape
        return names

    def shard(self, model: nn.Module, optimizer: optim.Optimizer) -> None:
        """Shard the model and the optimizer's state, checking that the sharded model computes
        what the whole one did on a few tokens (a model that reads a weight outside its module's
        call would not)."""
        n, r = self.group.size(), self.group.rank()
        probe = mx.array([[1, 2, 3, 4, 5, 6, 7, 8]])
        was_training = model.training
        model.eval()
        before = model(probe).astype(mx.float32)
        mx.eval(before)
        for b in self.blocks:
            for m in b.modules():
                keys = list(_own_arrays(m))
                object.__setattr__(m, _FULL, {k: tuple(m[k].shape) for k in keys})
                for k in keys:
                    m[k] = _shard_of(m[k], n, r)
            object.__setattr__(b, "_mlx_dft_group", self.group)
            b.__class__ = _gathering_class(type(b))
        for node, key, _ in self._optimizer_leaves(optimizer):
            node[key] = _shard_of(node[key], n, r)
        # --reference-copy's initial weights: a block gathers what the switch swaps in as it
        # gathers its own, so the copy shards the same way (each array flattened, padded, split).
        copy = getattr(model, REFERENCE_COPY, None) or []
        self.copy_shapes = [{k: tuple(a.shape) for k, a in tree_flatten(tree)} for tree in copy]
        copy[:] = [tree_map(lambda a: _shard_of(a, n, r), tree) for tree in copy]
        object.__setattr__(model, _STATE, self)
        mx.eval(copy)
        mx.eval(model.parameters(), optimizer.state)
        try:
            after = model(probe).astype(mx.float32)
            same = bool(mx.allclose(before, after, rtol=1e-3, atol=1e-3).item())
        except ValueError as e:  # a weight read outside a call: shapes that do not fit
            same, why = False, str(e).splitlines()[0]
        else:
            why = f"its logits moved by up to {float(mx.abs(before - after).max()):.3g}"
        model.train(was_training)
        if not same:
            raise UserError(f"--shard fsdp cannot shard this {type(model).__module__} model: {why}")

    def unshard(self, model: nn.Module, optimizer: optim.Optimizer) -> None:
        """The whole weights back on every worker (what follows training reads the model); the
        optimizer keeps its step and learning rate but drops the moments of the parameters, whose
        whole copy would cost more than training did (the last checkpoint holds it). The moments
        go first, then one array is gathered at a time: the peak is the whole weights."""
        optimizer.state = {k: v for k, v in optimizer.state.items() if isinstance(v, mx.array)}
        copy = getattr(model, REFERENCE_COPY, None) or []
        for i, (tree, shapes) in enumerate(zip(copy, self.copy_shapes)):
            whole = [(k, _gather(a, shapes[k], self.group, False)) for k, a in tree_flatten(tree)]
            mx.eval([a for _, a in whole])
            copy[i] = tree_unflatten(whole)
        for m, k in list(self._arrays()):
            m[k] = _gather(m[k], getattr(m, _FULL)[k], self.group, False)
            mx.eval(m[k])
        for b in self.blocks:
            for m in b.modules():
                object.__setattr__(m, _FULL, {})
            b.__class__ = b._mlx_dft_sharded_from
        object.__delattr__(model, _STATE)

    def wrap_saver(self, optimizer: optim.Optimizer) -> Callable:
        """``wrap(save)``: ``save`` as :meth:`save` runs it (None stays None)."""

        def wrap(save: Callable | None) -> Callable | None:
            return None if save is None else functools.partial(self.save, save, optimizer)

        return wrap

    def _ask(self, what: int) -> int:
        """Rank 0's word to the others while it saves: the tensor it wants (its number + 1), 0 when
        it is done, -1 when it failed (a collective: the others say 0)."""
        mine = what if self.group.rank() == 0 else 0
        return int(mx.distributed.all_sum(mx.array(mine), group=self.group, stream=mx.cpu).item())

    def save(self, save: Callable, optimizer: optim.Optimizer, *args, **kwargs):
        """``save(*args, **kwargs)`` writing whole arrays, no process ever holding more than one of
        them whole (a collective: every worker calls it). Rank 0 writes: its trained parameters and
        optimizer state stand as placeholders of their whole shapes, each fetched as the file
        writer reaches it (:data:`mlx_dft.files.DEFERRED`): it asks the others for that tensor,
        all gather it, it is written and dropped. The others serve its asks until it is done."""
        items = [(m, k, getattr(m, _FULL)[k]) for m, k in self._arrays() if k not in m._no_grad]
        items += list(self._optimizer_leaves(optimizer))
        shards = [node[key] for node, key, _ in items]

        def whole(i: int) -> mx.array:
            full = _gather(shards[i], items[i][2], self.group, False)
            mx.eval(full)
            beat()
            return full

        if self.group.rank() != 0:
            out = save(*args, **kwargs)
            while (said := self._ask(0)) > 0:
                whole(said - 1)
            if said < 0:
                n = self.group.size()
                raise UserError(f"process 0 of {n} could not write the checkpoint (its message says why)")
            return out

        def fetch(i: int) -> mx.array:
            self._ask(i + 1)
            return whole(i)

        stands = []
        for i, (node, key, shape) in enumerate(items):
            stand = mx.zeros(shape, shards[i].dtype)  # lazy: never computed, only its shape is read
            files.DEFERRED[id(stand)] = functools.partial(fetch, i)
            stands.append(stand)
            node[key] = stand
        done = -1
        try:
            out = save(*args, **kwargs)
            done = 0
            return out
        finally:
            for (node, key, _), shard, stand in zip(items, shards, stands):
                node[key] = shard
                files.DEFERRED.pop(id(stand), None)
            self._ask(done)


# ------------------------------------------------------------------ a process that stops answering

_WATCHING: list[Watchdog] = []


def beat() -> None:
    """Tell the watchdog of a sharded run, if one watches, that this process has just heard from
    the others (a step, a validation batch, a tensor of a checkpoint went through)."""
    for w in _WATCHING:
        w.last = time.monotonic()


class Watchdog:
    """While it lasts, a thread of this process ends it (one line, exit 1) when :func:`beat` has
    not been called for ``seconds``: MLX's ring backend waits forever for a process that stopped
    answering (a machine that dropped out or hangs), so each of the others says so and exits
    instead (before the first beat it waits 3 times as long: the first step compiles). What was
    written stays: checkpoints are written whole or not at all."""

    def __init__(self, seconds: float, group: mx.distributed.Group):
        self.seconds, self.group = seconds, group
        self.last = time.monotonic()
        self.done = threading.Event()

    def __enter__(self) -> Watchdog:
        if self.seconds > 0:
            _WATCHING.append(self)
            threading.Thread(target=self._watch, name="mlx_dft-shard-watchdog", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        if self in _WATCHING:
            _WATCHING.remove(self)

    def _watch(self) -> None:
        start = self.last
        while not self.done.wait(min(1.0, self.seconds / 4)):
            # Until the first beat, 3 times as long: the first step compiles on every process.
            limit = self.seconds * (3 if self.last == start else 1)
            if time.monotonic() - self.last > limit:
                r, n = self.group.rank(), self.group.size()
                sys.stderr.write(
                    f"error: rank {r} of {n}: nothing from the other processes for {limit:g} s "
                    "(--shard-timeout): one of them stopped answering (a machine dropped out or hangs); "
                    "the checkpoints written are kept: continue with --resume\n"
                )
                sys.stderr.flush()
                os._exit(1)


@contextmanager
def sharded(
    mode: str, model: nn.Module, optimizer: optim.Optimizer, timeout: float = 600.0
) -> Iterator[Callable]:
    """While it lasts, ``model`` and ``optimizer`` are sharded as ``--shard`` asks (nothing for
    ``none``); yields ``wrap(save)``, which makes a checkpoint saver write whole arrays. When
    training ends well every worker holds the whole model again (for what follows training:
    tests, generation); after an error the model stays sharded."""
    if mode == "none":
        yield lambda save: save
        return
    world = mx.distributed.init()
    check(mode, world)
    if mode == "tensor":
        from mlx_dft import tensor_parallel

        with tensor_parallel.sharded(model, optimizer, world) as wrap:
            yield wrap
        return
    with Watchdog(timeout, world):
        state = Sharding(model, world)
        state.shard(model, optimizer)
        yield state.wrap_saver(optimizer)
        # Only when training ended well: gathering is a collective that the workers must all join,
        # and a worker that failed alone (a callback's error on rank 0) would wait for the others.
        state.unshard(model, optimizer)
