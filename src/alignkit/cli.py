"""Command line: ``alignkit <stage> RECIPE [key=value ...]``, ``validate``, ``plan``, ``merge``, ``chat``,
``serve``, ``score``, ``recipes``, ``demo``.

Problems with the user's input (recipe, overrides, data, run dir) print one ``error:`` line and exit
with code 2; only genuine bugs show a traceback. A run that fails or is interrupted (Ctrl-C: exit 130) is
marked so in its ``run.json``, and the CLI prints the command that resumes it. Flags may come anywhere
after the command, before or after the recipe and its overrides.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import signal
import sys
import typing

import yaml

from alignkit import __version__, distributed
from alignkit.data import check_sources, countable, prepare
from alignkit.demo.build import demo_model_dir
from alignkit.demo.tasks import DEMO_DATASETS
from alignkit.errors import AlignkitError
from alignkit.models import merge
from alignkit.pipeline import is_pipeline, load_pipeline, run_pipeline
from alignkit.plan.report import run_plan
from alignkit.recipe.library import copy_recipe, shipped_recipes
from alignkit.recipe.loading import load_recipe
from alignkit.recipe.settings import GenerationSettings
from alignkit.runs.reports import before_and_after
from alignkit.scoring import bad_line_report, score_file
from alignkit.serve.chat import chat_options, run_chat
from alignkit.serve.engine import Engine
from alignkit.serve.server import serve
from alignkit.stages import STAGES, get_stage, training


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="path to a recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, typed by the recipe schema (e.g. train.learning_rate=1e-4)")


def build_parser() -> argparse.ArgumentParser:
    """The ``alignkit`` parser; its default ``commands`` maps each command to its own parser."""
    parser = argparse.ArgumentParser(prog="alignkit", description="Recipe-driven fine-tuning and alignment.")
    parser.add_argument("--version", action="version", version=f"alignkit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.set_defaults(commands=commands.choices)
    for name in STAGES:
        stage_parser = commands.add_parser(name, help=f"run the {name} stage of a recipe")
        _add_recipe_arguments(stage_parser)
        stage_parser.add_argument("--overwrite", action="store_true",
                                  help="delete train.output_dir first if it holds a previous alignkit run (never "
                                  "a directory alignkit did not write)")
        stage_parser.add_argument("--resume", action="store_true",
                                  help="resume an unfinished run even though its recipe changed")
    pipeline = commands.add_parser("pipeline", help="run a pipeline recipe: its stage recipes in order, skipping "
                                   "complete steps and resuming an interrupted one")
    pipeline.add_argument("recipe", help="a recipe with stage: pipeline")
    pipeline.add_argument("overrides", nargs="*", metavar="step.key=value",
                          help="overrides addressed to a step by name (e.g. sft.train.max_steps=100)")
    pipeline.add_argument("--overwrite", action="store_true",
                          help="run every step again from scratch, deleting the steps' previous runs")
    pipeline.add_argument("--resume", action="store_true",
                          help="resume an unfinished step even though its recipe changed")
    validate = commands.add_parser("validate", help="check a recipe without loading any model")
    _add_recipe_arguments(validate)
    plan = commands.add_parser("plan", help="parameters, data, steps and peak memory per device, without weights")
    _add_recipe_arguments(plan)
    plan.add_argument("--gpus", type=int, default=1, help="devices the run is launched on (default: 1)")
    plan.add_argument("--gpu-memory", help="memory of one device, e.g. 80GB or 24GiB: say whether the run fits "
                      "and, if not, the cheapest change that makes it fit (default: this machine's GPU, if any)")
    plan.add_argument("--strategy", choices=("ddp", "fsdp", "zero3"), default="ddp",
                      help="how several devices share the model (accelerate_configs/: ddp.yaml, fsdp.yaml, "
                      "zero3.yaml; default: %(default)s)")
    plan.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                      help="what the run trains on (default: %(default)s)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    merge_parser = commands.add_parser("merge", help="fold a run's adapter into its base: a standalone model dir")
    merge_parser.add_argument("run_dir", help="a run dir holding an adapter (LoRA, QLoRA, ...)")
    merge_parser.add_argument("--output", help="where to write the model (default: RUN_DIR-merged)")
    merge_parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                              help="dtype of the saved weights (default: the base's)")
    merge_parser.add_argument("--overwrite", action="store_true",
                              help="replace an output directory that an earlier alignkit merge wrote")
    merge_parser.add_argument("--push", metavar="REPO_ID",
                              help="also upload it to this Hub repository (never by default)")
    merge_parser.add_argument("--public", action="store_true", help="with --push: create the repository public")
    chat = commands.add_parser("chat", help="talk to a model in the terminal (one prompt per line when piped)")
    chat.add_argument("model", metavar="RUN_OR_MODEL",
                      help="a run dir (base + adapter), a merged or other model dir, a hub id, or demo:tiny-llama")
    chat.add_argument("--system", help="a system turn that opens the conversation")
    _add_generation_options(chat)
    server = commands.add_parser("serve", help="serve a model behind an OpenAI-compatible HTTP API")
    server.add_argument("model", metavar="RUN_OR_MODEL",
                        help="a run dir (base + adapter), a merged or other model dir, a hub id, or demo:tiny-llama; "
                        "clients ask for it by this name")
    server.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s, this machine only; 0.0.0.0: every network)")
    server.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    server.add_argument("--served-model-name", metavar="NAME",
                        help="the model's name in the API (/v1/models, the requests' 'model'; default: RUN_OR_MODEL)")
    server.add_argument("--api-key-env", metavar="VAR",
                        help="require 'Authorization: Bearer <key>' on /v1 routes, the key read from environment "
                        "variable VAR (never given on the command line, where other users could read it)")
    library = commands.add_parser("recipes", help="list the shipped recipes, or copy one out to edit")
    library.add_argument("filter", nargs="?", help="only recipes whose name contains this (e.g. qwen, dpo)")
    library.add_argument("--copy", nargs=2, metavar=("NAME", "DEST"),
                         help="write recipe NAME (e.g. qwen2.5-0.5b/sft-qlora) to DEST as one standalone file")
    library.add_argument("--overwrite", action="store_true", help="with --copy: replace an existing DEST file")
    score = commands.add_parser("score", help="metrics for an existing predictions file (JSON Lines)")
    score.add_argument("file", help="JSON Lines with 'prediction' and 'reference' or 'references' on each line")
    score.add_argument("--metrics", default="rouge,bleu,chrf,exact_match",
                       help="comma-separated metrics (default: %(default)s)")
    score.add_argument("--output", help="also write the scores as JSON to this file")
    demo = commands.add_parser("demo", help="build the embedded demo model and list the demo datasets")
    demo.add_argument("--rebuild", action="store_true", help="rebuild even if a cached build exists")
    return parser


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    """A recipe's generation knobs (``evaluate.generation``) as options: ``--max-new-tokens 64``, ``--do-sample``."""
    defaults, hints = GenerationSettings(), typing.get_type_hints(GenerationSettings)
    for option in chat_options():
        flag = "--" + option.name.replace("_", "-")
        default = getattr(defaults, option.name)
        help_text = option.metadata.get("help", "")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            kind = next(t for t in typing.get_args(hints[option.name]) or (hints[option.name],) if t is not type(None))
            parser.add_argument(flag, type=kind, default=default, help=f"{help_text} (default: {default})")


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    """Parse the command line with flags anywhere: ``alignkit sft RECIPE --overwrite key=value`` is the same as
    ``alignkit sft --overwrite RECIPE key=value``.

    argparse alone would let the overrides (``nargs="*"``) stop at the first flag and then blame the rest;
    ``parse_intermixed_args`` collects positionals around flags, but does not support subcommands, so the
    command's own parser gets the arguments after the command.
    """
    parser = build_parser()
    commands = parser.get_default("commands")
    if argv and argv[0] in commands:
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
        return args
    return parser.parse_args(argv)  # --help, --version, or an unknown command: argparse's own answers


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_arguments(argv)
    _configure_logging()
    try:
        if args.command == "validate":
            return _validate(args)
        if args.command == "demo":
            return _demo(args)
        if args.command == "score":
            return _score(args)
        if args.command == "pipeline":
            with _sigterm_interrupts():
                return _pipeline(args)
        if args.command == "recipes":
            return _recipes(args)
        if args.command == "merge":
            return _merge(args)
        if args.command == "chat":
            return _chat(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "plan":
            return run_plan(args, _load(args))
        with _sigterm_interrupts():
            return _run_stage(args)
    except AlignkitError as err:
        print(f"error: {err}", file=sys.stderr)
        _explain_stop(err, argv)
        return err.exit_code
    except KeyboardInterrupt as err:
        print(f"interrupted{f' ({err})' if str(err) else ''}", file=sys.stderr)
        _explain_stop(err, argv)
        return 130
    except Exception as err:  # a bug: keep its traceback, with where the run stands as a note under it
        stop = getattr(err, "run_stop", None)
        if stop is not None:
            err.add_note(f"{stop.describe()}; resume it with: {rerun_command(argv)}")
        raise


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM stops a run as Ctrl-C does (KeyboardInterrupt), so that the run is marked interrupted: launchers
    send it (torchrun and accelerate pass Ctrl-C on to their processes as SIGINT and then SIGTERM at once, Slurm
    on preemption or at the time limit), and by default it would end the process before anything is marked."""

    def interrupt(signum: int, _frame) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _explain_stop(err: BaseException, argv: list[str]) -> None:
    """After a run that stopped early: where its run dir stands, and the exact command that resumes it."""
    stop = getattr(err, "run_stop", None)
    if stop is None or not distributed.is_main_process():
        return
    print(f"{stop.describe()}; {'resume' if stop.checkpoint else 'run'} it with:\n  {rerun_command(argv)}",
          file=sys.stderr)


def rerun_command(argv: list[str]) -> str:
    """The command that continues a stopped run: this one without ``--overwrite`` (which would delete the run),
    under the same launcher when several processes ran it."""
    command = shlex.join(["alignkit", *(arg for arg in argv if arg != "--overwrite")])
    return f"accelerate launch <the same launch options> -m {command}" if distributed.world_size() > 1 else command


def _load(args):
    recipe = load_recipe(args.recipe, args.overrides)
    check_sources(recipe.data)
    return recipe


def _pipeline(args) -> int:
    distributed.join_processes()

    pipeline = load_pipeline(args.recipe, args.overrides)
    results = run_pipeline(pipeline, overwrite=args.overwrite, resume=args.resume)
    distributed.wait_for_everyone()
    if distributed.is_main_process():
        print(f"\npipeline finished: {pipeline.output_dir / 'report.md'}")
        for step in pipeline.steps:
            print(f"  {step.name} ({step.recipe.stage}): {step.recipe.output_dir}")
            metrics = results[step.name]
            for change in before_and_after(metrics):
                print(f"    {change.name:28s} {change.before:10.4f} -> {change.after:.4f}")
            if "eval/win_rate" in metrics:
                rates = " / ".join(f"{metrics[f'eval/{name}_rate']:.3f}" for name in ("win", "tie", "loss"))
                print(f"    {'judged win / tie / loss':28s} {rates}")
    return 0


def _validate(args) -> int:
    if is_pipeline(args.recipe):
        pipeline = load_pipeline(args.recipe, args.overrides)
        for step in pipeline.steps:
            print(f"{step.name}: {step.recipe.stage} -> {step.recipe.output_dir}")
        print(f"# {args.recipe}: valid pipeline of {len(pipeline.steps)} steps", file=sys.stderr)
        return 0
    recipe = _load(args)
    print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
    print(f"# {args.recipe}: valid {recipe.stage} recipe", file=sys.stderr)
    loader = get_stage(recipe.stage).load_data
    if loader is not None and countable(recipe.data):  # the rows the run will train on, prepared once for both
        data = prepare(recipe.data, loader)
        skipped = sum(sum(report.skipped.values()) for report in data.reports)
        print(f"# data: {len(data.train):,} training rows, {len(data.eval or []):,} held out, {skipped:,} bad rows "
              f"skipped (prepared data {data.cache_key or 'not cached'})", file=sys.stderr)
    return 0


def _run_stage(args) -> int:
    distributed.join_processes()  # first: importing the stage's libraries (in run_stage) may ask for the process state

    recipe = _load(args)
    if recipe.stage != args.command:
        raise AlignkitError(f"{args.recipe} is a '{recipe.stage}' recipe; run it with: alignkit {recipe.stage} "
                            f"{args.recipe}")
    metrics = training.run_stage(recipe, overwrite=args.overwrite, resume=args.resume)
    distributed.wait_for_everyone()  # no process leaves while another still shares a collective with it
    if not distributed.is_main_process():
        return 0  # the main process reports for all
    print(f"\n{recipe.stage} finished: {recipe.output_dir}")
    for key in sorted(metrics):
        value = metrics[key]
        print(f"  {key:28s} {value:.4f}" if isinstance(value, float) else f"  {key:28s} {value}")
    return 0


def _recipes(args) -> int:
    from pathlib import Path

    if args.copy:
        name, destination = args.copy
        written = copy_recipe(name, Path(destination), overwrite=args.overwrite)
        print(f"{written}: a copy of {name}; edit it, then: alignkit validate {written}")
        return 0
    shown = [r for r in shipped_recipes() if not args.filter or args.filter in r.name]
    width = max((len(r.name) for r in shown), default=10)
    for recipe in shown:
        print(f"{recipe.name:{width}s}  {recipe.stage:6s} {recipe.summary}")
    return 0


def _merge(args) -> int:
    from pathlib import Path

    merged = merge.merge_run(Path(args.run_dir), Path(args.output) if args.output else None, dtype=args.dtype,
                       overwrite=args.overwrite)
    print(f"merged {args.run_dir} into {merged.base}" + (" (dequantised)" if merged.dequantized else "")
          + f": {merged.path} ({merged.dtype})")
    if args.push:
        print(f"pushed: {merge.push(merged.path, args.push, private=not args.public)}")
    return 0


def _chat(args) -> int:
    settings = GenerationSettings(**{option.name: getattr(args, option.name) for option in chat_options()})
    return run_chat(Engine.load(args.model), settings, system=args.system)


def _serve(args) -> int:
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise AlignkitError(f"--api-key-env {args.api_key_env}: the environment variable {args.api_key_env} is "
                                "not set or empty")
    engine = Engine.load(args.model, name=args.served_model_name)
    print(f"serving {args.model} as '{engine.name}' at http://{args.host}:{args.port}/v1"
          + (f" (bearer key from ${args.api_key_env})" if api_key else ""), file=sys.stderr, flush=True)
    serve(engine, args.host, args.port, api_key)
    return 0


def _score(args) -> int:
    import json
    from pathlib import Path

    scores, data = score_file(Path(args.file), [m.strip() for m in args.metrics.split(",") if m.strip()])
    if (warning := bad_line_report(data)) is not None:
        print(f"warning: {args.file}: {warning}", file=sys.stderr)
    print(f"{'metric':12s} {'score':>10s}   ({len(data.predictions)} rows)")
    for name, value in scores.items():
        print(f"{name:12s} {value:10.4f}")
    if args.output:
        Path(args.output).write_text(json.dumps(scores | {"rows": len(data.predictions),
                                                         "skipped_rows": len(data.bad_lines)}, indent=2) + "\n")
    return 0


def _demo(args) -> int:
    import shutil

    if args.rebuild:
        shutil.rmtree(demo_model_dir(), ignore_errors=True)
    print(f"demo model: demo:tiny-llama -> {demo_model_dir()}")
    print("demo datasets: " + ", ".join(f"demo:{name}" for name in DEMO_DATASETS))
    return 0


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Keep library chatter to warnings; alignkit's own progress stays at INFO.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning")
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # On CPUs with AVX512-BF16 bitsandbytes warns at import that an optional kernel package is missing: a speed
    # hint for 4-bit inference, printed before every command (even a recipe error) otherwise.
    logging.getLogger("bitsandbytes.backends.cpu").setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
