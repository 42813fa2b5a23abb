"""--shard fsdp: two (and four) processes on the ring backend over loopback, each holding its part
of the weights, gradients and optimizer state, give the one-process run's losses at every step and
its weights; a resume of a sharded run continues it exactly; bad --shard input is one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_dft  # noqa: F401
from mlx_dft import sharding
from mlx_dft.errors import UserError

HERE = Path(__file__).parent
TOL = 1e-5


def launcher() -> str | None:
    import shutil

    exe = Path(sys.executable).parent / "mlx.launch"
    return str(exe) if exe.exists() else shutil.which("mlx.launch")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}


_PORT = [35000 + (os.getpid() * 7) % 20000]


def run(opts: dict, n: int = 1) -> subprocess.CompletedProcess:
    """One training run of ``opts`` on ``n`` processes (ring backend on loopback)."""
    cmd = [sys.executable, str(HERE / "dist_worker.py"), json.dumps(opts)]
    if n > 1:
        _PORT[0] += n + 1
        cmd = [launcher(), "--backend", "ring", "-n", str(n), "--starting-port", str(_PORT[0]), "--", *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env())
    # mlx.launch can return 0 when a worker failed: its warning names the exit code
    failed = done.returncode != 0 or "exited with code" in done.stdout + done.stderr
    assert not failed, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def records(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def trained(folder: Path) -> dict:
    """The trained weights a run's folder holds (adapters.safetensors, also full fine-tuning's;
    aligner.safetensors)."""
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in mx.load(str(f)).items()}


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float(np.abs(np.array(a[k]) - np.array(b[k])).max()) for k in a)


def same_losses(one: Path, two: Path) -> float:
    """The largest difference of the reported train and validation metrics, step by step (relative
    where a metric is above 1: perplexities)."""
    r1, r2 = records(one), records(two)
    assert [r["step"] for r in r1] == [r["step"] for r in r2]
    worst = 0.0
    for a, b in zip(r1, r2):
        for k in a:
            timing = k in ("train_time", "val_time")
            if k.startswith(("train_", "val_")) and not timing and isinstance(a[k], float):
                worst = max(worst, abs(a[k] - b[k]) / max(1.0, abs(a[k])))
    return worst


def base(tiny_model, arith_data, **kw) -> dict:
    """The runs compared: SGD by default (AdamW's first steps divide by the square root of
    near-zero second moments, which turns float rounding of a sum's order into visible steps)."""
    return dict(
        model=str(tiny_model), data=str(arith_data), iters=4, batch_size=4, grad_accumulation_steps=2,
        steps_per_report=1, steps_per_eval=2, val_batches=2, save_every=2, seed=3,
        **{"optimizer": "sgd", **kw},
    )  # fmt: skip


pytestmark = pytest.mark.skipif(launcher() is None, reason="mlx.launch is not installed")


@pytest.mark.slow
@pytest.mark.parametrize(
    "opts, n",
    [
        ({"loss": "dft", "adapter": "lora", "learning_rate": 0.5}, 2),
        ({"loss": "sft", "adapter": "full", "learning_rate": 0.05, "grad_checkpoint": True}, 2),
        ({"loss": "asft", "adapter": "lora", "learning_rate": 0.5}, 2),
        ({"loss": "dft", "adapter": "dora", "learning_rate": 0.5, "pack": True, "max_seq_length": 256}, 2),
        ({"loss": "dft", "adapter": "aligner", "aligner_start_layer": 0, "learning_rate": 0.5}, 2),
        ({"loss": "dft", "adapter": "lora", "learning_rate": 0.5}, 4),
        ({"loss": "asft", "adapter": "full", "reference_copy": True, "learning_rate": 0.05}, 2),
    ],
    ids=[
        "lora-dft", "full-sft-checkpointed", "lora-asft", "dora-dft-packed", "aligner-dft", "lora-dft-4",
        "full-asft-reference-copy",
    ],
)  # fmt: skip
def test_fsdp_processes_match_one(tiny_model, arith_data, tmp_path, opts, n):
    o = base(tiny_model, arith_data, **opts)
    run({**o, "output": str(tmp_path / "one")})
    many = run({**o, "output": str(tmp_path / "many"), "shard": "fsdp"}, n=n)
    assert f"{n} workers, --shard fsdp" in many.stdout
    dl = same_losses(tmp_path / "one", tmp_path / "many")
    a, b = trained(tmp_path / "one"), trained(tmp_path / "many")
    dw = max_diff(a, b)
    print(f"{opts['adapter']}+{opts['loss']} on {n}: max |loss diff| {dl:.3g}, max |weight diff| {dw:.3g}")
    assert dl < TOL and dw < TOL
    # the checkpoints are whole arrays too
    ck1, ck2 = (sorted((tmp_path / x / "checkpoints").iterdir())[0] for x in ("one", "many"))
    ck1, ck2 = trained(ck1), trained(ck2)
    assert max_diff(ck1, ck2) < TOL


@pytest.mark.slow
def test_fsdp_resume_continues_exactly(tiny_model, arith_data, tmp_path):
    """From a checkpoint written by 2 sharded processes, 2 sharded processes and 1 plain one each
    continue to the uninterrupted run's weights (the checkpoint is whole arrays)."""
    o = base(tiny_model, arith_data, loss="dft", adapter="lora", learning_rate=1e-2, optimizer="adamw")
    run({**o, "output": str(tmp_path / "whole"), "shard": "fsdp"}, n=2)
    ck = str(tmp_path / "whole" / "checkpoints" / "step-0000002")
    weights, moments = (mx.load(f"{ck}/{f}.safetensors") for f in ("adapters", "optimizer"))
    for k, w in weights.items():  # AdamW's moments as whole as the weights
        assert moments[f"{k}.m"].shape == w.shape and moments[f"{k}.v"].shape == w.shape
    run({"resume": ck, "output": str(tmp_path / "two"), "shard": "fsdp"}, n=2)
    a = mx.load(str(tmp_path / "whole" / "adapters.safetensors"))
    dw = max_diff(a, mx.load(str(tmp_path / "two" / "adapters.safetensors")))
    print(f"resume on two: max |weight diff| {dw:.3g}")
    assert dw < TOL
    # On another number of processes the gradient sums run in another order: with SGD (AdamW's
    # first steps turn that rounding into 5.6e-3 on an AMD EPYC; see ``base``)
    o = base(tiny_model, arith_data, loss="dft", adapter="lora", learning_rate=0.5)
    run({**o, "output": str(tmp_path / "sgd"), "shard": "fsdp"}, n=2)
    ck = str(tmp_path / "sgd" / "checkpoints" / "step-0000002")
    run({"resume": ck, "output": str(tmp_path / "one"), "shard": "none"})
    a = mx.load(str(tmp_path / "sgd" / "adapters.safetensors"))
    dw = max_diff(a, mx.load(str(tmp_path / "one" / "adapters.safetensors")))
    print(f"resume on one: max |weight diff| {dw:.3g}")
    assert dw < TOL


def test_shard_refusals():
    one = mx.distributed.init()
    with pytest.raises(UserError, match="needs a distributed launch"):
        sharding.check("fsdp", one)
    with pytest.raises(UserError, match="--shard tensor needs a distributed launch"):
        sharding.check("tensor", one)
    with pytest.raises(UserError, match="unknown --shard"):
        sharding.check("zero3", one)
    sharding.check("none", one)


def test_shard_without_launch_is_one_line(tiny_model, arith_data, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mlx_dft", "train", "--model", str(tiny_model), "--data", str(arith_data),
         "--iters", "1", "--shard", "fsdp", "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env=_env(),
    )  # fmt: skip
    assert done.returncode == 1
    lines = [x for x in done.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "--shard fsdp needs a distributed launch" in lines[0], done.stderr
    assert not (tmp_path / "out").exists()


def test_shard_padding_round_trip():
    """Any shape shards (flattened, padded to a multiple of N): the shards put back are the array."""
    a = mx.arange(7 * 3, dtype=mx.float32).reshape(7, 3)
    for n in (2, 4, 5):
        parts = [sharding._shard_of(a, n, r) for r in range(n)]
        assert len({p.size for p in parts}) == 1
        back = sharding._unpad(mx.concatenate(parts), a.shape)
        assert mx.array_equal(back, a)


def test_workers_that_differ_are_refused_on_every_worker(tmp_path):
    script = tmp_path / "differ.py"
    script.write_text(
        "import mlx_dft\n"
        "import mlx.core as mx\n"
        "from mlx_dft import sharding\n"
        "from mlx_dft.errors import UserError\n"
        "world = mx.distributed.init()\n"
        "parts = {'mlx version': '0.32', 'mlx_dft version': f'0.{world.rank()}'}\n"
        "try:\n"
        "    sharding.check_same_everywhere(world, parts)\n"
        "except UserError as e:\n"
        "    print(f'rank {world.rank()}: {e}', flush=True)\n"
    )
    _PORT[0] += 3
    cmd = [launcher(), "--backend", "ring", "-n", "2", "--starting-port", str(_PORT[0]), "--", sys.executable]
    done = subprocess.run([*cmd, str(script)], capture_output=True, text=True, timeout=120, env=_env())
    said = sorted(x for x in done.stdout.splitlines() if x.startswith("rank "))
    assert len(said) == 2, done.stdout + done.stderr
    assert all("the workers differ in mlx_dft version (rank 1's is not rank 0's" in x for x in said), said


def test_a_checkpoint_streams_one_whole_tensor_at_a_time(tmp_path):
    """A sharded save writes placeholders of the whole shapes, each fetched as the writer reaches
    it: the file is what mx.save_safetensors writes of the real arrays, and the fetches come one
    at a time (each dropped before the next)."""
    from mlx_dft import files

    real = {"w": mx.random.normal((5, 3)).astype(mx.bfloat16), "b": mx.arange(4)}
    real["z"] = mx.random.normal((7, 2))
    stands = {k: mx.zeros(v.shape, v.dtype) for k, v in real.items() if k != "b"}
    fetched = []
    for k, stand in stands.items():
        files.DEFERRED[id(stand)] = lambda k=k: fetched.append(k) or real[k]
    try:
        files.save_safetensors(tmp_path / "s", {**stands, "b": real["b"]}, {"format": "mlx"})
    finally:
        for stand in stands.values():
            files.DEFERRED.pop(id(stand))
    back, meta = mx.load(str(tmp_path / "s.safetensors"), return_metadata=True)
    assert meta == {"format": "mlx"} and fetched == ["w", "z"]
    assert set(back) == set(real) and all(back[k].dtype == real[k].dtype for k in real)
    assert all(mx.array_equal(back[k], real[k]).item() for k in real)


def _ring(n: int, tmp_path: Path) -> dict:
    """The environment of ``n`` ring processes on loopback started by hand (mlx.launch would wait
    on a stopped process): one hostfile, MLX_RANK each."""
    _PORT[0] += n + 1
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{_PORT[0] + r}"] for r in range(n)]))
    return {**_env(), "MLX_HOSTFILE": str(hosts)}


@pytest.mark.slow
def test_a_process_that_stops_answering_ends_the_others_in_a_line(tiny_model, arith_data, tmp_path):
    """A process stopped mid-run (SIGSTOP: its sockets open, silent, as a machine that hangs or
    dropped off the network): the other exits 1 within --shard-timeout with one line, the
    checkpoints already written stay, and --resume finishes the run."""
    import signal
    import time

    o = base(tiny_model, arith_data, loss="dft", adapter="lora", learning_rate=1e-2)
    o.update(iters=10, save_every=1, output=str(tmp_path / "run"), shard="fsdp", shard_timeout=30)
    env = _ring(2, tmp_path)
    cmd = [sys.executable, str(HERE / "dist_worker.py"), json.dumps(o)]
    logs = [(r, open(tmp_path / f"out{r}", "w"), open(tmp_path / f"err{r}", "w")) for r in range(2)]
    procs = [subprocess.Popen(cmd, env={**env, "MLX_RANK": str(r)}, stdout=a, stderr=b) for r, a, b in logs]
    try:
        first = tmp_path / "run" / "checkpoints" / "step-0000002" / "trainer_state.json"
        deadline = time.monotonic() + 300
        while not first.is_file() and time.monotonic() < deadline and procs[0].poll() is None:
            time.sleep(0.05)
        assert first.is_file(), (tmp_path / "err0").read_text()[-3000:]
        procs[1].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        code = procs[0].wait(timeout=120)
        waited = time.monotonic() - stopped
    finally:
        for p in procs:
            p.kill()
            p.wait()
    err = [x for x in (tmp_path / "err0").read_text().splitlines() if x.strip()]
    assert code == 1 and 30 <= waited < 90, (code, waited)
    said = "rank 0 of 2: nothing from the other processes for 30 s (--shard-timeout)"
    assert len(err) == 1 and said in err[0], err
    kept = [k.parent for k in sorted((tmp_path / "run" / "checkpoints").glob("step-*/trainer_state.json"))]
    assert len(kept) >= 2 and all(len(mx.load(str(k / "adapters.safetensors"))) > 0 for k in kept), kept
    run({"resume": str(tmp_path / "run"), "output": str(tmp_path / "run"), "shard": "fsdp"}, n=2)
    assert records(tmp_path / "run")[-1]["step"] == 10
