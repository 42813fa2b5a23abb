"""The training loop: compiled step, gradient accumulation, data parallelism, validation,
checkpoints, reports.

Gradients are gradients of loss *sums*; an optimizer step divides the accumulated sum by
the supervised-token count of all its micro-batches on all workers, which is exactly the
update of one big batch (the official DFT code divides per micro-batch instead).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_map

from mlx_dft import sharding, tensor_parallel
from mlx_dft.checkpoint import load_previous
from mlx_dft.data import Batch, Dataset, eval_batches, iterate_batches
from mlx_dft.errors import UserError
from mlx_dft.losses import SFT, Loss, LossSums, auto_chunk_tokens, chunked_terms, detached_ce, loss_sums
from mlx_dft.models import split_model, vocab_size
from mlx_dft.patches import (
    StandIn,
    chunked_gated_delta,
    gradient_checkpointing,
    lean_swiglu,
    tiled_mlp,
    wrapped_blocks,
)
from mlx_dft.progress import Progress

if TYPE_CHECKING:
    from mlx_dft.adapters.base import AdapterOff


class Callback:
    """Hooks into a run. ``on_*_report`` may return a dict of extra metrics to record; any hook
    may end the run early with ``run.stop(why)`` (it stops after the current step, with a
    checkpoint of it and its adapter saved, so ``--resume`` continues it). A hook that raises ends
    the run with a one-line error naming the hook; what the run saved before stays."""

    def on_train_report(self, metrics: dict, run: Run) -> dict | None:
        return None

    def on_val_report(self, metrics: dict, run: Run) -> dict | None:
        return None

    def on_checkpoint(self, path: Path, run: Run) -> None:
        return None

    def on_train_end(self, run: Run) -> None:
        return None


class NonFiniteLoss(UserError):
    pass


@dataclass
class LoopConfig:
    total_steps: int
    batch_size: int
    grad_accumulation_steps: int = 1
    steps_per_report: int = 10
    steps_per_eval: int = 100
    val_batches: int = 25
    save_every: int = 100
    max_grad_norm: float = 1.0
    seed: int = 0
    sft_warmup_steps: int = 0  # optimizer steps 1..N use the warm-up (plain SFT) loss

    @classmethod
    def from_options(cls, cfg, total_steps: int) -> LoopConfig:
        """The loop settings of a :class:`~mlx_dft.config.TrainConfig` for a run of ``total_steps``
        (validation every tenth of the run unless ``steps_per_eval`` says otherwise)."""
        every = cfg.steps_per_eval or max(1, total_steps // 10)
        return cls(
            total_steps=total_steps,
            batch_size=cfg.batch_size,
            grad_accumulation_steps=cfg.grad_accumulation_steps,
            steps_per_report=cfg.steps_per_report,
            steps_per_eval=every,
            val_batches=cfg.val_batches or auto_val_batches(total_steps, every, cfg.grad_accumulation_steps),
            save_every=cfg.save_every,
            max_grad_norm=cfg.max_grad_norm,
            seed=cfg.seed,
            sft_warmup_steps=cfg.sft_warmup_steps,
        )


def auto_val_batches(
    total_steps: int, steps_per_eval: int, accumulation: int = 1, share: float = 0.25
) -> int:
    """Batches per validation when not given: all validations of the run (at step 0, every
    ``steps_per_eval`` and at the end) together ``share`` of its training batches, 2 to 25 each, so
    validation never dominates a short run and long runs validate on 25 batches as mlx-lm does."""
    validations = 2 + total_steps // steps_per_eval
    return min(25, max(2, round(share * total_steps * accumulation / validations)))


@dataclass
class Run:
    """What callbacks see, and what a finished run hands back."""

    model: nn.Module
    tokenizer: object
    config: object
    output: Path | None
    step: int = 0
    rank: int = 0
    world_size: int = 1
    history: list[dict] = field(default_factory=list)
    last_checkpoint: Path | None = None
    stopped: str | None = None  # why the run ended before its last step (:meth:`stop`), if it did

    def stop(self, why: str = "a callback asked") -> None:
        """End the run after the current optimizer step (from a callback)."""
        self.stopped = why

    def latest(self, key: str):
        for rec in reversed(self.history):
            if key in rec:
                return rec[key]
        return None


def make_loss_fn(
    body: Callable,
    head,
    fast: bool,
    loss: Loss,
    chunk_tokens: int,
    adapter_off: AdapterOff | None = None,
):
    """loss(model, inputs, positions, targets, valid[, segments], old_ce=None) -> :class:`LossSums`
    (objective, ce, prob, tokens, parts); ``segments`` (packed rows) makes attention block-diagonal
    (:func:`mlx_dft.patches.wrapped_blocks`); ``old_ce`` [N] is the previous policy's cross-entropy
    of the targets, for a loss that needs it (PSFT; None: the current policy's);
    the MLPs use the SwiGLU with the leaner backward pass (:func:`mlx_dft.patches.lean_swiglu`), and
    gated-delta layers the chunked recurrence (:func:`mlx_dft.patches.chunked_gated_delta`);
    blocks are recomputed in the backward pass when the model asks for gradient checkpointing.
    The function's ``parts`` attribute names the parts (``loss.parts``); its ``state`` lists the
    arrays it reads besides the model's (a compiled function takes them as inputs); its
    ``token_ce(model, inputs, positions, targets, valid[, segments])`` is the targets'
    cross-entropy [N] without gradient (the previous policy's, computed by :class:`PreviousPolicy`).

    For a loss with a reference (ASFT, PriFT) the body runs a second time inside ``adapter_off()``
    (the method's switch to the base model,
    :meth:`~mlx_dft.adapters.base.AdapterMethod.adapter_off`), without gradient, from the first
    block the adapter changes on (see :func:`_policy_and_reference`): the reference hidden states
    at the supervised positions, turned into logits chunk by chunk with the policy's. The
    head is shared: no method adapts it.
    """
    if loss.needs_reference and adapter_off is None:
        raise ValueError(f"the {loss.name} loss needs the adapter's switch to the base model")

    def at_positions(out: mx.array, positions: mx.array) -> mx.array:
        return mx.take(out.reshape(-1, out.shape[-1]), positions, axis=0)

    def loss_fn(model, inputs, positions, targets, valid, segments=None, old_ce=None) -> LossSums:
        checkpoint = gradient_checkpointing(model)
        blocks = wrapped_blocks(body, segments, checkpoint, tiled_mlp(model))
        with blocks, lean_swiglu(model), chunked_gated_delta(model):
            if loss.needs_reference:
                first = adapter_off.first_layer if fast else 0
                out, ref = _policy_and_reference(body, inputs, adapter_off, first)
                ref_h = mx.stop_gradient(at_positions(ref, positions))
            else:
                out, ref_h = body(inputs), None
        h = at_positions(out, positions)
        chunk = chunk_tokens if fast else 0
        return loss_sums(chunked_terms(head, h, targets, chunk, loss, ref_h, old_ce), valid)

    def token_ce(model, inputs, positions, targets, valid, segments=None) -> mx.array:
        with wrapped_blocks(body, segments, False), lean_swiglu(model), chunked_gated_delta(model):
            out = body(inputs)
        return detached_ce(head, at_positions(out, positions), targets, chunk_tokens if fast else 0)

    loss_fn.parts = tuple(loss.parts)
    loss_fn.loss = loss
    loss_fn.state = adapter_off.state if loss.needs_reference else []
    loss_fn.token_ce = token_ce
    return loss_fn


def _policy_and_reference(
    body: Callable, inputs: mx.array, adapter_off: AdapterOff, first: int
) -> tuple[mx.array, mx.array]:
    """``body(inputs)`` as it is, and inside ``adapter_off()``.

    Blocks before ``first`` compute the same either way, so with ``first`` > 0 the reference pass
    reuses their output: the adapted pass records the input of block ``first``, and in the
    reference pass the blocks before it stand in, returning that input (detached). The body must
    call its ``layers`` in turn on the hidden state, as the architectures with a hidden-state path
    (:func:`mlx_dft.models.split_model`) do; ``first`` = 0 runs the whole body twice.
    """
    layers = getattr(body, "layers", None)
    if not isinstance(layers, list):
        out = body(inputs)
        with adapter_off():
            return out, body(inputs)
    first = max(first, 0)
    block, seen = layers[first], {}

    def record(x, *args, **kwargs):
        seen["x"] = x
        return block(x, *args, **kwargs)

    layers[first] = StandIn(block, record)
    try:
        out = body(inputs)
    finally:
        layers[first] = block
    # A distinct array (equal values): MLX 0.32's compile fails ("_Map_base::at") on a graph that
    # runs a gated-delta layer twice on one input array (qwen3_5, qwen3_next; tests/
    # test_architectures.py keeps the stock reproduction), and with ``first`` = 0 both passes would.
    x = mx.stop_gradient(seen["x"]) + 0.0
    before = layers[: first + 1]
    with adapter_off():
        stand_ins = [StandIn(b, lambda *args, **kwargs: x) for b in before[:-1]]
        at_first = StandIn(block, lambda _, *args, **kwargs: block(x, *args, **kwargs))
        layers[: first + 1] = [*stand_ins, at_first]
        try:
            ref = body(inputs)
        finally:
            layers[: first + 1] = before
    return out, ref


def model_loss_fn(
    model: nn.Module,
    loss: Loss,
    chunk_tokens: int = 0,
    adapter_off: AdapterOff | None = None,
) -> Callable:
    """``make_loss_fn`` for ``model``: logits from hidden states at supervised positions where the
    architecture allows (see :func:`mlx_dft.models.split_model`), ``chunk_tokens`` per logits
    chunk (0: about 32 MiB of float32 logits a chunk)."""
    vocab = vocab_size(model)
    why = loss.check_vocabulary(vocab)
    if why:
        raise UserError(why)
    body, head, fast = split_model(model)
    chunk = chunk_tokens or auto_chunk_tokens(vocab)
    return make_loss_fn(body, head, fast, loss, chunk, adapter_off)


def run_loss_fns(model: nn.Module, cfg, method, loss: Loss | None = None) -> tuple[Callable, Callable | None]:
    """The loss function of a :class:`~mlx_dft.config.TrainConfig` (``loss``, else its ``--loss``
    and that loss's options; also the validation loss) and, with ``--sft-warmup-steps``, the
    plain-SFT one of the first steps.

    Call it once the adapter is applied and before any trained weights are loaded: the reference
    of a loss that has one (ASFT, PriFT) is ``method``'s adapter switched off, and a method that
    needs a copy of the initial weights for it (full fine-tuning, with ``--reference-copy``) takes
    that copy now.
    """
    from mlx_dft.config import loss_of

    loss = loss if loss is not None else loss_of(cfg)
    off = method.adapter_off(model, cfg.reference_copy) if loss.needs_reference else None
    loss_fn = model_loss_fn(model, loss, cfg.loss_chunk_tokens, off)
    if not cfg.sft_warmup_steps:
        return loss_fn, None
    return loss_fn, model_loss_fn(model, SFT(), cfg.loss_chunk_tokens)


def build_optimizer(
    name: str,
    lr: float,
    schedule: str,
    warmup_steps: int,
    total_steps: int,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
    warmup_init: float = 0.0,
    min_lr: float = 0.0,
    decay_steps: int | None = None,
) -> optim.Optimizer:
    """``name`` with a rate that warms up linearly from ``warmup_init`` to ``lr`` over ``warmup_steps``,
    then decays (cosine or linear) to ``min_lr`` over ``decay_steps`` (default: the rest of the run)
    and stays there; ``constant`` keeps ``lr``. As mlx-lm's ``lr_schedule`` block builds it."""
    decay_steps = decay_steps or max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        main = optim.cosine_decay(lr, decay_steps, min_lr)
    elif schedule == "linear":
        main = optim.linear_schedule(lr, min_lr, decay_steps)
    else:
        main = optim.linear_schedule(lr, lr, 1)
    sched = (
        optim.join_schedules([optim.linear_schedule(warmup_init, lr, warmup_steps), main], [warmup_steps])
        if warmup_steps > 0
        else main
    )
    if name == "adamw":
        return optim.AdamW(learning_rate=sched, betas=list(betas), weight_decay=weight_decay)
    if name == "adam":
        return optim.Adam(learning_rate=sched, betas=list(betas))
    if name == "sgd":
        return optim.SGD(learning_rate=sched, weight_decay=weight_decay)
    raise UserError(f"unknown optimizer {name!r}")


def optimizer_for(cfg, total_steps: int) -> optim.Optimizer:
    """The optimizer and learning-rate schedule a :class:`~mlx_dft.config.TrainConfig` asks for."""
    from mlx_dft.config import warmup_steps

    return build_optimizer(
        cfg.optimizer,
        cfg.resolved_learning_rate(),
        cfg.lr_schedule,
        warmup_steps(cfg, total_steps),
        total_steps,
        cfg.resolved_weight_decay(),
        (cfg.adam_beta1, cfg.adam_beta2),
        cfg.warmup_init,
        cfg.min_learning_rate,
        cfg.decay_steps,
    )


_EVAL_FNS: dict = {}


def _eval_fn(model: nn.Module, loss_fn: Callable) -> Callable:
    """The compiled evaluation of ``loss_fn`` on ``model``, built once per (model, loss) so that
    repeated validations reuse the traces of the batch shapes they have already seen."""
    key = (id(model), id(loss_fn))
    if key not in _EVAL_FNS:
        _EVAL_FNS.clear()  # one live run at a time is the common case: do not hold old models
        inputs = [model.state, getattr(loss_fn, "state", [])]
        _EVAL_FNS[key] = mx.compile(lambda *arrays: loss_fn(model, *arrays).stacked(), inputs=inputs)
    return _EVAL_FNS[key]


def evaluate(
    model: nn.Module,
    loss_fn: Callable,
    dataset: Dataset,
    batch_size: int,
    num_batches: int = -1,
    world: mx.distributed.Group | None = None,
    progress: Callable | None = None,
) -> dict:
    """Mean objective, cross-entropy, target probability, perplexity and the loss's parts
    (``loss_fn.parts``) over supervised tokens."""
    world = world or mx.distributed.init()
    was_training = model.training
    model.eval()
    parts = getattr(loss_fn, "parts", ())
    sums = mx.zeros((4 + len(parts),))
    compiled = _eval_fn(model, loss_fn)
    for batch in eval_batches(dataset, batch_size, world.rank(), world.size(), num_batches):
        sums = sums + compiled(*batch.arrays())
        mx.eval(sums)
        sharding.beat()
        if progress:
            progress()
    if world.size() > 1:
        sums = mx.distributed.all_sum(sums, stream=mx.cpu)
    obj, ce, prob, n, *part_sums = (float(x) for x in sums.tolist())
    if was_training:
        model.train()
    n = max(n, 1.0)
    return {
        "loss": obj / n,
        "ce": ce / n,
        "prob": prob / n,
        "ppl": math.exp(min(ce / n, 50.0)),
        "tokens": int(n),
        **{name: s / n for name, s in zip(parts, part_sums)},
    }


def make_step(model: nn.Module, optimizer: optim.Optimizer, loss_fn: Callable, max_grad_norm: float = 1.0):
    """A compiled micro-step and the state it updates.

    ``step_fn(arrays, acc, acc_n, do_update, old_ce=None)``, ``arrays`` a :meth:`Batch.arrays`
    tuple (and ``old_ce`` the previous policy's cross-entropy of its targets, for a loss that needs
    one), adds this micro-batch's gradient of the loss *sum* to ``acc`` (``None`` for the first),
    and with ``do_update`` divides the total by the supervised-token count of every micro-batch on
    every worker, clips, and applies the optimizer. Returns (metric sums [objective, ce,
    prob, tokens, *parts], acc, acc_n, grad_norm).
    """
    world_size = tensor_parallel.data_group(model, mx.distributed.init()).size()
    state = [model.state, optimizer.state, mx.random.state]
    loss_vg = nn.value_and_grad(model, loss_fn)
    # --shard fsdp: the blocks' gradients come reduce-scattered; tensor: split, one replica
    shards = sharding.of(model) or tensor_parallel.of(model)

    def update(grads, ntoks):
        if world_size > 1:
            grads = shards.average(grads) if shards else average_gradients(grads)  # mean over workers ...
            ntoks = mx.distributed.all_sum(ntoks) / world_size  # ... over the mean count
        elif shards is not None:  # --shard tensor: one replica, its whole parameters' gradients
            grads = shards.average(grads)
        grads = tree_map(lambda g: g / mx.maximum(ntoks, 1.0), grads)
        if shards is not None:  # the norm of the whole gradient, its shards' over the workers
            grads, norm = shards.clip(grads, max_grad_norm)
        elif max_grad_norm > 0:
            grads, norm = optim.clip_grad_norm(grads, max_grad_norm)
        else:
            norm = mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for _, g in tree_flatten(grads)))
        optimizer.update(model, grads)
        return norm

    @partial(mx.compile, inputs=[*state, getattr(loss_fn, "state", [])], outputs=state)
    def step_fn(arrays, acc, acc_n, do_update, old_ce=None):
        sums, grads = loss_vg(model, *arrays) if old_ce is None else loss_vg(model, *arrays, old_ce=old_ce)
        n = n_total = sums.tokens
        if acc is not None:
            grads = tree_map(mx.add, grads, acc)
            n_total = n + acc_n
        metrics = sums.stacked()
        if do_update:
            return metrics, None, None, update(grads, n_total)
        return metrics, grads, n_total, None

    if shards is not None:
        # --shard fsdp: the update outside the compiled graph, where MLX writes the new weights and
        # moments into the old ones' buffers (compiled, both are held at once: a second copy of
        # the state, the largest part of a sharded step's peak).
        gradient_fn = step_fn

        def step_fn(arrays, acc, acc_n, do_update, old_ce=None):
            metrics, grads, n_total, _ = gradient_fn(arrays, acc, acc_n, False, old_ce)
            if do_update:
                return metrics, None, None, update(grads, n_total)
            return metrics, grads, n_total, None

    return step_fn, state


def optimizer_step(step_fn, state, batches: list[Batch], old_ce: list[mx.array] | None = None):
    """One optimizer step over ``batches`` (micro-batches, and the previous policy's cross-entropy
    of each one's targets where the loss needs it); returns (metric sums, grad norm)."""
    acc = acc_n = total = None
    for k, batch in enumerate(batches):
        old = old_ce[k] if old_ce is not None else None
        metrics, acc, acc_n, norm = step_fn(batch.arrays(), acc, acc_n, k == len(batches) - 1, old)
        total = metrics if total is None else total + metrics
        mx.eval(state, total, acc, acc_n, norm)
    return total, norm


class PreviousPolicy:
    """The previous policy of a loss that needs one (PSFT): the targets' cross-entropy under the
    weights at the start of a group of optimizer steps, for the micro-batches of the group's steps.

    The steps after the SFT warm-up are grouped by number, ``size`` at a time (``warmup`` + 1 to
    ``warmup`` + ``size``, and so on), so a resumed run groups as the uninterrupted one does. At a
    group's first step the micro-batches of its other steps are drawn ahead (the same ones those
    steps would draw) and their cross-entropy is computed under the current weights, without
    gradient and in eval mode (no dropout: no random draw, which a resume could not replay). The
    first step's own previous policy is the current one: its loss gets no ``old_ce`` (its ratio is 1
    exactly, its gradient SFT's).

    :meth:`state` is what a checkpoint written inside a group keeps (the steps not yet trained),
    :meth:`restore` reads it back. A step with none that fits (a checkpoint without it, other
    batches) starts a partial group: its own previous policy is the current weights, the group's
    later steps get theirs from it.
    """

    def __init__(
        self, model: nn.Module, loss_fn: Callable, size: int, warmup: int, accum: int, total_steps: int,
        note: Callable[[str], None] = print,
    ):  # fmt: skip
        self.model, self.size, self.warmup, self.accum, self.total = model, size, warmup, accum, total_steps
        self.note = note
        self.ce = mx.compile(lambda *arrays: loss_fn.token_ce(model, *arrays), inputs=[model.state])
        self.ahead: dict[int, list[Batch]] = {}  # step -> its micro-batches, drawn at the group's start
        self.pending: dict[int, list[mx.array]] = {}  # step -> old CE [N] of each of its micro-batches

    def starts_group(self, step: int) -> bool:
        return (step - self.warmup - 1) % self.size == 0

    def group_end(self, step: int) -> int:
        """The last step of ``step``'s group (within the run)."""
        return min(self.total, step + self.size - 1 - (step - self.warmup - 1) % self.size)

    def take(self, step: int, batches: Iterator[Batch]) -> tuple[list[Batch], list[mx.array] | None]:
        """Step ``step``'s micro-batches and their previous policy's CE (None: the current weights)."""
        micro = self.ahead.pop(step, None) or [next(batches) for _ in range(self.accum)]
        old = self.pending.pop(step, None)
        if old is not None and [o.shape for o in old] == [b.targets.shape for b in micro]:
            return micro, old
        if not self.starts_group(step):
            self.note(
                f"note: no saved previous policy fits steps {step}-{self.group_end(step)} of this "
                f"psft group: the weights at step {step} take its place"
            )
        self.pending.clear()
        self._draw(step, batches)
        return micro, None

    def _draw(self, step: int, batches: Iterator[Batch]) -> None:
        """Draw the micro-batches of the group's steps after ``step`` and compute their old CE."""
        training = self.model.training
        self.model.eval()
        try:
            for later in range(step + 1, self.group_end(step) + 1):
                micro = [next(batches) for _ in range(self.accum)]
                self.ahead[later] = micro
                self.pending[later] = [self.ce(*b.arrays()) for b in micro]
                mx.eval(self.pending[later])
        finally:
            if training:
                self.model.train()

    def state(self, world: mx.distributed.Group) -> dict[str, mx.array]:
        """The old CE of the steps not yet trained, named ``step.micro.rank``, every worker's (a
        collective: all workers call it, each gets them all)."""
        out = {}
        for step in sorted(self.pending):
            for k, old in enumerate(self.pending[step]):
                if world.size() == 1:
                    out[f"{step}.{k}.0"] = old
                    continue
                sizes = mx.distributed.all_gather(mx.array([old.shape[0]]), stream=mx.cpu)
                longest = int(sizes.max().item())
                padded = mx.pad(old, (0, longest - old.shape[0]))
                every = mx.distributed.all_gather(padded, stream=mx.cpu).reshape(world.size(), longest)
                for r, n in enumerate(sizes.tolist()):
                    out[f"{step}.{k}.{r}"] = every[r, :n]
                mx.eval(every)  # on every worker now: only the writer would evaluate it later
        return out

    def restore(self, saved: dict[str, mx.array] | None, start_step: int, rank: int, world_size: int) -> None:
        """This worker's old CE from a checkpoint's :meth:`state` (of the same number of workers)."""
        found: dict[int, dict[int, mx.array]] = {}
        ranks = set()
        for key, old in (saved or {}).items():
            step, k, r = (int(x) for x in key.split("."))
            ranks.add(r)
            if r == rank and step > start_step:
                found.setdefault(step, {})[k] = old
        if ranks != set(range(world_size)):  # saved by another number of workers: other batches
            found = {}
        self.pending = {step: [ks[k] for k in sorted(ks)] for step, ks in found.items()}


def _validates(step: int, loop: LoopConfig) -> bool:
    return step % loop.steps_per_eval == 0 or step == loop.total_steps


# Report-line fields: (key, label, format, priority); the lowest priorities go first when a line
# would pass 80 columns (every value stays in metrics.jsonl).
_FIELDS = (
    ("train_loss", "loss", ".4f", 9),
    ("train_ce", "ce", ".3f", 8),
    ("train_prob", "p", ".3f", 8),
    ("val_loss", "val loss", ".4f", 9),
    ("val_ce", "ce", ".3f", 8),
    ("val_prob", "p", ".3f", 8),
    ("learning_rate", "lr", ".1e", 3),
    ("grad_norm", "|g|", ".2f", 2),
    ("tokens_per_sec", "tok/s", ",.0f", 6),
    ("peak_memory_gb", "GB", ".2f", 4),
)


def _fields(parts: dict[str, str]) -> tuple:
    """:data:`_FIELDS` with the loss's parts (name -> label) after each split's probability."""
    out = []
    for field_ in _FIELDS:
        out.append(field_)
        split = field_[0].split("_")[0]
        if field_[0].endswith("_prob"):
            out += [(f"{split}_{name}", label, ".4f", 7) for name, label in parts.items()]
    return tuple(out)


def _fmt(rec: dict, width: int = 80, fields: tuple = _FIELDS) -> str:
    """One report line of at most ``width`` columns: step, then the values by importance."""
    items = []
    for key, label, f, prio in fields:
        if key in rec:
            value = f"{rec[key]:{f}}"
            items.append((prio, f"{value} {label}" if label in ("tok/s", "GB") else f"{label} {value}"))
    head = f"step {rec['step']}"
    while items:
        line = " | ".join([head, *(text for _, text in items)])
        if len(line) <= width:
            return line
        items.remove(min(items, key=lambda it: it[0]))
    return head


def train_loop(
    model: nn.Module,
    optimizer: optim.Optimizer,
    loss_fn: Callable,
    train_set: Dataset,
    val_set: Dataset | None,
    loop: LoopConfig,
    run: Run,
    start_step: int = 0,
    save: Callable[..., Path | None] | None = None,
    record: Callable[[dict], None] | None = None,
    callbacks: list[Callback] = (),
    progress: bool | Progress = True,
    log: Callable[[str], None] = print,
    warmup_loss_fn: Callable | None = None,
) -> Run:
    """Train from ``start_step`` to ``loop.total_steps``. Optimizer steps 1 to
    ``loop.sft_warmup_steps`` use ``warmup_loss_fn`` (plain SFT), the others ``loss_fn``; each has
    its own compiled step, so a step's loss depends on its number only (and a resumed run does what
    the uninterrupted one does). Validation always uses ``loss_fn``."""
    world = mx.distributed.init()
    rank, world_size = world.rank(), world.size()
    run.rank, run.world_size = rank, world_size
    replicas = tensor_parallel.data_group(model, world)  # --shard tensor: one, reading every batch
    accum = loop.grad_accumulation_steps
    if loop.sft_warmup_steps > 0 and warmup_loss_fn is None:
        raise ValueError("sft_warmup_steps needs a warmup_loss_fn")
    step_fn, state = make_step(model, optimizer, loss_fn, loop.max_grad_norm)
    warmup_step_fn = None
    if loop.sft_warmup_steps > 0:
        warmup_step_fn = make_step(model, optimizer, warmup_loss_fn, loop.max_grad_norm)[0]
    parts = getattr(loss_fn, "parts", ())
    loss = getattr(loss_fn, "loss", None)
    fields = _fields(dict(loss.parts) if loss is not None else {name: name for name in parts})

    batches: Iterator[Batch] = iterate_batches(
        train_set, loop.batch_size, seed=loop.seed, start=start_step * accum, rank=replicas.rank(),
        world_size=replicas.size(),
    )

    def validate(step: int):
        if val_set is None:
            return
        bar.phase("validating")
        tic = time.perf_counter()
        m = evaluate(model, loss_fn, val_set, loop.batch_size, loop.val_batches, replicas)
        due = [k for k in range(step + 1, loop.total_steps + 1) if _validates(k, loop)]
        bar.validated(time.perf_counter() - tic, len(due))
        rec = {
            "step": step,
            "val_loss": m["loss"],
            "val_ce": m["ce"],
            "val_prob": m["prob"],
            **{f"val_{name}": m[name] for name in parts},
            "val_ppl": m["ppl"],
            "val_tokens": m["tokens"],
            "val_time": time.perf_counter() - tic,
        }
        for cb in callbacks:
            rec.update(_hook(cb, "on_val_report", rec, run) or {})
        emit(rec)

    def emit(rec: dict):
        run.history.append(rec)
        if rank == 0:
            if record:
                record(rec)
            bar.write(_fmt(rec, fields=fields)) or log(_fmt(rec, fields=fields))

    if isinstance(progress, Progress):
        bar = progress if rank == 0 else Progress(False)
    else:
        bar = Progress.for_terminal(bool(progress) and rank == 0)
    bar.start(loop.total_steps, start_step)

    policy = None  # a loss that trains against the previous policy (PSFT), over groups of steps
    if loss is not None and loss.needs_previous and loss.group_steps > 1:

        def note(msg: str) -> None:
            if rank == 0:
                bar.write(msg) or log(msg)

        policy = PreviousPolicy(model, loss_fn, loss.group_steps, loop.sft_warmup_steps, accum,
                                loop.total_steps, note)  # fmt: skip
        if start_step > 0 and run.last_checkpoint is not None:
            policy.restore(load_previous(run.last_checkpoint), start_step, replicas.rank(), replicas.size())

    model.train()
    mx.reset_peak_memory()
    # Sums over the report window: objective, ce, prob, tokens, tokens of the steps that computed
    # the loss's parts (not the warm-up steps), parts.
    window = mx.zeros((5 + len(parts),))
    window_tokens = 0
    window_steps = 0
    window_time = 0.0
    trained_tokens = 0
    last_norm = None
    # A checkpoint is good once the loss its weights give (the next step's) is seen finite: until
    # then it is ``unverified`` (step, path); ``good`` is the newest verified one.
    good: Path | None = None
    unverified = (start_step, run.last_checkpoint) if run.last_checkpoint is not None else None
    saved_at = None  # the step of the last checkpoint this loop saved

    def checkpoint(step: int, good: Path | None, unverified):
        """Save a checkpoint of ``step`` (refusing non-finite weights); (good, unverified) after."""
        if not _finite(model.trainable_parameters(), world):
            _stop_non_finite(f"the weights became non-finite at step {step}", run, good, unverified)
        bar.phase("saving")
        # The previous policy of the group's steps still to come (a collective with several workers).
        extra = {"previous": policy.state(replicas)} if policy is not None and policy.pending else {}
        path = save(step, protect=good, **extra)
        if path is not None:
            run.last_checkpoint, unverified = path, (step, path)
            for cb in callbacks if rank == 0 else ():
                _hook(cb, "on_checkpoint", path, run)
        return good, unverified
    try:
        if start_step == 0:
            validate(0)
        compiled: set[str] = set()  # the step functions that have run (and so compiled)
        for step in range(start_step + 1, loop.total_steps + 1):
            which = "warmup" if step <= loop.sft_warmup_steps else "main"
            bar.phase("training" if which in compiled else "compiling")
            tic = time.perf_counter()
            if step <= loop.sft_warmup_steps:
                micro = [next(batches) for _ in range(accum)]
                sums, last_norm = optimizer_step(warmup_step_fn, state, micro)
                sums = mx.concatenate([sums[:4], mx.zeros((1 + len(parts),))])
            else:
                if policy is not None:
                    micro, old_ce = policy.take(step, batches)
                    if old_ce is not None:  # a step of its own to compile: the loss takes old_ce
                        which = "previous"
                        bar.phase("training" if which in compiled else "compiling")
                else:
                    micro, old_ce = [next(batches) for _ in range(accum)], None
                sums, last_norm = optimizer_step(step_fn, state, micro, old_ce)
                sums = mx.concatenate([sums[:4], sums[3:4], sums[4:]])
            window = window + sums
            window_tokens += sum(b.n_tokens for b in micro)
            window_steps += 1
            took = time.perf_counter() - tic
            window_time += took
            run.step = step
            sharding.beat()  # --shard-timeout: the others answered this step

            # Every worker decides on the loss of the whole step, so that all of them stop together.
            obj = (mx.distributed.all_sum(window[:1], stream=mx.cpu) if world_size > 1 else window[:1]).item()
            if not math.isfinite(obj):
                name = "sft (warm-up)" if step <= loop.sft_warmup_steps else loss.name if loss else "training"
                _stop_non_finite(f"the {name} loss became {obj} at step {step}", run, good, unverified)
            if unverified is not None:  # its weights gave this finite loss: a checkpoint to go back to
                good, unverified = unverified[1], None
            bar.step(took, timed=which in compiled)
            compiled.add(which)

            if step % loop.steps_per_report == 0 or step == loop.total_steps:
                sums = window
                tokens = mx.array(window_tokens)
                if replicas.size() > 1:
                    sums = mx.distributed.all_sum(sums, stream=mx.cpu)
                    tokens = mx.distributed.all_sum(tokens, stream=mx.cpu)
                obj, ce, prob, n, part_n, *part_sums = (float(x) for x in sums.tolist())
                tokens = int(tokens.item())
                trained_tokens += tokens
                n = max(n, 1.0)
                lr = optimizer.learning_rate
                rec = {
                    "step": step,
                    "train_loss": obj / n,
                    "train_ce": ce / n,
                    "train_prob": prob / n,
                    **({f"train_{k}": s / part_n for k, s in zip(parts, part_sums)} if part_n > 0 else {}),
                    "learning_rate": float(lr.item() if isinstance(lr, mx.array) else lr),
                    "grad_norm": float(last_norm.item()),
                    "tokens_per_sec": tokens / max(window_time, 1e-9),
                    "steps_per_sec": window_steps / max(window_time, 1e-9),
                    "trained_tokens": trained_tokens,
                    "peak_memory_gb": mx.get_peak_memory() / 1e9,
                }
                for cb in callbacks:
                    rec.update(_hook(cb, "on_train_report", rec, run) or {})
                emit(rec)
                bar.metrics(rec["train_loss"], rec["tokens_per_sec"], rec["peak_memory_gb"])
                window = mx.zeros((5 + len(parts),))
                window_tokens = window_steps = 0
                window_time = 0.0

            if _validates(step, loop):
                validate(step)

            if save is not None and (step % loop.save_every == 0 or step == loop.total_steps):
                good, unverified = checkpoint(step, good, unverified)
                saved_at = step
            # A callback's stop (on rank 0, where callbacks run) ends every worker at this step,
            # with a checkpoint of it (as any other: finite weights, on_checkpoint hooks).
            stop_now = run.stopped is not None
            if world_size > 1:
                stop_now = mx.distributed.all_sum(mx.array(float(stop_now)), stream=mx.cpu).item() > 0
            if stop_now and step < loop.total_steps:
                run.stopped = run.stopped or "a callback on another worker asked"
                if save is not None and saved_at != step:
                    good, unverified = checkpoint(step, good, unverified)
                said = f"stopped at step {step} of {loop.total_steps}: {run.stopped}"
                bar.write(said) or log(said)
                break
    finally:
        if not isinstance(progress, Progress):  # a caller's status line stays the caller's
            bar.close()
    for cb in callbacks:
        _hook(cb, "on_train_end", run)
    return run


def _hook(cb: Callback, hook: str, *args):
    """``cb.<hook>(*args)``; an exception it raises (but a UserError or Ctrl-C) becomes one line
    naming the callback and the hook."""
    try:
        return getattr(cb, hook)(*args)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001  (a user's code: any exception, said in one line)
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"callback {type(cb).__name__}.{hook} raised {type(e).__name__}: {first}") from None



def _finite(tree, world: mx.distributed.Group | None = None) -> bool:
    """Whether every array of ``tree`` is finite; with ``world``, on every worker (with --shard
    each holds a part of the weights, and all of them must stop or save together)."""
    arrays = [v for _, v in tree_flatten(tree)]
    ok = mx.all(mx.stack([mx.isfinite(v).all() for v in arrays])) if arrays else mx.array(True)
    if world is not None and world.size() > 1:
        ok = mx.distributed.all_sum((~ok).astype(mx.float32), group=world, stream=mx.cpu) == 0
    return bool(ok.item())


def _stop_non_finite(what: str, run: Run, good: Path | None, unverified: tuple | None) -> None:
    """Stop the run naming the newest checkpoint whose weights are known to give a finite loss (not
    the one saved just before the failure: its weights are those that failed)."""
    run.last_checkpoint = good
    failed = f" (the one at step {unverified[0]} holds the weights that failed)" if unverified else ""
    if good is None:
        raise NonFiniteLoss(
            f"{what}; the run stopped with no good checkpoint{failed}: start again with a lower "
            "--learning-rate or --max-grad-norm"
        )
    raise NonFiniteLoss(
        f"{what}; the run stopped. Its last good checkpoint is {good}{failed}: continue with --resume "
        f"{good} and a lower --learning-rate or --max-grad-norm"
    )


def test_report(
    model: nn.Module, loss_fn: Callable, test_set: Dataset, batch_size: int, run: Run, log: Callable
) -> dict:
    """Evaluate on the test split after training; the record joins the run's history."""
    m = evaluate(model, loss_fn, test_set, batch_size, -1)
    rec = {
        "step": run.step,
        "test_loss": m["loss"],
        "test_ce": m["ce"],
        "test_prob": m["prob"],
        **{f"test_{name}": m[name] for name in getattr(loss_fn, "parts", ())},
        "test_ppl": m["ppl"],
    }
    run.history.append(rec)
    log(f"test loss {m['loss']:.4f} | ce {m['ce']:.4f} | ppl {m['ppl']:.3f} | p {m['prob']:.3f}")
    return rec
