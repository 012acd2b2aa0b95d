"""The launched processes, as every stage sees them: one under ``alignkit <stage>``, several under
``accelerate launch`` / torchrun (DDP, FSDP, ZeRO-3), on one machine or many.

Every process runs the same stage code on the same data. What the stages must get right with several:
  * files and logs are written once, by the main process (``is_main_process``, ``write_text``), and the
    others wait for them before reading (``wait_for_everyone``);
  * work that is not training (generation, judging, scoring) is split across the processes and gathered
    back in order (``map_sharded``), so each process does 1/N of it and all end with the same full result;
  * figures each process measures on its share (a training loss) are averaged (``mean_across_processes``).

The helpers are no-ops with one process, so the single-process path is the same code.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# True while this process works on its own block inside ``map_sharded``: a nested call (a judge that
# generates its reasoning, inside a sharded comparison) then runs on the block as it is, not split again.
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


def shard_bounds(count: int, processes: int, index: int) -> tuple[int, int]:
    """The slice ``[start, stop)`` of ``count`` items that process ``index`` of ``processes`` takes:
    contiguous blocks, the first ``count % processes`` of them one longer."""
    size, extra = divmod(count, processes)
    start = index * size + min(index, extra)
    return start, start + size + (1 if index < extra else 0)


def map_sharded(function: Callable[..., Sequence[T]], *columns: Sequence[Any],
                equal_shards: bool = False) -> list[T]:
    """``function(*columns)`` computed by all processes together: each process calls ``function`` on its
    block of rows (the same block of every column), and the results are gathered back in row order, so
    every process returns the full list. ``function`` must return one result per row.

    Every process must call this with the same rows. With ``equal_shards`` (a model sharded with FSDP or
    ZeRO-3, whose every forward pass needs all processes) each process gets the same number of rows: the
    short blocks are padded with a copy of a row, whose results are dropped. Called inside another
    ``map_sharded``'s function, it computes its rows in this process alone.
    """
    global _in_block
    count = len(columns[0])
    processes = world_size()
    if processes == 1 or _in_block:
        return list(function(*columns))
    start, stop = shard_bounds(count, processes, process_index())
    rows = list(range(start, stop))
    longest = -(-count // processes)
    padding = longest - len(rows) if equal_shards and count else 0
    rows += [rows[-1] if rows else 0] * padding
    _in_block = True
    try:
        local = list(function(*([column[i] for i in rows] for column in columns))) if rows else []
    finally:
        _in_block = False
    if len(local) != len(rows):
        raise ValueError(f"map_sharded: {len(rows)} rows gave {len(local)} results")
    local = local[:len(local) - padding]
    return [result for block in gather_objects(local) for result in block]


def gather_objects(local: Any) -> list[Any]:
    """``local`` of every process, in rank order (picklable objects; every process gets the list)."""
    import torch.distributed as dist

    if world_size() == 1:
        return [local]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, local)
    return gathered


def mean_across_processes(value: float) -> float:
    """The mean of ``value`` over the processes (each measured its own share of the data)."""
    if world_size() == 1:
        return value
    values = gather_objects(float(value))
    return sum(values) / len(values)


def is_sharded(model) -> bool:
    """Whether ``model``'s weights are split across the processes (FSDP2 DTensors, FSDP1 flat parameters,
    ZeRO-3 partitions): then every forward pass is collective and all processes must run the same number.
    Always False with one process."""
    from torch.distributed.tensor import DTensor

    if world_size() == 1:
        return False
    parameter = next(iter(model.parameters()), None)
    return parameter is not None and (isinstance(parameter, DTensor) or hasattr(parameter, "ds_id")
                                      or getattr(parameter, "_is_flat_param", False))
