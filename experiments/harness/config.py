"""Typed experiment configurations: dataclass fields with ranges, overrides, config files.

An experiment's configuration is a frozen dataclass whose fields are declared with `param`:

    @dataclasses.dataclass(frozen=True)
    class Config:
        num_particles: int = param(1000, "particles N", low=1)
        ess_threshold: float = param(0.5, "resample when ESS < threshold * N", low=0.0, high=1.0)
        resampling: str = param("systematic", "scheme", choices=lambda: sorted(SCHEMES))

`build(Config, file_values, overrides)` applies a config file's values, then `key=value` strings
from the command line, parses each to its field's type and checks every range and choice (and an
optional `check(self)` method for rules between fields). Every failure is a `ConfigError` that
names the key and the value.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import pathlib
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union


class ConfigError(ValueError):
    """A bad key, value, type or file; the message is meant for the user as it is."""


def param(default: Any, help: str = "", *, low: float | None = None, high: float | None = None,
          low_open: bool = False, high_open: bool = False,
          choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None) -> Any:
    """A config field: default, one-line help, optional range [low, high] (open ends with
    `low_open`/`high_open`) and choices (a sequence, or a callable giving one)."""
    meta = {"help": help, "low": low, "high": high, "low_open": low_open,
            "high_open": high_open, "choices": choices}
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """What `describe` reports for one field."""

    name: str
    type: type
    optional: bool
    default: Any
    help: str
    low: float | None
    high: float | None
    low_open: bool
    high_open: bool
    choices: tuple | None

    def constraint(self) -> str:
        parts = []
        if self.choices is not None:
            parts.append("one of " + ", ".join(map(str, self.choices)))
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high}")
        return ", ".join(parts)


def fields(config_type: type) -> dict[str, FieldSpec]:
    """Field name -> FieldSpec, in declaration order."""
    if not dataclasses.is_dataclass(config_type):
        raise TypeError(f"{config_type!r} is not a dataclass")
    hints = typing.get_type_hints(config_type)
    out = {}
    for f in dataclasses.fields(config_type):
        base, optional = _unwrap(hints[f.name])
        meta = f.metadata
        choices = meta.get("choices")
        if callable(choices):
            choices = choices()
        if typing.get_origin(base) is typing.Literal:
            choices = typing.get_args(base)
            base = type(choices[0])
        out[f.name] = FieldSpec(
            name=f.name, type=base, optional=optional, default=f.default, help=meta.get("help", ""),
            low=meta.get("low"), high=meta.get("high"), low_open=meta.get("low_open", False),
            high_open=meta.get("high_open", False),
            choices=tuple(choices) if choices is not None else None)
    return out


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for X, Optional[X] and X | None."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"unsupported config type {hint!r}")
        return rest[0], True
    return hint, False


# ---------------------------------------------------------------------------------------------
# Parsing and checking single values
# ---------------------------------------------------------------------------------------------

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def parse_value(spec: FieldSpec, text: str) -> Any:
    """The command-line string `text` as a value of the field's type (not yet range-checked)."""
    raw = text.strip()
    if spec.optional and raw.lower() in ("none", "null"):
        return None
    try:
        if spec.type is bool:
            if raw.lower() in _TRUE:
                return True
            if raw.lower() in _FALSE:
                return False
            raise ValueError
        if spec.type is int:
            return int(raw)
        if spec.type is float:
            return float(raw)
        if spec.type is str:
            return raw
    except ValueError:
        pass
    else:
        raise TypeError(f"unsupported config type {spec.type!r} for {spec.name!r}")
    raise ConfigError(f"{spec.name}={text!r} is not {_article(spec.type)}")


def coerce_value(spec: FieldSpec, value: Any) -> Any:
    """A value from a config file (JSON/TOML, already typed) as the field's type, strictly."""
    if value is None and spec.optional:
        return None
    if isinstance(value, str) and spec.type is not str:
        return parse_value(spec, value)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(spec.type, False)
    if not ok:
        raise ConfigError(f"{spec.name}={value!r} is not {_article(spec.type)}")
    return float(value) if spec.type is float else value


def check_value(spec: FieldSpec, value: Any) -> None:
    """Range and choice checks; ConfigError naming the key, the value and the rule."""
    if value is None:
        if not spec.optional:
            raise ConfigError(f"{spec.name} may not be None")
        return
    if spec.choices is not None and value not in spec.choices:
        hint = suggest(str(value), map(str, spec.choices))
        raise ConfigError(f"{spec.name}={value!r} is not a valid choice; valid: "
                          f"{', '.join(map(str, spec.choices))}{hint}")
    if spec.type in (int, float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{spec.name}={value!r} must be finite")
        too_low = spec.low is not None and (value <= spec.low if spec.low_open
                                            else value < spec.low)
        too_high = spec.high is not None and (value >= spec.high if spec.high_open
                                              else value > spec.high)
        if too_low or too_high:
            raise ConfigError(f"{spec.name}={value!r} is out of range: must be {spec.constraint()}")


def _article(t: type) -> str:
    return {bool: "a bool (true/false)", int: "an int", float: "a float", str: "a string"}.get(
        t, t.__name__)


def suggest(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_key(config_type: type, key: str, experiment: str = "") -> ConfigError:
    names = list(fields(config_type))
    where = f"{experiment}: " if experiment else ""
    return ConfigError(f"{where}unknown config key {key!r}{suggest(key, names)}; "
                       f"valid keys: {', '.join(names)}")


# ---------------------------------------------------------------------------------------------
# Whole configurations
# ---------------------------------------------------------------------------------------------


def split_override(text: str) -> tuple[str, str]:
    """'key=value' -> ('key', 'value')."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"expected key=value, got {text!r}")
    return key.strip(), value


def build(config_type: type, values: Mapping[str, Any] | None = None,
          overrides: Sequence[str] = (), experiment: str = "") -> Any:
    """Defaults, then typed `values` (a config file's), then 'key=value' strings; all checked."""
    specs = fields(config_type)
    chosen: dict[str, Any] = {}
    for key, value in (values or {}).items():
        if key not in specs:
            raise unknown_key(config_type, key, experiment)
        chosen[key] = coerce_value(specs[key], value)
    for text in overrides:
        key, value = split_override(text)
        if key not in specs:
            raise unknown_key(config_type, key, experiment)
        chosen[key] = parse_value(specs[key], value)
    return validate(config_type(**chosen))


def validate(config: Any) -> Any:
    """Check every field of a config instance, then its `check()` method if it has one."""
    for name, spec in fields(type(config)).items():
        check_value(spec, getattr(config, name))
    check = getattr(config, "check", None)
    if check is not None:
        try:
            check()
        except ConfigError:
            raise
        except ValueError as error:
            raise ConfigError(str(error)) from None
    return config


def as_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def canonical(value: Any) -> str:
    """Canonical JSON (sorted keys, no spaces): equal configs give equal strings."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def load_file(path: str | pathlib.Path) -> dict[str, Any]:
    """A JSON (.json) or TOML (anything else) file as a dict; ConfigError if unreadable."""
    path = pathlib.Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read config file {str(path)!r}: {error.strerror or error}") \
            from None
    try:
        if path.suffix.lower() == ".json":
            loaded = json.loads(data)
        else:
            loaded = _toml().loads(data.decode())
    except (ValueError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {str(path)!r} does not parse: {error}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a table/object of key = value")
    return loaded


def _toml():
    try:
        import tomllib  # Python >= 3.11
    except ImportError:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError("TOML config files need Python >= 3.11 (or the tomli package); "
                              "use a .json file instead") from None
    return tomllib


def describe(config_type: type) -> list[tuple[str, str, str, str]]:
    """(name, type, default, help and constraint) per field, for `--help`-style listings."""
    rows = []
    for spec in fields(config_type).values():
        note = spec.help
        if spec.constraint():
            note = f"{note} [{spec.constraint()}]" if note else f"[{spec.constraint()}]"
        type_name = spec.type.__name__ + (" | None" if spec.optional else "")
        rows.append((spec.name, type_name, repr(spec.default), note))
    return rows
