"""GGUF export (F16) of a generated ~0.5 GB Llama, timed with its peak RSS, against llama.cpp's own
converter on the same folder in the same run; plus the time to quantize the export to Q4_K_M.

Usage: python bench/gguf.py [--dir /tmp/llmforge-bench-gguf] [--scale 1.0] [--runs 1]
                            [--llama-cpp-src PATH] [--write docs/benchmarks.md]
                            [--families all|llama,qwen2,... [--hidden 256]]

With --families, one row per model family instead (Llama, Qwen2, Qwen3, Gemma2, Gemma3, Phi3, Qwen3-MoE,
Mixtral): a small model of each (4 layers, hidden --hidden; the MoE ones 8 experts, top-2) built by transformers
from its config and saved with `save_pretrained` (per-expert tensors, as released MoE checkpoints are), with the
real vocabulary the converter recognises for that family (GPT-2's; Qwen2's for the Qwen families; a SentencePiece
model trained here for Gemma, whose vocabulary the converter reads from tokenizer.model); ours and the converter's
F16 export of it, interleaved, --runs times each, the median reported, and whether the two files hold the same
tensors; once, our export alone (`export_gguf`, without the Modelfile the command writes after it).

* llmforge: `llmforge gguf export MODEL OUT --outtype f16` (the command, start-up included);
* llama.cpp: `convert_hf_to_gguf.py MODEL --outfile OUT --outtype f16`, unmodified, with its own gguf-py, from
  --llama-cpp-src, else $LLMFORGE_LLAMA_CPP_SRC, else the source distribution of the installed llama-cpp-python
  (downloaded once with pip; the row is skipped when that fails). The converter names a BPE pre-tokenizer by
  hashing token ids, which only a real vocabulary matches, so the model carries GPT-2's real tokenizer, rebuilt
  from the vocabulary-only GGUF llama.cpp ships (`models/ggml-vocab-gpt-2.gguf`); the model's vocabulary is
  at least its 50,257 tokens (without the converter, a small trained tokenizer is used);
* quantize: `quantize_gguf(F16, Q4_K_M)` from llmforge_plugins.gguf.quantize, when that module exists.

Each runs in a child process of a small launcher that reports its wall time and peak RSS (`ru_maxrss`),
exactly as bench/merge.py measures. The inputs are in the page cache for all of them. --scale shrinks
the model's widths for a quick smoke run (0.25 gives ~40 MB); the figures for the record use 1.0.

Goals (issue 5): export no slower than llama.cpp's converter, and peak RSS under 1.5 x the largest
tensor + 300 MB (the export holds one tensor and its converted copy, never the model).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# This file is bench/gguf.py: with its folder on sys.path, `import gguf` would import this script instead
# of the gguf package. Take the folder off and load the sibling benches by path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_measure = _sibling("measure")
# the launcher and ru_maxrss measurement every bench shares, and the CPU/load lines every section records
measure, machine_line, load_line = _measure.measure, _measure.machine_line, _measure.load_line

MB = 1e6
BASE = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=5,
    num_attention_heads=16,
    num_key_value_heads=8,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)

QUANTIZE = r"""
import sys
from pathlib import Path
from llmforge_plugins.gguf.quantize import quantize_gguf
quantize_gguf(Path(sys.argv[1]), Path(sys.argv[2]), "Q4_K_M")
"""


def shape(scale: float) -> dict:
    def width(value: int, step: int, least: int) -> int:
        return max(least, int(round(value * scale / step)) * step)

    return {
        **BASE,
        "hidden_size": width(1024, 64, 64),
        "intermediate_size": width(2816, 32, 128),
        "vocab_size": width(32000, 64, 2048),
    }


def generate(root: Path, scale: float, src: Path | None) -> dict:
    """A float32 Llama with GPT-2's tokenizer (from llama.cpp's source `src`; else a small trained GPT-2-split
    byte-level BPE), written once and reused."""
    tokenizer = "gpt-2" if src is not None else "trained"
    marker = root / "generated.json"
    if (
        marker.exists()
        and json.loads(marker.read_text()).get("scale") == scale
        and json.loads(marker.read_text()).get("tokenizer") == tokenizer
    ):
        return json.loads(marker.read_text())
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    shutil.rmtree(root, ignore_errors=True)
    model = root / "model"
    model.mkdir(parents=True)
    dims = shape(scale)
    if src is not None:
        from llmforge_plugins.gguf.converter import vocab_tokenizer

        tok, _ = vocab_tokenizer(src, "gpt-2", root / "tokenizer")
        tok.save_pretrained(str(model))
        dims["vocab_size"] = max(dims["vocab_size"], -(-len(tok) // 64) * 64)
    else:
        _tokenizer(model)
    cfg = LlamaConfig(**dims, bos_token_id=1, eos_token_id=0, pad_token_id=2)
    cfg.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in LlamaForCausalLM(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    tensors = {
        n: (torch.ones(s) if n.endswith("norm.weight") else torch.randn(s, generator=gen) * 0.02)
        for n, s in shapes.items()
    }
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(str(model))
    info = {
        "scale": scale,
        "tokenizer": tokenizer,
        "shape": dims,
        "params": sum(t.numel() for t in tensors.values()),
        "largest_tensor_bytes": max(t.numel() for t in tensors.values()) * 4,
        "model_bytes": (model / "model.safetensors").stat().st_size,
    }
    marker.write_text(json.dumps(info))
    return info


def _tokenizer(path: Path) -> None:
    """A small byte-level BPE with the GPT-2 split (llmforge's kind); the model's vocab pads beyond it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = ["alpha", "beta", "gamma", "delta", "Köln", "Straße", "мир", "東京", "3.14", "it's", "tokens"]
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(2000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainer=trainers.BpeTrainer(
            vocab_size=1000,
            special_tokens=["<|im_end|>", "<|im_start|>", "<|endoftext|>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>", pad_token="<|endoftext|>"
    ).save_pretrained(str(path))


def find_converter(explicit: str | None) -> Path | None:
    src = explicit or os.environ.get("LLMFORGE_LLAMA_CPP_SRC")
    if not src:
        from llmforge.errors import UsageError
        from llmforge_plugins.gguf.converter import llama_cpp_source

        try:
            return llama_cpp_source()
        except UsageError as exc:
            print(f"llama.cpp's converter: {exc.message}; its row is skipped", flush=True)
            return None
    src = Path(src).expanduser()
    if not (src / "convert_hf_to_gguf.py").is_file():
        raise SystemExit(f"{src}: no convert_hf_to_gguf.py there")
    return src


def identical(a: Path, b: Path) -> bool:
    """Same tensor names, types and bytes in two GGUF files."""
    import gguf

    ta = {t.name: t for t in gguf.GGUFReader(str(a)).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(str(b)).tensors}
    return sorted(ta) == sorted(tb) and all(
        ta[n].tensor_type == tb[n].tensor_type and bytes(ta[n].data) == bytes(tb[n].data) for n in ta
    )


EXPORT_ALONE = r"""
import sys
from pathlib import Path
from llmforge_plugins.gguf.export import export_gguf
export_gguf(Path(sys.argv[1]), Path(sys.argv[2]), "f16")
"""

#: family -> (transformers config class, model class, config values over FAMILY_BASE, vocabulary)
FAMILY_MODELS: dict[str, tuple[str, str, dict, str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, "gpt-2"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, "qwen2"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 128, "tie_word_embeddings": True}, "qwen2"),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {"head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 128, "tie_word_embeddings": True},
        "sentencepiece",
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        # the converter writes no per-layer pattern: llama.cpp's default (every layer sliding here, as in the tests)
        {
            "head_dim": 64,
            "query_pre_attn_scalar": 64,
            "sliding_window": 128,
            "tie_word_embeddings": True,
            "layer_types": ["sliding_attention"] * 4,
        },
        "sentencepiece",
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"partial_rotary_factor": 0.5}, "gpt-2"),
    "qwen3moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {"num_local_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 256, "norm_topk_prob": True},
        "qwen2",
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {"num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": None, "intermediate_size": 256},
        "gpt-2",
    ),
}
FAMILY_BASE = dict(
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)


def family_model(root: Path, family: str, hidden: int, src: Path) -> dict:
    """A float32 model of `family` with its vocabulary, written once per (family, hidden) and reused."""
    marker = root / family / "generated.json"
    if marker.exists() and json.loads(marker.read_text()).get("hidden") == hidden:
        return json.loads(marker.read_text())
    import torch
    import transformers

    config_class, model_class, extra, vocab = FAMILY_MODELS[family]
    shutil.rmtree(root / family, ignore_errors=True)
    model = root / family / "model"
    if vocab == "sentencepiece":
        tok = _sentencepiece(root / family / "sp")
    else:
        from llmforge_plugins.gguf.converter import vocab_tokenizer

        tok, _ = vocab_tokenizer(src, vocab, root / family / "tokenizer")
    values = {
        **FAMILY_BASE,
        "hidden_size": hidden,
        "intermediate_size": hidden * 11 // 4,
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        **extra,
    }
    cfg = getattr(transformers, config_class)(**values)
    torch.manual_seed(0)
    hf = getattr(transformers, model_class)(cfg)
    # save_pretrained writes the per-expert tensors released MoE checkpoints have (the converter reads those)
    hf.save_pretrained(str(model))
    tok.save_pretrained(str(model))
    if vocab == "sentencepiece":
        # as the Gemma byte-identity test: tokenizer.model with its hand-written tokenizer_config.json only
        for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            (model / file).unlink(missing_ok=True)
        for file in ("tokenizer.model", "tokenizer_config.json"):
            shutil.copy(root / family / "sp" / file, model / file)
    if family == "phi3":
        # the converter does not carry add_prefix_space over for Phi-3 (see the byte-identity test)
        tc = json.loads((model / "tokenizer_config.json").read_text())
        tc.pop("add_prefix_space", None)
        (model / "tokenizer_config.json").write_text(json.dumps(tc))
    state = hf.state_dict()
    info = {
        "hidden": hidden,
        "vocab": vocab,
        "vocab_size": len(tok),
        "params": sum(t.numel() for t in state.values()),
        "largest_tensor_bytes": max(t.numel() for t in state.values()) * 4,
        "model_bytes": sum(f.stat().st_size for f in model.glob("*.safetensors")),
    }
    marker.write_text(json.dumps(info))
    return info


def _sentencepiece(folder: Path):
    """Gemma's kind of tokenizer: a SentencePiece BPE trained here (byte fallback, <pad>/<eos>/<bos>/<unk> at 0-3)."""
    import io

    import sentencepiece as spm
    from transformers import AutoTokenizer

    words = ["alpha", "beta", "gamma", "delta", "Köln", "Straße", "мир", "東京", "3.14", "it's", "tokens"]
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(2000)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=buf,
        vocab_size=350,  # the 256 byte pieces, the specials, and merges this small corpus has
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"],
        minloglevel=2,
    )
    folder.mkdir(parents=True)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    special = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GemmaTokenizer", **special}))
    return AutoTokenizer.from_pretrained(str(folder))


def run_families(args, root: Path, src: Path | None, llmforge_cmd: list[str]) -> int:
    """One row per family: ours vs llama.cpp's converter, F16, interleaved, medians."""
    if src is None:
        raise SystemExit("--families compares with llama.cpp's converter: give --llama-cpp-src")
    from llmforge_plugins.gguf.converter import converter_command

    names = list(FAMILY_MODELS) if args.families == "all" else args.families.split(",")
    unknown = [n for n in names if n not in FAMILY_MODELS]
    if unknown:
        raise SystemExit(f"unknown families {unknown}; choose from {', '.join(FAMILY_MODELS)}")
    infos = {name: family_model(root, name, args.hidden, src) for name in names}
    results: dict[str, dict[str, list[tuple[float, float]]]] = {
        n: {"ours": [], "theirs": [], "export": []} for n in names
    }
    for run in range(args.runs):
        for name in names:
            model, ours, theirs = root / name / "model", root / name / "ours-f16.gguf", root / name / "theirs-f16.gguf"
            cmd, env = converter_command(src, model, theirs, "f16")
            commands = [
                ("ours", [*llmforge_cmd, "gguf", "export", str(model), str(ours), "--outtype", "f16", "--force"]),
                ("theirs", ["env", f"PYTHONPATH={env['PYTHONPATH']}", *cmd]),
            ]
            if run == 0:
                # the command also writes the Ollama Modelfile, which re-reads the file's metadata: once, the
                # export alone (export_gguf in a fresh interpreter), to tell the two apart
                alone = root / name / "alone-f16.gguf"
                alone.unlink(missing_ok=True)
                commands.append(("export", [sys.executable, "-c", EXPORT_ALONE, str(model), str(alone)]))
            for who, command in commands:
                wall, rss = measure(command)
                results[name][who].append((wall, rss))
                print(f"{name} {who}: {wall:.1f} s, peak RSS {rss / MB:.0f} MB", flush=True)

    def med(name: str, who: str, i: int) -> float:
        return statistics.median(r[i] for r in results[name][who])

    lines = [
        f"- {machine_line()}; {args.runs} run(s) each, interleaved: median",
        f"- {load_line()}",
        f"- input per family: 4 layers, hidden {args.hidden}, FFN {args.hidden * 11 // 4} (MoE: 8 experts of FFN 256, "
        "top-2), float32 safetensors from `save_pretrained`; output F16; ours = `llmforge gguf export --outtype f16`, "
        "llama.cpp = `convert_hf_to_gguf.py --outtype f16` (unmodified), each a fresh process",
        "",
        "| family | params | vocab | ours: time | llama.cpp: time | ours: peak RSS | llama.cpp: peak RSS | "
        "RSS goal (1.5 × largest + 300 MB) | no slower | RSS under goal | same tensors | export alone (1 run) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ok = True
    for name in names:
        info = infos[name]
        budget = 1.5 * info["largest_tensor_bytes"] + 300 * MB
        ow, tw = med(name, "ours", 0), med(name, "theirs", 0)
        orss, trss = med(name, "ours", 1), med(name, "theirs", 1)
        same = identical(root / name / "ours-f16.gguf", root / name / "theirs-f16.gguf")
        faster, small = ow <= tw, orss <= budget
        ok = ok and faster and small
        lines.append(
            f"| {name} | {info['params'] / 1e6:.1f} M | {info['vocab']} ({info['vocab_size']}) | {ow:.1f} s | "
            f"{tw:.1f} s | {orss / MB:.0f} MB | {trss / MB:.0f} MB | {budget / MB:.0f} MB | "
            f"{'met' if faster else 'not met'} ({ow / tw:.2f} ×) | {'met' if small else 'not met'} | "
            f"{'yes' if same else 'no'} | {results[name]['export'][0][0]:.1f} s, "
            f"{results[name]['export'][0][1] / MB:.0f} MB |"
        )
    print("\n".join(lines))
    if args.write:
        _sibling("startup")._update(args.write, "gguf-families", "\n".join(lines))
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=Path("/tmp/llmforge-bench-gguf"))
    ap.add_argument("--scale", type=float, default=1.0, help="width factor of the generated model (1.0: ~0.5 GB)")
    ap.add_argument("--runs", type=int, default=1, help="runs of each, interleaved; the median is reported")
    ap.add_argument(
        "--llama-cpp-src",
        help="llama.cpp source folder (default: $LLMFORGE_LLAMA_CPP_SRC, else "
        "llama-cpp-python's source distribution, downloaded once)",
    )
    ap.add_argument("--write", type=Path, help="update this markdown file's gguf section")
    ap.add_argument("--families", help="'all' or a comma list: one row per family instead of the Llama figure")
    ap.add_argument("--hidden", type=int, default=256, help="hidden size of the --families models")
    args = ap.parse_args()
    root = args.dir.resolve()
    src = find_converter(args.llama_cpp_src)
    if args.families:
        llmforge = shutil.which("llmforge", path=str(Path(sys.executable).parent))
        return run_families(
            args, root / "families", src, [llmforge] if llmforge else [sys.executable, "-m", "llmforge"]
        )
    info = generate(root, args.scale, src)
    model = root / "model"
    llmforge = shutil.which("llmforge", path=str(Path(sys.executable).parent))
    llmforge_cmd = [llmforge] if llmforge else [sys.executable, "-m", "llmforge"]
    ours, theirs, q4 = root / "llmforge-f16.gguf", root / "llama-cpp-f16.gguf", root / "llmforge-q4_k_m.gguf"
    has_quantize = importlib.util.find_spec("llmforge_plugins.gguf.quantize") is not None

    results: dict[str, list[tuple[float, float]]] = {"llmforge": [], "llama.cpp": [], "quantize": []}
    for _ in range(args.runs):
        for name in ("llmforge", "llama.cpp", "quantize"):
            if name == "llmforge":
                cmd = [*llmforge_cmd, "gguf", "export", str(model), str(ours), "--outtype", "f16", "--force"]
            elif name == "llama.cpp":
                if src is None:
                    continue
                from llmforge_plugins.gguf.converter import converter_command

                cmd, env = converter_command(src, model, theirs, "f16")
                cmd = ["env", f"PYTHONPATH={env['PYTHONPATH']}", *cmd]  # the launcher passes its own environment on
            else:
                if not has_quantize:
                    continue
                q4.unlink(missing_ok=True)
                cmd = [sys.executable, "-c", QUANTIZE, str(ours), str(q4)]
            wall, rss = measure(cmd)
            results[name].append((wall, rss))
            print(f"{name}: {wall:.1f} s, peak RSS {rss / MB:.0f} MB", flush=True)

    def med(name: str, i: int) -> float:
        return statistics.median(r[i] for r in results[name])

    def cell(name: str, i: int, scale: float, unit: str) -> str:
        """median (min-max): the spread says how far one run can be trusted on this machine"""
        vals = [r[i] / scale for r in results[name]]
        digits = 1 if unit == "s" else 0
        return f"{statistics.median(vals):.{digits}f} {unit} ({min(vals):.{digits}f}-{max(vals):.{digits}f})"

    budget = 1.5 * info["largest_tensor_bytes"] + 300 * MB
    lf_wall, lf_rss = med("llmforge", 0), med("llmforge", 1)
    dims = info["shape"]
    lines = [
        f"- {machine_line()}; {args.runs} run(s) each, interleaved: median (min-max)",
        f"- {load_line()}",
        f"- input: Llama {dims['num_hidden_layers']} layers, hidden {dims['hidden_size']}, vocab "
        f"{dims['vocab_size']}, {info['params'] / 1e6:.1f} M parameters, {info['model_bytes'] / 2**20:.0f} MiB in "
        f"float32 (scale {args.scale}); largest tensor {info['largest_tensor_bytes'] / MB:.0f} MB; output F16 "
        f"{ours.stat().st_size / 2**20:.0f} MiB",
        "",
        "| | wall time | peak RSS |",
        "|---|---|---|",
        f"| `llmforge gguf export --outtype f16` | {cell('llmforge', 0, 1, 's')} | {cell('llmforge', 1, MB, 'MB')} |",
    ]
    goals = [
        f"peak RSS under 1.5 × largest tensor + 300 MB = {budget / MB:.0f} MB: "
        f"{'met' if lf_rss <= budget else 'NOT met'} ({lf_rss / MB:.0f} MB)"
    ]
    ok = lf_rss <= budget
    if results["llama.cpp"]:
        lc_wall, lc_rss = med("llama.cpp", 0), med("llama.cpp", 1)
        lines.append(
            f"| llama.cpp `convert_hf_to_gguf.py --outtype f16` | {cell('llama.cpp', 0, 1, 's')} | "
            f"{cell('llama.cpp', 1, MB, 'MB')} |"
        )
        goals.insert(
            0,
            f"no slower than llama.cpp's converter: {'met' if lf_wall <= lc_wall else 'NOT met'} "
            f"({lf_wall / lc_wall:.2f} × its time, {lf_rss / lc_rss:.2f} × its peak RSS)",
        )
        goals.append(f"the two F16 files hold byte-identical tensors: {'yes' if identical(ours, theirs) else 'NO'}")
        ok = ok and lf_wall <= lc_wall
    else:
        lines.append("| llama.cpp `convert_hf_to_gguf.py` | not run (no --llama-cpp-src) | |")
    if results["quantize"]:
        lines.append(
            f"| quantize F16 -> Q4_K_M (`quantize_gguf`) | {cell('quantize', 0, 1, 's')} | "
            f"{cell('quantize', 1, MB, 'MB')} |"
        )
    else:
        lines.append("| quantize F16 -> Q4_K_M | not run (no llmforge_plugins.gguf.quantize) | |")
    lines += [""] + [f"- {g}" for g in goals]
    print("\n".join(lines))
    if args.write:
        _sibling("startup")._update(args.write, "gguf", "\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
