"""What tests share besides fixtures (conftest.py holds those): the table of tiny random models, one per
supported family."""
from __future__ import annotations

import torch
import transformers

from transact_edge.arch import FAMILIES

# One tiny config per supported family: GQA everywhere, biases where the family has them.
TINY = {
    "llama": dict(num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True),
    "mistral": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "qwen2": dict(num_attention_heads=6, num_key_value_heads=3, tie_word_embeddings=False),
}
COMMON = dict(hidden_size=96, head_dim=16, intermediate_size=128, num_hidden_layers=3, vocab_size=49152,
              max_position_embeddings=512)


# Llama 3.1's rope scaling on a short original context, so that 512 positions reach its scaled pairs
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def tiny_model(family: str, seed: int = 0, **overrides):
    cfg = getattr(transformers, FAMILIES[family].config_class)(**(COMMON | TINY[family] | overrides))
    torch.manual_seed(seed)
    model = getattr(transformers, FAMILIES[family].model_class)(cfg).eval()
    with torch.no_grad():  # spread the activations so that salience has something to rank
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(torch.linspace(0.2, 3.0, p.shape[0])[:, None])
    return model
