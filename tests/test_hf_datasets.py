"""Hugging Face datasets by name (--data ORG/NAME, mlx-lm's hf_dataset: YAML block), offline, from a
datasets cache laid out as an earlier online load leaves it."""

import json

import numpy as np
import pytest

from conftest import BUNDLED, run_cli
from mlx_dft.tasks import ARITH_DIR

pytestmark = pytest.mark.slow  # the datasets library and its cache

datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
    """HF_DATASETS_CACHE holding testorg/arith (train: 20 records, validation: 5) as
    ``load_dataset("testorg/arith")`` caches it: testorg___arith/default/0.0.0/<hash>/arith-*.arrow."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.json.json import Json

    root = tmp_path_factory.mktemp("hf")
    src = root / "src"
    src.mkdir()
    for split, n in (("train", 20), ("validation", 5)):
        lines = (ARITH_DIR / f"{'train' if split == 'train' else 'valid'}.jsonl").read_text().splitlines()
        (src / f"{split}.jsonl").write_text("\n".join(lines[:n]) + "\n")
    files = {s: [str(src / f"{s}.jsonl")] for s in ("train", "validation")}
    builder = Json(cache_dir=str(root / "build"), dataset_name="arith", hash="0123abcd",
                   config_name="default", data_files=DataFilesDict.from_patterns(files))  # fmt: skip
    builder.download_and_prepare()
    built = next((root / "build" / "arith").glob("default-*"))
    cache = root / "cache"
    (cache / "testorg___arith").mkdir(parents=True)
    built.rename(cache / "testorg___arith" / "default")
    return {"cache": cache, "src": src}


def offline_env(cache):
    return {"HF_DATASETS_CACHE": str(cache), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def test_data_by_name_trains_with_the_splits_it_has(hf_cache, tmp_path):
    env = offline_env(hf_cache["cache"])
    p = run_cli("train", "--data", "testorg/arith", "--iters", 2, "--accuracy-problems", 0,
                "--output", tmp_path / "run", env=env)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "data train: 20 completions examples" in p.stdout
    assert "data valid: 5 completions examples" in p.stdout
    assert json.loads((tmp_path / "run" / "adapter_config.json").read_text())["training"]["data"] == (
        "testorg/arith"
    )


def test_hub_records_tokenise_exactly_as_the_same_jsonl(hf_cache, monkeypatch):
    from mlx_lm import load

    from mlx_dft import data

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hf_cache["cache"])
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    _, tok = load(str(BUNDLED))
    cfg = data.DataConfig()
    hub = data.load_datasets("testorg/arith", tok, cfg)
    local = {
        "train": data.load_split(hf_cache["src"] / "train.jsonl", "train", tok, cfg),
        "valid": data.load_split(hf_cache["src"] / "validation.jsonl", "valid", tok, cfg),
    }
    assert set(hub) == {"train", "valid"}
    for name in local:
        assert hub[name].format == local[name].format == "completions"
        for a, b in zip(hub[name].tokens, local[name].tokens, strict=True):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(hub[name].supervised, local[name].supervised, strict=True):
            np.testing.assert_array_equal(a, b)
    picked = data.load_datasets("testorg/arith", tok, cfg, hf_splits=["train[:10]", "validation"])
    assert [len(picked["train"]), len(picked["valid"])] == [10, 5]


def test_mlx_lm_hf_dataset_block(hf_cache, tmp_path):
    plan = tmp_path / "c.yaml"
    plan.write_text(
        "hf_dataset:\n  path: testorg/arith\n  train_split: train[:16]\n  valid_split: validation\n"
        "  prompt_feature: prompt\n  completion_feature: completion\niters: 1\naccuracy_problems: 0\n"
    )
    p = run_cli("train", "-c", plan, "--output", tmp_path / "run", env=offline_env(hf_cache["cache"]))
    assert p.returncode == 0, p.stderr
    assert "data train: 16 completions examples" in p.stdout and "data valid: 5" in p.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--data", "testorg/missing"], "cannot load Hugging Face dataset testorg/missing"),
        (["--data", "testorg/arith", "--hf-splits", "train,validation,test,more"], "--hf-splits takes"),
        (["--hf-config", "x"], "--hf-config and --hf-splits apply to a Hugging Face dataset"),
    ],
)
def test_bad_hub_data_is_one_line(hf_cache, tmp_path, args, needle):
    p = run_cli("train", *args, "--iters", 1, "--output", tmp_path / "x", env=offline_env(hf_cache["cache"]))
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], p.stderr
    assert not (tmp_path / "x").exists()


def test_several_hf_datasets_are_refused(tmp_path):
    plan = tmp_path / "c.yaml"
    plan.write_text("hf_dataset:\n  - path: a/b\n  - path: c/d\n")
    p = run_cli("train", "-c", plan)
    assert p.returncode == 1
    assert "hf_dataset lists 2 datasets; mlx_dft trains on one" in p.stderr


def test_the_libraries_warnings_do_not_come_before_our_one_line(monkeypatch, caplog):
    """huggingface_hub logs each retry and datasets its cache notes on stderr: while mlx_dft loads a
    dataset only their errors pass, so a failure reads as one line."""
    import logging

    from mlx_dft import data
    from mlx_dft.errors import UserError

    def noisy(*args, **kwargs):
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 8s [Retry 4/5].")
        logging.getLogger("datasets.load").warning("Using the latest cached version of the dataset")
        raise ConnectionError("Couldn't reach 'someorg/x' on the Hub")

    monkeypatch.setattr(datasets, "get_dataset_split_names", noisy)
    names = ("datasets", "huggingface_hub")
    before = {n: logging.getLogger(n).level for n in names}
    caplog.set_level(logging.WARNING)
    with pytest.raises(UserError, match="cannot load Hugging Face dataset someorg/x: Couldn't reach"):
        data.load_hf_datasets("someorg/x", None, data.DataConfig())
    logged = " ".join(r.getMessage() for r in caplog.records)  # what the libraries' handlers got
    assert "Retrying" not in logged and "latest cached" not in logged, logged
    assert {n: logging.getLogger(n).level for n in names} == before  # the libraries' levels restored
