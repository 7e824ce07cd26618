"""Tokenizer -> GGUF metadata: the vocabulary, merges or scores, special tokens, BOS/EOS flags and the
chat template, in the form llama.cpp reads them (`tokenizer.ggml.*`, `tokenizer.chat_template`).

Two tokenizer families are supported, the two a Llama-family checkpoint comes with:

* byte-level BPE from a `tokenizer.json` (GPT-2, Llama 3, SmolLM, Qwen2 and every tokenizer
  llmforge trains): `tokenizer.ggml.model = gpt2`, tokens, token types, merges and a
  `tokenizer.ggml.pre` naming the pre-tokenizer llama.cpp must reproduce;
* SentencePiece from a `tokenizer.model` (Llama 2, Mistral v0.1, TinyLlama): `tokenizer.ggml.model =
  llama`, tokens, scores and token types.

The pre-tokenizer is the delicate part. llama.cpp does not read the split regex from the file: it
has one hand-written splitter per name, and a wrong name tokenizes differently without any error.
Its converter names the pre-tokenizer by tokenizing a fixed text and hashing the token ids. Ids
depend on the learned vocabulary, so a tokenizer trained here would never match a published hash;
what identifies the splitter is the split itself. We run the same fixed text through the
tokenizer's normalizer and pre-tokenizer and hash the pieces: equal pieces on that text means the
same splitter. The hashes below were computed from each family's pre-tokenizer definition (its
tokenizer.json `normalizer` and `pre_tokenizer`; tests/test_gguf_export.py rebuilds them and checks
that llama.cpp then tokenizes like transformers). An unknown hash is a UsageError, never a guess.

What is hashed is the pipeline transformers really tokenizes with. Usually that is tokenizer.json's, but some
transformers 5 classes rebuild their own normalizer and pre-tokenizer from code (Qwen2Tokenizer, which it loads
for every model_type "qwen2" folder and wherever tokenizer_config.json names it): then the hash is taken on that
pipeline, so a Qwen2 model saved with a GPT-2-split tokenizer.json is written with the Qwen2 split it was
trained with, not the one its tokenizer.json names.

Only `tokenizers` (and `sentencepiece` for tokenizer.model) are imported, inside the functions:
transformers would cost seconds and hundreds of MB for what a JSON file says.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmforge.errors import UsageError
from llmforge.runs import read_json_object

#: The text llama.cpp's converter hashes to name a pre-tokenizer (convert_hf_to_gguf.py,
#: get_vocab_base_pre): whitespace runs, emoji, digit runs, scripts without spaces, apostrophes.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)


@dataclass(frozen=True)
class Split:
    pre: str  # the tokenizer.ggml.pre value llama.cpp knows
    what: str  # for messages
    ignore_merges: bool  # llama.cpp's BPE for this name looks whole words up before merging (or not)


#: sha256 of the pieces CHECK_TEXT splits into -> the llama.cpp pre-tokenizer doing the same split.
#: Recompute with `split_hash` on a tokenizer with that pre-tokenizer (tests/test_gguf_export.py does).
KNOWN_SPLITS: dict[str, Split] = {
    # ByteLevel(add_prefix_space=False, use_regex=True): GPT-2, and llmforge's train_tokenizer
    "b096ef75548e1044514df289d49bba71f1179745bc5b1d282ad815bf47c0d77e": Split("gpt-2", "GPT-2", False),
    # Split(Llama-3 regex, isolated) then ByteLevel(use_regex=False): Llama 3.x (ignore_merges in its BPE)
    "a879bcb7d1225413567a573174c82830de544abe206e5f1a0d5fa5abfb789015": Split("llama-bpe", "Llama-3", True),
    # Digits(individual_digits) then the GPT-2 ByteLevel: SmolLM and SmolLM2
    "c3b3e1e587b88b8d3c97ac964fbf56012048aca0627ee9d63998b7cfa02be5a0": Split("smollm", "SmolLM", False),
    # Split(Qwen2 regex: Llama-3's with single digits) then ByteLevel(use_regex=False), NFC: Qwen2 and 2.5
    "7c5a0e440e6520cfbd53dee106a669f97bc13dbc7eea279c4949b0a1f4cb3c5a": Split("qwen2", "Qwen2", False),
}

SPECIAL_KINDS = ("bos", "eos", "unk", "sep", "pad", "mask")


@dataclass
class Vocab:
    """Everything llama.cpp needs to tokenize like the Hugging Face tokenizer did."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: Any = None  # a string, or a list of {"name", "template"}

    def write(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.token_types)
        if self.merges:
            writer.add_token_merges(self.merges)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        # Written even when false: llama.cpp's defaults depend on `pre` (llama-bpe adds a BOS unless told
        # not to), and the tokenizer's own behaviour is what the model was trained with.
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


# ------------------------------------------------------------------------------------------------
# reading a model directory's tokenizer


def read_vocab(model_dir: Path, config: dict) -> Vocab:
    """The GGUF vocabulary of the tokenizer in `model_dir`, sized to the model's embedding rows
    (`config["vocab_size"]`). Raises UsageError for anything llama.cpp could not reproduce."""
    model_dir = Path(model_dir)
    n_vocab = config.get("vocab_size")
    if not isinstance(n_vocab, int) or n_vocab <= 0:
        raise UsageError(f"{model_dir / 'config.json'}: no valid vocab_size")
    tok_config = (
        _read_json(model_dir / "tokenizer_config.json") if (model_dir / "tokenizer_config.json").is_file() else {}
    )
    if (model_dir / "tokenizer.model").is_file():
        vocab = _sentencepiece_vocab(model_dir, n_vocab, tok_config)
    elif (model_dir / "tokenizer.json").is_file():
        vocab = _bpe_vocab(model_dir, n_vocab, _transformers_class(config, tok_config))
    else:
        raise UsageError(
            f"{model_dir}: no tokenizer (neither tokenizer.json nor tokenizer.model)",
            hint="save the tokenizer into the model folder (tokenizer.save_pretrained(folder))",
        )
    tokenizer = _load_tokenizer_json(model_dir) if (model_dir / "tokenizer.json").is_file() else None
    vocab.special_ids = _special_ids(vocab.tokens, tok_config, config, n_vocab)
    vocab.add_bos, vocab.add_eos = _adds_bos_eos(tokenizer, vocab.special_ids, tok_config, vocab.model)
    if isinstance(tok_config.get("add_prefix_space"), bool):
        vocab.add_space_prefix = tok_config["add_prefix_space"]
    vocab.chat_template = chat_template(model_dir, tok_config)
    return vocab


def _read_json(path: Path) -> dict:
    return read_json_object(path, path.name)


def _tok_config(model_dir: Path) -> dict:
    path = model_dir / "tokenizer_config.json"
    return _read_json(path) if path.is_file() else {}


def _load_tokenizer_json(model_dir: Path):
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers library raises its own Exception subclass
        raise UsageError(f"{path}: not a valid tokenizer file ({' '.join(str(exc).split())})") from None


def split_hash(tokenizer) -> str:
    """sha256 of the pieces CHECK_TEXT becomes after the tokenizer's normalizer and pre-tokenizer."""
    text = CHECK_TEXT
    if tokenizer.normalizer is not None:
        text = tokenizer.normalizer.normalize_str(text)
    pieces = [p for p, _ in tokenizer.pre_tokenizer.pre_tokenize_str(text)] if tokenizer.pre_tokenizer else [text]
    return hashlib.sha256(json.dumps(pieces, ensure_ascii=False).encode("utf-8")).hexdigest()


#: transformers 5 tokenizer classes that build their own normalizer and pre-tokenizer, ignoring tokenizer.json's
#: (only the vocabulary and merges are read from it)
REBUILT_PIPELINES = ("Qwen2Tokenizer",)
#: config.json model_type -> the class transformers 5 forces on that folder whatever tokenizer_config.json names
#: (transformers/models/auto/tokenization_auto.py: MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS with a specialised
#: TOKENIZER_MAPPING_NAMES entry; phi3's entry is the generic TokenizersBackend, which reads tokenizer.json)
FORCED_CLASSES = {"qwen2": "Qwen2Tokenizer"}
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _transformers_class(config: dict, tok_config: dict) -> str | None:
    """The rebuilding tokenizer class transformers loads for this folder, or None when it follows tokenizer.json.
    What matters is what the model was trained with, and transformers 5 loads its own Qwen2Tokenizer for any
    model_type "qwen2" folder, and whenever tokenizer_config.json names Qwen2Tokenizer (as Qwen's releases do)."""
    forced = FORCED_CLASSES.get(str(config.get("model_type") or ""))
    if forced:
        return forced
    named = str(tok_config.get("tokenizer_class") or "").removesuffix("Fast")
    return named if named in REBUILT_PIPELINES else None


def _rebuild_pipeline(tokenizer, cls: str, tok_config: dict) -> None:
    """Give `tokenizer` (read from tokenizer.json) the normalizer and pre-tokenizer transformers' `cls` uses, so the
    split hash names what the model's tokenizer really does."""
    from tokenizers import Regex, normalizers
    from tokenizers import pre_tokenizers as pt

    if cls == "Qwen2Tokenizer":
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pt.Sequence(
            [
                pt.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
                pt.ByteLevel(add_prefix_space=bool(tok_config.get("add_prefix_space", False)), use_regex=False),
            ]
        )


def _bpe_vocab(model_dir: Path, n_vocab: int, rebuilt: str | None = None) -> Vocab:
    import gguf

    path = model_dir / "tokenizer.json"
    raw = _read_json(path)
    model = raw.get("model") or {}
    kind = model.get("type")
    if kind != "BPE":
        raise UsageError(
            f"{path}: a {kind} tokenizer; GGUF export supports byte-level BPE (tokenizer.json) and "
            f"SentencePiece (tokenizer.model) tokenizers"
        )
    if model.get("byte_fallback"):
        raise UsageError(
            f"{path}: a SentencePiece-style BPE tokenizer (byte fallback) without its tokenizer.model",
            hint="put the original tokenizer.model next to tokenizer.json",
        )
    tokenizer = _load_tokenizer_json(model_dir)
    ignore_merges = bool(model.get("ignore_merges", False))
    if rebuilt:
        _rebuild_pipeline(tokenizer, rebuilt, _tok_config(model_dir))
        ignore_merges = False  # its BPE model is built with the default
    digest = split_hash(tokenizer)
    split = KNOWN_SPLITS.get(digest)
    if split is None:
        known = ", ".join(sorted({f"{s.pre} ({s.what})" for s in KNOWN_SPLITS.values()}))
        raise UsageError(
            f"{path}: unknown BPE pre-tokenizer (split hash {digest[:16]}); llama.cpp would split text "
            f"differently and the GGUF would tokenize wrongly",
            hint=f"supported pre-tokenizers: {known}. Train the tokenizer with one of these (llmforge's "
            f"own tokenizers use the GPT-2 split)",
        )
    if ignore_merges != split.ignore_merges:
        raise UsageError(
            f"{path}: the {split.what} pre-tokenizer with ignore_merges="
            f"{str(ignore_merges).lower()}; llama.cpp's '{split.pre}' tokenizer "
            f"{'does' if split.ignore_merges else 'does not'} look whole words up before merging, so "
            f"some words would tokenize differently"
        )

    by_id = {i: t for t, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    top = max(by_id, default=-1)
    if top >= n_vocab:
        raise UsageError(
            f"{path}: token id {top} ({by_id[top]!r}) is beyond the model's {n_vocab} embedding rows",
            hint="resize the model's embeddings to the tokenizer (model.resize_token_embeddings)",
        )
    added = tokenizer.get_added_tokens_decoder()
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        if i not in by_id:  # embedding rows no token uses (vocab padded to a round size)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            # Added tokens are stored as their text: llama.cpp matches them before byte-level encoding.
            tokens.append(added[i].content)
            types.append(
                gguf.TokenType.CONTROL
                if added[i].special or _looks_like_control(added[i].content)
                else gguf.TokenType.USER_DEFINED
            )
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return Vocab(
        model="gpt2",
        pre=split.pre,
        tokens=tokens,
        token_types=[int(t) for t in types],
        merges=_merges(model.get("merges") or [], path),
    )


def _looks_like_control(text: str) -> bool:
    # `<|...|>` markers are control tokens in every template that uses them, even when a tokenizer
    # forgot to flag them special (llama.cpp's converter types them so too).
    return text.startswith("<|") and text.endswith("|>")


def _merges(merges: list, path: Path) -> list[str]:
    """Merges as llama.cpp reads them: "left right", split at the first space after position 0."""
    out = []
    for m in merges:
        if isinstance(m, str):
            out.append(m)
        elif isinstance(m, (list, tuple)) and len(m) == 2:
            # tokenizers >= 0.20 stores pairs, which may hold a real space; in a byte-level vocabulary a
            # space byte is spelled U+0120, so spell it that way and the "a b" form stays unambiguous.
            out.append(" ".join(part.replace(" ", "\u0120") for part in m))
        else:
            raise UsageError(f"{path}: unreadable merge entry {m!r}")
    if not out:
        raise UsageError(f"{path}: a BPE tokenizer without merges")
    return out


def _sentencepiece_vocab(model_dir: Path, n_vocab: int, tok_config: dict) -> Vocab:
    import gguf

    path = model_dir / "tokenizer.model"
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise UsageError(
            f"{path}: a SentencePiece tokenizer, and the sentencepiece package is not installed",
            hint="pip install sentencepiece",
        ) from None
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as exc:
        raise UsageError(f"{path}: not a valid SentencePiece model ({exc})") from None
    if sp.vocab_size() > n_vocab:
        raise UsageError(f"{path}: {sp.vocab_size()} pieces, more than the model's {n_vocab} embedding rows")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [-1000.0] * n_vocab
    types = [int(gguf.TokenType.UNUSED)] * n_vocab
    for i in range(sp.vocab_size()):
        tokens[i] = sp.IdToPiece(i)
        scores[i] = sp.GetScore(i)
        if sp.IsUnknown(i):
            types[i] = gguf.TokenType.UNKNOWN
        elif sp.IsControl(i):
            types[i] = gguf.TokenType.CONTROL
        elif sp.IsUnused(i):
            types[i] = gguf.TokenType.UNUSED
        elif sp.IsByte(i):
            types[i] = gguf.TokenType.BYTE
        else:
            types[i] = gguf.TokenType.NORMAL
    # Tokens added on top of the SentencePiece model (chat markers, a pad token) live in tokenizer.json
    # or tokenizer_config.json; they are matched as whole strings, so they carry no score. The model's
    # own pieces listed there again (<unk>, <s>, </s>) keep the type and score SentencePiece gives them, except
    # pieces SentencePiece counts as ordinary text (Gemma's user-defined <start_of_turn>): transformers matches
    # those whole, so they are typed like added tokens, as llama.cpp's converter does, or llama.cpp spells them out.
    for i, (content, special) in _added_tokens(model_dir, tok_config).items():
        if i >= n_vocab:
            raise UsageError(
                f"{model_dir}: added token {content!r} has id {i}, beyond the model's {n_vocab} embedding rows"
            )
        if i < sp.vocab_size() and tokens[i] == content and types[i] != gguf.TokenType.NORMAL:
            continue
        tokens[i] = content
        scores[i] = -1000.0
        types[i] = gguf.TokenType.CONTROL if special or _looks_like_control(content) else gguf.TokenType.USER_DEFINED
    return Vocab(model="llama", pre="default", tokens=tokens, token_types=[int(t) for t in types], scores=scores)


def _added_tokens(model_dir: Path, tok_config: dict) -> dict[int, tuple[str, bool]]:
    out: dict[int, tuple[str, bool]] = {}
    if (model_dir / "tokenizer.json").is_file():
        for entry in _read_json(model_dir / "tokenizer.json").get("added_tokens") or []:
            out[int(entry["id"])] = (entry["content"], bool(entry.get("special")))
    for key, entry in (tok_config.get("added_tokens_decoder") or {}).items():
        out.setdefault(int(key), (entry["content"], bool(entry.get("special"))))
    return out


# ------------------------------------------------------------------------------------------------
# special tokens, BOS/EOS, chat template


def _special_ids(tokens: list[str], tok_config: dict, config: dict, n_vocab: int) -> dict[str, int]:
    """bos/eos/unk/sep/pad/mask ids: the tokenizer's named tokens first, the model config's ids second."""
    index: dict[str, int] = {}
    for i, t in enumerate(tokens):
        index.setdefault(t, i)
    out: dict[str, int] = {}
    for kind in SPECIAL_KINDS:
        entry = tok_config.get(f"{kind}_token")
        content = entry.get("content") if isinstance(entry, dict) else entry
        token_id = index.get(content) if isinstance(content, str) else None
        if token_id is None:
            value = config.get(f"{kind}_token_id")
            token_id = value if isinstance(value, int) and not isinstance(value, bool) else None
        if token_id is not None and 0 <= token_id < n_vocab:
            out[kind] = token_id
    return out


def _adds_bos_eos(tokenizer, special_ids: dict[str, int], tok_config: dict, model: str) -> tuple[bool, bool]:
    """Whether encoding a text adds BOS / EOS, as the Hugging Face tokenizer does it.

    transformers (v5) takes this from tokenizer.json's post-processor whenever tokenizer.json exists
    (it drops add_bos_token/add_eos_token from tokenizer_config.json then), so we ask the post-processor
    by encoding a text with and without special tokens. Without a tokenizer.json (a bare
    tokenizer.model) the config's flags decide, with SentencePiece Llama's defaults (BOS, no EOS)."""
    if tokenizer is None or tokenizer.post_processor is None:
        bos = tok_config.get("add_bos_token", model == "llama")
        eos = tok_config.get("add_eos_token", False)
        return bool(bos) and "bos" in special_ids, bool(eos) and "eos" in special_ids
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    extra = len(full) - len(plain)
    bos = extra > 0 and "bos" in special_ids and full[0] == special_ids["bos"] and full[1 : 1 + len(plain)] == plain
    eos = extra > 0 and "eos" in special_ids and full[-1] == special_ids["eos"] and full[-1 - len(plain) : -1] == plain
    return bos, eos


def chat_template(model_dir: Path, tok_config: dict) -> Any:
    """The tokenizer's chat template: chat_template.jinja (which transformers prefers, and where the
    training stages record it), else chat_template.json, else tokenizer_config.json's entry."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    as_json = model_dir / "chat_template.json"
    if as_json.is_file():
        value = _read_json(as_json).get("chat_template")
        if isinstance(value, str):
            return value
    value = tok_config.get("chat_template")
    if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, dict) for v in value)):
        return value
    return None
