"""Shared fixtures: run the real `llmforge` CLI in a subprocess, write projects, install plugin packages.

Plugin packages (tests/fixtures/plugins/*, examples/llmforge-hello) are installed for real with pip
into a per-session target folder and made visible through PYTHONPATH, so entry-point discovery is
exercised exactly as for a user's installed plugin, without touching the test environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_PLUGINS = ROOT / "tests" / "fixtures" / "plugins"
EXAMPLE_PLUGIN = ROOT / "examples" / "llmforge-hello"


def _env(extra_paths: list[Path] | None = None, env: dict | None = None) -> dict:
    out = dict(os.environ)
    out.pop("LLMFORGE_LOAD_PLUGINS", None)
    out["PYTHONUNBUFFERED"] = "1"
    out["COLUMNS"] = "200"  # wide tables: assertions should not depend on wrapping
    paths = [str(p) for p in extra_paths or []]
    if out.get("PYTHONPATH"):
        paths.append(out["PYTHONPATH"])
    if paths:
        out["PYTHONPATH"] = os.pathsep.join(paths)
    out.update(env or {})
    return out


def run_cli(
    *args: str,
    cwd: Path | None = None,
    plugins: list[Path] | None = None,
    env: dict | None = None,
    timeout: float = 120,
    input: str | None = None,
) -> subprocess.CompletedProcess:
    """Run `python -m llmforge ARGS` the way a user would, and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "llmforge", *args],
        cwd=cwd,
        env=_env(plugins, env),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
    )


@pytest.fixture
def cli():
    return run_cli


class Project:
    """A temporary project folder with a forge.toml."""

    def __init__(self, root: Path):
        self.root = root

    @property
    def config(self) -> Path:
        return self.root / "forge.toml"

    def write(self, text: str, name: str = "forge.toml") -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
        return path

    def run(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return run_cli(*args, cwd=self.root, **kw)

    @property
    def runs(self) -> Path:
        return self.root / "runs"


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return Project(tmp_path)


_installed: dict[Path, Path] = {}


def install_package(src: Path, base: Path) -> Path:
    """pip-install a plugin package (no deps, no build isolation) into its own folder; return the folder."""
    src = src.resolve()
    if src not in _installed:
        target = base / src.name
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--no-build-isolation",
                "--no-index",
                "--target",
                str(target),
                str(src),
            ],
            check=True,
            timeout=300,
            capture_output=True,
        )
        _installed[src] = target
    return _installed[src]


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory):
    """Callable: name of a fixture plugin (or a path) -> folder to put on PYTHONPATH."""
    base = tmp_path_factory.mktemp("plugin-site")

    def get(name_or_path) -> Path:
        src = Path(name_or_path)
        if not src.is_absolute():
            src = FIXTURE_PLUGINS / str(name_or_path)
        return install_package(src, base)

    return get


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need a CUDA device: skipped, with the reason, where none is visible."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch  # only when a gpu test was collected

    if not torch.cuda.is_available():
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (none visible)"))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A small byte-level BPE chat tokenizer (ChatML markers) trained on the spot, saved as an HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [f"What is the capital of Land{i}? The capital of Land{i} is Town{i}." for i in range(200)]
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=500,
            special_tokens=["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    out = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(out)
    return out


async def until(pilot, cond, timeout: float = 60.0, what: str = "condition"):
    """Let a Textual app run (under `run_test`) until `cond()` is true; its value, or an AssertionError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        await pilot.pause(0.05)
    raise AssertionError(f"timed out waiting for {what}")
