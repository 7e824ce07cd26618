"""`llmforge doctor`: the report holds this machine's real values, finds incompatible versions from the
packages' own metadata and from the known-conflicts table, and always exits 0."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import psutil
import pytest

from conftest import run_cli


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("doctor")
    res = run_cli("doctor", "--json", "--runs-dir", str(root / "runs"), cwd=root)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_doctor_json_reports_this_machine(report, tmp_path_factory):
    for key in (
        "llmforge",
        "os",
        "python",
        "packages",
        "conflicts",
        "cpu",
        "memory",
        "disk",
        "gpus",
        "gpu_source",
        "torch",
        "warnings",
    ):
        assert key in report, key
    assert report["python"]["version"] == platform.python_version()
    assert report["os"]["system"] == platform.system() and report["os"]["machine"] == platform.machine()
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "deepspeed", "llama-cpp-python"):
        assert report["packages"][name] == (_version(name) or "not installed"), name
    assert report["cpu"]["logical_cores"] == os.cpu_count()
    assert report["memory"]["total_gib"] == pytest.approx(psutil.virtual_memory().total / 2**30, abs=0.01)
    assert 0 < report["memory"]["available_gib"] <= report["memory"]["total_gib"]
    assert report["disk"]["path"].endswith("runs") and report["disk"]["free_gib"] > 0

    flags = set()
    if Path("/proc/cpuinfo").exists():
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
        flags = set(line.partition(":")[2].split())
        feats = report["cpu"]["features"]
        assert feats["avx2"] == ("avx2" in flags) and feats["avx512f"] == ("avx512f" in flags)
        assert feats["bf16_fast"] == ("avx512_bf16" in flags or "amx_bf16" in flags)

    import torch
    import torch.distributed as dist

    t = report["torch"]
    assert t["version"] == torch.__version__ and t["cuda_available"] == torch.cuda.is_available()
    assert t["distributed"] == {
        "available": dist.is_available(),
        "nccl": dist.is_nccl_available(),
        "gloo": dist.is_gloo_available(),
    }
    if torch.cuda.is_available():
        assert len(report["gpus"]) == torch.cuda.device_count()
        for g in report["gpus"]:
            assert g["memory_total_gib"] > 0 and g["compute_capability"] and g["bf16"] in (True, False)
    elif shutil.which("nvidia-smi") is None:
        assert report["gpus"] == []
        assert any("QLoRA" in w for w in report["warnings"])  # no CUDA: said plainly


def test_doctor_lists_the_known_conflicts_that_apply_here(report):
    from packaging.version import Version

    from llmforge.doctor import KNOWN_INCOMPATIBLE

    assert all(len(entry) == 5 and entry[4] for entry in KNOWN_INCOMPATIBLE)  # every entry says why
    peft, transformers = _version("peft"), _version("transformers")
    expected = bool(
        peft and transformers and Version(transformers) >= Version("5.24") and Version(peft) < Version("0.22.0")
    )
    found = [c for c in report["conflicts"] if c["installed"].startswith("peft ")]
    assert bool(found) == expected
    if expected:
        assert "peft 0.22" in found[0]["reason"] and any("peft" in w for w in report["warnings"])


def test_doctor_finds_a_declared_requirement_that_is_not_met(tmp_path):
    """A package whose metadata requires a torch it does not get, installed the way pip installs it."""
    dist = tmp_path / "site" / "needs_old_torch-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        textwrap.dedent("""\
        Metadata-Version: 2.1
        Name: needs-old-torch
        Version: 1.0
        Requires-Dist: torch<1.0
        Requires-Dist: transformers>=1.0
        Requires-Dist: accelerate>=999; extra == "never"
    """)
    )
    code = (
        "import json; from llmforge import doctor; "
        "print(json.dumps(doctor.declared_conflicts(('needs-old-torch', 'torch', 'transformers', 'accelerate'))))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    found = json.loads(res.stdout)
    assert [(c["package"], c["requires"]) for c in found] == [("needs-old-torch", "torch<1.0")]
    assert found[0]["installed"] == f"torch {_version('torch')}"


def test_doctor_prints_tables_and_warnings_and_exits_0(tmp_path):
    res = run_cli("doctor", "--runs-dir", str(tmp_path), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    for text in ("system", "packages", "Python", "RAM", "CPU features", "collectives", "transformers"):
        assert text in res.stdout, text
    assert "warning:" in res.stdout or "no problems found" in res.stdout


def _evaluate_in_child(path: Path, extra_bufts: bool) -> int:
    """An independent witness for the probe: evaluate a batch of a Q8_0 GGUF in a fresh interpreter with llama.cpp's
    extra buffer types on or off, and return its exit code (negative: killed by that signal)."""
    code = (
        "import sys; from llmforge.native import load_llama; "
        f"llm = load_llama({str(path)!r}, extra={extra_bufts}, n_ctx=64, n_batch=64, logits_all=True); "
        "llm.eval(list(range(16))); llm.close()"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode


def test_doctor_reports_whether_llama_cpps_amx_kernels_run_here(tmp_path):
    """`doctor` runs the llama.cpp probe once, caches it under XDG_CACHE_HOME, and says what it found: on a CPU whose
    AMX kernels fault (the Intel machine this project is tested on), "fault here ..., extra buffer types off";
    elsewhere "ok". The answer is checked against a child evaluating a Q8_0 model both ways."""
    from llmforge.native import _write_probe_gguf

    pytest.importorskip("llama_cpp")
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "LLMFORGE_CACHE_DIR": "", "LLMFORGE_LLAMA_EXTRA_BUFTS": "auto"}
    res = run_cli("doctor", "--json", "--runs-dir", str(tmp_path), cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    first = json.loads(res.stdout)["llama_cpp"]
    assert first["source"] == "probe" and first["result"] in ("ok", "fault"), first
    cached = list((tmp_path / "xdg" / "llmforge").glob("llama-probe-*.json"))
    assert [str(p) for p in cached] == [first["cache_file"]]
    assert json.loads(cached[0].read_text())["result"] == first["result"]

    model = tmp_path / "probe-Q8_0.gguf"
    _write_probe_gguf(model)
    on, off = _evaluate_in_child(model, True), _evaluate_in_child(model, False)
    assert off == 0
    if first["result"] == "fault":
        assert on < 0 and first["extra_bufts"] is False and first["signal"].startswith("SIG")
        assert first["line"].startswith("fault here (") and first["line"].endswith("extra buffer types off")
    else:
        assert on == 0 and first["extra_bufts"] is True and first["line"].startswith("ok")

    # the second doctor reads the cache, and the text report has the line
    res = run_cli("doctor", "--runs-dir", str(tmp_path), cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    # piped, the report is one record per line: the probe's whole line, never folded at 80 columns
    assert any(ln.startswith("llama.cpp AMX kernels") and ln.endswith(first["line"]) for ln in res.stdout.splitlines())
    res = run_cli("doctor", "--json", "--runs-dir", str(tmp_path), cwd=tmp_path, env=env)
    assert json.loads(res.stdout)["llama_cpp"]["source"] == "cache"

    # forcing the answer (what tests on an unaffected machine do to exercise the fallback)
    forced = run_cli(
        "doctor", "--json", "--runs-dir", str(tmp_path), cwd=tmp_path, env={**env, "LLMFORGE_LLAMA_EXTRA_BUFTS": "off"}
    )
    info = json.loads(forced.stdout)["llama_cpp"]
    assert info["result"] == "forced" and info["extra_bufts"] is False
    assert "LLMFORGE_LLAMA_EXTRA_BUFTS=off" in info["line"]
