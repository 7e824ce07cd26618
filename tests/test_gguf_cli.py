"""The GGUF front end: `llmforge gguf export|quantize|check`, `llmforge import`, `llmforge chat`, the `gguf` stage
and the Ollama Modelfiles, end to end on a tiny real model.

The model is a real transformers Llama (2 layers, hidden 64) with a byte-level BPE tokenizer trained here and
the chatml template; its weights are drawn wide (initializer_range 0.2) so that greedy decoding says varied
tokens rather than one token over and over. Commands run through the real command line in a subprocess;
llama.cpp runs for real. Modelfile templates are checked by rendering conversations with the Jinja template
and with the Go template the Modelfile holds, through a small interpreter of the Go template subset written
below (independent of the code that writes the templates).
"""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import pytest

from conftest import run_cli
from llmforge.chat import render
from llmforge.native import load_llama
from llmforge_plugins.chat_templates import BUILTIN_TEMPLATES
from llmforge_plugins.gguf.modelfile import ChatInfo, modelfile_text, translate

TEMPLATES = {t.name: t for t in BUILTIN_TEMPLATES}
CORPUS = [f"the quick brown fox jumps over the lazy dog {i} times." for i in range(150)] + [
    "hello world, how are you? I am fine, thank you.",
    "Où est la café? 東京 🦙 x = 42;",
] * 20
PROMPTS = ["hello world", "the quick fox", "how are you?"]


# ------------------------------------------------------------------------------------------------
# a Go text/template interpreter for the subset the Modelfiles use


_ACTION = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_TOKEN = re.compile(r'(\s*)(\(|\)|"(?:[^"\\]|\\.)*"|-?\d+|\$?[A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)')


def _tokens(expr: str) -> list[tuple[str, bool]]:
    out, pos = [], 0
    while pos < len(expr.rstrip()):
        m = _TOKEN.match(expr, pos)
        assert m and m.group(2), f"cannot read {expr[pos:]!r}"
        out.append((m.group(2), bool(m.group(1)) or pos == 0))
        pos = m.end()
    return out


def _parse_expr(tokens: list, i: int = 0, until: str | None = None):
    """A command (function call or single operand) from tokens[i:]; returns (node, next index)."""
    items = []
    while i < len(tokens) and tokens[i][0] != until:
        tok, spaced = tokens[i]
        if tok == "(":
            node, i = _parse_expr(tokens, i + 1, until=")")
            node = ("group", node)
            i += 1
        else:
            node = ("lit", json.loads(tok)) if tok.startswith('"') or tok.lstrip("-").isdigit() else ("name", tok)
            i += 1
        while i < len(tokens) and not tokens[i][1] and tokens[i][0].startswith("."):  # (x).Field
            node = ("field", node, tokens[i][0][1:])
            i += 1
        items.append(node)
    return (("call", items) if len(items) > 1 else items[0]), i


FUNCS = {
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "not": lambda a: not a,
    "len": len,
    "index": lambda x, i: x[i],
    "slice": lambda x, i: x[i:],
}


def _eval(node, dot, env):
    kind = node[0]
    if kind == "lit":
        return node[1]
    if kind == "group":
        return _eval(node[1], dot, env)
    if kind == "field":
        return _eval(node[1], dot, env)[node[2]]
    if kind == "name":
        name = node[1]
        if name == ".":
            return dot
        if name.startswith("$"):
            var, *fields = name.split(".")
            value = env["$"] if var == "$" else env[var]
        else:
            assert name.startswith("."), f"unknown name {name}"
            value, fields = dot, name[1:].split(".")
        for f in fields:
            value = value[f]
        return value
    items = node[1]
    fn = items[0][1]
    if fn in ("and", "or"):  # short-circuit, as Go's template and/or (Go >= 1.18)
        for arg in items[1:]:
            value = _eval(arg, dot, env)
            if bool(value) != (fn == "and"):
                return value
        return value
    return FUNCS[fn](*[_eval(a, dot, env) for a in items[1:]])


def _parse(parts: list, i: int, stop=("end",)):
    """Nodes until an action in `stop`; returns (nodes, index of that action)."""
    nodes = []
    while i < len(parts):
        kind, text = parts[i]
        if kind == "text":
            nodes.append(("text", text))
            i += 1
            continue
        assert not text.startswith("-") and not text.endswith("-"), "the Modelfiles use no trim markers"
        word = text.split()[0] if text.split() else ""
        if word in stop or text in stop:
            return nodes, i
        if word == "if":
            branches, cond = [], _parse_expr(_tokens(text[2:]))[0]
            other = []
            while True:
                body, i = _parse(parts, i + 1, stop=("end", "else"))
                branches.append((cond, body))
                action = parts[i][1].strip()
                if action == "end":
                    break
                if action == "else":
                    other, i = _parse(parts, i + 1, stop=("end",))
                    break
                cond = _parse_expr(_tokens(action[len("else if") :]))[0]
            nodes.append(("if", branches, other))
        elif word == "range":
            m = re.match(r"range\s+(\$\w+)\s*,\s*(\$\w+)\s*:=\s*(.*)$", text, re.DOTALL)
            assert m, text
            body, i = _parse(parts, i + 1, stop=("end",))
            nodes.append(("range", m.group(1), m.group(2), _parse_expr(_tokens(m.group(3)))[0], body))
        elif re.match(r"\$\w+\s*:=", text):
            name, expr = text.split(":=", 1)
            nodes.append(("set", name.strip(), _parse_expr(_tokens(expr))[0]))
        else:
            nodes.append(("out", _parse_expr(_tokens(text))[0]))
        i += 1
    return nodes, i


def _run(nodes, dot, env, out: list) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "out":
            out.append(str(_eval(node[1], dot, env)))
        elif node[0] == "set":
            env[node[1]] = _eval(node[2], dot, env)
        elif node[0] == "if":
            for cond, body in node[1]:
                if _eval(cond, dot, env):
                    _run(body, dot, dict(env), out)
                    break
            else:
                _run(node[2], dot, dict(env), out)
        elif node[0] == "range":
            for i, item in enumerate(_eval(node[3], dot, env)):
                _run(node[4], item, {**env, node[1]: i, node[2]: item}, out)


def go_render(template: str, data: dict) -> str:
    parts, pos = [], 0
    for m in _ACTION.finditer(template):
        if m.start() > pos:
            parts.append(("text", template[pos : m.start()]))
        parts.append(("action", m.group(1).strip()))
        pos = m.end()
    if pos < len(template):
        parts.append(("text", template[pos:]))
    nodes, i = _parse(parts, 0, stop=())
    out: list[str] = []
    _run(nodes, data, {"$": data}, out)
    return "".join(out)


def test_the_go_interpreter_on_known_go_semantics():
    data = {"Messages": [{"Role": "user", "Content": "a"}, {"Role": "assistant", "Content": "b"}]}
    tpl = (
        "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}[{{ $i }}:{{ .Role }}"
        '{{ if $last }}!{{ else if eq .Role "user" }}?{{ else }}.{{ end }}]{{ end }}'
        '{{ if and .Messages (eq (index .Messages 0).Role "user") }}U{{ end }}{{ if ne 1 2 }}N{{ end }}'
    )
    assert go_render(tpl, data) == "[0:user?][1:assistant!]UN"


# ------------------------------------------------------------------------------------------------
# Modelfiles: the Go template says what the Jinja template says


CONTENTS = {
    "system": ["You are terse.", "Line one\nline two"],
    "user": ["Hi there", "What is 2+3?", "Multi\nline\n\nprompt", "x"],
    "assistant": ["Hello!", "It is 5.", "Sure:\n- a\n- b"],
}


def _conversations(with_system: bool):
    """Conversations ending on the user (a generation prompt follows) or on the assistant (none)."""
    out = []
    for rounds in (1, 2, 3):
        msgs = [{"role": "system", "content": CONTENTS["system"][rounds % 2]}] if with_system else []
        for r in range(rounds):
            msgs.append({"role": "user", "content": CONTENTS["user"][r]})
            out.append((list(msgs), True))
            msgs.append({"role": "assistant", "content": CONTENTS["assistant"][r]})
            out.append((list(msgs), False))
    return out


def _agree(info: ChatInfo, source: str, with_system: bool = True) -> str:
    tr = translate(info)
    assert tr.template is not None, tr.reason
    variables = {k: v for k, v in (("bos_token", info.bos), ("eos_token", info.eos)) if v}
    for msgs, gen in _conversations(False) + (_conversations(True) if with_system else []):
        jinja = render(source, msgs, add_generation_prompt=gen, **variables)
        go = go_render(tr.template, {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in msgs]})
        if info.add_bos and info.bos:
            go = info.bos + go  # llama.cpp adds the BOS in front of what the template writes
        assert go == jinja, f"{msgs}\nJinja: {jinja!r}\nGo:    {go!r}"
    return tr.layout


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("add_bos", [False, True])
def test_builtin_templates_become_known_go_templates_that_render_the_same(name, add_bos):
    t = TEMPLATES[name]
    info = ChatInfo(template=t.source, bos=t.bos, eos=t.eos, add_bos=add_bos)
    assert _agree(info, t.source) == name
    stops = translate(info).stops
    assert stops[0] == t.eos and set(t.stop_strings) <= set(stops)


def test_a_template_is_recognised_by_what_it_renders_not_by_its_source():
    # ChatML written another way (as Qwen's tokenizer_config.json spells it): the same layout.
    qwen_like = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
        "{% endif %}"
    )
    assert qwen_like != TEMPLATES["chatml"].source
    assert _agree(ChatInfo(template=qwen_like, eos="<|im_end|>"), qwen_like) == "chatml"


@pytest.mark.parametrize(
    "source, eos, with_system",
    [
        # Zephyr-style role tags, BOS from the tokenizer's bos_token
        (
            "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}",
            "</s>",
            True,
        ),
        # plain-text roles, no system support (raises on it), answers ended by the EOS
        (
            "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n' }}"
            "{% elif m['role'] == 'assistant' %}{{ 'Bot: ' + m['content'] + eos_token + '\n' }}"
            "{% else %}{{ raise_exception('no system') }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'Bot:' }}{% endif %}",
            "<|end|>",
            False,
        ),
    ],
)
def test_other_simple_templates_are_derived_and_render_the_same(source, eos, with_system):
    info = ChatInfo(template=source, bos="<s>", eos=eos, add_bos=False)
    assert _agree(info, source, with_system=with_system) == "derived"
    assert eos in translate(info).stops


def test_a_template_that_is_not_a_simple_layout_gets_no_template_and_says_why():
    numbered = (
        "{% for m in messages %}{{ loop.index ~ '. ' + m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    text = modelfile_text("m.gguf", ChatInfo(template=numbered, eos="</s>"))
    assert not any(line.startswith("TEMPLATE") for line in text.splitlines())
    assert "# No TEMPLATE: its chat template is not a simple role/content layout" in text
    assert 'PARAMETER stop "</s>"' in text and "FROM ./m.gguf" in text
    none = modelfile_text("m.gguf", ChatInfo(template=None, eos="</s>"))
    assert "# No TEMPLATE: the GGUF carries no chat template" in none


def test_modelfile_text_for_chatml():
    t = TEMPLATES["chatml"]
    text = modelfile_text("model-f16.gguf", ChatInfo(template=t.source, eos="<|im_end|>"))
    lines = text.splitlines()
    assert "FROM ./model-f16.gguf" in lines and "#   ollama create NAME -f model-f16.Modelfile" in lines
    assert text.count('TEMPLATE """') == 1 and 'TEMPLATE """{{ range $i, $_ := .Messages }}' in text
    assert [ln for ln in lines if ln.startswith("PARAMETER stop")] == [
        'PARAMETER stop "<|im_end|>"',
        'PARAMETER stop "<|endoftext|>"',
        'PARAMETER stop "<|im_start|>"',
    ]


# ------------------------------------------------------------------------------------------------
# a tiny real model, and its F32 export


def _make_model(path: Path, template=TEMPLATES["chatml"]) -> Path:
    import torch
    from transformers import LlamaForCausalLM

    from llmforge_plugins.training.models import model_config, train_tokenizer

    tok = train_tokenizer(CORPUS, 320, template)
    cfg = model_config("tiny", len(tok), 128, {}, tok)
    cfg.initializer_range = 0.2  # wide weights: greedy decoding says varied tokens
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return _make_model(tmp_path_factory.mktemp("hf") / "tiny")


@pytest.fixture(scope="module")
def f32(tiny, tmp_path_factory) -> Path:
    from llmforge_plugins.gguf.export import export_gguf

    out = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    export_gguf(tiny, out, "f32")
    return out


def _ok(res):
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def _bad(res, *needles):
    """Exit 2, one clear message naming the problem, no traceback."""
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and res.stderr.startswith("error: "), res.stderr
    for needle in needles:
        assert needle in res.stderr, res.stderr
    return res


def _truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


# ------------------------------------------------------------------------------------------------
# llmforge gguf export / quantize / check, llmforge import


def test_export_writes_the_gguf_and_its_modelfile(tiny, tmp_path):
    out = tmp_path / "out" / "tiny-f16.gguf"
    res = _ok(run_cli("gguf", "export", str(tiny), str(out)))
    assert f"wrote {out} (f16" in res.stdout and "tiny-f16.Modelfile" in res.stdout
    modelfile = (tmp_path / "out" / "tiny-f16.Modelfile").read_text()
    assert "FROM ./tiny-f16.gguf" in modelfile and "# Chat template: the built-in template 'chatml'." in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny-f16.Modelfile", "tiny-f16.gguf"]
    llm = load_llama(out, n_ctx=64)
    assert llm.metadata["tokenizer.chat_template"] == TEMPLATES["chatml"].source
    llm.close()
    # an existing output needs --force
    _bad(run_cli("gguf", "export", str(tiny), str(out)), "already exists", "--force")
    _ok(run_cli("gguf", "export", str(tiny), str(out), "--outtype", "q8_0", "--force"))


def test_export_bad_inputs_exit_2_and_write_nothing(tiny, tmp_path):
    out = tmp_path / "x.gguf"
    _bad(run_cli("gguf", "export", str(tiny), str(out), "--outtype", "q4_k_m"), "--outtype q4_k_m", "f16")
    _bad(run_cli("gguf", "export", str(tmp_path), str(out)), str(tmp_path))  # no config.json
    _bad(run_cli("gguf", "export", str(tiny), str(tmp_path / "x.bin")), "must end in .gguf")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_quantize_with_and_without_an_importance_matrix(f32, tiny, tmp_path):
    q8 = tmp_path / "tiny-Q8_0.gguf"
    res = _ok(run_cli("gguf", "quantize", str(f32), str(q8), "--type", "q8_0"))
    assert "(Q8_0," in res.stdout and (tmp_path / "tiny-Q8_0.Modelfile").is_file()
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(CORPUS[:60]))
    q4 = tmp_path / "tiny-Q4_K_M.gguf"
    res = _ok(
        run_cli(
            "gguf", "quantize", str(f32), str(q4), "-t", "Q4_K_M", "--calibration", str(calib), "--model", str(tiny)
        )
    )
    assert "importance matrix kept as tiny-Q4_K_M.imatrix.safetensors" in res.stdout
    assert (tmp_path / "tiny-Q4_K_M.imatrix.safetensors").is_file()
    # the kept matrix is reusable
    _ok(
        run_cli(
            "gguf",
            "quantize",
            str(f32),
            str(tmp_path / "again.gguf"),
            "-t",
            "Q4_K_S",
            "--imatrix",
            str(tmp_path / "tiny-Q4_K_M.imatrix.safetensors"),
        )
    )
    for path in (q8, q4):
        llm = load_llama(path, n_ctx=64)
        assert llm.n_vocab() == 320
        llm.close()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_quantize_bad_inputs_exit_2_and_write_nothing(f32, tiny, tmp_path):
    out = tmp_path / "q.gguf"
    _bad(run_cli("gguf", "quantize", str(f32), str(out), "--type", "Q4_K_X"), "unknown quantization type 'Q4_K_X'")
    _bad(run_cli("gguf", "quantize", str(f32), str(out), "--type", "IQ2_XXS"), "IQ2_XXS needs an importance matrix")
    _bad(
        run_cli("gguf", "quantize", str(f32), str(out), "-t", "Q4_K_M", "--calibration", str(f32)),
        "--calibration needs --model",
    )
    broken = _truncated(f32, tmp_path / "broken.gguf")
    _bad(run_cli("gguf", "quantize", str(broken), str(out), "-t", "Q4_K_M"), str(broken), "truncated")
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("hello")
    _bad(run_cli("gguf", "quantize", str(not_gguf), str(out), "-t", "Q4_K_M"), "not a GGUF file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.gguf", "model.gguf"]


@pytest.mark.slow  # 15-50 s of training runs: the default run stays under 15 minutes; .ci/run's slow pass runs it
def test_check_prints_the_scorecard_and_gates_on_thresholds(f32, tiny, tmp_path):
    from llmforge_plugins.gguf.quantize import quantize_gguf

    q4 = tmp_path / "tiny-Q4_0.gguf"
    quantize_gguf(f32, q4, "Q4_0")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(CORPUS[:40]))
    res = run_cli("gguf", "check", str(tiny), str(f32), str(q4), "--text", str(text), "--max-kld", "0.000001")
    # the table is printed, then the Q4_0 file misses the threshold: exit 1, naming it
    assert res.returncode == 1, res.stdout + res.stderr
    rows = [ln for ln in res.stdout.splitlines() if ln.startswith("| tiny-")]
    assert [r.split("|")[1].strip() for r in rows] == ["tiny-f32.gguf", "tiny-Q4_0.gguf"]
    assert rows[0].split("|")[2].strip() == "F32" and rows[0].rstrip(" |").endswith("ok")
    error = res.stderr.split("error: ", 1)[1]
    assert "tiny-Q4_0.gguf: mean KL divergence" in error and "tiny-f32.gguf" not in error
    card = json.loads(_ok(run_cli("gguf", "check", str(tiny), str(f32), "--json")).stdout)
    (row,) = card["rows"]
    assert row["tokenization_ok"] and row["top1"] > 0.99 and row["mean_kld"] < 1e-5


def test_import_gives_back_a_model_with_the_same_logits(f32, tiny, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "imported"
    _ok(run_cli("import", str(f32), str(out)))
    ids = torch.tensor([AutoTokenizer.from_pretrained(str(tiny))("hello world, how are you?")["input_ids"]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(str(tiny)).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(str(out)).eval()(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == TEMPLATES["chatml"].source
    _bad(run_cli("import", str(f32), str(out)), "not empty")


# ------------------------------------------------------------------------------------------------
# llmforge chat


def test_chat_hf_and_f32_gguf_answer_with_the_same_greedy_tokens(tiny, f32):
    from llmforge_plugins.gguf.chat import open_engine, render_prompt, reply

    hf, gg = open_engine(tiny), open_engine(f32)
    try:
        assert (hf.kind, gg.kind) == ("hf", "gguf") and hf.template == gg.template == TEMPLATES["chatml"].source
        for prompt in PROMPTS:
            messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]
            text = render_prompt(hf, messages)
            assert render_prompt(gg, messages) == text
            assert hf.encode(text, chat=True) == gg.encode(text, chat=True)
            a = reply(hf, messages, max_new_tokens=12, temperature=0)
            b = reply(gg, messages, max_new_tokens=12, temperature=0)
            assert len(a.token_ids) >= 3 and a.token_ids == b.token_ids and a.text == b.text, (prompt, a, b)
            # sampling is seeded: the same seed gives the same answer
            s1, s2 = (reply(gg, messages, max_new_tokens=8, temperature=0.9, seed=5) for _ in range(2))
            assert s1.token_ids == s2.token_ids
    finally:
        gg.close()


def test_llama_cpp_pythons_own_chat_formatter_renders_the_gguf_template_like_we_do(f32):
    """create_chat_completion (and front ends built on the GGUF's template) format conversations as llmforge does."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = load_llama(f32, n_ctx=64)
    try:
        eos = llm._model.token_get_text(llm.token_eos())
        formatter = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], eos_token=eos, bos_token="")
        for msgs, gen in _conversations(True):
            if gen:
                assert formatter(messages=msgs).prompt == render(TEMPLATES["chatml"], msgs, add_generation_prompt=True)
    finally:
        llm.close()


def test_chat_prompt_prints_just_the_answer(tiny, f32):
    out = {}
    for name, model in (("hf", tiny), ("gguf", f32)):
        res = _ok(run_cli("chat", str(model), "--prompt", "hello world", "--temperature", "0", "--max-new-tokens", "8"))
        assert res.stdout.endswith("\n") and res.stdout.strip(), res.stdout
        out[name] = res.stdout
    assert out["hf"] == out["gguf"]


def test_chat_reads_prompts_until_exit(f32):
    from llmforge_plugins.gguf.chat import ChatSettings, interactive, open_engine

    res = _ok(run_cli("chat", str(f32), "--max-new-tokens", "4", input="hello\n/reset\nthere\n/exit\nignored\n"))
    assert "/exit or end of input quits" in res.stderr and "(conversation cleared)" in res.stderr
    engine = open_engine(f32)
    try:
        answers = io.StringIO()
        n = interactive(
            engine,
            ChatSettings(max_new_tokens=4, temperature=0),
            inp=io.StringIO("hello\n\nthere\n"),
            out=answers,
            err=io.StringIO(),
        )
        assert n == 2 and answers.getvalue().count("\n") >= 2
    finally:
        engine.close()


def test_chat_without_a_chat_template_continues_text(tiny, tmp_path):
    import shutil

    from llmforge_plugins.gguf.export import export_gguf

    plain = tmp_path / "plain"
    shutil.copytree(tiny, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    gguf = tmp_path / "plain.gguf"
    export_gguf(plain, gguf, "f32")
    from llmforge_plugins.gguf.modelfile import write_modelfile

    assert "# No TEMPLATE: the GGUF carries no chat template" in write_modelfile(gguf).read_text()
    from llmforge_plugins.gguf.chat import ChatSettings, one_shot, open_engine

    outs = []
    for model in (plain, gguf):
        engine = open_engine(model)
        try:
            assert engine.template is None
            out = io.StringIO()
            one_shot(engine, "the quick brown", ChatSettings(max_new_tokens=6, temperature=0), out=out)
            outs.append(out.getvalue())
        finally:
            engine.close()
    assert outs[0] == outs[1] and outs[0].strip()


def test_chat_bad_inputs_exit_2(f32, tmp_path):
    _bad(run_cli("chat", str(tmp_path / "nope"), "-p", "hi"), "no such file or directory")
    _bad(run_cli("chat", str(tmp_path), "-p", "hi"), "not a model directory")
    _bad(run_cli("chat", str(_truncated(f32, tmp_path / "cut.gguf")), "-p", "hi"), "cut.gguf", "truncated")
    text = tmp_path / "notes.txt"
    text.write_text("just text")
    _bad(run_cli("chat", str(text), "-p", "hi"), "not a GGUF file")


# ------------------------------------------------------------------------------------------------
# the gguf stage


def _pipeline(root: Path, body: str):
    from llmforge.pipeline import load_pipeline
    from llmforge.plugins import load_registry
    from llmforge.runner import RunRequest, run_pipeline

    (root / "forge.toml").write_text('[project]\nname = "gguf-test"\n\n' + body)
    registry = load_registry(env="")
    return run_pipeline(load_pipeline(root / "forge.toml", registry=registry), RunRequest(), registry=registry)


def test_gguf_stage_exports_quantizes_checks_and_writes_modelfiles(tiny, tmp_path):
    (tmp_path / "calib.txt").write_text("\n\n".join(CORPUS[::3]))
    result = _pipeline(
        tmp_path,
        f"""
[[stages]]
name = "export"
uses = "gguf"
model = "{tiny}"
quantize = ["Q8_0", "q4_k_m"]
imatrix = {{ calibration = "calib.txt", max_tokens = 2000 }}
max_kld = 2.0
min_top1 = 0.2
""",
    )
    assert result.exit_code == 0, result.stages
    art = result.run_dir / "stages" / "export" / "artifacts" / "gguf"
    assert sorted(p.name for p in art.iterdir()) == [
        "imatrix.safetensors",
        "model-Q4_K_M.Modelfile",
        "model-Q4_K_M.gguf",
        "model-Q8_0.Modelfile",
        "model-Q8_0.gguf",
        "model-f16.Modelfile",
        "model-f16.gguf",
        "report.json",
        "report.md",
    ]
    assert "FROM ./model-Q4_K_M.gguf" in (art / "model-Q4_K_M.Modelfile").read_text()
    report = json.loads((art / "report.json").read_text())
    assert report["failures"] == [] and [Path(r["file"]).name for r in report["card"]["rows"]] == [
        "model-f16.gguf",
        "model-Q8_0.gguf",
        "model-Q4_K_M.gguf",
    ]
    info = result.stages["export"]["info"]
    assert info["check"]["model-f16.gguf"]["tokenization_ok"] and info["check"]["model-f16.gguf"]["top1"] > 0.99
    assert info["files"]["model-Q8_0.gguf"] == (art / "model-Q8_0.gguf").stat().st_size
    assert "| model-Q4_K_M.gguf | Q4_K_M |" in (art / "report.md").read_text()


def test_gguf_stage_fails_when_parity_is_broken_and_keeps_the_report(tiny, tmp_path):
    result = _pipeline(
        tmp_path,
        f"""
[[stages]]
name = "export"
uses = "gguf"
model = "{tiny}"
quantize = ["Q4_0"]
max_kld = 0.0
""",
    )
    assert result.exit_code == 1
    stage = result.stages["export"]
    assert stage["status"] == "failed" and "GGUF parity check failed" in stage["error"]
    assert "model-Q4_0.gguf: mean KL divergence" in stage["error"]
    stage_dir = result.run_dir / "stages" / "export"
    assert (stage_dir / "report.md").is_file() and json.loads((stage_dir / "report.json").read_text())["failures"]
    assert not (stage_dir / "artifacts" / "gguf").exists()  # nothing a later stage could take for a good file


def test_gguf_stage_options_are_checked_before_running(tiny, project):
    project.write(f"""
[[stages]]
name = "export"
uses = "gguf"
model = "{tiny}"
quantize = ["Q4_K_M", "Q9_Z", "IQ2_XXS", "f16", "q4_k_m"]
""")
    res = project.run("validate")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "stages[0].quantize[1]: unknown quantization type 'Q9_Z'" in res.stderr
    assert "stages[0].quantize[2]: IQ2_XXS needs an importance matrix" in res.stderr
    assert "stages[0].quantize: F16 is the export itself" in res.stderr
    assert "stages[0].quantize: listed twice: Q4_K_M" in res.stderr


# ------------------------------------------------------------------------------------------------
# llama.cpp at arm's length: a child process, and the probe for CPUs whose AMX kernels fault


@pytest.fixture(scope="module")
def quantized(f32, tmp_path_factory) -> dict:
    """Q8_0 and Q4_K_M files of the tiny model: types with llama.cpp AMX kernels (the ones that SIGILL where AMX is
    advertised but does not run)."""
    from llmforge_plugins.gguf.quantize import quantize_gguf

    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for qtype in ("Q8_0", "Q4_K_M"):
        out[qtype] = root / f"tiny-{qtype}.gguf"
        quantize_gguf(f32, out[qtype], qtype)
    return out


def _crash_message(res, path: Path, doing: str, signal_name: str = "SIGILL") -> str:
    """Exit 1 (the work failed), one message naming the signal and the file, no traceback."""
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and "Fatal Python error" not in res.stderr, res.stderr
    error = res.stderr.split("error: ", 1)[1]
    assert error.startswith(f"llama.cpp crashed ({signal_name}, ") and f" {doing} {path}" in error, res.stderr
    return error


@pytest.mark.parametrize("force", ["auto", "off"])
def test_check_and_chat_evaluate_quantized_files_on_this_machine(tiny, quantized, force):
    """`gguf check` and `chat` on Q8_0 and Q4_K_M files work whatever the CPU. On the Intel machine whose AMX kernels
    fault (exit 132 before: the probe, "auto", now loads with extra buffer types off) this is the fallback at work;
    "off" forces the fallback on a machine without the fault."""
    env = {"LLMFORGE_LLAMA_EXTRA_BUFTS": force}
    card = json.loads(
        _ok(
            run_cli("gguf", "check", str(tiny), str(quantized["Q8_0"]), str(quantized["Q4_K_M"]), "--json", env=env)
        ).stdout
    )
    assert [r["type"] for r in card["rows"]] == ["Q8_0", "Q4_K_M"]
    for row in card["rows"]:
        assert row["tokenization_ok"] and math.isfinite(row["ppl"]) and row["top1"] > 0.5, row
    assert card["rows"][0]["mean_kld"] < card["rows"][1]["mean_kld"] < 0.5  # 8 bits closer than 4
    for path in quantized.values():
        res = _ok(
            run_cli(
                "chat", str(path), "--prompt", "hello world", "--temperature", "0", "--max-new-tokens", "8", env=env
            )
        )
        assert res.stdout.strip(), res.stdout


def test_a_llama_cpp_crash_is_an_error_naming_the_file_and_the_signal(tiny, quantized):
    """The child running llama.cpp kills itself with SIGILL (the test hook), as a faulting kernel would: the CLI
    reports it in one message naming the signal and the file, exit 1, no traceback."""
    q8 = quantized["Q8_0"]
    env = {"LLMFORGE_TEST_LLAMA_SIGNAL": "SIGILL"}
    _crash_message(run_cli("gguf", "check", str(tiny), str(q8), env=env), q8, "evaluating")
    _crash_message(run_cli("chat", str(q8), "-p", "hi", env=env), q8, "running")
    error = _crash_message(
        run_cli("chat", str(q8), "-p", "hi", env={"LLMFORGE_TEST_LLAMA_SIGNAL": "SIGSEGV"}), q8, "running", "SIGSEGV"
    )
    assert "segmentation fault" in error.lower()


def test_the_real_amx_fault_is_contained_where_the_probe_finds_it(tiny, quantized):
    """On a CPU whose AMX kernels fault, forcing llama.cpp's extra buffer types on reproduces the real SIGILL: it is
    reported as an error naming the file (and the hint names the way out), instead of killing llmforge."""
    from llmforge.native import probe

    if probe()["result"] != "fault":
        pytest.skip("llama.cpp's AMX kernels run on this CPU (the test hook covers the crash path here)")
    q4 = quantized["Q4_K_M"]
    res = run_cli("gguf", "check", str(tiny), str(q4), env={"LLMFORGE_LLAMA_EXTRA_BUFTS": "on"})
    error = _crash_message(res, q4, "evaluating")
    assert "LLMFORGE_LLAMA_EXTRA_BUFTS=off" in error


def test_a_crash_in_the_gguf_stage_fails_the_stage_not_the_run(tiny, tmp_path, monkeypatch):
    """In-process run (the pytest process itself would die with a native crash before): the stage fails with the
    message, the run ends with exit 1 and a manifest."""
    monkeypatch.setenv("LLMFORGE_TEST_LLAMA_SIGNAL", "SIGILL")
    result = _pipeline(
        tmp_path,
        f"""
[[stages]]
name = "export"
uses = "gguf"
model = "{tiny}"
quantize = ["Q8_0"]
""",
    )
    assert result.exit_code == 1
    stage = result.stages["export"]
    assert stage["status"] == "failed"
    assert "llama.cpp crashed (SIGILL, illegal instruction) evaluating " in stage["error"]
    assert "model-f16.gguf" in stage["error"]
    assert not (result.run_dir / "stages" / "export" / "artifacts" / "gguf").exists()


def test_the_tui_chat_survives_a_llama_cpp_crash(quantized, monkeypatch):
    """The TUI's chat panel (the same engine): a crash shows as an error in the conversation, the app keeps running,
    and the next message, with llama.cpp healthy again, gets its answer from a fresh child."""
    import asyncio

    from textual.app import App

    from conftest import until
    from llmforge.tui.widgets.chat import ChatPanel, Message

    q8 = quantized["Q8_0"]

    class Host(App):
        def compose(self):
            yield ChatPanel(max_new_tokens=6, temperature=0.0)

    async def scenario():
        app = Host()
        async with app.run_test(size=(100, 30)) as pilot:
            chat = app.query_one(ChatPanel)
            chat.set_model(q8)
            monkeypatch.setenv("LLMFORGE_TEST_LLAMA_SIGNAL", "SIGILL")
            chat.send("hello")
            errors = await until(
                pilot,
                lambda: [m for m in chat.query(Message) if "error" in m.classes],
                timeout=90,
                what="the crash reported in the chat",
            )
            text = str(errors[0].content)
            assert "llama.cpp crashed (SIGILL, illegal instruction) running" in text and str(q8) in text, text
            assert not chat.answering and chat.history == []
            monkeypatch.delenv("LLMFORGE_TEST_LLAMA_SIGNAL")
            chat.send("hello")
            await until(
                pilot,
                lambda: chat.last_reply is not None and not chat.answering,
                timeout=90,
                what="an answer after the crash",
            )
            assert chat.last_reply.token_ids
            chat.on_unmount()

    asyncio.run(scenario())


def _copy_model(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_truncated_model_or_adapter_config_is_named_exit_2(tiny, f32, tmp_path):
    """`gguf check` and `chat` on a model whose model.safetensors was cut short, and `chat` on an adapter whose
    adapter_config.json was: one message naming the file, exit 2 (SafetensorError / JSONDecodeError, exit 1, before)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    cut = _copy_model(tiny, tmp_path / "cut")
    _truncated(tiny / "model.safetensors", cut / "model.safetensors")
    weights = cut / "model.safetensors"
    _bad(run_cli("gguf", "check", str(cut), str(f32)), str(weights), "truncated")
    _bad(run_cli("chat", str(cut), "-p", "hi"), str(weights), "truncated")

    adapter = tmp_path / "adapter"
    net = get_peft_model(
        LlamaForCausalLM.from_pretrained(str(tiny)), LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    )
    net.save_pretrained(str(adapter))
    config = adapter / "adapter_config.json"
    text = config.read_text()
    assert str(tiny) in text or json.loads(text)["base_model_name_or_path"]
    config.write_text(text[: len(text) // 2])
    _bad(run_cli("chat", str(adapter), "-p", "hi"), str(config), "adapter config")
    _bad(run_cli("gguf", "check", str(adapter), str(f32)), str(config), "adapter config")


def test_the_llama_cpp_child_leaves_ctrl_c_to_its_parent(quantized):
    """Ctrl-C in a terminal signals the whole process group: the child ignores it (the parent's run saves and stops,
    or chat ends), so an interrupt is never reported as a llama.cpp crash, and the model keeps answering."""
    import os
    import signal
    import time

    from llmforge.native import LlamaModel

    with LlamaModel(quantized["Q8_0"], n_ctx=64, logits_all=True) as llm:
        before = llm.logits([1, 2, 3, 4])
        os.kill(llm._proc.pid, signal.SIGINT)
        time.sleep(0.5)
        assert llm._proc.poll() is None
        assert (llm.logits([1, 2, 3, 4]) == before).all()
