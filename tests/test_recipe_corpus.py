"""A corpus of malformed recipes and overrides (tests/fixtures/malformed_recipes.yaml): `alignkit validate` and
the stage's own command refuse every one with exit code 2 and one `error:` line naming the key, no traceback,
before anything runs. Most cases run in-process through ``alignkit.cli.main``; a few run as real processes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_cli

from alignkit import cli, distributed
from alignkit.recipe.loading import load_raw
from alignkit.stages import STAGES, training

CORPUS = Path(__file__).parent / "fixtures" / "malformed_recipes.yaml"


@dataclass
class Case:
    id: str
    key: str
    words: list[str] = field(default_factory=list)
    recipe: str | None = None
    text: str | None = None
    overrides: list[str] = field(default_factory=list)

    def recipe_path(self, tmp_path: Path) -> str:
        """The recipe file to pass on the command line: the shipped one, or ``text`` written out."""
        if self.text is None:
            return str(self.recipe)
        path = tmp_path / f"{self.id}.yaml"
        path.write_text(self.text.replace("$REPO", str(REPO)))
        return str(path)

    def stage_command(self, recipe: str) -> str:
        """The command that runs this recipe: its stage's (`sft` when the file does not say one)."""
        try:
            stage = load_raw(Path(recipe)).get("stage")
        except Exception:  # the case is a file that does not load: any stage command must refuse it
            return "sft"
        return stage if stage in (*STAGES, "pipeline") else "sft"

    def expected(self, recipe: str) -> list[str]:
        return [text.replace("$FILE", recipe) for text in (self.key, *self.words)]


CASES = [Case(**entry) for entry in yaml.safe_load(CORPUS.read_text())["cases"]]


def check_refused(code: int, out: str, err: str, expected: list[str]) -> None:
    """Exit code 2, one `error:` line (the last thing printed) holding every expected text, no traceback."""
    assert code == 2, err
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    for text in expected:
        assert text in errors[0], f"{text!r} not in: {errors[0]}"


def test_the_corpus_is_large_and_its_ids_unique() -> None:
    assert len(CASES) >= 40
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_refused_by_validate_and_by_the_stage_command(case: Case, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(REPO)  # shipped recipes and relative output dirs, as a user in a checkout types them
    # The stage command reaches its run only if validation passes: that is this test failing, not a training.
    monkeypatch.setattr(distributed, "join_processes", lambda: None)
    monkeypatch.setattr(training, "run_stage", lambda *args, **kwargs: pytest.fail("the recipe validated"))
    recipe = case.recipe_path(tmp_path)
    for command in ("validate", case.stage_command(recipe)):
        code = cli.main([command, recipe, *case.overrides])
        captured = capsys.readouterr()
        check_refused(code, captured.out, captured.err, case.expected(recipe))
        if command == "validate":
            assert captured.out == ""  # nothing printed as if the recipe were valid


# A few cases end to end, as a user runs them: the exit code and stderr of a real process.
END_TO_END = {"yaml-syntax-error": "validate", "max-steps-zero": "sft", "load-best-model-with-mismatched-strategies":
              "validate"}


@pytest.mark.parametrize("case_id", END_TO_END)
def test_refused_end_to_end(case_id: str, tmp_path: Path) -> None:
    case = next(case for case in CASES if case.id == case_id)
    recipe = case.recipe_path(tmp_path)
    run_dir = tmp_path / "run"
    result = run_cli(END_TO_END[case_id], recipe, *case.overrides, f"train.output_dir={run_dir}", timeout=120)
    check_refused(result.returncode, result.stdout, result.stderr, case.expected(recipe))
    assert not run_dir.exists() and not any(tmp_path.glob("**/checkpoint-*"))


def test_validation_creates_nothing_and_leaves_the_process_state(tmp_path: Path, monkeypatch, capsys) -> None:
    """Building the stages' TRL configs at validation creates no directory and sets up no process state
    (TrainingArguments would reset accelerate's and join the process group under a launcher)."""
    from accelerate.state import PartialState
    from torch import distributed as torch_distributed
    from transformers import TrainingArguments

    monkeypatch.chdir(REPO)
    state, setup = dict(PartialState._shared_state), TrainingArguments.__dict__["_setup_devices"]
    for recipe in ("sft", "dpo", "ppo", "grpo", "rest", "rlaif", "eval"):
        run_dir = tmp_path / recipe
        assert cli.main(["validate", f"recipes/demo/{recipe}.yaml", f"train.output_dir={run_dir}"]) == 0
        assert not run_dir.exists()
    capsys.readouterr()
    assert PartialState._shared_state == state
    assert not torch_distributed.is_initialized()
    assert TrainingArguments.__dict__["_setup_devices"] is setup  # the check's stand-in was put back
