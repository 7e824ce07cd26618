"""llama.cpp at arm's length: every evaluation runs in a child process, and a probe decides how models load.

A native fault in llama.cpp (a SIGILL, a SIGSEGV) kills the whole process it runs in, with no Python error. So
the GGUF scorecard, `llmforge chat` on a GGUF, the TUI's chat and the demo never call llama.cpp themselves:
they talk to a `LlamaModel`, which runs `llama_cpp.Llama` in a child interpreter (`python -m llmforge.native`)
and speaks a tiny request/response protocol with it over its stdin/stdout (load, tokenize, detokenize,
logits for token ids, generate one token at a time, close). When the child dies from a signal, the caller
gets a `LlamaCrashed` error naming the GGUF file and the signal; the run, the TUI and other stages go on.

Some CPUs advertise AMX (Intel Xeon under some hypervisors) but fault on its tile instructions: llama.cpp
then repacks quantized weights (Q8_0, Q4_K, ...) for its AMX kernels and dies with SIGILL on the first batch
of more than one token. `extra_bufts()` finds out once per machine and llama-cpp-python build: it writes a
tiny Q8_0 GGUF and evaluates a batch of it in a child with llama.cpp's extra buffer types on. A child killed
by a signal means "fault here": models are then loaded with `use_extra_bufts = False` (plain CPU kernels; a
little slower where AMX works). The answer is cached in `$LLMFORGE_CACHE_DIR`, else `$XDG_CACHE_HOME/llmforge`,
else `~/.cache/llmforge`; `LLMFORGE_LLAMA_EXTRA_BUFTS=on|off` forces it (`auto`, the default, probes).

`load_llama()` is the one place a `llama_cpp.Llama` is constructed with that decision applied; the child uses
it, and so can code that must hold a `Llama` in its own process (tests reading metadata).

Quantization (`llama_model_quantize`) stays in the calling process: it converts weights without running any
matrix kernel, and it is what the probe's fault is not about.

Test hook: `LLMFORGE_TEST_LLAMA_SIGNAL=SIGILL` (or any signal name) makes the child kill itself with that signal
on its first evaluation, as a faulting llama.cpp would.

Nothing heavy at import: llama_cpp and numpy are imported where they are used (and in the child).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmforge.errors import ForgeError, UsageError

EXTRA_BUFTS_ENV = "LLMFORGE_LLAMA_EXTRA_BUFTS"  # on | off | auto
CACHE_ENV = "LLMFORGE_CACHE_DIR"
CRASH_ENV = "LLMFORGE_TEST_LLAMA_SIGNAL"  # test hook: the child kills itself with this signal when it evaluates
PROBE_VERSION = 1  # bump when the probe changes, so old cached answers are not trusted


class LlamaCrashed(ForgeError):
    """The child running llama.cpp died from a signal (or vanished) while working on a GGUF."""

    def __init__(
        self, path: Path | str, doing: str, returncode: int | None, detail: str = "", extra_bufts: bool | None = None
    ):
        self.path, self.returncode, self.detail = Path(path), returncode, detail
        self.signal = _signal_name(returncode)
        how = f"crashed ({self.signal})" if self.signal else f"exited unexpectedly (exit code {returncode})"
        hint = "only the child process running llama.cpp died; `llmforge doctor` shows what llama.cpp can run here"
        if extra_bufts and returncode is not None and returncode < 0 and -returncode == signal.SIGILL:
            hint = (
                f"this CPU may advertise instructions it cannot run (AMX): {EXTRA_BUFTS_ENV}=off loads models "
                f"without llama.cpp's extra buffer types; " + hint
            )
        super().__init__(f"llama.cpp {how} {doing} {path}", hint=hint)


def _signal_name(returncode: int | None) -> str | None:
    if returncode is None or returncode >= 0:
        return None
    try:
        sig = signal.Signals(-returncode)
    except ValueError:
        return f"signal {-returncode}"
    text = signal.strsignal(sig) or ""
    return f"{sig.name}, {text[:1].lower() + text[1:]}" if text else sig.name


# ------------------------------------------------------------------------------------------------
# the cache and the probe


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llmforge"


def _llama_build() -> dict:
    """What identifies this llama-cpp-python build, without loading the native library."""
    from importlib import metadata
    from importlib.util import find_spec

    try:
        version = metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return {}
    spec = find_spec("llama_cpp")
    libs = []
    if spec is not None and spec.origin:
        lib_dir = Path(spec.origin).parent / "lib"
        libs = (
            sorted(f"{p.name}:{p.stat().st_size}" for p in lib_dir.glob("*") if p.is_file()) if lib_dir.is_dir() else []
        )
    return {"version": version, "libs": libs}


def _probe_key(build: dict) -> str:
    from llmforge import hardware

    blob = json.dumps(
        {"probe": PROBE_VERSION, "build": build, "cpu": hardware.cpu_model(), "flags": sorted(hardware.cpu_flags())},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _write_probe_gguf(path: Path) -> None:
    """A 1-layer Llama with Q8_0 weights whose shapes the AMX kernels take (rows and columns multiples of 32),
    no tokenizer (token ids are fed directly) and random weights: only whether the kernels run matters."""
    import gguf
    import numpy as np
    from gguf.quants import quantize

    vocab, embd, ff, heads = 64, 64, 128, 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(embd)
    w.add_block_count(1)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("none")
    w.add_file_type(7)  # MOSTLY_Q8_0
    rng = np.random.default_rng(0)

    def matrix(name: str, rows: int, cols: int, q8: bool = True) -> None:
        a = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        if q8:
            w.add_tensor(name, quantize(a, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, a)

    matrix("token_embd.weight", vocab, embd, q8=False)
    w.add_tensor("output_norm.weight", np.ones(embd, np.float32))
    matrix("output.weight", vocab, embd)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(embd, np.float32))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(embd, np.float32))
    for name in ("q", "k", "v", "output"):
        matrix(f"blk.0.attn_{name}.weight", embd, embd)
    matrix("blk.0.ffn_gate.weight", ff, embd)
    matrix("blk.0.ffn_up.weight", ff, embd)
    matrix("blk.0.ffn_down.weight", embd, ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _probe_child(path: Path, extra_bufts: bool) -> int:
    """Evaluate the probe model in a fresh interpreter; its return code (negative: killed by that signal)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONFAULTHANDLER", CRASH_ENV)}
    cmd = [sys.executable, "-m", "llmforge.native", "probe", str(path), "on" if extra_bufts else "off"]
    try:
        return subprocess.run(
            cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300
        ).returncode
    except subprocess.TimeoutExpired:
        return 124


def run_probe() -> dict:
    """Run the probe now (no cache): 'ok' (extra buffer types work), 'fault' (they crash, plain kernels work),
    'broken' (llama.cpp crashes here either way) or 'unavailable' (no llama-cpp-python, or the probe failed)."""
    build = _llama_build()
    if not build:
        return {"result": "unavailable", "extra_bufts": True, "message": "llama-cpp-python is not installed"}
    with tempfile.TemporaryDirectory(prefix="llmforge-probe-") as tmp:
        path = Path(tmp) / "probe-Q8_0.gguf"
        _write_probe_gguf(path)
        on = _probe_child(path, True)
        if on == 0:
            return {
                "result": "ok",
                "extra_bufts": True,
                "message": "ok: llama.cpp's extra buffer types (AMX and repacked kernels) run here",
            }
        off = _probe_child(path, False)
    if on < 0 and off == 0:
        return {
            "result": "fault",
            "extra_bufts": False,
            "signal": _signal_name(on),
            "message": f"fault here ({_signal_name(on)} in llama.cpp's AMX/repacked kernels), extra buffer types off",
        }
    if on < 0 and off < 0:
        return {
            "result": "broken",
            "extra_bufts": False,
            "signal": _signal_name(off),
            "message": f"llama.cpp crashes here even with extra buffer types off ({_signal_name(off)})",
        }
    return {
        "result": "unavailable",
        "extra_bufts": True,
        "message": f"the probe could not run llama.cpp (exit codes {on}, {off}); extra buffer types left on",
    }


_decided: dict | None = None
_decided_lock = threading.Lock()


def probe(*, refresh: bool = False) -> dict:
    """The probe's answer for this machine and llama-cpp-python build, from the environment override, the cache,
    or a fresh probe (cached when conclusive). Keys: result, extra_bufts, message, source, cache_file."""
    global _decided
    forced = os.environ.get(EXTRA_BUFTS_ENV, "auto").strip().lower()
    if forced in ("on", "off"):
        on = forced == "on"
        return {
            "result": "forced",
            "extra_bufts": on,
            "source": "env",
            "message": f"forced by {EXTRA_BUFTS_ENV}={forced}: extra buffer types {forced}",
        }
    if forced not in ("", "auto"):
        raise UsageError(f"{EXTRA_BUFTS_ENV}={forced!r}: expected on, off or auto")
    with _decided_lock:
        build = _llama_build()
        key = _probe_key(build) if build else "none"
        file = cache_dir() / f"llama-probe-{key}.json"
        if _decided is not None and _decided.get("cache_file") == str(file) and not refresh:
            return _decided
        if not refresh and file.is_file():
            try:
                cached = json.loads(file.read_text(encoding="utf-8"))
                if cached.get("key") == key and cached.get("result") in ("ok", "fault", "broken"):
                    _decided = {**cached, "source": "cache", "cache_file": str(file)}
                    return _decided
            except (OSError, ValueError):
                pass  # a damaged cache entry is probed again and rewritten
        answer = {
            **run_probe(),
            "key": key,
            "llama_cpp": build.get("version"),
            "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if answer["result"] in ("ok", "fault", "broken"):
            try:
                file.parent.mkdir(parents=True, exist_ok=True)
                tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(answer, indent=2) + "\n", encoding="utf-8")
                os.replace(tmp, file)
            except OSError:
                pass  # a read-only home: probe again next time, still correct
        _decided = {**answer, "source": "probe", "cache_file": str(file)}
        return _decided


def extra_bufts() -> bool:
    """Whether models should load with llama.cpp's extra buffer types (see the module docstring)."""
    return bool(probe()["extra_bufts"])


# ------------------------------------------------------------------------------------------------
# loading in this process


_load_lock = threading.Lock()


def load_llama(path: Path | str, *, extra: bool | None = None, **kwargs):
    """`llama_cpp.Llama(model_path=path, **kwargs)` with the probe's decision on extra buffer types applied.
    Evaluating in the calling process is only safe where the probe says so: prefer `LlamaModel`."""
    import llama_cpp
    import llama_cpp.llama_cpp as lib

    extra = extra_bufts() if extra is None else extra
    kwargs.setdefault("verbose", False)
    if extra:
        return llama_cpp.Llama(model_path=str(path), **kwargs)
    # Llama.__init__ takes its model parameters from llama_model_default_params() and loads the model right
    # away, so the only way in is that function: wrapped for the duration of the constructor.
    with _load_lock:
        default = lib.llama_model_default_params

        def params():
            p = default()
            p.use_extra_bufts = False
            return p

        lib.llama_model_default_params = params
        try:
            return llama_cpp.Llama(model_path=str(path), **kwargs)
        finally:
            lib.llama_model_default_params = default


# ------------------------------------------------------------------------------------------------
# the protocol: 8-byte length, then a pickle


def _send(stream, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)))
    stream.write(data)
    stream.flush()


def _recv(stream):
    head = stream.read(8)
    if len(head) < 8:
        raise EOFError
    (n,) = struct.unpack("<Q", head)
    data = stream.read(n)
    if len(data) < n:
        raise EOFError
    return pickle.loads(data)


# ------------------------------------------------------------------------------------------------
# the parent's side


class LlamaModel:
    """A GGUF loaded by llama.cpp in a child process. Attributes after loading: n_vocab, n_ctx, metadata,
    token_bos, token_eos, eog (end-of-generation token ids), token_texts (with vocab_texts=True). One caller at a
    time (a lock serialises calls). After a crash (reported as LlamaCrashed), the next request starts a new child.

    `doing` words the crash message ("evaluating", "chatting with")."""

    # What the child's "load" answer sets (self.__dict__.update in _start), declared for type checkers.
    n_vocab: int
    n_ctx: int
    metadata: dict[str, str]
    token_bos: int
    token_eos: int
    eog: set[int]
    token_texts: list[str]

    def __init__(self, path: Path | str, *, doing: str = "evaluating", vocab_texts: bool = False, **kwargs):
        self.path = Path(path)
        self.doing = doing
        self._lock = threading.RLock()
        self._load = (kwargs, vocab_texts)
        self._proc: subprocess.Popen | None = None
        self._closed = False
        self._start()

    def _start(self) -> None:
        """Start the child and load the model in it (again after a crash: the next request gets a fresh one)."""
        kwargs, vocab_texts = self._load
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - the child's stderr while it lives; _reap closes it
        env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
        extra = self._extra = extra_bufts()  # probed (once per machine) before the child starts
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "llmforge.native", "worker"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self._finalizer = weakref.finalize(self, _reap, self._proc, self._stderr)
        try:
            info = self._call("load", str(self.path), kwargs, extra, vocab_texts, doing="loading")
        except BaseException:
            self.close()
            raise
        self.__dict__.update(info)

    # -- plumbing
    def _call(self, op: str, *args, doing: str | None = None):
        with self._lock:
            if self._proc is None:
                if self._closed:
                    raise ForgeError(f"{self.path}: the llama.cpp process was closed")
                self._start()  # the last one crashed: the error was reported then; this is a new attempt
            proc = self._proc
            assert proc is not None and proc.stdin is not None and proc.stdout is not None  # _start made them
            try:
                _send(proc.stdin, (op, args))
                status, value = _recv(proc.stdout)
            except (EOFError, BrokenPipeError, OSError):
                raise self._crashed(doing or self.doing) from None
        if status == "ok":
            return value
        kind, message = value
        if kind == "load":
            raise UsageError(
                f"{self.path}: llama.cpp cannot load this GGUF ({message})",
                hint="the file may be truncated or written for another llama.cpp version",
            )
        raise ForgeError(f"llama.cpp failed {doing or self.doing} {self.path}: {message}")

    def _crashed(self, doing: str) -> LlamaCrashed:
        proc, self._proc = self._proc, None
        assert proc is not None  # called by the request that saw the child die, which held it
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        self._stderr.seek(0)
        detail = self._stderr.read()[-4000:].decode("utf-8", errors="replace")
        return LlamaCrashed(self.path, doing, rc, detail, extra_bufts=self._extra)

    # -- the model
    def tokenize(self, text: str | bytes, *, add_bos: bool, special: bool) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return self._call("tokenize", data, add_bos, special)

    def detokenize(self, ids: list[int]) -> bytes:
        return self._call("detokenize", list(ids))

    def logits(self, ids: list[int]):
        """The logits at every position of `ids`, evaluated from an empty cache: float32 [len(ids), n_vocab]."""
        return self._call("logits", list(ids))

    def generate(self, ids: list[int], *, temp: float, seed: int, **sampling) -> Iterator[int]:
        """Tokens sampled after `ids`, one per request, for as long as the caller asks."""
        self._call("generate", list(ids), temp, seed, sampling)
        while True:
            yield self._call("next")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            proc, self._proc = self._proc, None
            if proc is not None:
                try:
                    _send(proc.stdin, ("close", ()))
                    _recv(proc.stdout)
                except (EOFError, OSError):
                    pass
            self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _reap(proc: subprocess.Popen | None, stderr) -> None:
    if proc is not None:
        for stream in (proc.stdin, proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    stderr.close()


# ------------------------------------------------------------------------------------------------
# the child's side


def _crash_hook() -> None:
    name = os.environ.get(CRASH_ENV)
    if name:
        os.kill(os.getpid(), getattr(signal, name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"))


def _worker(inp, out) -> None:
    import numpy as np

    # untyped on purpose: llama_cpp ships no types, and the reply is whatever the request asked for
    llm: Any = None
    gen: Any = None
    value: Any
    while True:
        try:
            op, args = _recv(inp)
        except EOFError:
            return  # the parent went away
        try:
            if op == "load":
                path, kwargs, extra, vocab_texts = args
                try:
                    llm = load_llama(path, extra=extra, **kwargs)
                except (ValueError, RuntimeError) as exc:
                    _send(out, ("error", ("load", str(exc))))
                    continue
                eog = set()
                texts = []
                import llama_cpp

                for i in range(llm.n_vocab()):
                    if llama_cpp.llama_vocab_is_eog(llm._model.vocab, i):
                        eog.add(i)
                    if vocab_texts:
                        texts.append(llm._model.token_get_text(i))
                value = {
                    "n_vocab": llm.n_vocab(),
                    "n_ctx": llm.n_ctx(),
                    "metadata": dict(llm.metadata),
                    "token_bos": llm.token_bos(),
                    "token_eos": llm.token_eos(),
                    "eog": eog,
                    "token_texts": texts,
                    "extra_bufts": extra,
                }
            elif op == "tokenize":
                data, add_bos, special = args
                value = list(llm.tokenize(data, add_bos=add_bos, special=special))
            elif op == "detokenize":
                value = llm.detokenize(args[0])
            elif op == "logits":
                _crash_hook()
                ids = args[0]
                llm.reset()
                llm.eval(ids)
                value = np.array(llm.scores[: len(ids)], dtype=np.float32)
            elif op == "generate":
                _crash_hook()
                ids, temp, seed, sampling = args
                llm.set_seed(seed)
                gen = llm.generate(ids, temp=temp, **sampling)
                value = None
            elif op == "next":
                value = int(next(gen))
            elif op == "close":
                if llm is not None:
                    llm.close()
                _send(out, ("ok", None))
                return
            else:
                raise ValueError(f"unknown request {op!r}")
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it as a ForgeError
            _send(out, ("error", ("error", f"{type(exc).__name__}: {exc}")))
            continue
        _send(out, ("ok", value))


def _probe_main(path: str, mode: str) -> int:
    import numpy as np

    llm = load_llama(path, extra=mode == "on", n_ctx=64, n_batch=64, logits_all=True)
    llm.eval(list(range(16)))  # a batch of more than one token: the AMX path uses tile instructions only then
    ok = bool(np.isfinite(np.array(llm.scores[:16])).all())
    llm.close()
    return 0 if ok else 3


def main(argv: list[str]) -> int:
    if argv[:1] == ["probe"]:
        return _probe_main(argv[1], argv[2])
    if argv[:1] == ["worker"]:
        # Ctrl-C in a terminal reaches the whole process group: the parent decides what an interrupt means (a
        # run saves and stops, chat ends); the child must not die under it and turn that into a "crash".
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # The protocol owns the real stdout; anything native code prints goes to stderr instead.
        out = os.fdopen(os.dup(1), "wb")
        os.dup2(2, 1)
        inp = os.fdopen(os.dup(0), "rb")
        _worker(inp, out)
        return 0
    sys.stderr.write("usage: python -m llmforge.native worker | probe FILE on|off\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
