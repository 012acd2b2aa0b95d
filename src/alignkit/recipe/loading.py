"""Recipes: YAML files (with ``extends`` and ``key=value`` overrides) validated into a :class:`Recipe`.

A recipe is data only: YAML is safe-loaded and nothing in it is executed. Validation happens before any
model or dataset is touched, and every problem is reported as one :class:`RecipeError` naming the key.

Sections:
  ``stage``     which stage runs (``sft``, ...; see :mod:`alignkit.stages`)
  ``model``     :class:`ModelSettings`
  ``adapter``   ``method`` plus the peft config's own arguments (see :mod:`alignkit.models.adapters`)
  ``data``      :class:`DataSettings`
  ``train``     the stage's TRL config (``SFTConfig`` for sft), argument names unchanged
  ``evaluate``  :class:`EvaluateSettings`, generation-based evaluation after training
Stages may declare further sections of their own.

Beyond keys and types, validation checks what a run would otherwise find out late: values against the
rules of :data:`RANGES` (what must be positive or a fraction) and :data:`CHOICES` (report_to, data formats),
a run dir that is a directory of its own (:func:`check_output_dir`), and every TRL config the stage builds,
built here as the run builds it (TRL's and transformers' own checks across options), without setting up
devices or processes.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import math
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alignkit import stages
from alignkit.data.formats import FORMATS
from alignkit.errors import RecipeError
from alignkit.models import adapters
from alignkit.recipe import schema
from alignkit.recipe.schema import Raw
from alignkit.recipe.settings import (
    DataSettings,
    EvaluateSettings,
    ModelSettings,
    is_future_run,
    is_run_with_adapter,
)
from alignkit.stages import Stage

# --------------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------------

COMMON_SECTIONS = ("stage", "model", "adapter", "data", "train", "evaluate")


@dataclass
class Recipe:
    """A validated recipe. ``train`` and ``adapter`` hold typed values for the library configs."""

    stage: str
    model: ModelSettings
    data: DataSettings
    adapter: dict[str, Any] = field(default_factory=lambda: {"method": "none"})
    train: dict[str, Any] = field(default_factory=dict)
    evaluate: EvaluateSettings | None = None
    sections: dict[str, Any] = field(default_factory=dict)  # stage-specific sections, validated
    source: Path | None = None  # the recipe file, for messages

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data; loading it back gives the same run."""
        out: dict[str, Any] = {
            "stage": self.stage,
            "model": schema.to_plain(self.model),
            "adapter": schema.to_plain(self.adapter),
            "data": schema.to_plain(self.data),
            "train": schema.to_plain(self.train),
        }
        if self.evaluate is not None:
            out["evaluate"] = schema.to_plain(self.evaluate)
        out.update({name: schema.to_plain(value) for name, value in self.sections.items()})
        return out

    @property
    def output_dir(self) -> Path:
        return Path(self.train["output_dir"])


def load_recipe(path: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """Read ``path`` (following ``extends``), apply ``key=value`` overrides, and validate."""
    path = Path(path)
    raw = load_raw(path)
    for override in overrides:
        apply_override(raw, override)
    return validate(raw, source=path)


def load_raw(path: Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The recipe at ``path`` as a dict, with its ``extends`` chain deep-merged (this file wins)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}" + (f" (extended by {_chain[-1]})" if _chain else ""))
    resolved = path.resolve()
    if resolved in _chain:
        raise RecipeError(f"recipe {path} extends itself: {' -> '.join(str(p) for p in (*_chain, resolved))}")
    try:
        data = schema.load_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path} is not valid YAML: {schema.yaml_problem(err)}") from None
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path} is not valid YAML: not UTF-8 text ({err})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecipeError(f"{path}: 'extends' expects a path to another recipe, got {parent!r}")
    # `extends` is relative to the file that says it, so recipe folders can be moved as a whole.
    base = load_raw(path.parent / parent, (*_chain, resolved))
    return deep_merge(base, data)


def deep_merge(base: Mapping, update: Mapping) -> dict:
    """Merge ``update`` into a copy of ``base``: mappings merge key by key, anything else is replaced."""
    merged = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply ``a.b.c=value`` to ``raw``. The value stays text until validation types it by its field."""
    key, sep, value = override.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise RecipeError(
            f"bad override '{override}': expected section.key=value, e.g. train.learning_rate=1e-4"
        )
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise RecipeError(f"bad override '{override}': '{where}' is not a section (it holds {child!r})")
        node = child
    if len(parts) == 1 and (value.strip() in ("null", "~") or value.lstrip().startswith("{")):
        # A whole section replaced (`adapter={method: none}`) or switched off (`evaluate=null`).
        try:
            node[parts[0]] = schema.load_yaml(value)
        except yaml.YAMLError as err:
            raise RecipeError(f"bad override '{override}': not a YAML value: {schema.yaml_problem(err)}") from None
        return
    node[parts[-1]] = Raw(value)


def validate(raw: Mapping[str, Any], source: Path | None = None) -> Recipe:
    """Check every key and type of ``raw`` and build the Recipe. Loads the stage's config class, no model."""
    where = str(source) if source else "recipe"
    try:
        return _validate(raw, source)
    except RecipeError as err:
        raise RecipeError(f"{where}: {err}") from None


def _validate(raw: Mapping[str, Any], source: Path | None) -> Recipe:
    if "stage" not in raw:
        raise RecipeError(f"missing 'stage' (one of: {', '.join(stages.STAGES)})")
    if raw["stage"] == "pipeline":
        raise RecipeError("this is a pipeline recipe: run it with `alignkit pipeline FILE`")
    stage = stages.get_stage(schema.coerce(raw["stage"], str, "stage"))
    schema.check_keys(raw, [*COMMON_SECTIONS, *stage.sections], f"the top level of the {stage.name} recipe")
    # A stage section set to null (`reward=null` on the command line) is no section.
    raw = {key: value for key, value in raw.items() if not (key in stage.sections and value is None)}
    for required in ("model", "data", *stage.required_sections):
        if required not in raw:
            raise RecipeError(f"missing section '{required}'")
    data = schema.build(DataSettings, raw["data"], "data")
    for group in stage.required_data:
        if not getattr(data, group):
            raise RecipeError(f"the {stage.name} stage needs data.{group}: at least one source")

    train = schema.check_dict(stage.config_class(raw), raw.get("train") or {}, "train")
    if stage.check_train is not None:
        stage.check_train(train)
    train.setdefault("output_dir", str(Path("runs") / (source.stem if source else stage.name)))
    if "report_to" in getattr(stage.config_class(raw), "__dataclass_fields__", {}):
        # TensorBoard event files in the run dir (offline, nothing leaves the machine) unless the recipe says.
        train.setdefault("report_to", ["tensorboard"])
    evaluate = raw.get("evaluate")
    recipe = Recipe(
        stage=stage.name,
        model=schema.build(ModelSettings, raw["model"], "model"),
        adapter=adapters.validate_adapter(raw.get("adapter") or {"method": "none"}),
        data=data,
        train=train,
        evaluate=None if evaluate is None else schema.build(EvaluateSettings, evaluate, "evaluate"),
        sections={name: schema.build(cls, raw[name], name) for name, cls in stage.sections.items() if name in raw},
        source=source,
    )
    _check_model_and_adapter(recipe)
    _check_streaming(recipe)
    adapters.check_adapter(recipe.adapter, tokenizer_path=recipe.model.tokenizer or recipe.model.name_or_path)
    check_output_dir(recipe.train["output_dir"])
    check_values(recipe.to_dict(), stage)
    for where, config_class, values in stage.configs(recipe):
        check_values(values, stage, shown=where, matched="train")
        build_config(config_class, values, where)
    return recipe


def _check_streaming(recipe: Recipe) -> None:
    """A streamed dataset has no length: the run needs a number of steps, and a held-out part, a row count."""
    if not recipe.data.streaming:
        return
    if recipe.stage != "sft":
        raise RecipeError(f"data.streaming is for the sft stage (large chat or raw-text corpora); the {recipe.stage} "
                          "stage prepares its data in memory: remove data.streaming")
    if (recipe.train.get("max_steps") or -1) <= 0:
        raise RecipeError("data.streaming reads the data as the run goes, so its length is unknown: set "
                          "train.max_steps")
    if 0 < recipe.data.eval_size < 1:
        raise RecipeError(f"data.eval_size={recipe.data.eval_size} is a fraction of a streamed dataset whose length "
                          "is unknown: give a row count (e.g. data.eval_size=200) or data.eval sources")


def _check_model_and_adapter(recipe: Recipe) -> None:
    quantization, method = recipe.model.quantization, recipe.adapter["method"]
    if method == "qlora" and (quantization is None or quantization.bits != 4):
        raise RecipeError("adapter method 'qlora' needs a 4-bit base: set model.quantization: {bits: 4} "
                          "(or use method 'lora')")
    if is_run_with_adapter(recipe.model.name_or_path):
        if recipe.model.run_adapter == "continue" and method != "none":
            raise RecipeError(f"model.name_or_path is a run dir with an adapter and model.run_adapter is 'continue': "
                              f"training goes on with that adapter, so remove adapter.method ({method}) or set "
                              f"model.run_adapter: merge to fold it into the base and attach a new one")
        if recipe.model.run_adapter == "merge" and quantization is not None:
            raise RecipeError("model.run_adapter 'merge' folds the run's adapter into the base weights, which a "
                              "quantised base cannot hold exactly: use run_adapter: continue or drop "
                              "model.quantization")
        return
    if quantization is not None and method == "none" and not is_future_run(recipe.model.name_or_path):
        raise RecipeError(QUANTISED_FULL_FINE_TUNE)


QUANTISED_FULL_FINE_TUNE = ("a quantised model cannot be fully fine-tuned: set adapter.method to qlora or lora, "
                            "or model.quantization to null")


# --------------------------------------------------------------------------------------------------
# Checks beyond types: value rules, the run dir, and the stage's TRL configs built as the run builds them
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """Numbers from ``low`` to ``high`` (bounds included unless open; None: unbounded), whole ones only if
    ``whole``. ``label`` replaces the generated description (for a single special value)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    whole: bool = False
    label: str = ""

    def admits(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return False
        return not self.whole or float(value).is_integer()

    def __str__(self) -> str:
        if self.label:
            return self.label
        whole = "a whole number " if self.whole else ""
        if self.high is None:
            return f"{whole}{'>' if self.low_open else '>='} {self.low}"
        return f"{whole}in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


def above(low: float) -> Range:
    """Numbers > ``low``."""
    return Range(low=low, low_open=True)


def at_least(low: float) -> Range:
    """Numbers >= ``low``."""
    return Range(low=low)


def fraction(*, low_open: bool = False, high_open: bool = False, high: float = 1) -> Range:
    """Numbers from 0 to ``high`` (1 unless given), each bound included unless open."""
    return Range(low=0, high=high, low_open=low_open, high_open=high_open)


# What must be positive, at least one, or a fraction. Keys are patterns over the dotted path of a value in the
# resolved recipe with list indexes left out (``data.*.max_rows`` covers data.train[0].max_rows and
# data.eval[1].max_rows; ``*`` matches dots too). Rules on ``train.<option>`` apply to every TRL config the
# stage builds (rlaif.revision.sft too); a config without the option never meets its rule. A value passes if
# one of its ranges admits it; null always passes (the field's type says whether it may be null).
RANGES: dict[str, tuple[Range, ...]] = {
    # train: the stage's TRL config, options named as in transformers and TRL
    "train.learning_rate": (above(0),),
    "train.per_device_*_batch_size": (at_least(1),),
    "train.gradient_accumulation_steps": (at_least(1),),
    "train.max_steps": (at_least(1), Range(-1, -1, label="-1 (the default: train for num_train_epochs)")),
    "train.num_train_epochs": (above(0),),
    "train.max_length": (at_least(1),),
    "train.max_completion_length": (at_least(1),),
    "train.logging_steps": (above(0),),
    "train.save_steps": (above(0),),
    "train.eval_steps": (above(0),),
    "train.weight_decay": (at_least(0),),
    "train.max_grad_norm": (at_least(0),),
    "train.seed": (at_least(0),),
    "train.data_seed": (at_least(0),),
    "train.beta": (at_least(0),),
    "train.label_smoothing": (fraction(high=0.5, high_open=True),),
    "train.temperature": (above(0),),
    "train.num_generations": (at_least(2),),  # GRPO and RLOO compare the answers to one prompt
    "train.response_length": (at_least(1),),
    "train.total_episodes": (at_least(1),),
    "train.kl_coef": (at_least(0),),
    "train.vf_coef": (at_least(0),),
    "train.cliprange": (above(0),),
    "train.cliprange_value": (above(0),),
    "train.gamma": (fraction(),),
    "train.lam": (fraction(),),
    # adapter: the peft config of adapter.method
    "adapter.r": (at_least(1),),
    "adapter.lora_alpha": (above(0),),
    "adapter.lora_dropout": (fraction(high_open=True),),
    "adapter.num_virtual_tokens": (at_least(1),),
    # data (weights and a negative eval_size are refused where they are defined, in DataSource / DataSettings)
    "data.eval_size": (fraction(high_open=True), Range(low=1, whole=True)),
    "data.seed": (at_least(0),),
    "data.*.max_rows": (at_least(1),),
    # generation, wherever it is set (evaluate, rest, rlaif, rlaif.revision)
    "*generation.max_new_tokens": (at_least(1),),
    "*generation.temperature": (above(0),),
    "*generation.top_p": (fraction(low_open=True),),
    "*generation.top_k": (at_least(0),),
    "*generation.num_beams": (at_least(1),),
    "*generation.repetition_penalty": (above(0),),
    "*generation.batch_size": (at_least(1),),
    "evaluate.max_samples": (at_least(1),),
    "evaluate.report_samples": (at_least(0),),
    "evaluate.tie_margin": (fraction(high=0.5, high_open=True),),
    "*judge.max_length": (at_least(1),),
    "reward.sources.batch_size": (at_least(1),),
}


def _integrations(stage: Stage) -> Collection[str]:
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    return ("all", "none", *INTEGRATION_TO_CALLBACK)


def _formats(stage: Stage) -> Collection[str]:
    return ("auto", *FORMATS[stage.rows])


# String values whose choices only the libraries or the stage know (the field types say only "a string"), as
# patterns like RANGES'. String fields with choices in their metadata or an enum type (optim,
# lr_scheduler_type, the strategies) are checked by alignkit.recipe.schema; Literal fields (judge kind) by their type.
CHOICES: dict[str, Callable[[Stage], Collection[str]]] = {
    "train.report_to": _integrations,  # transformers refuses an unknown one only when the trainer starts
    "data.*.format": _formats,
}


def check_values(values: Mapping[str, Any], stage: Stage, shown: str = "", matched: str | None = None) -> None:
    """Check the values in ``values`` against :data:`RANGES` and :data:`CHOICES`. Their paths are shown under
    ``shown`` and matched under ``matched`` (default: ``shown``), e.g. a config's values as ``train``."""
    for path, key, value in _leaves(values, shown, shown if matched is None else matched):
        if isinstance(value, str):
            for pattern, allowed in CHOICES.items():
                if fnmatch.fnmatchcase(key, pattern):
                    schema.check_choice(value, tuple(allowed(stage)), path)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            for pattern, ranges in RANGES.items():
                if fnmatch.fnmatchcase(key, pattern) and not any(r.admits(value) for r in ranges):
                    raise RecipeError(f"'{path}' must be {' or '.join(map(str, ranges))}, got {value}")


def _leaves(value: Any, path: str, key: str) -> Iterator[tuple[str, str, Any]]:
    """(shown path, matched key, value) of every leaf of plain data; list items share their list's key."""
    if isinstance(value, Mapping):
        for name, child in value.items():
            yield from _leaves(child, f"{path}.{name}" if path else str(name), f"{key}.{name}" if key else str(name))
    elif isinstance(value, (list, tuple)):
        for index, child in enumerate(value):
            yield from _leaves(child, f"{path}[{index}]", key)
    else:
        yield path, key, getattr(value, "value", value)  # an enum by its value


def check_output_dir(value: str | None, key: str = "train.output_dir") -> None:
    """Refuse a run dir that is not a directory of its own: empty, the filesystem root, the current directory
    or one above it, the home directory or one above it. A run writes into its run dir and ``--overwrite``
    empties it, so it must never be a place that holds other things."""
    if value is None or not str(value).strip():
        raise RecipeError(f"{key} is empty: name a directory of its own, e.g. runs/my-run")
    path = Path(value).expanduser().resolve()
    what = shared_directory(path)
    if what is not None:
        raise RecipeError(f"{key} '{value}' is {what} ({path}); alignkit writes into this directory and "
                          "--overwrite may empty it: name a directory of its own, e.g. runs/my-run")


def shared_directory(path: Path) -> str | None:
    """What ``path`` (resolved) is, if it is a directory that holds more than one run's files."""
    cwd = Path.cwd().resolve()
    if path == Path(path.anchor):
        return "the filesystem root"
    if path == cwd or path in cwd.parents:
        return "the current directory" if path == cwd else "a directory above the current directory"
    try:
        home = Path.home().resolve()
    except RuntimeError:  # no home directory (HOME unset and no passwd entry): nothing to protect
        return None
    if path == home or path in home.parents:
        return "your home directory" if path == home else "a directory above your home directory"
    return None


# Options whose construction-time checks concern the machine, not the recipe (tf32 needs an Ampere GPU,
# deepspeed an installed DeepSpeed and its JSON file): a recipe for a cluster validates on a laptop. The run
# checks them when it builds its config on the machine that runs it.
MACHINE_OPTIONS = ("tf32", "deepspeed")


def build_config(config_class: type, values: Mapping[str, Any], where: str = "train") -> Any:
    """``config_class(**values)`` as a check: TRL's and transformers' checks across options run, as a
    RecipeError naming the keys the message names. Nothing is created (no directory, no process group, no
    accelerate state): see :func:`_no_devices`."""
    values = {key: value for key, value in copy.deepcopy(dict(values)).items() if key not in MACHINE_OPTIONS}
    try:
        with _no_devices():
            return config_class(**values)
    except (ValueError, TypeError, NotImplementedError, OSError) as err:
        raise RecipeError(schema.config_error(err, config_class, where)) from None


@contextlib.contextmanager
def _no_devices() -> Iterator[None]:
    """While a config is built as a check, ``TrainingArguments`` (every TRL config is one) neither sets up the
    devices nor asks whether this machine has bf16.

    Building one resets accelerate's process state and creates a new one, which joins the process group under
    a launcher (``TrainingArguments._setup_devices``): a check must leave the process as it found it. The
    bf16 check (``_validate_args``) fails on a machine without a bf16 GPU, which is the run's machine's
    business, not the recipe's. Both are replaced on the class, not a subclass, so that a config that builds
    another inside its own checks (PPOConfig compares itself with a plain TrainingArguments) is covered too.
    """
    import torch
    from transformers import TrainingArguments

    originals = {name: TrainingArguments.__dict__[name] for name in ("_setup_devices", "_validate_args")}
    validate_args = originals["_validate_args"]

    def setup_no_devices(self) -> torch.device:
        self.distributed_state, self._n_gpu = None, 0  # what the properties that follow read
        return torch.device("cpu")

    def validate_args_on_any_machine(self) -> None:
        use_cpu, self.use_cpu = self.use_cpu, True  # the bf16 hardware check is skipped for CPU runs
        try:
            validate_args(self)
        finally:
            self.use_cpu = use_cpu

    TrainingArguments._setup_devices = property(setup_no_devices)
    TrainingArguments._validate_args = validate_args_on_any_machine
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(TrainingArguments, name, original)
