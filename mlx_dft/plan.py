"""``mlx_dft plan``: the peak memory and step time of a training run, before loading anything.

Everything comes from the model's ``config.json`` (a local folder, or a Hub id read from the
cache): the model is built with lazy arrays, which are never materialised, the run's adapter is
applied to it, and the sizes that decide memory are read off it. The peak is

    weights + trainable x (gradient, optimizer state) + activations kept for the backward pass
    + logits of one loss chunk (or the softmax the CPU loss keeps) + a constant,

with the activations of the blocks the backward pass runs through (from the first trained block
on) ``4 B L (a h + b i) + 4 B heads L^2 c`` bytes per block (the attention probabilities of MLX's
unfused attention), or, with gradient checkpointing, each block's input plus one block's worth.
The constants ``a, b, c, d`` and the constant term are fitted to the peaks measured by
``scripts/plan_grid.py`` on this kind of machine (tests/data/plan_measurements.json;
tests/test_plan.py checks every estimate against its measurement, within 15%).

The step time is the step's matrix-multiply FLOPs (4 per parameter and token through the blocks
the backward pass runs through, 6 for fully trained blocks, 2 for blocks before them, the output
projection, and attention) over this machine's float32 matmul rate, measured in about a second,
times a fitted efficiency.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_dft.config import TrainConfig
from mlx_dft.errors import UserError

# Bytes per unit of each term of :func:`estimate`, fitted by ``scripts/plan_grid.py --fit`` (non-negative
# least squares, relative errors) to tests/data/plan_measurements.json; see the module doc.
COEFFICIENTS = {
    "kept_hidden": 0.0,  # per hidden unit, token and block the backward pass runs through
    "kept_intermediate": 0.0,  # ... per MLP unit
    "kept_scores": 1.048,  # ... per head and key position
    "adapter_inputs": 3.073,  # inputs LoRA, DoRA and full keep for their weight gradients
    "block_hidden": 35.41,  # the backward pass of one block at a time, per hidden unit and token
    "block_scores": 0.0,  # ... per head, query and key position
    "recomputed_scores": 5.717,  # ... more with gradient checkpointing (its forward runs again)
    "aligner_hidden": 12.27,  # what the Aligner's prefix attention keeps per hidden unit, token, block
    "dora_weights": 4.503,  # DoRA's W + BA of every adapted block, in float32
    "loss": 5.093,  # float32 logit chunks of the loss alive at once
    "kept_softmax": 0.3704,  # the softmax the CPU loss keeps (freed before the blocks' backward peak)
    "gated_delta": 1.0,  # one gated-delta layer's chunked recurrence, backward (counted, not fitted)
    "gated_delta_kept": 1.0,  # what gated-delta layers keep for the backward pass (counted, not fitted)
    "constant": 0.0,  # per MB
}
COUNTED = ("gated_delta", "gated_delta_kept")  # constants counted from the code, not fitted to runs
MATMUL_EFFICIENCY = 0.476  # share of the measured matmul rate a training step reaches
STEP_OVERHEAD_S = 0.137

MEMORY_SHARE = 0.8  # of physical memory a run may take (the OS and the rest keep the remainder)


class _Peak:
    """The peak of the parts a plan names, and whether it fits its ``memory`` (0: unknown)."""

    weights: float
    optimizer: float
    activations: float
    loss: float
    memory: float

    @property
    def peak(self) -> float:
        return self.weights + self.optimizer + self.activations + self.loss

    @property
    def fits(self) -> bool:
        return not self.memory or self.peak <= self.memory


@dataclass
class Plan(_Peak):
    model: str
    model_type: str
    parameters: int
    trainable: int
    batch: int
    length: int
    device: str
    dtype: str
    weights: float  # bytes
    optimizer: float
    activations: float
    loss: float
    memory: float  # this machine's usable memory, bytes (0: unknown)
    flops: float  # per step
    gflops: float  # measured float32 matmul rate
    notes: list[str] = field(default_factory=list)
    terms: dict = field(default_factory=dict)  # activation and loss sizes before their constants
    known: float = 0.0  # the bytes that need no constant: weights, optimizer, checkpoints
    layout: str = ""  # vocabulary, kinds of blocks, experts, loss path (:func:`layout`)
    largest_unit: float = 0.0  # bytes of the largest block, embedding or output projection

    @property
    def tokens(self) -> int:
        return self.batch * self.length

    @property
    def step_seconds(self) -> float:
        return self.flops / (self.gflops * 1e9 * MATMUL_EFFICIENCY) + STEP_OVERHEAD_S


def _bytes(dtype: str) -> int:
    return 2 if dtype in ("bfloat16", "float16") else 4


def _compute_dtype(cfg: TrainConfig, config: dict) -> str:
    if cfg.dtype != "auto":
        return cfg.dtype
    if mx.default_device() == mx.cpu:
        return "float32"
    stored = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    return stored if stored in ("bfloat16", "float16") else "float32"


def model_config_only(model: str) -> tuple[Path, dict]:
    """The model's folder (only its config.json fetched for a Hub id) and its config."""
    from mlx_dft.files import local_or_hub
    from mlx_dft.models import model_config

    if str(model).lower().endswith(".gguf"):
        raise UserError(f"{model}: plan reads a config.json; convert the GGUF file first (mlx_dft convert)")
    path = local_or_hub(model, ["config.json"], "model")
    if not (path / "config.json").is_file():
        raise UserError(f"model folder {path} has no config.json")
    return path, model_config(path)


def matmul_gflops(hidden: int, intermediate: int, tokens: int, seconds: float = 0.3) -> float:
    """The best float32 matmul rate (GFLOP/s) on the default device at a block's shapes."""
    best = 0.0
    tokens = max(64, min(tokens, 4096))
    for k, n in ((hidden, hidden), (hidden, intermediate), (intermediate, hidden)):
        a, b = mx.random.normal((tokens, k)), mx.random.normal((k, n))
        mx.eval(a, b, a @ b)
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            mx.eval(a @ b)
            reps += 1
        best = max(best, 2.0 * tokens * k * n * reps / (time.perf_counter() - t0) / 1e9)
    return best


def usable_memory() -> float:
    """Bytes a run may use here: Metal's recommended working set on a Mac, else a share of RAM."""
    from mlx_dft.models import physical_memory

    if mx.default_device() != mx.cpu:
        try:
            info = mx.device_info()
            limit = info.get("max_recommended_working_set_size") or info.get("memory_size")
            if limit:
                return float(limit)
        except (AttributeError, RuntimeError):
            pass
    return MEMORY_SHARE * physical_memory()


def _span(cfg: TrainConfig, n_layers: int) -> list[int]:
    """The blocks the backward pass runs through: from the first trained one to the last."""
    from mlx_dft import adapters

    trained = adapters.method(cfg.adapter).trained_blocks(cfg, n_layers)
    return list(range(min(trained, default=n_layers - 1), n_layers))


def _linear_params(module: nn.Module) -> int:
    return sum(
        m.weight.size for _, m in module.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))
    )


def _gated_delta_layer(block: nn.Module) -> nn.Module | None:
    """The block's gated-delta layer (qwen3_5's ``linear_attn``...), if it has one."""
    from mlx_dft.patches import is_gated_delta

    return next((m for _, m in block.named_modules() if is_gated_delta(m)), None)


def _gated_delta_kept(layer: nn.Module) -> int:
    """Values a token a gated-delta layer keeps for its backward pass besides its input (counted
    from qwen3_5's ``GatedDeltaNet``): the projection and the convolution's output (``conv_dim``
    each), queries and keys before and after their norm (``4 key_dim``), values, the output gate,
    the recurrence's output and the gated norm's (``4 value_dim``); 0 for a layer without those
    sizes."""
    sizes = [getattr(layer, a, None) for a in ("conv_dim", "key_dim", "value_dim")]
    if not all(isinstance(s, int) for s in sizes):
        return 0
    conv, key, value = sizes
    return 2 * conv + 4 * key + 4 * value


def _gated_delta_bytes(layer: nn.Module, batch: int, length: int) -> float:
    """What one gated-delta layer's chunked recurrence holds at once in its backward pass
    (:mod:`mlx_dft.gated_delta`, recomputed there): float32 [chunk, chunk] matrices of every chunk
    and head (decays, the triangular system and its inverse's rows, scores: about 16), about 8
    [token, head dim] arrays per head, and the state at each chunk boundary; with per-dimension
    gates (a ``dt_bias`` per key dimension) the chunks are shorter and their decays [chunk, chunk,
    d_k], about 4 of them at once. MLX's backward pass holds about 2.8 times what these name at its
    peak (measured over a layer's inputs: 857 MB at batch 2 x 1,024 tokens x 16 heads of 128, 415 MB
    at 2 x 512, 72 MB at 1 x 1,024 x 4 heads of 64; 213 MB with per-dimension gates, 2.5 times)."""
    from mlx_dft.gated_delta import CHUNK, VECTOR_CHUNK

    heads = next((getattr(layer, a) for a in ("num_v_heads", "num_heads") if hasattr(layer, a)), None)
    dk = next((getattr(layer, a) for a in ("head_k_dim", "head_dim") if hasattr(layer, a)), None)
    dv = getattr(layer, "head_v_dim", dk)
    if not (heads and dk and dv):
        return 0.0
    vector = getattr(layer, "dt_bias", mx.zeros(0)).size > heads
    c = min(VECTOR_CHUNK if vector else CHUNK, max(2, 1 << (length - 1).bit_length()))
    n = -(-length // c)
    decays = 4 * n * c * c * dk if vector else 0
    return 2.8 * 4.0 * batch * heads * (16 * n * c * c + decays + 8 * length * max(dk, dv) + n * dk * dv)


def estimate(cfg: TrainConfig, length: int | None = None, gflops: float | None = None) -> Plan:
    """The plan of a run of ``cfg`` (``cfg.model``; rows of ``length`` tokens, default
    --max-seq-length); ``gflops`` given skips measuring the matmul rate."""
    from mlx_dft import adapters
    from mlx_dft.models import build_model, default_model_path, model_type, text_config, vocab_size

    name = cfg.model or str(default_model_path())
    path, outer = model_config_only(name)
    config = text_config(outer)
    model = build_model(outer, str(path))  # lazy arrays: nothing is computed or loaded
    kind = model_type(model)
    method = adapters.method(cfg.adapter)
    method.apply(model, method.settings(cfg, model))
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    notes: list[str] = []

    dtype = _compute_dtype(cfg, config)
    width = _bytes(dtype)
    quant = config.get("quantization") or config.get("quantization_config")
    on_cpu = mx.default_device() == mx.cpu
    kept = bool(quant) and (cfg.keep_quantized or not on_cpu or method.trains_base_weights)
    if quant and not kept:
        notes.append("the quantized base computes in float32 on the CPU (--keep-quantized keeps it)")
    if kept and isinstance(quant, dict) and "bits" in quant:
        per = quant["bits"] / 8 + 4 / quant.get("group_size", 64)  # packed weight + fp16 scale, bias
        quantized = _linear_params(model) + model.model.embed_tokens.weight.size  # (every mlx-lm text model)
        weights = quantized * per + (total - trainable - quantized) * 2 + trainable * width
    else:
        weights = total * width

    slots = {"adamw": 2, "adam": 2, "sgd": 0}.get(cfg.optimizer, 2) + 1  # + the gradient
    slots += 1 if cfg.grad_accumulation_steps > 1 else 0
    optimizer = trainable * 4 * slots

    n_layers = len(model.layers)
    span = _span(cfg, n_layers)
    h, inter = config["hidden_size"], config.get("intermediate_size", 4 * config["hidden_size"])
    heads = config.get("num_attention_heads", 1)
    length = length or cfg.max_seq_length
    length = int(math.ceil(max(length - 1, 1) / 16) * 16)  # inputs, padded as batches are
    b = cfg.batch_size
    # The terms of the peak before their constants (the fit's features, kept on the plan); 4 B L
    # and 4 B heads L^2 are float32 activations of a token and attention scores of a head.
    kept_blocks = 0 if cfg.grad_checkpoint else len(span)
    vocab = vocab_size(model)
    from mlx_dft.config import loss_of
    from mlx_dft.losses import auto_chunk_tokens, keep_tokens
    from mlx_dft.models import split_model

    chunk = min(cfg.loss_chunk_tokens or auto_chunk_tokens(vocab), b * length)
    # supervised tokens whose softmax the loss keeps (every token of a row, at most)
    keep = keep_tokens(split_model(model, probe=False).head, loss_of(cfg), vocab)
    kept_softmax = b * length if b * length <= keep else 0
    tok, scores = width * b * length, width * b * heads * length**2
    deltas = [i for i in span if _gated_delta_layer(model.layers[i]) is not None]
    kept_attention = kept_blocks - (0 if cfg.grad_checkpoint else len(deltas))  # no L^2 scores there
    terms = {
        "kept_hidden": kept_blocks * tok * h,
        "kept_intermediate": kept_blocks * tok * inter,
        "kept_scores": kept_attention * scores,
        "adapter_inputs": kept_blocks * tok * (3 * h + inter) if method.keeps_layer_inputs else 0.0,
        "block_hidden": tok * h,
        "block_scores": scores,
        "recomputed_scores": scores if cfg.grad_checkpoint else 0.0,
        "aligner_hidden": 0.0,
        "dora_weights": 0.0,
        "loss": 4.0 * chunk * vocab,
        "kept_softmax": 4.0 * kept_softmax * vocab,
        "gated_delta": max(
            (_gated_delta_bytes(_gated_delta_layer(model.layers[i]), b, length) for i in deltas), default=0.0
        ),
        "gated_delta_kept": 0.0 if cfg.grad_checkpoint else sum(
            _gated_delta_kept(_gated_delta_layer(model.layers[i])) for i in deltas
        ) * tok,
        "constant": 1e6,
    }
    trained = method.trained_blocks(cfg, n_layers)
    for key, value in method.plan_terms(model, trained, kept_blocks, tok).items():
        if key not in COEFFICIENTS:
            raise ValueError(f"{cfg.adapter}: plan term {key!r} has no fitted constant")
        terms[key] = value
    checkpoints = len(span) * tok * h if cfg.grad_checkpoint else 0
    loss_terms = ("loss", "kept_softmax")
    activations = sum(COEFFICIENTS[k] * v for k, v in terms.items() if k not in loss_terms) + checkpoints
    loss = sum(COEFFICIENTS[k] * terms[k] for k in loss_terms)

    # FLOPs of one step: matmuls through the blocks (x4 in the backward span, x6 fully trained,
    # x2 before it; gradient checkpointing runs the span's forward again, +2), the output
    # projection (x4), and attention (QK^T and PV: 4 L^2 d per head, x3 in the span, +1 again).
    tokens = b * length
    per_layer = [_linear_params(blk) for blk in model.layers]
    head_dim = config.get("head_dim") or h // heads
    again = 1 if cfg.grad_checkpoint else 0
    factor = (6 if method.trains_base_weights else 4) + 2 * again
    flops = sum((factor if i in span else 2) * p * tokens for i, p in enumerate(per_layer))
    flops += 4 * vocab * h * tokens
    attention = 4 * b * length**2 * head_dim * heads  # none in gated-delta layers (their chunks' few
    flops += sum(  # GFLOP are left out beside the projections)
        (3 + again if i in span else 1) * attention
        for i in range(n_layers)
        if _gated_delta_layer(model.layers[i]) is None
    )
    if gflops is None:
        gflops = matmul_gflops(h, inter, tokens)
    plan = Plan(name, kind, total, trainable, b, length, "cpu" if on_cpu else "gpu", dtype, weights,
                optimizer, activations, loss, usable_memory(), flops, gflops, notes, terms,
                weights + optimizer + checkpoints)  # fmt: skip
    plan.layout = layout(model, vocab)
    units = [sum(v.size for _, v in tree_flatten(blk.parameters())) for blk in model.layers]
    units += [v.size for k, v in tree_flatten(model.parameters()) if "layers." not in k and v.ndim >= 2]
    plan.largest_unit = max(units, default=0) * width
    return plan


@dataclass
class ShardedPlan(_Peak):
    """One process's share of a run sharded over ``machines`` (``--shard fsdp``)."""

    machines: int
    weights: float  # this process's part of every weight, plus the unit gathered whole
    gathered: float  # of which: the largest unit whole, twice (forward, and backward with its gradient)
    optimizer: float
    activations: float
    loss: float
    memory: float  # each machine's usable memory (0: unknown)
    whole: float = 0.0  # the whole weights, which every process gathers back after training

    @property
    def peak(self) -> float:
        return max(self.weights + self.optimizer + self.activations + self.loss, self.whole)


def estimate_sharded(
    cfg: TrainConfig, machines: int, memory: float = 0.0, length: int | None = None,
    gflops: float | None = None,
) -> ShardedPlan:
    """The peak of one of ``machines`` processes of an FSDP run of ``cfg`` (the global batch
    ``--batch-size`` split between them, each with ``memory`` bytes usable): the weights, gradients
    and optimizer state 1/N each; the largest unit (a block, the embedding or the output
    projection) gathered whole twice at once at most (its weights, then its weights and gradient in
    the backward pass); the activations and loss of its share of the batch. At least the whole
    weights: every process gathers them back after training (the test report and generation that
    follow), so no number of machines makes a model whose weights exceed one fit."""
    import dataclasses

    if machines < 1:
        raise UserError(f"--machines {machines} must be at least 1")
    share = dataclasses.replace(cfg, batch_size=max(1, -(-cfg.batch_size // machines)))
    p = estimate(share, length, gflops)
    gathered = 2 * p.largest_unit if machines > 1 else 0.0
    return ShardedPlan(machines, p.weights / machines + gathered, gathered, p.optimizer / machines,
                       p.activations, p.loss, memory, p.weights)  # fmt: skip


def smallest_machines(
    cfg: TrainConfig, memory: float, length: int | None, gflops: float, most: int = 64
) -> int:
    """The fewest machines of ``memory`` bytes each an FSDP run of ``cfg`` fits on (0: none up to
    ``most``)."""
    return next(
        (n for n in range(1, most + 1) if estimate_sharded(cfg, n, memory, length, gflops).fits), 0
    )


def layout(model: nn.Module, vocab: int) -> str:
    """What the planner sees of an architecture: vocabulary, the kinds of blocks (attention,
    sliding-window, linear-attention, convolution), experts, and the loss path."""
    from mlx_dft.models import expert_types, split_model

    kinds: dict[str, int] = {}
    for block in model.layers:
        names = {p.split(".")[0] for p, _ in block.named_modules() if p}
        if "linear_attn" in names:
            kind = "linear-attention"
        elif "conv" in names:
            kind = "convolution"
        elif getattr(block, "use_sliding", False) or getattr(block, "is_sliding", False):
            kind = "sliding-window attention"
        else:
            kind = "attention"
        kinds[kind] = kinds.get(kind, 0) + 1
    blocks = ", ".join(f"{n} {k}" for k, n in kinds.items())
    experts = [m.weight.shape[0] for m in model.modules() if isinstance(m, expert_types())]
    moe = f"; {max(experts)} experts a layer" if experts else ""
    fast = split_model(model, probe=False).fast
    path = "hidden states (logits at supervised positions only)" if fast else "full logits"
    return f"vocabulary {vocab:,}; blocks: {blocks}{moe}; loss path: {path}"


def _largest(cfg: TrainConfig, field_name: str, lo: int, hi: int, gflops: float, length: int | None) -> int:
    """The largest value of ``field_name`` in [lo, hi] whose plan fits (0 if none)."""
    import dataclasses

    def fits(v: int) -> bool:
        c = dataclasses.replace(cfg, **{field_name: v})
        return estimate(c, v if field_name == "max_seq_length" else length, gflops).fits

    if not fits(lo):
        return 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


TOKENIZER_FILES = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def data_length(cfg: TrainConfig, notes: list[str] | None = None) -> int | None:
    """The longest example of the run's data (``--data``, else the bundled task, as train reads
    it; capped at --max-seq-length): the padded length of its longest batch. None with --pack
    (rows are --max-seq-length long), and None, with a line in ``notes``, when the model has no
    tokenizer to read the data with."""
    if cfg.pack:
        return None
    from mlx_lm.utils import load_tokenizer

    from mlx_dft import data
    from mlx_dft.files import local_or_hub
    from mlx_dft.models import default_model_path
    from mlx_dft.tasks import ARITH_DIR

    try:
        path = local_or_hub(cfg.model or str(default_model_path()), TOKENIZER_FILES, "model")
        tokenizer = load_tokenizer(path)
        if not tokenizer.encode("Hello, world"):  # transformers 5 builds an empty one from config.json alone
            raise ValueError("an empty tokenizer")
    except Exception as e:  # noqa: BLE001  (no tokenizer files, or none that load: say so, plan on)
        if notes is not None:
            notes.append(
                f"no tokenizer to read the data with ({type(e).__name__}): rows planned at "
                f"--max-seq-length {cfg.max_seq_length}"
            )
        return None
    options = data.DataConfig.from_options(cfg)
    splits = data.load_datasets(cfg.data or str(ARITH_DIR), tokenizer, options, cfg.hf_config, cfg.hf_splits)
    return min(cfg.max_seq_length, max(len(t) for t in splits["train"].tokens))


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def parse_memory(text: str) -> float:
    """Bytes of ``64GB``, ``512 MB``, ``1.5TB`` (decimal units; a bare number is GB)."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(TB|GB|MB|T|G|M)?\s*", str(text), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"--memory {text!r}: give a size such as 64GB or 512MB")
    unit = (m.group(2) or "GB").upper()[0]
    return float(m.group(1)) * {"T": 1e12, "G": 1e9, "M": 1e6}[unit]


def sharded_lines(
    cfg: TrainConfig, machines: int | None, memory: float, length: int | None, gflops: float
) -> list[str]:
    """``mlx_dft plan --shard fsdp [--machines N] [--memory 64GB]``: one machine's peak, and the
    fewest machines of that memory the run fits on."""
    lines = []
    if machines:
        s = estimate_sharded(cfg, machines, memory, length, gflops)
        of = f" of {_gb(memory)}" if memory else ""
        lines += [
            f"sharded over {machines} machines (--shard fsdp), each process:",
            f"  weights           {_gb(s.weights)}  (1/{machines} of each, plus {_gb(s.gathered)} "
            "gathered whole at once)",
            f"  gradients + {cfg.optimizer:<5} {_gb(s.optimizer)}",
            f"  activations       {_gb(s.activations)}  (its {max(1, -(-cfg.batch_size // machines))} "
            f"of the batch of {cfg.batch_size})",
            f"  loss (logits)     {_gb(s.loss)}",
            f"  peak (estimate)   {_gb(s.peak)}{of}: " + ("fits" if s.fits else "does NOT fit"),
        ]
        if s.peak == s.whole:
            lines.append(f"note: each process gathers the whole weights after training ({_gb(s.whole)})")
    if memory:
        n = smallest_machines(cfg, memory, length, gflops)
        lines.append(
            f"fewest machines of {_gb(memory)} for --shard fsdp: {n}" if n
            else f"no number of machines up to 64 of {_gb(memory)} fits this run with --shard fsdp"
        )
    return lines


def report(
    cfg: TrainConfig, machines: int | None = None, memory: str | float | None = None
) -> tuple[Plan, list[str]]:
    """The plan of ``cfg`` and the lines ``mlx_dft plan`` prints; with ``machines`` or under
    ``--shard fsdp``, one machine's share of the run sharded over them, and with ``memory`` (each
    machine's, e.g. ``"64GB"``) the fewest machines it fits on."""
    notes: list[str] = []
    length = data_length(cfg, notes)
    p = estimate(cfg, length)
    p.notes.extend(notes)
    mem = parse_memory(memory) if isinstance(memory, str) else float(memory or 0)
    if machines is not None and machines < 1:
        raise UserError(f"--machines {machines} must be at least 1")
    if getattr(cfg, "shard", "none") == "fsdp" or machines or mem:
        sharded = sharded_lines(cfg, machines or (None if mem else 2), mem or p.memory, length, p.gflops)
    else:
        sharded = []
    lines = [
        f"plan: {p.model} ({p.model_type}, {p.parameters / 1e6:,.1f}M parameters)",
        f"  {p.layout}",
        f"  {cfg.adapter} trains {p.trainable:,}; batch {p.batch} x {p.length} tokens"
        f"{' (packed rows)' if cfg.pack else ''}, {p.dtype} on the {p.device}",
        f"  weights           {_gb(p.weights)}",
        f"  gradients + {cfg.optimizer:<5} {_gb(p.optimizer)}",
        f"  activations       {_gb(p.activations)}"
        + ("  (gradient checkpointing)" if cfg.grad_checkpoint else ""),
        f"  loss (logits)     {_gb(p.loss)}",
        f"  peak (estimate)   {_gb(p.peak)} of {_gb(p.memory)} usable here: "
        + ("fits" if p.fits else "does NOT fit"),
        f"  step time         ~{p.step_seconds:.2f} s, ~{p.tokens / p.step_seconds:,.0f} tokens/s",
        f"                    (float32 matmul measured here at {p.gflops:.0f} GFLOP/s)",
    ]
    lines += [f"note: {n}" for n in p.notes]
    gflops = p.gflops
    if p.memory:
        import dataclasses

        batch = _largest(cfg, "batch_size", 1, 4096, gflops, length)
        seq = _largest(cfg, "max_seq_length", 16, 131072, gflops, None)
        at = f"{p.length} tokens"
        fit_batch = f"--batch-size {batch} at {at}" if batch else f"no batch fits at {at}"
        if seq:
            fit_seq = f"--max-seq-length {seq} at batch {p.batch}"
        else:
            one = _largest(dataclasses.replace(cfg, batch_size=1), "max_seq_length", 16, 131072, gflops, None)
            fit_seq = f"--max-seq-length {one} at batch 1" if one else "not even 16 tokens at batch 1"
        lines += ["largest that fit:", f"  {fit_batch}", f"  {fit_seq}"]
    if not p.fits or not cfg.grad_checkpoint:
        import dataclasses

        tips = []
        if not cfg.grad_checkpoint:
            ck = estimate(dataclasses.replace(cfg, grad_checkpoint=True), length, gflops)
            tips.append(f"--grad-checkpoint: peak {_gb(ck.peak)}")
        if p.device == "gpu" and p.weights >= 2 * p.parameters:
            tips.append("a 4-bit base (QLoRA) takes a quarter of the weights' memory")
        if not cfg.pack and length is not None and length < cfg.max_seq_length:
            tips.append("--pack: rows of several short examples (no padding)")
        if tips:
            lines += ["to use less memory or time:", *(f"  {t}" for t in tips)]
    return p, lines + sharded
