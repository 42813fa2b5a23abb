"""`mlx_dft push`: upload an exported folder to the Hugging Face Hub with a generated model card.

The token comes from ``HF_TOKEN`` or the huggingface_hub login, and is never printed or logged.
``plan_push`` builds everything (files, card, commit message) without touching the network;
``push`` hands it to ``huggingface_hub.HfApi``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mlx_dft import adapters
from mlx_dft._version import __version__
from mlx_dft.adapters import Card
from mlx_dft.errors import UserError
from mlx_dft.files import atomic_write_text, read_json
from mlx_dft.interop.convert import RUN_FILE

MODEL_CARD = "README.md"


@dataclass
class PushPlan:
    repo_id: str
    private: bool
    files: dict[str, bytes]  # path in the repo -> content
    commit_message: str
    card: str


def describe_folder(folder: Path, repo_id: str) -> Card:
    """What is in an exported folder (asked of every adapter method), or a fused model."""
    for m in dict.fromkeys(adapters.METHODS.values()):
        card = m.card(folder, repo_id)
        if card is not None:
            return card
    if (folder / adapters.CONFIG_FILE).is_file():
        cfg = read_json(folder / adapters.CONFIG_FILE)
        if "fine_tune_type" in cfg or "adapter" in cfg:
            raise UserError(
                f"{folder} is an mlx_dft training folder: run `mlx_dft export {folder} --out DIR` first"
            )
    if (folder / "config.json").is_file() and list(folder.glob("model*.safetensors")):
        run = read_json(folder / RUN_FILE) if (folder / RUN_FILE).is_file() else {}
        base = run.get("base_model") or read_json(folder / "config.json").get("_name_or_path")
        return Card("model", "A fine-tuned model", "transformers", [], base)
    raise UserError(
        f"{folder}: nothing to push (expected a folder written by `mlx_dft export` or `mlx_dft fuse`)"
    )


def model_card(folder: Path, repo_id: str) -> str:
    card = describe_folder(folder, repo_id)
    run = json.loads((folder / RUN_FILE).read_text()) if (folder / RUN_FILE).is_file() else {}
    training = run.get("training", {})
    base = card.base_model or run.get("base_model")
    loss = training.get("loss")
    tags = ["mlx", "mlx_dft", *card.tags]
    if loss:
        tags.append(loss)
    front = ["---"]
    if base and not Path(str(base)).exists():
        front.append(f"base_model: {base}")
    front.append(f"library_name: {card.library}")
    front.append("tags:")
    front += [f"- {t}" for t in tags]
    front.append("---")
    title = repo_id.split("/")[-1]
    lines = [
        *front,
        "",
        f"# {title}",
        "",
        f"{card.what}{f' for `{base}`' if base else ''}, trained with "
        f"mlx_dft {__version__}{f' ({loss.upper()} loss)' if loss else ''}.",
        "",
    ]
    if card.usage:
        lines += ["## Use", "", *card.usage, ""]
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


def write_card(folder: str | Path) -> Path:
    """Write ``folder``'s model card (README.md, titled by the folder's name; ``push`` writes it
    again with the repo's name) and return its path."""
    folder = Path(folder)
    path = folder / MODEL_CARD
    atomic_write_text(path, model_card(folder, folder.name))
    return path


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
    kind = describe_folder(folder, repo_id).kind
    return PushPlan(repo_id, private, files, f"Upload {kind} trained with mlx_dft {__version__}", card)


def push(folder: str | Path, repo_id: str, private: bool = False, api=None) -> str:
    """Create the repo if needed and upload the folder in one commit; returns the commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    plan = plan_push(folder, repo_id, private)
    if api is None:
        from huggingface_hub import get_token

        if not get_token():  # say so before any network traffic
            raise UserError("no Hugging Face token: set HF_TOKEN or run `hf auth login`, then push again")
        api = HfApi()
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
