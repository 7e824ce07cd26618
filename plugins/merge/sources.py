"""Merge inputs, read tensor by tensor: a Hugging Face model directory (safetensors, sharded or not) or a
PEFT LoRA adapter on top of its base (the adapter is merged into each tensor as it is read).

Everything an input is checked for happens when it is opened, before any merging: the directory and
its config exist, it is not quantized, every safetensors file has a valid header and the data the
header promises, an index names files that exist. Tensors are then read one at a time: each read
opens the file (memory-mapped) and closes it again, so the only memory a read keeps is the tensor
itself (an open mapping would keep every page read so far in the process's resident memory).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmforge.errors import DataError, UsageError
from llmforge.runs import read_json_object

#: safetensors dtype names <-> torch dtype names
ST_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
}
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")
#: names of tensors that hold quantization state (bitsandbytes, GPTQ, AWQ, compressed-tensors, ...)
_QUANT_NAMES = re.compile(
    r"\.(qweight|qzeros|scales|g_idx|absmax|quant_map|quant_state|SCB|weight_format|"
    r"weight_scale|weight_zero_point|input_scale|nested_absmax)(\..*)?$"
)
_EMBED_NAMES = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
    "tok_embeddings.weight",
)
LAYER_RE = re.compile(r"^(.*?\.(?:layers|h|blocks|layer)\.)(\d+)(\..+)$")

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass(frozen=True)
class TensorMeta:
    dtype: str  # torch dtype name: float32, bfloat16, ...
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def layer_of(name: str) -> int | None:
    m = LAYER_RE.match(name)
    return int(m.group(2)) if m else None


def is_embedding(name: str) -> bool:
    return name.endswith(_EMBED_NAMES) or ".wpe." in name


def num_layers(config: dict) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = config.get(key)
        if isinstance(value, int):
            return value
    text = config.get("text_config")
    return num_layers(text) if isinstance(text, dict) else None


def _read_json(path: Path, what: str) -> dict:
    return read_json_object(path, what, DataError)


def _header(path: Path) -> dict[str, TensorMeta]:
    """Tensor names, dtypes and shapes of one safetensors file, validated by safetensors itself."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            out = {}
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict: keys() is its API
                sl = f.get_slice(name)
                out[name] = TensorMeta(ST_DTYPES.get(sl.get_dtype(), sl.get_dtype()), tuple(sl.get_shape()))
            return out
    except (SafetensorError, OSError, ValueError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(
            f"{path}: not a valid safetensors file ({reason})",
            hint="the file is damaged or incomplete: copy or download it again",
        ) from None


class Source:
    """One merge input. `label` is how messages name it (the path as given)."""

    label: str
    path: Path
    config: dict
    tensors: dict[str, TensorMeta]
    aliases: dict[str, str]  # a name the model does not store -> the tensor it is tied to
    tokenizer_dir: Path
    is_adapter = False

    def has(self, name: str) -> bool:
        return name in self.tensors or name in self.aliases

    def meta(self, name: str) -> TensorMeta:
        return self.tensors[name] if name in self.tensors else self.tensors[self.aliases[name]]

    @property
    def tied(self) -> bool:
        """The output head is the input embedding (no lm_head tensor stored)."""
        return "lm_head.weight" in self.aliases

    @property
    def num_layers(self) -> int | None:
        return num_layers(self.config)

    def load(self, name: str, dtype: Any = None) -> Any:  # pragma: no cover - abstract
        """The tensor ``name``, converted to the torch ``dtype`` (None: as stored)."""
        raise NotImplementedError


def _check_not_quantized(label: str, config: dict, tensors: dict[str, TensorMeta]) -> None:
    q = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    if q:
        method = q.get("quant_method") or ("bitsandbytes" if q.get("load_in_4bit") or q.get("load_in_8bit") else "?")
        raise UsageError(
            f"{label} is quantized ({method}): merging needs the full-precision weights; quantized "
            f"tensors cannot be averaged or subtracted meaningfully",
            hint="merge the original (unquantized) model, or dequantize it and save it in "
            "float16/bfloat16/float32 first",
        )
    for name, meta in tensors.items():
        if _QUANT_NAMES.search(name) or (meta.dtype.startswith(("float8", "uint", "int")) and name.endswith(".weight")):
            raise UsageError(
                f"{label} holds quantized weights ({name}: {meta.dtype}): merging needs full-precision weights",
                hint="merge the unquantized model instead",
            )


def _tie_aliases(config: dict, tensors: dict[str, TensorMeta]) -> dict[str, str]:
    """`lm_head.weight` -> the embedding, for a model with tied embeddings that does not store its head."""
    if "lm_head.weight" in tensors:
        return {}
    embed = next((n for n in tensors if n.endswith(_EMBED_NAMES) and layer_of(n) is None), None)
    if embed is None or config.get("tie_word_embeddings") is False:
        return {}
    return {"lm_head.weight": embed}


class ModelDir(Source):
    """A Hugging Face model directory with safetensors weights (one file, or shards with an index)."""

    def __init__(self, path: Path, label: str | None = None):
        self.path = Path(path)
        self.label = label or str(path)
        if not self.path.exists():
            raise DataError(f"model directory not found: {self.label}")
        if not self.path.is_dir():
            raise DataError(
                f"{self.label}: not a directory (a model is a folder with config.json and *.safetensors files)"
            )
        if not (self.path / "config.json").exists():
            raise DataError(f"{self.label}: not a model directory (no config.json)")
        self.config = _read_json(self.path / "config.json", "model config")
        self.files = self._weight_files()
        self.where: dict[str, Path] = {}
        self.tensors = {}
        for file, expected in self.files.items():
            header = _header(file)
            missing = sorted(set(expected) - set(header))
            if missing:
                raise DataError(
                    f"{self.path / 'model.safetensors.index.json'}: names {missing[0]} in {file.name}, "
                    f"which does not hold it"
                )
            for name, meta in header.items():
                self.tensors[name] = meta
                self.where[name] = file
        if not self.tensors:
            raise DataError(f"{self.label}: the safetensors files hold no tensors")
        _check_not_quantized(self.label, self.config, self.tensors)
        self.aliases = _tie_aliases(self.config, self.tensors)
        self.tokenizer_dir = self.path

    def _weight_files(self) -> dict[Path, list[str]]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            data = _read_json(index, "safetensors index")
            wmap = data.get("weight_map")
            if not isinstance(wmap, dict) or not wmap:
                raise DataError(f"{index}: no weight_map")
            files: dict[Path, list[str]] = {}
            for name, file in wmap.items():
                p = self.path / str(file)
                if not p.exists():
                    raise DataError(f"{index}: shard {file} (for {name}) not found")
                files.setdefault(p, []).append(name)
            return files
        single = self.path / "model.safetensors"
        if single.exists():
            return {single: []}
        found = sorted(self.path.glob("*.safetensors"))
        if found:
            return {p: [] for p in found}
        if any(self.path.glob("pytorch_model*.bin")) or any(self.path.glob("*.pt")):
            raise UsageError(
                f"{self.label}: only PyTorch pickle weights (pytorch_model.bin); merging reads safetensors",
                hint="load it with transformers and save_pretrained() it again: that writes model.safetensors",
            )
        raise DataError(f"{self.label}: no model weights (no *.safetensors file)")

    def load(self, name: str, dtype: Any = None) -> Any:
        from safetensors import safe_open

        real = self.aliases.get(name, name)
        with safe_open(str(self.where[real]), framework="pt") as f:
            t = f.get_tensor(real)
        return t if dtype is None else t.to(dtype)


_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(.+?)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.default)?(?:\.weight)?$"
)


class LoraSource(Source):
    """A PEFT LoRA adapter applied to its base model: each tensor read is base + scale·B·A."""

    is_adapter = True
    merged: ModelDir | None = None  # the adapter applied by PEFT (see _merge_with_peft), when it must be

    def __init__(self, path: Path, label: str | None = None, base: Path | None = None):
        self.path = Path(path)
        self.label = label or str(path)
        cfg_path = self.path / "adapter_config.json"
        self.adapter = _read_json(cfg_path, "adapter config")
        kind = self.adapter.get("peft_type", "LORA")
        if str(kind).upper() != "LORA":
            raise UsageError(f"{self.label}: a {kind} adapter; only LoRA adapters can be merged")
        for flag, why in (("use_dora", "DoRA"), ("lora_bias", "LoRA with bias"), ("use_qalora", "QA-LoRA")):
            if self.adapter.get(flag):
                raise UsageError(
                    f"{self.label}: {why} adapters are not supported by the merge",
                    hint="merge it with PEFT (merge_and_unload) and save the model",
                )
        if self.adapter.get("layer_replication"):
            raise UsageError(f"{self.label}: adapters with layer_replication are not supported by the merge")
        if base is None:
            named = self.adapter.get("base_model_name_or_path")
            if not named:
                raise DataError(
                    f"{self.label}: adapter_config.json does not name its base model",
                    hint="give the base (lora_base in a recipe, --base for llmforge merge-lora)",
                )
            base = Path(named)
            if not base.is_absolute():
                base = (self.path / base) if (self.path / base).exists() else base
            if not base.exists():
                raise DataError(
                    f"{self.label}: its base model '{named}' is not a local directory",
                    hint="give the base (lora_base in a recipe, --base for llmforge merge-lora)",
                )
        self.base = ModelDir(base)
        self.config = dict(self.base.config)
        has_tok = (self.path / "tokenizer_config.json").exists() or (self.path / "tokenizer.json").exists()
        self.tokenizer_dir = self.path if has_tok else self.base.path
        if self.adapter.get("target_parameters"):
            self._merge_with_peft()
            return
        weights = self.path / "adapter_model.safetensors"
        if not weights.exists():
            if (self.path / "adapter_model.bin").exists():
                raise UsageError(
                    f"{self.label}: adapter weights in pickle format (adapter_model.bin); the merge reads safetensors",
                    hint="save the adapter with safe_serialization=True",
                )
            raise DataError(f"{self.label}: no adapter_model.safetensors")
        self.weights = weights
        header = _header(weights)
        self.pairs: dict[str, dict[str, Any]] = {}  # base tensor name -> {"A": key, "B": key, "embedding": bool}
        self.replaced: dict[str, str] = {}  # base tensor name -> adapter key (modules_to_save, resized embeddings)
        for key in header:
            if "lora_magnitude_vector" in key:
                raise UsageError(f"{self.label}: DoRA adapters are not supported by the merge")
            m = _LORA_KEY.match(key)
            if m:
                module, part = m.group(1), m.group(2)
                entry = self.pairs.setdefault(module + ".weight", {"embedding": "embedding" in part})
                entry["A" if part.endswith("A") else "B"] = key
            else:
                name = key.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
                self.replaced[name] = key
        for target, entry in self.pairs.items():
            if "A" not in entry or "B" not in entry:
                raise DataError(f"{weights}: {target}: lora_A and lora_B must both be present")
            if not self.base.has(target) and target not in self.replaced:
                raise UsageError(
                    f"{self.label}: the adapter changes {target}, which its base {self.base.label} does not have",
                    hint="is this the adapter's base model?",
                )
        self.tensors = dict(self.base.tensors)
        for name, key in self.replaced.items():
            self.tensors[name] = header[key]
        self.header = header
        self.aliases = {k: v for k, v in self.base.aliases.items() if k not in self.tensors}
        _check_not_quantized(self.label, self.config, self.tensors)
        embed = next((n for n in self.replaced if n.endswith(_EMBED_NAMES)), None)
        if embed is not None and isinstance(self.config.get("vocab_size"), int):
            self.config["vocab_size"] = header[self.replaced[embed]].shape[0]

    def _merge_with_peft(self) -> None:
        """An adapter of parameters (PEFT's target_parameters: the fused 3-D experts and the router of a
        transformers 5 MoE model) has no B·A per stored tensor: its factors are laid out per expert over the
        fused in-memory weights, which the checkpoint stores per expert under other names (Mixtral's
        w1/w3/w2). PEFT applies it (the base is loaded whole for this, not streamed), and the merged weights,
        saved by transformers under the checkpoint's own names, are read like any model folder."""
        import atexit
        import shutil
        import tempfile

        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        out = Path(tempfile.mkdtemp(prefix="llmforge-lora-merged-"))
        atexit.register(shutil.rmtree, out, True)
        base = AutoModelForCausalLM.from_pretrained(str(self.base.path), dtype="auto")
        PeftModel.from_pretrained(base, str(self.path)).merge_and_unload().save_pretrained(str(out))
        self.merged = ModelDir(out, self.label)
        self.config = dict(self.merged.config)
        self.pairs, self.replaced = {}, {}
        self.tensors = dict(self.merged.tensors)
        self.aliases = dict(self.merged.aliases)

    def _scale(self, module: str, rank: int) -> float:
        alpha = float(self.adapter.get("lora_alpha", rank))
        for pattern, value in (self.adapter.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?{pattern}$", module):
                alpha = float(value)
                break
        if self.adapter.get("use_rslora"):
            return alpha / (rank**0.5)
        return alpha / rank

    def delta(self, name: str, dtype: Any) -> Any:
        """scale·B·A for the tensor `name` (in `dtype`), or None if the adapter does not change it."""
        from safetensors import safe_open

        entry = self.pairs.get(name)
        if entry is None:
            return None
        with safe_open(str(self.weights), framework="pt") as f:
            a = f.get_tensor(entry["A"]).to(dtype)
            b = f.get_tensor(entry["B"]).to(dtype)
        if entry["embedding"]:  # lora_embedding_A: (r, vocab), lora_embedding_B: (dim, r); weight is (vocab, dim)
            d = (b @ a).T
            rank = a.shape[0]
        else:
            d = b @ a
            rank = a.shape[0]
            if self.adapter.get("fan_in_fan_out"):
                d = d.T
        return d.mul_(self._scale(name.removesuffix(".weight"), rank)).contiguous()

    def load(self, name: str, dtype: Any = None) -> Any:
        import torch
        from safetensors import safe_open

        if self.merged is not None:
            return self.merged.load(name, dtype)
        if name in self.replaced:
            with safe_open(str(self.weights), framework="pt") as f:
                t = f.get_tensor(self.replaced[name])
        else:
            t = self.base.load(name)
        target = name if name in self.pairs else self.aliases.get(name, name)
        if target in self.pairs and t.is_floating_point():
            work = dtype if dtype is not None and dtype.itemsize >= 4 else torch.float32
            d = self.delta(target, work)
            if tuple(d.shape) != tuple(t.shape):
                raise DataError(
                    f"{self.label}: the adapter's update of {target} has shape {list(d.shape)}, "
                    f"the weight {list(t.shape)}"
                )
            t = t.to(work).add_(d)
        return t if dtype is None else t.to(dtype)


def open_source(path: Path, label: str | None = None, lora_base: Path | None = None) -> Source:
    path = Path(path)
    if (path / "adapter_config.json").exists():
        return LoraSource(path, label, base=lora_base)
    if lora_base is not None:
        raise UsageError(
            f"{label or path}: lora_base is given, but this is not an adapter directory (no adapter_config.json)"
        )
    return ModelDir(path, label)
