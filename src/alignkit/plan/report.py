"""``alignkit plan RECIPE``: the planner's findings as the user reads them (or as JSON)."""

from __future__ import annotations

import json
import warnings

from alignkit.errors import AlignkitError
from alignkit.plan import memory, planner
from alignkit.plan.memory import format_size
from alignkit.recipe.loading import Recipe
from alignkit.stages import get_stage


def run_plan(args, recipe: Recipe) -> int:
    """Plan the recipe for the launch the arguments describe and print the report; exit code 0."""
    # peft and transformers warn about deprecated names when the meta model is built: not the user's concern
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.gpus < 1:
        raise AlignkitError(f"--gpus must be at least 1, got {args.gpus}")
    budget = _budget(args.gpu_memory, args.device)
    launch = memory.Launch(devices=args.gpus, strategy=args.strategy, device_type=args.device)
    _check_strategy(recipe, launch)
    result = planner.plan(recipe, launch)
    fix = None
    if budget is not None and result.memory.peak > budget:
        fix = planner.cheapest_fix(recipe, launch, result.shape, budget)
    if args.json:
        out = result.to_dict() | {"budget": budget, "fits": None if budget is None else result.memory.peak <= budget}
        if fix is not None:
            out["fix"] = {"changes": fix[0], "memory": fix[1].to_dict()}
        print(json.dumps(out, indent=2, default=str))
        return 0
    print(report(result, budget, fix))
    return 0


def _check_strategy(recipe: Recipe, launch: memory.Launch) -> None:
    """The strategies a stage runs under, as ``alignkit <stage>`` checks its launch (training.check_launch)."""
    shards = get_stage(recipe.stage).sharded_launch
    if launch.strategy == "ddp" or shards == "accelerate" or (shards == "fsdp" and launch.strategy == "fsdp"):
        return
    runs_under = "DDP only" if shards == "none" else "DDP or FSDP (it shards its own models), not ZeRO-3"
    raise AlignkitError(f"--strategy {launch.strategy}: alignkit's {recipe.stage} runs under {runs_under}")


def report(result: planner.Plan, budget: int | None, fix) -> str:
    """The plan as text: what runs, on what, and the memory per device part by part."""
    counts, shape, launch, estimate = result.parameters, result.shape, result.launch, result.memory
    lines = [f"stage        {result.stage}",
             f"model        {result.model}",
             f"adapter      {result.adapter}",
             f"parameters   {counts.total:,} (trainable {counts.trainable:,}, "
             f"{100 * counts.trainable / max(counts.total, 1):.3f}%)",
             f"batch        {shape.batch} per device x {shape.gradient_accumulation} accumulation x "
             f"{launch.devices} device(s), {shape.length} tokens"
             + (f", {shape.sequences_per_row} sequences per row" if shape.sequences_per_row > 1 else ""),
             f"training     optimizer {shape.optimizer}, activation checkpointing "
             f"{'on' if shape.checkpointing else 'off'}, mixed precision {shape.mixed_precision or 'off'}"]
    if result.data is not None:
        data = result.data
        lines.append(f"data         {data['train_rows']:,} training rows, {data['eval_rows']:,} held out; "
                     f"{data['steps']:,} optimizer steps of {data['global_batch']} rows"
                     + (f" (prepared data {data['cache_key']})" if data.get("cache_key") else ""))
    else:
        lines.append("data         not counted (not local)")
    lines += ["", f"memory per device ({launch.device_type}, {launch.devices} x {launch.strategy.upper()})"]
    parts = [("weights", estimate.weights), ("gradients", estimate.gradients), ("optimizer", estimate.optimizer),
             ("activations", estimate.activations), ("workspace", estimate.workspace)]
    if estimate.extra_models:
        parts.append(("other models", estimate.extra_models))
    if estimate.sharding_buffers:
        parts.append(("sharding/DDP buffers", estimate.sharding_buffers))
    lines += [f"  {name:22s} {format_size(size):>12s}" for name, size in parts]
    lines.append(f"  {'predicted peak':22s} {format_size(estimate.peak):>12s}")
    lines += [f"  note: {note}" for note in estimate.notes]
    if budget is not None:
        lines.append("")
        if estimate.peak <= budget:
            lines.append(f"fits: yes ({format_size(estimate.peak)} of {format_size(budget)})")
        else:
            lines.append(f"fits: no ({format_size(estimate.peak)} needed, {format_size(budget)} available)")
            if fix is None:
                lines.append("no change on the planner's list makes it fit: a smaller model, or more devices")
            else:
                changes, fixed = fix
                lines.append(f"cheapest change that fits ({format_size(fixed.peak)}):")
                lines += [f"  {change}" for change in changes]
    return "\n".join(lines)


def _budget(text: str | None, device: str) -> int | None:
    if text is not None:
        try:
            return memory.parse_size(text)
        except ValueError as err:
            raise AlignkitError(f"--gpu-memory: {err}") from None
    if device == "cuda":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory
    return None
