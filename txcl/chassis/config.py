"""`txco.yaml`, the part every head shares: the file, its YAML, the `ops:` mapping, and one
raw `ingress.<head>` section per head, which the head validates itself.

A typo stops the chassis at start with a message naming the file and the key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from txcl import inputs
from txcl.errors import Pos, Problem

DEFAULT_CONFIG_FILE = Path("txco.yaml")
_TOP_LEVEL_KEYS = ("ingress", "ops")


class ConfigError(Exception):
    """A flag or config value that cannot be used. The message names the flag or key."""


@dataclass(frozen=True)
class ConfigFile:
    """`txco.yaml`, read: `name` for messages, `base_dir` where relative op paths start."""

    name: str = "txco.yaml"
    base_dir: Path = Path(".")
    ops: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    ingress: Mapping[str, Mapping[str, Any]] = field(
        default_factory=lambda: MappingProxyType({})
    )

    def section(self, head: str) -> Mapping[str, Any]:
        """`ingress.<head>`, or an empty mapping when the file has none."""
        return self.ingress.get(head) or MappingProxyType({})


def load_config(path: Path | None, heads: Iterable[str]) -> ConfigFile:
    """Read `txco.yaml` (None: no file, the empty configuration); `heads` are the names an
    `ingress.<name>` section may have."""
    if path is None:
        return ConfigFile()
    try:
        text = inputs.read_text(path)  # a regular file: a FIFO or /dev/zero would hang
    except inputs.InputError as err:
        raise ConfigError(f"{path}: cannot read config file ({err.message})") from None
    return parse_config(text, heads, name=str(path), base_dir=Path(path).parent)


def parse_config(text: str, heads: Iterable[str], name: str = "txco.yaml",
                 base_dir: Path = Path(".")) -> ConfigFile:
    try:
        doc = yaml.load(text, Loader=_yaml_loader())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    if doc is None:
        doc = {}
    expect_mapping(doc, name, "the top level")
    reject_unknown(doc, _TOP_LEVEL_KEYS, name, "")
    ops = doc.get("ops") or {}
    expect_mapping(ops, name, "ops")
    ingress = doc.get("ingress") or {}
    expect_mapping(ingress, name, "ingress")
    reject_unknown(ingress, tuple(heads), name, "ingress.")
    sections: dict[str, Mapping[str, Any]] = {}
    for head, section in ingress.items():
        section = section or {}
        expect_mapping(section, name, f"ingress.{head}")
        sections[head] = MappingProxyType(dict(section))
    return ConfigFile(name=name, base_dir=base_dir, ops=MappingProxyType(dict(ops)),
                      ingress=MappingProxyType(sections))


def default_config_file(explicit: str | None) -> Path | None:
    """`--config FILE` as given; else ./txco.yaml when it exists; else no file."""
    if explicit:
        return Path(explicit)
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def _yaml_loader() -> type:
    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def expect_mapping(value: object, name: str, where: str) -> None:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name}: {where} must be a mapping, not {_kind(value)}")


def _kind(value: object) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "a boolean"}.get(type(value), type(value).__name__)


def reject_unknown(mapping: Mapping[Any, Any], known: tuple[str, ...], name: str,
                   prefix: str) -> None:
    for key in mapping:
        if key not in known:
            allowed = ", ".join(f"{prefix}{k}" for k in known)
            raise ConfigError(f"{name}: unknown key {prefix}{key} (known: {allowed})")


_LOCATED = re.compile(r"(?P<file>[^:\s][^:]*):(?P<line>\d+):(?P<col>\d+): (?P<message>.*)", re.S)


def config_problem(err: ConfigError) -> Problem:
    """A config error as a Problem; `file:line:col: ...` messages keep their position."""
    text = str(err)
    match = _LOCATED.match(text)
    if match:
        pos = Pos(match["file"], int(match["line"]), int(match["col"]))
        return Problem("txco_config_error", match["message"], pos)
    return Problem("txco_config_error", text)
