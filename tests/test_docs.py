"""The documentation stays true to the code.

* docs/reference/stages.md is what docs/gen_reference.py generates from the schemas (not stale);
* every hookspec is named in docs/plugins.md;
* every command of the `llmforge` command line (the built-in plugins' ones included) is shown in
  docs/user-guide.md as `llmforge <command>`;
* every `llmforge ...` command line shown in the README and in docs/*.md exists, with options the
  command really has;
* links between the documents point at files and headings that exist.

All in-process (the command tree is the real Typer app turned into its click commands, exactly what
`llmforge --help` prints); no subprocess, no torch import.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import shlex
import sys
from pathlib import Path

import pytest

from conftest import EXAMPLE_PLUGIN, ROOT
from llmforge import hookspecs

DOCS = ROOT / "docs"
GENERATOR = DOCS / "gen_reference.py"
ROOT_OPTIONS = {"--debug", "--help", "-h", "--version"}  # accepted anywhere (--debug) or at the root
# Commands a doc may name before they exist, each with the reason; the test xfails (not fails) on them.
PENDING: dict[str, str] = {}  # e.g. {"demo": "`llmforge demo` is being written"}


# ------------------------------------------------------------------------------------------------
# the generated reference


def _generator():
    spec = importlib.util.spec_from_file_location("gen_reference", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_is_current():
    gen = _generator()
    assert gen.OUTPUT.exists(), "docs/reference/stages.md is missing: run python docs/gen_reference.py"
    assert gen.OUTPUT.read_text(encoding="utf-8") == gen.render(), (
        "docs/reference/stages.md is stale: run python docs/gen_reference.py"
    )


def test_reference_covers_every_builtin_stage_template_format_and_tracker():
    from llmforge.plugins import load_registry
    from llmforge.schema import describe_options

    text = (DOCS / "reference" / "stages.md").read_text(encoding="utf-8")
    reg = load_registry(env="")
    for kind, cls in reg.stages.items():
        assert f"### `{kind}`" in text
        for opt in describe_options(cls.Options):
            assert f"| `{opt.name}` |" in text, f"{kind}: option {opt.name} is not in the reference"
    for table in ("chat_templates", "readers", "row_formats", "trackers"):
        for name in getattr(reg, table):
            assert f"`{name}`" in text, f"{table}: {name} is not in the reference"


def test_generator_check_mode_reports_a_stale_file(tmp_path, monkeypatch, capsys):
    gen = _generator()
    monkeypatch.setattr(gen, "OUTPUT", tmp_path / "stages.md")
    assert gen.main(["--check"]) == 1  # missing
    assert gen.main([]) == 0 and gen.main(["--check"]) == 0
    (tmp_path / "stages.md").write_text("old\n")
    assert gen.main(["--check"]) == 1
    assert "stale" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# hooks


def test_every_hookspec_is_named_in_the_plugin_guide():
    # The core's hookspecs, and the registration hooks of every extension point the core and the built-in
    # plugins declare (register_stages next to Stage, register_merge_methods in the merge plugin, ...).
    from llmforge.plugins import load_registry

    specs = [n for n, fn in vars(hookspecs).items() if inspect.isfunction(fn) and hasattr(fn, "llmforge_spec")]
    specs += [p.hook for p in load_registry(env="").points().values()]
    assert len(specs) >= 10, specs
    text = (DOCS / "plugins.md").read_text(encoding="utf-8")
    missing = [n for n in specs if not re.search(rf"\b{n}\b", text)]
    assert not missing, f"docs/plugins.md does not mention the hooks {missing}"


# ------------------------------------------------------------------------------------------------
# the command line


def _command_tree(monkeypatch, extra=()):
    """The real app's click command for the built-in plugins (plus `extra` plugin objects)."""
    import typer

    from llmforge import plugins
    from llmforge.cli import common
    from llmforge.cli.app import build_app

    monkeypatch.setattr(common, "_REGISTRY", plugins.load_registry(env="", extra=list(extra)))
    return typer.main.get_command(build_app())


def _is_group(cmd) -> bool:
    # Duck-typed: typer builds its commands on its own copy of click's classes.
    return isinstance(getattr(cmd, "commands", None), dict)


def _paths(group, prefix=()) -> list[tuple[str, ...]]:
    out = []
    for name, cmd in sorted(group.commands.items()):
        if _is_group(cmd):
            out += _paths(cmd, prefix + (name,))
        else:
            out.append(prefix + (name,))
    return out


def test_every_command_is_in_the_user_guide(monkeypatch):
    paths = _paths(_command_tree(monkeypatch))
    assert ("run",) in paths and ("data", "inspect") in paths, paths
    text = (DOCS / "user-guide.md").read_text(encoding="utf-8")
    missing = [" ".join(p) for p in paths if f"llmforge {' '.join(p)}" not in text]
    assert not missing, f"docs/user-guide.md does not show: {', '.join(f'llmforge {m}' for m in missing)}"


_FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
_SHELL_FENCES = {"", "bash", "sh", "shell", "console"}  # ```text and the like hold output, not commands
_INLINE = re.compile(r"`([^`\n]+)`")
_COMMAND = re.compile(r"(?:^|(?<=[\s(`]))llmforge((?: +[^\s;&|)`>]+)+)")
# In a code block, a command starts a line (after an optional `$ ` prompt) or follows `$(`, `&&`, `|`, `;`.
_STARTS = re.compile(r"(?:^\s*(?:\$\s+)?|\$\(|&&\s*|\|\|?\s*|;\s*)(?=llmforge )")


def command_lines(text: str) -> list[str]:
    """`llmforge ...` invocations in shell code blocks and inline code (not in Python or TOML blocks)."""
    found: list[str] = []
    for lang, body in _FENCE.findall(text):
        if lang in _SHELL_FENCES:
            for line in body.splitlines():
                line = line.split(" #", 1)[0]
                for start in _STARTS.finditer(line):
                    m = _COMMAND.match(line, start.end())
                    if m:
                        found.append("llmforge" + m.group(1))
    prose = _FENCE.sub("", text)
    for span in _INLINE.findall(prose):
        if not re.match(r"\s*(from|import)\s", span):
            found += ["llmforge" + m for m in _COMMAND.findall(span)]
    return found


def _check(root, line: str) -> str | None:
    """None if the command line exists, else why not."""
    try:
        tokens = shlex.split(line.replace("…", ""))[1:]
    except ValueError:
        tokens = line.split()[1:]
    tokens = [t.strip("[]") for t in tokens]
    cmd, path = root, []
    for tok in tokens:
        if not tok:
            continue
        if tok.startswith("-"):
            opt = tok.split("=", 1)[0]
            known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | ROOT_OPTIONS
            if opt not in known:
                return f"{' '.join(['llmforge', *path])} has no option {opt}"
            continue
        if _is_group(cmd):
            sub = cmd.commands.get(tok)
            if sub is None:
                return f"no command `{' '.join(['llmforge', *path, tok])}`"
            cmd, path = sub, path + [tok]
    if _is_group(cmd) and cmd is not root:
        return f"`{' '.join(['llmforge', *path])}` needs a subcommand"
    return None


@pytest.fixture
def example_plugin(monkeypatch):
    """The example plugin's module, imported from its source folder (and forgotten afterwards)."""
    monkeypatch.syspath_prepend(str(EXAMPLE_PLUGIN))
    before = set(sys.modules)
    import llmforge_hello

    yield llmforge_hello
    for name in set(sys.modules) - before:
        if name.split(".")[0] == "llmforge_hello":
            del sys.modules[name]


@pytest.mark.parametrize("doc", ["README.md", *sorted(p.name for p in DOCS.glob("*.md"))])
def test_documented_commands_exist(doc, monkeypatch, example_plugin):
    """Every `llmforge ...` line a reader is shown runs against the real command tree; the commands
    of the example plugin (`llmforge hello`) count, since the docs install it before using them."""
    path = ROOT / doc if doc == "README.md" else DOCS / doc
    lines = command_lines(path.read_text(encoding="utf-8"))
    if doc == "README.md":
        assert len(lines) >= 10, lines  # the parser still finds the README's commands
    root = _command_tree(monkeypatch, extra=[("hello", example_plugin)])
    problems = {line: why for line in lines if (why := _check(root, line))}
    pending = {line: why for line, why in problems.items() if line.split()[1] in PENDING}
    wrong = {line: why for line, why in problems.items() if line not in pending}
    assert not wrong, "\n".join(f"{doc}: `{line}`: {why}" for line, why in wrong.items())
    if pending:
        pytest.xfail("; ".join(PENDING[line.split()[1]] for line in pending))


def test_command_line_parser():
    text = (
        "Run `llmforge run --resume` or `from llmforge import hookimpl`.\n"
        "```bash\nRUN=$(llmforge run --detach)  # comment llmforge nope\nllmforge logs $RUN -f | tail\n```\n"
        "```\ndetached; follow with llmforge logs X -f\n$ llmforge status\n```\n"
        "```python\nfrom llmforge import x\n```\n"
        "pip install ./examples/llmforge-hello; see `llmforge.json`\n"
    )
    assert command_lines(text) == [
        "llmforge run --detach",
        "llmforge logs $RUN -f",
        "llmforge status",
        "llmforge run --resume",
    ]


# ------------------------------------------------------------------------------------------------
# links between the documents


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    out: set[str] = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", text, re.MULTILINE):
        slug, n = _slug(heading), 0
        while (slug if n == 0 else f"{slug}-{n}") in out:
            n += 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


@pytest.mark.parametrize(
    "doc",
    ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in [*DOCS.glob("*.md"), *DOCS.glob("reference/*.md")])],
)
def test_links_between_documents_resolve(doc):
    path = ROOT / doc
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with the anchor #{anchor}")
    assert not broken, f"{doc}: " + "; ".join(broken)


# ------------------------------------------------------------------------------------------------
# the plugin guide's unit-test examples run as written


def _python_blocks(text: str) -> list[str]:
    return [body for lang, body in _FENCE.findall(text) if lang == "python"]


@pytest.mark.parametrize(
    "defines, test",
    [("class NoWord(CurationStep)", "test_no_word_drops_the_word"), ("class Maximum(MergeMethod)", "test_maximum")],
)
def test_plugin_guide_unit_test_examples_pass(defines, test):
    """The guide shows how to build a curation step and a merge method (with a TensorInfo) in a unit test:
    its class and its test, taken from the guide's code blocks, run and pass against the real API."""
    blocks = _python_blocks((DOCS / "plugins.md").read_text(encoding="utf-8"))
    source = [b for b in blocks if defines in b] + [b for b in blocks if f"def {test}(" in b]
    assert len(source) == 2, f"docs/plugins.md: no code block defining {defines!r} or {test!r}"
    namespace: dict = {}
    for block in source:
        exec(compile(block, f"docs/plugins.md ({defines})", "exec"), namespace)  # noqa: S102 - our own docs
    namespace[test]()
