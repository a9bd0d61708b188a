"""Hardware-free core: op contracts, registry, graph, cache, checkpoints, generation."""
