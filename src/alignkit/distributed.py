"""The launched processes, as every stage sees them: one under ``alignkit <stage>``, several under
``accelerate launch`` / torchrun (DDP, FSDP, ZeRO-3), on one machine or many.

Every process runs the same stage code on the same data. What the stages must get right with several:
  * files and logs are written once, by the main process (``is_main_process``, ``write_text``), and the
    others wait for them before reading (``wait_for_everyone``);
  * work that is not training (generation, judging, scoring) is shared out, and each call says which rows
    every process passes, because the two cases need different answers:
      - ``map_shared``: every process passes the *same* rows (held-out prompts, the pairs a judge labels);
        each computes its block of them and all get every result, in order. Enforced: processes passing
        different rows stop with an error instead of getting each other's results.
      - ``map_local``: each process passes *its own* rows (PPO's rollouts, the completions TRL hands a reward
        function on each process); each gets the results of its own rows. Correct whatever the processes
        pass, same rows included (which it detects and shares out as ``map_shared`` does);
  * figures each process measures on its share (a training loss) are averaged (``mean_across_processes``).

The helpers are no-ops with one process, so the single-process path is the same code.
"""

from __future__ import annotations

import atexit
import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# True while this process works on its own rows inside ``map_shared`` / ``map_local``: a nested call (a judge
# that generates its reasoning, inside a shared-out comparison) then runs on those rows as they are, not
# split again, and joins no collective the other processes are not in.
_in_block = False


def join_processes() -> None:
    """Set up this process's place among the launched ones, before anything asks for it. Under torchrun or
    ``accelerate launch`` on a machine without GPUs, accelerate's PartialState joins the process group (gloo)
    only when told it runs on CPUs; otherwise every process would think it is alone."""
    import logging

    import torch
    from accelerate import PartialState

    on_cpu = not torch.cuda.is_available()
    # Leaving without destroying the process group lets gloo's worker threads outlive the interpreter:
    # the process then aborts at exit ("terminate called without an active exception") after it finished.
    atexit.unregister(leave_processes)  # joined once per process, left once
    atexit.register(leave_processes)
    if on_cpu:
        # transformers' TrainingArguments rebuilds the state from this flag (as `accelerate launch --cpu` sets it).
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    if not PartialState(cpu=on_cpu).is_main_process:
        # Every process runs the same stage: the main one tells the story, the others only warn.
        logging.getLogger("alignkit").setLevel(logging.WARNING)


def leave_processes() -> None:
    """Destroy the process group, if one was joined, while the interpreter is still whole. Registered to run
    at exit by ``join_processes``; callers that end normally should pass a barrier first
    (``wait_for_everyone``) so no process leaves while another is still in a collective with it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def state():
    """accelerate's PartialState: this process's rank, the number of processes and its device."""
    from accelerate import PartialState

    return PartialState()


def world_size() -> int:
    return state().num_processes


def process_index() -> int:
    return state().process_index


def is_main_process() -> bool:
    return state().is_main_process


def launched() -> bool:
    """Whether several processes were launched (torchrun / accelerate launch set WORLD_SIZE), asked without
    setting up accelerate's state, so that one-process commands (validate, plan) never do."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def main_process_first():
    """A context in which the main process runs first and the others after it (accelerate's
    ``main_process_first``), for work the others then reuse, such as preparing data into a cache; a plain
    context with one process."""
    import contextlib

    return state().main_process_first() if launched() else contextlib.nullcontext()


def device():
    """The device of this process (its GPU under a multi-GPU launch, else the CPU)."""
    return state().device


def wait_for_everyone() -> None:
    """A barrier: every process reaches this line before any goes on."""
    state().wait_for_everyone()


def uses_fsdp() -> bool:
    """Whether the launch asked for FSDP (``distributed_type: FSDP`` in the accelerate config)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def uses_deepspeed() -> bool:
    """Whether the launch asked for DeepSpeed (``distributed_type: DEEPSPEED``)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def write_text(path: Path, text: str) -> None:
    """Write ``path`` on the main process (through a side file, so a killed run never leaves half a file),
    then let every process go on only once it is there.

    The stages decide what to do from which files exist (a resumed run skips what it wrote before), so every
    process must see the same files at the same point: the first barrier keeps the file from appearing while
    a slower process has yet to look for it."""
    wait_for_everyone()
    if is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(text, encoding="utf-8")
        partial.replace(path)
    wait_for_everyone()


def map_shared(function: Callable[..., Sequence[T]], *columns: Sequence[Any],
               equal_shards: bool = False) -> list[T]:
    """``function(*columns)`` computed by all processes together, when every process passes the same rows:
    each calls ``function`` on its block of rows (the same block of every column; accelerate's
    ``split_between_processes``) and the results are gathered back in row order, so every process returns
    the full list. ``function`` must return one result per row.

    Processes that pass different rows (each its own rollouts: use ``map_local``) stop with a RuntimeError
    before any work, found from a fingerprint of each one's rows. With ``equal_shards`` (a model sharded with
    FSDP or ZeRO-3, whose every forward pass needs all processes) each process gets the same number of rows:
    short blocks are padded with copies of the last row, whose results are dropped. Called inside another
    ``map_shared`` / ``map_local`` block, it computes its rows in this process alone.
    """
    if world_size() == 1 or _in_block:
        return list(function(*columns))
    from accelerate.utils import gather_object

    if len(set(gather_object([_fingerprint(columns)]))) > 1:
        raise RuntimeError("map_shared: the processes passed different rows, so each would get results of the "
                           "others' rows; a call whose processes each pass their own rows must use map_local")
    return _share_out(function, columns, equal_shards)


def map_local(function: Callable[..., Sequence[T]], *columns: Sequence[Any],
              equal_shards: bool = False) -> list[T]:
    """``function(*columns)`` for this process's own rows, whatever the other processes pass: the results of
    exactly the rows given, in their order.

    When every process passes the same rows (found from a fingerprint of each process's rows, the only thing
    exchanged first) the work is shared out as ``map_shared`` does. Otherwise each process computes its own
    rows; with ``equal_shards`` (a sharded model: every forward pass needs all processes) every process runs
    ``function`` on as many rows as the longest, padding with copies of a row whose results are dropped, so
    all run the same number of batches. Called inside a block, it computes its rows in this process alone.
    """
    if world_size() == 1 or _in_block:
        return list(function(*columns))
    from accelerate.utils import gather_object

    count = len(columns[0])
    fingerprint = _fingerprint(columns)
    # Each process's row count and fingerprint, and a row to pad with for a process that has none.
    sample = [column[0] for column in columns] if count and equal_shards else None
    shapes = gather_object([(count, fingerprint, sample)])
    if len({shape[1] for shape in shapes}) == 1:
        return _share_out(function, columns, equal_shards)
    longest = max(shape[0] for shape in shapes)
    padding = longest - count if equal_shards else 0
    if padding:
        filler = sample or next(shape[2] for shape in shapes if shape[2] is not None)
        columns = tuple([*column, *[value] * padding] for column, value in zip(columns, filler, strict=True))
    local = _compute(function, columns) if count + padding else []
    return local[:count]


def _share_out(function: Callable[..., Sequence[T]], columns: tuple[Sequence[Any], ...],
               equal_shards: bool) -> list[T]:
    """Rows every process holds alike: this process computes its block, all gather every result in order."""
    from accelerate.utils import gather_object

    count = len(columns[0])
    rows = _block(count, padded=False)
    padded = _block(count, padded=equal_shards)  # the block, then copies of the last row
    local = _compute(function, tuple([column[i] for i in padded] for column in columns)) if padded else []
    # accelerate's gather_object concatenates the processes' lists in rank order: the blocks' order.
    return gather_object(local[:len(rows)])


def _block(count: int, padded: bool) -> list[int]:
    """This process's contiguous block of row indices in ``range(count)`` (accelerate's split: the first
    ``count % processes`` blocks one longer); ``padded``: every block as long as the longest."""
    with state().split_between_processes(list(range(count)), apply_padding=padded and count > 0) as block:
        return list(block)


def _compute(function: Callable[..., Sequence[T]], columns: tuple[Sequence[Any], ...]) -> list[T]:
    """``function(*columns)`` in this process alone (nested shared calls inside it included)."""
    global _in_block
    _in_block = True
    try:
        results = list(function(*columns))
    finally:
        _in_block = False
    if len(results) != len(columns[0]):
        raise ValueError(f"{getattr(function, '__name__', 'function')}: {len(columns[0])} rows gave "
                         f"{len(results)} results")
    return results


def _fingerprint(columns: tuple[Sequence[Any], ...]) -> str:
    """A digest of the rows: equal on every process that holds the same rows (prompts, answers and dataset
    columns: strings, numbers, lists and dicts, whose repr is the same in every process)."""
    return hashlib.sha256(repr(columns).encode("utf-8")).hexdigest()


def mean_across_processes(value: float) -> float:
    """The mean of ``value`` over the processes (each measured its own share of the data)."""
    from accelerate.utils import gather_object

    if world_size() == 1:
        return value
    values = gather_object([float(value)])
    return sum(values) / len(values)


def is_sharded(model) -> bool:
    """Whether ``model``'s weights are split across the processes (FSDP2 DTensors, FSDP1 flat parameters,
    ZeRO-3 partitions): then every forward pass is collective and all processes must run the same number.
    Always False with one process."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    if world_size() == 1:
        return False
    # By module first: after a forward pass FSDP2 keeps the root's parameters gathered (plain tensors, not
    # DTensors) until the next one, so a look at the first parameter alone would say "not sharded".
    if any(isinstance(module, (FSDPModule, FullyShardedDataParallel)) for module in model.modules()):
        return True
    parameter = next(iter(model.parameters()), None)
    return parameter is not None and (isinstance(parameter, DTensor) or hasattr(parameter, "ds_id")
                                      or getattr(parameter, "_is_flat_param", False))
