"""The ``data`` section: the sources mixed into the training set and the held-out set."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class DataSource:
    """One dataset in a mixture."""

    SHORTHAND_FIELD = "path"  # `- demo:reverse/sft` is short for `- {path: demo:reverse/sft}`

    path: str = field(
        metadata={"help": "Local .jsonl/.json/.parquet/.csv/.arrow file or directory, hub dataset id, or "
                  "demo:<task>/<kind>. Relative paths are relative to the working directory."}
    )
    split: str = field(default="train", metadata={"help": "Split to read (demo sets have train and test)."})
    name: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    revision: str | None = field(default=None, metadata={"help": "Hub dataset revision."})
    format: str = field(
        default="auto",
        metadata={"help": "Row format: auto (detect from columns); for SFT messages, prompt_completion, alpaca, "
                  "sharegpt, text (raw text, loss on every token); for preference stages preference, "
                  "implicit_preference, rated, unpaired; for RL stages "
                  "(ppo, grpo, rloo) prompt_only, prompt_completion, messages (the last assistant turn or the "
                  "completion becomes a reference column; other columns reach the reward functions)."},
    )
    columns: dict[str, str] | None = field(
        default=None, metadata={"help": "Renames applied before format detection, e.g. {question: prompt}."}
    )
    templates: list[str] | None = field(
        default=None,
        metadata={"help": "Prompt templates (FLAN-style phrasings) with {column} placeholders; each row's prompt "
                  "is one of them, picked at random per row but always the same for that row. One template: "
                  "fixed phrasing. Write {{ and }} for literal braces."},
    )
    weight: float = field(
        default=1.0,
        metadata={"help": "Share of this source in the mixture: 0.5 keeps a random half of its rows, 2.0 uses "
                  "every row twice (as alignment-handbook's dataset_mixer)."},
    )
    max_rows: int | None = field(default=None, metadata={"help": "Read at most this many rows (before weighting)."})

    def __post_init__(self) -> None:
        if self.weight <= 0:
            raise ValueError(f"weight must be > 0, got {self.weight}")


@dataclass
class DataSettings:
    """Training and evaluation data."""

    train: list[DataSource] = field(
        default_factory=list, metadata={"help": "Sources mixed into the training set (every training stage needs one)."}
    )
    eval: list[DataSource] | None = field(
        default=None, metadata={"help": "Held-out sources; if null, eval_size rows are split off the training set."}
    )
    eval_size: float = field(
        default=0.0,
        metadata={"help": "Held-out part of the training mixture when `eval` is null: a fraction (< 1) "
                  "or a row count."},
    )
    seed: int = field(default=42, metadata={"help": "Seed for mixing, subsampling and the eval split."})
    system_prompt: str | None = field(
        default=None, metadata={"help": "System message added to conversations that have none."}
    )
    # Applied by alignkit.data.formats.from_rated; its random choice is seeded by the row number, not by
    # `seed`, so changing the mixture seed reshuffles rows but keeps every rated row's pair.
    pairing: Literal["best_vs_random", "best_vs_worst"] = field(
        default="best_vs_random",
        metadata={"help": "How rated rows (a prompt with several rated completions) become a pair: chosen is the "
                  "highest rated (first on ties); rejected is a random lower-rated one, the same for a row on "
                  "every run (best_vs_random), or the lowest rated (best_vs_worst)."},
    )

    num_proc: int | None = field(
        default=None,
        metadata={"help": "Processes converting a source's rows (a batched datasets map). Default: 1 for a source of "
                  "under 50,000 rows, else one per CPU core up to 8."},
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "sft only: read the sources as the run goes (datasets' IterableDataset), for corpora "
                  "larger than memory; needs train.max_steps, mixes sources with probabilities in proportion to "
                  "their weights, holds out eval_size rows (a count) from the start of the mixture, and reports "
                  "bad rows as it goes and at the end. Not cached."},
    )
    cache: bool = field(
        default=True,
        metadata={"help": "Save the prepared data under alignkit's cache (~/.cache/alignkit/data, or "
                  "$ALIGNKIT_CACHE/data), keyed by the sources' content and these settings, and reuse it on the "
                  "next run, in the other processes of a launch, and in alignkit plan / validate."},
    )

    def __post_init__(self) -> None:
        if self.num_proc is not None and self.num_proc < 1:
            raise ValueError(f"num_proc must be >= 1, got {self.num_proc}")
        if self.eval_size < 0:
            raise ValueError(f"eval_size must be >= 0, got {self.eval_size}")
        if self.eval and self.eval_size > 0:
            raise ValueError(f"eval_size ({self.eval_size}) splits the held-out rows off the training mixture only "
                             "when `eval` is null, and `eval` names sources: remove one of them")
