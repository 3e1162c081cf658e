"""torchrun: sharding, collectives, merging statistics across ranks, rank divergence."""
