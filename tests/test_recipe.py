"""Recipes: ``extends``, ``key=value`` overrides, typed validation with did-you-mean errors, and the CLI / make
entry points that report recipe problems as one ``error:`` line (exit code 2, no traceback)."""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import RECIPES, REPO, run_cli

from alignkit.data import check_sources
from alignkit.errors import DataError, RecipeError
from alignkit.recipe.loading import Recipe, apply_override, load_recipe
from alignkit.recipe.schema import Raw
from alignkit.recipe.settings import DataSettings, DataSource, EvaluateSettings, QuantizationSettings

DEMO_SFT = RECIPES / "demo" / "sft.yaml"

MINIMAL = """\
stage: sft
model: {name_or_path: demo:tiny-llama}
data: {train: [demo:reverse/sft]}
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def recipe_error(path: Path, *overrides: str) -> str:
    """The message of the RecipeError that loading ``path`` with ``overrides`` raises."""
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return str(info.value)


# --------------------------------------------------------------------------------------------------
# extends
# --------------------------------------------------------------------------------------------------


def test_demo_recipe_merges_its_base() -> None:
    recipe = load_recipe(DEMO_SFT)
    assert isinstance(recipe, Recipe)
    assert recipe.stage == "sft"
    assert recipe.source == DEMO_SFT
    # From _base/demo-sft.yaml and the _base/demo.yaml it extends.
    assert recipe.model.name_or_path == "demo:tiny-llama"
    assert recipe.model.dtype == "float32"
    assert [(s.path, s.split) for s in recipe.data.train] == [("demo:reverse/sft", "train")]
    assert [(s.path, s.split) for s in recipe.data.eval] == [("demo:reverse/sft", "test")]
    assert recipe.evaluate is not None
    assert recipe.evaluate.generation.max_new_tokens == 16
    # From the child only.
    assert recipe.adapter["method"] == "lora"
    assert recipe.adapter["r"] == 16
    assert recipe.adapter["lora_dropout"] == 0.0
    # `train` is in both files: merged key by key, not replaced.
    assert recipe.train["learning_rate"] == pytest.approx(3e-3)
    assert recipe.train["max_steps"] == 800
    assert recipe.train["output_dir"] == "runs/demo-sft"
    assert recipe.train["bf16"] is False
    assert recipe.train["max_length"] == 64
    assert recipe.train["assistant_only_loss"] is True
    assert recipe.output_dir == Path("runs/demo-sft")


def test_child_values_win_and_nested_mappings_merge(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", """\
        stage: sft
        model: {name_or_path: demo:tiny-llama, dtype: float32}
        data:
          train: [demo:reverse/sft]
          seed: 1
          system_prompt: be brief
        train: {max_steps: 10, learning_rate: 0.1, logging_steps: 5}
        evaluate:
          metrics: [exact_match, rouge]
          generation: {max_new_tokens: 8, num_beams: 2}
    """)
    child = write(tmp_path / "child.yaml", """\
        extends: base.yaml
        model: {dtype: bfloat16}
        data: {seed: 7}
        train: {max_steps: 20}
        evaluate:
          metrics: [bleu]
          generation: {do_sample: true}
    """)
    recipe = load_recipe(child)
    assert recipe.model.name_or_path == "demo:tiny-llama"
    assert recipe.model.dtype == "bfloat16"
    assert recipe.data.seed == 7
    assert recipe.data.system_prompt == "be brief"
    assert [s.path for s in recipe.data.train] == ["demo:reverse/sft"]
    assert recipe.train["max_steps"] == 20
    assert recipe.train["learning_rate"] == pytest.approx(0.1)
    assert recipe.train["logging_steps"] == 5
    assert recipe.evaluate is not None
    assert recipe.evaluate.metrics == ["bleu"]  # a list is replaced, not concatenated
    # Two levels down: both files' keys survive.
    assert recipe.evaluate.generation.max_new_tokens == 8
    assert recipe.evaluate.generation.num_beams == 2
    assert recipe.evaluate.generation.do_sample is True


def test_extends_is_relative_to_the_recipe_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "recipes" / "_base" / "root.yaml", MINIMAL + "train: {max_steps: 3, logging_steps: 1}\n")
    write(tmp_path / "recipes" / "_base" / "middle.yaml", "extends: root.yaml\ntrain: {max_steps: 4}\n")
    write(tmp_path / "recipes" / "exp" / "leaf.yaml", "extends: ../_base/middle.yaml\ntrain: {seed: 5}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # nothing resolves against the working directory
    recipe = load_recipe(tmp_path / "recipes" / "exp" / "leaf.yaml")
    assert recipe.model.name_or_path == "demo:tiny-llama"
    assert recipe.train["max_steps"] == 4
    assert recipe.train["logging_steps"] == 1
    assert recipe.train["seed"] == 5


def test_extends_cycle_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", MINIMAL + "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\ntrain: {max_steps: 1}\n")
    message = recipe_error(tmp_path / "a.yaml")
    assert "extends itself" in message
    assert "a.yaml" in message and "b.yaml" in message


def test_recipe_extending_itself_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "self.yaml", MINIMAL + "extends: ./self.yaml\n")
    assert "extends itself" in recipe_error(path)


def test_missing_parent_names_it_and_the_child(tmp_path: Path) -> None:
    child = write(tmp_path / "child.yaml", MINIMAL + "extends: nowhere/base.yaml\n")
    message = recipe_error(child)
    assert "recipe not found" in message
    assert str(tmp_path / "nowhere" / "base.yaml") in message
    assert "extended by" in message


def test_extends_must_be_a_path(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", MINIMAL + "extends: [a.yaml, b.yaml]\n")
    assert "'extends' expects a path" in recipe_error(path)


# --------------------------------------------------------------------------------------------------
# overrides
# --------------------------------------------------------------------------------------------------


def test_override_learning_rate_is_a_float() -> None:
    recipe = load_recipe(DEMO_SFT, ["train.learning_rate=1e-4"])
    assert type(recipe.train["learning_rate"]) is float
    assert recipe.train["learning_rate"] == 1e-4


def test_override_adapter_rank_is_an_int() -> None:
    recipe = load_recipe(DEMO_SFT, ["adapter.r=8"])
    assert type(recipe.adapter["r"]) is int
    assert recipe.adapter["r"] == 8
    assert recipe.adapter["lora_alpha"] == 32  # the rest of the section is kept


def test_override_of_a_string_field_stays_a_string() -> None:
    recipe = load_recipe(DEMO_SFT, ["model.name_or_path=123"])
    assert recipe.model.name_or_path == "123"
    assert type(recipe.model.name_or_path) is str  # not a leftover Raw either


@pytest.mark.parametrize(("text", "expected"), [("true", True), ("false", False), ("True", True), ("off", False)])
def test_override_bool(text: str, expected: bool) -> None:
    recipe = load_recipe(DEMO_SFT, [f"train.packing={text}"])
    assert recipe.train["packing"] is expected


def test_override_bool_rejects_other_words() -> None:
    message = recipe_error(DEMO_SFT, "train.packing=maybe")
    assert "'train.packing' expects true or false" in message


def test_override_null() -> None:
    recipe = load_recipe(DEMO_SFT, ["model.revision=main"])
    assert recipe.model.revision == "main"
    recipe = load_recipe(DEMO_SFT, ["model.revision=null"])
    assert recipe.model.revision is None


def test_override_list() -> None:
    recipe = load_recipe(DEMO_SFT, ["evaluate.metrics=[exact_match,rouge]"])
    assert recipe.evaluate is not None
    assert recipe.evaluate.metrics == ["exact_match", "rouge"]
    assert all(type(m) is str for m in recipe.evaluate.metrics)


def test_override_list_of_sources() -> None:
    recipe = load_recipe(DEMO_SFT, ["data.train=[{path: demo:reverse/sft, weight: 0.5}, demo:reverse/sft]"])
    assert [(s.path, s.weight) for s in recipe.data.train] == [("demo:reverse/sft", 0.5), ("demo:reverse/sft", 1.0)]


def test_override_value_may_contain_equals_sign() -> None:
    recipe = load_recipe(DEMO_SFT, ["data.system_prompt=a=b"])
    assert recipe.data.system_prompt == "a=b"


def test_override_creates_new_nested_sections(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", MINIMAL)
    overrides = ["adapter.method=lora", "adapter.r=4", "model.quantization.bits=4", "evaluate.generation.top_k=5",
                 "train.max_steps=2"]
    recipe = load_recipe(path, overrides)
    assert recipe.adapter["method"] == "lora"
    assert recipe.adapter["r"] == 4
    assert recipe.model.quantization == QuantizationSettings(bits=4)
    assert isinstance(recipe.evaluate, EvaluateSettings)
    assert recipe.evaluate.generation.top_k == 5
    assert recipe.evaluate.metrics == ["exact_match"]  # the section's defaults fill the rest
    assert recipe.train["max_steps"] == 2


def test_apply_override_builds_raw_text_in_nested_dicts() -> None:
    raw: dict[str, Any] = {"train": {"seed": 1}}
    apply_override(raw, "a.b.c=1")
    apply_override(raw, "train.max_steps=3")
    assert raw == {"train": {"seed": 1, "max_steps": "3"}, "a": {"b": {"c": "1"}}}
    assert isinstance(raw["a"]["b"]["c"], Raw)
    assert isinstance(raw["train"]["max_steps"], Raw)


def test_later_override_wins() -> None:
    recipe = load_recipe(DEMO_SFT, ["train.max_steps=3", "train.max_steps=4"])
    assert recipe.train["max_steps"] == 4


@pytest.mark.parametrize(
    "override",
    [
        "train.learning_rate",  # no '='
        "train..x=1",  # empty key part
        ".x=1",
        "train.=1",
        "=1",
        "stage.x=1",  # 'stage' holds a string, not a section
        "train.max_steps.x=1",  # through an int
        "data.train.path=x",  # through a list
    ],
)
def test_bad_override_syntax(override: str) -> None:
    message = recipe_error(DEMO_SFT, override)
    assert "bad override" in message
    assert override in message


# --------------------------------------------------------------------------------------------------
# unknown keys and wrong types
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key", "section", "suggestion"),
    [
        ("train.max_stepz=3", "max_stepz", "section 'train' (SFTConfig)", "max_steps"),
        ("adapter.lora_alfa=8", "lora_alfa", "section 'adapter' (LoraConfig", "lora_alpha"),
        ("model.name_or_pth=x", "name_or_pth", "section 'model'", "name_or_path"),
        ("model.quantization.bitz=4", "bitz", "section 'model.quantization'", "bits"),
        ("data.seeed=3", "seeed", "section 'data'", "seed"),
        ("data.train=[{path: demo:reverse/sft, splt: test}]", "splt", "section 'data.train[0]'", "split"),
        ("trian.max_steps=3", "trian", "top level", "train"),
        ("evaluate.generation.max_new_tokenz=3", "max_new_tokenz", "section 'evaluate.generation'",
         "max_new_tokens"),
        ("evaluate.metricz=[rouge]", "metricz", "section 'evaluate'", "metrics"),
    ],
)
def test_unknown_key_names_key_section_and_nearest(override: str, key: str, section: str, suggestion: str) -> None:
    message = recipe_error(DEMO_SFT, override)
    assert f"unknown key '{key}'" in message
    assert section in message
    assert f"Did you mean '{suggestion}'?" in message
    assert str(DEMO_SFT) in message  # the recipe is named too


def test_unknown_key_in_yaml_data_source(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", """\
        stage: sft
        model: {name_or_path: demo:tiny-llama}
        data:
          train:
            - demo:reverse/sft
            - {path: demo:reverse/sft, wieght: 2}
    """)
    message = recipe_error(path)
    assert "unknown key 'wieght'" in message
    assert "data.train[1]" in message
    assert "Did you mean 'weight'?" in message


def test_unknown_key_at_top_level_of_yaml(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", MINIMAL + "trian: {max_steps: 3}\n")
    message = recipe_error(path)
    assert "unknown key 'trian'" in message
    assert "top level" in message
    assert "Did you mean 'train'?" in message


def test_adapter_method_none_takes_no_options(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", MINIMAL + "adapter: {method: none, r: 8}\n")
    message = recipe_error(path)
    assert "takes no options" in message and "r" in message


def test_unknown_adapter_method_suggests(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", MINIMAL + "adapter: {method: lroa}\n")
    message = recipe_error(path)
    assert "unknown adapter method 'lroa'" in message
    assert "Did you mean 'lora'?" in message


def test_unknown_stage_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", MINIMAL.replace("stage: sft", "stage: sfft"))
    message = recipe_error(path)
    assert "sfft" in message and "sft" in message


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("train: {max_steps: abc}", "'train.max_steps' expects an integer, got 'abc'"),
        ("train: {max_steps: 2.5}", "'train.max_steps' expects an integer"),
        ("train: {learning_rate: fast}", "'train.learning_rate' expects a number, got 'fast'"),
        ("train: {packing: 1}", "'train.packing' expects true or false"),
        ("adapter: {method: lora, r: x}", "'adapter.r' expects an integer, got 'x'"),
        ("model: {name_or_path: demo:tiny-llama, quantization: {bits: 3}}",
         "'model.quantization.bits' expects one of 4, 8"),
        ("model: {name_or_path: demo:tiny-llama, dtype: bf16}", "Did you mean 'bfloat16'?"),
        ("model: {name_or_path: 123}", "'model.name_or_path' expects a string"),
        ("model: {name_or_path: [a, b]}", "'model.name_or_path' expects a string, got a list"),
        ("data: {train: [demo:reverse/sft], seed: true}", "'data.seed' expects an integer, got true (a boolean)"),
        ("data: {train: demo:reverse/sft}", "'data.train' expects a list"),
        ("evaluate: {metrics: exact_match}", "'evaluate.metrics' expects a list"),
        ("data: [demo:reverse/sft]", "'data' must be a mapping"),
    ],
)
def test_wrong_type_names_key_and_expected_type(tmp_path: Path, snippet: str, expected: str) -> None:
    raw = {**yaml.safe_load(MINIMAL), **yaml.safe_load(snippet)}  # the snippet's section replaces MINIMAL's
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert expected in recipe_error(path)


def test_dtype_error_lists_the_choices() -> None:
    message = recipe_error(DEMO_SFT, "model.dtype=bf16")
    assert "'model.dtype' expects one of 'auto', 'float32', 'bfloat16', 'float16'" in message
    assert "Did you mean 'bfloat16'?" in message
    assert "'bf16'" in message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.max_steps=abc", "'train.max_steps' expects an integer, got 'abc'"),
        ("adapter.r=x", "'adapter.r' expects an integer, got 'x'"),
        ("adapter.r=8.5", "'adapter.r' expects an integer"),
        ("model.quantization.bits=3", "'model.quantization.bits' expects one of 4, 8"),
        ("train.learning_rate=abc", "'train.learning_rate' expects a number"),
    ],
)
def test_wrong_type_from_override(override: str, expected: str) -> None:
    assert expected in recipe_error(DEMO_SFT, override)


def test_literal_ints_from_yaml_and_override() -> None:
    assert load_recipe(DEMO_SFT, ["model.quantization.bits=8"]).model.quantization.bits == 8


def test_yaml_1_1_exponent_without_dot_is_a_float(tmp_path: Path) -> None:
    text = MINIMAL + "train: {learning_rate: 1e-4, max_steps: 2}\nevaluate: {generation: {temperature: 5e-1}}\n"
    assert yaml.safe_load(text)["train"]["learning_rate"] == "1e-4"  # the gotcha: PyYAML reads a string
    recipe = load_recipe(write(tmp_path / "r.yaml", text))
    assert type(recipe.train["learning_rate"]) is float
    assert recipe.train["learning_rate"] == 1e-4
    assert recipe.evaluate is not None
    assert recipe.evaluate.generation.temperature == 0.5


def test_int_for_float_field_is_accepted(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path / "r.yaml", MINIMAL + "train: {learning_rate: 1}\n"))
    assert recipe.train["learning_rate"] == 1


# --------------------------------------------------------------------------------------------------
# files and required sections
# --------------------------------------------------------------------------------------------------


def test_missing_recipe_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such.yaml"
    message = recipe_error(missing)
    assert "recipe not found" in message
    assert str(missing) in message


def test_invalid_yaml_is_a_recipe_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("stage: sft\nmodel: {name_or_path: [unclosed\n")
    message = recipe_error(path)
    assert "not valid YAML" in message
    assert str(path) in message


def test_recipe_that_is_not_utf8_is_a_recipe_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(("# caf\u00e9\n" + MINIMAL).encode("latin-1"))
    message = recipe_error(path)
    assert str(path) in message
    assert "not valid YAML" in message


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- stage: sft\n")
    assert "must hold a mapping" in recipe_error(path)


def test_empty_recipe_misses_stage(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert "missing 'stage'" in recipe_error(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("model: {name_or_path: x}\ndata: {train: [demo:reverse/sft]}\n", "missing 'stage' (one of: sft"),
        ("stage: sft\ndata: {train: [demo:reverse/sft]}\n", "missing section 'model'"),
        ("stage: sft\nmodel: {name_or_path: x}\n", "missing section 'data'"),
        ("stage: sft\nmodel: {dtype: float32}\ndata: {train: [demo:reverse/sft]}\n",
         "'model' is missing the required key 'name_or_path'"),
        ("stage: sft\nmodel: {name_or_path: x}\ndata: {eval_size: 0.1}\n",
         "the sft stage needs data.train: at least one source"),
        ("stage: sft\nmodel: {name_or_path: x}\ndata: {train: []}\n",
         "the sft stage needs data.train: at least one source"),
        ("stage: sft\nmodel: {name_or_path: x}\ndata: {train: [{split: test}]}\n",
         "'data.train[0]' is missing the required key 'path'"),
        ("stage: sft\nmodel: {name_or_path: x}\ndata: {train: [demo:reverse/sft], eval_size: -1}\n",
         "eval_size must be >= 0"),
    ],
)
def test_missing_required_parts(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in recipe_error(write(tmp_path / "r.yaml", text))


# --------------------------------------------------------------------------------------------------
# data sources in the recipe
# --------------------------------------------------------------------------------------------------


def test_data_source_shorthand(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path / "r.yaml", MINIMAL))
    assert recipe.data.train == [DataSource(path="demo:reverse/sft")]
    assert recipe.data.train[0].split == "train"
    assert recipe.data.train[0].weight == 1.0
    assert recipe.data.eval is None


@pytest.mark.parametrize("weight", ["0", "-1", "0.0"])
def test_non_positive_weight_is_rejected(tmp_path: Path, weight: str) -> None:
    path = write(tmp_path / "r.yaml", MINIMAL.replace("[demo:reverse/sft]", f"[{{path: x.jsonl, weight: {weight}}}]"))
    message = recipe_error(path)
    assert "data.train[0]" in message
    assert "weight must be > 0" in message


def test_positive_weights_are_kept(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", MINIMAL.replace("[demo:reverse/sft]", "[{path: a.jsonl, weight: 0.25}, "
                                                                             "{path: b.jsonl, weight: 3}]"))
    assert [s.weight for s in load_recipe(path).data.train] == [0.25, 3]


def test_data_source_columns_are_typed(tmp_path: Path) -> None:
    text = MINIMAL.replace("[demo:reverse/sft]", "[{path: a.jsonl, columns: {question: prompt}, max_rows: 5}]")
    source = load_recipe(write(tmp_path / "r.yaml", text)).data.train[0]
    assert source.columns == {"question": "prompt"}
    assert source.max_rows == 5
    bad = MINIMAL.replace("[demo:reverse/sft]", "[{path: a.jsonl, columns: [question]}]")
    assert "'data.train[0].columns' expects a mapping" in recipe_error(write(tmp_path / "bad.yaml", bad))


def test_check_sources_missing_local_file_names_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = DataSettings(train=[DataSource(path="data/missing.jsonl")])
    with pytest.raises(DataError) as info:
        check_sources(settings)
    message = str(info.value)
    assert "data.train[0]" in message
    assert "not found" in message
    assert str(Path.cwd() / "data" / "missing.jsonl") in message


def test_check_sources_checks_eval_sources_too(tmp_path: Path) -> None:
    present = tmp_path / "train.jsonl"
    present.write_text('{"prompt": "a", "completion": "b"}\n')
    settings = DataSettings(train=[DataSource(path=str(present))],
                            eval=[DataSource(path=str(tmp_path / "eval.jsonl"))])
    with pytest.raises(DataError, match=r"data\.eval\[0\].*eval\.jsonl"):
        check_sources(settings)
    check_sources(DataSettings(train=[DataSource(path=str(present))]))  # no error when everything exists


def test_check_sources_unknown_demo_dataset_suggests_nearest() -> None:
    settings = DataSettings(train=[DataSource(path="demo:reverse/sfft")])
    with pytest.raises(DataError) as info:
        check_sources(settings)
    message = str(info.value)
    assert "unknown demo dataset 'demo:reverse/sfft'" in message
    assert "Did you mean 'demo:reverse/sft'?" in message


def test_check_sources_accepts_the_demo_recipe() -> None:
    check_sources(load_recipe(DEMO_SFT).data)


# --------------------------------------------------------------------------------------------------
# values: ranges, choices, the run dir, the TRL configs built at validation (the refusals themselves are the
# corpus of tests/test_recipe_corpus.py)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.max_steps=-1", "train.num_train_epochs=0.5"],  # -1: train for num_train_epochs
        ["train.learning_rate=1e-8", "train.per_device_train_batch_size=1", "train.gradient_accumulation_steps=1"],
        ["data.eval=null", "data.eval_size=0.25"],  # a fraction of the training mixture
        ["data.eval=null", "data.eval_size=50"],  # a row count
        ["data.eval=null", "data.eval_size=0"],  # no held-out split
        ["adapter.lora_dropout=0.0", "adapter.r=1", "adapter.lora_alpha=1"],
        ["train.report_to=none"], ["train.report_to=all"], ["train.report_to=[tensorboard, wandb]"],
        ["train.optim=paged_adamw_8bit", "train.lr_scheduler_type=cosine", "train.save_strategy=best"],
        ["train.max_length=null"],
        ["train.output_dir=runs/a/b"],
    ],
)
def test_values_at_the_edge_of_their_range_are_accepted(overrides: list[str]) -> None:
    resolved = load_recipe(DEMO_SFT, overrides).to_dict()
    for override in overrides:  # each edge value is kept in the validated recipe, not dropped or refused
        *sections, key = override.split("=", 1)[0].split(".")
        section = resolved
        for name in sections:
            section = section[name]
        assert key in section, override


def test_every_range_rule_names_an_option_some_stage_has() -> None:
    """A rule on a misspelled option would never apply: each train / adapter rule names a field of a stage's TRL
    config or of a peft config."""
    from dataclasses import fields

    from alignkit import stages
    from alignkit.models import adapters
    from alignkit.recipe.loading import RANGES

    configs = {stages.get_stage(name).train_config() for name in stages.STAGES}
    peft_configs = {adapters.config_class(method) for method in adapters.METHODS} - {None}
    options = {section: {f.name for cls in classes for f in fields(cls)}
               for section, classes in (("train", configs), ("adapter", peft_configs))}
    for pattern in RANGES:
        section, _, option = pattern.partition(".")
        if section in options:
            assert any(fnmatch.fnmatchcase(name, option) for name in options[section]), pattern


def test_gpu_only_options_validate_on_any_machine() -> None:
    """bf16 and tf32 ask the machine, not the recipe: a GPU recipe validates on a laptop (this one has no bf16 GPU
    when CI runs it) and the run, on the machine that runs it, checks them when it builds its config."""
    recipe = load_recipe(DEMO_SFT, ["train.bf16=true", "train.tf32=true"])
    assert recipe.train["bf16"] is True and recipe.train["tf32"] is True


def test_the_configs_a_stage_builds_are_built_at_validation() -> None:
    """rest runs each improve step's SFT without evaluation and rlaif its DPO the same way, so an option that needs
    evaluation is refused for them (not for sft); rlaif's revision SFT is built too."""
    options = ["train.load_best_model_at_end=true", "train.save_steps=25", "train.eval_steps=25"]
    load_recipe(DEMO_SFT, options)
    for stage in ("rest", "rlaif"):
        assert "save and eval strategy to match" in recipe_error(RECIPES / "demo" / f"{stage}.yaml", *options,
                                                                 "train.eval_strategy=steps")
    message = recipe_error(RECIPES / "demo" / "rlaif.yaml", "rlaif.revision={sft: {warmup_steps: -1}}")
    assert "rlaif.revision.sft.warmup_steps" in message


def test_config_errors_name_the_keys_they_mention() -> None:
    from trl import SFTConfig

    from alignkit.recipe.schema import config_error

    message = config_error(ValueError("--load_best_model_at_end requires\n the save_strategy to match"), SFTConfig,
                           "train")
    assert message == ("train.load_best_model_at_end, train.save_strategy: --load_best_model_at_end requires the "
                       "save_strategy to match")
    assert config_error(ValueError("no option named"), SFTConfig, "train") == "train: no option named"


def test_output_dir_may_not_be_above_the_home_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home" / "me"
    home.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    assert "a directory above your home directory" in recipe_error(DEMO_SFT, f"train.output_dir={home.parent}")
    assert "your home directory" in recipe_error(DEMO_SFT, "train.output_dir=~/")
    assert "is empty" in recipe_error(DEMO_SFT, "train.output_dir=~")  # `~` alone is YAML's null
    load_recipe(DEMO_SFT, [f"train.output_dir={home / 'runs' / 'sft'}"])


def test_yaml_merge_keys_still_work_and_only_real_repeats_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", MINIMAL + "train:\n  <<: {learning_rate: 1.0e-4, max_steps: 5}\n  max_steps: 7\n")
    assert load_recipe(path).train["max_steps"] == 7  # a key next to a merge overrides the merged one
    repeated = write(tmp_path / "repeated.yaml", MINIMAL + "train:\n  max_steps: 5\n  seed: 1\n  max_steps: 7\n")
    message = recipe_error(repeated)
    assert "duplicate key 'max_steps'" in message and "line 7" in message and "first at line 5" in message


def test_pipeline_output_dir_must_be_a_path_of_its_own(tmp_path: Path) -> None:
    from alignkit.pipeline import load_pipeline

    for value, expected in (("5", "'output_dir' expects a directory path"), ("''", "the current directory")):
        path = write(tmp_path / "p.yaml", f"stage: pipeline\noutput_dir: {value}\n"
                                          f"steps: [{{name: a, recipe: {DEMO_SFT}}}]\n")
        with pytest.raises(RecipeError, match=expected):
            load_pipeline(path)


# --------------------------------------------------------------------------------------------------
# round trip
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["train.learning_rate=1e-4", "adapter.r=8", "model.name_or_path=123", "model.quantization.bits=4",
         "evaluate.metrics=[exact_match,rouge]", "data.train=[{path: a.jsonl, columns: {q: prompt}, weight: 0.5}]",
         "data.eval=null", "data.eval_size=0.1", "data.system_prompt=be brief", "train.packing=true",
         "adapter.target_modules=[q_proj,v_proj]"],
    ],
)
def test_to_dict_round_trips_through_yaml(tmp_path: Path, overrides: list[str]) -> None:
    first = load_recipe(DEMO_SFT, overrides).to_dict()
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(yaml.safe_dump(first, sort_keys=False))  # safe_dump fails on anything not plain data
    again = load_recipe(dumped)
    assert again.to_dict() == first
    assert list(first)[:5] == ["stage", "model", "adapter", "data", "train"]


def test_round_trip_keeps_the_default_output_dir(tmp_path: Path) -> None:
    first = load_recipe(write(tmp_path / "my-exp.yaml", MINIMAL)).to_dict()
    assert first["train"]["output_dir"] == str(Path("runs") / "my-exp")
    dumped = write(tmp_path / "other-name.yaml", yaml.safe_dump(first))
    assert load_recipe(dumped).to_dict() == first


# --------------------------------------------------------------------------------------------------
# command line and make
# --------------------------------------------------------------------------------------------------


def test_cli_validate_reports_unknown_key_without_traceback() -> None:
    result = run_cli("validate", "recipes/demo/sft.yaml", "train.max_stepz=3", timeout=120)
    assert result.returncode == 2, result.stderr
    assert "error:" in result.stderr
    assert "max_stepz" in result.stderr and "max_steps" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stdout == ""


def test_cli_sft_reports_unknown_key_before_training(tmp_path: Path) -> None:
    result = run_cli("sft", str(DEMO_SFT), "train.max_stepz=3", f"train.output_dir={tmp_path / 'run'}", timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Did you mean 'max_steps'?" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "run").exists()  # nothing was trained or written


def test_cli_validate_prints_the_resolved_recipe() -> None:
    result = run_cli("validate", "recipes/demo/sft.yaml", "train.max_steps=3", timeout=120)
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed == load_recipe(DEMO_SFT, ["train.max_steps=3"]).to_dict()
    assert printed["train"]["max_steps"] == 3
    assert "valid sft recipe" in result.stderr


def test_make_sft_reports_unknown_key_without_traceback() -> None:
    venv = Path(sys.executable).parent.parent
    assert (venv / "bin" / "alignkit").exists()
    # `-o` (assume old) keeps make from rebuilding the venv through the `setup` stamp, which this venv may lack.
    result = subprocess.run(
        ["make", "-s", "-o", f"{venv}/.installed", "sft", "RECIPE=recipes/demo/sft.yaml",
         "ARGS=train.max_stepz=3", f"VENV={venv}"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=dict(os.environ),
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "max_steps" in output
    assert "Traceback" not in output
    assert "pip install" not in output
