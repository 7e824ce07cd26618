"""Hugging Face checkpoint (or a LoRA adapter, merged first) -> one GGUF file for llama.cpp.

The export streams: every safetensors file is indexed from its header, the GGUF header, metadata and
tensor table are written first (their sizes are known in advance), then each tensor is read from
disk, converted and appended, one at a time. Peak memory is about one tensor in float32 plus its
converted copy, whatever the model's size. Reads go through `np.fromfile` rather than a memory map,
so no page of the input stays in the process's resident memory after its tensor is written.

This module knows no model family. Each family (Llama/Mistral, Qwen2, Qwen3, ...) is an `Arch` in
plugins/gguf/arch/ (the interface is documented in that package's docstring): it reads its hyperparameters
from config.json, refuses what llama.cpp cannot represent, writes its own metadata keys, and plans its tensors
(names from gguf's name map for its MODEL_ARCH, per-tensor transforms such as llama's RoPE regrouping, tensors
combined from several sources). What every family shares is here:

* tied embeddings: no `output.weight`, llama.cpp falls back to `token_embd.weight`;
* 1-D tensors, norms, biases and routers in F32; other tensors in the requested type, and Q8_0 only for rows that
  are a whole number of 32-value blocks (others fall back to F16, as llama.cpp's converter does);
* the metadata llama.cpp's converter writes for every text model, the tokenizer (vocab.py) and the model card.

Nothing heavy is imported at module level: numpy and gguf are imported inside the functions.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llmforge.errors import UsageError
from llmforge_plugins.gguf.arch import Arch, HParams, Planned, find_arch

OUTTYPES = ("f32", "f16", "bf16", "q8_0")

#: safetensors dtype -> numpy dtype name used to read it (bfloat16 is read as its 16 raw bits)
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "uint16"}
_ST_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}

Log = Callable[..., None]


def _quiet(message: str, level: str = "info") -> None:
    pass


# ------------------------------------------------------------------------------------------------
# the input: safetensors files read from their headers


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes are: file, byte range (absolute), safetensors dtype, shape."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _read_header(path: Path) -> dict[str, TensorRef]:
    """Parse one safetensors header and check every byte range it promises lies inside the file."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                raise ValueError("header length is out of range")
            header = json.loads(fh.read(n).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise UsageError(
            f"{path}: not a valid safetensors file ({exc})",
            hint="the file is damaged or incomplete: copy or save it again",
        ) from None
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise UsageError(f"{path}: malformed header entry for {name}") from None
        if dtype in _ST_ITEMSIZE and end - begin != math.prod(shape) * _ST_ITEMSIZE[dtype]:
            raise UsageError(
                f"{path}: {name} holds {end - begin} bytes, its shape {list(shape)} needs "
                f"{math.prod(shape) * _ST_ITEMSIZE[dtype]}"
            )
        if base + end > size or begin < 0 or end < begin:
            raise UsageError(
                f"{path}: {name} lies beyond the end of the file (the file is truncated)",
                hint="copy or save the model again",
            )
        out[name] = TensorRef(path, dtype, shape, base + begin, base + end)
    return out


def check_model_folder(path: Path) -> None:
    """Check an HF model folder (or a LoRA adapter folder and its base model) before transformers or peft loads it:
    its config and every safetensors file against the header's promises. A truncated or damaged file is a
    UsageError naming it (transformers would raise SafetensorError or JSONDecodeError without naming the file).
    The export, `gguf check` and `chat` all go through here."""
    from llmforge.runs import read_json_object

    path = Path(path)
    adapter_cfg = path / "adapter_config.json"
    if adapter_cfg.is_file():
        config = read_json_object(adapter_cfg, "adapter config")
        weights = sorted(path.glob("adapter_model*.safetensors"))
        for file in weights:
            _read_header(file)
        base = config.get("base_model_name_or_path")
        if base and Path(str(base)).expanduser().is_dir():
            check_model_folder(Path(str(base)).expanduser())
        return
    if not (path / "model.safetensors.index.json").is_file() and not any(path.glob("*.safetensors")):
        # Weights in another format (pytorch_model.bin): transformers loads those; only the config is checked.
        if (path / "config.json").is_file():
            read_json_object(path / "config.json", "model config")
        return
    ModelFiles(path)


def read_model_config(path: Path) -> dict:
    """config.json of a model directory, or a UsageError saying why `path` is not one."""
    from llmforge.runs import read_json_object

    if not path.is_dir():
        raise UsageError(
            f"{path}: not a model directory (a model is a folder with config.json and *.safetensors files)"
        )
    cfg = path / "config.json"
    if not cfg.is_file():
        raise UsageError(f"{path}: not a model directory (no config.json)")
    return read_json_object(cfg, "model config")


class ModelFiles:
    """A model directory: config.json and its safetensors tensors (one file, or shards and an index)."""

    def __init__(self, path: Path, config: dict | None = None):
        self.path = path
        self.config = config if config is not None else read_model_config(path)
        self.tensors = self._index()

    def _files(self) -> dict[Path, set[str]]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                files: dict[Path, set[str]] = {}
                for name, file in weight_map.items():
                    files.setdefault(self.path / str(file), set()).add(name)
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise UsageError(f"{index}: unreadable safetensors index ({exc})") from None
            for file, names in files.items():
                if not file.is_file():
                    raise UsageError(f"{index}: shard {file.name} (for {sorted(names)[0]}) not found")
            return files
        found = sorted(self.path.glob("*.safetensors"))
        if not found:
            other = [p.name for p in self.path.glob("*.bin")] + [p.name for p in self.path.glob("*.pt")]
            raise UsageError(
                f"{self.path}: no *.safetensors weights" + (f" (found {other[0]})" if other else ""),
                hint="save the model with save_pretrained(folder, safe_serialization=True)",
            )
        return {p: set() for p in found}

    def _index(self) -> dict[str, TensorRef]:
        tensors: dict[str, TensorRef] = {}
        for file, expected in self._files().items():
            header = _read_header(file)
            missing = sorted(expected - set(header))
            if missing:
                raise UsageError(
                    f"{self.path / 'model.safetensors.index.json'}: names {missing[0]} in {file.name}, "
                    f"which does not hold it"
                )
            for name, ref in header.items():
                if name in tensors:
                    raise UsageError(
                        f"{self.path}: tensor {name} is stored twice ({tensors[name].file.name} and {file.name})"
                    )
                tensors[name] = ref
        if not tensors:
            raise UsageError(f"{self.path}: the safetensors files hold no tensors")
        return tensors

    def read(self, name: str):
        """One tensor as a float32 numpy array in its Hugging Face shape (a private copy, no mapping)."""
        import numpy as np

        ref = self.tensors[name]
        with open(ref.file, "rb") as fh:
            fh.seek(ref.start)
            data = np.fromfile(fh, dtype=_ST_DTYPES[ref.dtype], count=ref.numel)
        if data.size != ref.numel:
            raise UsageError(f"{ref.file}: {name} is cut short (the file is truncated)")
        if ref.dtype == "BF16":
            # bfloat16 is the top half of a float32: widen the bits, exactly.
            data = data.astype(np.uint32)
            data <<= 16
            data = data.view(np.float32)
        elif ref.dtype != "F32":
            data = data.astype(np.float32)
        return data.reshape(ref.shape)


# ------------------------------------------------------------------------------------------------
# the model's family and shape, from config.json


def model_family(config: dict, where: Path) -> tuple[Arch, HParams]:
    """The family (arch/) and hyperparameters of a model, or a UsageError naming what is wrong."""
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise UsageError(
            f"{where}: the model is quantized ({method}); GGUF export needs full-precision weights",
            hint="export the original model, then quantize the GGUF (llmforge gguf quantize)",
        )
    arch = find_arch(config, where)
    return arch, arch.hparams(config, where)


# ------------------------------------------------------------------------------------------------
# the plan: every GGUF tensor, its sources and type, known before anything is written


#: routers stay F32 in llama.cpp's converter (its "always F32" list), whatever the output type
_F32_PARTS = ("ffn_gate_inp", "ffn_gate_inp_shexp")


def _tensor_type(gguf_name: str, shape: tuple[int, ...], outtype: str, f32: bool = False):
    """The GGUF type of one tensor, and why it is not the requested one (or None)."""
    import gguf

    T = gguf.GGMLQuantizationType
    parts = gguf_name.split(".")
    if (
        f32
        or len(shape) <= 1
        or gguf_name.endswith("_norm.weight")
        or not gguf_name.endswith(".weight")
        or (len(parts) >= 2 and parts[-2] in _F32_PARTS)
    ):
        return T.F32, None  # llama.cpp's norm, bias and router kernels take F32
    if outtype == "q8_0":
        block = gguf.GGML_QUANT_SIZES[T.Q8_0][0]
        if shape[-1] % block:
            return T.F16, f"{gguf_name}: rows of {shape[-1]} values are not whole Q8_0 blocks of {block}: F16"
        return T.Q8_0, None
    return {"f32": T.F32, "f16": T.F16, "bf16": T.BF16}[outtype], None


def plan_tensors(files: ModelFiles, arch: Arch, hp: HParams, outtype: str) -> tuple[list[Planned], list[str]]:
    """The family's plan (generated tensors first), each source's dtype checked, each tensor's type chosen."""
    planned = [*arch.extra_tensors(hp), *arch.plan(files, hp)]
    notes: list[str] = []
    seen: dict[str, Planned] = {}
    for p in planned:
        if p.name in seen:
            raise UsageError(
                f"{files.path}: {p.sources[0] if p.sources else p.name} and "
                f"{seen[p.name].sources[0] if seen[p.name].sources else p.name} both become {p.name}"
            )
        seen[p.name] = p
        for source in p.sources:
            ref = files.tensors[source]
            if ref.dtype not in _ST_DTYPES:
                raise UsageError(
                    f"{files.path}: tensor {source} is stored as {ref.dtype}; GGUF export reads "
                    f"float32, float16 and bfloat16 weights"
                )
        qtype, note = _tensor_type(p.name, p.shape, outtype, p.f32)
        if note:
            notes.append(note)
        p.qtype = qtype
    arch.check_tensors(files, hp, seen)
    planned.sort(key=_order)
    return planned, notes


def _order(p: Planned) -> tuple:
    """GGUF tensor order: generated and embedding first, then layer by layer, then the head."""
    parts = p.name.split(".")
    if parts[0] == "blk":
        return (1, int(parts[1]), p.name)
    return (0 if p.source is None or p.name == "token_embd.weight" else 2, 0, p.name)


def _convert(values, qtype):
    import gguf
    import numpy as np

    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return np.ascontiguousarray(values, dtype=np.float32)
    if qtype == T.F16:
        return values.astype(np.float16)
    return gguf.quants.quantize(values, qtype)  # BF16 (round to nearest even) and Q8_0, as ggml does


# ------------------------------------------------------------------------------------------------
# metadata


_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def _rope_metadata(writer, hp: HParams) -> None:
    """RoPE scaling and base, as llama.cpp's converter writes them for every architecture (the family's check has
    refused the types it cannot represent; llama3 is a tensor, dynamic has no key)."""
    import gguf

    rope = hp.rope
    kind = str(rope.get("rope_type", "default")).lower()
    factor = rope.get("factor")
    if kind == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    elif kind == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(rope.get("original_max_position_embeddings", hp.context))
        for key, add in (
            ("extrapolation_factor", writer.add_rope_scaling_yarn_ext_factor),
            ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
            ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
            ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
        ):
            if rope.get(key) is not None:
                add(rope[key])
    writer.add_rope_freq_base(float(rope["rope_theta"]))


def _general_metadata(writer, model_dir: Path, name: str | None, log: Log) -> None:
    """general.name, size label, base models, license, sampling defaults... read from the model card
    and generation_config.json by gguf's own metadata reader, so they match llama.cpp's converter."""
    import gguf

    counts = writer.get_total_parameter_count()
    try:
        meta = gguf.Metadata.load(None, model_dir, name, counts[0])
    except Exception as exc:  # a malformed model card must not stop an export
        log(f"model card metadata skipped ({exc})", "warning")
        meta = gguf.Metadata(name=name)
    if meta.name is None:
        meta.name = model_dir.name
    if meta.size_label is None and counts[0] > 0:
        meta.size_label = gguf.size_label(*counts)
    meta.set_gguf_meta_model(writer)


def write_metadata(
    writer, model_dir: Path, arch: Arch, hp: HParams, outtype: str, vocab, name: str | None, log: Log
) -> None:
    """The keys every family gets (those llama.cpp's converter writes for any text model), then the family's."""
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    _general_metadata(writer, model_dir, name, log)
    writer.add_block_count(hp.n_layers)
    writer.add_context_length(hp.context)
    writer.add_embedding_length(hp.hidden)
    writer.add_feed_forward_length(hp.ff)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_kv_head)
    _rope_metadata(writer, hp)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    if hp.explicit_head_dim:
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[outtype]))
    arch.metadata(writer, hp, log)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab.write(writer)


# ------------------------------------------------------------------------------------------------
# export


def _check_outtype(outtype: str) -> str:
    value = str(outtype).lower()
    if value not in OUTTYPES:
        raise UsageError(
            f"unknown GGUF output type {outtype!r}",
            hint=f"choose one of {', '.join(OUTTYPES)}; smaller types come from quantizing the "
            f"f16 export (llmforge gguf quantize)",
        )
    return value


def _check_out(out: Path) -> None:
    if out.is_dir():
        raise UsageError(f"{out} is a directory; the output is one .gguf file")


def export_gguf(
    model: Path, out: Path, outtype: str = "f16", *, log: Log | None = None, name: str | None = None
) -> dict:
    """Export a Hugging Face model directory (or a LoRA adapter directory, merged into its base first)
    to the GGUF file `out`. Written under a temporary name in the same folder and renamed into place:
    `out` appears complete or not at all. `name` is general.name (default: the model card's, else the folder's).
    Returns a summary."""
    log = log or _quiet
    outtype = _check_outtype(outtype)
    model = Path(model).expanduser()
    out = Path(out).expanduser().absolute()
    _check_out(out)
    if not model.exists():
        raise UsageError(f"model directory not found: {model}")
    if (model / "adapter_config.json").is_file():
        return _export_adapter(model, out, outtype, log, name)
    return _export_dir(model, out, outtype, log, name)


def _export_adapter(adapter: Path, out: Path, outtype: str, log: Log, name: str | None = None) -> dict:
    from llmforge_plugins.merge.engine import Reporter, merge_lora

    _precheck_adapter_base(adapter)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Merged next to the output (same disk, no tmpfs surprise), in a folder named like the adapter so
    # the GGUF's general.name is the adapter's.
    work = out.parent / f".{out.name}.merge-{os.getpid()}-{time.monotonic_ns()}"
    work.mkdir()
    try:
        merged = work / adapter.resolve().name
        log(f"{adapter}: a LoRA adapter; merging it into its base first")
        merge_lora(adapter, merged, report=Reporter(log=log))
        summary = _export_dir(merged, out, outtype, log, name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary["adapter"] = str(adapter)
    return summary


def _precheck_adapter_base(adapter: Path) -> None:
    """Refuse an unsupported base before spending a merge on it."""
    from llmforge.runs import read_json_object

    base = read_json_object(adapter / "adapter_config.json", "adapter config").get("base_model_name_or_path")
    cfg = Path(str(base)).expanduser() / "config.json" if base else None
    if cfg is not None and cfg.is_file():
        try:
            config = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return  # the merge reports it properly
        model_family(config, cfg.parent)


def _export_dir(model_dir: Path, out: Path, outtype: str, log: Log, name: str | None = None) -> dict:
    import gguf
    import numpy as np

    from llmforge_plugins.gguf.vocab import read_vocab

    started = time.monotonic()
    # the family first: an architecture llama.cpp cannot run is refused before any weight file is read
    config = read_model_config(model_dir)
    arch, hp = model_family(config, model_dir)
    files = ModelFiles(model_dir, config)
    arch.check(hp, log)
    planned, notes = plan_tensors(files, arch, hp, outtype)
    vocab = read_vocab(model_dir, files.config)
    for note in notes:
        log(note, "warning")

    writer = gguf.GGUFWriter(path=None, arch=arch.gguf_name)
    for p in planned:
        writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
    params = writer.get_total_parameter_count()[0]
    write_metadata(writer, model_dir, arch, hp, outtype, vocab, name, log)
    log(
        f"{model_dir}: {hp.architecture}, {hp.n_layers} layers, {params / 1e6:.1f} M parameters -> {out.name} "
        f"({outtype.upper()}, {len(planned)} tensors, tokenizer {vocab.model}/{vocab.pre})"
    )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for p in planned:
            values = p.values(files.read)
            writer.write_tensor_data(_convert(values, p.qtype))
            del values
        writer.flush()
        assert writer.fout is not None  # opened by write_header_to_file
        os.fsync(writer.fout[0].fileno())
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    seconds = time.monotonic() - started
    size = out.stat().st_size
    log(f"wrote {out} ({size / 2**20:.1f} MiB) in {seconds:.1f}s")
    return {
        "path": str(out),
        "tensors": len(planned),
        "bytes": size,
        "outtype": outtype,
        "arch": arch.gguf_name,
        "hf_architecture": hp.architecture,
        "params": params,
        "tokenizer": vocab.model,
        "pre": vocab.pre,
        "f16_fallbacks": len(notes),
        "seconds": round(seconds, 3),
    }
