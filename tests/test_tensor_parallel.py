"""--shard tensor: two (and four) processes on the ring backend over loopback, each holding its slice
of every block's linear layers (mlx-lm's shard()), give the one-process run's losses at every step
and its weights, for LoRA, DoRA and full fine-tuning on llama and qwen3; a resume of a tensor-parallel
run continues it exactly; what it cannot split is refused in one line, on every process."""

import subprocess
import sys

import mlx.core as mx
import pytest

import mlx_dft  # noqa: F401
from mlx_dft import models, tensor_parallel
from mlx_dft.errors import UserError
from tests.arch_models import write_arch_model
from tests.conftest import llama_config, write_model
from tests.test_sharding import _PORT, TOL, _env, base, launcher, max_diff, run, same_losses, trained


@pytest.fixture(scope="module")
def qwen3_model(tmp_path_factory):
    return write_arch_model(tmp_path_factory.mktemp("models") / "qwen3", "qwen3")


@pytest.fixture(scope="module")
def llama_kv4(tmp_path_factory):
    """The tiny llama with 4 KV heads: its shapes divide by 4 processes."""
    return write_model(tmp_path_factory.mktemp("models") / "kv4", llama_config(num_key_value_heads=4))


def compare(model, data, tmp_path, opts: dict, n: int) -> None:
    o = base(model, data, **opts)
    run({**o, "output": str(tmp_path / "one")})
    many = run({**o, "output": str(tmp_path / "many"), "shard": "tensor"}, n=n)
    assert f"{n} workers, --shard tensor" in many.stdout
    dl = same_losses(tmp_path / "one", tmp_path / "many")
    dw = max_diff(trained(tmp_path / "one"), trained(tmp_path / "many"))
    print(f"{opts['adapter']}+{opts['loss']} on {n}: max |loss diff| {dl:.3g}, max |weight diff| {dw:.3g}")
    assert dl < TOL and dw < TOL
    # the checkpoints are whole arrays too
    ck1, ck2 = (sorted((tmp_path / x / "checkpoints").iterdir())[0] for x in ("one", "many"))
    assert max_diff(trained(ck1), trained(ck2)) < TOL


pytestmark = pytest.mark.skipif(launcher() is None, reason="mlx.launch is not installed")

CASES = {
    "lora-dft": {"loss": "dft", "adapter": "lora", "learning_rate": 0.5},
    "full-sft-checkpointed": {"loss": "sft", "adapter": "full", "learning_rate": 0.05,
                              "grad_checkpoint": True},
    "dora-dft-dropout-packed": {"loss": "dft", "adapter": "dora", "learning_rate": 0.5, "lora_dropout": 0.1,
                                "pack": True, "max_seq_length": 256},
    "lora-asft": {"loss": "asft", "adapter": "lora", "learning_rate": 0.5},
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_tensor_two_processes_match_one(tiny_model, arith_data, tmp_path, case):
    compare(tiny_model, arith_data, tmp_path, CASES[case], 2)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["lora-dft", "full-sft-checkpointed"])
def test_tensor_qwen3_matches_one(qwen3_model, arith_data, tmp_path, case):
    compare(qwen3_model, arith_data, tmp_path, CASES[case], 2)


@pytest.mark.slow
def test_tensor_four_processes_match_one(llama_kv4, arith_data, tmp_path):
    compare(llama_kv4, arith_data, tmp_path, CASES["lora-dft"], 4)


@pytest.mark.slow
def test_tensor_resume_continues_exactly(tiny_model, arith_data, tmp_path):
    """From a checkpoint written by 2 tensor-parallel processes, 2 such processes continue to the
    uninterrupted run's weights (AdamW: its moments are whole in the checkpoint and split again),
    and so does 1 plain process (SGD: AdamW's first steps turn the float rounding of sums taken
    in another order into visible steps, tests/test_sharding.py's note)."""
    for optimizer, again in (("adamw", ("two", "tensor", 2)), ("sgd", ("one", "none", 1))):
        o = base(tiny_model, arith_data, loss="dft", adapter="lora", learning_rate=1e-2, optimizer=optimizer)
        whole = tmp_path / f"whole-{optimizer}"
        run({**o, "output": str(whole), "shard": "tensor"}, n=2)
        ck = str(whole / "checkpoints" / "step-0000002")
        if optimizer == "adamw":
            weights, moments = (mx.load(f"{ck}/{f}.safetensors") for f in ("adapters", "optimizer"))
            for k, w in weights.items():
                assert moments[f"{k}.m"].shape == w.shape and moments[f"{k}.v"].shape == w.shape
        name, shard, n = again
        run({"resume": ck, "output": str(tmp_path / name), "shard": shard}, n=n)
        dw = max_diff(*(mx.load(str(f / "adapters.safetensors")) for f in (whole, tmp_path / name)))
        print(f"resume on {n} ({optimizer}): max |weight diff| {dw:.3g}")
        assert dw < TOL


# ------------------------------------------------------------------ what is refused


def _with_adapter(path, adapter: str = "lora", **kw):
    from mlx_dft import adapters
    from mlx_dft.config import TrainConfig

    model, _, _, _ = models.load_model(str(path), "float32", None, False)
    cfg = TrainConfig(adapter=adapter, **kw)
    method = adapters.method(adapter)
    method.apply(model, method.settings(cfg, model))
    return model


def test_plan_leaves_the_model_as_it_was(tiny_model):
    model = _with_adapter(tiny_model)
    attn = model.layers[0].self_attn
    layers, changed = tensor_parallel.plan(model, 2)
    assert {how for _, how in layers} == {tensor_parallel.COLS, tensor_parallel.ROWS} and len(layers) == 7 * 2
    assert sorted({k for _, k, _, _ in changed}) == ["n_heads", "n_kv_heads"]
    assert (attn.n_heads, attn.n_kv_heads) == (4, 2)  # put back
    assert type(attn.q_proj).__name__ == "LoRALinear" and attn.q_proj.linear.weight.shape == (64, 64)


def test_shapes_that_do_not_divide_are_refused_by_name(tiny_model):
    model = _with_adapter(tiny_model)
    with pytest.raises(UserError, match=r"model\.layers\.0\.self_attn\.n_kv_heads is 2, which 4 does not"):
        tensor_parallel.plan(model, 4)
    with pytest.raises(UserError, match=r"model\.layers\.0\.self_attn\.q_proj has 64 outputs, which 3 "):
        tensor_parallel.plan(model, 3)
    assert model.layers[0].self_attn.n_heads == 4


def test_models_and_adapters_it_cannot_split_are_refused(tmp_path, tiny_model, tiny_model_4bit):
    gemma = write_arch_model(tmp_path / "gemma", "gemma3_text")
    with pytest.raises(UserError, match="needs mlx-lm's shard\\(\\) for the model, which its gemma3_text"):
        tensor_parallel.plan(_with_adapter(gemma), 2)
    moe = write_arch_model(tmp_path / "moe", "qwen3_moe")
    with pytest.raises(UserError, match="qwen3_moe model: its shard\\(\\) splits experts or fused layers"):
        tensor_parallel.plan(_with_adapter(moe), 2)
    with pytest.raises(UserError, match="with the Aligner is not implemented"):
        tensor_parallel.plan(_with_adapter(tiny_model, "aligner", aligner_start_layer=0), 2)
    quantized, _, _, _ = models.load_model(str(tiny_model_4bit), "float32", None, True)
    with pytest.raises(UserError, match="q_proj is QuantizedLinear \\(a quantized model"):
        tensor_parallel.plan(quantized, 2)


@pytest.mark.slow
def test_refusal_is_one_line_on_every_process(tmp_path, arith_data):
    """A model whose KV heads do not divide by 2: each process says so in one line, before the
    output folder is made."""
    model = write_model(tmp_path / "kv1", llama_config(num_key_value_heads=1))
    _PORT[0] += 3
    cmd = [launcher(), "--backend", "ring", "-n", "2", "--starting-port", str(_PORT[0]), "--", sys.executable,
           "-m", "mlx_dft", "train", "--model", str(model), "--data", str(arith_data), "--iters", "1",
           "--shard", "tensor", "--output", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    lines = (done.stdout + done.stderr).splitlines()
    said = [x for x in lines if "n_kv_heads is 1, which 2 does not divide" in x]
    assert len(said) == 2 and "Traceback" not in done.stderr, done.stdout + done.stderr
    assert not (tmp_path / "out").exists()
