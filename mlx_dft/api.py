"""The Python API: everything ``mlx_dft train`` / ``generate`` do, as one call each.

import mlx_dft
run = mlx_dft.train(loss="dft", adapter="lora", iters=200, learning_rate=1e-4)
print(run.latest("val_loss"), run.output)
text = mlx_dft.generate("Question: ...", adapter=run.output)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlx_dft import __version__, _blas
from mlx_dft import adapters as adapters_mod
from mlx_dft import checkpoint as ckpt
from mlx_dft.config import FIELDS, TrainConfig, build_config, load_yaml, normalise
from mlx_dft.data import DataConfig, batches_per_epoch, load_datasets, set_chat_template
from mlx_dft.errors import UserError
from mlx_dft.losses import LossConfig, auto_chunk_tokens
from mlx_dft.models import default_model_path, load_model, model_type, split_model, vocab_size
from mlx_dft.tasks import ARITH_DIR
from mlx_dft.trainer import Callback, LoopConfig, Run, build_optimizer, evaluate, make_loss_fn, train_loop

# Keys of the training config that identify the model and adapter a checkpoint belongs to.
SIGNATURE_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
)
NOT_INHERITED = ("output", "resume", "overwrite")


def _say(world_rank: int):
    def say(msg: str) -> None:
        if world_rank == 0:
            print(msg, flush=True)

    return say


def model_signature(config: dict) -> dict:
    return {k: config.get(k) for k in SIGNATURE_KEYS if k in config}


def resolve_config(options: dict) -> tuple[TrainConfig, dict | None, Path | None]:
    """Merge defaults < resumed run's config < YAML file < explicit options."""
    options = {k: v for k, v in options.items() if v is not None}
    config_file = options.pop("config", None)
    explicit = normalise(options, "option")
    file_layer = load_yaml(config_file) if config_file else {}
    resume = explicit.get("resume") or file_layer.get("resume")
    saved_layer, checkpoint, saved = {}, None, None
    if resume:
        checkpoint = ckpt.find_checkpoint(resume)
        saved = adapters_mod.read_adapter_config(checkpoint)
        training = saved.get("training", {})
        saved_layer = {k: v for k, v in training.items() if k in FIELDS and k not in NOT_INHERITED}
        if "output" not in explicit and "output" not in file_layer:
            # Continue in the run's own folder (the checkpoint's grandparent).
            saved_layer["output"] = str(checkpoint.parent.parent)
            saved_layer["overwrite"] = True
    cfg = build_config(saved_layer, file_layer, explicit)
    return cfg, saved, checkpoint


def _default_output(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.loss}-{cfg.adapter}"


def _check_output(out: Path, cfg: TrainConfig, resuming: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} exists and is not a folder")
    if (out / adapters_mod.CONFIG_FILE).exists() and not (cfg.overwrite or resuming):
        raise UserError(
            f"--output {out} already holds a run: pass --resume {out} to continue it, "
            "--overwrite to replace it, or choose another --output"
        )


def _check_resume(
    saved: dict, adapter_settings: dict, cfg: TrainConfig, model_cfg: dict, checkpoint: Path
) -> None:
    sig_then, sig_now = saved.get("model_signature", {}), model_signature(model_cfg)
    if sig_then and sig_then != sig_now:
        diff = ", ".join(
            f"{k} {sig_then.get(k)} vs {sig_now.get(k)}" for k in sig_now if sig_then.get(k) != sig_now.get(k)
        )
        raise UserError(f"checkpoint {checkpoint} was trained on a different model ({diff})")
    then = saved.get("adapter") or saved.get("fine_tune_type")
    if then != cfg.adapter:
        raise UserError(f"checkpoint {checkpoint} holds a {then} adapter, this run trains {cfg.adapter}")
    for key, value in adapter_settings.items():
        if saved.get(key) != value and json.loads(json.dumps(value)) != saved.get(key):
            raise UserError(f"checkpoint {checkpoint} has {key}={saved.get(key)}, this run has {value}")


def total_steps(cfg: TrainConfig, n_batches: int) -> int:
    if cfg.iters is not None:
        return cfg.iters
    epochs = cfg.epochs if cfg.epochs is not None else 1.0
    return max(1, math.ceil(epochs * n_batches / cfg.grad_accumulation_steps))


def train(
    config: TrainConfig | dict | str | Path | None = None,
    *,
    callbacks: Iterable[Callback] = (),
    progress: bool = True,
    **options,
) -> Run:
    """Fine-tune a model; the keyword options are ``mlx_dft train``'s long options in snake case.
    ``config`` is a YAML file (as ``--config``), a dict of options or a :class:`TrainConfig`;
    keyword options override it. Returns the finished :class:`Run` (history, output folder)."""
    if isinstance(config, (str, Path)):
        options = {"config": str(config), **options}
    elif isinstance(config, TrainConfig):
        options = {**{k: v for k, v in config.to_dict().items() if v != FIELDS[k].default}, **options}
    elif isinstance(config, dict):
        options = {**config, **options}
    explicit_options = dict(options)
    cfg, saved, checkpoint = resolve_config(options)

    world = mx.distributed.init()
    rank = world.rank()
    say = _say(rank)
    blas = _blas.info()
    if mx.default_device() == mx.cpu:
        say(blas.describe())

    source_dir = source_tmp = None
    if cfg.adapter_from and checkpoint is None:
        from mlx_dft.interop.convert import adapter_kind, as_local_adapter

        # Converted before the model loads: without --model, the adapter's base model is used.
        source_dir, source_tmp = as_local_adapter(cfg.adapter_from, cfg.model)
        source_cfg = adapters_mod.read_adapter_config(source_dir)
        kind = adapter_kind(source_cfg)
        if "adapter" in explicit_options and explicit_options["adapter"] != kind:
            raise UserError(f"--adapter-from {cfg.adapter_from} holds a {kind} adapter, not {cfg.adapter}")
        cfg.adapter = kind
        if cfg.model is None and source_cfg.get("base_model"):
            cfg.model = source_cfg["base_model"]
    model_id = cfg.model or str(default_model_path())
    data_id = cfg.data or str(ARITH_DIR)
    mx.random.seed(cfg.seed)
    model, tokenizer, model_cfg, model_path = load_model(model_id, cfg.dtype)
    if cfg.chat_template:
        set_chat_template(tokenizer, cfg.chat_template)

    data_cfg = DataConfig(
        mask_prompt=cfg.mask_prompt,
        max_seq_length=cfg.max_seq_length,
        use_chat_template=cfg.use_chat_template,
        text_feature=cfg.text_feature,
        prompt_feature=cfg.prompt_feature,
        completion_feature=cfg.completion_feature,
        chat_feature=cfg.chat_feature,
    )
    splits = load_datasets(data_id, tokenizer, data_cfg)
    train_set, val_set = splits["train"], splits.get("valid")
    for ds in splits.values():
        say(
            f"data {ds.name}: {len(ds)} {ds.format} examples, {ds.n_tokens:,} tokens "
            f"({ds.n_supervised:,} trained on)"
        )
        if ds.n_truncated:
            say(
                f"note: {ds.n_truncated} {ds.name} examples are longer than --max-seq-length "
                f"{cfg.max_seq_length} and were truncated (longest: {ds.longest} tokens)"
            )
        if ds.n_dropped:
            say(f"note: {ds.n_dropped} {ds.name} examples had no token to train on and were skipped")
        for w in ds.warnings:
            say(f"note: {w}")
    if val_set is None:
        say("note: no valid.jsonl: training without validation")
    n_batches = batches_per_epoch(train_set, cfg.batch_size)
    if n_batches == 0:
        raise UserError(
            f"the train split has {len(train_set)} examples, fewer than --batch-size {cfg.batch_size}"
        )
    if val_set is not None and len(val_set) == 0:
        val_set = None

    method = adapters_mod.method(cfg.adapter)
    if source_dir is not None:
        settings = method.settings_from_config(adapters_mod.read_adapter_config(source_dir))
    elif checkpoint is not None and cfg.adapter_from:
        settings = method.settings_from_config(saved)  # the settings the source adapter brought
    else:
        settings = method.settings(cfg, model)
    method.apply(model, settings)
    if source_dir is not None:
        import shutil

        for fname in adapters_mod.weight_files(cfg.adapter):
            adapters_mod.set_weights(
                model, adapters_mod.load_weights_file(source_dir / fname), str(source_dir / fname)
            )
        if source_tmp is not None:
            shutil.rmtree(source_tmp, ignore_errors=True)
        say(f"starting from the {cfg.adapter} adapter {cfg.adapter_from}")
    trainable, total = adapters_mod.count_parameters(model)
    detail = ""
    if cfg.adapter == "aligner":
        a = settings["aligner"]
        per = a["num_attention_heads"] if a["gate"] == "head" else 1
        detail = (
            f" = {a['tokens']} tokens x {a['hidden_size']} + "
            f"{a['num_hidden_layers'] - a['start_layer']} layers x {per} gate{'s' if per > 1 else ''}"
        )
    say(
        f"model {model_id} ({model_type(model)}): {total:,} parameters; {cfg.adapter} trains "
        f"{trainable:,}{detail} ({100 * trainable / max(total, 1):.3f}%)"
    )

    steps = total_steps(cfg, n_batches)
    eval_every = cfg.steps_per_eval or max(1, steps // 10)
    warmup = int(round(cfg.warmup * steps)) if cfg.warmup < 1 else int(cfg.warmup)
    warmup = min(warmup, steps)
    optimizer = build_optimizer(
        cfg.optimizer,
        cfg.resolved_learning_rate(),
        cfg.lr_schedule,
        warmup,
        steps,
        cfg.resolved_weight_decay(),
        (cfg.adam_beta1, cfg.adam_beta2),
    )

    start_step = 0
    if checkpoint is not None:
        _check_resume(saved, settings, cfg, model_cfg, checkpoint)
        for fname in adapters_mod.weight_files(cfg.adapter):
            adapters_mod.set_weights(
                model, adapters_mod.load_weights_file(checkpoint / fname), str(checkpoint / fname)
            )
        state = ckpt.read_state(checkpoint)
        start_step = int(state["step"])
        optimizer.init(model.trainable_parameters())
        optimizer.state = ckpt.load_optimizer_state(checkpoint)
        hi, lo = state["rng"]
        mx.random.seed((int(hi) << 32) | int(lo))  # restores the exact key (dropout stream)
        if start_step >= steps:
            raise UserError(
                f"checkpoint {checkpoint} is at step {start_step}, already at or past --iters {steps}"
            )
        say(f"resuming from {checkpoint} at step {start_step}")

    out = Path(cfg.output) if cfg.output else _default_output(cfg)
    _check_output(out, cfg, checkpoint is not None)
    if world.size() > 1:  # every rank has checked --output before rank 0 writes into it
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=world, stream=mx.cpu))
    adapter_config = {
        **settings,
        "adapter": cfg.adapter,
        "base_model": model_id,
        "model_signature": model_signature(model_cfg),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "mlx_dft_version": __version__,
        "training": {
            **cfg.to_dict(),
            "model": model_id,
            "data": data_id,
            "output": str(out),
            "learning_rate": cfg.resolved_learning_rate(),
            "weight_decay": cfg.resolved_weight_decay(),
            "total_steps": steps,
        },
    }
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_json(out / adapters_mod.CONFIG_FILE, adapter_config)
        metrics_path = out / "metrics.jsonl"
        if checkpoint is not None:
            ckpt.truncate_metrics(metrics_path, start_step)
        elif metrics_path.exists():
            metrics_path.unlink()
    say(
        f"training {steps} steps of {cfg.batch_size} examples ({cfg.loss} loss, lr "
        f"{cfg.resolved_learning_rate():g}, {world.size()} worker{'s' if world.size() > 1 else ''}) -> {out}"
    )

    def record(rec: dict) -> None:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def save(step: int) -> Path | None:
        if rank != 0:
            return None
        files = adapters_mod.adapter_weights(model, cfg.adapter)
        state = {
            "step": step,
            "rng": mx.random.state[0].tolist(),
            "total_steps": steps,
            "micro_batches": step * cfg.grad_accumulation_steps,
            "time": time.time(),
        }
        path = ckpt.save_checkpoint(
            out, step, files, optimizer.state, state, adapter_config, cfg.keep_checkpoints
        )
        for fname, arrays in files.items():
            ckpt.atomic_save_safetensors(out / fname, arrays)
        return path

    body, head, fast = split_model(model)
    chunk = cfg.loss_chunk_tokens or auto_chunk_tokens(vocab_size(model, model_cfg))
    loss_fn = make_loss_fn(body, head, fast, LossConfig(cfg.loss, cfg.dft_floor, cfg.dft_power), chunk)
    if cfg.grad_checkpoint:
        _grad_checkpoint(model)

    run = Run(model=model, tokenizer=tokenizer, config=cfg, output=out)
    loop = LoopConfig(
        total_steps=steps,
        batch_size=cfg.batch_size,
        grad_accumulation_steps=cfg.grad_accumulation_steps,
        steps_per_report=cfg.steps_per_report,
        steps_per_eval=eval_every,
        val_batches=cfg.val_batches,
        save_every=cfg.save_every,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
    )
    if checkpoint is not None:
        run.last_checkpoint = checkpoint
    train_loop(
        model,
        optimizer,
        loss_fn,
        train_set,
        val_set,
        loop,
        run,
        start_step=start_step,
        save=save,
        record=record if rank == 0 else None,
        callbacks=list(callbacks),
        progress=progress,
        log=say,
    )

    if cfg.test and "test" in splits:
        m = evaluate(model, loss_fn, splits["test"], cfg.batch_size, -1, world)
        rec = {
            "step": run.step,
            "test_loss": m["loss"],
            "test_ce": m["ce"],
            "test_prob": m["prob"],
            "test_ppl": m["ppl"],
        }
        run.history.append(rec)
        if rank == 0:
            record(rec)
        say(f"test loss {m['loss']:.4f} | ce {m['ce']:.4f} | ppl {m['ppl']:.3f} | p {m['prob']:.3f}")
    elif cfg.test:
        say("note: --test given but the data has no test.jsonl")
    say(f"saved {cfg.adapter} adapter to {out}")
    return run


def _grad_checkpoint(model: nn.Module) -> None:
    """Recompute each block in the backward pass (mlx-lm's mechanism: patches the block class)."""
    from mlx_lm.tuner.trainer import grad_checkpoint

    cls = type(model.layers[0])
    if not getattr(cls, "_mlx_dft_checkpointed", False):
        grad_checkpoint(model.layers[0])
        cls._mlx_dft_checkpointed = True


def load(model: str | None = None, adapter: str | Path | None = None, dtype: str = "auto"):
    """(model, tokenizer) with an adapter applied, ready for generation. ``adapter`` is an
    mlx_dft/mlx-lm folder, a PEFT LoRA/DoRA folder, our HF Aligner folder, an official Aligner
    ``.pth`` or a Hub repo id holding one (converted on the fly)."""
    if adapter is None:
        net, tokenizer, _, _ = load_model(model or str(default_model_path()), dtype)
        net.eval()
        return net, tokenizer
    from mlx_dft.interop.convert import as_local_adapter

    local, tmp = as_local_adapter(adapter, model)
    try:
        if model is None:
            model = adapters_mod.read_adapter_config(local).get("base_model")
        net, tokenizer, _, _ = load_model(model or str(default_model_path()), dtype)
        adapters_mod.load_adapter(net, local)
    finally:
        if tmp is not None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
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
) -> str:
    """Generate a completion of ``prompt``; ``chat`` wraps it in the chat template (default:
    when the tokenizer has one)."""
    from mlx_lm import generate as mlx_generate
    from mlx_lm.sample_utils import make_sampler

    net, tokenizer = loaded or load(model, adapter)
    use_chat = tokenizer.has_chat_template if chat is None else chat
    if use_chat:
        if not tokenizer.has_chat_template:
            raise UserError("--chat: this model's tokenizer has no chat template")
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    mx.random.seed(seed)
    sampler = make_sampler(temp=temperature, top_p=top_p)
    return mlx_generate(net, tokenizer, prompt, max_tokens=max_tokens, sampler=sampler, verbose=False)
