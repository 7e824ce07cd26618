"""One schema per thing: turn pydantic validation into located, readable problems, and describe
options for `stages show`, `--set` and (later) the TUI form."""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from llmforge.errors import Problem
from llmforge.stage import input_marker


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """'; did you mean 'x'?' when a close candidate exists, else ''."""
    close = difflib.get_close_matches(str(word), sorted(set(candidates)), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def join_path(base: str, loc: Iterable[Any]) -> str:
    """Join a key path: ('lora', 'r') under 'stages[2]' -> 'stages[2].lora.r'; ints become [i]."""
    out = base
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _submodel(model: type[BaseModel] | None, loc: tuple) -> type[BaseModel] | None:
    """The pydantic model reached by following `loc` from `model` (for did-you-mean on nested keys)."""
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = _model_in(field.annotation)
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _message(err: Mapping[str, Any], model: type[BaseModel]) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    loc = tuple(err["loc"])
    got = err.get("input")
    if kind == "extra_forbidden":
        parent = _submodel(model, loc[:-1])
        names = list(parent.model_fields) if parent else []
        return f"unknown key '{loc[-1]}'{did_you_mean(loc[-1], names)}"
    if kind == "missing":
        return "required key is missing"
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        if isinstance(limit, float) and limit.is_integer():
            limit = int(limit)  # `> 0`, not `> 0.0`, for a float option declared with gt=0
        return f"must be {bounds[kind]} {limit} (got {_short(got)})"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')} (got {_short(got)})"
    if kind == "too_short":
        n = ctx.get("min_length")
        return f"must have at least {n} item{'s' if n != 1 else ''} (got {_short(got)})"
    if kind == "string_too_short":
        n = ctx.get("min_length")
        return f"must be at least {n} character{'s' if n != 1 else ''} long (got {_short(got)})"
    if kind == "too_long":
        return f"must have at most {ctx.get('max_length')} items"
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters long"
    type_names = {
        "int_type": "an integer",
        "int_parsing": "an integer",
        "int_from_float": "a whole number",
        "float_type": "a number",
        "float_parsing": "a number",
        "bool_type": "true or false",
        "bool_parsing": "true or false",
        "string_type": "a string",
        "list_type": "a list",
        "dict_type": "a table",
        "model_type": "a table",
        "model_attributes_type": "a table",
    }
    if kind in type_names:
        return f"expected {type_names[kind]}, got {type(got).__name__} {_short(got)}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return f"{err['msg'][0].lower()}{err['msg'][1:]} (got {_short(got)})"


def _clean_loc(model: type[BaseModel], loc: tuple) -> tuple[tuple, Any]:
    """Drop pydantic's union-member tags from a location (`command.str` -> `command`).

    Returns the real key location and, when a union of several types was met, that union's
    annotation (so that the errors of all its members can be reported as one), else None.
    """
    out: list = []
    current: Any = model
    i = 0
    while i < len(loc):
        part = loc[i]
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part) if isinstance(part, str) else None
            out.append(part)
            if field is None:  # an unknown key (extra_forbidden): keep the rest as it is
                return tuple(out) + tuple(loc[i + 1 :]), None
            current = field.annotation
            i += 1
            continue
        origin, args = typing.get_origin(current), typing.get_args(current)
        if origin is typing.Annotated:
            current = args[0]
            continue
        if origin in (typing.Union, types.UnionType):
            members = [a for a in args if a is not type(None)]
            if len(members) == 1:  # Optional[X]: pydantic does not tag it; go on with X
                current = members[0]
                continue
            return tuple(out), current
        if origin in (list, tuple, set) and isinstance(part, int):
            current = args[0] if args else Any
        elif origin is dict:
            current = args[1] if len(args) > 1 else Any
        else:
            return tuple(out) + tuple(loc[i:]), None
        out.append(part)
        i += 1
    return tuple(out), None


_TYPE_WORDS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "list": "a list",
    "dict": "a table",
}


def _union_words(annotation: Any) -> str:
    words = []
    for arg in typing.get_args(annotation):
        if arg is type(None):
            continue
        origin = typing.get_origin(arg)
        name = getattr(origin or arg, "__name__", str(arg))
        word = _TYPE_WORDS.get(name, name)
        if origin in (list, tuple) and typing.get_args(arg):
            inner = getattr(typing.get_args(arg)[0], "__name__", "")
            word = (
                f"a list of {_TYPE_WORDS.get(inner, inner).removeprefix('a ').removeprefix('an ')}s" if inner else word
            )
        words.append(word)
    return " or ".join(words)


ModelT = TypeVar("ModelT", bound=BaseModel)


def validate_model(model: type[ModelT], data: dict, base: str) -> tuple[ModelT | None, list[Problem]]:
    """Validate `data` against `model`; problems carry full key paths under `base`."""
    try:
        return model.model_validate(data), []
    except ValidationError as exc:
        problems: list[Problem] = []
        unions_done: set[tuple] = set()
        for err in exc.errors(include_url=False):
            loc, union = _clean_loc(model, tuple(err["loc"]))
            if union is not None and err["type"] != "extra_forbidden":
                if loc in unions_done:
                    continue
                unions_done.add(loc)
                got = err.get("input")
                message = f"expected {_union_words(union)}, got {type(got).__name__} {_short(got)}"
            else:
                message = _message(err, model)
            problems.append(Problem(join_path(base, loc), message))
        return None, problems


@dataclass(frozen=True)
class OptionInfo:
    """One option of a stage, flattened (`lora.r`)."""

    name: str
    type: str
    default: Any
    required: bool
    description: str
    constraints: str
    is_input: bool
    input_kinds: tuple[str, ...]

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "type": self.type,
            "default": self.default,
            "required": self.required,
            "description": self.description,
            "constraints": self.constraints,
            "input": self.is_input,
            "input_kinds": list(self.input_kinds),
        }


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        name = getattr(origin, "__name__", str(origin)).replace("UnionType", "Union")
        if name == "Union":
            return " | ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{name}[{args}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _constraints(field: Any) -> str:
    parts = []
    for meta in field.metadata:
        for attr, sym in (
            ("gt", ">"),
            ("ge", ">="),
            ("lt", "<"),
            ("le", "<="),
            ("min_length", "min length"),
            ("max_length", "max length"),
        ):
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sym} {value}")
    return ", ".join(parts)


def describe_options(model: type[BaseModel], prefix: str = "", optional: bool = False) -> list[OptionInfo]:
    """Flatten a stage's options schema into rows (nested models become dotted names). Inside an
    optional table (`replay = {...}` that may be left out), no key is required."""
    rows: list[OptionInfo] = []
    for name, field in model.model_fields.items():
        full = f"{prefix}{name}"
        sub = _model_in(field.annotation)
        if sub is not None and typing.get_origin(field.annotation) not in (list, dict):
            rows.extend(describe_options(sub, prefix=f"{full}.", optional=optional or not field.is_required()))
            continue
        marker = None
        for meta in field.metadata:
            if type(meta).__name__ == "Input":
                marker = meta
        marker = marker or input_marker(field.annotation)
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            default = default.model_dump()
        rows.append(
            OptionInfo(
                name=full,
                type=_type_name(field.annotation),
                default=default,
                required=field.is_required() and not optional,
                description=field.description or "",
                constraints=_constraints(field),
                is_input=marker is not None,
                input_kinds=marker.kinds if marker else (),
            )
        )
    return rows
