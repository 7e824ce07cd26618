"""A form generated from a stage's Options schema: one field per option, errors shown under each.

The form knows how to turn what is typed into values, the way `--set` does (any TOML value, else the
text as a string); it does not validate. Whoever shows it validates (with the same code as
`llmforge validate`) and hands the problems back with `show_problems`.

An empty field means "not set": the option is left out of forge.toml and its default applies.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from textual import on
from textual.containers import Vertical
from textual.message import Message
from textual.widget import Widget
from textual.widgets import Input, Select, Static, TextArea

from llmforge.tui.tomledit import UNSET, inline_text

if TYPE_CHECKING:  # pydantic is imported when a form is built, not when the screen module loads
    from pydantic import BaseModel


@dataclass(frozen=True)
class FieldSpec:
    """One option as the form shows it. `kind` picks the widget and how text becomes a value:
    `text` (a plain string, typed without quotes), `value` (a TOML value: numbers, lists, tables,
    quoted strings) or `choice` (one of `choices`: a Literal or a bool)."""

    name: str  # dotted: lora.r
    kind: str
    type: str
    default: Any = None
    required: bool = False
    description: str = ""
    constraints: str = ""
    choices: tuple = ()


def _strip(annotation: Any) -> Any:
    """X from Annotated[X, ...] and from X | None (None is what "not set" means in the form)."""
    while True:
        origin = typing.get_origin(annotation)
        args = typing.get_args(annotation)
        if origin is typing.Annotated:
            annotation = args[0]
        elif origin in (typing.Union, types.UnionType) and type(None) in args:
            rest = [a for a in args if a is not type(None)]
            if len(rest) != 1:
                return annotation
            annotation = rest[0]
        else:
            return annotation


def _submodel(annotation: Any) -> type[BaseModel] | None:
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(filter(None, (_submodel(a) for a in typing.get_args(annotation))), None)


def _annotation(model: type[BaseModel], dotted: str) -> Any:
    """The annotation of a flattened option (`lora.r`: the field `r` of the model behind `lora`)."""
    *parents, last = dotted.split(".")
    for part in parents:
        sub = _submodel(model.model_fields[part].annotation)
        assert sub is not None, dotted  # options are flattened only through nested models
        model = sub
    return model.model_fields[last].annotation


def fields_for(model: type[BaseModel]) -> list[FieldSpec]:
    """The form's fields for an options model, in schema order (nested models flattened: `lora.r`)."""
    from llmforge.schema import describe_options

    out = []
    for row in describe_options(model):
        ann = _strip(_annotation(model, row.name))
        if typing.get_origin(ann) is typing.Literal:
            kind, choices = "choice", typing.get_args(ann)
        elif ann is bool:
            kind, choices = "choice", (True, False)
        elif ann is str:
            kind, choices = "text", ()
        else:
            kind, choices = "value", ()
        out.append(
            FieldSpec(row.name, kind, row.type, row.default, row.required, row.description, row.constraints, choices)
        )
    return out


def toml_text(value: Any) -> str:
    """A Python value as TOML text, for placeholders and choice labels."""
    if value is None:
        return "none"
    try:
        return inline_text(value)
    except Exception:  # noqa: BLE001 - anything tomlkit cannot spell is shown as Python would
        return repr(value)


def parse_text(text: str, kind: str) -> Any:
    """What a field's text means: UNSET when empty, the string itself for `text` fields, else a TOML
    value or, when the text is not TOML, the bare string (exactly like `--set key=value`)."""
    if not text.strip():
        return UNSET
    if kind == "text":
        return text
    from llmforge.config import parse_value

    return parse_value(text.strip())


class OptionsForm(Vertical):
    """The fields of one options model. Posts `OptionsForm.Changed` whenever a field changes."""

    DEFAULT_CSS = """
    OptionsForm { height: auto; }
    OptionsForm .field { height: auto; margin: 0 0 1 0; }
    OptionsForm .field-label { height: auto; }
    OptionsForm .field-error { height: auto; color: $error; display: none; }
    OptionsForm .field-error.shown { display: block; }
    OptionsForm TextArea { height: auto; max-height: 10; }
    OptionsForm .field.invalid Input { background: $error 25%; }
    OptionsForm .field.invalid TextArea { border: tall $error; }
    """

    class Changed(Message):
        def __init__(self, form: OptionsForm) -> None:
            super().__init__()
            self.form = form

        @property
        def control(self) -> OptionsForm:
            return self.form

    def __init__(
        self, fields: list[FieldSpec], values: dict[str, Any], sources: dict[str, str | None], **kwargs: Any
    ) -> None:
        """`values`: each field's current value (UNSET when absent); `sources`: the value as written
        in the file, shown as it is (`2e-5` stays `2e-5`)."""
        super().__init__(**kwargs)
        self.fields = fields
        self._values = values
        self._sources = sources
        self._ids = {f.name: f"field-{i}" for i, f in enumerate(fields)}

    # ---- building --------------------------------------------------------------------------
    def compose(self):
        for spec in self.fields:
            fid = self._ids[spec.name]
            with Vertical(classes="field", id=f"{fid}-box"):
                yield Static(self._label(spec), classes="field-label", markup=False)
                yield self._editor(spec, fid)
                yield Static("", classes="field-error", id=f"{fid}-error", markup=False)

    @staticmethod
    def _label(spec: FieldSpec):
        from rich.text import Text

        text = Text(spec.name, style="bold")
        text.append(f"  {spec.type}", style="italic")
        if spec.constraints:
            text.append(f" ({spec.constraints})", style="italic")
        if spec.required:
            text.append("  required", style="bold")
        if spec.description:
            text.append(f"\n{spec.description}", style="dim")
        return text

    def _placeholder(self, spec: FieldSpec) -> str:
        if spec.required:
            return "required"
        return f"default: {toml_text(spec.default)}"

    def _editor(self, spec: FieldSpec, fid: str) -> Widget:
        value = self._values.get(spec.name, UNSET)
        if spec.kind == "choice":
            # Options are indexed: Literal values may compare equal across types (True == 1).
            options = [(toml_text(c), i) for i, c in enumerate(spec.choices)]
            current = next(
                (i for i, c in enumerate(spec.choices) if value is not UNSET and c == value and type(c) is type(value)),
                Select.NULL,
            )
            return Select(
                options, prompt=self._placeholder(spec), allow_blank=True, value=current, id=fid, compact=True
            )
        if isinstance(value, str) and "\n" in value:
            # A multi-line string (a shell script): edited as lines, kept as a string.
            return TextArea(value, id=fid, soft_wrap=True, tab_behavior="focus")
        if value is UNSET:
            text = ""
        elif spec.kind == "text" and isinstance(value, str):
            text = value
        else:
            text = self._sources.get(spec.name) or toml_text(value)
        return Input(text, placeholder=self._placeholder(spec), id=fid, compact=True)

    # ---- reading ---------------------------------------------------------------------------
    def read(self) -> dict[str, tuple[Any, str | None]]:
        """Each field's (value, text as typed): UNSET for an empty field; the text is None for
        fields not typed as TOML (choices, plain strings)."""
        out: dict[str, tuple[Any, str | None]] = {}
        for spec in self.fields:
            widget = self.editor(spec.name)
            if isinstance(widget, Select):
                index = widget.selection  # the chosen option's index, None when blank
                out[spec.name] = (UNSET if index is None else spec.choices[index], None)
            elif isinstance(widget, TextArea):
                out[spec.name] = (widget.text if widget.text.strip() else UNSET, None)
            else:
                assert isinstance(widget, Input), spec.name  # editor() makes one of the three
                text = widget.value
                kind = spec.kind
                value = parse_text(text, kind)
                out[spec.name] = (value, text.strip() if kind == "value" else None)
        return out

    def changes(self) -> dict[str, tuple[Any, str | None]]:
        """Only the fields whose value differs from the one the form was opened with."""
        out = {}
        for name, (value, typed) in self.read().items():
            old = self._values.get(name, UNSET)
            same = (value is UNSET and old is UNSET) or (
                value is not UNSET and old is not UNSET and value == old and type(value) is type(old)
            )
            if not same:
                out[name] = (value, typed)
        return out

    # ---- problems --------------------------------------------------------------------------
    def field_for(self, key_path: str) -> str | None:
        """The field a problem's key path (relative to the stage: `lora.r`, `sources[1]`) belongs to."""
        for spec in sorted(self.fields, key=lambda f: -len(f.name)):
            if key_path == spec.name or key_path.startswith((spec.name + ".", spec.name + "[")):
                return spec.name
        return None

    def show_problems(self, problems: dict[str, list[str]]) -> None:
        """Show messages under their fields (field name -> messages); clear the others."""
        for spec in self.fields:
            fid = self._ids[spec.name]
            messages = problems.get(spec.name, [])
            error = self.error(spec.name)
            error.update("\n".join(messages))
            error.set_class(bool(messages), "shown")
            self.query_one(f"#{fid}-box").set_class(bool(messages), "invalid")

    def editor(self, name: str) -> Widget:
        """The widget that edits the option `name` (an Input, a Select or a TextArea)."""
        return self.query_one(f"#{self._ids[name]}")

    def error(self, name: str) -> Static:
        """Where the option's problems are shown."""
        return self.query_one(f"#{self._ids[name]}-error", Static)

    # ---- events ----------------------------------------------------------------------------
    @on(Input.Changed)
    @on(Select.Changed)
    @on(TextArea.Changed)
    def _changed(self, event: Message) -> None:
        event.stop()
        self.post_message(self.Changed(self))
