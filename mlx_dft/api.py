"""The Python API: everything ``mlx_dft train`` / ``generate`` do, as one call each.

import mlx_dft
run = mlx_dft.train(loss="dft", adapter="lora", iters=200, learning_rate=1e-4)
print(run.latest("val_loss"), run.output)
text = mlx_dft.generate("Question: ...", adapter=run.output)
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import mlx.core as mx

from mlx_dft import _blas, adapters, data, models, packing, trackers
from mlx_dft.checkpoint import OutputFolder, check_output_folder, run_config
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

__all__ = ["Callback", "Run", "TrainConfig", "UserError", "generate", "load", "train"]


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

    Besides option values:

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
        options, custom = _loss_option(options)
        token = CUSTOM_LOSS.set(custom)
        closing.append(lambda: CUSTOM_LOSS.reset(token))
        options, records = _data_option(options, closing)
        return _train(config, list(callbacks), bar, closing, options, records)
    finally:
        for close in reversed(closing):
            close()


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


def _data_option(options: dict, closing: list) -> tuple[dict, Path | None]:
    """``data`` given as records: written, one record a line as they come, as jsonl splits into a
    temporary folder (removed when the run ends) that the run reads and then copies into its
    output (returned)."""
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
    closing.append(lambda: shutil.rmtree(tmp, ignore_errors=True))
    for split, rows in splits.items():
        with open(tmp / f"{split}.jsonl", "w") as f:
            for i, row in enumerate(rows):
                try:
                    f.write(json.dumps(row) + "\n")
                except (TypeError, ValueError) as e:
                    raise UserError(f"data record {i} of {split} is not JSON ({e})") from None
    return {**options, "data": str(tmp)}, tmp


def _train(
    config, callbacks: list[Callback], bar: Progress, closing: list, options: dict, records: Path | None
) -> Run:
    started = time.perf_counter()
    bar.phase("loading")
    cfg, explicit, resume = resolve(config, options)
    trackers.require(cfg.report_to)
    if resume is not None and bool(resume.config.get("training", {}).get("pack", False)) != cfg.pack:
        how = "with --pack" if cfg.pack is False else "without --pack"
        raise UserError(f"checkpoint {resume.checkpoint} was trained {how}: resume it the same way")
    world = mx.distributed.init()
    say = _rank0_print(world, bar)
    if resume is not None:
        changed = resume_changes(resume.config.get("training", {}), explicit)
        if changed:
            say(f"note: resuming with {changed}: from here on the run sees its data differently from an "
                "uninterrupted run of the checkpoint's settings")  # fmt: skip
    if mx.default_device() == mx.cpu:
        say(_blas.info().describe())

    # Start from an existing adapter (--adapter-from): it decides the method and the base model.
    source = read_source(cfg.adapter_from, cfg.model) if cfg.adapter_from and resume is None else None
    if source is not None:
        adapters.adopt_source(cfg, source, explicit.get("adapter"))
    cfg.model, cfg.data = cfg.model or str(models.default_model_path()), cfg.data or str(ARITH_DIR)
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
    model, tokenizer, model_cfg, _ = models.load_model(
        cfg.model, cfg.dtype, cfg.chat_template, keep_quantized
    )

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
    # Before any trained weights load: ASFT's reference is the model with the adapter switched off.
    loss_fn, warmup_loss_fn = run_loss_fns(model, cfg, method)
    if source is not None:
        adapters.load_weights(model, source["weights"], cfg.adapter_from)
        say(f"starting from the {cfg.adapter} adapter {cfg.adapter_from}")
    say(f"model {cfg.model} ({models.model_type(model)}): {adapters.summary(model, method, settings)}")
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
    out.check(cfg.overwrite, resume.run_folder if resume else None, world)
    closing.append(out.release)  # the lock goes however the run ends (a failed run in a notebook too)
    if finished:
        run = Run(model, tokenizer, cfg, out.path, step=start_step, last_checkpoint=resume.checkpoint)
        out.finish(resume.checkpoint, method)
        say(f"the run was already at step {steps}: its adapter in {out.path} is the final checkpoint's")
        if not out.recorded("test_loss"):  # the kill came before the run's test report
            _test(cfg, splits, model, loss_fn, run, out, say)
        out.release()
        return run
    if records is not None:  # the records become the run's own data, beside its adapter
        cfg.data = str(out.path / "data")
    out.begin(run_config(cfg, settings, model, model_cfg, out.path, steps), start_step if resume else None)
    if records is not None and world.rank() == 0:
        out.save_records(records)
    out.save_tokenizer(tokenizer)
    rows = "packed rows" if cfg.pack else "examples"
    say(f"training {steps} steps of {cfg.batch_size} {rows} ({_recipe(cfg, world)}) -> {out.path}")
    if world.rank() == 0 and cfg.report_to:
        opened = open_trackers(cfg.report_to, out.path, cfg.to_dict(), cfg.project_name)
        out.listeners.extend(t.log for t in opened)
        closing.extend(t.close for t in opened)

    if cfg.grad_checkpoint:
        models.grad_checkpoint(model)
    run = Run(model, tokenizer, cfg, out.path, last_checkpoint=resume.checkpoint if resume else None)
    held = heldout.heldout_problems(cfg, tokenizer) if world.rank() == 0 else None
    bar.phase("evaluating")
    before = _accuracy(model, tokenizer, cfg, held, run, out, 0, say) if start_step == 0 else None
    save = out.saver(model, method, optimizer, steps, cfg.grad_accumulation_steps, cfg.keep_checkpoints)
    loop = LoopConfig.from_options(cfg, steps)
    try:
        train_loop(model, optimizer, loss_fn, train_set, val_set, loop, run, start_step=start_step,
                   save=save, record=out.record, callbacks=callbacks, progress=bar, log=say,
                   warmup_loss_fn=warmup_loss_fn)  # fmt: skip
    except KeyboardInterrupt:
        raise Interrupted(_interrupted(run, out.path)) from None
    _test(cfg, splits, model, loss_fn, run, out, say)
    bar.phase("evaluating")
    after = _accuracy(model, tokenizer, cfg, held, run, out, run.step, say)
    bar.close()
    out.release()
    say(f"saved {cfg.adapter} adapter to {out.path}")
    before_accuracy = before.accuracy if before is not None else out.recorded_value("accuracy", step=0)
    recipe = f"{_recipe(cfg, world)}, {cfg.adapter} on {cfg.model}, {run.step} steps"
    if run.stopped:
        recipe += f" (stopped: {run.stopped})"
    took = time.perf_counter() - started
    for line in heldout.summary(out.path, recipe, before_accuracy, after, held, took, cfg.data, cfg.loss):
        say(line)
    return run


# ------------------------------------------------------------------ the small print of the stages


def _test(cfg: TrainConfig, splits: dict, model, loss_fn, run: Run, out: OutputFolder, say) -> None:
    """``--test``: the test split's loss, recorded with the run's metrics."""
    if cfg.test and "test" in splits:
        out.record(test_report(model, loss_fn, splits["test"], cfg.batch_size, run, say))
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


def _recipe(cfg: TrainConfig, world: mx.distributed.Group) -> str:
    workers = f"{world.size()} worker{'s' if world.size() > 1 else ''}"
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
