"""A family's options, read off its model's constructor (and the `loss` keywords the
family exposes): one source of truth for names, defaults and help, used by the
Python jobs, the command line flags and `--option KEY=VALUE`."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal

#: Old spellings still accepted, with a deprecation message: old -> current name.
DEPRECATED: dict[str, str] = {
    "lr": "learning_rate",
    "latent": "latent_size",
    "hidden": "hidden_size",
}

# sizes and counts that must be >= 1 (a zero-width layer is never meant)
_POSITIVE = re.compile(r"(^|_)(size|units|depth|width|hidden|steps|samples)$")


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of a family: `name` (Python, JSON; the flag is `--name-with-dashes`),
    its `default`, `where` it goes (`"model"`: the constructor, `"loss"`: the loss's
    keyword arguments during training), a `parse` function from text (the command
    line) and the `help` line from the constructor's docstring."""

    name: str
    default: Any
    where: Literal["model", "loss"]
    parse: Callable[[str], Any]
    help: str = ""
    choices: tuple | None = None
    flag_type: str = "str"

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any) -> Any:
        """`value` (a Python value, or text from the command line) as this option's
        value; ValueError saying what is expected."""
        if isinstance(value, str) and self.flag_type != "str":
            try:
                return self.parse(value)
            except ValueError as e:
                raise ValueError(f"{self.name}: {e}.") from None
        if self.choices is not None and value not in self.choices:
            *first, last = map(repr, self.choices)
            want = f"{', '.join(first)} or {last}" if first else last
            raise ValueError(f"{self.name} must be {want}, got {value!r}.")
        if self.flag_type == "bool" and not isinstance(value, bool):
            raise ValueError(f"{self.name} must be true or false, got {value!r}.")
        if self.flag_type.startswith(("int", "posint")):
            if value is None and self.flag_type.endswith("?"):
                return value
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{self.name} must be an int, got {value!r}.")
            if self.flag_type.startswith("posint") and value < 1:
                raise ValueError(f"{self.name} must be an int >= 1, got {value!r}.")
        if self.flag_type.startswith("float"):
            if value is None and self.flag_type.endswith("?"):
                return value
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{self.name} must be a number, got {value!r}.")
            return float(value)
        return value


def _doc_lines(func) -> dict[str, str]:
    """`- \\`a\\`, \\`b\\`: text` bullets of a Markdown docstring -> {name: text}."""
    doc = inspect.getdoc(func) or ""
    out: dict[str, str] = {}
    names: list[str] = []
    text: list[str] = []

    def flush():
        for n in names:
            out.setdefault(n, " ".join(text).strip())

    for line in doc.splitlines():
        m = re.match(r"\s*- ((?:`\w+`(?:, )?)+)\s*:\s*(.*)", line)
        if m:
            flush()
            names = re.findall(r"`(\w+)`", m.group(1))
            text = [m.group(2)]
        elif names and line.strip() and not line.lstrip().startswith("**"):
            text.append(line.strip())
        else:
            flush()
            names, text = [], []
    flush()
    return out


def _parse_int(positive: bool, optional: bool):
    def parse(text: str):
        if optional and text.strip().lower() in ("none", "null"):
            return None
        try:
            value = int(text)
        except ValueError:
            want = "an int >= 1" if positive else "an int"
            raise ValueError(
                f"expected {want}{' or none' if optional else ''}, got {text!r}"
            ) from None
        if positive and value < 1:
            raise ValueError(f"expected an int >= 1, got {value}")
        return value

    return parse


def _parse_float(optional: bool):
    def parse(text: str):
        if optional and text.strip().lower() in ("none", "null"):
            return None
        try:
            return float(text)
        except ValueError:
            raise ValueError(
                f"expected a number{' or none' if optional else ''}, got {text!r}"
            ) from None

    return parse


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _parse_literal(text: str) -> Any:
    """A `--option` value: a JSON literal (`3`, `1e-4`, `true`, `null`, `[1, 2]`), or
    the text itself (a name such as `dopri5`)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _option(name, default, annotation, where, help_text) -> Option:
    ann = annotation
    optional = default is None
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        optional = optional or len(args) < len(typing.get_args(ann))
        ann = args[0] if len(args) == 1 else Any
        origin = typing.get_origin(ann)
    if origin is Literal:
        choices = typing.get_args(ann)

        def parse(text, choices=choices):
            if text not in choices:
                raise ValueError(
                    f"expected one of {', '.join(map(str, choices))}, got {text!r}"
                )
            return text

        return Option(name, default, where, parse, help_text, choices, "str")
    kind = ann if isinstance(ann, type) else type(default)
    q = "?" if optional else ""
    if kind is bool:
        return Option(name, default, where, _parse_bool, help_text, None, "bool")
    if kind is int:
        positive = bool(_POSITIVE.search(name))
        return Option(
            name, default, where, _parse_int(positive, optional), help_text, None,
            ("posint" if positive else "int") + q,
        )  # fmt: skip
    if kind is float:
        return Option(name, default, where, _parse_float(optional), help_text, None,
                      "float" + q)  # fmt: skip
    return Option(name, default, where, str, help_text, None, "str")


def signature_options(
    func: Callable,
    *,
    where: Literal["model", "loss"],
    skip: tuple[str, ...] = (),
    defaults: Mapping[str, Any] | None = None,
    only: tuple[str, ...] | None = None,
) -> dict[str, Option]:
    """The keyword-only parameters of `func` (a constructor or a `loss` method) as
    options, with their defaults (`defaults` overriding) and docstring help."""
    sig = inspect.signature(func)
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # an annotation that does not resolve: go by the defaults
        hints = {}
    docs = _doc_lines(func)
    defaults = dict(defaults or {})
    out = {}
    for p in sig.parameters.values():
        if p.kind is not p.KEYWORD_ONLY or p.name == "key" or p.name in skip:
            continue
        if only is not None and p.name not in only:
            continue
        default = defaults.get(p.name, p.default)
        if default is inspect.Parameter.empty:
            continue  # a required keyword: the family sets it from the data
        out[p.name] = _option(p.name, default, hints.get(p.name, Any), where,
                              docs.get(p.name, ""))  # fmt: skip
    return out


def resolve(
    options: Mapping[str, Option], given: Mapping[str, Any], *, family: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The constructor and loss keyword arguments: every option's default with the
    `given` values (checked) over it. Unknown names are refused with close matches;
    deprecated spellings (`DEPRECATED`) are accepted with a warning."""
    import warnings

    model: dict[str, Any] = {}
    loss: dict[str, Any] = {}
    values: dict[str, Any] = {}
    for key, value in given.items():
        name = key if key in options else DEPRECATED.get(key, key)
        if name != key and name in options:
            warnings.warn(
                f"{key!r} is deprecated; its name is {name!r} (--"
                f"{name.replace('_', '-')}).",
                FutureWarning,
                stacklevel=3,
            )
        if name not in options:
            close = difflib.get_close_matches(name, list(options), n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(
                f"{family} has no option {key!r}.{hint} Its options: "
                f"{', '.join(sorted(options))} (`ctmodels fit {family} --help`)."
            )
        values[name] = options[name].check(value)
    for name, opt in options.items():
        (model if opt.where == "model" else loss)[name] = values.get(name, opt.default)
    return model, loss


def parse_assignment(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` (VALUE a JSON literal or plain text) -> (key, value)."""
    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise ValueError(
            f"--option takes KEY=VALUE (e.g. --option max_steps=8192), got {text!r}."
        )
    return key, _parse_literal(value.strip())
