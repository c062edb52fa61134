"""Typed reads from a TOML table, each mistake named by file, table and field.

The deployment configs (server.toml, site.toml) are read by processes that must stay light (no torch
import just to parse a config), so this is a small stand-alone reader rather than the run-config one.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file (run file, server.toml, site.toml) that is missing, not TOML, or has a field of
    the wrong type or value: one error type for every config fedecho reads."""


ConfigFileError = ConfigError


_MISSING: Any = object()


def did_you_mean(name: str, known: Iterable[str], brackets: bool = False) -> str:
    """The hint every unknown section or field error carries: ' (did you mean X?)' when a known name is close to
    `name` (a typo), else ''."""
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    if not close:
        return ""
    return f" (did you mean [{close[0]}]?)" if brackets else f" (did you mean {close[0]!r}?)"


def unknown_keys(keys: Iterable[str], known: Iterable[str], where: str) -> ConfigError | None:
    """The error for the fields of `keys` not in `known` (None when all are known), naming `where` (the file and
    table, e.g. "site.toml: [policy]"), each unknown field with the closest known one, and the known ones."""
    known = sorted(set(known))
    unknown = sorted(set(keys) - set(known))
    if not unknown:
        return None
    named = ", ".join(f"{k}{did_you_mean(k, known)}" for k in unknown)
    return ConfigError(f"{where}: unknown field(s) {named}; known: {', '.join(known) or 'none'}")


def check_sections(raw: dict[str, Any], path: str | Path, known: Iterable[str]) -> None:
    """Reject a top-level table (or key) of a config file that no reader of it knows: a misspelt `[privcy]`
    would otherwise be ignored and its settings silently fall back to the defaults."""
    known = sorted(set(known))
    for name in sorted(raw):
        if name not in known:
            raise ConfigError(
                f"{path}: unknown section [{name}]{did_you_mean(name, known, brackets=True)}; "
                f"known: {', '.join(f'[{k}]' for k in known)}"
            )


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file, with errors that name it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigFileError(f"{path}: no such config file")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigFileError(f"{path}: not valid TOML ({e})") from e


class Table:
    """One `[table]` of a TOML file: typed getters, paths resolved against the file's folder."""

    def __init__(self, raw: dict[str, Any], path: Path, name: str, *, required: bool = True) -> None:
        self.path, self.name, self._seen = Path(path), name, set[str]()
        value = raw.get(name, _MISSING)
        if value is _MISSING:
            if required:
                raise ConfigFileError(f"{self.path}: missing table [{name}]")
            value = {}
        if not isinstance(value, dict):
            raise ConfigFileError(f"{self.path}: [{name}] must be a table")
        self.raw: dict[str, Any] = value

    def where(self, key: str) -> str:
        return f"{self.path}: [{self.name}].{key}"

    def error(self, key: str, message: str) -> ConfigFileError:
        return ConfigFileError(f"{self.where(key)} {message}")

    def _get(self, key: str, default: Any) -> Any:
        self._seen.add(key)
        if key in self.raw:
            return self.raw[key]
        if default is _MISSING:
            raise ConfigFileError(f"{self.path}: [{self.name}] is missing the required field {key!r}")
        return default

    def text(self, key: str, default: Any = _MISSING) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, not {value!r}")
        return value

    def integer(self, key: str, default: Any = _MISSING, *, minimum: int | None = None) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be an integer, not {value!r}")
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be at least {minimum}, not {value}")
        return value

    def number(self, key: str, default: Any = _MISSING, *, positive: bool = False) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"must be a number, not {value!r}")
        if positive and value <= 0:
            raise self.error(key, f"must be positive, not {value}")
        return float(value)

    def integers(self, key: str, *, minimum: int | None = None) -> dict[str, int]:
        """An optional sub-table of integers (`[table.key]`: name = integer), each value checked like `integer`."""
        value = self._get(key, {})
        if not isinstance(value, dict):
            raise self.error(key, f"must be a table of name = integer, not {value!r}")
        out: dict[str, int] = {}
        for name, number in value.items():
            where = f"{self.path}: [{self.name}.{key}].{name}"
            if isinstance(number, bool) or not isinstance(number, int):
                raise ConfigFileError(f"{where} must be an integer, not {number!r}")
            if minimum is not None and number < minimum:
                raise ConfigFileError(f"{where} must be at least {minimum}, not {number}")
            out[str(name)] = number
        return out

    def flag(self, key: str, default: Any = _MISSING) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, not {value!r}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: Any = _MISSING) -> str:
        value = self.text(key, default)
        if value not in choices:
            raise self.error(key, f"must be one of {', '.join(map(repr, choices))}, not {value!r}")
        return value

    def optional_choice(self, key: str, choices: tuple[str, ...]) -> str | None:
        """One of choices, or None when the field is absent (the reader then decides, e.g. from the data)."""
        value = self._get(key, None)
        return None if value is None else self.choice(key, choices)

    def location(self, key: str, default: Any = _MISSING) -> Path:
        """A path; relative ones are taken from the config file's folder, so the file can move with its tree."""
        value = self.text(key, default)
        if not value:
            raise self.error(key, "must not be empty")
        return (self.path.parent / Path(value).expanduser()).resolve()

    def optional_location(self, key: str) -> Path | None:
        """A path, or None when the field is absent or empty."""
        value = self.text(key, "")
        return (self.path.parent / Path(value).expanduser()).resolve() if value else None

    def finish(self) -> None:
        """Reject fields nobody read: a typo must not silently fall back to a default."""
        error = unknown_keys(self.raw, self._seen, f"{self.path}: [{self.name}]")
        if error is not None:
            raise error
