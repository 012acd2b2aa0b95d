"""``alignkit merge RUN_DIR``: an adapter run folded into its base, as a standalone model directory.

The result loads with plain transformers (``AutoModelForCausalLM.from_pretrained``; a reward model with
``AutoModelForSequenceClassification``), without peft, bitsandbytes or alignkit, and holds the run's
tokenizer (chat template included) and a model card: base model, adapter, data, recipe and metrics.

A 4-bit or 8-bit base is dequantised before the adapter is merged. The adapter was trained on the
*quantised* weights, so it is merged into exactly those, dequantised, and the merged model computes what
base + adapter computed in training; merging into the original full-precision weights instead would add
the adapter to weights it never saw, and merging into the 4-bit weights would round the sum back to 4 bits.

Nothing is pushed to the Hub unless ``--push REPO_ID`` is given.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from alignkit import __version__
from alignkit.errors import AlignkitError
from alignkit.models import modeling
from alignkit.recipe.settings import ModelSettings, is_run_with_adapter
from alignkit.runs.rundir import METRICS_FILE, RECIPE_FILE, refuse_precious_dir
from alignkit.stages import get_stage

logger = logging.getLogger(__name__)

# Marks a directory as alignkit merge's output: the only kind of existing directory --overwrite replaces.
MARKER_FILE = "alignkit_merge.json"


@dataclass
class Merged:
    """What ``merge_run`` wrote."""

    path: Path
    base: str
    dequantized: bool
    dtype: str


def merge_run(run_dir: Path, output: Path | None = None, *, dtype: str = "auto", overwrite: bool = False) -> Merged:
    """Merge the adapter in ``run_dir`` into its base and save the standalone model to ``output``
    (default: ``<run_dir>-merged``). ``dtype`` is the saved weights' dtype (``auto``: the base's)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AlignkitError(f"run dir not found: {run_dir.absolute()}")
    if not is_run_with_adapter(str(run_dir)):
        raise AlignkitError(f"{run_dir} holds no adapter (adapter_config.json): a full fine-tune is already a "
                            "standalone model; load it directly")
    output = Path(output) if output is not None else run_dir.with_name(run_dir.name + "-merged")
    _claim(output, overwrite)
    recipe = _run_recipe(run_dir)
    # An adapter dir without alignkit's recipe (peft's own output) holds a language-model adapter.
    head: modeling.Head = get_stage(recipe["stage"]).head if "stage" in recipe else "causal_lm"
    base_settings = modeling.base_settings_of_adapter(run_dir, ModelSettings(name_or_path=str(run_dir)))
    logger.info("loading the base %s%s", base_settings.name_or_path,
                " (quantised, as in training)" if base_settings.quantization else "")
    base = modeling.load_model(base_settings, for_training=False, head=head)
    dequantized = modeling.is_quantized(base)
    target = _target_dtype(dtype, base_settings, base)
    if dequantized:
        base = base.dequantize(dtype=target)
    tokenizer = _tokenizer(run_dir)
    if head == "reward":
        base.config.pad_token_id = tokenizer.pad_token_id
    merged = modeling.merge_adapter(base, run_dir).to(target)
    merged.config.dtype = target
    if hasattr(merged.config, "quantization_config"):
        del merged.config.quantization_config  # the saved weights are plain tensors
    output.mkdir(parents=True, exist_ok=True)
    # First, before any weight: a merge cut off half-way leaves a dir that the next --overwrite may replace.
    (output / MARKER_FILE).write_text(json.dumps({"merged_from": str(run_dir), "base": base_settings.name_or_path,
                                                  "alignkit": __version__}, indent=2) + "\n")
    merged.save_pretrained(output)
    tokenizer.save_pretrained(output)
    (output / "README.md").write_text(model_card(run_dir, base_settings.name_or_path, recipe, dequantized,
                                                 str(target).removeprefix("torch.")))
    logger.info("merged model written to %s", output)
    return Merged(path=output, base=base_settings.name_or_path, dequantized=dequantized,
                  dtype=str(target).removeprefix("torch."))


def push(path: Path, repo_id: str, *, private: bool = True) -> str:
    """Upload the merged model directory to the Hub repository ``repo_id`` (created if missing)."""
    from huggingface_hub import create_repo, upload_folder

    create_repo(repo_id, private=private, exist_ok=True)
    upload_folder(repo_id=repo_id, folder_path=str(path), commit_message="alignkit merge")
    return f"https://huggingface.co/{repo_id}"


def model_card(run_dir: Path, base: str, recipe: dict[str, Any], dequantized: bool, dtype: str) -> str:
    """A model card (README.md with Hub metadata) from what the run dir recorded."""
    metrics = _read_json(run_dir / METRICS_FILE)
    data = _read_json(run_dir / "data.json")
    adapter = recipe.get("adapter", {})
    stage = recipe.get("stage", "unknown")
    sources = [source.get("path") for source in recipe.get("data", {}).get("train", []) or []]
    header = {"base_model": base, "library_name": "transformers", "tags": ["alignkit", stage]}
    if sources and not any(str(s).startswith(("demo:", "/", ".")) for s in sources):
        header["datasets"] = sources
    lines = ["---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "",
             f"# {run_dir.name} (merged)", "",
             f"Trained with alignkit's `{stage}` stage and merged into its base: a standalone model that loads "
             "with plain transformers.", "",
             f"- base model: `{base}`" + (" (quantised in training; dequantised before merging)" if dequantized
                                         else ""),
             f"- adapter: {adapter.get('method', 'unknown')}"
             + "".join(f", {key} {adapter[key]}" for key in ("r", "lora_alpha", "target_modules") if key in adapter),
             f"- weights: {dtype}",
             f"- training data: {', '.join(map(str, sources)) or 'not recorded'}"
             + (f" ({data['train_rows']:,} rows)" if data.get("train_rows") is not None else "")]
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
                  for key, value in sorted(metrics.items())]
    lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


def _claim(output: Path, overwrite: bool) -> None:
    """Nothing the user made is lost: an existing non-empty output is replaced only with ``overwrite``, and only
    if an earlier ``alignkit merge`` wrote it (its marker file); never the current directory or one above it,
    the home directory or ``/``."""
    refuse_precious_dir(output, "--output")
    if output.exists() and not output.is_dir():
        raise AlignkitError(f"{output} is a file; choose another --output")
    if not (output.exists() and any(output.iterdir())):
        return
    if not (output / MARKER_FILE).is_file():
        raise AlignkitError(f"{output} already exists, is not empty and was not written by alignkit merge (no "
                            f"{MARKER_FILE}); alignkit never deletes what it did not write: choose another --output")
    if not overwrite:
        raise AlignkitError(f"{output} already exists and holds a merged model; pass --overwrite to replace it, or "
                            "--output to write elsewhere")
    shutil.rmtree(output)


def _run_recipe(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RECIPE_FILE
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _tokenizer(run_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(run_dir))


def _target_dtype(dtype: str, base_settings: ModelSettings, base):
    """The dtype to save: asked for, else the recipe's model dtype, else that of the base's embeddings
    (for a quantised base: its unquantised weights, i.e. what it computed in)."""
    if dtype != "auto":
        return modeling.torch_dtype(dtype)
    if base_settings.dtype != "auto":
        return modeling.torch_dtype(base_settings.dtype)
    return base.get_input_embeddings().weight.dtype
