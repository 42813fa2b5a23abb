"""Adapters in and out of the Hugging Face world, checked against the real consumers:
transformers + PEFT on torch CPU load what we export and compute our logits, and what PEFT
makes imports here and computes PEFT's logits."""

import json
import os
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import mlx_dft
from conftest import llama_config, run_cli, write_model
from mlx_dft import api
from mlx_dft.errors import UserError
from mlx_dft.interop import convert, hub
from mlx_dft.interop.fuse import fuse

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ARCHS = {
    "llama": llama_config(architectures=["LlamaForCausalLM"]),
    "mistral": {
        **llama_config(),
        "model_type": "mistral",
        "architectures": ["MistralForCausalLM"],
        "sliding_window": None,
    },
    "qwen2": {**llama_config(), "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]},
    "qwen3": {**llama_config(head_dim=16), "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]},
}
IDS = [[1, 40, 41, 42, 43, 44, 45, 46, 47]]
FAST = dict(iters=3, batch_size=4, learning_rate=3e-2, progress=False, steps_per_report=3)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {a: write_model(root / a, cfg) for a, cfg in ARCHS.items()}


def hf(path):
    m = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return m.eval()


def torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def mlx_logits(model_path, adapter=None):
    net, _ = api.load(str(model_path), adapter)
    return np.array(net(mx.array(IDS)))


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_exported_lora_gives_our_logits_in_peft(models, arith_data, tmp_path, arch, kind):
    run = mlx_dft.train(
        model=str(models[arch]),
        data=str(arith_data),
        output=str(tmp_path / "run"),
        adapter=kind,
        lora_rank=4,
        num_layers=1,
        lora_keys=["q_proj", "v_proj", "down_proj"],
        **FAST,
    )
    out = convert.export_adapter(run.output, tmp_path / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 80.0
    assert cfg["target_modules"] == ["mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"]
    assert cfg["layers_to_transform"] == [1]
    assert cfg["use_dora"] == (kind == "dora") and cfg["task_type"] == "CAUSAL_LM"
    model = peft.PeftModel.from_pretrained(hf(models[arch]), str(out)).eval()
    ours = mlx_logits(models[arch], run.output)
    np.testing.assert_allclose(torch_logits(model), ours, atol=1e-4)
    assert np.abs(ours - mlx_logits(models[arch])).max() > 1e-3  # the adapter matters


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("variant", ["lora", "dora", "patterns", "rslora"])
def test_peft_made_adapters_import_with_peft_logits(models, tmp_path, arch, variant):
    torch.manual_seed(0)
    base = hf(models[arch])
    kw = dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"],
        init_lora_weights=False,
    )  # random non-zero B
    if variant == "dora":
        kw["use_dora"] = True
    if variant == "patterns":
        kw.update(
            rank_pattern={"model.layers.0.self_attn.q_proj": 2, "up_proj": 6},
            alpha_pattern={"v_proj": 3},
            layers_to_transform=[0],
        )
    if variant == "rslora":
        kw["use_rslora"] = True
    pm = peft.get_peft_model(base, peft.LoraConfig(**kw)).eval()
    expected = torch_logits(pm)
    pm.save_pretrained(str(tmp_path / "peft"))
    out = convert.import_adapter(str(tmp_path / "peft"), tmp_path / "mlx", model=str(models[arch]))
    np.testing.assert_allclose(mlx_logits(models[arch], out), expected, atol=1e-4)
    cfg = json.loads((out / "adapter_config.json").read_text())
    if variant == "patterns":
        assert cfg["lora_parameters"]["layers"] == [0]  # not the top block: an explicit layer list
        assert cfg["lora_parameters"]["module_ranks"] == {
            "model.layers.0.self_attn.q_proj": 2,
            "model.layers.0.mlp.up_proj": 6,
        }


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_lora_round_trip_is_bitwise(models, arith_data, tmp_path, kind):
    run = mlx_dft.train(
        model=str(models["qwen3"]),
        data=str(arith_data),
        output=str(tmp_path / "run"),
        adapter=kind,
        lora_scale=7.3,
        **FAST,
    )
    convert.export_adapter(run.output, tmp_path / "peft")
    back = convert.import_adapter(str(tmp_path / "peft"), tmp_path / "back", model=str(models["qwen3"]))
    a, b = mx.load(str(run.output / "adapters.safetensors")), mx.load(str(back / "adapters.safetensors"))
    assert set(a) == set(b) and all(mx.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    ca, cb = (json.loads((p / "adapter_config.json").read_text()) for p in (run.output, back))
    assert ca["lora_parameters"] == cb["lora_parameters"] and ca["fine_tune_type"] == cb["fine_tune_type"]


def train_aligner(model, data, out, gate="head", tokens=3):
    run = mlx_dft.train(
        model=str(model),
        data=str(data),
        output=str(out),
        adapter="aligner",
        aligner_tokens=tokens,
        aligner_start_layer=0,
        aligner_gate=gate,
        **FAST,
    )
    # make every gate clearly non-zero, of both signs (a few steps leave them small)
    w = mx.load(str(out / "aligner.safetensors"))
    w = {
        k: (mx.random.uniform(-1, 1, v.shape, key=mx.random.key(i)) if "gate" in k else v)
        for i, (k, v) in enumerate(sorted(w.items()))
    }
    mx.save_safetensors(str(out / "aligner.safetensors"), w)
    return run.output


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_exported_aligner_runs_in_pytorch_with_our_logits(models, arith_data, tmp_path, arch):
    from mlx_dft.torch_aligner import attach_aligner

    out = train_aligner(models[arch], arith_data, tmp_path / "al")
    exported = convert.export_adapter(out, tmp_path / "hf")
    assert sorted(p.name for p in exported.iterdir()) == [
        "aligner_config.json",
        "aligner_model.safetensors",
        "mlx_dft_run.json",
        "tokenizer.json",  # the run's tokenizer travels with the adapter
        "tokenizer_config.json",
    ]
    model = attach_aligner(hf(models[arch]), exported)
    ours = mlx_logits(models[arch], out)
    np.testing.assert_allclose(torch_logits(model), ours, atol=1e-4)
    assert np.abs(ours - mlx_logits(models[arch])).max() > 1e-3
    back = convert.import_adapter(str(exported), tmp_path / "back")  # mlx -> HF -> mlx, bitwise
    a, b = (mx.load(str(p / "aligner.safetensors")) for p in (out, back))
    assert set(a) == set(b) and all(mx.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_layer_gate_aligner_exports_exactly_as_peft_adaption_prompt(models, arith_data, tmp_path, arch):
    out = train_aligner(models[arch], arith_data, tmp_path / "al", gate="layer")
    exported = convert.export_adapter(out, tmp_path / "ap", fmt="peft")
    cfg = json.loads((exported / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ADAPTION_PROMPT" and cfg["adapter_len"] == 3 and cfg["adapter_layers"] == 2
    model = peft.PeftModel.from_pretrained(hf(models[arch]), str(exported)).eval()
    np.testing.assert_allclose(torch_logits(model), mlx_logits(models[arch], out), atol=1e-4)


def test_adaption_prompt_export_refuses_what_is_not_exact(models, arith_data, tmp_path):
    out = train_aligner(models["qwen2"], arith_data, tmp_path / "al", gate="head")
    with pytest.raises(UserError, match="gates are per head.*llama and mistral, not qwen2"):
        convert.export_adapter(out, tmp_path / "ap", fmt="peft")
    assert not (tmp_path / "ap").exists()


OFFICIAL = [
    ("llama2-7b-alpaca-1token.pth", 1, 4096, 32),
    ("llama2-13b-alpaca-10tokens.pth", 10, 5120, 40),
    ("llama2-7b-metamath-10tokens.pth", 10, 4096, 32),
    ("llama2-7b-beaver-dpo-1token.pth", 1, 4096, 32),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,tokens,hidden,layers", OFFICIAL)
def test_official_checkpoints_import(official_dir, tmp_path, name, tokens, hidden, layers):
    from mlx_lm.models import llama

    from mlx_dft import adapters
    from mlx_dft.adapters import aligner

    src = official_dir / name
    out = convert.import_adapter(str(src), tmp_path / "al")
    cfg = json.loads((out / "adapter_config.json").read_text())
    a = cfg["aligner"]
    assert (a["tokens"], a["hidden_size"], a["num_hidden_layers"], a["start_layer"]) == (
        tokens,
        hidden,
        layers,
        2,
    )
    heads = a["num_attention_heads"]
    assert cfg["base_model"] == {4096: "meta-llama/Llama-2-7b-hf", 5120: "meta-llama/Llama-2-13b-hf"}[hidden]
    reference = torch.load(str(src), weights_only=True, map_location="cpu")  # the authors' own tensors
    w = mx.load(str(out / "aligner.safetensors"))
    np.testing.assert_array_equal(
        np.array(w["aligner.prefix"]), reference["global_value_embedding.weight"].float().numpy()
    )
    for i in range(2, layers):
        np.testing.assert_array_equal(
            np.array(w[f"model.layers.{i}.self_attn.aligner_gate"]),
            reference[f"transformer.h.{i}.attn.gating_factor"].float().numpy().reshape(-1),
        )
    expected = aligner.parameter_count(tokens, hidden, layers - 2, heads, "head")
    assert sum(v.size for v in w.values()) == expected
    assert expected == {(1, 4096): 5056, (10, 5120): 51200 + 38 * 40, (10, 4096): 41920}[(tokens, hidden)]
    # A LLaMA-2-shaped random model (its blocks share one set of weights to fit in memory) runs with it.
    args = llama.ModelArgs.from_dict(
        llama_config(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            intermediate_size=256,
            vocab_size=512,
            tie_word_embeddings=True,
        )
    )
    model = llama.Model(args)
    block = model.layers[0]
    shared = {
        k: mx.random.normal(v.shape) * 0.02
        for k, v in __import__("mlx.utils").utils.tree_flatten(block.parameters())
    }
    for layer in model.layers:
        layer.update(__import__("mlx.utils").utils.tree_unflatten(list(shared.items())))
    before = model(mx.array(IDS))
    adapters.load_adapter(model, out)
    after = model(mx.array(IDS))
    assert bool(mx.isfinite(after).all()) and float(mx.abs(after - before).max()) > 0


@pytest.fixture(scope="module")
def official_dir():
    from pathlib import Path

    d = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "aligner_official"
    if not d.is_dir():
        pytest.skip("../shared/fixtures/aligner_official is absent")
    return d


def test_fused_model_loads_in_transformers(models, arith_data, tmp_path):
    run = mlx_dft.train(
        model=str(models["llama"]), data=str(arith_data), output=str(tmp_path / "run"), adapter="dora", **FAST
    )
    out = fuse(run.output, tmp_path / "fused")
    np.testing.assert_allclose(torch_logits(hf(out)), mlx_logits(models["llama"], run.output), atol=1e-4)
    al = train_aligner(models["llama"], arith_data, tmp_path / "al")
    with pytest.raises(UserError, match="cannot be merged"):
        fuse(al, tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_push_builds_card_and_commit_offline(models, arith_data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    run = mlx_dft.train(
        model=str(models["qwen2"]), data=str(arith_data), output=str(tmp_path / "run"), **FAST
    )
    exported = convert.export_adapter(run.output, tmp_path / "peft", base_model="Qwen/Qwen2-0.5B")
    calls = []

    class FakeApi:
        def create_repo(self, **kw):
            calls.append(("create_repo", kw))

        def create_commit(self, **kw):
            calls.append(("create_commit", kw))
            return type("Info", (), {"commit_url": "https://huggingface.co/me/x/commit/1"})()

    url = hub.push(exported, "me/my-dft-lora", private=True, api=FakeApi())
    assert url.endswith("/commit/1")
    assert calls[0] == (
        "create_repo",
        {"repo_id": "me/my-dft-lora", "private": True, "repo_type": "model", "exist_ok": True},
    )
    ops = {op.path_in_repo: op for op in calls[1][1]["operations"]}
    assert set(ops) == {"adapter_config.json", "adapter_model.safetensors", "mlx_dft_run.json", "README.md",
                        "tokenizer.json", "tokenizer_config.json"}  # fmt: skip
    card = hub.plan_push(exported, "me/my-dft-lora").card
    front = card.split("---")[1]
    assert "base_model: Qwen/Qwen2-0.5B" in front and "library_name: peft" in front
    for tag in ("- mlx", "- lora", "- dft"):
        assert tag in front
    assert "| loss | dft |" in card and "train_loss" in card
    assert "hf_secret_token_value" not in card and all(
        b"hf_secret" not in op.path_or_fileobj for op in ops.values()
    )
    with pytest.raises(UserError, match="run `mlx_dft export"):
        hub.plan_push(run.output, "me/x")


def fill_cache(cache, repo, src, commit="89abcdef0123456789abcdef0123456789abcdef"):
    base = cache / ("models--" + repo.replace("/", "--"))
    shutil.copytree(src, base / "snapshots" / commit)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)


@pytest.mark.slow
def test_hub_repo_ids_resolve_offline(models, arith_data, tmp_path):
    run = mlx_dft.train(
        model=str(models["llama"]), data=str(arith_data), output=str(tmp_path / "run"), **FAST
    )
    exported = convert.export_adapter(run.output, tmp_path / "peft", base_model="someone/base")
    fill_cache(tmp_path / "hub", "someone/base", models["llama"])
    fill_cache(tmp_path / "hub", "someone/dft-lora", exported)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path)}
    p = run_cli("import", "someone/dft-lora", "--out", tmp_path / "imported", env=env)
    assert p.returncode == 0, p.stderr
    g = run_cli(
        "generate", "--adapter-path", "someone/dft-lora", "--prompt", "Question:", "--max-tokens", 3, env=env
    )
    assert g.returncode == 0, g.stderr
    t = run_cli(
        "train",
        "--adapter-from",
        "someone/dft-lora",
        "--data",
        arith_data,
        "--iters",
        2,
        "--batch-size",
        4,
        "--output",
        tmp_path / "cont",
        env=env,
    )
    assert t.returncode == 0, t.stderr
    missing = run_cli("import", "someone/not-there", "--out", tmp_path / "x", env=env)
    assert missing.returncode == 1 and "adapter not found: someone/not-there" in missing.stderr
    assert "Traceback" not in missing.stderr and not (tmp_path / "x").exists()


def test_adapter_from_a_peft_folder_trains_resumes_and_generates(models, arith_data, tmp_path):
    base = hf(models["llama"])
    pm = peft.get_peft_model(
        base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    pm.save_pretrained(str(tmp_path / "peft"))
    common = dict(
        model=str(models["llama"]), data=str(arith_data), iters=4, batch_size=4, save_every=2, progress=False
    )
    run = mlx_dft.train(adapter_from=str(tmp_path / "peft"), output=str(tmp_path / "a"), **common)
    cfg = json.loads((run.output / "adapter_config.json").read_text())
    assert cfg["lora_parameters"]["rank"] == 2 and cfg["lora_parameters"]["keys"] == [
        "self_attn.q_proj",
        "self_attn.v_proj",
    ]
    resumed = mlx_dft.train(
        resume=str(tmp_path / "a" / "checkpoints" / "step-0000002"),
        output=str(tmp_path / "b"),
        progress=False,
    )
    a, b = (mx.load(str(p / "adapters.safetensors")) for p in (run.output, resumed.output))
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), atol=1e-6)
    assert isinstance(
        api.generate("Question:", model=str(models["llama"]), adapter=run.output, max_tokens=3), str
    )


# ------------------------------------------------------------------ bad input


def make_peft(models, tmp_path, **kw):
    torch.manual_seed(0)
    pm = peft.get_peft_model(
        hf(models["llama"]), peft.LoraConfig(**{"r": 2, "target_modules": ["q_proj"], **kw})
    )
    pm.save_pretrained(str(tmp_path / "peft"))
    return tmp_path / "peft"


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(bias="lora_only"), "bias training"),
        (dict(target_modules=["embed_tokens"]), "embedding LoRA"),
    ],
)
def test_unsupported_peft_variants_are_refused_by_name(models, tmp_path, kw, message):
    src = make_peft(models, tmp_path, **kw)
    p = run_cli("import", src, "--out", tmp_path / "out", "--model", models["llama"])
    assert p.returncode == 1 and message in p.stderr and p.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_peft_adapter_for_another_base_model(models, tmp_path):
    src = make_peft(models, tmp_path, target_modules=["q_proj", "v_proj"])
    other = write_model(
        tmp_path / "other", llama_config(hidden_size=96, num_attention_heads=6, num_key_value_heads=2)
    )
    p = run_cli("generate", "--adapter-path", src, "--model", other, "--prompt", "hi")
    assert p.returncode == 1 and "has shape" in p.stderr and "another model" in p.stderr
    assert "Traceback" not in p.stderr


def test_corrupt_or_truncated_files(models, tmp_path):
    src = make_peft(models, tmp_path)
    w = src / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-10])
    p = run_cli("import", src, "--out", tmp_path / "out", "--model", models["llama"])
    assert p.returncode == 1 and "corrupt or truncated" in p.stderr and not (tmp_path / "out").exists()
    w.write_bytes(b"garbage")
    assert (
        "corrupt or truncated"
        in run_cli("import", src, "--out", tmp_path / "out", "--model", models["llama"]).stderr
    )


def test_pth_with_unexpected_keys_or_code_is_refused(tmp_path):
    torch.save(
        {
            "global_value_embedding.weight": torch.zeros(1, 8),
            "transformer.h.2.attn.gating_factor": torch.zeros(1, 2, 1, 1),
            "lm_head.weight": torch.zeros(2, 2),
        },
        tmp_path / "x.pth",
    )
    p = run_cli("import", tmp_path / "x.pth", "--out", tmp_path / "out", "--model", "none/none")
    assert p.returncode == 1 and "unexpected key lm_head.weight" in p.stderr

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"global_value_embedding.weight": Evil()}, tmp_path / "evil.pth")
    p = run_cli("import", tmp_path / "evil.pth", "--out", tmp_path / "out2")
    assert p.returncode == 1 and "refusing to load" in p.stderr
    assert not (tmp_path / "pwned").exists()


def test_export_of_a_full_fine_tune_points_to_fuse(models, arith_data, tmp_path):
    run = mlx_dft.train(
        model=str(models["llama"]), data=str(arith_data), output=str(tmp_path / "run"), adapter="full", **FAST
    )
    p = run_cli("export", run.output, "--out", tmp_path / "out")
    assert p.returncode == 1 and "mlx_dft fuse" in p.stderr


def test_torch_is_imported_only_when_the_pytorch_loader_is_used():
    code = "import sys, mlx_dft.cli, mlx_dft.torch_aligner; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_fuse_dequantize_of_a_4bit_qlora(tiny_model_4bit, arith_data, tmp_path):
    run = mlx_dft.train(model=str(tiny_model_4bit), data=str(arith_data), output=str(tmp_path / "q"), **FAST)
    out = fuse(run.output, tmp_path / "fused", dequantize=True)
    assert "quantization" not in json.loads((out / "config.json").read_text())
    np.testing.assert_allclose(torch_logits(hf(out)), mlx_logits(tiny_model_4bit, run.output), atol=1e-4)


@pytest.mark.parametrize("adapter,library", [("lora", "library_name: peft"), ("aligner", "aligner")])
def test_export_writes_the_model_card_push_would(models, arith_data, tmp_path, adapter, library):
    run = mlx_dft.train(model=str(models["llama"]), data=str(arith_data), output=str(tmp_path / "run"),
                        adapter=adapter, aligner_start_layer=0, **FAST)  # fmt: skip
    out = tmp_path / "exported"
    p = run_cli("export", run.output, "--out", out, "--base-model", "meta-llama/Llama-2-7b-hf")
    assert p.returncode == 0, p.stderr
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert "base_model: meta-llama/Llama-2-7b-hf" in front and "- mlx_dft" in front and "- dft" in front
    assert library in card and "# exported" in card and "## Training" in card
    # push sends the same card, with the repo's name where the folder's stands
    pushed = hub.plan_push(out, "me/my-adapter").card
    assert pushed.replace("me/my-adapter", "exported").replace("# my-adapter", "# exported") == card
