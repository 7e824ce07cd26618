"""Near-duplicate removal on generated documents with planted near duplicates: `llmforge data filter
--step near_dedup` against a straightforward datasketch MinHashLSH baseline, in the same run.

Usage: python bench/dedup.py [--docs 200000] [--dir /tmp/llmforge-bench-dedup] [--write docs/benchmarks.md]

(the baseline needs `pip install datasketch`; without it only llmforge is measured)

The corpus (generated once per size and seed, then reused): documents of 100 to 300 words drawn from
a 30,000-word vocabulary with a Zipf-like law; 10% of them are near duplicates of an earlier original
document (words replaced to land at a word 5-gram Jaccard similarity of 0.85 to 0.97), 4% are decoys
(similarity 0.2 to 0.6). A row counts as a true duplicate when its exact 5-gram Jaccard similarity
with its source is at least the threshold (0.8); recall and precision are measured against that.

Both sides read the same JSON Lines file, compare the same shingles (lower-cased words, 5-grams) with
128 hash functions at threshold 0.8, keep the first of a group, and write the kept rows as JSON Lines:

* llmforge: `llmforge data filter IN OUT --step near_dedup --set threshold=0.8 --reasons R` (the
  command, start-up included);
* datasketch: per row, `MinHash(num_perm=128).update_batch(shingles)`, then `MinHashLSH.query`, and
  `insert` when nothing is found (the usage its documentation shows; `update_batch` rather than one
  `update` per shingle, so the baseline is not a straw man).

Each runs in a child of a small launcher that reports its wall time and peak RSS (`ru_maxrss`), so
the two peaks are separate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from measure import measure  # bench/ is the script's folder, first on sys.path

MB = 1e6
THRESHOLD = 0.8
NGRAM = 5


def _grams(ids) -> set:
    return {tuple(ids[i : i + NGRAM]) for i in range(len(ids) - NGRAM + 1)}


def generate(path: Path, n: int, seed: int = 0) -> dict:
    """The corpus and its truth (which rows are near duplicates of which)."""
    import numpy as np

    truth_path = path.with_suffix(".truth.json")
    if path.exists() and truth_path.exists():
        return json.loads(truth_path.read_text())
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab_size = 30000
    vocab = ["".join(rng.choice(letters, size=int(k))) for k in rng.integers(2, 10, size=vocab_size)]
    vocab = list(dict.fromkeys(vocab))
    vocab_size = len(vocab)
    cdf = np.cumsum(1.0 / (np.arange(vocab_size) + 10.0))
    cdf /= cdf[-1]

    def words(k: int) -> np.ndarray:
        return np.minimum(np.searchsorted(cdf, rng.random(k)), vocab_size - 1)

    docs: list[np.ndarray] = []
    originals: list[int] = []
    kinds = rng.random(n)
    truth = {"docs": n, "near": [], "decoys": [], "similarity": {}}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for i in range(n):
            if i > 100 and kinds[i] < 0.14:
                # a copy of an original (never of a copy: no chains), with enough words replaced to land
                # near a target similarity: 0.85-0.97 for near duplicates, 0.2-0.6 for decoys
                src = originals[int(rng.integers(0, len(originals)))]
                ids = docs[src].copy()
                target = rng.uniform(0.85, 0.97) if kinds[i] < 0.10 else rng.uniform(0.2, 0.6)
                edits = max(1, round((len(ids) - NGRAM + 1) * (1 - target) / (NGRAM * (1 + target))))
                pos = rng.choice(len(ids), size=min(edits, len(ids)), replace=False)
                ids[pos] = words(pos.size)
                a, b = _grams(docs[src].tolist()), _grams(ids.tolist())
                sim = len(a & b) / len(a | b)
                (truth["near"] if kinds[i] < 0.10 else truth["decoys"]).append([i + 1, src + 1])
                truth["similarity"][str(i + 1)] = round(sim, 4)
            else:
                ids = words(int(rng.integers(100, 301)))
                originals.append(i)
            docs.append(ids)
            fh.write(json.dumps({"text": " ".join(vocab[k] for k in ids)}) + "\n")
    os.replace(tmp, path)
    truth_path.write_text(json.dumps(truth))
    return truth


BASELINE = r"""
import json, re, sys
from datasketch import MinHash, MinHashLSH
src, out, removed = sys.argv[1:4]
word = re.compile(r"\w+")
lsh = MinHashLSH(threshold=0.8, num_perm=128)
with open(src, encoding="utf-8") as fh, open(out, "w", encoding="utf-8") as kept, open(removed, "w") as rm:
    for line_no, line in enumerate(fh, 1):
        row = json.loads(line)
        words = word.findall(row["text"].lower())
        shingles = {" ".join(words[i:i + 5]).encode() for i in range(max(len(words) - 4, 1))}
        m = MinHash(num_perm=128)
        m.update_batch(list(shingles))
        if lsh.query(m):
            rm.write(f"{line_no}\n")
            continue
        lsh.insert(line_no, m)
        kept.write(json.dumps(row) + "\n")
"""


def scores(removed: set[int], truth: dict) -> tuple[float, float, int]:
    """(recall, precision, true duplicates) of a set of removed line numbers."""
    dups = {line for line, _ in truth["near"] + truth["decoys"] if truth["similarity"][str(line)] >= THRESHOLD}
    hit = len(removed & dups)
    return hit / len(dups) if dups else 1.0, hit / len(removed) if removed else 1.0, len(dups)


def _has_datasketch() -> str | None:
    try:
        from importlib.metadata import version

        return version("datasketch")
    except Exception:  # noqa: BLE001
        return None


def main() -> int:
    from measure import load_line, machine_line  # CPU model, flags and load in every section

    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=200_000)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/llmforge-bench-dedup"))
    ap.add_argument("--write", type=Path, help="update this markdown file's dedup section")
    args = ap.parse_args()
    root = args.dir.resolve()
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / f"docs-{args.docs}.jsonl"
    t0 = time.perf_counter()
    truth = generate(corpus, args.docs)
    print(f"corpus: {corpus} ({corpus.stat().st_size / MB:.0f} MB, {time.perf_counter() - t0:.0f} s)", flush=True)

    llmforge = shutil.which("llmforge", path=str(Path(sys.executable).parent))
    lf_cmd = [llmforge] if llmforge else [sys.executable, "-m", "llmforge"]
    out, reasons = root / "out-llmforge.jsonl", root / "removed-llmforge.jsonl"
    lf_wall, lf_rss = measure(
        [
            *lf_cmd,
            "data",
            "filter",
            str(corpus),
            str(out),
            "--step",
            "near_dedup",
            "--set",
            f"threshold={THRESHOLD}",
            "--reasons",
            str(reasons),
        ]
    )
    lf_removed = {int(json.loads(x)["source"].rsplit(":", 1)[1]) for x in reasons.read_text().splitlines()}
    lf_recall, lf_precision, n_dups = scores(lf_removed, truth)
    print(
        f"llmforge: {lf_wall:.1f} s, {args.docs / lf_wall:,.0f} docs/s, peak RSS {lf_rss / MB:.0f} MB, "
        f"recall {lf_recall:.3f}, precision {lf_precision:.3f}",
        flush=True,
    )

    ds_version = _has_datasketch()
    rows = [("`llmforge data filter --step near_dedup`", lf_wall, lf_rss, lf_recall, lf_precision, len(lf_removed))]
    if ds_version:
        ds_out, ds_removed_file = root / "out-datasketch.jsonl", root / "removed-datasketch.txt"
        ds_wall, ds_rss = measure([sys.executable, "-c", BASELINE, str(corpus), str(ds_out), str(ds_removed_file)])
        ds_removed = {int(x) for x in ds_removed_file.read_text().split()}
        ds_recall, ds_precision, _ = scores(ds_removed, truth)
        print(
            f"datasketch: {ds_wall:.1f} s, {args.docs / ds_wall:,.0f} docs/s, peak RSS {ds_rss / MB:.0f} MB, "
            f"recall {ds_recall:.3f}, precision {ds_precision:.3f}",
            flush=True,
        )
        rows.append(
            (
                f"datasketch {ds_version} `MinHashLSH` (baseline)",
                ds_wall,
                ds_rss,
                ds_recall,
                ds_precision,
                len(ds_removed),
            )
        )
    sims = [v for k, v in truth["similarity"].items()]
    lines = [
        f"- {machine_line()}, one run each",
        f"- {load_line()}",
        f"- corpus: {args.docs:,} generated documents of 100-300 words ({corpus.stat().st_size / MB:.0f} MB of "
        f"JSON Lines); {len(truth['near']):,} planted near duplicates and {len(truth['decoys']):,} decoys "
        f"(word 5-gram Jaccard similarity {min(sims):.2f}-{max(sims):.2f} with their source); "
        f"{n_dups:,} rows at or above the threshold {THRESHOLD} are the true duplicates",
        "- both: lower-cased word 5-grams, 128 hash functions, threshold 0.8, first of a group kept, rows "
        "read from and written to JSON Lines",
        "",
        "| | wall time | docs/s | peak RSS | removed | recall | precision |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, wall, rss, recall, precision, removed in rows:
        lines.append(
            f"| {name} | {wall:.1f} s | {args.docs / wall:,.0f} | {rss / MB:.0f} MB | {removed:,} | "
            f"{recall:.3f} | {precision:.3f} |"
        )
    ok = True
    if ds_version:
        fast = lf_wall <= ds_wall
        same_recall = lf_recall >= ds_recall - 0.005
        ok = fast and same_recall
        lines += [
            "",
            f"- at least as fast as the baseline: {'met' if fast else 'NOT met'} "
            f"({ds_wall / lf_wall:.1f} × its docs/s)",
            f"- with the same recall: {'met' if same_recall else 'NOT met'} ({lf_recall:.3f} against {ds_recall:.3f})",
            f"- peak RSS: {lf_rss / ds_rss:.2f} × the baseline's",
        ]
    else:
        lines += ["", "- datasketch is not installed (`pip install datasketch`): no baseline"]
    print("\n".join(lines))
    if args.write:
        _write(args.write, "\n".join(lines))
    return 0 if ok else 1


def _write(path: Path, body: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from startup import _update

    text = path.read_text() if path.exists() else ""
    if "<!-- bench:dedup -->" not in text:
        # _update appends unknown sections under the start-up heading: give this one its own first
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            text.rstrip() + "\n\n## Deduplication (bench/dedup.py)\n\n<!-- bench:dedup -->\n<!-- /bench:dedup -->\n"
        )
        os.replace(tmp, path)
    _update(path, "dedup", body)


if __name__ == "__main__":
    sys.exit(main())
