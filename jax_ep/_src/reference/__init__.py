"""Pure-JAX reference backend: gathers and collectives, per shard of `shard_map`."""
