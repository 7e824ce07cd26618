"""The built-in verifiers: ``python_tests``, ``numeric``, ``regex`` and ``json_schema``.

Each is a :class:`~llmforge_plugins.synth.api.Verifier` with its own ``Options``; ``verify`` turns a batch of
answers (each with its dataset row, where the tests, the expected answer or the schema may live) into
:class:`~llmforge_plugins.synth.api.Verdict` s and never raises for a wrong answer, only for a misconfigured
verifier (a column the rows lack). The extraction helpers (:func:`extract_code`, :func:`final_number`,
:func:`extract_json`) are plain functions, so online-RL rewards can use them without a stage.

Cheap to import (the hook module imports it at start-up): jsonschema and the sandbox load on first use.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field

from llmforge.errors import DataError, Problem
from llmforge_plugins.synth.api import Verdict, Verifier, VerifierOptions

# ------------------------------------------------------------------------------------------------
# helpers shared by the verifiers (and usable by rewards)

_THINK = re.compile(r"<think>.*?(?:</think>|\Z)", re.S | re.I)


def strip_thinking(text: str) -> str:
    """The answer without ``<think>...</think>`` reasoning (an unclosed one runs to the end): a reasoning
    model's scratch work is not its answer."""
    return _THINK.sub("", text) if "<think>" in text.lower() else text


def _column(row: dict[str, Any], column: str, verifier: str, key: str) -> Any:
    if column not in row:
        have = ", ".join(sorted(row)) or "none"
        raise DataError(f"verifier {verifier}: a row has no column {column!r} (its columns: {have}); set {key}")
    return row[column]


def _short(text: str, width: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


# -- code

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(answer: str, blocks: str = "all") -> str:
    """The Python code of an answer: its fenced ```python blocks (``blocks``: ``all`` joined in order, so a
    corrected version defined later wins; ``first``; ``last``), else its untagged fenced blocks, else the
    whole answer."""
    text = strip_thinking(answer)
    found = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    python = [body for lang, body in found if lang in ("python", "py", "python3")]
    chosen = python or [body for lang, body in found if not lang]
    if not chosen:
        return text.strip("\n")
    if blocks == "first":
        chosen = chosen[:1]
    elif blocks == "last":
        chosen = chosen[-1:]
    return "\n\n".join(b.strip("\n") for b in chosen)


# -- numbers

_NUMBER = re.compile(
    r"(?<![\w.])(?P<num>[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+−]?\.\d+)"
    r"(?:\s*/\s*(?P<den>\d+(?:\.\d+)?)(?![\d.]))?"
)
_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*([-+]?[\d.,]+)\s*\}\s*\{\s*([-+]?[\d.,]+)\s*\}|\\[dt]?frac(\d)(\d)")
_CUES = re.compile(r"(?:####|answer\s*(?:is|:|=)|final answer\s*(?:is|:)?)", re.I)


def _boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (braces balanced), or None."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i : j - 1] if depth == 0 else text[i:]


def _latex(text: str) -> str:
    text = _FRAC.sub(lambda m: f"{m[1] or m[3]}/{m[2] or m[4]}", text)
    for junk in ("\\!", "\\,", "{,}", "\\%", "\\$", "$", "\\left", "\\right"):
        text = text.replace(junk, "," if junk == "{,}" else "")
    return text


def _value(match: re.Match[str]) -> float:
    num = match["num"].replace(",", "").replace("−", "-")
    value = Fraction(num) if "e" not in num.lower() else Fraction(float(num))
    if match["den"]:
        den = Fraction(match["den"])
        if den == 0:
            raise ZeroDivisionError
        value = value / den
    return float(value)


def numbers(text: str) -> list[float]:
    """Every number of a text, in order: ``1,234`` -> 1234, ``-3.5``, ``1/2`` and ``\\frac{1}{2}`` -> 0.5,
    ``1e-3``; a date's dashes are not signs."""
    out = []
    for m in _NUMBER.finditer(_latex(text)):
        try:
            out.append(_value(m))
        except (ValueError, ZeroDivisionError, OverflowError):
            continue
    return out


def final_number(text: str, pattern: str | None = None) -> float | None:
    """The answer's final number: in the last ``\\boxed{}`` if any; else the first number after the last
    ``#### `` / "answer is" / "answer:" cue; else the last number of the text. With ``pattern`` (a regex),
    the last match's first group (or the whole match) is where the number is looked for."""
    text = strip_thinking(str(text))
    if pattern:
        matches = list(re.finditer(pattern, text))
        if not matches:
            return None
        last = matches[-1]
        text = last.group(1) if last.re.groups else last.group(0)
    boxed = _boxed(text)
    if boxed is not None:
        found = numbers(boxed)
        return found[-1] if found else None
    cues = list(_CUES.finditer(text))
    if cues:
        found = numbers(text[cues[-1].end() :])
        if found:
            return found[0]
    found = numbers(text)
    return found[-1] if found else None


def _fmt(x: float) -> str:
    return str(int(x)) if x == int(x) and abs(x) < 1e15 else f"{x:.10g}"


# -- JSON

_JSON_FENCE = re.compile(r"```[ \t]*json[^\n]*\n(.*?)(?:```|\Z)", re.S | re.I)


class NoJson(ValueError):
    """The answer holds no JSON document; the message says why."""


def extract_json(answer: str, *, strict: bool = False) -> Any:
    """The JSON document of an answer: its first ```json block, else the whole answer, else (unless
    ``strict``) the first object or array in the text. Raises :class:`NoJson` with the parser's complaint."""
    text = strip_thinking(answer).strip()
    if not strict:
        fence = _JSON_FENCE.search(text)
        if fence:
            try:
                return json.loads(fence.group(1))
            except ValueError as e:
                raise NoJson(f"the ```json block is not valid JSON: {e}") from None
    try:
        return json.loads(text)
    except ValueError as e:
        first_error = f"not valid JSON: {e}"
    if strict:
        raise NoJson(first_error)
    decoder = json.JSONDecoder()
    for tries, m in enumerate(re.finditer(r"[\[{]", text)):
        if tries >= 200:  # a long text of braces: stop before this turns quadratic
            break
        try:
            value, _ = decoder.raw_decode(text, m.start())
        except ValueError:
            continue
        return value
    raise NoJson("no JSON object or array in the answer" if not re.search(r"[\[{]", text) else first_error)


# ------------------------------------------------------------------------------------------------
# python_tests


class PythonTestsOptions(VerifierOptions):
    tests_column: str = Field(
        "tests",
        description="The row column holding the tests: a string of Python asserts (each assert scored on its "
        "own), a list of them, or HumanEval's `def check(candidate)` with `entry` naming the function.",
    )
    timeout: float = Field(5.0, gt=0, le=600, description="Wall-clock seconds for one answer with all its tests.")
    memory_mb: int = Field(512, ge=64, le=65536, description="Address-space limit of the child, in MB.")
    workers: int = Field(2, ge=1, le=64, description="Answers checked at once (one child process each).")
    setup: str = Field("", description="Python code run before the answer (imports the tests rely on).")
    entry: str | None = Field(None, description="A function the answer must define (and `check(candidate)` gets).")
    entry_column: str | None = Field(
        None, description="A row column naming the function instead of `entry` (HumanEval's entry_point)."
    )
    code_block: Literal["all", "first", "last"] = Field(
        "all",
        description="Which fenced ```python blocks of the answer are the code: all of them joined (a later "
        "definition wins), the first or the last. Without fenced blocks the whole answer is the code.",
    )


class PythonTests(Verifier):
    name = "python_tests"
    summary = "The answer's Python code run against the row's unit tests in a sandboxed child process."
    Options = PythonTestsOptions

    def check(self, options: Any) -> list[Any]:
        problems: list[Any] = []
        if options.setup.strip():
            try:
                compile(options.setup, "<setup>", "exec")
            except SyntaxError as e:
                problems.append(Problem("setup", f"syntax error line {e.lineno}: {e.msg}"))
        if options.entry is not None and not options.entry.isidentifier():
            problems.append(Problem("entry", f"{options.entry!r} is not a Python function name"))
        return problems

    def verify(self, options: Any, rows: Sequence[dict[str, Any]], answers: Sequence[str]) -> list[Verdict]:
        from llmforge_plugins.synth.sandbox import SandboxLimits, TestPlan, TestsError, parse_tests, run_tests

        limits = SandboxLimits(timeout=options.timeout, memory_mb=options.memory_mb)
        jobs: list[tuple[str, TestPlan, str | None] | Verdict] = []
        for row, answer in zip(rows, answers, strict=True):
            tests = _column(row, options.tests_column, self.name, "tests_column")
            entry = options.entry
            if options.entry_column:
                entry = str(_column(row, options.entry_column, self.name, "entry_column") or "") or entry
            if not (isinstance(tests, str) or (isinstance(tests, list) and all(isinstance(t, str) for t in tests))):
                raise DataError(
                    f"verifier {self.name}: column {options.tests_column!r} holds {type(tests).__name__}; "
                    "expected Python asserts (a string or a list of strings)"
                )
            try:
                plan = parse_tests(tests, entry=entry)
            except TestsError as e:
                jobs.append(Verdict(False, 0.0, f"bad tests in column {options.tests_column!r}: {e}"))
                continue
            code = extract_code(answer, options.code_block)
            if not plan.tests:
                jobs.append(Verdict(False, 0.0, f"no tests in column {options.tests_column!r}"))
            elif not code.strip():
                jobs.append(Verdict(False, 0.0, "no code in the answer"))
            else:
                jobs.append((code, plan, entry))

        def run(job: tuple[str, TestPlan, str | None] | Verdict) -> Verdict:
            if isinstance(job, Verdict):
                return job
            code, plan, entry = job
            result = run_tests(code, plan, setup=options.setup, entry=entry, limits=limits)
            return Verdict(result.all_passed, result.score, result.reason())

        if len(jobs) == 1 or options.workers == 1:
            return [run(j) for j in jobs]
        with ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="sandbox") as pool:
            return list(pool.map(run, jobs))


# ------------------------------------------------------------------------------------------------
# numeric


class NumericOptions(VerifierOptions):
    answer_column: str = Field(
        "answer",
        description="The row column holding the expected answer: a number, or text whose final number counts "
        "(GSM8K's `... #### 72` works as is).",
    )
    tolerance: float = Field(1e-6, ge=0, description="Absolute difference allowed.")
    rel_tolerance: float = Field(0.0, ge=0, description="Difference allowed relative to the expected value.")
    pattern: str | None = Field(
        None,
        description="A regex locating the answer's number (its first group, else the whole match; the last "
        "match counts), e.g. 'Answer: (.*)'. Default: \\boxed{}, then '####'/'answer is', then the last number.",
    )


class Numeric(Verifier):
    name = "numeric"
    summary = "The answer's final number compared with the row's expected one (within a tolerance)."
    Options = NumericOptions

    def check(self, options: Any) -> list[Any]:
        if options.pattern is not None:
            try:
                re.compile(options.pattern)
            except re.error as e:
                return [Problem("pattern", f"not a valid regular expression: {e}")]
        return []

    def verify(self, options: Any, rows: Sequence[dict[str, Any]], answers: Sequence[str]) -> list[Verdict]:
        out = []
        for row, answer in zip(rows, answers, strict=True):
            raw = _column(row, options.answer_column, self.name, "answer_column")
            if isinstance(raw, bool) or raw is None:
                expected = None
            elif isinstance(raw, int | float):
                expected = float(raw)
            else:
                expected = final_number(str(raw))
            if expected is None or not math.isfinite(expected):
                out.append(
                    Verdict(False, 0.0, f"no number in the expected answer ({options.answer_column}: {_short(raw)!r})")
                )
                continue
            found = final_number(answer, options.pattern)
            if found is None:
                out.append(Verdict(False, 0.0, "no number in the answer"))
                continue
            allowed = max(options.tolerance, options.rel_tolerance * abs(expected))
            if abs(found - expected) <= allowed:
                out.append(Verdict(True, 1.0))
            else:
                out.append(Verdict(False, 0.0, f"expected {_fmt(expected)}, found {_fmt(found)}"))
        return out


# ------------------------------------------------------------------------------------------------
# regex

_FLAGS = {"ignorecase": re.IGNORECASE, "multiline": re.MULTILINE, "dotall": re.DOTALL}


class RegexOptions(VerifierOptions):
    pattern: str | None = Field(None, description="A regular expression (Python syntax) the answer must match.")
    must_not: str | None = Field(None, description="A regular expression the answer must not match anywhere.")
    mode: Literal["search", "fullmatch"] = Field(
        "search",
        description="search: `pattern` may match anywhere; fullmatch: it must match the whole answer (leading "
        "and trailing whitespace aside).",
    )
    flags: list[Literal["ignorecase", "multiline", "dotall"]] = Field(
        default_factory=list, description="Regex flags for both patterns: ignorecase, multiline, dotall."
    )


class Regex(Verifier):
    name = "regex"
    summary = "The answer matches a regular expression (and/or does not match another)."
    Options = RegexOptions

    def _compile(self, options: Any) -> tuple[re.Pattern[str] | None, re.Pattern[str] | None]:
        flags = 0
        for name in options.flags:
            flags |= _FLAGS[name]
        pattern = re.compile(options.pattern, flags) if options.pattern is not None else None
        must_not = re.compile(options.must_not, flags) if options.must_not is not None else None
        return pattern, must_not

    def check(self, options: Any) -> list[Any]:
        if options.pattern is None and options.must_not is None:
            return [Problem("pattern", "give `pattern` (must match) or `must_not` (must not match), or both")]
        problems: list[Any] = []
        for key in ("pattern", "must_not"):
            value = getattr(options, key)
            if value is not None:
                try:
                    re.compile(value)
                except re.error as e:
                    problems.append(Problem(key, f"not a valid regular expression: {e}"))
        return problems

    def verify(self, options: Any, rows: Sequence[dict[str, Any]], answers: Sequence[str]) -> list[Verdict]:
        pattern, must_not = self._compile(options)
        out = []
        for answer in answers:
            if pattern is not None:
                hit = pattern.fullmatch(answer.strip()) if options.mode == "fullmatch" else pattern.search(answer)
                if hit is None:
                    how = "does not fully match" if options.mode == "fullmatch" else "does not match"
                    out.append(Verdict(False, 0.0, f"{how} /{_short(options.pattern)}/"))
                    continue
            if must_not is not None:
                bad = must_not.search(answer)
                if bad is not None:
                    out.append(
                        Verdict(False, 0.0, f"matches the forbidden /{_short(options.must_not)}/ at {_short(bad[0])!r}")
                    )
                    continue
            out.append(Verdict(True, 1.0))
        return out


# ------------------------------------------------------------------------------------------------
# json_schema


class JsonSchemaOptions(VerifierOptions):
    # keys holding paths relative to forge.toml's folder: the stage makes them absolute before validating
    path_keys: ClassVar[tuple[str, ...]] = ("schema_file",)

    json_schema: dict[str, Any] | None = Field(
        None, alias="schema", description="The JSON Schema, inline (a TOML table)."
    )
    schema_file: str | None = Field(
        None, description="A .json file holding the schema (relative to forge.toml's folder, or absolute)."
    )
    schema_column: str | None = Field(
        None, description="A row column holding each row's schema (a table, or its JSON text)."
    )
    strict: bool = Field(
        False,
        description="The whole answer must be the JSON document; otherwise a ```json block or the first "
        "object/array in the text counts.",
    )
    check_formats: bool = Field(True, description="Check `format` keywords too (date, email, uri, ...).")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _validator(schema: Any, check_formats: bool) -> Any:
    from jsonschema.validators import validator_for  # type: ignore[import-untyped]

    cls = validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER if check_formats else None)


class JsonSchema(Verifier):
    name = "json_schema"
    summary = "The answer's JSON validated against a JSON Schema (inline, from a file, or from a column)."
    Options = JsonSchemaOptions

    def _load_file(self, path: str) -> Any:
        text = Path(path).expanduser().read_text(encoding="utf-8")
        return json.loads(text)

    def check(self, options: Any) -> list[Any]:
        from jsonschema.exceptions import SchemaError  # type: ignore[import-untyped]

        given = [k for k, v in (("schema", options.json_schema), ("schema_file", options.schema_file),
                                ("schema_column", options.schema_column)) if v is not None]  # fmt: skip
        if len(given) != 1:
            shown = ", ".join(given) if given else "none"
            return [Problem("schema", f"give exactly one of schema, schema_file, schema_column (given: {shown})")]
        schema = options.json_schema
        if options.schema_file is not None:
            try:
                schema = self._load_file(options.schema_file)
            except OSError as e:
                return [Problem("schema_file", f"cannot read {options.schema_file}: {e.strerror or e}")]
            except ValueError as e:
                return [Problem("schema_file", f"{options.schema_file} is not JSON: {e}")]
        if schema is not None:
            try:
                _validator(schema, options.check_formats)
            except SchemaError as e:
                where = "schema_file" if options.schema_file is not None else "schema"
                return [Problem(where, f"not a valid JSON Schema: {_short(e.message, 200)}")]
        return []

    def verify(self, options: Any, rows: Sequence[dict[str, Any]], answers: Sequence[str]) -> list[Verdict]:
        from jsonschema.exceptions import SchemaError
        from jsonschema.exceptions import best_match as best

        validators: dict[str, Any] = {}

        def validator_of(schema: Any) -> Any:
            key = json.dumps(schema, sort_keys=True)
            if key not in validators:
                validators[key] = _validator(schema, options.check_formats)
            return validators[key]

        fixed = None
        if options.json_schema is not None:
            fixed = options.json_schema
        elif options.schema_file is not None:
            try:
                fixed = self._load_file(options.schema_file)
            except (OSError, ValueError) as e:
                raise DataError(f"verifier {self.name}: cannot read schema_file {options.schema_file}: {e}") from None
        out = []
        for row, answer in zip(rows, answers, strict=True):
            schema = fixed
            if schema is None:
                schema = _column(row, options.schema_column, self.name, "schema_column")
                if isinstance(schema, str):
                    try:
                        schema = json.loads(schema)
                    except ValueError:
                        out.append(Verdict(False, 0.0, f"the row's schema ({options.schema_column}) is not JSON"))
                        continue
            try:
                validator = validator_of(schema)
            except SchemaError as e:
                out.append(Verdict(False, 0.0, f"the schema is not valid: {_short(e.message, 120)}"))
                continue
            try:
                document = extract_json(answer, strict=options.strict)
            except NoJson as e:
                out.append(Verdict(False, 0.0, _short(str(e), 160)))
                continue
            errors = list(validator.iter_errors(document))
            if not errors:
                out.append(Verdict(True, 1.0))
                continue
            first = best(errors)
            more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
            out.append(Verdict(False, 0.0, f"{first.json_path}: {_short(first.message, 160)}{more}"))
        return out


BUILTIN_VERIFIERS: list[type[Verifier]] = [PythonTests, Numeric, Regex, JsonSchema]
