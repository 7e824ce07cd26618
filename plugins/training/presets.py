"""The model sizes of the `pretrain` stage (`model.size`), for either architecture it builds
(`model.architecture`: llama, or qwen3 with its q/k norms).

No torch here: the stage builds its models from this table (training/models.py), and its estimate for
`llmforge plan` reads the same table (`preset_shape`), so the plan and the model built agree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmforge.planning import Shape

# Decoder shapes for either architecture. `tiny` is for tests; `smollm-135m` matches SmolLM2-135M's shape.
PRESETS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=176
    ),
    "mini": dict(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, intermediate_size=688
    ),
    "small": dict(
        hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, intermediate_size=1376
    ),
    "base": dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4, intermediate_size=2048
    ),
    "smollm-135m": dict(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536
    ),
}


def preset_shape(size: str, vocab: int, overrides: dict | None = None, source: str = "") -> Shape:
    """The shape of the model the pretrain stage builds from a size preset and its overrides (the
    stage's `model` table: explicit dimensions win, `tie_embeddings` as given), with `vocab` entries."""
    from llmforge.planning import Shape

    overrides = overrides or {}
    dims = {**PRESETS[size], **{k: v for k, v in overrides.items() if v is not None and k in PRESETS["tiny"]}}
    h, heads = dims["hidden_size"], dims["num_attention_heads"]
    arch = overrides.get("architecture") or "llama"
    return Shape(
        vocab,
        h,
        dims["num_hidden_layers"],
        heads,
        dims["num_key_value_heads"] or heads,
        dims["intermediate_size"],
        overrides.get("head_dim") or h // heads,
        bool(overrides.get("tie_embeddings", True)),
        "float32",
        "sdpa",
        False,
        source or f"preset {size}",
        model_type=arch,
        qk_norm=arch == "qwen3",  # Qwen3's per-head RMSNorm on queries and keys
    )
