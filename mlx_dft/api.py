"""The Python API: everything ``mlx_dft train`` / ``generate`` do, as one call each; a run also
in two, :func:`prepare` (its parts) and :func:`fit`, so a notebook can change a part between.

import mlx_dft
run = mlx_dft.train(loss="dft", adapter="lora", iters=200, learning_rate=1e-4)
print(run.latest("val_loss"), run.output)
text = mlx_dft.generate("Question: ...", adapter=run.output)
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from mlx_dft import _blas, adapters, data, models, packing, sharding, tensor_parallel, trackers
from mlx_dft.adapters.base import AdapterMethod
from mlx_dft.checkpoint import OutputFolder, Resume, check_output_folder, run_config
from mlx_dft.config import CUSTOM_LOSS, FIELDS, TrainConfig, check_run_length, loss_of, resolve, total_steps
from mlx_dft.errors import Interrupted, UserError
from mlx_dft.evaluation import heldout
from mlx_dft.files import check_apart, read_member
from mlx_dft.interop.convert import read_source
from mlx_dft.losses import LOSSES, Loss, as_loss
from mlx_dft.progress import Progress
from mlx_dft.tasks import ARITH_DIR
from mlx_dft.trackers import open_trackers
from mlx_dft.trainer import Callback, LoopConfig, Run, optimizer_for, run_loss_fns, test_report, train_loop

__all__ = [
    "Callback",
    "Prepared",
    "Run",
    "TrainConfig",
    "UserError",
    "fit",
    "generate",
    "load",
    "prepare",
    "train",
]


def train(
    config: TrainConfig | dict | str | Path | None = None,
    *,
    callbacks: Iterable[Callback] = (),
    progress: bool = True,
    **options,
) -> Run:
    """Fine-tune a model; the keyword options are ``mlx_dft train``'s long options in snake case.
    ``config`` is a YAML file (as ``--config``), a dict of options or a :class:`TrainConfig`;
    keyword options override it. Returns the finished :class:`Run` (history, output folder).
    The same as ``fit(prepare(config, **options), callbacks=callbacks)``.

    Besides option values:

    - ``model`` may be a model already in memory: ``mlx_lm.load``'s ``(model, tokenizer)`` or
      ``(model, tokenizer, config)``, or an ``mlx.nn.Module`` with ``tokenizer=``. Its config.json
      is the tuple's ``config``, else the one its ``args`` hold (every mlx-lm model has them).
      The model is changed in place: the adapter's layers are inserted into it (``full``: its
      blocks are trained), it is cast per ``dtype`` and, on a CPU, dequantized as a loaded one
      is. ``base_model=`` names the folder or Hub id it came from, which the adapter folder then
      names as its base model (without it, the folder names none: give ``model=`` to use it);
    - ``loss`` may be a :class:`~mlx_dft.losses.Loss` (a registered one's options are recorded as
      options), a loss class, or a function ``fn(logits [N, V], targets [N]) -> [N]`` of a chunk of
      supervised tokens (:class:`~mlx_dft.losses.FunctionLoss`);
    - ``data`` may be the records themselves: an iterable of dicts in any format ``--data`` reads
      (the train split), or ``{"train": ..., "valid": ..., "test": ...}``; they are saved in the
      output folder's ``data/``, which the run then names as its data (so it resumes);
    - ``callbacks``: :class:`Callback` objects (reports, checkpoints; ``run.stop()`` ends early).
    """
    bar = Progress.for_terminal(progress and mx.distributed.init().rank() == 0)
    closing: list = [bar.close]  # what to close however the run ends (the status line, trackers)
    try:
        prepared = _prepare(config, options, bar)
        closing.append(prepared._made.drop_records)
        return _fit(prepared, list(callbacks), bar, closing)
    finally:
        for close in reversed(closing):
            close()


def prepare(
    config: TrainConfig | dict | str | Path | None = None, *, progress: bool = True, **options
) -> Prepared:
    """Everything :func:`train` does before its first step, handed back as a :class:`Prepared`
    run: the options are resolved and checked, the model loaded (or taken, ``model=`` an object)
    with its adapter applied, the data tokenised, the optimizer built and a checkpoint to resume
    restored. The arguments are :func:`train`'s (its callbacks go to :func:`fit`). Nothing is
    written but the output folder, created empty; change a part and call :func:`fit`."""
    bar = Progress.for_terminal(progress and mx.distributed.init().rank() == 0)
    try:
        return _prepare(config, options, bar)
    finally:
        bar.close()


def _tiling_line(model, cfg, train_set) -> str:
    """What --tiled-mlp does at the run's longest batch: how many tiles a block's MLP runs in (a
    note when one tile holds the whole batch, so the option changes nothing)."""
    from mlx_dft.patches import FEED_FORWARD_TILE_BYTES, feed_forward_tiling

    length = min(cfg.max_seq_length, max((len(t) for t in train_set.tokens), default=1))
    tokens = cfg.batch_size * length
    tiling = feed_forward_tiling(model, tokens, length)
    if tiling is None:
        return "note: --tiled-mlp has no effect: this model's blocks have no mlp/feed_forward to tile"
    tiles, width = tiling
    mib = FEED_FORWARD_TILE_BYTES >> 20
    if tiles <= 1:
        return (
            f"note: --tiled-mlp has no effect here: a batch of up to {cfg.batch_size} x {length} tokens of a "
            f"{width:,}-wide MLP fits one {mib} MiB tile"
        )
    return (
        f"tiled MLP: each recomputed block's MLP ({width:,} wide) runs in {tiles} tiles of at most "
        f"{-(-length // tiles)} positions at the longest batch ({cfg.batch_size} x {length} tokens)"
    )


def fit(run: Prepared, *, callbacks: Iterable[Callback] = (), progress: bool = True) -> Run:
    """Train a :class:`Prepared` run to its end, as :func:`train` does after preparing: checks
    the parts that were swapped (see :class:`Prepared`), writes the output folder, trains,
    reports and saves. Returns the finished :class:`Run`. A prepared run is fitted once: a second
    ``fit`` of it is refused (prepare it again, or resume its output folder)."""
    bar = Progress.for_terminal(progress and mx.distributed.init().rank() == 0)
    closing: list = [bar.close]
    try:
        return _fit(run, list(callbacks), bar, closing)
    finally:
        for close in reversed(closing):
            close()


@dataclass(eq=False)
class _Made:
    """What :func:`prepare` made, against which :func:`fit` tells what was swapped."""

    loss: Loss
    loss_fns: tuple  # (the loss function, the SFT warm-up one or None)
    custom: Loss | None  # the loss, when it is the user's own (not registered): CUSTOM_LOSS
    optimizer: object
    sets: tuple  # (train, valid, test)
    weights_loaded: bool  # a checkpoint or --adapter-from loaded: the weights are not the initial ones
    finished: bool  # a resumed run already at its last step
    model_name: str  # "model PATH", or "the model given in memory"
    fixed: dict = field(default_factory=dict)  # the read-only parts, as prepared
    records: Path | None = None  # data given as records: the temporary jsonl splits, saved by fit
    drop_records: Callable[[], object] = lambda: None
    prepare_seconds: float = 0.0
    fitted: bool = False


@dataclass(eq=False, repr=False)
class Prepared:
    """A run made ready by :func:`prepare`: its parts, which a notebook may look at or change
    before :func:`fit`.

    Swappable (fit checks them again):

    - ``loss``: anything ``train(loss=...)`` takes. Fit checks it as train does (its options,
      which replace the previous loss's; the model's vocabulary; a reference model under
      ``full`` needs the initial weights, so not after a resume or ``adapter_from``) and records
      it as the run's ``--loss``.
    - ``optimizer``: any ``mlx.optimizers.Optimizer``, used as it is: its learning rate and
      schedule are yours, and on a resumed run it starts without the checkpoint's optimizer state.
    - ``train_set``, ``val_set`` (or None), ``test_set`` (or None): :class:`mlx_dft.data.Dataset`
      (``mlx_dft.data.load_datasets`` makes them), packed exactly when the run packs; the train set
      must hold a batch. The run's length stays ``steps``, counted at prepare.
    - ``config``: the options fit reads (reports, evaluation, checkpoints, ``test``, accuracy,
      trackers) may be changed; the others were used by prepare (model, adapter, data, optimizer,
      seed). Change the loss through ``loss``.

    A swapped optimizer or data set is not in the options the output folder records, from which
    a resume of the run rebuilds its parts (fit says so in a note). The others (``model``,
    ``tokenizer``: the adapter is in the model, the data tokenised with the tokenizer;
    ``output``, ``steps``, ``start_step``, ``method``, ``settings``, ``model_config``, ``resume``)
    are read only: fit refuses them changed.
    """

    config: TrainConfig
    model: nn.Module
    tokenizer: object
    train_set: data.Dataset
    val_set: data.Dataset | None
    test_set: data.Dataset | None
    optimizer: optim.Optimizer
    loss: object  # a Loss; anything train(loss=...) takes once swapped
    output: Path
    steps: int  # optimizer steps of the whole run
    start_step: int  # where it starts: 0, or the resumed checkpoint's step
    method: AdapterMethod
    settings: dict  # the adapter's (rank, layers, ...), as adapter_config.json records them
    model_config: dict  # the model's config.json
    resume: Resume | None
    _made: _Made = field(repr=False)

    def __repr__(self) -> str:  # the parts in a line each, not the model's arrays and the tokens
        def size(ds) -> str:
            return "None" if ds is None else f"{len(ds)} {'rows' if ds.segments is not None else 'examples'}"

        loss = getattr(self.loss, "name", self.loss)
        return (
            f"Prepared(output={str(self.output)!r}, steps={self.start_step}..{self.steps}, "
            f"{self._made.model_name} ({self.config.adapter}), loss={loss!r}, "
            f"optimizer={type(self.optimizer).__name__}, train_set={size(self.train_set)}, "
            f"val_set={size(self.val_set)}, test_set={size(self.test_set)})"
        )


def _prepare(config, options: dict, bar: Progress) -> Prepared:
    started = time.perf_counter()
    options, given = _model_option(options)
    options, custom = _loss_option(options)
    token = CUSTOM_LOSS.set(custom)
    records = None
    try:
        options, records = _data_option(options)
        prepared = _prepare_parts(config, options, bar, given, custom, records)
    except BaseException:
        if records is not None:
            shutil.rmtree(records, ignore_errors=True)
        raise
    finally:
        CUSTOM_LOSS.reset(token)
    made = prepared._made
    if records is not None:  # removed once fit has saved them, or with the prepared run
        made.drop_records = weakref.finalize(prepared, shutil.rmtree, records, True)
    made.prepare_seconds = time.perf_counter() - started
    return prepared


def _model_option(options: dict) -> tuple[dict, tuple | None]:
    """``model`` given as an object (with ``tokenizer``, ``base_model``): the options with
    ``model`` the base model's name, if given, and (model, tokenizer, config or None); a name or
    a path: the options and None."""
    options = dict(options)
    value, tokenizer, base = (options.pop(k, None) for k in ("model", "tokenizer", "base_model"))
    if value is None or isinstance(value, (str, Path)):
        if tokenizer is not None or base is not None:
            given = "tokenizer=" if tokenizer is not None else "base_model="
            raise UserError(
                f"{given} goes with a model object (model=(model, tokenizer)), not model={value!r}"
            )
        return {**options, "model": value}, None
    config = None
    if isinstance(value, (tuple, list)):
        kinds = ", ".join(type(v).__name__ for v in value)
        if len(value) not in (2, 3) or (len(value) == 3 and not isinstance(value[2], dict)):
            raise UserError(
                f"model= is a tuple of ({kinds}): give (model, tokenizer) or (model, tokenizer, config), "
                "as mlx_lm.load returns"
            )
        if tokenizer is not None:
            raise UserError("the tokenizer is given twice: in model=(model, tokenizer) and as tokenizer=")
        value, tokenizer, *rest = value
        config = rest[0] if rest else None
    if not isinstance(value, nn.Module):
        raise UserError(
            f"model= is a {type(value).__name__}: give a folder, a Hub id or a GGUF file, or an "
            "mlx.nn.Module with its tokenizer, (model, tokenizer) as mlx_lm.load returns"
        )
    if tokenizer is None:
        raise UserError(
            f"model= is a {type(value).__name__} without its tokenizer: give model=(model, tokenizer), "
            "as mlx_lm.load returns, or tokenizer="
        )
    if base is not None and not isinstance(base, (str, Path)):
        raise UserError(f"base_model= names a folder or Hub id, not a {type(base).__name__}")
    if any(type(m).__module__.startswith(("mlx_lm.tuner", "mlx_dft.adapters")) for m in value.modules()):
        raise UserError(
            "model= holds adapter layers already (a run inserts them into its model in place, as "
            "mlx_lm.load(..., adapter_path=) does): load the model again, and give adapter_from= to "
            "start from an adapter"
        )
    return {**options, "model": None if base is None else str(base)}, (value, tokenizer, config)


def _prepare_parts(config, options: dict, bar: Progress, given: tuple | None, custom, records) -> Prepared:
    bar.phase("loading")
    cfg, explicit, resume = resolve(config, options)
    trackers.require(cfg.report_to)
    if resume is not None and bool(resume.config.get("training", {}).get("pack", False)) != cfg.pack:
        how = "with --pack" if cfg.pack is False else "without --pack"
        raise UserError(f"checkpoint {resume.checkpoint} was trained {how}: resume it the same way")
    world = mx.distributed.init()
    sharding.check(cfg.shard, world)
    say = _rank0_print(world, bar)
    if resume is not None:
        changed = resume_changes(resume.config.get("training", {}), explicit)
        if changed:
            say(f"note: resuming with {changed}: from here on the run sees its data differently from an "
                "uninterrupted run of the checkpoint's settings")  # fmt: skip
    if mx.default_device() == mx.cpu:
        say(_blas.info().describe())
    if given is not None:  # the base model it names: base_model=, else the resumed run's
        cfg.model = explicit.get("model") or (
            resume.config.get("training", {}).get("model") if resume else None
        )
    elif resume is not None and not cfg.model:
        raise UserError(
            f"checkpoint {resume.checkpoint} was trained on a model given in memory, which its run does not "
            "name: give it again, mlx_dft.train(model=(model, tokenizer), resume=...), or --model"
        )

    # Start from an existing adapter (--adapter-from): it decides the method and the base model.
    source = read_source(cfg.adapter_from, cfg.model) if cfg.adapter_from and resume is None else None
    if source is not None:
        base = cfg.model
        adapters.adopt_source(cfg, source, explicit.get("adapter"))
        if given is not None:  # the model given is the base, whatever the adapter was trained on
            cfg.model = base
    if given is None:
        cfg.model = cfg.model or str(models.default_model_path())
    cfg.data = cfg.data or str(ARITH_DIR)
    # Before anything is loaded: the output is a folder of its own, never an input or inside one.
    output = Path(cfg.output or _default_output(cfg))
    # A run trained on records keeps them in its own data/ folder: resuming it there reads them.
    own_data = resume is not None and Path(cfg.data).expanduser().resolve() == (output / "data").resolve()
    check_apart(
        output,
        {"--model": cfg.model, "--data": None if own_data else cfg.data, "--adapter-from": cfg.adapter_from,
         "--resume": resume.run_folder if resume else None, "--chat-template": cfg.chat_template},
        same_ok=("--resume",),
    )  # fmt: skip
    check_output_folder(output)

    mx.random.seed(cfg.seed)
    # A method that trains the base weights refuses a quantized base as loaded (its float32 copy
    # is not what the folder stores).
    keep_quantized = cfg.keep_quantized or adapters.method(cfg.adapter).trains_base_weights
    if given is None:
        model, tokenizer, model_cfg, _ = models.load_model(
            cfg.model, cfg.dtype, cfg.chat_template, keep_quantized
        )
        model_name = f"model {cfg.model}"
    else:
        model, tokenizer, model_cfg = models.from_memory(*given, cfg.dtype, cfg.chat_template, keep_quantized)
        _draw_as_built(model_cfg)
        model_name = "the model given in memory" + (f" ({cfg.model})" if cfg.model else "")

    sharding.check_same_everywhere(world, _fingerprint(model_cfg))
    splits = data.load_datasets(
        cfg.data, tokenizer, data.DataConfig.from_options(cfg), cfg.hf_config, cfg.hf_splits
    )
    for line in data.describe(splits, cfg.max_seq_length):
        say(line)
    if cfg.pack:
        packing.prepare(model)
        splits = {name: data.pack_dataset(ds, cfg.max_seq_length) for name, ds in splits.items()}
        for ds in splits.values():
            say(data.describe_packing(ds, cfg.max_seq_length))
    train_set, val_set, n_batches = data.training_splits(splits, cfg.batch_size)

    method = adapters.method(cfg.adapter)
    saved = source if source is not None else resume.config if resume and cfg.adapter_from else None
    settings = method.settings_from_config(saved) if saved is not None else method.settings(cfg, model)
    method.apply(model, settings)
    if cfg.shard == "tensor":  # what it cannot split is refused before the output folder is touched
        tensor_parallel.plan(model, world.size())
    # Before any trained weights load: ASFT's reference is the model with the adapter switched off.
    loss = loss_of(cfg)
    loss_fns = run_loss_fns(model, cfg, method, loss)
    if source is not None:
        adapters.load_weights(model, source["weights"], cfg.adapter_from)
        say(f"starting from the {cfg.adapter} adapter {cfg.adapter_from}")
    say(f"{model_name} ({models.model_type(model)}): {adapters.summary(model, method, settings)}")
    say(models.split_model(model).describe())

    steps = total_steps(cfg, n_batches)
    check_run_length(cfg, steps)
    optimizer = optimizer_for(cfg, steps)
    start_step = 0
    if resume is not None:
        resume.check_compatible(cfg.adapter, settings, model_cfg)
        start_step = resume.restore(model, method, optimizer, steps)
        say(f"resuming from {resume.checkpoint} at step {start_step}")

    out = OutputFolder(output, writer=world.rank() == 0)
    finished = resume is not None and not resume.check_unfinished(start_step, steps, out.path)
    # Refused now rather than after a notebook's changes; fit checks again and holds the folder.
    out.check(cfg.overwrite, resume.run_folder if resume else None, world)
    out.release()
    made = _Made(
        loss, loss_fns, custom, optimizer, (train_set, val_set, splits.get("test")),
        weights_loaded=resume is not None or source is not None, finished=finished, model_name=model_name,
        records=records,
    )  # fmt: skip
    prepared = Prepared(
        cfg, model, tokenizer, train_set, val_set, splits.get("test"), optimizer, loss, out.path, steps,
        start_step, method, settings, model_cfg, resume, made,
    )  # fmt: skip
    made.fixed = {name: getattr(prepared, name) for name in READ_ONLY}
    return prepared


# The parts of a prepared run that fit takes as they were prepared (see :class:`Prepared`).
READ_ONLY = (
    "model",
    "tokenizer",
    "output",
    "steps",
    "start_step",
    "method",
    "settings",
    "model_config",
    "resume",
)


def _draw_as_built(config: dict) -> None:
    """Draw from the random state what building the model from ``config`` draws (mlx-lm builds
    a model, drawing initial weights, then loads its own): a model given in memory then starts
    its adapter and run from the random state of the same model loaded from its folder, bit for
    bit for a float model (a quantized folder's loading draws more). Built lazily and dropped:
    nothing is computed."""
    try:
        models.build_model(config, "model=")
    except UserError:
        pass  # a config that builds no model: only the run's random draws differ from a folder's


def _fit(p: Prepared, callbacks: list[Callback], bar: Progress, closing: list) -> Run:
    started = time.perf_counter()
    if not isinstance(p, Prepared):
        raise UserError(f"fit takes the run mlx_dft.prepare returns, not a {type(p).__name__}")
    made = p._made
    if made.fitted:
        raise UserError(
            f"this prepared run was fitted already (into {p.output}): prepare it again, or continue "
            f"its checkpoints with mlx_dft.train(resume={str(p.output)!r}, ...)"
        )
    world = mx.distributed.init()
    say = _rank0_print(world, bar)
    own = _check_parts(p)
    token = CUSTOM_LOSS.set(made.custom)
    closing.append(lambda: CUSTOM_LOSS.reset(token))
    if own:
        fresh = (
            " (the optimizer starts without the checkpoint's state)"
            if "optimizer" in own and p.resume
            else ""
        )
        are = "is" if len(own) == 1 else "are"
        say(f"note: this run's {', '.join(own)} {are} your own{fresh}: its adapter_config.json records "
            "the options, from which a resume of it rebuilds the parts")  # fmt: skip
    cfg, model, tokenizer, method, resume, steps = p.config, p.model, p.tokenizer, p.method, p.resume, p.steps
    loss_fn, warmup_loss_fn = made.loss_fns

    out = OutputFolder(p.output, writer=world.rank() == 0)
    out.check(cfg.overwrite, resume.run_folder if resume else None, world)
    closing.append(out.release)  # the lock goes however the run ends (a failed run in a notebook too)
    if made.finished:
        made.fitted = True
        run = Run(model, tokenizer, cfg, out.path, step=p.start_step, last_checkpoint=resume.checkpoint)
        out.finish(resume.checkpoint, method)
        say(f"the run was already at step {steps}: its adapter in {out.path} is the final checkpoint's")
        if not out.recorded("test_loss"):  # the kill came before the run's test report
            _test(cfg, p.test_set, model, loss_fn, run, out, say)
        out.release()
        return run
    made.fitted = True  # from here on the output folder holds this run
    if made.records is not None:  # the records become the run's own data, beside its adapter
        cfg.data = str(out.path / "data")
    out.begin(
        run_config(cfg, p.settings, model, p.model_config, out.path, steps), p.start_step if resume else None
    )
    if made.records is not None and world.rank() == 0:
        out.save_records(made.records)
    made.drop_records()
    out.save_tokenizer(tokenizer)
    rows = "packed rows" if cfg.pack else "examples"
    say(f"training {steps} steps of {cfg.batch_size} {rows} ({_recipe(cfg, world)}) -> {out.path}")
    if world.rank() == 0 and cfg.report_to:
        opened = open_trackers(cfg.report_to, out.path, cfg.to_dict(), cfg.project_name)
        out.listeners.extend(t.log for t in opened)
        closing.extend(t.close for t in opened)

    if cfg.grad_checkpoint:
        models.grad_checkpoint(model, tiled_mlp=cfg.tiled_mlp)
    if cfg.tiled_mlp:
        say(_tiling_line(model, cfg, p.train_set))
    run = Run(model, tokenizer, cfg, out.path, last_checkpoint=resume.checkpoint if resume else None)
    held = heldout.heldout_problems(cfg, tokenizer) if world.rank() == 0 else None
    bar.phase("evaluating")
    before = _accuracy(model, tokenizer, cfg, held, run, out, 0, say) if p.start_step == 0 else None
    save = out.saver(model, method, p.optimizer, steps, cfg.grad_accumulation_steps, cfg.keep_checkpoints)
    loop = LoopConfig.from_options(cfg, steps)
    try:
        # --shard: whole arrays saved
        with sharding.sharded(cfg.shard, model, p.optimizer, cfg.shard_timeout) as whole:
            train_loop(model, p.optimizer, loss_fn, p.train_set, p.val_set, loop, run,
                       start_step=p.start_step, save=whole(save), record=out.record, callbacks=callbacks,
                       progress=bar, log=say, warmup_loss_fn=warmup_loss_fn)  # fmt: skip
    except KeyboardInterrupt:
        raise Interrupted(_interrupted(run, out.path)) from None
    _test(cfg, p.test_set, model, loss_fn, run, out, say)
    bar.phase("evaluating")
    after = _accuracy(model, tokenizer, cfg, held, run, out, run.step, say)
    bar.close()
    out.release()
    say(f"saved {cfg.adapter} adapter to {out.path}")
    before_accuracy = before.accuracy if before is not None else out.recorded_value("accuracy", step=0)
    on = made.model_name.removeprefix("model ")
    recipe = f"{_recipe(cfg, world)}, {cfg.adapter} on {on}, {run.step} steps"
    if run.stopped:
        recipe += f" (stopped: {run.stopped})"
    took = made.prepare_seconds + time.perf_counter() - started
    for line in heldout.summary(out.path, recipe, before_accuracy, after, held, took, cfg.data, cfg.loss):
        say(line)
    return run


def _check_parts(p: Prepared) -> list[str]:
    """Fit's checks of a prepared run's parts, a swapped loss's functions built; returns the
    parts that are the user's own (swapped), which the output folder's options do not describe."""
    from mlx_dft.config import validate

    made = p._made
    for name, then in made.fixed.items():
        now = getattr(p, name)
        if now is not then and not (isinstance(now, (int, str, Path)) and now == then):
            raise UserError(f"run.{name} was changed: it is read only; prepare the run again to change it")
    if not isinstance(p.config, TrainConfig):
        raise UserError(f"run.config is a {type(p.config).__name__}, not a TrainConfig")
    if p.loss is not made.loss:
        _swap_loss(p)
    elif p.config.loss != made.loss.name:
        raise UserError(
            f"run.config.loss was changed to {p.config.loss!r}: swap the loss itself, run.loss = ..."
        )
    token = CUSTOM_LOSS.set(made.custom)
    try:
        validate(p.config)
        check_run_length(p.config, p.steps)
    finally:
        CUSTOM_LOSS.reset(token)
    if not isinstance(p.optimizer, optim.Optimizer):
        raise UserError(f"run.optimizer is a {type(p.optimizer).__name__}, not an mlx.optimizers.Optimizer")
    for name, ds in (("train_set", p.train_set), ("val_set", p.val_set), ("test_set", p.test_set)):
        if ds is None and name != "train_set":
            continue
        if not isinstance(ds, data.Dataset):
            raise UserError(
                f"run.{name} is a {type(ds).__name__}, not an mlx_dft.data.Dataset "
                "(mlx_dft.data.load_datasets makes them)"
            )
        if (ds.segments is not None) != p.config.pack:
            how = "packed rows" if ds.segments is not None else "examples, not packed rows"
            raise UserError(
                f"run.{name} holds {how}: this run {'packs' if p.config.pack else 'does not pack'}"
            )
    data.training_splits({"train": p.train_set}, p.config.batch_size)  # a batch at least
    names = ("optimizer", "train_set", "val_set", "test_set")
    now = (p.optimizer, p.train_set, p.val_set, p.test_set)
    return [name for name, a, b in zip(names, now, (made.optimizer, *made.sets)) if a is not b]


def _swap_loss(p: Prepared) -> None:
    """A loss swapped after prepare, checked as :func:`train` checks its ``loss``: its options
    replace the previous loss's (which return to their defaults), it must run at the model's
    vocabulary, and its functions are built. The prepared run changes only once all that passes."""
    from mlx_dft.config import LOSS_OPTIONS, validate

    made = p._made
    options, custom = _loss_option({"loss": p.loss})
    cfg = copy.copy(p.config)
    for name in LOSS_OPTIONS:
        setattr(cfg, name, FIELDS[name].default)
    for key, value in options.items():
        setattr(cfg, key, value)
    kind = type(custom) if custom is not None else LOSSES.get(cfg.loss)
    if kind is not None and not kind.needs_reference:  # the previous loss's --reference-copy goes with it
        cfg.reference_copy = False
    token = CUSTOM_LOSS.set(custom)
    try:
        validate(cfg)
        loss = loss_of(cfg)
        if loss.needs_reference and p.method.trains_base_weights and made.weights_loaded:
            raise UserError(
                f"the {loss.name} loss's reference under --fine-tune-type {cfg.adapter} is a copy of the "
                "initial weights, which this prepared run has replaced (resumed, or --adapter-from): give "
                "the loss to prepare"
            )
        fns = run_loss_fns(p.model, cfg, p.method, loss)
    finally:
        CUSTOM_LOSS.reset(token)
    p.config, p.loss = cfg, loss
    made.loss, made.custom, made.loss_fns = loss, custom, fns


def _loss_option(options: dict) -> tuple[dict, Loss | None]:
    """A ``loss`` given as an object: a registered loss becomes its name and options; any other
    becomes this run's Python loss (returned), under its name."""
    value = options.get("loss")
    if value is None or isinstance(value, str):
        return options, None
    try:
        loss = as_loss(value)
    except TypeError as e:
        raise UserError(str(e)) from None
    settings = loss.settings()
    registered = LOSSES.get(loss.name) is type(loss)
    if registered and all(k in FIELDS for k in settings):
        # every option explicit: the object's values win over a YAML file's and a resumed run's
        return {**options, **settings, "loss": loss.name}, None
    if loss.name in LOSSES and not registered:
        raise UserError(
            f"a loss of your own is named {loss.name!r}, as a built-in one: give it another name "
            "(its runs would resume as the built-in loss)"
        )
    return {**options, "loss": loss.name}, loss


def _data_option(options: dict) -> tuple[dict, Path | None]:
    """``data`` given as records: written, one record a line as they come, as jsonl splits into a
    temporary folder (returned; the caller removes it) that the run reads and then copies into its
    output."""
    data = options.get("data")
    if data is None or isinstance(data, (str, Path)):
        return options, None
    splits = data if isinstance(data, dict) else {"train": data}
    unknown = set(splits) - {"train", "valid", "test"}
    if unknown or "train" not in splits:
        raise UserError(
            f"data given as records needs a 'train' split and no other than valid/test, got {sorted(splits)}"
        )
    tmp = Path(tempfile.mkdtemp(prefix="mlx_dft_records_"))
    try:
        for split, rows in splits.items():
            with open(tmp / f"{split}.jsonl", "w") as f:
                for i, row in enumerate(rows):
                    try:
                        f.write(json.dumps(row) + "\n")
                    except (TypeError, ValueError) as e:
                        raise UserError(f"data record {i} of {split} is not JSON ({e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**options, "data": str(tmp)}, tmp


# ------------------------------------------------------------------ the small print of the stages


def _test(cfg: TrainConfig, test_set, model, loss_fn, run: Run, out: OutputFolder, say) -> None:
    """``--test``: the test split's loss, recorded with the run's metrics."""
    if cfg.test and test_set is not None:
        out.record(test_report(model, loss_fn, test_set, cfg.batch_size, run, say))
    elif cfg.test:
        say("note: --test given but the data has no test.jsonl")


def _accuracy(model, tokenizer, cfg, held, run: Run, out: OutputFolder, step: int, say):
    """Held-out answer accuracy at ``step``, recorded with the run's metrics (rank 0; None without
    answerable problems)."""
    if held is None:
        return None
    tic = time.perf_counter()
    report = heldout.accuracy(model, tokenizer, held, cfg.use_chat_template)
    rec = {
        "step": step,
        "accuracy": report.accuracy,
        "accuracy_problems": report.n_problems,
        "accuracy_split": held.split,
        "accuracy_time": time.perf_counter() - tic,
    }
    run.history.append(rec)
    out.record(rec)
    say(f"step {step} | accuracy {report.accuracy:.1%} on {report.n_problems} {held.split} problems")
    return report


def _interrupted(run: Run, output: Path) -> str:
    """What to say after Ctrl-C: the command that continues the run, with real paths."""
    where = f"interrupted at step {run.step}"
    if run.last_checkpoint is None:
        return f"{where}, before the first checkpoint of {output}"
    ckpt = Path(run.last_checkpoint)
    if ckpt.resolve().is_relative_to(Path(output).resolve()):
        return f"{where}; the last checkpoint is {ckpt}: continue with --resume {output}"
    # resumed from another run's checkpoint and stopped before this folder got one of its own
    return (
        f"{where}; the last checkpoint is {ckpt}: continue with --resume {ckpt} --output {output} --overwrite"
    )


def _rank0_print(world: mx.distributed.Group, bar: Progress | None = None):
    def say(msg: str) -> None:
        if world.rank() == 0 and not (bar is not None and bar.write(msg)):
            print(msg, flush=True)

    return say


def _fingerprint(model_config: dict) -> dict[str, str]:
    """What every worker of a distributed run must share: versions and the model's config."""
    import mlx_lm

    from mlx_dft._version import __version__

    return {
        "mlx_dft version": __version__,
        "mlx version": mx.__version__,
        "mlx-lm version": mlx_lm.__version__,
        "model config": json.dumps(model_config, sort_keys=True, default=str),
    }


def _recipe(cfg: TrainConfig, world: mx.distributed.Group) -> str:
    workers = f"{world.size()} worker{'s' if world.size() > 1 else ''}"
    if cfg.shard != "none":
        workers += f", --shard {cfg.shard}"
    loss = loss_of(cfg).describe()
    if cfg.sft_warmup_steps:
        loss += f" after {cfg.sft_warmup_steps} SFT steps"
    return f"{loss}, lr {cfg.resolved_learning_rate():g}, {workers}"


# Options that decide which examples a step sees, in what order and how they are cut: changing
# them on resume gives a different run than an uninterrupted one (said in a note).
RESUME_DATA_OPTIONS = (
    "data", "batch_size", "grad_accumulation_steps", "max_seq_length", "seed", "hf_config", "hf_splits",
    "mask_prompt", "use_chat_template", "chat_template",
)  # fmt: skip


def resume_changes(training: dict, explicit: dict) -> str:
    """'--batch-size 8 (the checkpoint: 4), ...' for the data options given on resume that differ
    from the checkpoint's; '' when none do."""
    from mlx_dft.checkpoint import absolute

    out = []
    for key in RESUME_DATA_OPTIONS:
        if key not in explicit:
            continue
        now, then = explicit[key], training.get(key)
        if key == "data":
            now = absolute(str(now))
        if now != then and not (isinstance(now, (list, tuple)) and list(now) == then):
            out.append(f"--{key.replace('_', '-')} {now} (the checkpoint: {then})")
    return ", ".join(out)


def _default_output(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.loss}-{cfg.adapter}"


def load(
    model: str | None = None,
    adapter: str | Path | None = None,
    dtype: str = "auto",
    chat_template: str | None = None,
    keep_quantized: bool = False,
):
    """(model, tokenizer) with an adapter applied, ready for generation. ``adapter`` is an
    mlx_dft/mlx-lm folder, a PEFT LoRA/DoRA folder, our HF Aligner folder, an official Aligner
    ``.pth`` or a Hub repo id holding one (converted on the fly). The chat template is
    ``chat_template`` (text or a file), else the one the adapter was trained with, else the model's.
    A quantized model on a CPU computes in float32 unless ``keep_quantized``
    (:func:`mlx_dft.models.dequantize_for_cpu`)."""
    source = read_source(adapter, model) if adapter is not None else None
    if model is None and source is not None:
        model = source.get("base_model")
        if model is None and "training" in source:  # our run's, on a model given in memory
            raise UserError(f"adapter {adapter} names no base model (it was trained on a model given in "
                            "memory): give the model, model= (--model)")  # fmt: skip
    if chat_template is None and source is not None:
        # A template that travels with an adapter is text: the config's (saved as text by the run)
        # or the file beside the adapter, never a path to read from somewhere else.
        text = (source.get("training") or {}).get("chat_template")
        chat_template = data.TemplateText(text) if isinstance(text, str) and text else None
        folder = Path(str(adapter)).expanduser()
        saved = read_member(folder, "chat_template.jinja", "chat template") if folder.is_dir() else None
        if saved is not None:  # the template the run trained with, as saved beside its adapter
            chat_template = data.TemplateText(saved)
    net, tokenizer, _, _ = models.load_model(
        model or str(models.default_model_path()), dtype, chat_template, keep_quantized
    )
    if source is not None:
        adapters.apply_saved(net, source, source["weights"], str(adapter))
    net.eval()
    return net, tokenizer


def generate(
    prompt: str,
    model: str | None = None,
    adapter: str | Path | None = None,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    chat: bool | None = None,
    seed: int = 0,
    loaded: tuple | None = None,
    chat_template: str | None = None,
    keep_quantized: bool = False,
) -> str:
    """Generate a completion of ``prompt``; ``chat`` wraps it in the chat template (default:
    when the tokenizer has one; ``chat_template`` as for :func:`load`)."""
    from mlx_lm import generate as mlx_generate
    from mlx_lm.sample_utils import make_sampler

    from mlx_dft.evaluation.options import check_decoding

    check_decoding(temperature, top_p, seed, max_tokens)  # before the model loads
    net, tokenizer = loaded or load(
        model, adapter, chat_template=chat_template, keep_quantized=keep_quantized
    )
    prompt = data.chat_prompt(tokenizer, prompt, chat)
    mx.random.seed(seed)
    sampler = make_sampler(temp=temperature, top_p=top_p)
    return mlx_generate(net, tokenizer, prompt, max_tokens=max_tokens, sampler=sampler, verbose=False)
