"""transact-edge: TransAct structured pruning of LLaMA-family models, shipped to the edge.

Importing the package registers the per-layer-width model classes with transformers' Auto
classes, so `AutoModelForCausalLM.from_pretrained(dir)` loads any checkpoint it writes.
"""
from . import modeling  # noqa: F401

__version__ = "0.1.0"
