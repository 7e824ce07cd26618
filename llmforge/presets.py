"""The model sizes of the `pretrain` stage (`model.size`), as Llama-architecture shapes.

In the core, without torch, because `llmforge plan` estimates memory from them as the stage builds models
from them.
"""

from __future__ import annotations

# Llama-architecture shapes. `tiny` is for tests; `smollm-135m` matches SmolLM2-135M's shape.
PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=176),
    "mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                 intermediate_size=688),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                  intermediate_size=1376),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                 intermediate_size=2048),
    "smollm-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                        intermediate_size=1536),
}
