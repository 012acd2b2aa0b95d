"""Typed validation of plain data (parsed YAML, command-line overrides) against dataclasses.

One mechanism serves alignkit's own recipe sections and the libraries' config dataclasses (TRL's
``SFTConfig``, peft's ``LoraConfig``...): field names and type hints are read from the dataclass, so a
recipe accepts exactly the arguments the library accepts, under the library's own names.

Values typed on the command line arrive as :class:`Raw` text and are parsed by the type of the field
they land in (``adapter.r=8`` is an int, ``model.name_or_path=123`` stays a string).

A string field with a closed set of values is checked against it, with a did-you-mean: the ``choices``
of its metadata (the convention of transformers' and TRL's configs, which ``HfArgumentParser`` reads too)
or the members of an enum in its type (``optim: OptimizerNames | str``).

YAML is read by :func:`load_yaml`, which refuses a mapping that repeats a key (YAML forbids it; PyYAML would
keep the last silently) and reports syntax errors by line and column.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import re
import types
import typing
from collections.abc import Mapping
from typing import Any

import yaml

from alignkit.errors import RecipeError
from alignkit.suggest import did_you_mean

_NONE_WORDS = {"null", "~"}
_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}


class Raw(str):
    """A value typed on the command line, still text: parsed by the type of the field it lands in."""


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that repeats a key."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor`: keys written next to it override the merged ones, as YAML intends
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:
                continue  # an unhashable key: the base class reports it
            if first is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (first at line {first.line + 1}); a key may appear only "
                    "once in a mapping", key_node.start_mark)
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """Parse YAML ``text`` safely, refusing repeated keys; raises ``yaml.YAMLError`` (see :func:`yaml_problem`)."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 (a SafeLoader subclass)


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: where (line, column) and what, without PyYAML's multi-line excerpt."""
    if not isinstance(err, yaml.MarkedYAMLError) or err.problem_mark is None:
        return " ".join(str(err).split())
    mark = err.problem_mark
    message = f"line {mark.line + 1}, column {mark.column + 1}: {err.problem}"
    if err.context:
        started = err.context_mark
        at = f" at line {started.line + 1}, column {started.column + 1}" if started is not None else ""
        message += f" ({err.context}{at})"
    return message


def parse_raw(value: Raw, where: str) -> Any:
    """The YAML value of command-line text ``value`` for the key ``where``; a RecipeError if it is not YAML."""
    try:
        return load_yaml(value)
    except yaml.YAMLError as err:
        raise RecipeError(f"'{where}': '{value}' is not a YAML value: {yaml_problem(err)}") from None


class _Mismatch(Exception):
    """A value does not fit a type; carries the human name of what was expected."""

    def __init__(self, expected: str):
        super().__init__(expected)
        self.expected = expected


def init_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The fields of a dataclass that a user may set (init fields without a leading underscore)."""
    return {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """Resolved type hints of a dataclass; unresolvable hints (rare, in third-party configs) become Any."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # a hint naming a type that is not importable here: skip checking that field
        return {f.name: Any for f in dataclasses.fields(cls)}


def check_keys(data: Mapping, allowed: Mapping | list, what: str) -> None:
    """Raise a RecipeError for the first key of ``data`` not in ``allowed``, naming the nearest valid one.

    ``what`` names the place, e.g. ``section 'train' (SFTConfig)``.
    """
    for key in data:
        if key not in allowed:
            raise RecipeError(f"unknown key '{key}' in {what}.{did_you_mean(str(key), allowed)}")


def check_dict(cls: type, data: Mapping, where: str, what: str | None = None) -> dict[str, Any]:
    """Validate ``data`` against the fields of dataclass ``cls``; return the typed values (no instance).

    Used for library configs (TRL, peft) that are instantiated later, when the run starts.
    """
    if not isinstance(data, Mapping):
        raise RecipeError(f"'{where}' must be a mapping of keys to values, got {_describe(data)}")
    fields = init_fields(cls)
    check_keys(data, fields, what or f"section '{where}' ({cls.__name__})")
    hints = type_hints(cls)
    typed = {key: coerce(value, hints.get(key, Any), f"{where}.{key}") for key, value in data.items()}
    for key, value in typed.items():
        check_choice(value, choices(fields[key], hints.get(key, Any)), f"{where}.{key}")
    return typed


def choices(f: dataclasses.Field, tp: Any) -> tuple[str, ...]:
    """The closed set of string values of a field: its metadata's ``choices``, else the values of an enum in
    its type (``SchedulerType | str``); empty when any string will do."""
    if f.metadata.get("choices"):
        return tuple(str(choice) for choice in f.metadata["choices"])
    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    enums = [option for option in options if isinstance(option, type) and issubclass(option, enum.Enum)]
    return tuple(str(member.value) for member in enums[0]) if enums else ()


def check_choice(value: Any, allowed: tuple[str, ...], where: str) -> None:
    """Raise a RecipeError naming ``where`` if the string ``value`` is not one of ``allowed`` (when given)."""
    if allowed and isinstance(value, str) and value not in allowed:
        raise RecipeError(f"'{where}': unknown value '{value}'.{did_you_mean(value, allowed)} "
                          f"Choose one of: {', '.join(allowed)}")


def build(cls: type, data: Any, where: str) -> Any:
    """Build an instance of dataclass ``cls`` from ``data``, checking keys and types recursively."""
    shorthand = getattr(cls, "SHORTHAND_FIELD", None)
    if shorthand and isinstance(data, str):
        data = {shorthand: data}
    values = check_dict(cls, data, where)
    missing = [name for name, f in init_fields(cls).items() if _is_required(f) and name not in values]
    if missing:
        raise RecipeError(f"'{where}' is missing the required key '{missing[0]}'")
    try:
        return cls(**values)
    except (ValueError, TypeError) as err:  # __post_init__ checks across fields
        raise RecipeError(f"'{where}': {err}") from None


def config_error(err: Exception, cls: type, where: str) -> str:
    """The message of an error a library config raised when built (a check across options), in one paragraph,
    after the recipe keys it names: ``train.load_best_model_at_end, train.save_strategy: ...``."""
    text = " ".join(str(err).split())
    fields = init_fields(cls) if dataclasses.is_dataclass(cls) else {}
    # An error that knows its keys says so (alignkit's PPOConfig, whose message also lists the keys it accepts).
    named = list(getattr(err, "keys", ())) or [name for name in dict.fromkeys(re.findall(r"[A-Za-z_]\w*", text))
                                                if name in fields]
    return f"{', '.join(f'{where}.{name}' for name in named) or where}: {text}"


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against type ``tp`` (converting command-line text); raise RecipeError if it does not fit."""
    try:
        return _coerce(value, tp, where)
    except _Mismatch as mismatch:
        shown = f"'{value}'" if isinstance(value, str) else _describe(value)
        raise RecipeError(f"'{where}' expects {mismatch.expected}, got {shown}") from None


def _coerce(value: Any, tp: Any, where: str) -> Any:
    if tp is Any or tp is object:
        return parse_raw(value, where) if isinstance(value, Raw) else value
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return _coerce_union(value, typing.get_args(tp), where)
    if tp is type(None):
        if value is None or (isinstance(value, Raw) and value.lower() in _NONE_WORDS):
            return None
        raise _Mismatch("null")
    if origin is typing.Literal:
        return _coerce_literal(value, typing.get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _coerce_literal(value, tuple(member.value for member in tp))
    if tp is bool:
        return _coerce_bool(value)
    if tp is int:
        return _coerce_int(value)
    if tp is float:
        return _coerce_float(value)
    if tp is str:
        if isinstance(value, str):
            return str(value)
        raise _Mismatch("a string")
    if origin in (list, tuple, set, typing.Sequence) or tp in (list, tuple):
        return _coerce_sequence(value, tp, where)
    if origin in (dict, Mapping) or tp is dict:
        return _coerce_mapping(value, tp, where)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, Raw):
            value = parse_raw(value, where)
        return build(tp, value, where)
    # A type we do not model (a callable, a torch dtype...): let the library judge it.
    return parse_raw(value, where) if isinstance(value, Raw) else value


def _coerce_union(value: Any, options: tuple, where: str) -> Any:
    if type(None) in options and (value is None or (isinstance(value, Raw) and value.lower() in _NONE_WORDS)):
        return None
    # Try the most specific types first, so "3" on the command line is an int where int is allowed.
    expected = []
    for option in sorted((o for o in options if o is not type(None)), key=_specificity):
        try:
            return _coerce(value, option, where)
        except _Mismatch as mismatch:
            expected.append(mismatch.expected)
        # A RecipeError from inside a nested section propagates: the user clearly meant that section.
    if type(None) in options:
        expected.append("null")
    raise _Mismatch(" or ".join(dict.fromkeys(expected)))


def _specificity(tp: Any) -> int:
    if tp is bool:
        return 0
    if tp is int:
        return 1
    if tp is float:
        return 2
    if typing.get_origin(tp) is typing.Literal or (isinstance(tp, type) and issubclass(tp, enum.Enum)):
        return 3
    if tp is str:
        return 9
    return 5


def _coerce_literal(value: Any, allowed: tuple) -> Any:
    if isinstance(value, enum.Enum):
        value = value.value
    for option in allowed:
        if value == option or (isinstance(value, Raw) and str(option) == value):
            return option
    names = ", ".join(repr(a) for a in allowed)
    hint = did_you_mean(str(value), [str(a) for a in allowed]) if isinstance(value, str) else ""
    raise _Mismatch(f"one of {names}{' (' + hint.strip() + ')' if hint else ''}")


def _coerce_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, Raw) and value.lower() in _TRUE_WORDS | _FALSE_WORDS:
        return value.lower() in _TRUE_WORDS
    raise _Mismatch("true or false")


def _coerce_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, Raw):
        try:
            return int(value)
        except ValueError:
            pass
    raise _Mismatch("an integer")


def _coerce_float(value: Any) -> float | int:
    # An int is a valid float and is kept as written (TRL's float-typed step counts read better as 30 than 30.0).
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    # YAML 1.1 reads 1e-4 (no dot) as a string; accept any text that is a number.
    if isinstance(value, str):
        for parse in (int, float):
            try:
                return parse(value)
            except ValueError:
                pass
    raise _Mismatch("a number")


def _coerce_sequence(value: Any, tp: Any, where: str) -> list:
    if isinstance(value, Raw):
        value = parse_raw(value, where)
    if not isinstance(value, (list, tuple)):
        raise _Mismatch("a list")
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and args and args[-1] is not Ellipsis:
        if len(args) != len(value):
            raise _Mismatch(f"a list of {len(args)} items")
        return [coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
    item_type = args[0] if args else Any
    return [coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]


def _coerce_mapping(value: Any, tp: Any, where: str) -> dict:
    if isinstance(value, Raw):
        value = parse_raw(value, where)
    if not isinstance(value, Mapping):
        raise _Mismatch("a mapping")
    args = typing.get_args(tp)
    value_type = args[1] if len(args) == 2 else Any
    return {k: coerce(v, value_type, f"{where}.{k}") for k, v in value.items()}


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, (int, float)):
        return f"{value} (a number)"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__


def to_plain(obj: Any) -> Any:
    """Dataclasses, enums and tuples to plain YAML-safe data (for saving the resolved recipe)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Raw):
        return str(obj)
    return obj
