"""Importance matrices: how much each input column of each weight matrix matters, from calibration text.

The very low-bit types (IQ1/IQ2, IQ3_XXS, Q2_K_S) spend their few bits where the activations are large: the
quantizer minimises, per row, sum_j imatrix[j] * (w_j - q_j)^2. `imatrix[j]` is the mean, over calibration
tokens, of the squared input activation of column j. llama.cpp's own tool measures it inside llama.cpp;
here PyTorch forward hooks on every `nn.Linear` of the HF model measure the same quantity (the HF weight and
the GGUF tensor multiply the same input), so no second runtime is needed.

The file is safetensors: GGUF tensor name (`blk.0.attn_q.weight`) -> float32 vector of length "number of
columns", the size llama-quant.cpp checks for a dense tensor. Tensors absent from it are quantized without
one (llama.cpp only notes it) unless their type needs one, which `quantize_gguf` checks before starting.

No heavy import at module level.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from llmforge.errors import UsageError

Log = Callable[..., None]

# One forward pass per window: llama.cpp's imatrix tool uses 512-token chunks too.
WINDOW = 512


def _quiet(message: str, level: str = "info") -> None:
    pass


# ------------------------------------------------------------------------------------------------
# the HF side (shared with check.py)


def load_hf(model: Path, log: Log | None = None):
    """(model in fp32, eval mode; tokenizer) from an HF model directory or a LoRA adapter directory (its base
    is loaded and the adapter merged). The tokenizer comes from the folder itself, else from the adapter's
    base model."""
    import torch

    from llmforge_plugins.training.models import is_adapter, load_model, load_tokenizer

    model = Path(model)
    if not model.is_dir():
        raise UsageError(f"{model}: model directory not found")
    if not is_adapter(model) and not (model / "config.json").exists():
        raise UsageError(f"{model}: not a Hugging Face model directory (no config.json)")
    from llmforge_plugins.gguf.export import check_model_folder

    check_model_folder(model)  # a truncated safetensors or adapter config is named here, not deep in transformers
    (log or _quiet)(f"loading {model}")
    net = load_model(model, dtype=torch.float32)
    net.eval()
    tok_dir = model
    if is_adapter(model) and not any((model / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        tok_dir = Path(json.loads((model / "adapter_config.json").read_text())["base_model_name_or_path"])
    return net, load_tokenizer(tok_dir)


def gguf_arch(config):
    """The gguf package's MODEL_ARCH for an HF config (the naming scheme of its tensors)."""
    import gguf

    from llmforge_plugins.gguf.arch import ARCHES

    # The export's family table first: it knows which GGUF architecture each HF class is written as
    # (model_type does not always spell it: "qwen3_moe" is qwen3moe, "gemma3_text" is gemma3, "mixtral" is llama).
    hf_class = (getattr(config, "architectures", None) or [None])[0]
    for family in ARCHES:
        if hf_class in family.hf_names:
            return family.model_arch
    by_name = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
    model_type = getattr(config, "model_type", "llama")
    # Mistral-style checkpoints are exported with the llama architecture and its tensor names.
    return by_name.get({"mistral": "llama"}.get(model_type, model_type), gguf.MODEL_ARCH.LLAMA)


def gguf_tensor_names(net) -> dict[str, str]:
    """HF module name of every nn.Linear -> the GGUF name of its weight. With tied embeddings the GGUF has no
    `output.weight`: llama.cpp multiplies by `token_embd.weight` instead, so the head's statistics go there."""
    import gguf
    from torch import nn

    config = net.config
    name_map = gguf.get_tensor_name_map(gguf_arch(config), config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    names = {}
    for module_name, module in net.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        name = name_map.get_name(module_name + ".weight", try_suffixes=(".weight",))
        if name is None:
            continue
        if name == "output.weight" and tied:
            name = "token_embd.weight"
        names[module_name] = name
    return names


# ------------------------------------------------------------------------------------------------
# computing


def _token_windows(tokenizer, texts: list[str], max_tokens: int, window: int) -> list[list[int]]:
    """The calibration texts as token windows, up to max_tokens in all; texts are tokenized one by one and
    only until there are enough tokens, so a large calibration file costs little."""
    ids: list[int] = []
    for text in texts:
        if len(ids) >= max_tokens:
            break
        if text and text.strip():
            # a token rarely spans 32 characters: the cut spares tokenizing a whole book for a few windows
            text = text[: (max_tokens - len(ids)) * 32]
            ids.extend(tokenizer(text, add_special_tokens=True)["input_ids"])
    ids = ids[:max_tokens]
    if len(ids) < 2:
        raise UsageError(
            "the calibration text is empty: an importance matrix needs some text to measure on",
            hint="give a text file of a few thousand words, like what the model will see",
        )
    return [ids[i : i + window] for i in range(0, len(ids), window)]


def compute_imatrix(
    model: Path, texts: list[str], out: Path, *, max_tokens: int = 20000, log: Log | None = None
) -> Path:
    """Run `texts` (up to `max_tokens` tokens) through the HF model and write the importance matrix of every
    linear layer's weight to `out` (safetensors, written under a temporary name and renamed)."""
    import numpy as np
    import torch
    from safetensors.numpy import save_file

    log = log or _quiet
    out = Path(out)
    if isinstance(texts, str):
        texts = [texts]
    start = time.monotonic()
    net, tokenizer = load_hf(model, log)
    names = gguf_tensor_names(net)
    if not names:
        raise UsageError(
            f"{model}: no linear layer maps to a GGUF tensor name "
            f"(model type '{getattr(net.config, 'model_type', '?')}')"
        )
    window = min(WINDOW, int(getattr(net.config, "max_position_embeddings", WINDOW) or WINDOW))
    windows = _token_windows(tokenizer, list(texts), max_tokens, window)

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(module_name):
        gguf_name = names[module_name]

        def pre_hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sq = (x * x).sum(dim=0)
            sums[gguf_name] = sums[gguf_name] + sq if gguf_name in sums else sq
            counts[gguf_name] = counts.get(gguf_name, 0) + x.shape[0]

        return pre_hook

    modules = dict(net.named_modules())
    handles = [modules[m].register_forward_pre_hook(hook(m)) for m in names]
    try:
        with torch.no_grad():
            for i, ids in enumerate(windows):
                net(input_ids=torch.tensor([ids]), use_cache=False)
                log(f"importance matrix: window {i + 1}/{len(windows)}", "debug")
    finally:
        for h in handles:
            h.remove()

    matrix = {name: (sums[name] / counts[name]).float().numpy().astype(np.float32) for name in sorted(sums)}
    n_tokens = sum(len(w) for w in windows)
    meta = {
        "format": "llmforge-imatrix/1",
        "model": str(model),
        "tokens": str(n_tokens),
        "windows": str(len(windows)),
        "statistic": "mean squared input activation per column",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        save_file(matrix, str(tmp), metadata=meta)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log(f"importance matrix: {len(matrix)} tensors from {n_tokens} tokens in {time.monotonic() - start:.1f} s -> {out}")
    return out


# ------------------------------------------------------------------------------------------------
# reading


def load_imatrix(path: Path) -> dict:
    """GGUF tensor name -> float32 numpy vector; a UsageError naming the file (and the entry) when it is not
    an importance matrix: unreadable, empty, not 1-D, negative or non-finite values (llama.cpp would
    abort on those)."""
    import numpy as np
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: importance matrix file not found")
    try:
        raw = load_file(str(path))
    except Exception as exc:
        raise UsageError(
            f"{path}: not an importance matrix (safetensors) file: {exc}",
            hint="compute one with calibration text (--calibration FILE)",
        ) from None
    if not raw:
        raise UsageError(f"{path}: the importance matrix is empty")
    matrix = {}
    for name, values in raw.items():
        if values.ndim != 1:
            raise UsageError(
                f"{path}: importance matrix entry '{name}' has shape {tuple(values.shape)}, "
                "expected one value per column"
            )
        values = values.astype(np.float32, copy=False)
        if not np.isfinite(values).all() or (values < 0).any():
            raise UsageError(f"{path}: importance matrix entry '{name}' has negative, NaN or infinite values")
        matrix[name] = values
    return matrix
