"""The three roles of PPO (policy, reference, critic) and the models that play them.

With an adapter (LoRA, QLoRA, IA3) one base model serves all three: the policy is the base with its adapter
(``default``), the reference is the base with the adapter disabled (or, when training continues a run dir's
adapter, a frozen copy of that adapter named ``reference``, so the reference is the starting policy), and
the critic is the same base with an adapter of its own (``critic``) and a value head. A 4-bit base is held
once. Without an adapter the policy, a frozen copy as reference, and the critic are separate models.

``critic_init: reward_model`` starts the critic from the reward model instead (a trainable copy of it,
its reward head as the value head), as Huang et al. (2024) recommend; that critic is a model of its own,
because the reward model was trained on its own base.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alignkit.errors import RecipeError
from alignkit.models import modeling
from alignkit.recipe.loading import Recipe
from alignkit.recipe.settings import ModelSettings, is_run_with_adapter
from alignkit.stages import training

logger = logging.getLogger(__name__)

POLICY, REFERENCE, CRITIC = "default", "reference", "critic"
# Adapters that live inside the base model's layers; prompt-learning adapters prepend virtual tokens in the
# PeftModel's forward, which the critic (reading the base's hidden states) and the log-probability
# alignment of PPO do not handle.
SHARED_BASE_ADAPTERS = ("LORA", "IA3", "ADALORA", "LOHA", "LOKR")


@dataclass
class ActorCritic:
    """Policy, reference and critic, however they are held; every forward goes through these methods."""

    policy: Any                      # generates and is trained; a PeftModel when it trains an adapter
    reference: Any | None            # a separate frozen model, or None when it is a state of ``policy``
    reference_adapter: str | None    # with reference None: the frozen adapter to use, or None (adapter off)
    critic_model: Any                # the model whose hidden states feed the value head (may be ``policy``)
    critic_adapter: str | None       # the critic's adapter on the shared base, or None for its own model
    value_head: nn.Module
    trainable: dict[str, nn.Parameter]  # name -> parameter, policy's and critic's (what the optimizer steps)
    sharded: bool = False            # split across the processes by an FSDP launch (sharding.py)

    @property
    def uses_adapter(self) -> bool:
        return hasattr(self.policy, "peft_config")

    # ---- forwards ------------------------------------------------------------------------------------

    def policy_logits(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        with self._adapter(POLICY):
            return self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).logits

    def reference_logits(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        if self.reference is not None:
            return self.reference(**inputs).logits
        if self.reference_adapter is not None:
            with self._adapter(self.reference_adapter):
                return self.policy(**inputs).logits
        with self.policy.disable_adapter():
            return self.policy(**inputs).logits

    def values(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        """The critic's value at every position, (batch, length)."""
        base = self.critic_model.get_base_model() if hasattr(self.critic_model, "peft_config") else self.critic_model
        backbone = getattr(base, base.base_model_prefix)
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        with self._adapter(self.critic_adapter) if self.critic_adapter else contextlib.nullcontext():
            if self.sharded:
                return self._sharded_values(backbone, inputs)
            hidden = backbone(**inputs).last_hidden_state
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()

    def _sharded_values(self, backbone: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """The values of a sharded critic. Its forward must enter through the model's own (root) forward, which
        gathers the weights FSDP keeps at the root (embeddings, final norm, heads) and has their gradients summed
        afterwards; a call of the backbone or of a head inside the model alone would find them still in shards.
        So the model runs whole and the values are read on the way: the head's outputs when it is the model's own
        (a reward model's score), else the backbone's hidden states, then the critic's own head (a unit of its
        own). A causal LM computes its logits for the last position only."""
        head_inside = any(module is self.value_head for module in self.critic_model.modules())
        with _outputs_of(self.value_head if head_inside else backbone) as outputs:
            self.critic_model(**inputs, **({} if head_inside else {"logits_to_keep": 1}))
        if head_inside:
            return outputs[-1].squeeze(-1).float()
        hidden = outputs[-1].last_hidden_state
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()

    def generate(self, **kwargs) -> torch.Tensor:
        with self._adapter(POLICY):
            return self.policy.generate(**kwargs)

    @contextlib.contextmanager
    def _adapter(self, name: str) -> Iterator[None]:
        """Make ``name`` the active adapter of the shared base. peft's set_adapter also freezes every other
        adapter, so the policy's and critic's parameters are made trainable again after each switch."""
        if not self.uses_adapter:
            yield
            return
        previous = self.policy.active_adapter
        self._set_adapter(name)
        try:
            yield
        finally:
            self._set_adapter(previous)

    def _set_adapter(self, name: str) -> None:
        if self.policy.active_adapter != name:
            self.policy.set_adapter(name)
            for parameter in self.trainable.values():
                parameter.requires_grad_(True)

    # ---- state ---------------------------------------------------------------------------------------

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything training changes, by name: saved in checkpoints, loaded on resume."""
        return {name: parameter.detach().cpu().contiguous() for name, parameter in self.trainable.items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.trainable) - set(state)
        if missing:
            raise RuntimeError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[0]}")
        with torch.no_grad():
            for name, parameter in self.trainable.items():
                parameter.copy_(state[name].to(parameter.device, parameter.dtype))

    def rebind_trainable(self) -> None:
        """Collect ``trainable`` again from the models, after sharding replaced their parameters."""
        self.trainable = _trainable_parameters(self.policy, self.uses_adapter, self.critic_model, self.critic_adapter,
                                               self.value_head)

    def save_policy(self, path: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """The policy as the run's model: its adapter (the base stays where it was), or the full model.
        ``state_dict``: the policy's whole state, when its own parameters are shards (sharding.py)."""
        if self.uses_adapter:
            self.policy.save_pretrained(str(path), selected_adapters=[POLICY], state_dict=state_dict)
        else:
            self.policy.save_pretrained(str(path), state_dict=state_dict)


@contextlib.contextmanager
def _outputs_of(module: nn.Module) -> Iterator[list[Any]]:
    """A list that collects ``module``'s output of every forward run inside the context."""
    outputs: list[Any] = []
    handle = module.register_forward_hook(lambda _module, _args, output: outputs.append(output))
    try:
        yield outputs
    finally:
        handle.remove()


def build_actor_critic(recipe: Recipe, args, reward_functions) -> tuple[ActorCritic, Any]:
    """(ActorCritic, tokenizer) for the recipe's policy, reference and critic, on this process's device."""
    model, tokenizer, peft_config = training.load_model_and_tokenizer(recipe, args)
    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    uses_adapter = hasattr(model, "peft_config")
    if uses_adapter and model.peft_config[POLICY].peft_type.value not in SHARED_BASE_ADAPTERS:
        raise RecipeError(f"ppo trains adapters that live in the model's layers ({', '.join(SHARED_BASE_ADAPTERS)}) "
                          f"or the full model; {model.peft_config[POLICY].peft_type.value} is not supported")

    reference, reference_adapter = None, None
    if uses_adapter and is_run_with_adapter(recipe.model.name_or_path) and recipe.model.run_adapter == "continue":
        # Continuing a run's adapter: the reference is that adapter as it was, not the bare base. Under
        # ``run_adapter: merge`` the run's adapter is already in the base weights, so the reference is that
        # merged base (the new adapter disabled): loading the run's adapter again would add its change twice.
        model.load_adapter(modeling.resolve_path(recipe.model.name_or_path), adapter_name=REFERENCE,
                           is_trainable=False)
        reference_adapter = REFERENCE
    elif not uses_adapter:
        reference = copy.deepcopy(model).eval()
        reference.requires_grad_(False)

    reward_model = next((f.reward_model for f in reward_functions if hasattr(f, "reward_model")), None)
    critic_init = args.critic_init
    if critic_init == "auto":
        critic_init = "reward_model" if reward_model is not None else "policy"
    if critic_init == "reward_model":
        if reward_model is None:
            raise RecipeError("train.critic_init is reward_model, but reward.sources has no reward model")
        source = next(f for f in reward_functions if hasattr(f, "reward_model")).reward_model_path
        check_same_vocabulary(reward_model.tokenizer, tokenizer, source)
        critic_model, value_head = _critic_from_reward_model(source, tokenizer.pad_token_id)
        critic_adapter = None
    elif uses_adapter:
        model.add_adapter(CRITIC, copy.deepcopy(model.peft_config[POLICY]))
        critic_model, critic_adapter = model, CRITIC
        value_head = _new_value_head(model)
    else:
        critic_model = modeling.load_model(recipe.model, head="reward")
        value_head, critic_adapter = critic_model.score, None

    if args.activation_checkpointing:
        for trained in {id(m): m for m in (model, critic_model)}.values():  # the critic may share the base
            enable_activation_checkpointing(trained, args)
    trainable = _trainable_parameters(model, uses_adapter, critic_model, critic_adapter, value_head)
    models = ActorCritic(policy=model, reference=reference, reference_adapter=reference_adapter,
                         critic_model=critic_model, critic_adapter=critic_adapter, value_head=value_head,
                         trainable=trainable)
    _freeze_all_but(models)
    if uses_adapter:
        models._set_adapter(POLICY)
    logger.info("ppo: policy %s, reference %s, critic %s", "adapter" if uses_adapter else "full model",
                "frozen run adapter" if reference_adapter else "adapter disabled" if uses_adapter else "frozen copy",
                f"adapter '{critic_adapter}' on the shared base" if critic_adapter else
                f"own model ({critic_init})")
    return models, tokenizer


def check_same_vocabulary(critic_tokenizer, policy_tokenizer, source: str) -> None:
    """A critic started from the reward model at ``source`` reads the policy's token ids: a RecipeError unless
    both tokenizers map every token to the same id."""
    critic_vocab, policy_vocab = critic_tokenizer.get_vocab(), policy_tokenizer.get_vocab()
    if critic_vocab == policy_vocab:
        return
    differing = sorted(token for token in critic_vocab.keys() | policy_vocab.keys()
                       if critic_vocab.get(token) != policy_vocab.get(token))
    raise RecipeError(
        f"train.critic_init: the critic would start from the reward model {source}, but its tokenizer is not the "
        f"policy's ({len(critic_vocab)} vs {len(policy_vocab)} tokens; {len(differing)} tokens missing or with "
        f"another id, e.g. {differing[:3]}), so it would read the policy's token ids as other words. Use a reward "
        "model trained on the policy's tokenizer, or set train.critic_init: policy")


def enable_activation_checkpointing(model, args) -> None:
    """``train.activation_checkpointing``: as transformers' Trainer turns it on, with its
    ``activation_checkpointing_kwargs`` (every_n_layers, offload, the rest for torch's checkpoint). It acts
    in train mode only; the reference, always in eval mode, never needs it."""
    kwargs = dict(args.activation_checkpointing_kwargs or {})
    every_n_layers, offload = kwargs.pop("every_n_layers", 1), kwargs.pop("offload", False)
    base = model.get_base_model() if hasattr(model, "peft_config") else model
    base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None,
                                         every_n_layers=every_n_layers, offload=offload)


def _critic_from_reward_model(path: str, pad_token_id: int) -> tuple[Any, nn.Module]:
    """A trainable copy of the reward model: an rm run dir's adapter and head, or every weight of a full one."""
    resolved = modeling.resolve_path(path)
    if is_run_with_adapter(resolved):
        from peft import PeftModel

        base = modeling.base_settings_of_adapter(Path(resolved), ModelSettings(name_or_path=path))
        model = PeftModel.from_pretrained(modeling.load_model(base, head="reward"), resolved, is_trainable=True)
        head = model.get_base_model().score
    else:
        model = modeling.load_model(ModelSettings(name_or_path=path), head="reward")
        head = model.score
    model.config.pad_token_id = pad_token_id
    return model, head


def _new_value_head(model) -> nn.Module:
    hidden_size = model.get_base_model().config.get_text_config().hidden_size
    head = nn.Linear(hidden_size, 1, bias=False)
    # Zero: every value starts at 0, so the first advantages are the plain returns, not noise.
    nn.init.zeros_(head.weight)
    dtype = model.get_input_embeddings().weight.dtype
    return head.to(device=model.get_input_embeddings().weight.device, dtype=dtype)


def _trainable_parameters(policy, uses_adapter: bool, critic_model, critic_adapter: str | None,
                          value_head: nn.Module) -> dict[str, nn.Parameter]:
    trainable: dict[str, nn.Parameter] = {}
    for name, parameter in policy.named_parameters():
        if not uses_adapter or f".{POLICY}." in name:
            trainable[f"policy.{name}"] = parameter
        elif critic_adapter and f".{critic_adapter}." in name:
            trainable[f"critic.{name}"] = parameter
    if critic_adapter is None:
        for name, parameter in critic_model.named_parameters():
            if parameter.requires_grad:
                trainable[f"critic.{name}"] = parameter
    seen = {id(parameter) for parameter in trainable.values()}
    for name, parameter in value_head.named_parameters():
        if id(parameter) not in seen:  # a reward model's head is already among the critic's parameters
            trainable[f"value_head.{name}"] = parameter
    return trainable


def _freeze_all_but(models: ActorCritic) -> None:
    from trl.trainer.utils import disable_dropout_in_model

    keep = {id(p) for p in models.trainable.values()}
    for module in {id(m): m for m in (models.policy, models.critic_model, models.value_head)}.values():
        for parameter in module.parameters():
            parameter.requires_grad_(id(parameter) in keep)
        # PPO's ratio compares two forwards of the same policy: dropout would make it noise.
        disable_dropout_in_model(module)
    if models.reference is not None:
        disable_dropout_in_model(models.reference)
