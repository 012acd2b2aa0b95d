"""Reading a dataset's memory-mapped Arrow files without mapping their pages into the process.

Every page of a memory-mapped file that a process touches counts in its resident memory, and so in its peak
(``ru_maxrss``), though the kernel can drop it: reading a whole converted source through the mapping raises the
main process's peak by the file's size (1M preference pairs: 166 MB for one scan of the raw lines), which a
plain ``datasets`` script, whose workers do the reading, never pays. :func:`stored_pieces` reads the same rows
with ordinary reads, a record batch at a time, into memory that is freed as soon as the batch is dropped.
"""

from __future__ import annotations

from collections.abc import Iterator

# The transforms datasets records on a memory-mapped table ("replays", redone on the file's table when it is
# mapped again) that act on each row alone, so they can be redone on each record batch; a slice or a filter
# cannot.
PER_ROW_REPLAYS = {"cast", "replace_schema_metadata", "rename_columns", "drop", "select", "remove_column",
                   "flatten", "combine_chunks"}


def stored_pieces(table) -> Iterator:
    """The rows of a ``datasets.table.Table`` (a dataset's ``data``: the stored rows, before any indices
    mapping), in stored order, as ``pyarrow.Table`` pieces: each block mapped from a file (a map's output, a
    loaded file) read again from that file with ordinary reads, a record batch at a time; each block in memory
    (or of a kind this does not know) as it is."""
    import pyarrow as pa
    from datasets.table import ConcatenationTable, MemoryMappedTable

    blocks = table.blocks if isinstance(table, ConcatenationTable) else [[table]]
    if any(len(columns) != 1 for columns in blocks):  # blocks side by side: not made by alignkit's preparation
        yield from (pa.Table.from_batches([batch]) for batch in table.table.to_batches())
        return
    for (block,) in blocks:
        if isinstance(block, MemoryMappedTable) and all(name in PER_ROW_REPLAYS for name, _, _ in block.replays):
            with pa.OSFile(block.path) as source:
                for batch in pa.ipc.open_stream(source):
                    yield MemoryMappedTable._apply_replays(pa.Table.from_batches([batch]), block.replays)
        else:
            yield from (pa.Table.from_batches([batch]) for batch in block.table.to_batches())
