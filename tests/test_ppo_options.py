"""The options of alignkit's PPO. TrainingArguments': each one it accepts does what it says (bf16 / fp16 autocast,
activation checkpointing, resume_from_checkpoint, optim), and every other one is refused with the list of what
PPO honours (issue 17, finding 3). Its own for large runs (issue 20): several answers per prompt, reward
normalisation and clipping, a critic learning rate, critic warm-up, stop tokens and strings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, kill_when_written, run_cli
from signal_rewards import ANSWER_LENGTH_REWARD
from test_ppo import DEMO_PPO, FROM_BASE, QUICK

from alignkit.errors import RecipeError, RunDirError
from alignkit.recipe.loading import load_recipe
from alignkit.runs.rundir import RunDir, last_checkpoint
from alignkit.stages.ppo.config import PPOConfig, unhonoured_options


def _trainer(run_dir: Path, *overrides: str, recipe: str = DEMO_PPO,
             start: tuple[str, ...] = (*FROM_BASE, ANSWER_LENGTH_REWARD)):
    """An in-process PPO trainer; by default from the bare base, rewarded by answer length so that every build of
    the demo model gives its first update a gradient (see signal_rewards)."""
    from alignkit.stages.ppo import build_trainer

    run_dir.mkdir(parents=True, exist_ok=True)
    return build_trainer(load_recipe(recipe, [*start, f"train.output_dir={run_dir}", *overrides]),
                         RunDir(path=run_dir))


def _record_output_dtypes(module: torch.nn.Module, seen: list[torch.dtype]):
    return module.register_forward_hook(lambda _module, _inputs, output: seen.append(output.dtype))


# ---- refused options ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, named", [
    (("train.push_to_hub=true",), "push_to_hub=true"),
    (("train.optim_target_modules=[q_proj]", "train.eval_strategy=steps", "train.eval_steps=5"),
     "optim_target_modules=['q_proj'], eval_strategy='steps', eval_steps=5"),
])
def test_options_ppo_does_not_honour_are_refused_with_the_list_of_those_it_does(tmp_path, overrides, named):
    from alignkit.stages import training

    with pytest.raises(RecipeError) as refused:  # at validation, which builds the stage's config
        training.training_args(load_recipe(DEMO_PPO, [f"train.output_dir={tmp_path}", *overrides]), PPOConfig,
                               tmp_path)
    message = str(refused.value)
    assert f"does not use {named}" in message and "\n" not in message
    honoured = message.split("PPO honours these TrainingArguments options: ")[1]
    for name in ("bf16", "fp16", "activation_checkpointing", "resume_from_checkpoint", "optim", "learning_rate",
                 "lr_scheduler_type", "warmup_steps", "save_steps", "use_cpu", "response_length", "kl_coef"):
        assert name in honoured, name
    assert "push_to_hub" not in honoured and "eval_strategy" not in honoured


@pytest.mark.parametrize("values, message", [
    ({"optim": "galore_adamw"}, "optim=galore_adamw is not one PPO can build"),
    ({"optim": "schedule_free_adamw"}, "use one of adamw_torch, adamw_torch_fused"),
    ({"save_strategy": "epoch"}, "every save_steps updates"),
    ({"top_k": 50}, "only right for the distribution that was sampled"),
    ({"top_p": 0.9}, "only right for the distribution that was sampled"),
])
def test_values_ppo_cannot_honour_are_refused(tmp_path, values, message):
    with pytest.raises(ValueError, match=message):
        PPOConfig(output_dir=str(tmp_path), **values)


def test_shipped_ppo_recipes_set_only_what_ppo_honours(tmp_path):
    """Built as the planner builds them (use_cpu, so that the bf16 recipes for GPUs build here too)."""
    from alignkit.stages import training

    shipped = sorted((REPO / "recipes").glob("*/ppo*.yaml"))
    assert len(shipped) >= 3
    for path in shipped:
        recipe = load_recipe(str(path), [f"train.output_dir={tmp_path / path.stem}", "train.use_cpu=true"])
        args = training.training_args(recipe, PPOConfig, tmp_path / path.stem)  # raises on a refused option
        assert unhonoured_options(args) == {}, path


# ---- mixed precision ------------------------------------------------------------------------------------------

# Observed on 2 cores (the noisy SFT policy, recipes/demo/ppo.yaml with bf16 autocast, 40 updates, ~0.8 s each):
# held-out greedy reward 0.170 -> 0.483, rollout reward 0.227 -> 0.355, KL 2.4 nats per answer.
BF16_UPDATES = 40


def test_bf16_runs_every_forward_under_autocast_and_learns(noisy_sft_run, tmp_path):
    trainer = _trainer(tmp_path / "run", "train.bf16=true", "train.use_cpu=true", f"train.max_steps={BF16_UPDATES}",
                       "train.save_strategy=no", start=(f"model.name_or_path={noisy_sft_run}",))
    models = trainer.models
    # The weights stay float32: only the computation is bf16.
    assert all(p.dtype == torch.float32 for p in models.trainable.values())
    policy_seen: list[torch.dtype] = []
    critic_seen: list[torch.dtype] = []
    hooks = [_record_output_dtypes(models.policy.get_base_model().lm_head, policy_seen),
             _record_output_dtypes(models.value_head, critic_seen)]
    metrics = trainer.train()
    for hook in hooks:
        hook.remove()
    # Sampling, rollout scoring (policy, reference, critic), training forwards and the held-out evaluation.
    assert len(policy_seen) > 3 * BF16_UPDATES and set(policy_seen) == {torch.bfloat16}
    assert len(critic_seen) >= 2 * BF16_UPDATES and set(critic_seen) == {torch.bfloat16}
    assert metrics["ppo/eval_reward_start"] < 0.3, metrics
    assert metrics["ppo/eval_reward_end"] >= metrics["ppo/eval_reward_start"] + 0.15, metrics
    assert metrics["ppo/reward_end"] >= metrics["ppo/reward_start"] + 0.05, metrics
    assert 0.0 < metrics["ppo/kl_end"] < 6.0, metrics
    # The rollout was scored under the same autocast as the training forwards: the first ratio is still 1.
    assert all(entry["policy/ratio_first_minibatch"] == pytest.approx(1.0, abs=1e-3) for entry in trainer.history)


def test_fp16_autocasts_and_scales_the_loss(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path / "run", *QUICK, "train.fp16=true", "train.learning_rate=1e-3")
    seen: list[torch.dtype] = []
    hook = _record_output_dtypes(trainer.models.policy.get_base_model().lm_head, seen)
    factors: list[float] = []
    scale = trainer.scaler.scale

    def recording_scale(loss: torch.Tensor) -> torch.Tensor:
        scaled = scale(loss)
        factors.append(float((scaled / loss).detach()))
        return scaled

    monkeypatch.setattr(trainer.scaler, "scale", recording_scale)
    before = {n: p.detach().clone() for n, p in trainer.models.trainable.items() if ".default." in n}
    for update in (1, 2):
        trainer.optimise(trainer.rollout(trainer._prompts_for(update), seed=update))
    hook.remove()
    assert seen and set(seen) == {torch.float16}
    # Every micro-batch's loss (one per minibatch here, in each of the two updates) went through the gradient
    # scaler, multiplied by its scale (2**16 to start, halved after an overflow).
    assert len(factors) == 2 * len(trainer.minibatch_stats) and all(factor > 1 for factor in factors)
    assert all(torch.isfinite(p).all() for p in trainer.models.trainable.values())
    assert any(not torch.equal(p, before[n]) for n, p in trainer.models.trainable.items() if n in before)


# ---- optimizers -----------------------------------------------------------------------------------------------

def test_optim_builds_transformers_choice_with_the_trainers_groups(tmp_path):
    import bitsandbytes

    # A full fine-tune, so that there are norms (no weight decay) and an embedding (32-bit states, as the
    # Trainer keeps them) among the trained parameters, and matrices big enough for 8-bit states.
    trainer = _trainer(tmp_path / "run", *QUICK, "adapter={method: none}", "train.optim=adamw_8bit",
                       "train.weight_decay=0.1", "train.adam_beta2=0.95")
    optimizer, policy = trainer.optimizer, trainer.models.policy
    assert isinstance(optimizer, bitsandbytes.optim.AdamW) and optimizer.args.optim_bits == 8
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    # The policy's groups first (decay, then none), then the critic's.
    decay, no_decay = optimizer.param_groups[:2]
    assert [group["role"] for group in optimizer.param_groups] == ["policy", "policy", "critic", "critic"]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert id(policy.model.norm.weight) in no_decay_ids and id(policy.model.layers[0].self_attn.q_proj.weight) \
        not in no_decay_ids
    trainer.optimise(trainer.rollout(trainer._prompts_for(1), seed=1))
    assert optimizer.state[policy.model.layers[0].self_attn.q_proj.weight]["state1"].dtype == torch.uint8
    assert optimizer.state[policy.model.embed_tokens.weight]["state1"].dtype == torch.float32

    # PPO's default optim is adamw_torch (unfused torch AdamW, as before PPO took the option), not transformers'
    # adamw_torch_fused; a recipe that names the fused one gets it.
    default = _trainer(tmp_path / "default", *QUICK)
    assert type(default.optimizer) is torch.optim.AdamW and not default.optimizer.defaults["fused"]
    fused = _trainer(tmp_path / "fused", *QUICK, "train.optim=adamw_torch_fused")
    assert type(fused.optimizer) is torch.optim.AdamW and fused.optimizer.defaults["fused"]


# ---- activation checkpointing ---------------------------------------------------------------------------------

# One PPO update's peak memory in a fresh process: PPO's optimise step on a rollout of 16 answers of 192 tokens
# from a random 8-layer model (the demo's width and tokenizer), with checkpointing off, then on. glibc returns
# every freed block of 128 KiB or more (a fixed mmap threshold), so the resident size follows what is held.
PEAK_SCRIPT = r"""
import gc, json, re, sys
from pathlib import Path
from alignkit.recipe.loading import load_recipe
from alignkit.runs.rundir import RunDir
from alignkit.stages.ppo import build_trainer

model_dir, out, *overrides = sys.argv[1:]

def kib(name):
    return int(re.search(rf"^{name}:\s+(\d+)", Path("/proc/self/status").read_text(), re.M).group(1))

def update_peak(checkpointing):
    run = Path(out) / checkpointing
    run.mkdir(parents=True)
    recipe = load_recipe("recipes/demo/ppo.yaml", [f"model.name_or_path={model_dir}", f"train.output_dir={run}",
                                                   f"train.activation_checkpointing={checkpointing}", *overrides])
    trainer = build_trainer(recipe, RunDir(path=run))
    rollout = trainer.rollout(trainer._prompts_for(1), seed=1)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the current size
    before = kib("VmRSS")
    trainer.optimise(rollout)
    return {"peak_mib": (kib("VmHWM") - before) / 1024, "length": rollout.input_ids.shape[1]}

print(json.dumps({checkpointing: update_peak(checkpointing) for checkpointing in ("false", "true")}))
"""


@pytest.fixture
def deeper_random_model(tmp_path, demo_model_path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(demo_model_path)
    config.num_hidden_layers, config.intermediate_size, config.max_position_embeddings = 8, 512, 1024
    torch.manual_seed(0)
    path = tmp_path / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(demo_model_path).save_pretrained(path)
    return path


def test_activation_checkpointing_lowers_the_peak_memory_of_an_update(tmp_path, deeper_random_model):
    overrides = [*FROM_BASE[1:], "train.response_length=192", "train.per_device_train_batch_size=16",
                 "train.num_mini_batches=1", "train.num_ppo_epochs=1", "train.local_rollout_forward_batch_size=16"]
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(deeper_random_model), str(tmp_path / "runs"),
                             *overrides], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072"))
    assert result.returncode == 0, result.stderr[-3000:]
    peaks = json.loads(result.stdout.strip().splitlines()[-1])
    off, on = peaks["false"], peaks["true"]
    assert off["length"] == on["length"] > 192  # the same rollout: prompt + 192 answer tokens
    # Observed: 695 MiB without checkpointing, 97 MiB with (the layers' inputs, then one layer at a time).
    assert on["peak_mib"] < 0.5 * off["peak_mib"], peaks
    assert off["peak_mib"] > 200, peaks  # the activations dominate: the comparison measures them


def test_activation_checkpointing_is_on_in_training_and_off_for_rollouts(tmp_path):
    trainer = _trainer(tmp_path / "run", *QUICK, "train.activation_checkpointing=true")
    base = trainer.models.policy.get_base_model()
    assert base.is_activation_checkpointing
    rollout = trainer.rollout(trainer._prompts_for(1), seed=1)
    assert not base.training  # generate() keeps its KV cache: checkpointing acts in train mode only
    stats = trainer.optimise(rollout)
    assert base.training
    assert stats["policy/ratio_first_minibatch"] == pytest.approx(1.0, abs=1e-5)


# ---- resume_from_checkpoint -----------------------------------------------------------------------------------

def test_killed_run_continues_from_the_checkpoint_named_by_resume_from_checkpoint(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    common = ["ppo", DEMO_PPO, *FROM_BASE, *QUICK, "train.max_steps=6", "train.save_steps=2", "train.logging_steps=1",
              "evaluate.max_samples=4"]
    kill_when_written([*common, f"train.output_dir={first}"], first / "checkpoint-2" / "trainer_state.json",
                      tmp_path / "first.log")
    checkpoint = last_checkpoint(first)
    assert checkpoint is not None and checkpoint.name == "checkpoint-2"

    # true: the run dir's last complete checkpoint.
    args = PPOConfig(output_dir=str(first), resume_from_checkpoint=True)
    from alignkit.stages.ppo.trainer import checkpoint_to_resume

    assert checkpoint_to_resume(args, RunDir(path=first)) == checkpoint

    # A path: a new run dir that starts where the killed run's checkpoint stands, not at update 0.
    resumed = run_cli(*common, f"train.output_dir={second}", f"train.resume_from_checkpoint={checkpoint}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at update 2 of 6 from checkpoint-2" in resumed.stderr
    ran = [line for line in resumed.stderr.splitlines() if "ppo update " in line]
    assert [line.split("ppo update ")[1].split(":")[0] for line in ran] == ["3/6", "4/6", "5/6", "6/6"]
    log = [json.loads(line) for line in (second / "ppo_log.jsonl").read_text().splitlines()]
    assert [entry["update"] for entry in log] == [1, 2, 3, 4, 5, 6]
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["history"]
    assert log[:2] == saved  # the first two updates are the killed run's, as its checkpoint recorded them
    assert json.loads((second / "metrics.json").read_text())["ppo/updates"] == 6


def test_resume_from_checkpoint_names_what_is_missing(tmp_path):
    from alignkit.stages.ppo.trainer import checkpoint_to_resume

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RecipeError, match="holds no complete PPO checkpoint"):
        checkpoint_to_resume(PPOConfig(output_dir=str(empty), resume_from_checkpoint=True), RunDir(path=empty))
    with pytest.raises(RecipeError, match="lacks trainer_state.json, trainable.safetensors, optimizer.pt"):
        checkpoint_to_resume(PPOConfig(output_dir=str(empty), resume_from_checkpoint=str(empty)), RunDir(path=empty))
    # Unset: the run dir's own choice (an unfinished run's last checkpoint) stands.
    chosen = RunDir(path=empty, resume_from=tmp_path / "checkpoint-4")
    assert checkpoint_to_resume(PPOConfig(output_dir=str(empty)), chosen) == tmp_path / "checkpoint-4"


def _rewrite_as_before_critic_groups(trainer, checkpoint: Path) -> list[list[torch.nn.Parameter]]:
    """Rewrite ``checkpoint``'s optimizer.pt and trainer_state.json as PPO wrote them before critic_learning_rate
    (bb4ce4d's trainer): one optimizer from transformers' factory over every trained parameter in the Trainer's
    groups (with weight decay, then without), one schedule stepped as often as ``trainer``'s; each parameter's
    state is ``trainer``'s. Returns those groups."""
    from transformers import Trainer, get_scheduler

    args = trainer.args
    decay: set[int] = set()
    for module in trainer._trained_modules():
        names = set(Trainer.get_decay_parameter_names(None, module))
        decay |= {id(parameter) for name, parameter in module.named_parameters() if name in names}
    groups = [{"params": [p for p in trainer.parameters if id(p) in decay], "weight_decay": args.weight_decay},
              {"params": [p for p in trainer.parameters if id(p) not in decay], "weight_decay": 0.0}]
    optimizer_class, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    optimizer = optimizer_class([group for group in groups if group["params"]], **kwargs)
    total = trainer.updates * args.num_ppo_epochs * args.num_mini_batches
    schedule = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(total),
                             num_training_steps=total)
    for _step in range(trainer.scheduler.last_epoch):
        optimizer.step()  # no gradients: moves nothing, only keeps the schedule's order of calls
        schedule.step()
    for parameter in trainer.parameters:
        optimizer.state[parameter] = trainer.optimizer.state[parameter]
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict(),
                "scaler": trainer.scaler.state_dict()}, checkpoint / "optimizer.pt")
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    del state["reward_statistics"]
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    return [group["params"] for group in optimizer.param_groups]


def test_a_checkpoint_saved_before_the_critic_had_optimizer_groups_of_its_own_resumes(tmp_path):
    """A user upgrading mid-run resumes the older checkpoint: every parameter gets its own optimizer state back,
    the schedule its step, and the critic the critic_learning_rate the resumed recipe now asks for."""
    # A full fine-tune: the policy has norms (no weight decay), so the old groups (decay: policy's then critic's;
    # no decay: policy's then critic's) hold the parameters in another order than the new ones (by role first).
    options = (*QUICK, "adapter={method: none}", "train.weight_decay=0.1", "train.learning_rate=1e-4",
               "train.lr_scheduler_type=linear", "train.max_steps=3")
    trainer = _trainer(tmp_path / "run", *options)
    trainer.optimise(trainer.rollout(trainer._prompts_for(1), seed=1))
    trainer._save_checkpoint(1)
    checkpoint = tmp_path / "run" / "checkpoint-1"
    old_groups = _rewrite_as_before_critic_groups(trainer, checkpoint)
    new_order = [id(p) for group in trainer.optimizer.param_groups for p in group["params"]]
    assert len(old_groups) == 2 and [id(p) for group in old_groups for p in group] != new_order

    resumed = _trainer(tmp_path / "run", *options, "train.critic_learning_rate=3e-4")
    resumed.run.resume_from = checkpoint
    assert resumed._resume() == 1
    original = dict(zip(trainer.models.trainable, trainer.parameters))
    for name, parameter in resumed.models.trainable.items():
        mine, theirs = resumed.optimizer.state[parameter], trainer.optimizer.state[original[name]]
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[key], theirs[key]) for key in mine), name
    steps = trainer.scheduler.last_epoch
    assert steps == 4 and resumed.scheduler.last_epoch == steps
    factor = trainer.optimizer.param_groups[0]["lr"] / 1e-4  # the linear schedule's, after 4 of 12 steps
    assert factor == pytest.approx(8 / 12)
    by_role = {(group["role"], group["weight_decay"]): (group["lr"], group["initial_lr"])
               for group in resumed.optimizer.param_groups}
    expected = {("policy", 0.1): (1e-4 * factor, 1e-4), ("policy", 0.0): (1e-4 * factor, 1e-4),
                ("critic", 0.1): (3e-4 * factor, 3e-4), ("critic", 0.0): (3e-4 * factor, 3e-4)}
    assert by_role.keys() == expected.keys() and all(by_role[key] == pytest.approx(expected[key]) for key in expected)
    assert resumed.scheduler.get_last_lr() == [group["lr"] for group in resumed.optimizer.param_groups]
    # It trains on from there: the schedule and every parameter's step count go on from 4.
    resumed.optimise(resumed.rollout(resumed._prompts_for(2), seed=2))
    assert resumed.scheduler.last_epoch == 8
    assert all(float(state["step"]) == 8 for state in resumed.optimizer.state.values())

    # A checkpoint whose groups do not hold this run's parameters is refused, with what to do.
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    dropped = saved["optimizer"]["param_groups"][-1]["params"].pop()
    saved["optimizer"]["state"].pop(dropped, None)
    torch.save(saved, checkpoint / "optimizer.pt")
    sizes = [len(group) for group in old_groups]
    with pytest.raises(RunDirError, match=rf"groups of \[{sizes[0]}, {sizes[1] - 1}\], but this run trains "
                                          rf"{sum(sizes)} in groups of \[{sizes[0]}, {sizes[1]}\]\. Resume it with"):
        resumed._resume()


# ---- options for large runs (issue 20) ------------------------------------------------------------------------

def test_n_samples_per_prompt_answers_every_prompt_that_many_times(tmp_path):
    trainer = _trainer(tmp_path / "run", *QUICK, "train.n_samples_per_prompt=4", "train.response_length=8",
                       "train.max_steps=-1", "train.total_episodes=64")
    assert trainer.updates == 2  # total_episodes counts answers: 64 / (8 prompts x 4)
    prompts = trainer._prompts_for(1)
    rollout = trainer.rollout(prompts, seed=1)
    assert len(prompts) == 8 and len(rollout.completions) == 32
    assert rollout.responses.shape[0] == rollout.advantages.shape[0] == rollout.scores.shape[0] == 32
    assert rollout.prompts == [row["prompt"] for row in prompts for _ in range(4)]  # a prompt's answers together
    # Each answer has noise of its own: a prompt's answers differ (the same noise would repeat one answer 4 times).
    groups = [rollout.completions[i:i + 4] for i in range(0, 32, 4)]
    assert sum(len(set(group)) > 1 for group in groups) >= 4, groups
    # The whole rollout batch is trained on: 2 minibatches of 16 answers per epoch.
    assert trainer.args.local_mini_batch_size == 16
    stats = trainer.optimise(rollout)
    assert len(trainer.minibatch_stats) == 2 * 2 and stats["policy/ratio_first_minibatch"] == pytest.approx(1, abs=1e-5)


def test_critic_warm_up_moves_the_critic_and_leaves_the_policy(tmp_path):
    trainer = _trainer(tmp_path / "run", *QUICK, "train.freezing_actor_steps=2", "train.max_steps=3",
                       "train.learning_rate=1e-3", "train.critic_learning_rate=2e-3", "train.lr_scheduler_type=linear",
                       "train.save_strategy=no", "evaluate.max_samples=4")
    # The critic's groups step at critic_learning_rate, the policy's at learning_rate.
    assert {(group["role"], group["initial_lr"]) for group in trainer.optimizer.param_groups} == {
        ("policy", 1e-3), ("critic", 2e-3)}
    # The policy's (linearly decaying) schedule starts with its first step, 2 updates x 4 optimizer steps late; it
    # is at full learning rate throughout the warm-up, so only the warm-up keeps the policy still.
    groups = trainer.optimizer.param_groups
    schedule = {group["role"]: trainer.scheduler.lr_lambdas[index] for index, group in enumerate(groups)}
    assert [schedule["policy"](step) for step in range(8, 14)] == [schedule["critic"](step) for step in range(6)]
    assert schedule["policy"](0) == schedule["policy"](8) == schedule["critic"](0) == 1.0 > schedule["critic"](8)

    def snapshot(role: str) -> dict[str, torch.Tensor]:
        return {name: parameter.detach().clone() for name, parameter in trainer.models.trainable.items()
                if name.startswith("policy.") == (role == "policy")}

    weights = [{"policy": snapshot("policy"), "critic": snapshot("critic")}]
    log = trainer._log

    def log_and_snapshot(stats):
        log(stats)
        weights.append({"policy": snapshot("policy"), "critic": snapshot("critic")})

    trainer._log = log_and_snapshot
    trainer.train()

    def moved(role: str, update: int) -> bool:
        before, after = weights[update - 1][role], weights[update][role]
        return any(not torch.equal(before[name], after[name]) for name in before)

    assert [moved("policy", update) for update in (1, 2, 3)] == [False, False, True]
    assert [moved("critic", update) for update in (1, 2, 3)] == [True, True, True]
    assert [entry["policy/frozen"] for entry in trainer.history] == [1.0, 1.0, 0.0]
    # The frozen policy is the one that sampled, through every minibatch of the warm-up.
    assert all(entry["policy/ratio"] == pytest.approx(1.0, abs=1e-6) for entry in trainer.history[:2])


def test_reward_normalisation_is_by_source_and_its_statistics_go_with_the_checkpoint(tmp_path):
    """Two sources on scales 100x apart; after two rollouts each source's running statistics are those of every
    answer it scored, the summed score is standardised too, and a resumed trainer restores them."""
    sources = ("reward.sources=[{function: signal_rewards:answer_length_reward}, "
               "{function: signal_rewards:answer_length_reward, weight: 100}]")
    options = ("train.normalize_reward=true", "train.normalize_reward_per_source=true",
               "train.reward_clip_range=[-1.5, 1.5]")
    trainer = _trainer(tmp_path / "run", *QUICK, *options, start=(*FROM_BASE, sources))
    rollouts = [trainer.rollout(trainer._prompts_for(update), seed=update) for update in (1, 2)]
    seen = torch.cat([rollout.source_rewards for rollout in rollouts])
    scorer = trainer.scorer
    assert scorer.per_source.count == scorer.total.count == 16
    assert torch.allclose(scorer.per_source.mean, seen.mean(0)) and torch.allclose(scorer.per_source.std,
                                                                                 seen.std(0, correction=0))
    contributions = scorer.per_source.normalize(seen)
    assert torch.allclose(contributions.mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(contributions.std(0, correction=0), torch.ones(2, dtype=torch.float64))
    first = rollouts[0]
    # One batch seen: the standardised sum of the first rollout has mean 0 and std 1 (before clipping to 1.5).
    standardised = first.scores[~first.clipped]
    assert first.scores.abs().max() <= 1.5 and abs(float(first.scores.mean())) < 0.3
    assert len(standardised) >= 6
    # The logged reward stays on the sources' scale: 101 x the answer length / 10.
    assert torch.allclose(first.raw_rewards, 101 * first.source_rewards[:, 0].float())
    stats = trainer._rollout_stats(first)
    assert stats["reward"] == pytest.approx(float(first.raw_rewards.mean()))
    assert stats["reward/answer_length_reward_2/running_std"] > 0 and "reward/running_mean" in stats

    trainer._save_checkpoint(2)
    resumed = _trainer(tmp_path / "run", *QUICK, *options, start=(*FROM_BASE, sources))
    resumed.run.resume_from = tmp_path / "run" / "checkpoint-2"
    resumed._resume()
    assert resumed.scorer.state_dict() == scorer.state_dict()


def test_stop_strings_cut_answers_in_a_rollout(tmp_path):
    """The bare demo base answers with words; 'e' ends most of them early. The answers end before it and count as
    finished: the missing-EOS penalty spares them."""
    trainer = _trainer(tmp_path / "run", *QUICK, "train.stop_strings=[e]", "train.missing_eos_penalty=1.0",
                       "train.response_length=12")
    rollout = trainer.rollout(trainer._prompts_for(1), seed=1)
    eos = trainer.tokenizer.eos_token_id
    by_string = [row for row in range(8) if rollout.ends_with_eos[row] and
                 rollout.responses[row, int(rollout.mask[row].sum()) - 1] != eos]
    assert len(by_string) >= 3, rollout.completions
    assert all("e" not in completion for completion in rollout.completions)
    for row in by_string:
        last = int(rollout.mask[row].sum()) - 1
        assert "e" in trainer.tokenizer.decode(rollout.responses[row, last])  # the token that completed the stop
    penalty = torch.where(rollout.ends_with_eos, 0.0, 1.0)
    assert torch.allclose(rollout.raw_rewards, rollout.source_rewards[:, 0].float() - penalty)
    # The held-out answers end at the same stops before they are scored.
    read: list[str] = []
    score = trainer.reward.functions[0]
    trainer.reward.functions[0] = lambda prompts, completions, **columns: read.extend(completions) or score(
        prompts=prompts, completions=completions, **columns)
    trainer.evaluate()
    assert len(read) == 16 and all("e" not in completion for completion in read), read
