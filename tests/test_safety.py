"""Pointing mlx_dft at a real folder, and at folders from strangers, loses nothing and reads
nothing it should not: a battery by class, each case a crafted folder made in the test.

- Outputs: only what mlx_dft created (temporary names, its lock file) is ever removed; a folder
  holding anything else is refused as a run's output; no output is an input or lies inside one;
  a staged output replaces only what was there when it started, and two writers never share one.
- Names from a plan become folder names only when they are plain names.
- Reading: a template that travels with an adapter is text; no link out of a model or adapter
  folder is followed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

import mlx_dft
from conftest import BUNDLED, run_cli
from mlx_dft import api
from mlx_dft.checkpoint import OutputFolder
from mlx_dft.errors import UserError
from mlx_dft.evaluation import compare
from mlx_dft.evaluation.sample import run_sample
from mlx_dft.files import LOCK_FILE, TMP_PREFIX, staged_folder
from mlx_dft.interop import convert

SECRET = "TOP-SECRET-7f3a9c: the text of a file outside every folder given"


def tree_digest(folder: Path) -> dict[str, str]:
    """{relative path: sha256 or 'dir' or 'link -> target'} of everything under ``folder``."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                out[rel] = f"link -> {os.readlink(p)}"
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def a_project(root: Path) -> Path:
    """A user's project folder: a git repository, a virtual environment, sources, and dot-files
    that look like temporaries of other tools."""
    proj = root / "project"
    (proj / ".git" / "objects").mkdir(parents=True)
    (proj / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (proj / ".venv" / "bin").mkdir(parents=True)
    (proj / ".venv" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (proj / ".tokenizer.abc").mkdir()  # named like an old mlx_dft temporary: still not ours
    (proj / ".notes.tmp").write_text("mine\n")
    (proj / "README.md").write_text("# my project\n")
    return proj


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model, arith_data) -> Path:
    out = tmp_path_factory.mktemp("safety") / "run"
    mlx_dft.train(
        model=str(tiny_model), data=str(arith_data), output=str(out), iters=1, batch_size=2,
        steps_per_report=1, progress=False, accuracy_problems=0,
    )  # fmt: skip
    return out


# ------------------------------------------------------------------ outputs


def test_a_project_folder_is_refused_as_output_and_stays_byte_identical(tmp_path):
    proj = a_project(tmp_path)
    before = tree_digest(proj)
    p = run_cli("train", "--output", proj, "--iters", "1")
    assert p.returncode == 1, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mlx_dft: error: --output {proj} holds files")
    assert "that are not an mlx_dft run" in lines[0] and ".git" in lines[0]
    assert tree_digest(proj) == before


def test_only_mlx_dft_temporaries_are_cleaned_from_a_killed_runs_folder(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "adapter_config.json").write_text(json.dumps({"mlx_dft_version": "0.1.0"}))
    ours = [
        run / f"{TMP_PREFIX}adapters.123.safetensors",
        run / f"{TMP_PREFIX}metrics.jsonl.ab12cd34.tmp",
        run / "checkpoints" / f"{TMP_PREFIX}step-0000004.k2j4h5g6",
        run / f"{TMP_PREFIX}tokenizer.x1y2z3w4",
    ]
    for p in ours:
        p.mkdir() if "." not in p.name[len(TMP_PREFIX) + 5 :] else p.write_text("partial")
    theirs = [run / ".git", run / ".tokenizer.abc", run / ".cache.tmp", run / "checkpoints" / ".step-1.tmp"]
    for p in theirs:
        p.mkdir()
    out = OutputFolder(run)
    out.check(overwrite=False, resuming=run)
    out.release()
    assert [p for p in ours if p.exists()] == []
    assert [p for p in theirs if not p.exists()] == []


@pytest.mark.parametrize(
    "where,message",
    [
        ("model", "would overwrite the input --model"),
        ("model/out", "lies inside the input --model"),
        ("data", "would overwrite the input --data"),
        ("data/run", "lies inside the input --data"),
        ("adapter", "would overwrite the input --adapter-from"),
        ("adapter/sub", "lies inside the input --adapter-from"),
        ("parent", "holds the input --model"),
    ],
)
def test_an_output_is_never_an_input_nor_inside_one(tmp_path, tiny_model, arith_data, adapter, where, message):  # noqa: E501
    import shutil

    model = tmp_path / "parent" / "model"
    shutil.copytree(tiny_model, model)
    data = tmp_path / "data"
    shutil.copytree(arith_data, data)
    ada = tmp_path / "adapter"
    shutil.copytree(adapter, ada)
    out = {"model": model, "model/out": model / "out", "data": data, "data/run": data / "run",
           "adapter": ada, "adapter/sub": ada / "sub", "parent": tmp_path / "parent"}[where]  # fmt: skip
    before = tree_digest(tmp_path)
    kw = {"adapter_from": str(ada)} if where.startswith("adapter") else {}
    with pytest.raises(UserError, match=message):
        mlx_dft.train(model=str(model), data=str(data), output=str(out), iters=1, progress=False, **kw)
    assert tree_digest(tmp_path) == before


def test_resuming_in_place_is_still_allowed(adapter, tmp_path):
    from mlx_dft.files import check_apart

    check_apart(adapter, {"--resume": adapter}, same_ok=("--resume",))
    with pytest.raises(UserError, match="lies inside the input --resume"):
        check_apart(adapter / "x", {"--resume": adapter}, same_ok=("--resume",))


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", "a/b", ".hidden", "..", "", "x" * 101, "a..b", 7])
def test_compare_names_are_plain_names(tmp_path, arith_data, name):
    plan = tmp_path / "plan.yaml"
    import yaml

    plan.write_text(yaml.safe_dump({"common": {"data": str(arith_data), "iters": 1}, "runs": {name: {}}}))
    with pytest.raises(UserError, match="is not a valid name"):
        compare.load_plan(plan)
    problems = {"common": {"data": str(arith_data)}, "runs": {"ok": {}},
                "eval": {"problems": {name: {"file": str(arith_data / "test.jsonl")}}}}  # fmt: skip
    plan.write_text(yaml.safe_dump(problems))
    with pytest.raises(UserError, match="is not a valid name"):
        compare.load_plan(plan)


def test_compare_refuses_a_foreign_output_folder(tmp_path, arith_data):
    import yaml

    proj = a_project(tmp_path)
    before = tree_digest(proj)
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"common": {"data": str(arith_data), "iters": 1}, "runs": {"a": {}}}))
    with pytest.raises(UserError, match="holds files that are not a compare run's"):
        compare.run_compare(plan, output=proj, progress=False, log=lambda *_: None)
    assert tree_digest(proj) == before


def test_sample_never_writes_over_its_inputs(tmp_path):
    data = tmp_path / "x.stats.json"
    data.write_text(json.dumps({"question": "1 + 1 = ?", "answer": "2"}) + "\n")
    before = data.read_bytes()
    for output, what in ((tmp_path / "x.jsonl", "stats file"), (data, "--output")):
        with pytest.raises(UserError, match=f"{what}.*would overwrite the input --data"):
            run_sample(str(data), str(output), generate=lambda ps: ["2"] * len(ps))
    assert data.read_bytes() == before


def test_a_staged_output_replaces_only_what_it_started_with(tmp_path):
    out = tmp_path / "out"
    with staged_folder(out) as tmp:
        (tmp / "result.txt").write_text("one")
    assert sorted(p.name for p in out.iterdir()) == ["result.txt"]  # no lock file left in a result
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)] == []

    fresh = tmp_path / "fresh"
    with pytest.raises(UserError, match=r"theirs\.txt appeared in it"):
        with staged_folder(fresh) as tmp:
            (tmp / "result.txt").write_text("two")
            (fresh / "theirs.txt").write_text("another writer's")
    assert (fresh / "theirs.txt").read_text() == "another writer's" and not (fresh / "result.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)] == []

    with pytest.raises(UserError, match="was moved or replaced"):
        with staged_folder(tmp_path / "moved") as tmp:
            os.rename(tmp_path / "moved", tmp_path / "elsewhere")
            (tmp_path / "moved").mkdir()
    assert (tmp_path / "elsewhere").is_dir()


def test_two_writers_of_one_output_do_not_both_succeed(tmp_path, adapter):
    """A second writer (another process holds the output's lock) is refused; what the first wrote
    is kept; once the first is done the output can be written."""
    import subprocess
    import sys

    out = tmp_path / "peft"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys, time\n"
         "f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.write('process 424242'); f.flush()\n"
         "print('locked', flush=True); time.sleep(120)",
         str(out / LOCK_FILE)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match="is in use by process 424242"):
            convert.export_adapter(adapter, out, fmt="peft")
        with pytest.raises(UserError, match="is in use by process 424242"):
            with staged_folder(out, overwrite=True):
                pass
    finally:
        holder.kill()
        holder.wait()
    convert.export_adapter(adapter, out, fmt="peft")  # free again: the export goes through
    assert (out / "adapter_config.json").is_file() and not (out / LOCK_FILE).exists()


def test_a_killed_stage_is_cleaned_up_by_the_next_writer_of_that_output_only(tmp_path):
    mine = tmp_path / f"{TMP_PREFIX}out.ab12cd34"
    other = tmp_path / f"{TMP_PREFIX}out2.ab12cd34"
    for p in (mine, other):
        p.mkdir()
    with staged_folder(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    assert not mine.exists() and other.exists()


# ------------------------------------------------------------------ reading


def test_an_adapters_chat_template_is_text_never_a_path(tmp_path, tiny_model, adapter):
    import shutil

    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    evil = tmp_path / "evil"
    shutil.copytree(adapter, evil)
    (evil / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((evil / "adapter_config.json").read_text())
    cfg["training"]["chat_template"] = str(secret)
    (evil / "adapter_config.json").write_text(json.dumps(cfg))
    _, tok = api.load(str(tiny_model), evil)
    assert getattr(tok, "_tokenizer", tok).chat_template == str(secret)
    args = ["--model", tiny_model, "--adapter-path", evil, "--prompt", "hi", "--max-tokens", 4]
    p = run_cli("generate", *args)
    assert SECRET not in p.stdout + p.stderr


@pytest.mark.parametrize(
    "folder,member",
    [("adapter", "chat_template.jinja"), ("adapter", "tokenizer_config.json"), ("model", "tokenizer.json"),
     ("model", "sub/config.json")],
)  # fmt: skip
def test_links_out_of_a_model_or_adapter_folder_are_refused(tmp_path, tiny_model, adapter, folder, member):
    import shutil

    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    evil = tmp_path / folder
    shutil.copytree(adapter if folder == "adapter" else tiny_model, evil)
    link = evil / member
    link.parent.mkdir(exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(secret)
    args = ["--model", tiny_model, "--adapter-path", evil] if folder == "adapter" else ["--model", evil]
    p = run_cli("generate", *args, "--prompt", "hi", "--max-tokens", "2")
    assert p.returncode == 1, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{member} links outside the folder" in lines[0], p.stderr
    assert SECRET not in p.stdout + p.stderr


def test_links_inside_a_folder_and_into_the_hub_cache_are_fine(tmp_path, tiny_model):
    from mlx_dft.files import check_links

    repo = tmp_path / "hub" / "models--org--name"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in Path(tiny_model).iterdir():
        (repo / "blobs" / f.name).write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / f.name)
    check_links(snap, "model")
    (snap / "alias.json").symlink_to(snap / "config.json")
    check_links(snap, "model")
    net, _ = api.load(str(snap))
    assert net is not None
    (snap / "leak.json").symlink_to(tmp_path / "hub")
    with pytest.raises(UserError, match="leak.json links outside the folder"):
        check_links(snap, "model")


def test_a_template_file_beside_an_adapter_is_bounded_text(tmp_path, adapter):
    from mlx_dft.files import read_member

    (tmp_path / "t.jinja").write_bytes(b"\xff\xfe{{ x }}")
    with pytest.raises(UserError, match="not UTF-8"):
        read_member(tmp_path, "t.jinja", "chat template")
    (tmp_path / "big.jinja").write_text("x" * 2000)
    with pytest.raises(UserError, match="the limit is 1,000"):
        read_member(tmp_path, "big.jinja", "chat template", limit=1000)
    assert read_member(BUNDLED, "absent.jinja", "chat template") is None


@pytest.mark.parametrize(
    "content,message",
    [
        (b"\xff\xfe{}", "not UTF-8 text (byte 1)"),
        (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b'{"a": ', "invalid JSON"),
    ],
)
def test_a_malformed_config_json_is_a_one_line_error(tmp_path, tiny_model, content, message):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "config.json").write_bytes(content)
    p = run_cli("generate", "--model", model, "--prompt", "hi", "--max-tokens", "1")
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "config.json" in lines[0], p.stderr
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_bytes(b'{"text": ' + b"[" * 100000 + b"]" * 100000 + b"}\n")
    p = run_cli("train", "--data", tmp_path / "d", "--iters", "1", "--output", tmp_path / "o")
    assert p.returncode == 1 and "line 1: invalid JSON (nested too deeply)" in p.stderr, p.stderr


# ------------------------------------------------------------------ options outside their domain

BAD_DECODING = [
    (["--temperature", "nan"], "--temperature must be >= 0, not nan"),
    (["--temperature", "-0.5"], "--temperature must be >= 0, not -0.5"),
    (["--temperature", "inf"], "--temperature must be >= 0, not inf"),
    (["--top-p", "-1"], "--top-p must be in (0, 1], not -1.0"),
    (["--top-p", "nan"], "--top-p must be in (0, 1], not nan"),
    (["--top-p", "0"], "--top-p must be in (0, 1], not 0.0"),
    (["--seed", "-1"], "--seed must be in [0, 2^64), not -1"),
    (["--max-tokens", "0"], "--max-tokens must be at least 1, not 0"),
]


@pytest.mark.parametrize("args,message", BAD_DECODING)
def test_decoding_options_outside_their_domain_are_one_line_errors(tmp_path, args, message):
    """generate and chat check before the model loads (no model given here would load fine); eval
    and sample through their configs, --limit too."""
    p = run_cli("generate", "--model", tmp_path / "no-model", "-p", "hi", *args)
    assert p.returncode == 1 and p.stderr.strip() == f"mlx_dft: error: {message}", p.stderr
    p = run_cli("chat", "--model", tmp_path / "no-model", *args, input_text="hi\n")
    assert p.returncode == 1 and p.stderr.strip() == f"mlx_dft: error: {message}", p.stderr


def test_eval_and_sample_check_the_same_domains(tmp_path):
    from mlx_dft.evaluation.options import EvalConfig, SampleConfig

    with pytest.raises(UserError, match=r"--top-p must be in \(0, 1\], not nan"):
        EvalConfig.build(problems="x.jsonl", top_p=float("nan")).validate()
    with pytest.raises(UserError, match="--limit must be >= 0"):
        EvalConfig.build(problems="x.jsonl", limit=-3).validate()
    with pytest.raises(UserError, match="--seed must be in"):
        SampleConfig.build(data="x.jsonl", output="y.jsonl", seed=-1).validate()
    with pytest.raises(UserError, match="--temperature must be >= 0, not nan"):
        SampleConfig.build(data="x.jsonl", output="y.jsonl", temperature=float("nan")).validate()


def _rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n :])


def _share_bytes(h: dict) -> None:
    names = [k for k in h if k != "__metadata__"]
    big = max(names, key=lambda k: h[k]["data_offsets"][1] - h[k]["data_offsets"][0])
    small = next(k for k in names if k != big and h[k]["dtype"] == h[big]["dtype"] and h[k]["shape"])
    a, _ = h[big]["data_offsets"]
    length = h[small]["data_offsets"][1] - h[small]["data_offsets"][0]
    h[small]["data_offsets"] = [a, a + length]


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda h: h[next(k for k in h if k != "__metadata__")].update(shape=[10**6, 10**6]), "expected)"),
        (lambda h: h[next(k for k in h if k != "__metadata__")].update(dtype="Q4"), "unknown dtype 'Q4'"),
        (_share_bytes, "share bytes"),
        (lambda h: h[next(k for k in h if k != "__metadata__")].update(shape=["4"]), "non-integer"),
    ],
    ids=["shape vs bytes", "dtype", "shared bytes", "shape type"],
)
def test_safetensors_whose_header_lies_are_refused_before_reading(tmp_path, tiny_model, edit, message):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    _rewrite_header(model / "model.safetensors", edit)
    p = run_cli("generate", "--model", model, "-p", "hi", "-m", "1")
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1, p.stderr
    assert "corrupt or truncated safetensors file" in lines[0] and message in lines[0], p.stderr


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")
)


@pytest.mark.parametrize(
    "text,message",
    [
        (BOMB, "aliases (*a, line 2) are not allowed"),
        ("iters: [" * 5000 + "]" * 5000, "nested too deeply"),
        (b"iters: \xff\n", "not UTF-8"),
        ("iters: 3\n# " + "x" * (1 << 20), "a config is at most"),
    ],
    ids=["alias bomb", "deep", "not utf-8", "huge"],
)
def test_hostile_yaml_is_refused_in_one_line(tmp_path, arith_data, text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    p = run_cli("train", "-c", cfg, "--output", tmp_path / "o")
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and message in lines[0] and "c.yaml" in lines[0], p.stderr
    with pytest.raises(UserError, match=re_escape(message)):
        compare.load_plan(cfg)


def test_yaml_floats_and_plain_configs_still_read(tmp_path):
    from mlx_dft.config import load_yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 1e-5\niters: 3\nlora_parameters: {rank: 4}\n")
    assert load_yaml(cfg) == {"learning_rate": 1e-5, "iters": 3, "lora_rank": 4}


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


@pytest.mark.parametrize(
    "option,value,message",
    [("adam_beta1", 1.0, "--adam-beta1 must be in [0, 1), not 1.0"),
     ("adam_beta2", -0.1, "--adam-beta2 must be in [0, 1), not -0.1"),
     ("seed", -1, "--seed must be >= 0"), ("seed", 2**64, "below 2^64")],
)  # fmt: skip
def test_training_options_outside_their_domain(tiny_model, arith_data, tmp_path, option, value, message):
    with pytest.raises(UserError, match=re_escape(message)):
        mlx_dft.train(model=str(tiny_model), data=str(arith_data), output=str(tmp_path / "o"), **{option: value})  # noqa: E501
    assert not (tmp_path / "o").exists()


def test_resuming_with_other_data_options_says_so(tiny_model, arith_data, tmp_path, capsys):
    out = tmp_path / "run"
    kw = dict(model=str(tiny_model), data=str(arith_data), batch_size=2, steps_per_report=1, progress=False)
    mlx_dft.train(output=str(out), iters=2, save_every=1, accuracy_problems=0, **kw)
    capsys.readouterr()
    mlx_dft.train(resume=str(out), iters=3, batch_size=4, progress=False)
    said = capsys.readouterr()
    assert "note: resuming with --batch-size 4 (the checkpoint: 2)" in said.out + said.err
    mlx_dft.train(resume=str(out), iters=4, progress=False)  # the same settings: no note
    said = capsys.readouterr()
    assert "note: resuming with" not in said.out + said.err


@pytest.mark.parametrize("how", ["shape", "missing", "extra"])
def test_optimizer_state_that_does_not_fit_the_model_is_refused(tiny_model, arith_data, tmp_path, how):
    import mlx.core as mx

    out = tmp_path / "run"
    kw = dict(model=str(tiny_model), data=str(arith_data), batch_size=2, steps_per_report=1, progress=False)
    mlx_dft.train(output=str(out), iters=2, save_every=1, accuracy_problems=0, **kw)
    opt = out / "checkpoints" / "step-0000002" / "optimizer.safetensors"
    state = dict(mx.load(str(opt)))
    key = next(k for k in state if k.endswith(".m"))
    if how == "shape":
        state[key] = mx.zeros((1,) + tuple(state[key].shape[1:]))
    elif how == "missing":
        del state[key]
    else:
        state["model.layers.0.extra.m"] = mx.zeros((2,))
    mx.save_safetensors(str(opt), state)
    expected = {"shape": "has shape", "missing": "lacks", "extra": "does not train"}[how]
    with pytest.raises(UserError, match=expected):
        mlx_dft.train(resume=str(out), iters=3, progress=False)


def test_non_utf8_standard_input_and_a_template_that_is_neither_are_one_line_errors(tmp_path):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    chat = ["chat", "--model", BUNDLED, "--chat-template", template]
    for args in (["generate", "--model", BUNDLED, "-p", "-"], chat):
        p = run_cli(*args, input_text=b"caf\xe9\n")
        err = p.stderr.strip()
        assert p.returncode == 1 and err == "mlx_dft: error: standard input is not UTF-8 text (byte 4)", err
    p = run_cli("generate", "--model", BUNDLED, "-p", "hi", "--chat-template", "chatml")
    assert p.returncode == 1 and "is neither a file nor a chat template" in p.stderr, p.stderr


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("num_hidden_layers", 10**8, "num_hidden_layers 100000000 must be an integer from 1 to 2,048"),
        ("hidden_size", 0, "hidden_size 0 must be an integer"),
        ("num_attention_heads", -4, "num_attention_heads -4 must be"),
        ("vocab_size", "512", "vocab_size '512' must be"),
        ("rms_norm_eps", float("nan"), "rms_norm_eps nan must be a finite positive number"),
        ("rope_theta", -1.0, "rope_theta -1.0 must be a finite positive number"),
    ],
)
def test_model_sizes_out_of_range_are_refused_before_allocating(tmp_path, tiny_model, key, value, message):
    """plan, generate and train read every config.json through one check (10^8 layers made plan
    abort in std::bad_alloc, 0 heads divided by zero)."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg[key] = value
    (model / "config.json").write_text(json.dumps(cfg))
    for args in (["plan", "--model", model], ["generate", "--model", model, "-p", "hi", "-m", "1"]):
        p = run_cli(*args)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1 and message in lines[0], (args[0], p.stderr)
        assert "config.json" in lines[0]


def test_a_nested_text_config_is_checked_too(tmp_path):
    from mlx_dft.architectures import check_sizes

    check_sizes({"model_type": "x", "text_config": {"num_hidden_layers": 24, "rms_norm_eps": 1e-6}}, "c")
    with pytest.raises(UserError, match="c: num_hidden_layers 1000000000 must be"):
        check_sizes({"model_type": "x", "text_config": {"num_hidden_layers": 10**9}}, "c")


def test_an_aligner_config_with_a_billion_layers_is_refused_at_once(tmp_path):
    from mlx_dft.adapters.aligner.hf import HF_CONFIG, import_hf

    (tmp_path / HF_CONFIG).write_text(json.dumps({
        "format": "mlx_dft.aligner", "format_version": 1, "num_tokens": 1, "start_layer": 0, "gate": "head",
        "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 10**9,
    }))  # fmt: skip
    with pytest.raises(UserError, match="num_hidden_layers 1000000000 must be an integer from 1 to 2,048"):
        import_hf(tmp_path)


def test_a_chat_template_that_raises_on_one_record_names_the_file_and_line(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    bad = {"messages": [{"role": "user", "content": "STOP"}, {"role": "assistant", "content": "yo"}]}
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (ok, ok, bad, ok)))
    template = (
        "{% for m in messages %}{% if m['content'] == 'STOP' %}{{ raise_exception('no STOP') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    p = run_cli("train", "--data", d, "--iters", 1, "--output", tmp_path / "o", "--chat-template", template)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and lines[-1] == (
        f"mlx_dft: error: {d / 'train.jsonl'} line 3: the chat template failed: TemplateError: no STOP"
    ), p.stderr
    assert not (tmp_path / "o").exists()


def test_a_chat_template_that_loops_is_stopped_by_a_time_limit(monkeypatch):
    from mlx_lm.utils import load_tokenizer

    from mlx_dft import data

    tok = load_tokenizer(BUNDLED)
    data.set_chat_template(
        tok, "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ x }}"
    )
    monkeypatch.setattr(data, "TEMPLATE_SECONDS", 0.5)
    import time

    t = time.monotonic()
    with pytest.raises(UserError, match="the chat template ran past 0.5 s on one conversation"):
        data.chat_prompt(tok, "hi", True)
    assert time.monotonic() - t < 10


def test_peft_patterns_from_a_stranger_are_bounded(monkeypatch):
    from mlx_dft.adapters.lora import peft

    module = "model.layers.0.self_attn." + "a" * 40 + "b"
    assert peft._pattern_value({"q_proj": 4}, "model.layers.0.self_attn.q_proj", 8) == 4
    monkeypatch.setattr(peft, "PATTERN_LIMITS", (1000, 1000, 0.5))
    with pytest.raises(UserError, match="ran past 0.5 s"):
        peft._pattern_value({"(a+)+": 4}, module, 8, "cfg.json")
    with pytest.raises(UserError, match="is not a regular expression"):
        peft._pattern_value({"(q_proj": 4}, module, 8, "cfg.json")
    with pytest.raises(UserError, match="at most 1000 patterns"):
        peft._pattern_value({f"p{i}": 1 for i in range(1001)}, module, 8, "cfg.json")
    with pytest.raises(UserError, match="longer than 1000 characters"):
        peft._pattern_value({"x" * 1001: 1}, module, 8, "cfg.json")


def test_a_gguf_with_a_billion_blocks_is_refused_before_any_tensor(tmp_path):
    import struct

    from mlx_dft.gguf.export import write_model_gguf

    path = write_model_gguf(BUNDLED, tmp_path / "m.gguf", "f32")
    raw = bytearray(path.read_bytes())
    at = raw.index(b"llama.block_count") + len(b"llama.block_count")
    assert struct.unpack("<I", raw[at : at + 4])[0] == 4  # GGUF_TYPE_UINT32
    raw[at + 4 : at + 8] = struct.pack("<I", 10**9)
    path.write_bytes(raw)
    p = run_cli("convert", path, "--out", tmp_path / "out")
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1, p.stderr
    assert "num_hidden_layers 1000000000 must be" in lines[0] and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("tokenizer.json", b"\xff\xfe{}", "tokenizer.json: not UTF-8 text (byte 1)"),
        ("tokenizer.json", b'{"a": ', "tokenizer.json: invalid JSON"),
        ("tokenizer_config.json", b"[1, 2]", "tokenizer_config.json: expected a JSON object, got list"),
        ("special_tokens_map.json", b"\xff", "special_tokens_map.json: not UTF-8"),
    ],
)
def test_malformed_tokenizer_files_are_one_line_errors(tmp_path, tiny_model, name, content, message):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / name).write_bytes(content)
    p = run_cli("generate", "--model", model, "-p", "hi", "-m", "1")
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and message in lines[0], p.stderr


@pytest.mark.parametrize("content", [b"\xff\xfe{}", b"[1]", b'{"a": '])
def test_a_malformed_adapter_config_is_a_one_line_error(tmp_path, tiny_model, adapter, content):
    import shutil

    evil = tmp_path / "adapter"
    shutil.copytree(adapter, evil)
    (evil / "adapter_config.json").write_bytes(content)
    p = run_cli("generate", "--model", tiny_model, "--adapter-path", evil, "-p", "hi", "-m", "1")
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and "adapter_config.json" in lines[0], p.stderr
    assert "MLX_DFT_DEBUG" not in lines[0]  # a named error, not the catch-all


@pytest.fixture
def small_disk(tmp_path):
    """A 24 KiB file system (tmpfs), where a run's files cannot fit; skips where mounting is
    not allowed (not root, or no tmpfs)."""
    import subprocess

    where = tmp_path / "small"
    where.mkdir()
    cmd = ["mount", "-t", "tmpfs", "-o", "size=24k", "tmpfs", str(where)]
    mounted = subprocess.run(cmd, capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_full_disk_is_one_line_and_leaves_no_half_written_checkpoint(small_disk, tiny_model, arith_data):
    out = small_disk / "run"
    p = run_cli("train", "--model", tiny_model, "--data", arith_data, "--iters", 2, "--output", out)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1, p.stderr
    assert lines[0].startswith("mlx_dft: error: ") and ("cannot write" in lines[0] or "No space" in lines[0])
    assert "MLX_DFT_DEBUG" not in lines[0]
    ckpts = out / "checkpoints"
    assert not ckpts.exists() or [p.name for p in ckpts.iterdir() if not p.name.startswith(".")] == []


@pytest.mark.parametrize("tokens,message", [
    (["<unk>", "a", "b", "a" * 1_000_000], r"tokens\[3\] is 1,000,000 characters long \(at most 4,096"),
    (["<unk>", *(f"{i:05d}" + "x" * 4000 for i in range(5100))], r"split 20,\d{3},\d{3} ways"),
])  # fmt: skip
def test_a_sentencepiece_vocabulary_that_asks_for_quadratic_work_is_refused(tokens, message):
    """Rebuilding SentencePiece merges tries every split of every piece: a million-character token
    (a 1 MB GGUF) used to take time quadratic in its length. Token lengths and the splits are
    bounded before any work, in one line."""
    import time

    from mlx_dft.gguf.tokenizer import build_tokenizer

    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * len(tokens),
        "tokenizer.ggml.token_type": [2] + [1] * (len(tokens) - 1),
    }
    start = time.perf_counter()
    with pytest.raises(UserError, match=message):
        build_tokenizer(meta)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("kind", ["file", "dangling link"])
@pytest.mark.parametrize("command", ["train", "fuse"])
def test_an_output_that_is_a_file_or_a_dangling_link_is_one_line(tmp_path, tiny_model, arith_data, adapter,
                                                                   command, kind):  # fmt: skip
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("mine")
    else:
        out.symlink_to(tmp_path / "missing" / "folder")
    if command == "train":
        args = ["train", "--model", tiny_model, "--data", arith_data, "--iters", 1, "--output", out]
    else:
        args = ["fuse", adapter, "--out", out]
    if command == "train":
        args += ["--accuracy-problems", 0]
    p = run_cli(*args)
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith(f"mlx_dft: error: --{'output' if command == 'train' else 'out'} "), p.stderr
    assert (out.read_text() == "mine") if kind == "file" else (out.is_symlink() and not out.exists())
