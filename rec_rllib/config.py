"""The settings layer: settings are dataclasses whose fields carry their type, default and documentation
(the string under each field); everything else is generated from them.

* :meth:`DictConfig.from_dict` / :meth:`DictConfig.to_dict`: plain dicts (YAML, JSON, RLlib configs) in and
  out, nested settings included; an unknown key is refused, at any depth, with the known ones named.
* :func:`add_flags` / :func:`apply_flags`: a job's command-line flags, one per field (``--name-with-dashes``,
  booleans as ``--x`` / ``--no-x``), their help the field's documentation and default; the flags given are
  laid over the file's or the defaults' values, nothing else.
* :func:`setting`: a field with what its flag needs beyond its type (another flag name, a parser, choices,
  or no flag at all).
* :func:`add_model_flags` / :func:`model_flag_values`: the same for a pydantic model (the Serve app's
  arguments, which Serve configs validate with pydantic).

A job writes the resolved settings of its run (``config.json``, ``rl_config.json``); giving that file back as
``--config`` runs the same settings again.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, fields
from typing import Any, ClassVar, TypeVar

T = TypeVar("T", bound="DictConfig")

NO_FLAG = False
"""``setting(flag=NO_FLAG)``: a field the job sets itself, never from the command line."""


def setting(
    default: Any = MISSING,
    *,
    default_factory: Callable[[], Any] | Any = MISSING,
    flag: str | bool | None = None,
    parse: Callable[[str], Any] | None = None,
    choices: Sequence[Any] | None = None,
    metavar: str | None = None,
) -> Any:
    """A dataclass field whose command-line flag differs from the default one: ``flag`` (its name without
    the leading dashes, or :data:`NO_FLAG`), ``parse`` (text to value; repeated flags when the field is a
    dict: each ``NAME=AMOUNT`` parsed into one entry), ``choices``."""
    meta = {k: v for k, v in (("flag", flag), ("parse", parse), ("choices", choices), ("metavar", metavar))}
    meta = {k: v for k, v in meta.items() if v is not None}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class DictConfig:
    """Mixin for settings dataclasses: strict ``from_dict`` (unknown keys are named) and ``to_dict``."""

    config_label: ClassVar[str] = "config"

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any]) -> T:
        """The settings of ``d``; nested settings from nested dicts; an unknown key (at any depth) refused."""
        if not isinstance(d, dict):
            raise ValueError(f"{cls.config_label}: expected a mapping of settings, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown {cls.config_label} keys {sorted(unknown)}; known: {sorted(known)}")
        hints = _hints(cls)
        values = dict(d)
        for name, value in d.items():
            nested = hints.get(name)
            if (
                isinstance(value, dict)
                and dataclasses.is_dataclass(nested)
                and issubclass(nested, DictConfig)
            ):
                values[name] = nested.from_dict(value)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check_numbers(
        self, *, at_least: dict[str, float] | None = None, above: dict[str, float] | None = None
    ) -> None:
        """A ValueError naming the first field that is not a number ``>=`` its ``at_least`` bound or ``>`` its
        ``above`` bound (a value that would run nothing, hang, or fail deep inside a run)."""
        for bounds, ok, says in ((at_least, lambda v, b: v >= b, ">="), (above, lambda v, b: v > b, ">")):
            for name, bound in (bounds or {}).items():
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value, bound):
                    raise ValueError(f"{name} must be a number {says} {bound:g}, got {value!r}")


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each annotated field of a (data)class, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _plain_type(hint: Any) -> Any:
    """``int | None`` -> int; ``dict[str, float]`` -> dict; a single type as it is; another union -> str."""
    hint = _non_none(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return str
    return typing.get_origin(hint) or hint


def _non_none(hint: Any) -> Any:
    """``X | None`` -> X; any other hint as it is."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def _leaves(cls: type, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dataclasses.Field, Any]]:
    """(path, field, type) of every field of ``cls`` and of its nested settings dataclasses."""
    hints, out = _hints(cls), []
    for f in fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += _leaves(hint, (*path, f.name))
        else:
            out.append(((*path, f.name), f, hint))
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


def flag_name(f: dataclasses.Field) -> str | None:
    """The flag of a field, without dashes (None: the field has none)."""
    flag = f.metadata.get("flag")
    if flag is NO_FLAG:
        return None
    return flag or f.name.replace("_", "-")


def add_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    section: str | None = None,
    skip: Sequence[str] = (),
) -> None:
    """One flag per field of ``cls`` (its nested settings' fields too, flat), but those in ``skip`` (dotted
    paths, e.g. ``env.dataset``) and those declared without a flag; ``section``: only the fields of that
    nested setting (``""``: only ``cls``'s own). A flag not given leaves the value to the settings file or
    the default (:func:`apply_flags`)."""
    docs: dict[type, dict[str, str]] = {}
    for path, f, hint in _leaves(cls):
        name = flag_name(f)
        if name is None or ".".join(path) in skip or not _in_section(path, section):
            continue
        owner = _owner(cls, path)
        doc = docs.setdefault(owner, field_docs(owner)).get(f.name, "")
        kind, parse = _plain_type(hint), f.metadata.get("parse")
        dest = ".".join(path)
        common: dict[str, Any] = {"dest": dest, "default": None, "help": _help(doc, _default(f), kind, name)}
        if "metavar" in f.metadata:
            common["metavar"] = f.metadata["metavar"]
        if kind is bool:
            parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, **common)
        elif kind is dict:
            parser.add_argument(f"--{name}", action="append", type=parse or str, **common)
        else:
            parser.add_argument(f"--{name}", type=parse or kind, choices=f.metadata.get("choices"), **common)


def _help(doc: str, default: Any, kind: Any, name: str) -> str:
    """A flag's help: the setting's documentation and its default (a boolean's as the flag that keeps it)."""
    shown = f"{default:,}" if isinstance(default, int) and not isinstance(default, bool) else default
    if kind is bool:
        shown = f"--{name}" if default else f"--no-{name}"
    if default is None and "default" in doc:  # the documentation says what leaving it out means
        return doc.replace("%", "%%")
    return f"{doc} (default: {shown})".replace("%", "%%")


def add_model_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    model: type,
    *,
    skip: Sequence[str] = (),
) -> None:
    """:func:`add_flags` for a pydantic model (the Serve app's arguments, as Serve configs expect them): one
    flag per field but those in ``skip``, its help the field's ``description`` and default; a required field
    a required flag; a ``Literal`` field's values its choices; a dict field read as JSON.
    :func:`model_flag_values` collects what was given."""
    for name, f in model.model_fields.items():  # type: ignore[attr-defined]
        if name in skip:
            continue
        flag = name.replace("_", "-")
        kind, choices = _plain_type(f.annotation), None
        if kind is typing.Literal:
            choices = typing.get_args(_non_none(f.annotation))
            kind = type(choices[0])
        default = None if f.is_required() else f.get_default(call_default_factory=True)
        doc = " ".join((f.description or "").split())
        common: dict[str, Any] = {"dest": name, "default": None, "help": _help(doc, default, kind, flag)}
        if f.is_required():
            common["required"] = True
            common["help"] = doc
        if kind is bool:
            parser.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, **common)
        elif kind is dict:
            parser.add_argument(f"--{flag}", type=json_object, metavar="JSON", **common)
        else:
            parser.add_argument(f"--{flag}", type=kind, choices=choices, **common)


def model_flag_values(args: argparse.Namespace, model: type) -> dict[str, Any]:
    """The fields of ``model`` whose flag (:func:`add_model_flags`) was given, by field name."""
    return {
        name: getattr(args, name)
        for name in model.model_fields  # type: ignore[attr-defined]
        if getattr(args, name, None) is not None
    }


def json_object(text: str) -> dict[str, Any]:
    """A flag's JSON object (e.g. ``--autoscaling '{"min_replicas": 1, "max_replicas": 4}'``)."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e.msg} at character {e.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object ({{...}}), got {text!r}")
    return value


def _in_section(path: tuple[str, ...], section: str | None) -> bool:
    if section is None:
        return True
    return ".".join(path[:-1]) == section


def _owner(cls: type, path: tuple[str, ...]) -> type:
    for name in path[:-1]:
        cls = _hints(cls)[name]
    return cls


def apply_flags(args: argparse.Namespace, cls: type, base: dict[str, Any]) -> dict[str, Any]:
    """``base`` (a settings file's nested dict, or empty) with every flag of :func:`add_flags` that was
    given laid over it; a repeated ``NAME=AMOUNT`` flag of a dict field gives that dict."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for path, _, hint in _leaves(cls):
        value = getattr(args, ".".join(path), None)
        if value is None:
            continue
        if _plain_type(hint) is dict:
            value = dict(value)
        target = out
        for name in path[:-1]:
            target = target.setdefault(name, {})
        target[path[-1]] = value
    return out


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` laid over ``base``, section by section (a nested dict merges; any other value replaces)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def resource_pair(text: str) -> tuple[str, float]:
    """``NAME=AMOUNT`` (AMOUNT 1 when left out) as a Ray custom resource."""
    key, _, value = text.partition("=")
    try:
        return key, float(value or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"resource {text!r} must look like NAME=AMOUNT (e.g. env_runner=1)"
        ) from None


def none_or_str(text: str) -> str | None:
    """A flag's text, ``none`` as None."""
    return None if text.lower() == "none" else text
