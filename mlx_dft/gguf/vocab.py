"""A model folder's Hugging Face tokenizer as GGUF ``tokenizer.*`` metadata (the way back of
:mod:`mlx_dft.gguf.tokenizer`).

Written for byte-level BPE tokenizers (GPT-2 style: SmolLM, Llama 3, Qwen2...), llama.cpp's
``tokenizer.ggml.model = gpt2``:

- ``tokens``: every id's text (byte-level spelling, added tokens as they are), padded with
  ``[PAD{id}]`` tokens up to the embedding's row count, as llama.cpp's converter pads;
- ``token_type``: 3 (control) for special added tokens, 4 (user-defined) for other added tokens,
  5 (unused) for padding, 1 (normal) for the rest;
- ``merges``: ``"left right"`` strings in rank order;
- ``bos/eos/unknown/padding_token_id`` from tokenizer_config.json (config.json's ids otherwise),
  ``add_bos_token``/``add_eos_token`` from what the tokenizer actually does to a text;
- ``tokenizer.chat_template`` (and ``tokenizer.chat_template.NAME`` for named extra ones);
- ``pre``: llama.cpp's name for the text split before BPE. It is read off the tokenizer's
  pre-tokenizer: the one of :data:`mlx_dft.gguf.tokenizer.PRE_TOKENIZERS` it equals (so a folder
  converted from a GGUF gets its original split back). A split llama.cpp would not reproduce is
  refused by name: plausible but different token ids are worse than no file.

Gemma 4's SentencePiece-style BPE (byte fallback, spaces replaced by ``▁`` and nothing else, no
split but lines) is llama.cpp's ``tokenizer.ggml.model = gemma4``: tokens as they are (``<0xNN>``
typed byte, 6), merges, ``add_space_prefix`` false. Other SentencePiece-style tokenizers
(``tokenizer.model``, or BPE with byte fallback and a space prefix: Llama 2, Mistral) and
Unigram/WordPiece models are refused by name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mlx_dft.errors import UserError
from mlx_dft.files import read_json
from mlx_dft.gguf.tokenizer import PRE_TOKENIZERS
from mlx_dft.gguf.writer import GGUFWriter, ValueType

NORMAL, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 3, 4, 5, 6
BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")
SPECIAL_KEYS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}
# Normalizers llama.cpp's BPE tokenizer can ignore without changing token ids on ordinary text.
HARMLESS_NORMALIZERS = (None, "NFC")


def _load(folder: Path) -> tuple[dict, dict]:
    path = folder / "tokenizer.json"
    if not path.is_file():
        if (folder / "tokenizer.model").is_file():
            raise UserError(
                f"{folder}: a SentencePiece tokenizer (tokenizer.model without tokenizer.json) is not "
                "written to GGUF; only byte-level BPE tokenizers are"
            )
        raise UserError(f"{folder} has no tokenizer.json: GGUF files carry their tokenizer")
    tok = read_json(path)
    cfg = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    return tok, cfg


def _check_kind(tok: dict, folder: Path) -> str:
    """llama.cpp's ``tokenizer.ggml.model`` for the tokenizer: gpt2 or gemma4."""
    model = tok.get("model") or {}
    kind = model.get("type")
    if kind != "BPE":
        raise UserError(
            f"{folder}/tokenizer.json: a {kind} tokenizer model is not written to GGUF; only BPE "
            "tokenizers (byte-level, or Gemma 4's SentencePiece-style) are"
        )
    if model.get("byte_fallback"):
        if _gemma4_style(tok):
            return "gemma4"
        raise UserError(
            f"{folder}/tokenizer.json: a SentencePiece-style BPE tokenizer (byte_fallback, as Llama 2 and "
            "Mistral) that is not Gemma 4's (spaces as ▁, no prefix, lines split) is not written to GGUF"
        )
    norm = (tok.get("normalizer") or {}).get("type")
    if norm not in HARMLESS_NORMALIZERS:
        raise UserError(f"{folder}/tokenizer.json: a {norm} normalizer has no llama.cpp counterpart")
    return "gpt2"


def _gemma4_style(tok: dict) -> bool:
    """Whether a byte-fallback BPE tokenizer does what llama.cpp's ``gemma4`` tokenizer does:
    spaces replaced by ``▁`` and nothing else, no split before the merges but lines (the rebuild
    of :mod:`mlx_dft.gguf.tokenizer`'s split, or none: BPE pieces never hold a newline and more)."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    from mlx_dft.gguf.tokenizer import GEMMA4_SPLIT

    norm = tok.get("normalizer") or {}
    while norm.get("type") == "Sequence" and len(norm.get("normalizers") or []) == 1:
        norm = norm["normalizers"][0]
    replace = json.loads(normalizers.Replace(" ", "▁").__getstate__())
    split = json.loads(pre_tokenizers.Split(Regex(GEMMA4_SPLIT), behavior="isolated").__getstate__())
    return norm == replace and tok.get("pre_tokenizer") in (None, split)


def _comparable(pre: dict | None) -> object:
    # trim_offsets changes character offsets only, never the ids.
    if isinstance(pre, dict):
        return {k: _comparable(v) for k, v in pre.items() if k != "trim_offsets"}
    if isinstance(pre, list):
        return [_comparable(v) for v in pre]
    return pre


def pre_tokenizer_name(tok: dict, folder: Path) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for the split a tokenizer.json performs."""
    from tokenizers import Tokenizer, models

    ours = _comparable(tok.get("pre_tokenizer"))
    for name, (factory, _) in PRE_TOKENIZERS.items():
        probe = Tokenizer(models.BPE())
        probe.pre_tokenizer = factory()
        if _comparable(json.loads(probe.to_str())["pre_tokenizer"]) == ours:
            return name
    what = json.dumps(tok.get("pre_tokenizer"))[:120]
    raise UserError(
        f"{folder}/tokenizer.json: its pre-tokenizer ({what}) is not one llama.cpp reproduces "
        f"(known: {', '.join(dict.fromkeys(PRE_TOKENIZERS))})"
    )


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_templates(folder: Path, cfg: dict) -> dict[str, str]:
    """{name: template}; the default one under ``""``."""
    found = cfg.get("chat_template")
    if found is None and (folder / "chat_template.jinja").is_file():
        found = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if found is None and (folder / "chat_template.json").is_file():
        found = read_json(folder / "chat_template.json").get("chat_template")
    if isinstance(found, str):
        return {"": found}
    if isinstance(found, list):  # [{"name": "default" | "tool_use" | ..., "template": ...}]
        named = {str(t.get("name")): t.get("template") for t in found if isinstance(t, dict)}
        return {("" if k == "default" else k): v for k, v in named.items() if isinstance(v, str)}
    return {}


def _adds(folder: Path, bos: int | None, eos: int | None) -> tuple[bool, bool]:
    """(add_bos, add_eos): whether encoding a text puts BOS first / EOS last, as the tokenizer
    really runs (its post-processor, which transformers 5 follows over tokenizer_config.json)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    plain, full = tok.encode("a b", add_special_tokens=False).ids, tok.encode("a b").ids
    starts = [k for k in range(len(full) - len(plain) + 1) if full[k : k + len(plain)] == plain]
    prefix, suffix = (full[: starts[0]], full[starts[0] + len(plain) :]) if starts else (full, [])
    if prefix not in ([], [bos]) or suffix not in ([], [eos]) or not starts:
        raise UserError(
            f"{folder}/tokenizer.json adds tokens {prefix} / {suffix} around a text; llama.cpp can only "
            "add the BOS and EOS tokens"
        )
    return prefix == [bos], suffix == [eos]


def add_tokenizer(writer: GGUFWriter, folder: Path, n_vocab: int, model_config: dict) -> None:
    """Add the ``tokenizer.*`` metadata of ``folder``'s tokenizer, for a model whose embedding has
    ``n_vocab`` rows."""
    folder = Path(folder)
    tok, cfg = _load(folder)
    kind = _check_kind(tok, folder)
    pre = pre_tokenizer_name(tok, folder) if kind == "gpt2" else None
    texts: dict[int, str] = {int(i): t for t, i in (tok["model"].get("vocab") or {}).items()}
    types = dict.fromkeys(texts, NORMAL)
    for added in tok.get("added_tokens") or []:
        i = int(added["id"])
        texts[i] = added["content"]
        types[i] = CONTROL if added.get("special") else USER_DEFINED
    if kind == "gemma4":  # (byte fallback's <0xNN> tokens, added or not: llama.cpp's byte tokens)
        types.update({i: BYTE for i, t in texts.items() if BYTE_TOKEN.fullmatch(t)})
    if not texts:
        raise UserError(f"{folder}/tokenizer.json has an empty vocabulary")
    if max(texts) >= n_vocab:
        raise UserError(
            f"{folder}: the tokenizer has ids up to {max(texts)}, the model's embedding only {n_vocab} rows"
        )
    tokens = [texts.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    token_types = [types.get(i, UNUSED) for i in range(n_vocab)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges") or []]

    writer.add_string("tokenizer.ggml.model", kind)
    if pre is not None:  # (gemma4's split is the tokenizer model's own)
        writer.add_string("tokenizer.ggml.pre", pre)
    else:
        writer.add_bool("tokenizer.ggml.add_space_prefix", False)
    writer.add_array("tokenizer.ggml.tokens", ValueType.STRING, tokens)
    writer.add_array("tokenizer.ggml.token_type", ValueType.INT32, token_types)
    writer.add_array("tokenizer.ggml.merges", ValueType.STRING, merges)
    ids = {}
    by_text = {t: i for i, t in sorted(texts.items())}
    for name, key in SPECIAL_KEYS.items():
        text = _token_text(cfg.get(name))
        if text is not None and text in by_text:
            ids[name] = by_text[text]
        elif name in ("bos_token", "eos_token") and model_config.get(f"{name}_id") is not None:
            value = model_config[f"{name}_id"]
            ids[name] = int(value[0] if isinstance(value, list) else value)
        if name in ids:
            writer.add_uint32(f"tokenizer.ggml.{key}", ids[name])
    add_bos, add_eos = _adds(folder, ids.get("bos_token"), ids.get("eos_token"))
    writer.add_bool("tokenizer.ggml.add_bos_token", add_bos)
    writer.add_bool("tokenizer.ggml.add_eos_token", add_eos)
    for name, template in _chat_templates(folder, cfg).items():
        writer.add_string("tokenizer.chat_template" + (f".{name}" if name else ""), template)
