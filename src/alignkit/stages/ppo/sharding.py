"""PPO's models sharded across the processes of an FSDP launch, with torch's FSDP2 (``fully_shard``).

Under ``accelerate launch --config_file accelerate_configs/fsdp.yaml`` every model PPO holds is split across
the processes, one decoder layer per unit (the blocks of the model's largest ``ModuleList``, what accelerate's
``TRANSFORMER_BASED_WRAP`` wraps), plus the root for the embeddings, output layer and heads:

  policy      sharded; with an adapter it is the shared base, which holds the critic's adapter too, and the
              reference is that base with the adapter disabled (or the frozen ``reference`` adapter);
  reference   a full fine-tune's frozen copy: sharded;
  critic      its own model (full fine-tune, or started from the reward model): sharded; on the shared base,
              its adapter is sharded with it and its value head is a unit of its own;
  reward      every reward model of ``reward.sources``: sharded (frozen, scoring only).

Gradients and the optimizer states live on each process's shards only. Every forward pass of a sharded model
gathers a layer's weights from all processes, so every process must run the same number of them: rollouts
generate with ``synced_gpus`` (a process whose answers are done keeps stepping until every process's are) and
the training loop pads a process with fewer rows of a minibatch with zero-weight micro-batches (trainer.py).

Why alignkit calls ``fully_shard`` itself instead of accelerate's FSDP plugin: the plugin acts through
``Accelerator.prepare`` on one model and one optimizer, which PPO's own loop (four models, one optimizer over
two of them) does not go through, and accelerate selects FSDP for GPU-class devices only; ``fully_shard``
works the same on GPUs (NCCL) and on CPU processes (gloo), which is how the test suite runs the sharded path.
From the launch config PPO takes ``fsdp_reshard_after_forward``; precision is the recipe's (``bf16`` autocast
over weights in ``model.dtype``), not the config's ``mixed_precision``.

Checkpoints are sharded (``torch.distributed.checkpoint``: each process writes its own shards of the trained
weights and optimizer states, and any number of processes can load them); the final policy is gathered and
saved whole, loadable with ``from_pretrained``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alignkit.errors import RecipeError
from alignkit.stages.ppo.models import ActorCritic

# Optimizers whose step works on sharded (DTensor) parameters: torch's own. bitsandbytes' kernels and
# transformers' Adafactor read the parameters' whole shapes, which a shard does not have.
SHARDED_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "sgd", "adagrad", "rmsprop")


def check_options(args) -> None:
    """The ``train`` options a sharded PPO run honours; a RecipeError before any model loads otherwise."""
    optim = getattr(args.optim, "value", args.optim)
    if optim not in SHARDED_OPTIMIZERS:
        raise RecipeError(f"train.optim={optim}: under FSDP, PPO's optimizer steps sharded parameters, which only "
                          f"torch's optimizers do; use one of {', '.join(SHARDED_OPTIMIZERS)}")
    if args.fp16:
        raise RecipeError("train.fp16: under FSDP, PPO trains in float32 or bf16 (train.bf16: true); fp16's loss "
                          "scaler would decide on each process alone whether to skip a step")
    if os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true":
        raise RecipeError("the accelerate config sets fsdp_offload_params: PPO does not offload its sharded "
                          "weights to the CPU; set it to false (accelerate_configs/fsdp.yaml)")


def load_whole_on_every_process() -> None:
    """Have transformers load every model whole in every process, as without FSDP. Under an accelerate FSDP
    launch with ``fsdp_cpu_ram_efficient_loading`` it would load the weights in the main process only and leave
    the others' on the meta device, for accelerate's plugin to broadcast when it wraps the model, which PPO does
    not use. The cost: every process holds each model whole in CPU memory until :func:`shard` splits it."""
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"


def shard(models: ActorCritic, reward_functions) -> None:
    """Shard every model of ``models`` and every reward model of ``reward_functions`` across the processes, in
    place. The trained parameters are new (sharded) tensors afterwards: ``models.trainable`` is rebuilt, so
    build the optimizer after this."""
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
    trained = [models.policy]
    if models.critic_model is not models.policy:
        trained.append(models.critic_model)
    for model in trained:
        _shard_model(model, reshard)
    if not _is_part_of(models.value_head, trained):  # the critic's own head on the shared base
        _fully_shard(models.value_head, reshard)
    for frozen in [models.reference, *(f.reward_model.model for f in reward_functions if hasattr(f, "reward_model"))]:
        if frozen is not None:
            _shard_model(frozen, reshard)
    # The loss of each process is its share of a minibatch's mean (trainer.py): gradients are summed across the
    # processes, not averaged as FSDP does by default. Summed in the reduction itself (gloo has no pre-scaled sum).
    for model in [*trained, models.value_head]:
        for module in model.modules():
            if isinstance(module, _fsdp_module()):
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
    models.rebind_trainable()
    models.sharded = True


def _shard_model(model: nn.Module, reshard: bool) -> None:
    """Each decoder layer one unit, then the root (embeddings, final norm, output layer or head). The root stays
    gathered from its forward to its backward: the critic's values are read inside the model (models.py), so the
    loss may not reach the root's own output, whose backward hook would gather it again. With an adapter the root
    is the transformers model inside peft's wrapper: generate() calls that model's forward, not the wrapper's."""
    root = model.get_base_model() if hasattr(model, "peft_config") else model
    for layer in decoder_layers(root):
        _fully_shard(layer, reshard)
    _fully_shard(root, reshard=False)


def _fully_shard(module: nn.Module, reshard: bool) -> None:
    from torch.distributed.fsdp import fully_shard

    fully_shard(module, reshard_after_forward=reshard)


def _fsdp_module() -> type:
    from torch.distributed.fsdp import FSDPModule

    return FSDPModule


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of the body: the items of the model's largest ``nn.ModuleList``."""
    lists = [module for module in model.modules() if isinstance(module, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def _is_part_of(module: nn.Module, models: list[nn.Module]) -> bool:
    return any(module is inner for model in models for inner in model.modules())


# ---- checkpoints ----------------------------------------------------------------------------------------


def _trained_container(models: ActorCritic) -> nn.ModuleDict:
    """The trained modules under one root, for torch's state-dict helpers (which map one module's parameter
    names to the optimizer's states). The names are those of the modules, so a checkpoint's keys do not depend
    on how the processes shard them."""
    modules = {"policy": models.policy}
    if models.critic_model is not models.policy:
        modules["critic"] = models.critic_model
    if not _is_part_of(models.value_head, list(modules.values())):
        modules["value_head"] = models.value_head
    return nn.ModuleDict(modules)


def _state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Frozen weights (the shared base, a reference) are never saved: they are the recipe's model. Not strict on
    # load for the same reason; dcp.load itself fails on any trained tensor the checkpoint lacks.
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def save_checkpoint(models: ActorCritic, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """The trained weights and the optimizer states, each process writing its shards into ``path`` (a
    ``torch.distributed.checkpoint`` directory). Every process calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optimizer_state = get_state_dict(_trained_container(models), optimizer, options=_state_options())
    dcp.save({"weights": weights, "optimizer": optimizer_state}, checkpoint_id=str(path))


def load_checkpoint(models: ActorCritic, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Load what :func:`save_checkpoint` wrote into the sharded models and optimizer (any number of processes
    may have written it). Every process calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    container = _trained_container(models)
    weights, optimizer_state = get_state_dict(container, optimizer, options=_state_options())
    state: dict[str, Any] = {"weights": weights, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(container, optimizer, model_state_dict=state["weights"], optim_state_dict=state["optimizer"],
                   options=_state_options())


def full_policy_state(models: ActorCritic) -> dict[str, torch.Tensor]:
    """The policy's whole state dict, gathered to the main process's CPU memory (empty on the others). Every
    process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(models.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

