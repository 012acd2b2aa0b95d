"""What a recipe's model holds, counted without its weights: the first part of ``alignkit plan``.

The model is built from its ``config.json`` on the meta device (shapes, no memory, no download of weights),
the recipe's adapter is attached with peft exactly as training attaches it, and the parameters are counted:
all of them, the trainable ones, and the weights bitsandbytes would quantise (the linear layers of the body;
the output layer and embeddings stay in the model's dtype). The memory estimate builds on these counts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.data import countable, prepare
from alignkit.errors import AlignkitError
from alignkit.models import adapters, modeling
from alignkit.plan import activations, memory
from alignkit.recipe.loading import Recipe, load_raw, load_recipe
from alignkit.recipe.settings import ModelSettings, QuantizationSettings, is_future_run, is_run_with_adapter
from alignkit.stages import get_stage, training

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts of a model with its adapter (tied weights counted once)."""

    total: int            # every parameter, adapter included
    trainable: int        # what the optimizer updates: the adapter, or everything for a full fine-tune
    quantizable: int      # weights of the body's linear layers: 4 / 8 bits when the recipe quantises
    largest_layer: int    # parameters of the biggest decoder layer: what FSDP gathers at once


def model_config(settings: ModelSettings):
    """The transformers config of the recipe's model (a run dir's base for a run dir), from config.json only."""
    from transformers import AutoConfig

    path = modeling.resolve_path(settings.name_or_path)
    if is_run_with_adapter(path):
        path = modeling.resolve_path(modeling.base_settings_of_adapter(Path(path), settings).name_or_path)
    try:
        return AutoConfig.from_pretrained(path, revision=settings.revision,
                                          trust_remote_code=settings.trust_remote_code)
    except (OSError, ValueError) as err:
        raise AlignkitError(f"could not read the config of '{settings.name_or_path}': {err}") from None


def meta_model(config, head: modeling.Head = "causal_lm"):
    """The model ``config`` describes, on the meta device: every parameter's shape, no memory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with torch.device("meta"):
        if head == "reward":
            config.num_labels = 1
            return AutoModelForSequenceClassification.from_config(config)
        return AutoModelForCausalLM.from_config(config)


def count_parameters(model, adapter: dict[str, Any], head: modeling.Head = "causal_lm") -> ParameterCounts:
    """Counts for ``model`` (a meta model) with the recipe's ``adapter`` section attached as peft attaches it."""
    quantizable = _quantizable_weights(model)
    largest = max((_numel(layer) for layer in activations.decoder_layers(model)), default=0)
    if adapter["method"] != "none":
        from peft import get_peft_model

        task_type = "SEQ_CLS" if head == "reward" else "CAUSAL_LM"
        model = get_peft_model(model, adapters.build_peft_config(adapter, task_type=task_type))
    total = _numel(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ParameterCounts(total=total, trainable=trainable, quantizable=quantizable, largest_layer=largest)


def recipe_parameters(recipe: Recipe, head: modeling.Head = "causal_lm") -> ParameterCounts:
    """``count_parameters`` for the recipe's model and adapter, from the model's config alone."""
    return count_parameters(meta_model(model_config(recipe.model), head), recipe.adapter, head)


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())  # torch yields a tied parameter once


def _quantizable_weights(model) -> int:
    """Weights bitsandbytes replaces with 4/8-bit ones (see ``_quantizable_modules``), counted once if tied."""
    return sum({id(m.weight): m.weight.numel() for m in _quantizable_modules(model)}.values())


# ---- memory ---------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What ``alignkit plan`` reports for a recipe."""

    stage: str
    model: str
    adapter: str
    parameters: ParameterCounts
    shape: memory.Shape
    launch: memory.Launch
    memory: memory.MemoryEstimate
    data: dict[str, Any] | None = None   # rows and steps, when the data is local

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "model": self.model, "adapter": self.adapter,
                "parameters": dataclasses.asdict(self.parameters), "shape": dataclasses.asdict(self.shape),
                "launch": dataclasses.asdict(self.launch), "memory": self.memory.to_dict(), "data": self.data}


def training_config(recipe: Recipe):
    """The stage's TRL config as training would build it (defaults included: TRL's SFT turns on bf16 and
    activation checkpointing unless the recipe says otherwise), without touching a device."""
    import tempfile

    config_class = get_stage(recipe.stage).config_class(recipe.to_dict())
    values = dict(recipe.train)
    if "use_cpu" in {f.name for f in dataclasses.fields(config_class)}:
        values.setdefault("use_cpu", True)  # bf16 on a machine without a GPU is fine for a plan
    with tempfile.TemporaryDirectory() as scratch:
        return training.training_args(dataclasses.replace(recipe, train=values), config_class, Path(scratch))


def training_shape(recipe: Recipe, args) -> memory.Shape:
    """The memory-relevant options of the resolved TRL config ``args``; what the stage runs through the model
    per row (pairs, the fused output layer, a scalar head) its ``Stage`` says."""
    stage = get_stage(recipe.stage)
    length = getattr(args, "max_length", None)
    if length is None:  # RL stages: prompt plus generated answer
        prompt = getattr(args, "max_prompt_length", None) or 512
        answer = getattr(args, "response_length", None) or getattr(args, "max_completion_length", None) or 256
        length = prompt + answer
    checkpointing = bool(getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing",
                                                                                    False))
    precision = "bf16" if getattr(args, "bf16", False) else "fp16" if getattr(args, "fp16", False) else None
    optimizer = getattr(args.optim, "value", str(args.optim))  # OptimizerNames member or plain text
    return memory.Shape(batch=args.per_device_train_batch_size, length=int(length),
                        gradient_accumulation=args.gradient_accumulation_steps, checkpointing=checkpointing,
                        optimizer=optimizer, mixed_precision=precision,
                        sequences_per_row=stage.sequences_per_row, fused_head=stage.fused_head,
                        vocab_head=stage.head != "reward")


def as_trained(recipe: Recipe, config, head: modeling.Head):
    """The meta model with the dtypes training gives each parameter and the recipe's adapter attached;
    returns it with the ids of the weights bitsandbytes would quantise."""
    import torch

    model = meta_model(config, head).to(_load_dtype(recipe.model.dtype, config))
    quantized: set[int] = set()
    if recipe.model.quantization is not None:
        quantized = {id(module.weight) for module in _quantizable_modules(model)}
        # prepare_model_for_kbit_training keeps everything it does not quantise in float32, so the hidden
        # states are float32 too (the quantised matmuls compute in the compute dtype and cast back).
        model = model.to(torch.float32)
    if recipe.adapter["method"] != "none":
        from peft import get_peft_model

        task_type = "SEQ_CLS" if head == "reward" else "CAUSAL_LM"
        model = get_peft_model(model, adapters.build_peft_config(recipe.adapter, task_type=task_type))
        if recipe.model.quantization is not None:  # TRL's QLoRA cast of the adapter
            for name, parameter in model.named_parameters():
                if parameter.requires_grad and "lora_magnitude_vector" not in name and "modules_to_save" not in name:
                    parameter.data = parameter.data.to(torch.bfloat16)
    return model, quantized


def as_planned(recipe: Recipe) -> Recipe:
    """The recipe with a plain base model and the adapter that actually trains. A run dir as the model is
    replaced by its base; with ``run_adapter: continue`` the run's adapter is the one trained. A run dir not
    written yet (a later step of a pipeline) is looked up among the recipes next to this one: the recipe that
    writes it says what its base and adapter will be."""
    name = recipe.model.name_or_path
    if not get_stage(recipe.stage).trains:
        raise AlignkitError(f"the {recipe.stage} stage trains nothing: plan the recipe that trains the model it "
                            "evaluates")
    if is_run_with_adapter(name):
        base = modeling.base_settings_of_adapter(Path(name), recipe.model)
        adapter = _run_adapter_section(Path(name)) if recipe.model.run_adapter == "continue" else recipe.adapter
    elif is_future_run(name):
        producer = _recipe_writing(name, recipe)
        if producer is None:
            raise AlignkitError(f"{name} does not exist yet and no recipe next to {recipe.source} writes it: plan "
                                f"with model.name_or_path=<its base model>")
        producer = as_planned(producer)
        base = producer.model
        adapter = producer.adapter if recipe.model.run_adapter == "continue" else recipe.adapter
    else:
        return recipe
    model = dataclasses.replace(base, dtype=recipe.model.dtype, quantization=recipe.model.quantization,
                                attn_implementation=recipe.model.attn_implementation)
    return dataclasses.replace(recipe, model=model, adapter=adapter)


def _run_adapter_section(path: Path) -> dict[str, Any]:
    """The adapter section that trained the run at ``path``: its recipe's, else read from adapter_config.json."""
    import json

    import yaml

    if (path / "recipe.yaml").is_file():
        section = (yaml.safe_load((path / "recipe.yaml").read_text()) or {}).get("adapter")
        if section:
            return section
    config = json.loads((path / "adapter_config.json").read_text())
    keys = ("r", "lora_alpha", "target_modules", "num_virtual_tokens")
    return {"method": str(config.get("peft_type", "lora")).lower()} | {k: config[k] for k in keys if k in config}


def _recipe_writing(run_dir: str, recipe: Recipe) -> Recipe | None:
    """The recipe next to ``recipe`` whose ``train.output_dir`` is ``run_dir``."""
    if recipe.source is None:
        return None
    for candidate in sorted(Path(recipe.source).parent.glob("*.yaml")):
        try:
            if Path(load_raw(candidate).get("train", {}).get("output_dir", "")) == Path(run_dir):
                return load_recipe(candidate)
        except AlignkitError:
            continue
    return None


def estimate_memory(recipe: Recipe, launch: memory.Launch, *, head: modeling.Head | None = None):
    """(parameter counts, shape, per-device memory estimate) of the recipe's training run."""
    import torch

    recipe = as_planned(recipe)
    head = head or get_stage(recipe.stage).head
    args = training_config(recipe)
    shape = training_shape(recipe, args)
    config = model_config(recipe.model)
    counts = recipe_parameters(recipe, head)
    model, quantized = as_trained(recipe, config, head)
    params = memory.parameter_bytes(model, recipe.model.quantization, shape.optimizer, quantized)
    params.largest_layer = max((sum(_param_size(p, quantized, recipe) for p in layer.parameters())
                                for layer in activations.decoder_layers(model)), default=0)
    trace_model = model
    hidden = _hidden_dtype(model, shape)
    if hidden != _hidden_dtype(model, dataclasses.replace(shape, mixed_precision=None)):
        trace_model = model.to(hidden)  # autocast: matmul outputs in half precision (norms still upcast)
    trace_model.train()
    trace = activations.trace_activations(trace_model, shape.batch * shape.sequences_per_row, shape.length)
    saved = trace.checkpointed() if shape.checkpointing else trace.total
    layer_backward = max(trace.layers, default=0)
    vocab = config.get_text_config().vocab_size
    workspace = max(memory.head_workspace(shape, vocab, torch.empty((), dtype=hidden).element_size(),
                                          launch.device_type), layer_backward)
    extra, notes = _extra_models(recipe, params, shape, saved, launch)
    estimate = memory.combine(params, saved, workspace, shape, launch, extra_models=extra,
                              layer_backward=layer_backward)
    estimate.notes.extend(notes)
    if getattr(args, "max_length", None) is None and not getattr(args, "max_prompt_length", None):
        estimate.notes.append(f"prompts assumed up to 512 tokens: the sequence length planned is {shape.length}")
    return counts, shape, estimate


def plan(recipe: Recipe, launch: memory.Launch, *, count_data: bool = True) -> Plan:
    """Everything ``alignkit plan`` prints, from the recipe and the model's config (no weights)."""
    counts, shape, estimate = estimate_memory(recipe, launch)
    planned = as_planned(recipe)
    model = recipe.model.name_or_path
    if planned.model.name_or_path != model:
        model += f" (base: {planned.model.name_or_path})"
    return Plan(stage=recipe.stage, model=model, adapter=_describe_adapter(planned),
                parameters=counts, shape=shape, launch=launch, memory=estimate,
                data=data_summary(recipe, shape, launch) if count_data else None)


@dataclass(frozen=True)
class Change:
    """One change to a recipe or launch, as the user would make it."""

    description: str
    recipe: Recipe
    launch: memory.Launch


def candidate_changes(recipe: Recipe, launch: memory.Launch, shape: memory.Shape) -> list[Change]:
    """Changes that lower memory, cheapest first (least loss of speed or quality): activation
    checkpointing, an 8-bit optimizer, a smaller per-device batch with more accumulation (same global batch),
    LoRA instead of full fine-tuning, a 4-bit base (QLoRA), then more devices with FSDP."""
    changes: list[Change] = []

    def with_train(**values) -> Recipe:
        return dataclasses.replace(recipe, train=dict(recipe.train, **values))

    if not shape.checkpointing:
        changes.append(Change("train.activation_checkpointing=true", with_train(activation_checkpointing=True),
                              launch))
    if shape.optimizer in ("adamw_torch", "adamw_torch_fused", "adamw_hf") and recipe.adapter["method"] == "none":
        changes.append(Change("train.optim=adamw_bnb_8bit", with_train(optim="adamw_bnb_8bit"), launch))
    batch = shape.batch
    while batch > 1:
        batch //= 2
        accumulation = shape.gradient_accumulation * shape.batch // batch
        changes.append(Change(f"train.per_device_train_batch_size={batch} "
                              f"train.gradient_accumulation_steps={accumulation}",
                              with_train(per_device_train_batch_size=batch,
                                         gradient_accumulation_steps=accumulation), launch))
    lora = {"method": "lora", "r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}
    if recipe.adapter["method"] == "none":
        changes.append(Change("adapter={method: lora, r: 16, lora_alpha: 32, target_modules: all-linear}",
                              dataclasses.replace(recipe, adapter=lora), launch))
    stage = get_stage(recipe.stage)
    if recipe.model.quantization is None and stage.plan_offers_qlora or recipe.adapter["method"] == "none":
        quantized = dataclasses.replace(recipe.model, quantization=QuantizationSettings(
            bits=4, quant_type="nf4", double_quant=True, compute_dtype="bfloat16"))
        adapter = dict(recipe.adapter, method="qlora") if recipe.adapter["method"] in ("lora", "qlora") else \
            dict(lora, method="qlora")
        changes.append(Change("QLoRA: model.quantization={bits: 4, quant_type: nf4, double_quant: true} with "
                              "adapter.method=qlora", dataclasses.replace(recipe, model=quantized,
                                                                          adapter=adapter), launch))
    if stage.sharded_launch != "none":
        devices = max(launch.devices, 1)
        # A stage that shards its own models (PPO) does so with FSDP only.
        strategy = launch.strategy if launch.strategy != "ddp" and stage.sharded_launch == "accelerate" else "fsdp"
        for more in (2, 4, 8, 16, 32, 64):
            if more > devices:
                changes.append(Change(f"{more} devices with {strategy.upper()} (accelerate_configs/{strategy}.yaml)",
                                      recipe, memory.Launch(more, strategy, launch.device_type)))
    return changes


def cheapest_fix(recipe: Recipe, launch: memory.Launch, shape: memory.Shape, budget: int):
    """(changes, estimate): the first change on the cheapest-first list after which the run fits in ``budget``
    bytes per device; if no single change does, the changes applied one on top of another until it fits,
    then every one it still fits without dropped. None if even all of them together do not fit."""
    changes = candidate_changes(recipe, launch, shape)
    for change in changes:
        fitted = _estimate_or_none(change.recipe, change.launch)
        if fitted is not None and fitted.peak <= budget:
            return [change.description], fitted
    for count in range(2, len(changes) + 1):
        fitted = _estimate_or_none(*_apply(recipe, launch, changes[:count]))
        if fitted is not None and fitted.peak <= budget:
            chosen = changes[:count]
            for change in list(chosen[:-1]):  # drop what the later changes made unnecessary
                without = [c for c in chosen if c is not change]
                smaller = _estimate_or_none(*_apply(recipe, launch, without))
                if smaller is not None and smaller.peak <= budget:
                    chosen, fitted = without, smaller
            return [change.description for change in chosen], fitted
    return None


def _apply(recipe: Recipe, launch: memory.Launch, changes: list[Change]) -> tuple[Recipe, memory.Launch]:
    """``recipe`` and ``launch`` with ``changes`` applied in order (later ones win)."""
    current, current_launch = recipe, launch
    for change in changes:
        if change.launch != launch:
            current_launch = change.launch
        else:
            current = _merge_change(current, change.recipe, recipe)
    return current, current_launch


def _estimate_or_none(recipe: Recipe, launch: memory.Launch):
    try:
        return estimate_memory(recipe, launch)[2]
    except AlignkitError:  # a combination the libraries reject is not a fix
        return None


def data_summary(recipe: Recipe, shape: memory.Shape, launch: memory.Launch) -> dict[str, Any] | None:
    """Training rows and optimizer steps when every training source is local (a file or demo data)."""
    if not countable(recipe.data):
        return None
    loader = get_stage(recipe.stage).load_data
    if loader is None:
        return None
    prepared = prepare(recipe.data, loader)  # the data the run will train on, prepared once for both
    too_long = rows_too_long(recipe, prepared.train)
    rows = len(prepared.train) - (too_long or 0)
    global_batch = shape.batch * shape.gradient_accumulation * launch.devices
    max_steps = recipe.train.get("max_steps", -1) or -1
    epochs = float(recipe.train.get("num_train_epochs", 1 if max_steps > 0 else 3))
    steps = max_steps if max_steps > 0 else math.ceil(rows / global_batch * epochs)
    skipped = sum(sum(report.skipped.values()) for report in prepared.reports)
    return {"train_rows": rows, "eval_rows": len(prepared.eval or []), "global_batch": global_batch,
            "steps": steps, "skipped_rows": skipped, "too_long_rows": too_long, "cache_key": prepared.cache_key}


def rows_too_long(recipe: Recipe, rows) -> int | None:
    """How many of the training ``rows`` the stage's TRL trainer will drop for ``train.max_length``
    (``training.DROPPED_FOR_LENGTH``); None when the tokenizer cannot be loaded here. Not usable rows, so
    the plan does not count them (the run itself stops when none is left)."""
    max_length = recipe.train.get("max_length")
    keeps_start = recipe.train.get("truncation_mode", "keep_start") == "keep_start"
    rule = get_stage(recipe.stage).dropped_for_length
    if max_length is None or rule is None or recipe.train.get("packing"):
        return 0
    if rule == "first_answer" and not (recipe.train.get("assistant_only_loss") and keeps_start):
        return 0  # the loss is on every token, or truncation keeps the end: a long row is cut, not dropped
    if rule == "prompt" and not keeps_start:
        return 0
    try:
        tokenizer = modeling.load_tokenizer(as_planned(recipe).model)
    except (OSError, AlignkitError) as err:
        logger.warning("rows longer than train.max_length not counted: no tokenizer (%s)", err)
        return None

    def length(messages, answer_follows: bool) -> int:
        return len(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=answer_follows,
                                                 return_dict=True)["input_ids"])

    def dropped(row) -> bool:
        if rule == "conversation":  # the whole conversation, chosen or rejected, must fit
            return max(length(row["prompt"] + row[side], False) for side in ("chosen", "rejected")) > max_length
        if rule == "first_answer":  # the prompt before the first answer fills max_length: no answer token left
            first_answer = next((i for i, m in enumerate(row["messages"]) if m["role"] == "assistant"), None)
            return first_answer is not None and length(row["messages"][:first_answer], True) >= max_length
        return length(row["prompt"], True) >= max_length  # "prompt" (dpo, kto): the prompt alone fills it

    count = sum(dropped(row) for row in rows)
    if count:
        logger.warning("plan: %d of the %d training rows are too long for train.max_length=%d and not counted "
                       "(the %s trainer drops them)", count, len(rows), max_length, recipe.stage)
    return count


# ---- helpers ----------------------------------------------------------------------------------------------


def _load_dtype(name: str, config):
    import torch

    if name != "auto":
        return modeling.torch_dtype(name)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _hidden_dtype(model, shape: memory.Shape):
    """The dtype of the hidden states: the half type under autocast, else the embeddings' dtype."""
    import torch

    if shape.mixed_precision is not None:
        return torch.bfloat16 if shape.mixed_precision == "bf16" else torch.float16
    return model.get_input_embeddings().weight.dtype


def _param_size(parameter, quantized: set[int], recipe: Recipe) -> int:
    if id(parameter) in quantized:
        bits = recipe.model.quantization.bits
        return parameter.numel() // 2 if bits == 4 else parameter.numel()
    return parameter.numel() * parameter.element_size()


def _quantizable_modules(model) -> list:
    """Every linear layer (nn.Linear, GPT-2's Conv1D) but the output layer and a reward model's score head,
    which transformers keeps unquantised."""
    import torch
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings()
    return [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not output
            and not _is_score_head(model, m)]


def _is_score_head(model, module) -> bool:
    return module is getattr(model, "score", None)


def _extra_models(recipe: Recipe, params: memory.ParameterBytes, shape: memory.Shape,
                  saved: int, launch: memory.Launch) -> tuple[int, list[str]]:
    """Memory of the models a stage holds besides the one it trains (per device: split N ways when the stage
    shards them too)."""
    full = recipe.adapter["method"] == "none"
    notes: list[str] = []
    extra = get_stage(recipe.stage).extra_models
    if extra == "reference" and full and not recipe.train.get("precompute_ref_log_probs"):
        notes.append("reference model: a frozen copy of the weights (full fine-tuning)")
        return params.weights, notes
    if extra == "critic_and_reference":
        # The critic is a second trainable model (full) or adapter (shared base), the reference a frozen
        # copy (full) or the adapter switched off; PPO also runs the critic's forward pass on the batch.
        critic = params.weights + params.trainable + params.optimizer if full else 2 * params.trainable + \
            params.optimizer
        reference = params.weights if full else 0
        notes.append("PPO: critic and reference included; a separate reward model is not")
        if launch.devices > 1 and launch.strategy == "fsdp" and get_stage(recipe.stage).sharded_launch == "fsdp":
            # Sharded like the policy: weights, gradients and optimizer states 1/N each; the critic's activations
            # are its own batch's, whole on every device.
            notes.append(f"FSDP: critic and reference sharded {launch.devices} ways like the policy")
            return math.ceil((critic + reference) / launch.devices) + saved, notes
        return critic + reference + saved, notes
    return 0, notes


def _describe_adapter(recipe: Recipe) -> str:
    method = recipe.adapter["method"]
    if method == "none":
        return "none (full fine-tuning)"
    options = {k: v for k, v in recipe.adapter.items() if k in ("r", "target_modules", "num_virtual_tokens")}
    return method + (" (" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")" if options else "")


def _merge_change(current: Recipe, changed: Recipe, original: Recipe) -> Recipe:
    """``current`` with what ``changed`` changed relative to ``original``."""
    train = dict(current.train, **{k: v for k, v in changed.train.items() if original.train.get(k) != v})
    model = changed.model if changed.model != original.model else current.model
    adapter = changed.adapter if changed.adapter != original.adapter else current.adapter
    return dataclasses.replace(current, train=train, model=model, adapter=adapter)

