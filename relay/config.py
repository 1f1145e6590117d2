"""Options from the command line and a TOML file, merged into plain values: the command line wins.

A TOML file's keys are the long options (`tunnel = "tcp:443"`, `expose = ["8080=127.0.0.1:80"]`);
an unknown key or a wrong type stops startup naming the file, the key and the fix.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class ConfigError(Exception):
    """Startup cannot go on; the message names the file or option, the key, and the fix."""


@dataclass(frozen=True)
class Option:
    name: str  # the long option, e.g. "public-interface"
    kind: type  # str, int, float, bool, or list (of str)
    help: str
    default: Any = None

    @property
    def type_name(self) -> str:
        return {
            str: "a string",
            int: "an integer",
            float: "a number",
            bool: "true or false",
            list: "a list of strings",
            dict: "a table",
        }[self.kind]


def coerce(option: Option, value: Any, where: str) -> Any:
    """The value as option.kind, from a command-line string or a TOML value."""
    kind = option.kind
    if isinstance(value, str) and kind in (int, float):
        try:
            value = kind(value)
        except ValueError:
            raise ConfigError(f"{where}: {option.name} must be {option.type_name}, not {value!r}") from None
    ok = (
        (kind is bool and isinstance(value, bool))
        or (kind is int and isinstance(value, int) and not isinstance(value, bool))
        or (kind is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (kind is str and isinstance(value, str))
        or (kind is list and isinstance(value, list) and all(isinstance(v, str) for v in value))
        or (kind is dict and isinstance(value, dict))
    )
    if not ok:
        raise ConfigError(f"{where}: key '{option.name}' must be {option.type_name}, not {value!r}")
    if kind is float:
        value = float(value)
    if kind in (int, float) and value < 0:
        raise ConfigError(f"{where}: {option.name} must not be negative")
    return value


def load_file(path: str, options: Mapping[str, Option]) -> dict[str, Any]:
    """The TOML file's values, keyed by long option name (underscores accepted for hyphens)."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    values = {}
    for key, value in raw.items():
        name = key.replace("_", "-")
        option = options.get(name)
        if option is None or name == "config":
            known = ", ".join(sorted(n for n in options if n != "config"))
            raise ConfigError(f"config file {path}: unknown key '{key}'; known keys: {known}")
        values[name] = coerce(option, value, f"config file {path}")
    return values


def merge(command_line: Mapping[str, Any], options: Mapping[str, Option]) -> dict[str, Any]:
    """Command-line values over the --config file's values over the defaults."""
    from_file = load_file(command_line["config"], options) if command_line.get("config") else {}
    merged = {}
    for name, option in options.items():
        value = command_line.get(name)
        if option.kind is bool and value is not None:
            value = bool(value)  # twistd's flags are 0/1
        if value in (None, [], False):
            value = from_file.get(name, option.default)
        elif not isinstance(value, bool | list):
            value = coerce(option, value, f"option --{name}")
        merged[name] = value
    return merged


def split_host_port(text: str, what: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` as (host, port); ValueError naming `what` otherwise."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"{what} {text!r}: write an IPv6 address as [addr]:port")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"{what} {text!r} must be HOST:PORT (IPv6 in brackets: [::1]:80)")
    if not host:
        raise ValueError(f"{what} {text!r} has no host")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{what} {text!r} has no valid port (1-65535)")
    return host, int(port_text)
