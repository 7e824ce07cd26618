"""llama.cpp's own converter (convert_hf_to_gguf.py), got the way a user gets it: from the source distribution of
the llama-cpp-python release installed here, which vendors llama.cpp under `vendor/llama.cpp/`.

The tests compare the export with it byte for byte and bench/gguf.py times it; neither edits it. The sdist is
downloaded once with pip (from the package index pip is configured for) and the converter's files are kept in
llmforge's cache folder (llmforge.native.cache_dir(), `llama-cpp-src/<version>/`): the converter itself, its
`conversion/` package, its own `gguf-py` (put on PYTHONPATH when it runs), and the vocabulary-only GGUFs of
real tokenizers under `models/` that llama.cpp's tokenizer tests use.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

from llmforge.errors import UsageError

KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/ggml-vocab-")


def llama_cpp_source(cache: Path | None = None) -> Path:
    """The `vendor/llama.cpp` folder of the installed llama-cpp-python's sdist (downloaded and extracted once).
    UsageError when it cannot be downloaded (no network, no index)."""
    from llmforge.native import cache_dir

    try:
        version = metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        raise UsageError("llama-cpp-python is not installed") from None
    root = (cache or cache_dir()) / "llama-cpp-src" / version
    if (root / "convert_hf_to_gguf.py").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=root.parent) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--quiet",
            f"llama-cpp-python=={version}",
            "-d",
            tmp,
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        archives = sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if res.returncode != 0 or not archives:
            reason = (res.stderr.strip().splitlines() or ["no archive"])[-1]
            raise UsageError(f"cannot download llama-cpp-python {version}'s source distribution: {reason}")
        out = Path(tmp) / "src"
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                _, _, rest = member.name.partition("/vendor/llama.cpp/")
                if rest and rest.startswith(KEEP):
                    member.name = rest
                    tar.extract(member, out, filter="data")
        if not (out / "convert_hf_to_gguf.py").is_file():
            raise UsageError(f"{archives[0].name}: no vendor/llama.cpp/convert_hf_to_gguf.py inside")
        try:
            os.replace(out, root)
        except OSError:  # another process extracted it first
            if not (root / "convert_hf_to_gguf.py").is_file():
                raise
    return root


def converter_command(src: Path, model: Path, out: Path, outtype: str) -> tuple[list[str], dict]:
    """The command line and environment that run llama.cpp's converter, unmodified, with its own gguf-py."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(src / "gguf-py"), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(model), "--outfile", str(out), "--outtype", outtype]
    return cmd, env


def vocab_tokenizer(src: Path, name: str, dest: Path):
    """A transformers tokenizer rebuilt from llama.cpp's vocabulary-only GGUF of a real model (`models/ggml-vocab-
    NAME.gguf`, written by the converter from that model's tokenizer), saved in `dest`; and its test texts with the
    token ids the original tokenizer gave (the `.inp`/`.out` files next to it)."""
    from transformers import AutoTokenizer

    vocab = src / "models" / f"ggml-vocab-{name}.gguf"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(vocab, dest / vocab.name)
    tok = AutoTokenizer.from_pretrained(str(dest), gguf_file=vocab.name)
    (dest / vocab.name).unlink()
    cases = []
    inp, outp = vocab.with_name(vocab.name + ".inp"), vocab.with_name(vocab.name + ".out")
    if inp.is_file() and outp.is_file():
        texts = inp.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
        ids = outp.read_text(encoding="utf-8").split("\n")
        cases = [(t, [int(x) for x in i.split()]) for t, i in zip(texts, ids)]
    return tok, cases
