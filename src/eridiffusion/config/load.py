"""Finding, reading and validating a config file; turning pydantic errors into readable ConfigErrors."""
from __future__ import annotations

import copy
import difflib
import json
import os
import re
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from .schema import ConfigError, JobConfig, Section, supported_hint

_SUFFIXES = ("", ".yaml", ".yml", ".json", ".jsonc")
_ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4`, `5e-5`, `1E6` as floats (YAML 1.1 wants a dot and a signed exponent)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def find_config(arg: str) -> Path:
    """`arg` if it is a file, else ./config/<arg>[.yaml|.yml|.json|.jsonc]."""
    if Path(arg).is_file():
        return Path(arg)
    candidates = [Path("config") / f"{arg}{suffix}" for suffix in _SUFFIXES]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        tried = ", ".join(str(p) for p in [Path(arg), *candidates])
        raise ConfigError(f"config file not found: {arg} (tried {tried})")
    return found


def read_config(path: Path) -> Any:
    """The file's data, after `${VAR}` substitution from the environment."""
    def env(match: re.Match) -> str:
        if match[1] not in os.environ:
            raise ConfigError(f"{path}: environment variable {match[1]} is not set (used as ${{{match[1]}}})")
        return os.environ[match[1]]

    text = _ENV_VAR.sub(env, path.read_text(encoding="utf-8"))
    try:
        if path.suffix in (".json", ".jsonc"):
            return json.loads(re.sub(r"(?m)^\s*//.*$", "", text))  # jsonc: whole-line comments
        return yaml.load(text, Loader=_Loader)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot parse: {e}") from None


def load_config(arg: str, *, name_override: str | None = None) -> JobConfig:
    path = find_config(arg)
    return parse_config(read_config(path), source=str(path), name_override=name_override)


def parse_config(data: Any, *, source: str = "<config>", name_override: str | None = None) -> JobConfig:
    """Validate already-parsed config data: `[name]` substitution, then the schema."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with 'job' and 'config' at the top level")
    data = copy.deepcopy(data)
    section = data.get("config")
    if isinstance(section, dict):
        if name_override is not None:
            section["name"] = name_override
        if isinstance(section.get("name"), str):
            data = _replace_name(data, section["name"])
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        lines = "\n".join(f"  {_describe(err)}" for err in e.errors())
        raise ConfigError(f"invalid config {source}:\n{lines}") from None


def resolved_dict(cfg: JobConfig) -> dict:
    """The fully resolved config as plain data (defaults and derived values filled in); loads back unchanged."""
    return cfg.model_dump(mode="json")


def _replace_name(node: Any, name: str) -> Any:
    if isinstance(node, str):
        return node.replace("[name]", name)
    if isinstance(node, dict):
        return {k: _replace_name(v, name) for k, v in node.items()}
    if isinstance(node, list):
        return [_replace_name(v, name) for v in node]
    return node


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


def _section_at(loc: tuple) -> type[Section] | None:
    """The schema class describing the mapping at `loc`, for did-you-mean suggestions."""
    model: type[BaseModel] | None = JobConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if model else None
        if field is None:
            return None
        model = _model_in(field.annotation)
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for arg in get_args(annotation) if (m := _model_in(arg))), None)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _describe(err: dict) -> str:
    loc, kind, ctx = err["loc"], err["type"], err.get("ctx") or {}
    path = _path(loc)
    if kind == "extra_forbidden":
        section, key = _section_at(loc[:-1]), str(loc[-1])
        if section and key in section.unsupported:
            hint = supported_hint((section.unsupported[key],))
            return f"not supported yet: {path} = {_short(err['input'])} ({hint})"
        close = difflib.get_close_matches(key, section.known_keys(), n=1) if section else []
        return f"unknown key {path}" + (f" — did you mean '{close[0]}'?" if close else "")
    if kind == "not_supported":
        path = _path((*loc, ctx["key"]) if ctx["key"] else loc)
        return f"not supported yet: {path} = {_short(ctx['value'])} ({ctx['hint']})"
    if kind == "missing":
        return f"{path}: required key missing"
    if kind == "value_error":
        return f"{path}: {ctx['error']}"
    message = err["msg"].replace("Input should be", "should be")
    return f"{path}: {message}, given {_short(err['input'])}"
