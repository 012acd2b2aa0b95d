"""The parts every training stage shares: run the stage, build its TRL config, load model + adapter,
train with resume, and collect metrics. A stage module keeps only what is particular to it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit import distributed
from alignkit.data import PreparedData, prepare, streaming
from alignkit.errors import DataError, RecipeError
from alignkit.models import adapters, modeling
from alignkit.recipe.loading import QUANTISED_FULL_FINE_TUNE, Recipe
from alignkit.recipe.settings import is_run_with_adapter
from alignkit.runs import reports
from alignkit.runs.rundir import RunDir, open_run_dir
from alignkit.stages import get_stage

logger = logging.getLogger(__name__)


def run_stage(recipe: Recipe, *, overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    """Claim the run dir (locked while the stage runs), run the recipe's stage, write ``metrics.json`` and mark
    the run complete; a run that fails or is interrupted is marked so (see
    :func:`alignkit.runs.rundir.open_run_dir`)."""
    stage = get_stage(recipe.stage)
    check_launch(recipe)
    with open_run_dir(recipe, overwrite=overwrite, resume=resume) as run:
        metrics = stage.run(recipe, run)
        metrics["run/world_size"] = distributed.world_size()
        # Before the run is marked complete, so that a complete run always has its report.
        reports.write_report(run.path, recipe.stage, recipe.to_dict(), metrics)
        run.finish(metrics)
    return metrics


def check_launch(recipe: Recipe) -> None:
    """What the launch (``accelerate launch --config_file ...``) asks for must work with this recipe on this
    machine; checked before any run dir, data or model is touched."""
    import torch

    sharding = "FSDP" if distributed.uses_fsdp() else "DeepSpeed" if distributed.uses_deepspeed() else None
    if sharding is None:
        return
    shards = get_stage(recipe.stage).sharded_launch
    if shards == "none":
        raise RecipeError(f"the accelerate config asks for {sharding}, but alignkit's {recipe.stage.upper()} keeps a "
                          "whole copy of its models on every process and averages gradients itself (DDP); launch "
                          "it with accelerate_configs/ddp.yaml, with QLoRA for large models")
    if shards == "fsdp":
        _check_own_fsdp(recipe, sharding)
        return
    if not torch.cuda.is_available():
        # accelerate picks FSDP / ZeRO only for GPU-class devices; on CPUs it would quietly run plain DDP.
        raise RecipeError(f"the accelerate config asks for {sharding}, which accelerate runs on GPUs only and this "
                          "machine has none; launch with accelerate_configs/cpu_2proc.yaml (DDP over CPU "
                          "processes) instead")
    quantization = recipe.model.quantization
    if sharding == "FSDP" and quantization is not None:
        if quantization.bits != 4:
            raise RecipeError("model.quantization: FSDP shards 4-bit (QLoRA) bases, not 8-bit ones; set bits: 4, or "
                              "launch with DDP (accelerate_configs/ddp.yaml)")
        storage, dtype = quantization.quant_storage, recipe.model.dtype
        if dtype == "auto" or storage != dtype:
            raise RecipeError(f"FSDP shards 4-bit weights only when they are stored in the model's dtype: set "
                              f"model.dtype and model.quantization.quant_storage to the same dtype, e.g. bfloat16 "
                              f"(they are {dtype} and {storage})")


def _check_own_fsdp(recipe: Recipe, sharding: str) -> None:
    """A stage that shards its own models with torch's ``fully_shard`` (PPO): FSDP launches only, on GPUs or CPU
    processes (fully_shard runs on both, unlike accelerate's plugin), over weights that are not quantised."""
    name = recipe.stage.upper()
    if sharding == "DeepSpeed":
        raise RecipeError(f"the accelerate config asks for DeepSpeed, but alignkit's {name} shards its models with "
                          "torch's FSDP2 itself (its own loop holds policy, critic, reference and reward model, which "
                          "DeepSpeed would need one engine each for): launch it with accelerate_configs/fsdp.yaml "
                          "(docs/multi-gpu.md)")
    if recipe.model.quantization is not None:
        raise RecipeError(f"the accelerate config asks for FSDP, but alignkit's {name} shards full-precision weights "
                          "only, not a 4/8-bit base: drop model.quantization (LoRA on a bf16 base shards), or "
                          "launch the QLoRA recipe with accelerate_configs/ddp.yaml")


def training_args(recipe: Recipe, config_class: type, output_dir: Path):
    """The stage's TRL config from ``recipe.train``, writing into ``output_dir`` (the run dir)."""
    values = dict(recipe.train, output_dir=str(output_dir))
    try:
        return config_class(**values)
    except (ValueError, TypeError) as err:  # TRL / transformers cross-field checks in __post_init__
        raise RecipeError(f"train: {err}") from None


def build_trainer(trainer_class: type, **kwargs):
    """Construct a TRL trainer. TRL checks combinations of options (packing, padding-free, max_length...)
    when the trainer is built and raises ValueError: those are recipe errors, reported as such."""
    try:
        return trainer_class(**kwargs)
    except ValueError as err:
        raise RecipeError(f"train: {err}") from None


def load_model_and_tokenizer(recipe: Recipe, args, head: modeling.Head = "causal_lm") -> tuple[Any, Any, Any]:
    """(model, tokenizer, peft_config) for a training stage; the trainer applies the peft config.

    A run dir as ``model.name_or_path`` starts from that run: its adapter is trained further (peft_config
    None; the model is already a PeftModel) or merged into the base under the recipe's new adapter.
    """
    task_type = "SEQ_CLS" if head == "reward" else "CAUSAL_LM"
    if is_run_with_adapter(recipe.model.name_or_path):
        model, tokenizer, keeps_adapter = modeling.load_run_for_training(recipe.model, head,
                                                                         args.gradient_checkpointing)
        if keeps_adapter:
            return model, tokenizer, None
        tokenizer_path = recipe.model.name_or_path
    else:
        if recipe.model.quantization is not None and recipe.adapter["method"] == "none":
            raise RecipeError(f"{recipe.model.name_or_path} holds no adapter to continue: {QUANTISED_FULL_FINE_TUNE}")
        tokenizer = modeling.load_tokenizer(recipe.model)
        model = modeling.load_model(recipe.model, head=head)
        model = modeling.prepare_for_kbit_training(model, args.gradient_checkpointing)
        tokenizer_path = modeling.resolve_path(recipe.model.name_or_path)
    if head == "reward":
        # A sequence classifier scores the last non-pad token, so it has to know which id pads.
        model.config.pad_token_id = tokenizer.pad_token_id
    peft_config = adapters.build_peft_config(recipe.adapter, task_type=task_type, tokenizer_path=tokenizer_path)
    return model, tokenizer, peft_config


def parameter_metrics(model) -> dict[str, int]:
    """Trainable and total parameter counts, logged and recorded in metrics.json."""
    trainable, total = adapters.trainable_parameters(model)
    logger.info("trainable parameters: %s of %s (%.4f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return {"model/trainable_params": trainable, "model/total_params": total}


@dataclass
class Fitted:
    """What a training stage has after ``fit``: the trainer (and its model), tokenizer, data and metrics."""

    trainer: Any
    tokenizer: Any
    data: PreparedData
    metrics: dict[str, Any]


def fit(recipe: Recipe, run: RunDir, *, config_class: type, trainer_class: type,
        load_data: Callable[[Any], PreparedData], head: modeling.Head = "causal_lm",
        eval_names: Mapping[str, str] | None = None, trainer_eval: bool = True,
        before_train: Callable[[Any, Any, PreparedData], dict[str, Any]] | None = None, **trainer_kwargs) -> Fitted:
    """The path every training stage takes: TRL config -> data -> model + adapter -> trainer -> train, save.

    Data is loaded before the model so that bad data fails in seconds, not after a model download.
    ``eval_names`` maps the trainer's held-out metrics (``eval_rewards/accuracies``) to alignkit's
    (``dpo/reward_accuracy``). ``trainer_eval=False`` keeps the held-out data from the trainer, for stages
    that evaluate it themselves (the RL stages: TRL's evaluation would sample every prompt many times).
    ``before_train(trainer, tokenizer, data)`` measures the starting model once the trainer is built and
    before its first step; its metrics join the others.
    """
    from transformers import set_seed

    args = training_args(recipe, config_class, run.path)
    data = prepare(recipe.data, load_data)
    record_data(run, data)
    # The trainer seeds only once it is built, after the model: without this, what the model creates at random
    # when it loads (a reward model's new head) would depend on whatever drew random numbers before.
    set_seed(args.seed)
    model, tokenizer, peft_config = load_model_and_tokenizer(recipe, args, head)
    warn_unrendered_tools(tokenizer, data)
    trainer = build_trainer(trainer_class, model=model, args=args, train_dataset=data.train,
                            eval_dataset=data.eval if trainer_eval else None, processing_class=tokenizer,
                            peft_config=peft_config, **trainer_kwargs)
    check_rows_kept(trainer, data, trainer_eval)
    if head == "reward" and modeling.is_quantized(model):
        match_new_head_to_hidden_states(trainer.model)
    metrics = parameter_metrics(trainer.model)
    if before_train is not None:
        metrics |= before_train(trainer, tokenizer, data)
    metrics |= train(trainer, run, eval_names or {})
    if recipe.data.streaming:  # the sources' reports now count the rows the run read
        streaming.log_final_reports(data)
        record_data(run, data)
    return Fitted(trainer=trainer, tokenizer=tokenizer, data=data, metrics=metrics)


# Which rows each TRL trainer drops when it prepares its dataset, by trainer class.
DROPPED_FOR_LENGTH = {
    "SFTTrainer": "a conversation with no answer token within its first max_length tokens, as the loss is on "
                  "answers only",
    "RewardTrainer": "a pair whose chosen or rejected conversation is longer than max_length tokens",
    "DPOTrainer": "a row whose prompt alone is max_length tokens or more",
    "KTOTrainer": "a row whose prompt alone is max_length tokens or more",
}


def check_rows_kept(trainer, data: PreparedData, trainer_eval: bool = True) -> None:
    """TRL's trainers drop the rows that ``max_length`` leaves nothing to learn from (:data:`DROPPED_FOR_LENGTH`).
    Say how many; with none left, stop with a DataError rather than the sampler's ``num_samples=0``."""
    max_length = getattr(trainer.args, "max_length", None)
    if max_length is None or getattr(trainer.args, "packing", False):  # packing changes the row count itself
        return
    for name, before, after in (("training", data.train, trainer.train_dataset),
                                ("held-out", data.eval if trainer_eval else None, trainer.eval_dataset)):
        if before is None or after is None or not hasattr(after, "__len__"):
            continue
        dropped = len(before) - len(after)
        if dropped <= 0:
            continue
        reason = next((text for cls in type(trainer).__mro__ if (text := DROPPED_FOR_LENGTH.get(cls.__name__))),
                      "a row longer than max_length tokens")
        what = (f"{dropped} of the {len(before)} {name} rows are too long for train.max_length={max_length} "
                f"(the trainer drops {reason})")
        if len(after) == 0:
            raise DataError(f"{what}, so none is left; raise train.max_length or shorten the prompts")
        logger.warning("%s; using the other %d", what, len(after))


def warn_unrendered_tools(tokenizer, data: PreparedData) -> None:
    """Tool calls, tool turns and tool lists reach the chat template through TRL; a template that does not
    read them drops them silently, so say so."""
    features = getattr(data.train, "features", None)
    if features is None or "tool_calls" not in str(features):
        return
    template = getattr(tokenizer, "chat_template", None) or ""
    if "tool_calls" not in template:
        logger.warning("the data has tool calls or tool turns, but the chat template does not render tool_calls: "
                       "the model will not see them; use a model (or train.chat_template_path) whose template "
                       "supports tools")


def record_data(run: RunDir, data: PreparedData) -> None:
    """Write ``data.json``: rows used for training and evaluation, the prepared-data cache key, and each source's
    report (skipped rows)."""
    streamed = not hasattr(data.train, "__len__")  # counted as read: see the sources' reports
    run.write_json("data.json", {"train_rows": None if streamed else len(data.train),
                                 "eval_rows": len(data.eval or []), "streaming": streamed,
                                 "cache_key": data.cache_key, "sources": [r.to_dict() for r in data.reports]})


def match_new_head_to_hidden_states(model) -> None:
    """TRL casts every trainable parameter of a quantised model to bf16 (QLoRA's advice for LoRA weights,
    whose layers cast their input). A new reward head is a plain Linear that peft trains as a module to save:
    in bf16 it cannot take float32 hidden states (a CPU run, or compute_dtype float32). Give it the dtype
    of the model's unquantised weights, which is the dtype of its hidden states."""
    dtype = model.get_input_embeddings().weight.dtype
    for name, param in model.named_parameters():
        if "modules_to_save" in name and param.requires_grad:
            param.data = param.data.to(dtype)


def train(trainer, run: RunDir, eval_names: Mapping[str, str]) -> dict[str, float]:
    """Train (resuming from the run dir's last checkpoint, if any), save the final model, return metrics."""
    resume = trainer.args.resume_from_checkpoint or (str(run.resume_from) if run.resume_from else None)
    result = trainer.train(resume_from_checkpoint=resume)
    save_final_model(trainer, run.path)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    args = trainer.args
    metrics = {
        # Each process averages the loss of its own batches; the run's loss is the mean over processes.
        "train/loss": distributed.mean_across_processes(result.training_loss),
        "train/global_step": result.global_step,
        "train/global_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps
        * distributed.world_size(),
        "train/runtime": result.metrics.get("train_runtime"),
    }
    if losses:
        metrics.update({"train/loss_start": losses[0], "train/loss_end": losses[-1]})
    if trainer.eval_dataset is not None:
        held_out = trainer.evaluate()
        # With train.eval_on_start the trainer evaluated before its first step too: the "before" of report.md.
        before = next((entry for entry in trainer.state.log_history if entry.get("step") == 0
                       and "eval_loss" in entry), {})
        for name, value in {"eval_loss": "eval/loss", **eval_names}.items():
            if name in held_out and math.isfinite(held_out[name]):
                metrics[value] = held_out[name]
            if name in before and math.isfinite(before[name]):
                metrics[f"{value}_start"] = before[name]
        missing = set(eval_names) - set(held_out)
        if missing:  # a TRL upgrade renamed a metric: say so rather than silently dropping it
            logger.warning("the trainer reported no %s (it reported: %s)", ", ".join(sorted(missing)),
                           ", ".join(sorted(held_out)))
    # The curves of report.md: every logged entry, the final evaluation included.
    reports.write_history(run.path, trainer.state.log_history)
    return metrics


def save_final_model(trainer, path: Path) -> None:
    """Save the trained adapter (or full model) and tokenizer in the run dir, loadable with from_pretrained.

    Under FSDP the checkpoints stay sharded (fast, no gather), but the trainer saves nothing at all for a
    sharded state dict at the end: the final model is gathered into one full state dict first.
    """
    if getattr(trainer, "is_fsdp_enabled", False):
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(path))
    distributed.wait_for_everyone()  # the main process writes; the others may read the run dir next
