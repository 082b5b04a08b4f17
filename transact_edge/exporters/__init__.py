"""Exporters from pruned checkpoints to runtime formats (installed as transact_edge.exporters)."""
