"""Model families for GGUF export: one small module per family, one line each in `ARCHES`.

The export (plugins/gguf/export.py) is family-agnostic: it indexes the safetensors files, asks the family's `Arch`
for the hyperparameters, the metadata and the tensor plan, then streams the tensors into the file one at a time.
A family says only what differs from a Llama-shaped decoder. To add one (say `gemma.py`):

1. subclass `Arch` (from `llmforge_plugins.gguf.arch.base`) and set its class attributes;
2. override the hooks that differ;
3. import it below and add an instance to `ARCHES`. export.py does not change.

The interface (`base.py`):

Class attributes
    hf_names: tuple[str, ...]       config.json `architectures[0]` values it exports ("Qwen2ForCausalLM",)
    gguf_arch: str                  gguf.MODEL_ARCH member name ("QWEN2"); names and keys come from gguf's tables
    activations: tuple[str, ...]    accepted `hidden_act` (or `hidden_activation`) values; default ("silu",)
    rope_types: tuple[str, ...]     accepted RoPE scaling types; default ("default", "linear", "yarn")
    permute_rope: bool              regroup q/k rows for llama.cpp's pair-wise RoPE (llama.cpp's `llama` arch only)
    norm_offset: float              added to every HF `*norm.weight` (Gemma: 1.0); default 0
    layer_parts: tuple[str, ...]    required per block, GGUF names after `blk.N.` ("attn_q.bias", ...);
                                    anything else that maps is optional (written when present)
    skip_suffixes: tuple[str, ...]  HF names ending so are dropped; default ("rotary_emb.inv_freq",)

Hooks (self, ...), each with a default that fits Llama-shaped models
    hparams(config, where) -> HParams
        the common hyperparameters; raise UsageError naming the key (helpers need_int, opt_int, need_float,
        rope_parameters). Put family values in hp.extra, or read hp.config in the other hooks.
    check(hp, log) -> None
        refuse (UsageError) or warn (log(msg, "warning")); the base checks activation, RoPE type and warns about
        a sliding window (`sliding_window(hp)`) the architecture does not apply. Override sliding_window (or
        check) when the architecture does apply one.
    metadata(writer, hp, log) -> None
        family keys (writer is a gguf.GGUFWriter), written after the common ones: block_count, context_length,
        embedding_length, feed_forward_length, head_count, head_count_kv, RoPE scaling and freq_base,
        layer_norm_rms_epsilon, key_length/value_length (when config.json has head_dim), file_type.
    plan(files, hp) -> list[Planned]
        every GGUF tensor read from the checkpoint (files: export.ModelFiles, `files.tensors` maps HF name ->
        TensorRef with .shape and .dtype). The base maps each HF tensor one to one with `planned()` (gguf's name
        map + `steps()`), skipping skip_suffixes and a tied lm_head. To combine tensors (stack experts), take
        the group's names out, emit a Planned with several `sources` and a `make(read)`, and pass the rest to
        `self.planned`.
    steps(hp, hf_name, gguf_name, shape) -> tuple[Step, ...]
        per-tensor transforms applied in order to the float32 numpy values: the base adds
        partial(rope_permute, n_head=...) for q/k when permute_rope, partial(add_offset, offset=norm_offset)
        for norms. Extend with super().
    extra_tensors(hp) -> list[Planned]
        generated tensors (Planned.data set, sources ()): Llama 3.1's rope_freqs.
    check_tensors(files, hp, by_name) -> None
        the embedding's shape, the head when untied, layer_parts in every layer.

Planned (one GGUF tensor)
    name            GGUF tensor name
    sources         HF tensor names it is made from (() when generated); their dtypes are checked by the export
    shape           numpy shape written (after make and steps)
    steps           transforms, in order
    make(read)      optional: builds the values from several sources; read(hf_name) -> float32 array
    data            a generated tensor's values
    f32             keep in F32 whatever the output type. The export also keeps 1-D tensors, `*_norm.weight`,
                    biases and routers (`ffn_gate_inp`, `ffn_gate_inp_shexp`) in F32, as llama.cpp's converter does.
    qtype           set by the export from the output type (Q8_0 falls back to F16 for rows that are not whole
                    blocks)

Nothing heavy is imported at module level (numpy and gguf inside functions): `llmforge --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

from llmforge.errors import UsageError
from llmforge_plugins.gguf.arch.base import Arch, HParams, Planned, supported_names
from llmforge_plugins.gguf.arch.gemma import Gemma2, Gemma3
from llmforge_plugins.gguf.arch.llama import Llama
from llmforge_plugins.gguf.arch.moe import Mixtral, Qwen3Moe
from llmforge_plugins.gguf.arch.phi3 import Phi3
from llmforge_plugins.gguf.arch.qwen import Qwen2, Qwen3

#: Every family the export knows, in the order the refusal lists them. One instance per family module.
ARCHES: tuple[Arch, ...] = (
    Llama(),
    Qwen2(),
    Qwen3(),
    Phi3(),
    Qwen3Moe(),
    Mixtral(),
    Gemma2(),
    Gemma3(),
)

__all__ = ["ARCHES", "Arch", "HParams", "Planned", "find_arch", "supported"]


def supported() -> list[str]:
    """The HF architectures GGUF export accepts."""
    return supported_names(ARCHES)


def find_arch(config: dict, where: Path) -> Arch:
    """The family of the model whose config.json is `config`; UsageError listing the supported ones otherwise."""
    name = (config.get("architectures") or [None])[0]
    for arch in ARCHES:
        if name in arch.hf_names:
            return arch
    raise UsageError(
        f"{where}: architecture {name or '(none given)'} is not supported by GGUF export",
        hint=f"supported: {', '.join(supported())} (SmolLM and TinyLlama are LlamaForCausalLM)",
    )
