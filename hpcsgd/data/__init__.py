"""The data layer: importers, HDF5 shards, redundant chunk assignment, stratified sampling.

Pure numpy and h5py: no torch, no MPI, so every piece can be tested on one process.
"""

from hpcsgd.data.assignment import (
    adopt_orphans,
    chunk_holders,
    chunks_for_rank,
    coverage,
    held_chunks,
    draws_per_step,
    sample_plan,
)
from hpcsgd.data.partition import parse_partition, partition_indices
from hpcsgd.data.placement import PLACEMENTS, Placement, node_count, node_of, node_ranks
from hpcsgd.data.sampler import StratifiedSampler, gather_batch, steps_per_epoch
from hpcsgd.data.shards import (
    FORMAT_VERSION,
    ShardIndex,
    load_chunk,
    load_chunk_rows,
    load_test,
    read_index,
    write_shards,
)
from hpcsgd.data.sources import SOURCES, Dataset, load_source, validate_arrays

__all__ = [
    "draws_per_step",
    "FORMAT_VERSION",
    "PLACEMENTS",
    "Placement",
    "SOURCES",
    "Dataset",
    "ShardIndex",
    "StratifiedSampler",
    "adopt_orphans",
    "chunk_holders",
    "chunks_for_rank",
    "coverage",
    "gather_batch",
    "held_chunks",
    "load_chunk",
    "load_chunk_rows",
    "load_source",
    "load_test",
    "node_count",
    "node_of",
    "node_ranks",
    "parse_partition",
    "partition_indices",
    "read_index",
    "sample_plan",
    "steps_per_epoch",
    "validate_arrays",
    "write_shards",
]
