"""`mlx_dft push`: upload an exported folder to the Hugging Face Hub with a generated model card.

The token comes from ``HF_TOKEN`` or the huggingface_hub login, and is never printed or logged.
``plan_push`` builds everything (files, card, commit message) without touching the network;
``push`` hands it to ``huggingface_hub.HfApi``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mlx_dft import __version__
from mlx_dft.errors import UserError
from mlx_dft.interop import aligner_hf, peft
from mlx_dft.interop.convert import RUN_FILE

MODEL_CARD = "README.md"


@dataclass
class PushPlan:
    repo_id: str
    private: bool
    files: dict[str, bytes]  # path in the repo -> content
    commit_message: str
    card: str


def _kind(folder: Path) -> tuple[str, dict]:
    if aligner_hf.is_hf_aligner(folder):
        return "aligner", json.loads((folder / aligner_hf.HF_CONFIG).read_text())
    cfg_path = folder / peft.PEFT_CONFIG
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("peft_type") == "LORA":
            return ("dora" if cfg.get("use_dora") else "lora"), cfg
        if cfg.get("peft_type") == "ADAPTION_PROMPT":
            return "aligner-adaption-prompt", cfg
        if "fine_tune_type" in cfg:
            raise UserError(
                f"{folder} is an mlx_dft training folder: run `mlx_dft export {folder} --out DIR` first"
            )
    if (folder / "config.json").is_file() and list(folder.glob("model*.safetensors")):
        return "model", json.loads((folder / "config.json").read_text())
    raise UserError(
        f"{folder}: nothing to push (expected a folder written by `mlx_dft export` or `mlx_dft fuse`)"
    )


def model_card(folder: Path, repo_id: str) -> str:
    kind, cfg = _kind(folder)
    run = json.loads((folder / RUN_FILE).read_text()) if (folder / RUN_FILE).is_file() else {}
    training = run.get("training", {})
    base = cfg.get("base_model_name_or_path") or run.get("base_model") or cfg.get("_name_or_path")
    loss = training.get("loss")
    tags = ["mlx", "mlx_dft"]
    tags += {
        "lora": ["lora"],
        "dora": ["lora", "dora"],
        "aligner": ["aligner"],
        "aligner-adaption-prompt": ["aligner", "adaption-prompt"],
        "model": [],
    }[kind]
    if loss:
        tags.append(loss)
    library = (
        "peft"
        if kind in ("lora", "dora", "aligner-adaption-prompt")
        else ("mlx_dft" if kind == "aligner" else "transformers")
    )
    front = ["---"]
    if base and not Path(str(base)).exists():
        front.append(f"base_model: {base}")
    front.append(f"library_name: {library}")
    front.append("tags:")
    front += [f"- {t}" for t in tags]
    front.append("---")
    title = repo_id.split("/")[-1]
    what = {
        "lora": "A LoRA adapter",
        "dora": "A DoRA adapter",
        "aligner": "An Aligner adapter",
        "aligner-adaption-prompt": "An Aligner (as a PEFT adaption prompt)",
        "model": "A fine-tuned model",
    }[kind]
    lines = [
        *front,
        "",
        f"# {title}",
        "",
        f"{what}{f' for `{base}`' if base else ''}, trained with "
        f"mlx_dft {__version__}{f' ({loss.upper()} loss)' if loss else ''}.",
        "",
    ]
    if kind in ("lora", "dora", "aligner-adaption-prompt"):
        lines += [
            "## Use",
            "",
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{base}")',
            f'model = PeftModel.from_pretrained(model, "{repo_id}")',
            "```",
            "",
        ]
    elif kind == "aligner":
        lines += [
            "## Use",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM",
            "from mlx_dft.torch_aligner import attach_aligner",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{base}")',
            f'attach_aligner(model, "{repo_id}")',
            "```",
            "",
            "With MLX: `mlx_dft generate --adapter " + repo_id + " --prompt ...`.",
            "",
        ]
    if training:
        lines += ["## Training", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in training.items() if v is not None]
        lines.append("")
    if run.get("trainable_parameters"):
        lines += [f"Trainable parameters: {run['trainable_parameters']:,}.", ""]
    metrics = run.get("final_metrics") or {}
    if metrics:
        lines += ["## Final metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" for k, v in metrics.items()]
        lines.append("")
    return "\n".join(lines)


def plan_push(folder: str | Path, repo_id: str, private: bool = False) -> PushPlan:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"folder not found: {folder}")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UserError(f"--repo {repo_id!r}: expected USER/NAME")
    card = model_card(folder, repo_id)
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            files[str(p.relative_to(folder))] = p.read_bytes()
    files[MODEL_CARD] = card.encode()
    kind, _ = _kind(folder)
    return PushPlan(repo_id, private, files, f"Upload {kind} trained with mlx_dft {__version__}", card)


def push(folder: str | Path, repo_id: str, private: bool = False, api=None) -> str:
    """Create the repo if needed and upload the folder in one commit; returns the commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    plan = plan_push(folder, repo_id, private)
    api = api or HfApi()
    ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in plan.files.items()]
    try:
        api.create_repo(repo_id=plan.repo_id, private=plan.private, repo_type="model", exist_ok=True)
        info = api.create_commit(
            repo_id=plan.repo_id, operations=ops, commit_message=plan.commit_message, repo_type="model"
        )
    except Exception as e:  # network, auth, permissions: one line, and never the token
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"push to {repo_id} failed: {type(e).__name__}: {msg}") from None
    return getattr(info, "commit_url", str(info))
