"""llama.cpp's own logits for a GGUF file, through its C API. Run only in a child process
(`isolated.call`): a crash inside llama.cpp then fails one test instead of the suite.

Bindings: llama-cpp-python (ctypes; built from source where no wheel fits), else llama-cpp-py-sync
(cffi), else a skip saying why.

The context is set up so that llama.cpp's plain CPU kernels compute in float32 where the file does:
a float32 KV cache, no flash attention, and no "extra" buffer types. Extra buffer types are the
weight-repacking back-ends that llama.cpp picks by CPU (AMX on Intel Sapphire Rapids and later,
AArch64/x86 repacks); they change the arithmetic, and llama.cpp's AMX int8 matmul segfaults on
quantized weights on this project's Sapphire-Rapids-class machines (ggml-org/llama.cpp#20824,
seen with llama-cpp-python 0.3.36 on Q8_0, Q4_0 and Q4_1 files, SmolLM2's own file included).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

N_CTX = 64


def binding() -> str:
    """The distribution whose bindings `logits` uses (for failure lines and skips)."""
    if importlib.util.find_spec("llama_cpp") is not None:
        return "llama-cpp-python"
    return "llama-cpp-py-sync"


def logits(model_path: str, ids: list[int], lora: str | None = None) -> np.ndarray:
    """[len(ids), n_vocab] float32 logits of every position, as llama.cpp computes them."""
    assert 0 < len(ids) <= N_CTX, f"{len(ids)} tokens; the context holds {N_CTX}"
    if binding() == "llama-cpp-python":
        return _ctypes_logits(str(model_path), ids, lora and str(lora))
    return _cffi_logits(str(model_path), ids, lora and str(lora))


def _context_params(params) -> None:
    params.n_ctx = params.n_batch = params.n_ubatch = N_CTX
    params.type_k = params.type_v = 0  # GGML_TYPE_F32
    params.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED
    # Newer llama.cpp (n_outputs_max, 0 = n_batch) reserves output rows per ubatch: all of them here.
    if _has_field(params, "n_outputs_max"):
        params.n_outputs_max = 0
        params.n_outputs_max_per_seq = 0


def _one_sequence(batch, ids: list[int]):
    """Fill a llama_batch (ctypes or cffi: the same fields) with one sequence, every position's
    logits asked for."""
    batch.n_tokens = len(ids)
    for i, t in enumerate(ids):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, 1
        batch.seq_id[i][0] = 0
    return batch


def _has_field(struct, name: str) -> bool:
    fields = getattr(type(struct), "_fields_", None)
    if fields is not None:  # ctypes
        return any(f[0] == name for f in fields)
    return hasattr(struct, name)  # cffi


def _ctypes_logits(model_path: str, ids: list[int], lora: str | None) -> np.ndarray:
    import ctypes

    import llama_cpp as L

    L.llama_backend_init()
    mparams = L.llama_model_default_params()
    if _has_field(mparams, "use_extra_bufts"):
        mparams.use_extra_bufts = False
    model = L.llama_model_load_from_file(model_path.encode(), mparams)
    assert model, f"llama.cpp refused {model_path}"
    params = L.llama_context_default_params()
    _context_params(params)
    ctx = L.llama_init_from_model(model, params)
    assert ctx, f"llama.cpp made no context for {model_path}"
    try:
        if lora:
            adapter = L.llama_adapter_lora_init(model, lora.encode())
            assert adapter, f"llama.cpp refused the adapter {lora}"
            adapters = (type(adapter) * 1)(adapter)  # llama_adapter_lora_p[1]
            scales = (ctypes.c_float * 1)(1.0)
            assert L.llama_set_adapters_lora(ctx, adapters, 1, scales) == 0
        batch = _one_sequence(L.llama_batch_init(len(ids), 0, 1), ids)
        assert L.llama_decode(ctx, batch) == 0
        n = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
        rows = [
            np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n,)).copy() for i in range(len(ids))
        ]
        L.llama_batch_free(batch)
        return np.stack(rows)
    finally:
        L.llama_free(ctx)
        L.llama_model_free(model)


def _cffi():
    try:
        from llama_cpp_py_sync._cffi_bindings import get_ffi, get_lib

        return get_ffi(), get_lib()
    except (ImportError, RuntimeError, OSError) as e:
        pytest.skip(
            "llama.cpp bindings unavailable (pip install llama-cpp-python, which builds llama.cpp; "
            f"or llama-cpp-py-sync, glibc >= 2.38): {e}"
        )


def _cffi_logits(model_path: str, ids: list[int], lora: str | None) -> np.ndarray:
    ffi, lib = _cffi()
    lib.llama_backend_init()
    mparams = lib.llama_model_default_params()
    if _has_field(mparams, "use_extra_bufts"):
        mparams.use_extra_bufts = False
    model = lib.llama_model_load_from_file(model_path.encode(), mparams)
    assert model != ffi.NULL, f"llama.cpp refused {model_path}"
    params = lib.llama_context_default_params()
    _context_params(params)
    ctx = lib.llama_init_from_model(model, params)
    assert ctx != ffi.NULL, f"llama.cpp made no context for {model_path}"
    try:
        if lora:
            adapter = lib.llama_adapter_lora_init(model, lora.encode())
            assert adapter != ffi.NULL, f"llama.cpp refused the adapter {lora}"
            adapters = ffi.new("struct llama_adapter_lora *[1]", [adapter])
            assert lib.llama_set_adapters_lora(ctx, adapters, 1, ffi.new("float[1]", [1.0])) == 0
        batch = _one_sequence(lib.llama_batch_init(len(ids), 0, 1), ids)
        assert lib.llama_decode(ctx, batch) == 0
        n = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
        rows = [
            np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(ctx, i), 4 * n), np.float32).copy()
            for i in range(len(ids))
        ]
        lib.llama_batch_free(batch)
        return np.stack(rows)
    finally:
        lib.llama_free(ctx)
        lib.llama_model_free(model)



def tokenize(model_path: str, texts: list[str], special: bool = False) -> list[list[int]]:
    """llama.cpp's token ids of each text, from the file's vocabulary alone (``vocab_only``: a
    file of metadata without tensors will do); ``special``: its BOS/EOS added as the file says and
    special tokens matched in the text, else neither."""
    if binding() != "llama-cpp-python":
        pytest.skip("tokenizing needs llama-cpp-python's bindings")
    import llama_cpp as L

    L.llama_backend_init()
    mparams = L.llama_model_default_params()
    mparams.vocab_only = True
    model = L.llama_model_load_from_file(str(model_path).encode(), mparams)
    assert model, f"llama.cpp refused {model_path}"
    try:
        vocab = L.llama_model_get_vocab(model)
        out = []
        for text in texts:
            data = text.encode()
            ids = (L.llama_token * (len(data) + 8))()
            n = L.llama_tokenize(vocab, data, len(data), ids, len(ids), special, special)
            assert n >= 0, f"llama_tokenize returned {n}"
            out.append(list(ids[:n]))
        return out
    finally:
        L.llama_model_free(model)


def quantize(src: str, dst: str, ftype: str) -> str:
    """llama.cpp's own quantizer (``llama_model_quantize``) writing ``dst`` from ``src`` as
    ``ftype`` (``Q4_K_M``, ``Q6_K``...; requantizing a quantized file is allowed): the files
    Ollama and LM Studio users download are made this way. Returns ``dst``."""
    if binding() != "llama-cpp-python":
        pytest.skip("quantizing needs llama-cpp-python's bindings")
    import ctypes

    import llama_cpp as L

    params = L.llama_model_quantize_default_params()
    params.ftype = getattr(L, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize = True
    params.nthread = 1
    rc = L.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize returned {rc}"
    return dst


def dequantize(model_path: str) -> dict[str, np.ndarray]:
    """{name: float32 array in numpy order} of every tensor of a GGUF file, dequantized by ggml's
    own ``to_float`` (``ggml_get_type_traits``): llama.cpp's reference for what a block means,
    independent of gguf-py's numpy dequantizers. Raw bytes from gguf-py's reader."""
    if binding() != "llama-cpp-python":
        pytest.skip("ggml's dequantizers need llama-cpp-python's shared libraries")
    import ctypes
    from pathlib import Path

    import gguf
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    to_float_t = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)

    class Traits(ctypes.Structure):
        _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                    ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                    ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                    ("from_float_ref", ctypes.c_void_p)]  # fmt: skip

    lib.ggml_get_type_traits.restype = ctypes.POINTER(Traits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    out = {}
    for t in gguf.GGUFReader(model_path).tensors:
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        n = int(np.prod(shape))
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            out[t.name] = np.array(t.data, np.float32).reshape(shape)
            continue
        traits = lib.ggml_get_type_traits(int(t.tensor_type)).contents
        assert traits.to_float, f"ggml has no to_float for {t.tensor_type.name}"
        raw = np.ascontiguousarray(np.asarray(t.data).view(np.uint8))
        assert raw.size == n // traits.blck_size * traits.type_size, (t.name, raw.size)
        y = np.empty(n, np.float32)
        to_float_t(traits.to_float)(raw.ctypes.data, y.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n)
        out[t.name] = y.reshape(shape)
    return out
