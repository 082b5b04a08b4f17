"""Device harnesses for benchmarks (installed as transact_edge.devices)."""
