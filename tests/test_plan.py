"""`mlx_dft plan`: estimates from the model's config alone, checked against measured runs."""

import json
from pathlib import Path

import pytest

from mlx_dft import plan
from mlx_dft.config import TrainConfig
from tests.conftest import run_cli
from tests.test_hub import fill_cache

ROOT = Path(__file__).resolve().parents[1]
MEASURED = json.loads((ROOT / "tests" / "data" / "plan_measurements.json").read_text())
TOLERANCE = 0.15


def _config(row: dict, folder: Path) -> TrainConfig:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(row["config"]))  # no weights: plan needs none
    options = dict(row["options"])
    options["adapter"] = options.pop("fine_tune_type", "lora")
    return TrainConfig(model=str(folder), **options)


def test_the_grid_is_a_grid():
    runs = MEASURED["runs"]
    assert len(runs) >= 12
    assert len({r["shape"] for r in runs}) >= 3
    assert len({r["options"]["batch_size"] for r in runs}) >= 3
    assert len({r["options"]["max_seq_length"] for r in runs}) >= 3
    assert len({r["options"].get("fine_tune_type", "lora") for r in runs}) >= 4
    assert any(r["options"].get("grad_checkpoint") for r in runs)


@pytest.mark.parametrize("row", MEASURED["runs"], ids=[r["name"] for r in MEASURED["runs"]])
def test_the_estimated_peak_is_within_15_percent_of_the_measured_one(row, tmp_path):
    cfg = _config(row, tmp_path / "model")
    p = plan.estimate(cfg, cfg.max_seq_length, gflops=MEASURED["gflops"][str(row["shape"])])
    measured = row["peak_gb"] * 1e9
    assert abs(p.peak - measured) <= TOLERANCE * measured, (p.peak / 1e9, row["peak_gb"])


def test_step_time_estimates_are_of_the_measured_order(tmp_path):
    """Not a target (the issue's is memory): recorded so a regression in the FLOP count shows."""
    errors = []
    for row in MEASURED["runs"]:
        cfg = _config(row, tmp_path / row["name"].replace(" ", "-"))
        p = plan.estimate(cfg, cfg.max_seq_length, gflops=MEASURED["gflops"][str(row["shape"])])
        errors.append(p.step_seconds / row["step_seconds"])
    assert all(0.33 < e < 3.0 for e in errors), errors


def _config_only(folder: Path, shape: str) -> Path:
    """A model folder holding nothing but the config.json of a measured shape."""
    folder.mkdir()
    row = next(r for r in MEASURED["runs"] if r["shape"] == shape)
    (folder / "config.json").write_text(json.dumps(row["config"]))
    return folder


def test_plan_on_the_cli_reads_only_config_json(tmp_path):
    model = _config_only(tmp_path / "only-config", "qwen3-0.6b")
    p = run_cli("plan", "--model", model, "--batch-size", "2", "--max-seq-length", "256", "--pack")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "plan:" in out and "peak (estimate)" in out and "fits" in out and "largest that fit" in out
    assert "qwen3" in out and "batch 2 x 256 tokens (packed rows)" in out


@pytest.mark.parametrize("shape", ["llama-40m", "qwen3-0.6b"])  # (qwen3's: transformers builds an empty one)
def test_plan_without_a_tokenizer_plans_at_max_seq_length_and_says_so(tmp_path, shape):
    model = _config_only(tmp_path / "no-tokenizer", shape)
    p = run_cli("plan", "--model", model, "--batch-size", "2", "--max-seq-length", "300")
    assert p.returncode == 0, p.stderr
    assert "batch 2 x 304 tokens" in p.stdout  # inputs padded as batches are
    assert "note: no tokenizer to read the data with" in p.stdout


@pytest.mark.slow
def test_plan_suggests_what_to_change_when_it_does_not_fit(tmp_path):
    model = _config_only(tmp_path / "big", "qwen3-0.6b")  # ~1 TB of activations: fits no machine
    p = run_cli("plan", "--model", model, "--batch-size", "512", "--max-seq-length", "8192", "--pack")
    assert p.returncode == 0, p.stderr
    assert "does NOT fit" in p.stdout and "--grad-checkpoint: peak" in p.stdout
    assert "largest that fit:\n  no batch fits at 8192 tokens\n  --max-seq-length" in p.stdout


@pytest.mark.slow
def test_plan_resolves_a_hub_id_from_the_offline_cache(tiny_model, tmp_path):
    fill_cache(tmp_path / "hub", "someone/tiny-model", tiny_model)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path)}
    p = run_cli("plan", "--model", "someone/tiny-model", env=env)
    assert p.returncode == 0, p.stderr
    assert "plan: someone/tiny-model (llama" in p.stdout
    bad = run_cli("plan", "--model", "someone/not-cached", env=env)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_a_quantized_config_on_the_cpu_is_planned_in_float32(tmp_path):
    folder = _config_only(tmp_path / "q", "llama-40m")
    q = {**json.loads((folder / "config.json").read_text()), "quantization": {"group_size": 64, "bits": 4}}
    (folder / "config.json").write_text(json.dumps(q))
    floats = plan.estimate(TrainConfig(model=str(folder)), 256, gflops=100.0)
    kept = plan.estimate(TrainConfig(model=str(folder), keep_quantized=True), 256, gflops=100.0)
    assert floats.weights == 4 * floats.parameters and "float32" in floats.notes[0]
    assert kept.weights < floats.weights / 4


# ------------------------------------------------------------------ sharded over several machines


def test_fsdp_plan_splits_weights_and_optimizer_and_counts_what_is_gathered(tmp_path):
    """One machine of N holds 1/N of the weights, gradients and optimizer state, plus the largest
    unit (a block, the embedding or the output projection) whole twice, and the activations of
    its share of the global batch."""
    row = next(r for r in MEASURED["runs"] if r["shape"] == "qwen3-0.6b")
    cfg = _config(row, tmp_path / "model")
    cfg = TrainConfig(**{**cfg.to_dict(), "adapter": "full", "batch_size": 8, "grad_checkpoint": True})
    gflops = MEASURED["gflops"]["qwen3-0.6b"]
    one = plan.estimate(cfg, 128, gflops)
    for n in (2, 4):
        s = plan.estimate_sharded(cfg, n, 0.0, 128, gflops)
        share = plan.estimate(TrainConfig(**{**cfg.to_dict(), "batch_size": 8 // n}), 128, gflops)
        assert s.gathered == 2 * one.largest_unit > 0
        assert abs(s.weights - (one.weights / n + s.gathered)) < 1e3
        assert abs(s.optimizer - one.optimizer / n) < 1e3
        assert s.activations == share.activations and s.loss == share.loss
        assert s.peak < one.peak
    # the fewest machines: the first N whose share fits, N - 1 not
    need = plan.estimate_sharded(cfg, 3, 0.0, 128, gflops).peak * 1.001
    assert plan.smallest_machines(cfg, need, 128, gflops) == 3
    assert not plan.estimate_sharded(cfg, 2, need, 128, gflops).fits


def test_fsdp_plan_on_the_cli(tmp_path):
    model = _config_only(tmp_path / "only-config", "qwen3-0.6b")
    p = run_cli("plan", "--model", model, "--fine-tune-type", "full", "--batch-size", "4", "--max-seq-length",
                "256", "--pack", "--machines", "2", "--memory", "3GB")  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "sharded over 2 machines (--shard fsdp), each process:" in p.stdout
    assert "(its 2 of the batch of 4)" in p.stdout and "of 3.00 GB:" in p.stdout
    assert "fewest machines of 3.00 GB for --shard fsdp:" in p.stdout
    for bad, said in ((("--memory", "lots"), "--memory 'lots': give a size"),
                      (("--machines", "0"), "--machines 0 must be at least 1")):  # fmt: skip
        r = run_cli("plan", "--model", model, *bad)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and said in r.stderr, r.stderr


def test_memory_sizes_parse():
    assert plan.parse_memory("64GB") == 64e9 and plan.parse_memory("512 mb") == 512e6
    assert plan.parse_memory("1.5TB") == 1.5e12 and plan.parse_memory("24") == 24e9


# scripts/bench_sharding.py --procs 2 4 --grad-checkpoint (docs/sharding.md, 2026-12-07): full
# fine-tuning of a 168M Qwen3-width model, global batch 8 of the bundled task, per-process peaks
BENCH_SHARDING = {1: 3.24, 2: 1.93, 4: 1.26}
BENCH_CONFIG = {
    "model_type": "qwen3", "hidden_size": 1024, "num_hidden_layers": 12, "num_attention_heads": 16,
    "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 3072, "vocab_size": 16384,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True,
    "max_position_embeddings": 4096,
}  # fmt: skip


def test_fsdp_plan_against_the_measured_sharded_runs(tmp_path):
    """The plan under-reads what the sharded runs measured, more as N grows (-8%, -12%, -26%
    measured: what does not shard in this version, about 0.3 GB, is not modelled yet); held to
    30% so that a regression shows."""
    (tmp_path / "config.json").write_text(json.dumps(BENCH_CONFIG))
    cfg = TrainConfig(model=str(tmp_path), adapter="full", batch_size=8, grad_checkpoint=True)
    length = plan.data_length(cfg) or 128
    for n, measured in BENCH_SHARDING.items():
        one = n == 1
        got = plan.estimate(cfg, length, 100.0) if one else plan.estimate_sharded(cfg, n, 0.0, length, 100.0)
        assert abs(got.peak / 1e9 - measured) <= 0.3 * measured, (n, got.peak / 1e9, measured)


def test_a_model_whose_weights_exceed_a_machine_fits_no_number_of_them(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(BENCH_CONFIG))
    cfg = TrainConfig(model=str(tmp_path), adapter="full", batch_size=8, grad_checkpoint=True, pack=True)
    whole = plan.estimate(cfg, 128, 100.0).weights
    assert plan.smallest_machines(cfg, 0.9 * whole, 128, 100.0, most=8) == 0
    assert plan.estimate_sharded(cfg, 8, 0.0, 128, 100.0).peak >= whole
