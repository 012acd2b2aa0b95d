"""Every command the docs show works as shown, checked without training anything.

Where commands are found: README.md, docs/*.md and recipes/README.md (a line of a ```bash block, a ``$ `` line of
any other block but YAML and Python, an inline code span, and an alternative given in a comment as ``(or: CMD)``
or ``(CMD)``), and the comments of the recipes (recipes/**/*.yaml) and of the launch configs
(accelerate_configs/*): an indented comment line (``#   make sft ...``; three spaces in a row end the command,
what follows is a note) or an inline code span. ``a && b`` is two commands. The commands checked are
``alignkit``, ``make``, ``accelerate launch``, ``sbatch .../slurm_multinode.sh`` and the Slurm script run
directly; others (git, pip, tensorboard) are not alignkit's.

What is checked, by kind:

- ``alignkit``: the line parses with alignkit's own parser. A recipe command (a stage, ``validate``, ``plan``,
  ``pipeline``) runs ``alignkit validate`` on its recipe and overrides (exit 0; a command the docs show failing
  must print the error they show), the recipe's stage is the command's, and ``training.check_launch`` accepts it
  under the launch it is shown with. ``recipes`` lists something, or copies into a temporary folder; a run dir
  that ``merge`` or ``score`` reads is one a shipped recipe writes.
- ``make``: ``make -n`` accepts the line, and every alignkit and accelerate command it would run is checked.
- ``accelerate launch``: accelerate's own parser and config handling build the launch, and the environment
  accelerate gives the processes (``ACCELERATE_USE_FSDP`` ...) is set while the alignkit command is checked; under
  FSDP and DeepSpeed, which run on GPUs only, ``torch.cuda.is_available()`` answers True so that the refusal of a
  machine without GPUs does not hide what is wrong with the recipe.
- Slurm: the script runs with stand-ins for srun, scontrol, nvidia-smi and accelerate (or with ``DRY_RUN=1``, as
  shown); the accelerate command one node would start is checked as above.

Placeholders: ``RECIPE`` (and ``FILE`` where a recipe goes) stands for the command's shipped demo recipe,
``make <stage>`` for every stage, and a make variable given a placeholder (``RECIPE=...``) is left to the
Makefile's default. A recipe whose data another documented program writes first (``DATA_WRITTEN_BY``) is
validated without looking for its data. A synopsis (``[--gpus N]``, ``ddp|fsdp|zero3``, ``<stage>``, or words such as
``RUN_DIR`` for what the user brings) is checked for what it promises: without its optional parts it parses, and
every flag it names exists with the choices it lists. No network is used: a recipe whose validation tried to
download (hub recipes included) fails here.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import re
import shlex
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO

from alignkit import cli
from alignkit.data import check_sources
from alignkit.pipeline import is_pipeline, load_pipeline
from alignkit.recipe.loading import load_recipe
from alignkit.stages import STAGES, training

MARKDOWN = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "recipes" / "README.md"]
COMMENTED = [*sorted((REPO / "recipes").rglob("*.yaml")), *sorted((REPO / "accelerate_configs").iterdir())]
SLURM_SCRIPT = "accelerate_configs/slurm_multinode.sh"

RECIPE_COMMANDS = {*STAGES, "validate", "plan", "pipeline"}
# Words that stand for the recipe of a recipe command; the check uses the command's shipped demo recipe.
RECIPE_PLACEHOLDERS = {"RECIPE", "FILE", "my-pipeline.yaml"}
# Recipes whose data another documented command writes first: validated without looking for the data.
DATA_WRITTEN_BY = {"bench/ppo_trl112_match.yaml": "bench/ppo_vs_trl112.py"}
# What the user brings, in a synopsis (RUN_DIR, FILE.jsonl, NAME, DEST, N, ...), or a stage left open.
PLACEHOLDER = re.compile(r"[A-Z][A-Z_]*(\.\w+)?|<\w+>")
SYNOPSIS_MARKS = ("[", "]", "|", "...")
# How a command in prose or a comment starts (a shell line in a code block may start otherwise: cd x && make).
COMMAND_START = re.compile(r"(([A-Z_]+=\S*|time) )*(\.venv/bin/)?"
                           r"(alignkit|make|accelerate launch|sbatch|\S*slurm_multinode\.sh)( |$)")


@dataclass(frozen=True)
class Shown:
    """A command as the docs show it."""

    where: str                  # "README.md:57"
    argv: tuple[str, ...]       # program first: alignkit, make, accelerate, sbatch or the Slurm script
    env: tuple[tuple[str, str], ...] = ()   # VAR=value written before the command
    error: str | None = None    # the error line the docs show it printing

    def __str__(self) -> str:
        return " ".join([*(f"{k}={v}" for k, v in self.env), *map(shlex.quote, self.argv)])


# --------------------------------------------------------------------------------------------------
# Finding the commands
# --------------------------------------------------------------------------------------------------


def _split_commands(line: str) -> list[tuple[dict[str, str], list[str]]]:
    """The commands of one shell line, as (VAR=value prefix, argv), cut at ``&&``, ``||`` and ``;``; ``time`` and
    ``$(...)`` values dropped, ``python -m alignkit`` and ``.venv/bin/`` programs named by their command."""
    tokens = shlex.split(re.sub(r"\$\([^)]*\)", "VALUE", line), comments=True)
    commands, current = [], []
    for token in [*tokens, "&&"]:
        if token in ("&&", "||", ";"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    found = []
    for tokens in filter(None, commands):
        env = {}
        while tokens and (tokens[0] == "time" or re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0])):
            if tokens[0] != "time":
                env.update([tokens[0].split("=", 1)])
            tokens = tokens[1:]
        if tokens[:3] in (["python", "-m", "alignkit"], [".venv/bin/python", "-m", "alignkit"]):
            tokens = ["alignkit", *tokens[3:]]
        if tokens:
            found.append((env, [tokens[0].removeprefix(".venv/bin/"), *tokens[1:]]))
    return found


def _in_scope(argv: list[str]) -> bool:
    program = argv[0]
    return (program in ("alignkit", "make", "sbatch") or program.endswith("slurm_multinode.sh")
            or argv[:2] == ["accelerate", "launch"])


def _shown(where: str, text: str, error: str | None = None) -> list[Shown]:
    """The in-scope commands of ``text`` (a shell line), each with its place in the docs."""
    return [Shown(where, tuple(argv), tuple(env.items()), error)
            for env, argv in _split_commands(text) if _in_scope(argv)]


def _alternatives(comment: str) -> list[str]:
    """Commands a comment gives as alternatives: ``(or: make sft ...)``, ``# or: make sft ...``,
    ``(alignkit pipeline FILE)``."""
    return re.findall(r"(?:\bor: |\()((?:alignkit|make|accelerate launch) [^);]*)", comment)


def _inline_spans(text: str, first_line: int, where: Path) -> list[Shown]:
    found = []
    for match in re.finditer(r"`([^`]+)`", text):
        span = " ".join(match.group(1).split())
        if COMMAND_START.match(span):
            line = first_line + text.count("\n", 0, match.start())
            found += _shown(f"{where.relative_to(REPO)}:{line}", span)
    return found


def markdown_commands(path: Path) -> list[Shown]:
    """The commands shown in a Markdown file: in code blocks and inline code spans."""
    lines = path.read_text().splitlines()
    found, prose, prose_start, fence = [], [], 1, None
    number = 0
    while number < len(lines):
        line = lines[number]
        number += 1
        where = f"{path.relative_to(REPO)}:{number}"
        if line.lstrip().startswith("```"):
            if fence is None:
                found += _inline_spans("\n".join(prose), prose_start, path)
                fence, prose = line.strip().removeprefix("```").strip(), []
            else:
                fence, prose_start = None, number + 1
            continue
        if fence is None:
            prose.append(line)
            continue
        if fence in ("yaml", "python", "json"):
            continue
        while line.endswith("\\") and number < len(lines):  # a continued shell line
            line = line[:-1].rstrip() + " " + lines[number].strip()
            number += 1
        if fence in ("bash", "sh", "shell"):
            found += _shown(where, line)
            if "#" in line:
                for alternative in _alternatives(line.split("#", 1)[1]):
                    found += _shown(where, alternative)
        elif line.startswith("$ "):
            following = lines[number] if number < len(lines) else ""
            error = following if following.startswith("error:") else None
            found += _shown(where, line.removeprefix("$ "), error)
    found += _inline_spans("\n".join(prose), prose_start, path)
    return found


def comment_commands(path: Path) -> list[Shown]:
    """The commands shown in a file's comment lines: indented ones (``#   make sft ...``) and inline spans."""
    lines = path.read_text().splitlines()
    found, number = [], 0
    while number < len(lines):
        line = lines[number].strip()
        number += 1
        if not line.startswith("#") or line.startswith(("#!", "#SBATCH")):
            continue
        start, body = number, line[1:]
        while body.endswith("\\") and number < len(lines) and lines[number].strip().startswith("#"):
            body = body[:-1].rstrip() + " " + lines[number].strip()[1:].strip()
            number += 1
        found += _inline_spans(body, start, path)
        if body.startswith("  ") and COMMAND_START.match(body.strip()):  # indented: a command, perhaps a note
            command, *note = re.split(r"\s{3,}", body.strip(), maxsplit=1)
            found += _shown(f"{path.relative_to(REPO)}:{start}", command)
            for alternative in _alternatives(" ".join(note)):
                found += _shown(f"{path.relative_to(REPO)}:{start}", alternative)
    return found


def documented_commands() -> list[Shown]:
    """Every command the docs show, in the order they show them, each once per place."""
    found = [shown for path in MARKDOWN for shown in markdown_commands(path)]
    found += [shown for path in COMMENTED for shown in comment_commands(path)]
    return list(dict.fromkeys(found))


SHOWN = documented_commands()


# --------------------------------------------------------------------------------------------------
# Checking them
# --------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every connection but to this machine is refused and recorded: validating a recipe downloads nothing."""
    refused = []
    local = {"localhost", "127.0.0.1", "::1"}

    def guard(original):
        def connect(sock, address, *args):
            if isinstance(address, tuple) and address[0] not in local:
                refused.append(address)
                raise OSError(f"no network in this test: {address}")
            return original(sock, address, *args)
        return connect

    def getaddrinfo(host, *args, **kwargs):
        if host not in local:
            refused.append(host)
            raise OSError(f"no network in this test: {host}")
        return resolve(host, *args, **kwargs)

    resolve = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", guard(socket.socket.connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guard(socket.socket.connect_ex))
    monkeypatch.chdir(REPO)  # the docs' paths are relative to the checkout
    for variable in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(variable, raising=False)
    yield
    assert not refused, f"tried to reach the network: {refused}"


@dataclass(frozen=True)
class Launch:
    """How a command is launched: the environment accelerate gives each process, and whether it is GPU-only."""

    env: tuple[tuple[str, str], ...] = ()
    gpus_only: bool = False


def is_synopsis(argv: list[str]) -> bool:
    """Whether alignkit's arguments ``argv`` are a usage line rather than a command: optional parts,
    alternatives, or words for what the user brings (a recipe command's recipe placeholder excepted)."""
    if any(mark in word for word in argv for mark in SYNOPSIS_MARKS):
        return True
    return any(PLACEHOLDER.fullmatch(word) for i, word in enumerate(argv)
               if not (i == 1 and argv[0] in RECIPE_COMMANDS and word in RECIPE_PLACEHOLDERS))


def parse_alignkit(argv: list[str]) -> argparse.Namespace:
    """``alignkit ARGV`` parsed as the CLI parses it; a line it refuses fails the test with argparse's words."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return cli.parse_arguments(list(argv))
    except SystemExit:
        pytest.fail(f"alignkit {shlex.join(argv)} does not parse: {stderr.getvalue().strip()}")


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``alignkit ARGV`` run in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


@functools.cache
def shipped_run_dirs() -> set[str]:
    """The run dirs the shipped recipes write (``train.output_dir``, pipeline steps included)."""
    dirs = set()
    for path in (REPO / "recipes").rglob("*.yaml"):
        if "_base" in path.parts:
            continue
        recipes = [step.recipe for step in load_pipeline(path).steps] if is_pipeline(path) else [load_recipe(path)]
        dirs.update(str(recipe.train["output_dir"]).rstrip("/") for recipe in recipes)
    return dirs


def check_synopsis(argv: list[str]) -> None:
    """Without its optional parts the usage line ``alignkit ARGV`` parses, and every flag it names exists with the
    choices it lists."""
    stages = STAGES if argv[0] == "<stage>" else [argv[0]]
    commands = cli.build_parser().get_default("commands")
    required = _without_optional_parts(argv[1:])
    for stage in stages:
        assert stage in commands, f"no command '{stage}'"
        parse_alignkit([stage, *required])
        flags = {flag: action for action in commands[stage]._actions for flag in action.option_strings}
        words = [word.strip("[]") for word in argv[1:]]
        for word, following in zip(words, [*words[1:], ""]):
            if word.startswith("--"):
                assert word in flags, f"alignkit {stage} has no flag {word}"
                if "|" in following:
                    assert set(following.split("|")) == set(flags[word].choices or ()), \
                        f"alignkit {stage} {word} takes {flags[word].choices}, the docs say {following}"


def _without_optional_parts(words: list[str]) -> list[str]:
    kept, depth = [], 0
    for word in words:
        depth += word.count("[")
        if depth == 0:
            kept.append(word)
        depth -= word.count("]")
    return kept


def check_alignkit(argv: list[str], tmp_path: Path, launch: Launch = Launch(), error: str | None = None) -> None:
    """An ``alignkit`` command line (without the program name) parses and does what the docs say it does."""
    if not argv:
        return  # the program's name, in prose
    if len(argv) == 1 and argv[0] != "recipes":  # a command named in prose (`alignkit plan` predicts ...)
        assert argv[0] in cli.build_parser().get_default("commands"), f"alignkit has no command '{argv[0]}'"
        return
    if is_synopsis(argv):
        assert error is None
        check_synopsis(argv)
        return
    args = parse_alignkit(argv)
    if args.command in RECIPE_COMMANDS:
        check_recipe_command(args, launch, error)
        return
    assert error is None, f"the docs show alignkit {args.command} failing; only recipe commands are checked so"
    if args.command == "recipes":
        destination = []
        if args.copy:  # written into a temporary folder, never into the checkout
            destination = ["--copy", args.copy[0], str(tmp_path / Path(args.copy[1]).name)]
        code, out, err = run_cli(["recipes", *([args.filter] if args.filter else []), *destination])
        assert code == 0 and out.strip(), err
    for path in (getattr(args, "run_dir", None), getattr(args, "file", None)):
        if path and path.startswith("runs/"):  # a run the docs tell the user to make first
            run_dir = path.removesuffix("/predictions.jsonl")
            assert run_dir in shipped_run_dirs(), f"no shipped recipe writes {run_dir}"


def check_recipe_command(args, launch: Launch, error: str | None) -> None:
    """``alignkit validate`` accepts the recipe with its overrides (or fails as the docs show), its stage is the
    command's, and the launch it is shown with accepts it."""
    recipe_path = args.recipe
    if recipe_path in RECIPE_PLACEHOLDERS:
        demo = args.command if args.command in STAGES or args.command == "pipeline" else "sft"
        recipe_path = f"recipes/demo/{demo}.yaml"
    if recipe_path not in DATA_WRITTEN_BY:
        code, _, err = run_cli(["validate", recipe_path, *args.overrides])
        if error is not None:
            assert (code, err.strip().splitlines()[:1]) == (2, [error]), "the docs show another error"
            return
        assert code == 0, err
    if is_pipeline(recipe_path):
        assert args.command in ("pipeline", "validate"), f"{recipe_path} is a pipeline: alignkit pipeline runs it"
        recipes = [step.recipe for step in load_pipeline(recipe_path, args.overrides).steps]
    else:
        recipes = [load_recipe(recipe_path, args.overrides)]
        if recipe_path not in DATA_WRITTEN_BY:
            check_sources(recipes[0].data)
        if args.command in STAGES:
            assert recipes[0].stage == args.command, f"{recipe_path} is a {recipes[0].stage} recipe"
    with pytest.MonkeyPatch.context() as patch:
        for name, value in launch.env:
            patch.setenv(name, value)
        if launch.gpus_only:
            import torch

            patch.setattr(torch.cuda, "is_available", lambda: True)
        for recipe in recipes:
            training.check_launch(recipe)


def check_accelerate(argv: list[str], tmp_path: Path, error: str | None = None) -> dict:
    """``accelerate launch ARGV`` as accelerate builds it; the alignkit command is checked under that launch.
    Returns the parsed launch arguments."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    assert argv[0] == "launch"
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = launch_command_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"accelerate launch does not parse {shlex.join(argv[1:])}: {stderr.getvalue().strip()}")
    assert args.config_file, "a documented launch names its accelerate config (the default one is the user's own)"
    assert (REPO / args.config_file).is_file(), f"no accelerate config {args.config_file}"
    assert args.module and args.training_script == "alignkit", "the launch runs -m alignkit"
    # accelerate's own step from the command line and config file to the launch (`accelerate launch` calls it)
    args, defaults, _ = _validate_launch_command(args)
    launch = Launch(env=tuple(_launch_env(args, defaults).items()), gpus_only=args.use_fsdp or args.use_deepspeed)
    check_alignkit(list(args.training_script_args), tmp_path, launch, error)
    return vars(args)


def _launch_env(args, defaults) -> dict[str, str]:
    """What the launcher accelerate picks for ``args`` adds to the processes' environment."""
    from accelerate.utils.launch import (
        prepare_deepspeed_cmd_env,
        prepare_multi_gpu_env,
        prepare_simple_launcher_cmd_env,
    )

    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command
        env = prepare_deepspeed_cmd_env(args)[1]
    elif args.use_fsdp or args.multi_gpu:
        env = prepare_multi_gpu_env(args)
    else:
        env = prepare_simple_launcher_cmd_env(args)[1]
    return {name: value for name, value in env.items() if os.environ.get(name) != value}


def check_make(argv: list[str], tmp_path: Path, error: str | None = None) -> None:
    """``make -n`` accepts the line; the alignkit and accelerate commands it would run are checked."""
    # A variable given a placeholder (RECIPE=...) is left to the Makefile's default: the stage's demo recipe.
    words = [word for word in argv[1:] if not re.fullmatch(r"[A-Z_]+=(\.\.\.|[A-Z_]+|<\w+>)", word)]
    targets = [[word.replace("<stage>", stage) for word in words] for stage in STAGES] \
        if "<stage>" in words else [words]
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    for words in targets:
        result = subprocess.run(["make", "-n", "--no-print-directory", *words], cwd=REPO, env=env,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        for line in result.stdout.splitlines():
            for _, command in _split_commands(line):
                if command[0] == "alignkit":
                    check_alignkit(command[1:], tmp_path, error=error)
                elif command[:2] == ["accelerate", "launch"]:
                    check_accelerate(command[1:], tmp_path, error)


def check_slurm(shown: Shown, tmp_path: Path) -> None:
    """The Slurm script run as sbatch would run it (srun, scontrol, nvidia-smi and accelerate stand-ins), or as
    shown with ``DRY_RUN=1``; the accelerate command of a node is checked."""
    argv = list(shown.argv)
    nodes = None
    if argv[0] == "sbatch":
        options = argv[1:argv.index(SLURM_SCRIPT)]
        argv = argv[argv.index(SLURM_SCRIPT):]
        nodes = next((o.split("=", 1)[1] for o in options if o.startswith("--nodes=")), None)
        if nodes is None:  # the script's own #SBATCH --nodes
            nodes = re.search(r"#SBATCH --nodes=(\d+)", (REPO / SLURM_SCRIPT).read_text()).group(1)
    assert argv[0] == SLURM_SCRIPT
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    scripts = {
        "srun": 'while [[ "$1" == -* ]]; do shift; done\nSLURM_NODEID=0 exec "$@"',  # node 0 runs the command
        "scontrol": 'for i in $(seq -w 1 "$SLURM_NNODES"); do echo "node$i"; done',
        "nvidia-smi": 'for i in 0 1 2 3 4 5 6 7; do echo "GPU $i: NVIDIA H100"; done',
        "accelerate": 'printf "%s\\0" "$@" > "$LAUNCH_ARGS"',
    }
    for name, body in scripts.items():
        (stubs / name).write_text(f"#!/bin/bash\n{body}\n")
        (stubs / name).chmod(0o755)
    # What the script reads comes from the line shown and from the stand-ins only, not from this machine.
    env = {name: value for name, value in os.environ.items() if not name.startswith("SLURM_")
           and name not in ("GPUS_PER_NODE", "MAIN_HOST", "MAIN_PORT", "ACCELERATE", "DRY_RUN")}
    env.update(PATH=f"{stubs}:{os.environ['PATH']}", LAUNCH_ARGS=str(tmp_path / "launch.args"))
    if nodes is not None:
        env.update(SLURM_NNODES=nodes, SLURM_JOB_NODELIST=f"node[1-{nodes}]", ACCELERATE="accelerate")
    env.update(shown.env)
    result = subprocess.run([str(REPO / argv[0]), *argv[1:]], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    if env.get("DRY_RUN") == "1":
        srun = shlex.split(result.stdout.strip())
        assert srun[0] == "srun" and srun[-3:-1] == ["bash", "-c"], result.stdout
        launch = shlex.split(srun[-1].replace("$SLURM_NODEID", "0"))
        assert launch[0].removeprefix(".venv/bin/") == "accelerate", launch
        launch = launch[1:]
    else:
        launch = (tmp_path / "launch.args").read_text().split("\0")[:-1]
    args = check_accelerate(launch, tmp_path)
    nodes = int(nodes or env["SLURM_NNODES"])
    assert args["num_machines"] == nodes and args["num_processes"] == nodes * int(env.get("GPUS_PER_NODE", 8))


@pytest.mark.parametrize("shown", SHOWN, ids=lambda shown: f"{shown.where} {shown}")
def test_documented_command_works_as_shown(shown, tmp_path):
    program = shown.argv[0]
    if len(shown.argv) == 1 or shown.argv == ("accelerate", "launch"):
        return  # the program named in prose (`make`, `accelerate launch`)
    if program == "alignkit":
        check_alignkit(list(shown.argv[1:]), tmp_path, error=shown.error)
    elif program == "make":
        check_make(list(shown.argv), tmp_path, shown.error)
    elif program == "accelerate":
        check_accelerate(list(shown.argv[1:]), tmp_path, shown.error)
    else:
        check_slurm(shown, tmp_path)


def test_the_docs_commands_are_all_found():
    """The extraction finds the commands this test is known to need (if it found none, nothing would fail)."""
    shown = {(s.where.split(":")[0], str(s)) for s in SHOWN}
    for where, command in [
        ("docs/multi-gpu.md", "accelerate launch --config_file accelerate_configs/fsdp_qlora.yaml -m alignkit sft "
                              "recipes/qwen2.5-7b/sft-qlora-fsdp.yaml"),
        ("README.md", "alignkit recipes --copy mistral-7b/sft-qlora my-sft.yaml"),
        ("README.md", "make sft RECIPE=recipes/demo/sft.yaml ARGS=train.max_stepz=3"),
        ("recipes/demo/pipeline.yaml", "alignkit pipeline recipes/demo/pipeline.yaml sft.train.max_steps=200"),
        ("recipes/README.md", "make demo"),
    ]:
        assert (where, command) in shown, f"{command} not found in {where}"
    assert any(s.argv[0] == "sbatch" for s in SHOWN) and any(s.argv[0].endswith(".sh") for s in SHOWN)
    assert any(s.error for s in SHOWN)
    sources = {s.where.split(":")[0] for s in SHOWN}
    assert {"README.md", "docs/multi-gpu.md", "docs/benchmarks.md", "recipes/README.md", SLURM_SCRIPT} <= sources
    assert len(SHOWN) > 80
