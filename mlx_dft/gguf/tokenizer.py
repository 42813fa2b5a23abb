"""The tokenizer of a GGUF file, rebuilt from its metadata as Hugging Face ``tokenizers`` files.

A GGUF carries no ``tokenizer.json``: llama.cpp stores the vocabulary (``tokenizer.ggml.tokens``),
the merges or scores, each token's type, the special token ids and the chat template as
metadata. Three tokenizer models are rebuilt:

- ``gpt2``: byte-level BPE (SmolLM, Llama 3, Qwen2...). The text is split before BPE as
  llama.cpp splits it for the file's ``tokenizer.ggml.pre`` (:data:`PRE_TOKENIZERS`; an unknown
  one is refused by name, since a wrong split gives plausible but different token ids).
- ``llama``: SentencePiece-style BPE (Llama 2, Mistral...): merges recovered from the token
  scores, bytes as ``<0xNN>`` fallback tokens, a space prefix when ``add_space_prefix`` says so
  (after every special token too, as llama.cpp does).
- ``gemma4``: Gemma 4's SentencePiece-style BPE with merges: spaces as ``▁`` (no prefix), lines
  and newline runs split apart, bytes outside the vocabulary as ``<0xNN>`` tokens; llama.cpp
  adds BOS whatever the file says. Gemma 4's own vocabulary (llama.cpp's test file of it)
  encodes llama.cpp's 46 test texts to the Hugging Face tokenizer's ids.

Tokens typed control (3) become special added tokens, user-defined ones (4) plain added tokens,
so both are matched whole in text.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from mlx_dft.errors import UserError
from mlx_dft.files import atomic_write_json, atomic_write_text

CONTROL, USER_DEFINED, BYTE = 3, 4, 6

# The split patterns of the original tokenizer.json files, which llama.cpp reimplements.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen3.5's: letters with their combining marks (\p{M}) in one word
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    # Every digit on its own, then GPT-2's split (llama.cpp: "\p{N}", then the GPT-2 pattern).
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )


# tokenizer.ggml.pre -> (pre-tokenizer factory, ignore_merges). llama.cpp matches whole words of
# the Llama 3 vocabulary before merging (its tokenizer.json says ignore_merges too). Of names with
# the same split, the first is the canonical one (the GGUF export writes it).
PRE_TOKENIZERS = {
    "smollm": (_digits_then_gpt2, False),
    "starcoder": (_digits_then_gpt2, False),
    "gpt-2": (lambda: pre_tokenizers.ByteLevel(add_prefix_space=False), False),
    "llama-bpe": (lambda: _split_then_bytes(_LLAMA3), True),
    "llama3": (lambda: _split_then_bytes(_LLAMA3), True),
    "llama-v3": (lambda: _split_then_bytes(_LLAMA3), True),
    "qwen2": (lambda: _split_then_bytes(_QWEN2), False),
    "deepseek-r1-qwen": (lambda: _split_then_bytes(_QWEN2), False),
    "qwen35": (lambda: _split_then_bytes(_QWEN35), False),
}
SPECIAL_IDS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


# Bounds on what a vocabulary from a file may cost (real ones: tokens of at most a few hundred
# characters, ~2 million ways to split the pieces of a 256k SentencePiece vocabulary).
MAX_TOKEN_CHARS = 4096
MAX_MERGE_CUTS = 20_000_000


def _meta(meta: dict, key: str, kind: type | tuple, default=None):
    value = meta.get(f"tokenizer.ggml.{key}", default)
    if value is not None and not isinstance(value, kind):
        raise UserError(f"GGUF metadata tokenizer.ggml.{key} has the wrong type ({type(value).__name__})")
    return value


def _tokens(meta: dict) -> list[str]:
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model is None or not tokens:
        raise UserError(
            "the GGUF file has no tokenizer metadata (tokenizer.ggml.model and tokenizer.ggml.tokens); "
            "mlx_dft needs the tokenizer inside the file"
        )
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise UserError("GGUF metadata tokenizer.ggml.tokens is not a list of strings")
    longest = max(range(len(tokens)), key=lambda i: len(tokens[i]))
    if len(tokens[longest]) > MAX_TOKEN_CHARS:
        raise UserError(
            f"GGUF metadata tokenizer.ggml.tokens[{longest}] is {len(tokens[longest]):,} characters long "
            f"(at most {MAX_TOKEN_CHARS:,}: no real vocabulary has such a token)"
        )
    return tokens


def _per_token(meta: dict, key: str, n: int, kind: type | tuple) -> list | None:
    values = _meta(meta, key, list)
    if values is not None and (len(values) != n or not all(isinstance(v, kind) for v in values)):
        raise UserError(f"GGUF metadata tokenizer.ggml.{key} does not hold one number per token ({n})")
    return values


def _special_ids(meta: dict, n: int) -> dict[str, int]:
    ids = {}
    for name, key in (*SPECIAL_IDS.items(), ("eot_token", "eot_token_id")):
        value = _meta(meta, key, int)
        if value is None:
            continue
        if not 0 <= value < n:
            raise UserError(
                f"GGUF metadata tokenizer.ggml.{key} is {value}, outside the vocabulary of {n} tokens"
            )
        ids[name] = value
    return ids


def _vocab(tokens: list[str]) -> dict[str, int]:
    # A token spelled twice keeps its last id, as llama.cpp's token-to-id map does.
    return {token: i for i, token in enumerate(tokens)}


def _byte_level(meta: dict, tokens: list[str]) -> Tokenizer:
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in PRE_TOKENIZERS:
        what = f"tokenizer.ggml.pre = {pre!r}" if pre is not None else "no tokenizer.ggml.pre"
        raise UserError(
            f"the GGUF tokenizer has {what}, a text split mlx_dft does not know "
            f"(supported: {', '.join(PRE_TOKENIZERS)})"
        )
    factory, ignore_merges = PRE_TOKENIZERS[pre]
    tok = Tokenizer(_bpe(meta, tokens, ignore_merges=ignore_merges))
    tok.pre_tokenizer = factory()
    tok.decoder = decoders.ByteLevel()
    return tok


def _bpe(meta: dict, tokens: list[str], **options) -> models.BPE:
    merges = []
    for i, merge in enumerate(_meta(meta, "merges", list, [])):
        parts = merge.split(" ") if isinstance(merge, str) else []
        if len(parts) != 2 or not all(parts):
            raise UserError(f"GGUF metadata tokenizer.ggml.merges[{i}] = {merge!r} is not a pair of tokens")
        merges.append((parts[0], parts[1]))
    try:
        return models.BPE(vocab=_vocab(tokens), merges=merges, **options)
    except Exception as e:  # noqa: BLE001  (tokenizers raises plain exceptions for bad merges)
        raise UserError(f"the GGUF tokenizer's merges do not fit its vocabulary ({e})") from None


# llama.cpp's gemma4 tokenizer splits text into lines and runs of newlines before its merges.
GEMMA4_SPLIT = r"[^\n]+|[\n]+"


def _gemma4(meta: dict, tokens: list[str]) -> Tokenizer:
    """``gemma4``: SentencePiece-style BPE as llama.cpp runs it: spaces become ``▁`` (no prefix),
    the text is split into lines and newline runs, merges by rank over UTF-8 characters, a piece
    outside the vocabulary as its ``<0xNN>`` bytes."""
    if not _meta(meta, "merges", list, []):
        raise UserError("the GGUF tokenizer (gemma4) has no tokenizer.ggml.merges")
    tok = Tokenizer(_bpe(meta, tokens, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(GEMMA4_SPLIT), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok


def _sentencepiece(meta: dict, tokens: list[str], types: list[int] | None, unk: int | None) -> Tokenizer:
    scores = _per_token(meta, "scores", len(tokens), (int, float))
    if scores is None:
        raise UserError(
            "the GGUF tokenizer (SentencePiece, tokenizer.ggml.model = llama) has no token scores"
        )
    vocab = _vocab(tokens)
    # SentencePiece merges the adjacent pair whose joined piece scores highest; as BPE merges:
    # every split of a normal piece into two normal pieces, best joined score first.
    mergeable = {t for i, t in enumerate(tokens) if types is None or types[i] in (1, USER_DEFINED)}
    cuts = sum(max(len(piece) - 1, 0) for piece in mergeable)
    if cuts > MAX_MERGE_CUTS:  # each cut is two slices and two look-ups: bound the work up front
        raise UserError(
            f"the GGUF SentencePiece vocabulary's pieces split {cuts:,} ways (at most {MAX_MERGE_CUTS:,}): "
            "too long to rebuild its merges from"
        )
    ranked = []
    for piece in mergeable:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-scores[vocab[piece]], vocab[left], vocab[right], left, right))
    ranked.sort()
    unk_token = tokens[unk] if unk is not None else None
    model = models.BPE(
        vocab=vocab,
        merges=[(left, right) for *_, left, right in ranked],
        unk_token=unk_token,
        fuse_unk=True,
        byte_fallback=True,
    )
    tok = Tokenizer(model)
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if _meta(meta, "add_space_prefix", bool, True):
        # The normalizer runs on each stretch of text between added tokens: a prefix after every
        # special token, as llama.cpp's tokenizer adds one.
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        decode.append(decoders.Strip(" ", 1, 0))
    else:
        tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence(decode)
    return tok


def build_tokenizer(meta: dict) -> tuple[Tokenizer, dict]:
    """The ``tokenizers`` tokenizer a GGUF's metadata describes, and its special tokens
    (``bos_token``..., ``eot_token``: (text, id))."""
    tokens = _tokens(meta)
    types = _per_token(meta, "token_type", len(tokens), int)
    ids = _special_ids(meta, len(tokens))
    kind = meta["tokenizer.ggml.model"]
    if kind == "gpt2":
        tok = _byte_level(meta, tokens)
    elif kind == "llama":
        tok = _sentencepiece(meta, tokens, types, ids.get("unk_token"))
    elif kind == "gemma4":
        tok = _gemma4(meta, tokens)
    else:
        raise UserError(
            f"the GGUF tokenizer is of type {kind!r} (tokenizer.ggml.model), which mlx_dft does not "
            "rebuild (supported: gpt2 (byte-level BPE), llama (SentencePiece), gemma4 (SentencePiece-style "
            "BPE))"
        )
    # Control tokens, and the named special ones even in a file without token types, match whole.
    typed = list(zip(tokens, types or ()))
    controls = [t for t, k in typed if k == CONTROL] + [tokens[i] for i in ids.values()]
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(controls) if t]
    )
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in typed if k == USER_DEFINED and t]
    )
    special = {name: (tokens[i], i) for name, i in ids.items()}
    add_bos = _meta(meta, "add_bos_token", bool, kind == "llama")  # llama.cpp's default for SentencePiece
    add_bos = add_bos or kind == "gemma4"  # (llama.cpp adds BOS for gemma4 whatever the file says)
    add_eos = _meta(meta, "add_eos_token", bool, False)
    for flag, name in ((add_bos, "bos_token"), (add_eos, "eos_token")):
        if flag and name not in special:
            raise UserError(f"the GGUF tokenizer says add_{name} but has no {name}_id")
    if add_bos or add_eos:
        added = [special[n] for n, flag in (("bos_token", add_bos), ("eos_token", add_eos)) if flag]
        bos = [special["bos_token"][0]] if add_bos else []
        eos = [special["eos_token"][0]] if add_eos else []
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join([*bos, "$A", *eos]),
            pair=" ".join([*bos, "$A", *eos, *bos, "$B:1", *eos]),
            special_tokens=added,
        )
    elif kind == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    special["add_bos_token"], special["add_eos_token"] = add_bos, add_eos
    return tok, special


def write_tokenizer(meta: dict, folder: Path, context_length: int | None = None) -> dict:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into ``folder``;
    returns the special tokens (as :func:`build_tokenizer`)."""
    tok, special = build_tokenizer(meta)
    folder = Path(folder)
    atomic_write_text(folder / "tokenizer.json", tok.to_str())
    names = {name: special[name][0] for name in SPECIAL_IDS if name in special}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": special["add_bos_token"],
        "add_eos_token": special["add_eos_token"],
        **names,
        "clean_up_tokenization_spaces": False,
    }
    if context_length:
        config["model_max_length"] = context_length
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str) and template:
        config["chat_template"] = template
    atomic_write_json(folder / "tokenizer_config.json", config)
    atomic_write_json(folder / "special_tokens_map.json", names)
    return special


def token_id_list(special: dict, *names: str) -> list[int]:
    """The distinct ids of the named special tokens that exist (e.g. eos and eot for stopping)."""
    found = [special[n][1] for n in names if n in special]
    return list(dict.fromkeys(found))
