"""``lossmask prepare --backend ray``: the same sharded preparation as a Ray Data pipeline.

A dataset of shard indices is mapped, one row per Ray task, through the ordinary single-process
``prepare`` of that shard (read the JSONL, render + mask in batches, write the shard atomically), so
the Ray output is by construction the sharded output: ``lossmask merge`` of it equals the unsharded run
episode for episode, and it runs unchanged on a Ray cluster (``--ray-address``), provided every worker
sees the input files and the output directory (a shared file system). Without an address, a local Ray
instance is started on this machine.
"""
from __future__ import annotations

from dataclasses import replace

from lossmask.errors import LossmaskError
from lossmask.prepare import PrepareOptions, prepare


def _prepare_shard(row: dict, options: PrepareOptions) -> dict:
    summary = prepare(replace(options, shard_index=int(row["shard"])), progress=False)
    return {"shard": row["shard"], "summary": summary.to_dict()}


def prepare_on_ray(options: PrepareOptions, address: str | None = None) -> list[dict]:
    """Prepare ``options.num_shards`` shards as Ray tasks; returns the per-shard summaries in shard order."""
    try:
        import ray
    except ImportError as exc:
        raise LossmaskError("--backend ray needs Ray: pip install 'ray[data]'") from exc
    if not options.num_shards:
        raise LossmaskError("--backend ray needs --num-shards N (one Ray task per shard)")
    if options.shard_index is not None:
        raise LossmaskError("--backend ray prepares every shard; leave out --shard-index")
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        shards = ray.data.from_items([{"shard": i} for i in range(options.num_shards)], override_num_blocks=options.num_shards)
        rows = shards.map(_prepare_shard, fn_kwargs={"options": replace(options, workers=1)}).take_all()
    finally:
        if started:
            ray.shutdown()
    return [row["summary"] for row in sorted(rows, key=lambda r: r["shard"])]
