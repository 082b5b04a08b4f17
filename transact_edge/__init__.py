"""transact-edge: TransAct structured pruning of LLaMA-family models, shipped to the edge.

Importing the package imports nothing heavy (the CLI answers --help at once). `import
transact_edge.modeling` registers the per-layer-width model classes with transformers' Auto
classes, so that `AutoModelForCausalLM.from_pretrained(dir)` loads any checkpoint it writes.
"""
__version__ = "0.1.0"
