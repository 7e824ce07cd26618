"""Did the model survive the trip to GGUF? A scorecard comparing each GGUF (run by llama.cpp) with the HF model
it came from (run by transformers, fp32), on the same token ids.

Per file:
* tokenization: a fixed text mixing English, accented Latin, CJK, emoji, code and digits must give the same
  token ids through the HF tokenizer and through llama.cpp's (the GGUF's vocabulary, merges and
  pre-tokenizer);
* logits parity on the token ids of a held-out text (HF's tokenization, fed to both sides, so tokenizer
  differences cannot hide or fake a logits problem): mean KL divergence KL(HF || GGUF) per position, how often
  the top-1 token agrees, and the largest logit error relative to the logits' scale at that position;
* perplexity of the GGUF on that text and its difference from the HF model's (or from `reference`'s, e.g. the
  F16 export, when given: the quantization's own cost);
* size on disk and bits per weight (file bytes * 8 / the HF model's parameter count).

Long texts are evaluated in windows no longer than the model's context (and WINDOW_MAX), each from an empty
cache, on both sides alike. llama.cpp runs in a child process (llmforge.native). No heavy import at module level.

Downstream deltas (with eval tasks: the gguf stage's `tasks`, `llmforge gguf check --task`): logits parity says
how far a quant's next-token distribution drifts; what users ship on is whether it still answers. Each task
(plugins/eval: task specs, eval models) runs on the HF model (transformers) and on each file (llama.cpp), and
the card gets, per file, every task metric next to the HF model's with the delta (file - HF), and for the tasks
that generate text the similarity of the file's answers to the HF model's: the cosine of their embeddings (the
HF model's own mean last hidden state, EvalModel.embed) averaged over items, as quantization-loss studies
compare answers, and the share of answers that are identical.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from pathlib import Path

from llmforge.errors import UsageError
from llmforge.formatting import fmt_bytes

Log = Callable[..., None]

WINDOW_MAX = 1024  # tokens per evaluation window
# The HF logits of the whole text are kept (tokens x vocabulary floats, 2.4 GB at 4096 x 150k) while each GGUF
# runs; a few hundred tokens already tell a broken export from a good one, so a longer text is cut here.
MAX_TOKENS = 4096
BLOCK = 64  # positions compared at once in float64 (a large vocabulary makes whole windows costly)

# Exercises the pre-tokenizer's hard cases: contractions, accents, scripts without spaces, emoji (multi-byte,
# joiners), code with indentation and punctuation runs, digit groups, repeated whitespace.
TOKENIZER_PROBE = (
    "Hello, world! It's a fine day; we'll see what they've done.\n"
    "Crème brûlée, naïve façade, Ærøskøbing, São Paulo, Dvořák, straße, ĳssel.\n"
    "東京は日本の首都です。我喜欢学习中文。한국어 문장도 있습니다。\n"
    "Emoji: 😀 👍🏽 🦙🦙 👨‍👩‍👧 ✅\n"
    'def add(a, b):\n    return a + b  # sum\n\tif x >= 10 and y != -3: print(f"{x:>8}")\n'
    "Digits: 0 7 42 365 2024 31415926 3.14159 1,000,000 -0.5e-3\n"
    "   leading spaces, trailing spaces   \n\n\nblank lines above ... !!! ??? ---\n"
)

# The built-in held-out text for logits and perplexity: ordinary prose, written for this check (not taken
# from a corpus a model may have been trained on), plus a little of everything the probe has.
HELD_OUT_TEXT = (
    "The harbour town woke slowly that morning. Fishing boats came back before sunrise, and by seven the "
    "market stalls were covered with silver fish, crates of lemons and baskets of bread still warm from the "
    "oven. An old man sold coffee from a cart with a squeaking wheel; he had done so for forty-two years, and "
    "he knew which of his customers wanted sugar before they said a word.\n\n"
    'At the end of the pier, a girl was teaching her younger brother to count the waves. "One, two, three," '
    'she said, "and the seventh is always the biggest." He did not believe her, so they counted together '
    "until the tide turned. The seventh wave was not always the biggest, but neither of them mentioned it.\n\n"
    "In the afternoon the wind rose. Shutters banged, a newspaper flew across the square, and the café owner "
    "carried her chairs inside two at a time. Someone wrote on the chalkboard: soup of the day, 4.50; tea, "
    "2.00; cake, ask inside. By evening the storm had passed, the streets smelled of rain and salt, and the "
    "lights of the town came on one window after another.\n\n"
    "def mean(values):\n    return sum(values) / len(values) if values else 0.0\n\n"
    "Résumé: the café opened in 1987 and now serves about 300 guests a day. 東京から来た旅行者もいます。 "
    'Travellers leave notes on the wall: "Merci!", "Danke!", "Gracias!" and a small drawing of a boat. '
    "When the season ends, the notes are taken down, read once more, and kept in a box under the counter."
)


def _quiet(message: str, level: str = "info") -> None:
    pass


# ------------------------------------------------------------------------------------------------
# numbers


def _log_softmax(x):
    import numpy as np

    x = x.astype(np.float64, copy=False)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class _Stats:
    """Running sums over every position of every window for one GGUF against the HF logits."""

    def __init__(self):
        self.positions = 0
        self.kld = 0.0
        self.top1 = 0
        self.max_rel = 0.0
        self.nll = 0.0
        self.predicted = 0

    def add(self, hf_logits, gg_logits, ids) -> None:
        import numpy as np

        n = len(ids)
        for lo in range(0, n, BLOCK):
            hi = min(n, lo + BLOCK)
            h, g = hf_logits[lo:hi], gg_logits[lo:hi]
            lp, lq = _log_softmax(h), _log_softmax(g)
            self.kld += float((np.exp(lp) * (lp - lq)).sum())
            self.top1 += int((h.argmax(axis=-1) == g.argmax(axis=-1)).sum())
            scale = np.maximum(np.abs(h).max(axis=-1), 1e-12)
            self.max_rel = max(self.max_rel, float((np.abs(g - h).max(axis=-1) / scale).max()))
            # the logits at position t predict token t + 1: the last position of a window predicts nothing
            targets = np.asarray(ids[lo + 1 : hi + 1])
            rows = np.arange(len(targets))
            self.nll -= float(lq[rows, targets].sum())
            self.predicted += len(targets)
        self.positions += n

    def row(self) -> dict:
        return {
            "ppl": math.exp(self.nll / self.predicted),
            "mean_kld": self.kld / self.positions,
            "top1": self.top1 / self.positions,
            "max_rel_logit_error": self.max_rel,
        }


def _perplexity(logits_windows, windows) -> float:
    import numpy as np

    nll, count = 0.0, 0
    for logits, ids in zip(logits_windows, windows):
        for lo in range(0, len(ids) - 1, BLOCK):
            hi = min(len(ids) - 1, lo + BLOCK)
            lp = _log_softmax(logits[lo:hi])
            nll -= float(lp[np.arange(hi - lo), np.asarray(ids[lo + 1 : hi + 1])].sum())
            count += hi - lo
    return math.exp(nll / count)


# ------------------------------------------------------------------------------------------------
# the two sides


_HEADER_KEYS = ("general.architecture", "general.file_type")


def _gguf_info(path: Path) -> dict:
    """What the header says: type (general.file_type, else guessed from the name), context length, size."""
    from llmforge_plugins.gguf.metadata import read_metadata
    from llmforge_plugins.gguf.quantize import QUANT_TYPES, file_type_name

    # a few header keys, without parsing the vocabulary; a truncated or damaged file is a UsageError naming it
    meta = read_metadata(path, lambda key: key in _HEADER_KEYS or key.endswith(".context_length"))
    arch = meta.get("general.architecture")
    qtype = file_type_name(meta.get("general.file_type"))
    if qtype is None:
        upper = path.name.upper()
        found = [name for name in QUANT_TYPES if re.search(rf"(?<![A-Z0-9]){name}(?![A-Z0-9_])", upper)]
        qtype = max(found, key=len) if found else "?"
    n_ctx = meta.get(f"{arch}.context_length") if arch else None
    return {"type": qtype, "n_ctx_train": int(n_ctx) if n_ctx else None, "bytes": path.stat().st_size}


def _hf_logits(net, windows) -> list:
    import torch

    out = []
    with torch.no_grad():
        for ids in windows:
            out.append(net(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().numpy())
    return out


def _eval_gguf(path: Path, n_ctx: int, windows, hf_logits, probe_ids, vocab: int) -> dict:
    # llama.cpp runs in a child process (llmforge.native): a native crash there is a ForgeError naming this file
    # and the signal, not the end of the run that asked for the scorecard.
    from llmforge.native import LlamaModel

    start = time.monotonic()
    with LlamaModel(path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True) as llm:
        if llm.n_vocab != vocab:
            raise UsageError(
                f"{path}: vocabulary of {llm.n_vocab} tokens, the HF model has {vocab}",
                hint="was this GGUF exported from this model?",
            )
        gg_probe = llm.tokenize(TOKENIZER_PROBE, add_bos=False, special=False)
        stats = _Stats()
        for ids, h in zip(windows, hf_logits):
            stats.add(h, llm.logits(ids), ids)
    return {**stats.row(), **_tokenization(probe_ids, gg_probe), "seconds": round(time.monotonic() - start, 3)}


def _tokenization(hf_ids: list[int], gg_ids: list[int]) -> dict:
    if hf_ids == gg_ids:
        return {"tokenization_ok": True, "tokenization_diff": None}
    at = next((i for i, (a, b) in enumerate(zip(hf_ids, gg_ids)) if a != b), min(len(hf_ids), len(gg_ids)))
    return {
        "tokenization_ok": False,
        "tokenization_diff": {
            "at": at,
            "hf": hf_ids[at : at + 8],
            "gguf": gg_ids[at : at + 8],
            "hf_tokens": len(hf_ids),
            "gguf_tokens": len(gg_ids),
        },
    }


# ------------------------------------------------------------------------------------------------
# the scorecard


def check_gguf(
    model: Path,
    ggufs: list[Path],
    *,
    text: str | None = None,
    reference: Path | None = None,
    log: Log | None = None,
    tasks: list | None = None,
    registry=None,
    **downstream_options,
) -> dict:
    """Score each GGUF in `ggufs` against the HF model (or adapter) `model`; see the module docstring. With
    `tasks` ((task kind, options) pairs) and the `registry` their eval models come from, the card also has
    `downstream` (see :func:`downstream`; its keyword options pass through)."""
    from llmforge_plugins.gguf.imatrix import load_hf

    log = log or _quiet
    ggufs = [Path(g) for g in ggufs]
    if not ggufs:
        raise UsageError("no GGUF file to check")
    reference = Path(reference) if reference is not None else None
    infos = {p: _gguf_info(p) for p in [*ggufs, *([reference] if reference else [])]}  # bad files fail here

    net, tokenizer = load_hf(model, log)
    parameters = sum(p.numel() for p in net.parameters())
    ids = tokenizer(text or HELD_OUT_TEXT, add_special_tokens=True)["input_ids"]
    if len(ids) < 2:
        raise UsageError("the check text is too short: it needs at least two tokens")
    if len(ids) > MAX_TOKENS:
        log(f"check: the text has {len(ids)} tokens; using the first {MAX_TOKENS}")
        ids = ids[:MAX_TOKENS]
    limits = [WINDOW_MAX, int(getattr(net.config, "max_position_embeddings", 0) or WINDOW_MAX)]
    limits += [i["n_ctx_train"] for i in infos.values() if i["n_ctx_train"]]
    window = min(limits)
    windows = [w for w in (ids[i : i + window] for i in range(0, len(ids), window)) if len(w) >= 2]
    log(f"check: {len(ids)} tokens in {len(windows)} window(s) of up to {window}")

    hf_logits = _hf_logits(net, windows)
    hf_ppl = _perplexity(hf_logits, windows)
    probe_ids = list(tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"])
    vocab = hf_logits[0].shape[-1]
    del net

    results: dict[Path, dict] = {}
    for path in infos:
        if path.resolve() not in results:
            log(f"check: running {path.name} in llama.cpp")
            results[path.resolve()] = _eval_gguf(path, window, windows, hf_logits, probe_ids, vocab)
    base_ppl = results[reference.resolve()]["ppl"] if reference else hf_ppl

    rows = []
    for path in ggufs:
        info, result = infos[path], results[path.resolve()]
        rows.append(
            {
                "file": str(path),
                "type": info["type"],
                "bytes": info["bytes"],
                "bpw": info["bytes"] * 8 / parameters,
                **result,
                "delta_ppl": result["ppl"] - base_ppl,
            }
        )
        log(
            f"check: {path.name}: {info['type']}, PPL {result['ppl']:.3f}, mean KLD {result['mean_kld']:.5f}, "
            f"top-1 {result['top1']:.1%}, tokenization {'ok' if result['tokenization_ok'] else 'DIFFERS'}"
        )
    card = {
        "model": str(model),
        "parameters": parameters,
        "tokens": len(ids),
        "windows": len(windows),
        "window": window,
        "hf_ppl": hf_ppl,
        "reference": str(reference) if reference else None,
        "reference_ppl": results[reference.resolve()]["ppl"] if reference else None,
        "probe_tokens": len(probe_ids),
        "rows": rows,
    }
    if tasks:
        card["downstream"] = downstream(model, ggufs, tasks, registry=registry, log=log, **downstream_options)
    return card


# ------------------------------------------------------------------------------------------------
# downstream deltas


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return dot / (na * nb)


def _generated(items: list[dict]) -> list[str] | None:
    """The generated answers of a task's item records, or None for a task that generates nothing (perplexity
    has no answer; a multiple-choice answer is one of the given choices, which the accuracy already compares)."""
    if not items or any("choices" in it or not isinstance(it.get("answer"), str) for it in items):
        return None
    return [it["answer"] for it in items]


def downstream(
    model: Path,
    ggufs: list[Path],
    specs: list,
    *,
    registry,
    log: Log | None = None,
    limit: int | None = None,
    seed: int = 0,
    n_ctx: int | None = None,
    base_dir: Path | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> dict | None:
    """Each task of `specs` ((task kind, options) pairs from plugins/eval/spec.py load_task_specs) on the HF model
    and on each GGUF, through the eval models of `registry`; see the module docstring. None when stopped."""
    from llmforge_plugins.eval.api import TaskEnv
    from llmforge_plugins.eval.models import open_model

    log = log or _quiet
    if limit:
        specs = [(t, o.model_copy(update={"limit": min(o.limit or limit, limit)})) for t, o in specs]
    env = TaskEnv(base_dir=base_dir or Path.cwd(), log=log, should_stop=should_stop, seed=seed, registry=registry)
    infos: dict[str, dict] = {}  # each task's info on the HF model (the first to run)

    def run_all(em) -> dict[str, tuple[dict, list[dict]]]:
        out = {}
        for task, opts in specs:
            if should_stop():
                break
            res = task.run(opts, em, env)
            out[opts.name] = ({k: m.to_json() for k, m in res.metrics.items()}, list(res.items))
            infos.setdefault(opts.name, dict(res.info))
            shown = ", ".join(f"{k} {m.value:.4g}" for k, m in res.metrics.items())
            log(f"check: {em.label} {opts.name}: {shown}")
        return out

    log(f"check: downstream tasks ({', '.join(o.name for _, o in specs)}) on the HF model")
    hf = open_model(model, registry, label="hf", n_ctx=n_ctx, log=log)
    try:
        base = run_all(hf)
        files: dict[Path, dict[str, tuple[dict, list[dict]]]] = {}
        for path in ggufs:
            if should_stop():
                return None
            log(f"check: downstream tasks on {path.name} in llama.cpp")
            em = open_model(path, registry, label=path.name, n_ctx=n_ctx, log=log)
            try:
                files[path] = run_all(em)
            finally:
                em.close()
        if should_stop():
            return None
        # Answers are embedded by the HF model, the one reference every file is compared with.
        vectors: dict[str, list[list[float]]] = {}
        for name, (_, items) in base.items():
            answers = _generated(items)
            if answers is not None:
                vectors[name] = hf.embed(answers)
        rows = []
        for path in ggufs:
            results: dict[str, dict] = {}
            similarity: dict[str, dict] = {}
            for name, (metrics, items) in files[path].items():
                ref = base[name][0]
                results[name] = {
                    k: {**m, "delta": m["value"] - ref[k]["value"] if k in ref else None} for k, m in metrics.items()
                }
                answers, theirs = _generated(items), _generated(base[name][1])
                if answers is not None and theirs is not None and name in vectors:
                    n = min(len(answers), len(theirs))
                    mine = hf.embed(answers[:n])
                    cos = [_cosine(a, b) for a, b in zip(mine, vectors[name][:n])]
                    similarity[name] = {
                        "cosine": sum(cos) / n if n else None,
                        "min_cosine": min(cos) if cos else None,
                        "identical": sum(a == b for a, b in zip(answers, theirs)) / n if n else None,
                        "n": n,
                    }
            rows.append(
                {"file": str(path), "type": _gguf_info(path)["type"], "results": results, "similarity": similarity}
            )
    finally:
        hf.close()

    def primary(task, opts) -> str:
        # the spec's primary metric (a generation task's is its scorer), else what the run says it scored by
        metrics = base.get(opts.name, ({}, []))[0]
        declared = task.primary_for(opts) if hasattr(task, "primary_for") else task.primary
        for name in (declared, infos.get(opts.name, {}).get("primary"), task.primary):
            if isinstance(name, str) and name in metrics:
                return name
        return next(iter(metrics), task.primary)

    return {
        "tasks": [{"name": o.name, "kind": t.kind, "primary": primary(t, o)} for t, o in specs],
        "hf": {name: metrics for name, (metrics, _) in base.items()},
        "rows": rows,
    }


def load_tasks(values: list, registry, base_dir: Path) -> tuple[list, list]:
    """Task specs as the eval plugin reads them (plugins/eval/spec.py): the (task kind, options) pairs and the
    problems, keyed `tasks[i]...`. The eval plugin must be loaded: its task kinds are in the registry."""
    from llmforge.errors import Problem

    try:
        from llmforge_plugins.eval.api import EVAL_TASKS
        from llmforge_plugins.eval.spec import load_task_specs

        table = registry.table(EVAL_TASKS)
    except (ImportError, KeyError) as exc:
        return [], [Problem("tasks", f"eval tasks need the eval plugin, which is not loaded ({exc})")]
    return load_task_specs(values, table, base_dir, "tasks")


def downstream_headline(section: dict) -> dict:
    """Per file, each task's primary metric delta and the answer similarity: for `llmforge status`."""
    primary = {t["name"]: t["primary"] for t in section["tasks"]}
    out = {}
    for r in section["rows"]:
        figures: dict = {}
        for name, metrics in r["results"].items():
            m = metrics.get(primary.get(name, ""))
            if m is not None:
                figures[f"{name}.{primary[name]}"] = {"value": m["value"], "delta": m["delta"]}
        for name, sim in r["similarity"].items():
            figures[f"{name}.similarity"] = sim["cosine"]
        out[Path(r["file"]).name] = figures
    return out


def downstream_markdown(section: dict) -> str:
    """The downstream deltas as a Markdown table: a row for the HF model, then one per file; per task its primary
    metric and the delta, and the answer similarity of generation tasks."""
    tasks = section["tasks"]
    similar = [t["name"] for t in tasks if any(t["name"] in r["similarity"] for r in section["rows"])]
    head = ["file"]
    for t in tasks:
        head += [f"{t['name']}.{t['primary']}", "Δ"]
    head += [f"{name} answer similarity (identical)" for name in similar]
    lines = [
        "Downstream: the same tasks on the HF model (transformers) and on each file (llama.cpp); Δ = file - HF. "
        "Answer similarity: cosine of the HF model's embeddings of the file's and the HF model's answers, mean "
        "over items, and the share of identical answers.",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * (len(head) - 1),
    ]

    def fig(m: dict | None) -> str:
        if not m:
            return "-"
        text = f"{m['value']:.4g}" if abs(m["value"]) >= 100 else f"{m['value']:.3f}"
        return text + (f" ± {m['stderr']:.3f}" if m.get("stderr") else "")

    hf_cells = ["HF model"]
    for t in tasks:
        hf_cells += [fig(section["hf"].get(t["name"], {}).get(t["primary"])), ""]
    lines.append("| " + " | ".join(hf_cells + ["" for _ in similar]) + " |")
    for r in section["rows"]:
        cells = [Path(r["file"]).name]
        for t in tasks:
            m = r["results"].get(t["name"], {}).get(t["primary"])
            cells += [fig(m), f"{m['delta']:+.3f}" if m and m.get("delta") is not None else "-"]
        for name in similar:
            sim = r["similarity"].get(name)
            cells.append(f"{sim['cosine']:.4f} ({sim['identical']:.0%})" if sim and sim["cosine"] is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _small(x: float) -> str:
    """Fixed point where it reads well, scientific for the tiny values a float export gives."""
    return f"{x:.6f}" if x == 0 or abs(x) >= 1e-4 else f"{x:.1e}"


def scorecard_markdown(card: dict) -> str:
    """The scorecard as a Markdown table with a one-line header saying what was measured against what."""
    base = (
        f"reference {Path(card['reference']).name} (PPL {card['reference_ppl']:.3f})"
        if card.get("reference")
        else "the HF model"
    )
    lines = [
        f"Parity check of {card['model']}: {card['tokens']} tokens ({card['windows']} window(s) of up to "
        f"{card['window']}), HF fp32 perplexity {card['hf_ppl']:.3f}; ΔPPL against {base}; "
        f"{card['parameters']:,} parameters.",
        "",
        "| file | type | size | bits/weight | PPL | ΔPPL | mean KLD | top-1 | max rel. logit error | tokenizer |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in card["rows"]:
        tok = "ok" if r["tokenization_ok"] else f"differs at token {r['tokenization_diff']['at']}"
        lines.append(
            f"| {Path(r['file']).name} | {r['type']} | {fmt_bytes(r['bytes'])} | {r['bpw']:.2f} | "
            f"{r['ppl']:.3f} | {r['delta_ppl']:+.3f} | {_small(r['mean_kld'])} | {r['top1']:.1%} | "
            f"{r['max_rel_logit_error']:.2e} | {tok} |"
        )
    if card.get("downstream"):
        lines += ["", downstream_markdown(card["downstream"]).rstrip("\n")]
    return "\n".join(lines) + "\n"
