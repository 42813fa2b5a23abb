"""Data: jsonl records -> token sequences with a supervision mask -> padded batches.

Record formats (auto-detected, as mlx-lm's and TRL's):
- text:        {"text": "..."}                                   every token is trained on
- completions: {"prompt": "...", "completion": "..."}            the completion is trained on
               {"prompt": [messages], "completion": [messages]}  (TRL's conversational form: rendered
                                                                 with the chat template, the
                                                                 completion's turns trained on)
- chat:        {"messages": [{"role": ..., "content": ...}, ...]} every assistant turn is trained on

``mask_prompt=False`` trains on every token instead. Supervised responses end with EOS
(raw completions and text get one appended; chat templates end turns with their own
end-of-turn token) so the model learns to stop.

Batches group examples of similar length (fewer pad tokens), and are a pure function of
(seed, position), so a resumed run sees exactly the batches the uninterrupted run would.

Packing (:func:`pack_dataset`, ``--pack``) puts several examples in one row of up to
``max_seq_length`` tokens instead; each position carries its example's segment number, and the
loss turns segments into a block-diagonal causal attention mask
(:func:`mlx_dft.trainer.packed_attention`), so no example sees another.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_dft.errors import UserError
from mlx_dft.files import read_jsonl, time_limit

SPLITS = ("train", "valid", "test")
PAD_INPUTS_TO = 16  # input lengths are padded to a multiple of this (fewer recompiles)
PAD_TARGETS_TO = 32  # supervised-token counts likewise
SORT_WINDOW = 64  # batches per length-sorting window


@dataclass(frozen=True)
class DataConfig:
    mask_prompt: bool = True
    max_seq_length: int = 2048
    use_chat_template: bool | None = None  # None: for completions, if the tokenizer has one
    text_feature: str = "text"
    prompt_feature: str = "prompt"
    completion_feature: str = "completion"
    chat_feature: str = "messages"

    @classmethod
    def from_options(cls, cfg) -> DataConfig:
        """The data settings of a :class:`~mlx_dft.config.TrainConfig` (same field names)."""
        return cls(**{f: getattr(cfg, f) for f in cls.__dataclass_fields__})


@dataclass
class Dataset:
    """Tokenised examples of one split: ``tokens[i]`` and its 0/1 ``supervised[i]`` mask."""

    name: str
    tokens: list[np.ndarray]
    supervised: list[np.ndarray]
    format: str
    n_truncated: int = 0
    longest: int = 0
    n_dropped: int = 0
    warnings: list[str] = field(default_factory=list)
    # Packed rows (see :func:`pack_dataset`): each position's example within its row, from 1,
    # and the original examples of each row.
    segments: list[np.ndarray] | None = None
    rows: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_tokens(self) -> int:
        return int(sum(len(t) for t in self.tokens))

    @property
    def n_supervised(self) -> int:
        return int(sum(int(s.sum()) for s in self.supervised))


# ---------------------------------------------------------------- reading


def record_format(rec: dict, cfg: DataConfig) -> str | None:
    if cfg.prompt_feature in rec and cfg.completion_feature in rec:
        return "completions"
    if cfg.chat_feature in rec:
        return "chat"
    if cfg.text_feature in rec:
        return "text"
    return None


def detect_format(records: list, path: Path, cfg: DataConfig) -> str:
    first = None
    for lineno, rec in records:
        fmt = record_format(rec, cfg)
        if fmt is None:
            keys = ", ".join(sorted(rec)) or "none"
            raise UserError(
                f"{path} line {lineno}: unknown record format (keys: {keys}); expected "
                f"'{cfg.text_feature}', '{cfg.prompt_feature}'+'{cfg.completion_feature}' "
                f"or '{cfg.chat_feature}'"
            )
        if first is None:
            first = fmt
        elif fmt != first:
            raise UserError(
                f"{path} line {lineno}: mixed record formats ({fmt} here, {first} on the first line)"
            )
    return first


def find_splits(data: str | Path) -> dict[str, Path]:
    """{split: path} for a folder of {train,valid,test}.jsonl or a single training file."""
    path = Path(data).expanduser()
    if path.is_file():
        return {"train": path}
    if not path.is_dir():
        raise UserError(
            f"data not found: {path} (give a folder with train.jsonl/valid.jsonl or a .jsonl file)"
        )
    splits = {s: path / f"{s}.jsonl" for s in SPLITS if (path / f"{s}.jsonl").is_file()}
    if "train" not in splits:
        raise UserError(f"data folder {path} has no train.jsonl")
    return splits


# ---------------------------------------------------------------- tokenising


def _hf(tokenizer):
    return getattr(tokenizer, "_tokenizer", tokenizer)


def has_chat_template(tokenizer) -> bool:
    return bool(
        getattr(tokenizer, "has_chat_template", False) or getattr(_hf(tokenizer), "chat_template", None)
    )


class TemplateText(str):
    """A chat template's text, as it came from an adapter or a model folder: never read as a path."""


def read_chat_template(template: str) -> str:
    """The text of a chat template given as text or as the path of a file holding it. A string
    with a ``{`` is text (a Jinja template that uses the conversation always has one), as is a
    :class:`TemplateText`; anything else must be a file."""
    if isinstance(template, TemplateText) or "{" in template:
        return template
    p = Path(template).expanduser()
    try:
        is_file = p.is_file()
    except (OSError, ValueError):  # not a possible path
        is_file = False
    if is_file:
        try:
            return p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"chat template file {p}: unreadable ({e})") from None
    if p.suffix in (".jinja", ".j2", ".txt"):
        raise UserError(f"chat template file not found: {p}")
    # Neither a file nor a template: text without {{ }} or {% %} renders the same for every
    # conversation (the prompt dropped), which is never what was meant.
    shown = template if len(template) <= 60 else template[:57] + "..."
    raise UserError(f"--chat-template {shown!r} is neither a file nor a chat template (no {{{{ }}}} in it)")


def set_chat_template(tokenizer, template: str) -> None:
    """Use ``template`` (a Jinja string, or a path to a file holding one) for chat data."""
    _hf(tokenizer).chat_template = read_chat_template(template)
    if hasattr(tokenizer, "has_chat_template"):
        tokenizer.has_chat_template = True


def chat_prompt(tokenizer, text: str, chat: bool | None = None) -> str:
    """``text`` as the model sees it: wrapped as one user turn in the chat template with the
    generation prompt when ``chat`` (default: when the tokenizer has a template), else as it is."""
    use_chat = has_chat_template(tokenizer) if chat is None else chat
    if not use_chat:
        return text
    if tokenizer is None or not has_chat_template(tokenizer):
        raise UserError("--chat: this model's tokenizer has no chat template")
    return _render(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """``messages`` rendered by the tokenizer's chat template (refused without one)."""
    if not has_chat_template(tokenizer):
        raise UserError("this model's tokenizer has no chat template")
    return _render(tokenizer, messages, add_generation_prompt=add_generation_prompt)


# The longest one conversation may take to render (a real template takes milliseconds; a template
# from a stranger may loop for hours: transformers' sandbox bounds range() but not nested loops).
TEMPLATE_SECONDS = 10.0


def _render(tokenizer, messages, tools=None, add_generation_prompt=False) -> str:
    from jinja2 import TemplateError

    try:
        limit = f"the chat template ran past {TEMPLATE_SECONDS:g} s on one conversation"
        with time_limit(TEMPLATE_SECONDS, limit):
            return _hf(tokenizer).apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
            )
    except TemplateError as e:  # a syntax error, or the template's own raise_exception()
        raise UserError(f"the chat template failed: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def _encode_spans(tokenizer, text: str, spans: list[tuple[int, int]], add_special_tokens: bool):
    """Tokens of ``text`` and a mask of the tokens that start inside one of ``spans``."""
    hf = _hf(tokenizer)
    try:
        enc = hf(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        starts = [a for a, b in offsets]
    except (NotImplementedError, ValueError, TypeError):
        # Slow tokenizers have no offsets: locate span starts by encoding prefixes.
        ids = hf.encode(text, add_special_tokens=add_special_tokens)
        starts = None
    mask = np.zeros(len(ids), dtype=np.uint8)
    if starts is not None:
        for j, (s, (a, b)) in enumerate(zip(starts, offsets)):
            if b > a and any(lo <= s < hi for lo, hi in spans):
                mask[j] = 1
    else:
        for lo, hi in spans:
            n_lo = len(hf.encode(text[:lo], add_special_tokens=add_special_tokens))
            n_hi = len(hf.encode(text[:hi], add_special_tokens=add_special_tokens))
            mask[n_lo:n_hi] = 1
    return np.array(ids, dtype=np.int32), mask


def encode_record(rec: dict, fmt: str, tokenizer, cfg: DataConfig, warn: list) -> tuple:
    """(tokens, supervised mask) of one record."""
    eos = _hf(tokenizer).eos_token_id
    if fmt == "text":
        text = rec[cfg.text_feature]
        ids, mask = _encode_spans(tokenizer, text, [(0, len(text))], True)
        mask[:] = 1
        return _append_eos(ids, mask, eos)

    if fmt == "completions":
        prompt, completion = rec[cfg.prompt_feature], rec[cfg.completion_feature]
        if isinstance(prompt, list) and isinstance(completion, list):
            return _encode_conversational(prompt, completion, rec.get("tools"), tokenizer, cfg)
        if not (isinstance(prompt, str) and isinstance(completion, str)):
            raise ValueError(
                f"'{cfg.prompt_feature}' and '{cfg.completion_feature}' must both be strings, or both "
                f"lists of messages (TRL's conversational form), not {type(prompt).__name__} and "
                f"{type(completion).__name__}"
            )
        use_chat = cfg.use_chat_template
        if use_chat is None:
            use_chat = has_chat_template(tokenizer)
        if not use_chat:
            text = prompt + completion
            ids, mask = _encode_spans(tokenizer, text, [(len(prompt), len(text))], True)
            ids, mask = _append_eos(ids, mask, eos)
            return ids, (np.ones_like(mask) if not cfg.mask_prompt else mask)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return _encode_chat(messages, rec.get("tools"), tokenizer, cfg, warn)

    return _encode_chat(rec[cfg.chat_feature], rec.get("tools"), tokenizer, cfg, warn)


def _append_eos(ids, mask, eos):
    if eos is not None and (len(ids) == 0 or ids[-1] != eos):
        ids = np.append(ids, np.int32(eos))
        mask = np.append(mask, np.uint8(1))
    return ids, mask


def _check_messages(messages, what: str) -> None:
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError(f"'{what}' must be a list of {{role, content}} objects")


def _encode_conversational(prompt: list, completion: list, tools, tokenizer, cfg: DataConfig):
    """TRL's conversational prompt/completion: the chat template renders prompt + completion, and
    the completion's turns (everything after the prompt's generation prompt) are supervised."""
    if not has_chat_template(tokenizer):
        raise UserError(
            "conversational prompt/completion data needs a chat template and this model's tokenizer "
            "has none: pass --chat-template FILE.jinja (or a template string)"
        )
    _check_messages(prompt, cfg.prompt_feature)
    _check_messages(completion, cfg.completion_feature)
    if not completion:
        raise ValueError(f"'{cfg.completion_feature}' has no message to train on")
    full = _render(tokenizer, prompt + completion, tools)
    before = _render(tokenizer, prompt, tools, add_generation_prompt=True)
    if not full.startswith(before):
        raise ValueError("the chat template renders the prompt differently once the completion follows")
    spans = [(len(before), len(full))] if cfg.mask_prompt else [(0, len(full))]
    return _encode_spans(tokenizer, full, spans, False)


def _encode_chat(messages, tools, tokenizer, cfg: DataConfig, warn: list):
    if not has_chat_template(tokenizer):
        raise UserError(
            "chat data needs a chat template and this model's tokenizer has none: pass "
            "--chat-template FILE.jinja (or a template string), or use prompt/completion records"
        )
    _check_messages(messages, cfg.chat_feature)
    full = _render(tokenizer, messages, tools)
    spans = []
    if cfg.mask_prompt:
        stable = True
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            before = _render(tokenizer, messages[:i], tools, add_generation_prompt=True) if i else ""
            upto = _render(tokenizer, messages[: i + 1], tools)
            if not (full.startswith(upto) and upto.startswith(before)):
                stable = False
                break
            spans.append((len(before), len(upto)))
        if not stable:
            # The template renders earlier turns differently once later ones follow (e.g. it
            # drops reasoning): supervise the last assistant turn only.
            if "unstable" not in warn:
                warn.append("unstable")
            last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
            before = _render(tokenizer, messages[:last], tools, add_generation_prompt=True)
            spans = [(len(before), len(full))] if full.startswith(before) else [(0, len(full))]
        if not spans:
            raise ValueError("conversation has no assistant message to train on")
    else:
        spans = [(0, len(full))]
    return _encode_spans(tokenizer, full, spans, False)


def load_split(path: Path, name: str, tokenizer, cfg: DataConfig) -> Dataset:
    return encode_split(read_jsonl(path), path, name, tokenizer, cfg)


def encode_split(records: list, path: Path | str, name: str, tokenizer, cfg: DataConfig) -> Dataset:
    """Tokenise ``records``, (line number, record) pairs read from ``path`` (a name in messages)."""
    fmt = detect_format(records, path, cfg)
    warn: list[str] = []
    tokens, supervised = [], []
    n_trunc = longest = dropped = 0
    limit = cfg.max_seq_length
    for lineno, rec in records:
        try:
            ids, mask = encode_record(rec, fmt, tokenizer, cfg, warn)
        except UserError as e:  # about this record (its template, its fields): say which it is
            if str(e).startswith(str(path)):
                raise
            raise UserError(f"{path} line {lineno}: {e}") from None
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise UserError(f"{path} line {lineno}: cannot encode {fmt} record ({e})") from None
        longest = max(longest, len(ids))
        if len(ids) > limit:
            n_trunc += 1
            ids, mask = ids[:limit], mask[:limit]
        # The first token is never a target (nothing precedes it).
        if len(ids) < 2 or mask[1:].sum() == 0:
            dropped += 1
            continue
        tokens.append(ids)
        supervised.append(mask)
    if not tokens:
        raise UserError(f"{path}: no record has a token to train on (after truncation to {limit})")
    messages = []
    if "unstable" in warn:
        messages.append(
            f"{path}: the chat template renders earlier turns differently once later turns "
            "follow, so only the last assistant turn of each conversation is trained on"
        )
    return Dataset(name, tokens, supervised, fmt, n_trunc, longest, dropped, messages)


def load_datasets(
    data: str | Path, tokenizer, cfg: DataConfig, hf_config: str | None = None, hf_splits: list | None = None
) -> dict[str, Dataset]:
    """The splits of ``data``: a folder of {train,valid,test}.jsonl, one .jsonl, or, when no such path
    exists and it reads ORG/NAME, a Hugging Face dataset (``hf_config``, ``hf_splits``)."""
    if is_hub_dataset(data):
        return load_hf_datasets(str(data), tokenizer, cfg, hf_config, hf_splits)
    if hf_config or hf_splits:
        raise UserError("--hf-config and --hf-splits apply to a Hugging Face dataset (--data ORG/NAME)")
    return {name: load_split(path, name, tokenizer, cfg) for name, path in find_splits(data).items()}


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_dataset(data: str | Path) -> bool:
    """``data`` names a Hub dataset: ORG/NAME, and no file or folder of that name exists here."""
    text = str(data)
    return bool(_HUB_ID.match(text)) and not Path(text).expanduser().exists() and not text.endswith(".jsonl")


# Split names datasets use for our "valid".
VALID_NAMES = ("validation", "valid", "val", "dev")


def load_hf_datasets(
    name: str, tokenizer, cfg: DataConfig, config: str | None = None, splits: list | None = None
) -> dict[str, Dataset]:
    """A Hugging Face dataset through the ``datasets`` library (its cache, and ``HF_DATASETS_OFFLINE``
    as it sets them), with the same format detection and masking as jsonl. ``splits``: split
    expressions for train, valid[, test] (``train[:90%]``...); default: train, the validation split
    (validation, valid, val or dev) and test where they exist."""
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"--data {name} is a Hugging Face dataset: install the datasets library (pip install datasets)"
        ) from None
    with _quiet_libraries():
        return _load_hf_datasets(datasets, name, tokenizer, cfg, config, splits)


@contextlib.contextmanager
def _quiet_libraries(names=("datasets", "huggingface_hub", "fsspec", "filelock", "urllib3")):
    """Only errors from these libraries' loggers while we call them: their warnings (retries, cache
    notes) would come before our own one-line error, or bury it."""
    import logging

    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _load_hf_datasets(datasets, name, tokenizer, cfg, config, splits) -> dict[str, Dataset]:
    wanted: dict[str, str] = {}
    try:
        if splits:
            if not 1 <= len(splits) <= 3:
                raise UserError(f"--hf-splits takes train,valid[,test] split names, not {','.join(splits)}")
            wanted = dict(zip(SPLITS, splits))
        else:
            available = datasets.get_dataset_split_names(name, config)
            wanted["train"] = "train"
            if "train" not in available:
                raise UserError(
                    f"dataset {name} has no train split (splits: {', '.join(available)}); "
                    "name them with --hf-splits TRAIN,VALID"
                )
            valid = next((v for v in VALID_NAMES if v in available), None)
            if valid:
                wanted["valid"] = valid
            if "test" in available:
                wanted["test"] = "test"
        out = {}
        for ours, expr in wanted.items():
            rows = datasets.load_dataset(name, config, split=expr)
            records = [(i + 1, dict(r)) for i, r in enumerate(rows)]
            where = f"{name}[{expr}]"
            if not records:
                raise UserError(f"{where}: the split is empty")
            out[ours] = encode_split(records, where, ours, tokenizer, cfg)
    except UserError:
        raise
    except Exception as e:  # datasets' errors: not found offline, unknown config or split...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load Hugging Face dataset {name}: {first}") from None
    return out


def describe(splits: dict[str, Dataset], max_seq_length: int) -> list[str]:
    """The dataset report a run prints: sizes, and every truncation, drop and warning."""
    lines = []
    for ds in splits.values():
        lines.append(
            f"data {ds.name}: {len(ds)} {ds.format} examples, {ds.n_tokens:,} tokens "
            f"({ds.n_supervised:,} trained on)"
        )
        if ds.n_truncated:
            lines.append(
                f"note: {ds.n_truncated} {ds.name} examples are longer than --max-seq-length "
                f"{max_seq_length} and were truncated (longest: {ds.longest} tokens)"
            )
        if ds.n_dropped:
            lines.append(f"note: {ds.n_dropped} {ds.name} examples had no token to train on and were skipped")
        lines.extend(f"note: {w}" for w in ds.warnings)
    if "valid" not in splits:
        lines.append("note: no validation split (valid.jsonl): training without validation")
    return lines


def training_splits(splits: dict[str, Dataset], batch_size: int) -> tuple[Dataset, Dataset | None, int]:
    """(train, valid or None, batches per epoch); refuses a train split smaller than one batch."""
    train_set, val_set = splits["train"], splits.get("valid")
    n_batches = batches_per_epoch(train_set, batch_size)
    if n_batches == 0:
        raise UserError(
            f"the train split has {len(train_set)} examples, fewer than --batch-size {batch_size}"
        )
    if val_set is not None and len(val_set) == 0:
        val_set = None
    return train_set, val_set, n_batches


# ---------------------------------------------------------------- packing


def pack_rows(lengths: list[int] | np.ndarray, capacity: int) -> list[np.ndarray]:
    """Best-fit decreasing: the longest example first, each into the fullest row it fits in
    (a new row when none has room). Deterministic; every example once; no row over ``capacity``."""
    import bisect

    lengths = np.asarray(lengths)
    if len(lengths) and int(lengths.max()) > capacity:
        raise ValueError(f"an example of {int(lengths.max())} tokens exceeds the row capacity {capacity}")
    order = np.argsort(-lengths, kind="stable")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for i in order:
        n = int(lengths[i])
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = capacity, len(rows)
            rows.append([])
        rows[r].append(int(i))
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    return [np.array(sorted(r), dtype=np.int64) for r in rows]


def pack_dataset(ds: Dataset, max_seq_length: int) -> Dataset:
    """The split with its examples packed into rows of at most ``max_seq_length`` tokens.

    A row is its examples' tokens one after another (each keeps its BOS and EOS). A row's first
    position is never a target, and each later example's first token is not one either, so every
    target is a target of its own example, predicted from its own example's positions (the mask
    keeps the rest out). The row's segments (one number per example) let the model restart RoPE
    positions, convolutions and recurrent state at every example (mlx_dft.packing;
    tests/test_packing.py compares packed and unpacked losses and gradients)."""
    groups = pack_rows([len(t) for t in ds.tokens], max_seq_length)
    tokens, supervised, segments = [], [], []
    for idx in groups:
        sup = [ds.supervised[i].copy() for i in idx]
        for s in sup[1:]:
            s[0] = 0
        tokens.append(np.concatenate([ds.tokens[i] for i in idx]))
        supervised.append(np.concatenate(sup))
        lengths = [len(ds.tokens[i]) for i in idx]
        segments.append(np.repeat(np.arange(1, len(idx) + 1, dtype=np.int32), lengths))
    return Dataset(
        ds.name, tokens, supervised, ds.format, ds.n_truncated, ds.longest, ds.n_dropped, ds.warnings,
        segments=segments, rows=groups,
    )  # fmt: skip


def describe_packing(ds: Dataset, max_seq_length: int) -> str:
    n_examples = sum(len(r) for r in ds.rows)
    fill = ds.n_tokens / (len(ds) * max_seq_length)
    return (
        f"packed {ds.name}: {n_examples} examples into {len(ds)} rows of up to {max_seq_length} tokens "
        f"({fill:.0%} filled, {n_examples / len(ds):.1f} examples a row)"
    )


# ---------------------------------------------------------------- batching


@dataclass
class Batch:
    """One (local) micro-batch, laid out for the loss at supervised positions only."""

    inputs: mx.array  # [B, T] int32 token ids, right-padded
    positions: mx.array  # [N] int32 flat indices into B*T of the positions that predict a target
    targets: mx.array  # [N] int32
    valid: mx.array  # [N] float32, 0 on padding entries
    n_supervised: int
    n_tokens: int  # non-padding tokens processed
    segments: mx.array | None = None  # [B, T] int32 of packed rows: the example of each input, 0 on padding

    def arrays(self) -> tuple[mx.array, ...]:
        if self.segments is None:
            return self.inputs, self.positions, self.targets, self.valid
        return self.inputs, self.positions, self.targets, self.valid, self.segments


def _round_up(n: int, k: int) -> int:
    return max(k, (n + k - 1) // k * k)


def collate(
    tokens: list[np.ndarray], supervised: list[np.ndarray], segments: list[np.ndarray] | None = None
) -> Batch:
    b = len(tokens)
    t = _round_up(max(len(x) for x in tokens) - 1, PAD_INPUTS_TO)
    inputs = np.zeros((b, t), np.int32)
    seg = np.zeros((b, t), np.int32) if segments is not None else None
    pos, tgt = [], []
    n_tokens = 0
    for i, (ids, sup) in enumerate(zip(tokens, supervised)):
        n = len(ids) - 1
        inputs[i, :n] = ids[:-1]
        if seg is not None:
            seg[i, :n] = segments[i][:-1]
        n_tokens += len(ids)
        where = np.nonzero(sup[1:])[0]
        pos.append(i * t + where)
        tgt.append(ids[1:][where])
    pos, tgt = np.concatenate(pos).astype(np.int32), np.concatenate(tgt).astype(np.int32)
    n = len(pos)
    size = _round_up(n, PAD_TARGETS_TO)
    valid = np.zeros(size, np.float32)
    valid[:n] = 1.0
    pos = np.pad(pos, (0, size - n))
    tgt = np.pad(tgt, (0, size - n))
    packed = mx.array(seg) if seg is not None else None
    return Batch(mx.array(inputs), mx.array(pos), mx.array(tgt), mx.array(valid), n, n_tokens, packed)


def _collate(dataset: Dataset, idx) -> Batch:
    segments = [dataset.segments[i] for i in idx] if dataset.segments is not None else None
    return collate([dataset.tokens[i] for i in idx], [dataset.supervised[i] for i in idx], segments)


def epoch_batches(dataset: Dataset, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The batches (arrays of example indices) of one epoch, in training order.

    Shuffle, sort by length within windows of ``SORT_WINDOW`` batches, cut into batches,
    shuffle the batch order. Leftover examples (fewer than a batch) change from epoch to epoch.
    """
    n = len(dataset)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    lengths = np.array([len(t) for t in dataset.tokens])
    window = batch_size * SORT_WINDOW
    batches = []
    usable = n - n % batch_size
    for start in range(0, usable, window):
        chunk = order[start : min(start + window, usable)]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def batches_per_epoch(dataset: Dataset, batch_size: int) -> int:
    return len(dataset) // batch_size


def iterate_batches(
    dataset: Dataset,
    batch_size: int,
    seed: int = 0,
    start: int = 0,
    rank: int = 0,
    world_size: int = 1,
    loop: bool = True,
):
    """Yield local micro-batches from global position ``start`` on.

    With several workers each global batch is split by rank (``batch_size`` must divide
    evenly); padding is per worker, which leaves the loss unchanged.
    """
    if batch_size % world_size:
        raise UserError(f"--batch-size {batch_size} must be divisible by the {world_size} workers")
    nb = batches_per_epoch(dataset, batch_size)
    if nb == 0:
        raise UserError(
            f"the {dataset.name} split has {len(dataset)} examples, fewer than --batch-size {batch_size}"
        )
    epoch, k = divmod(start, nb)
    while True:
        batches = epoch_batches(dataset, batch_size, seed, epoch)
        for idx in batches[k:]:
            yield _collate(dataset, idx[rank::world_size])
        k = 0
        epoch += 1
        if not loop:
            return


def eval_batches(dataset: Dataset, batch_size: int, rank: int = 0, world_size: int = 1, limit: int = -1):
    """Deterministic validation batches in length order, covering every example once (the last
    batch may be smaller); ``limit`` caps the number of batches (-1: all)."""
    order = np.argsort([len(t) for t in dataset.tokens], kind="stable")
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if limit >= 0:
        batches = batches[:limit]
    for idx in batches:
        mine = idx[rank::world_size]
        if len(mine) == 0:
            continue
        yield _collate(dataset, mine)
