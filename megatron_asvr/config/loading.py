"""Reading a configuration: a YAML recipe, ``section.key=value`` overrides, the schema's validation."""

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Type, TypeVar

import yaml
from pydantic import TypeAdapter, ValidationError

from megatron_asvr.config.errors import ConfigError, describe_error
from megatron_asvr.config.schema import LLM_PRESETS, VISION_PRESETS, RunConfig

Config = TypeVar("Config")


class _Loader(yaml.SafeLoader):
    """PyYAML's YAML 1.1, except that ``1e-3`` is a float (as in YAML 1.2), not a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+.0123456789")
)


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise ConfigError(f"{where} is not valid YAML: {problem}{at}") from None


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a nested dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[leaf] = _parse_yaml(raw, f"override {item!r}")
    return data


def load_yaml(path: Path, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Read a YAML recipe into a dict and apply the overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = _parse_yaml(path.read_text(), f"config file {path}") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return apply_overrides(data, overrides)


def from_dict(cls: Type[Config], data: Optional[Dict[str, Any]], where: str = "") -> Config:
    """Schema class ``cls`` from plain data (parsed YAML or JSON), as strictly as pydantic reads JSON:
    a mapping stands for a section, an int for a float, nothing else converts (``"5"`` is no int,
    ``1`` no bool). Errors name the key after ``where``."""
    try:
        return TypeAdapter(cls).validate_json(json.dumps(data or {}, default=str), strict=True)
    except ValidationError as err:
        raise ConfigError(describe_error(err, cls, where)) from None


def _expand_presets(data: Dict[str, Any]) -> None:
    """``model.vision.preset`` / ``model.llm.preset``: the named preset's fields, under the keys given beside it."""
    model = data.get("model")
    for name, presets in (("vision", VISION_PRESETS), ("llm", LLM_PRESETS)):
        part = model.get(name) if isinstance(model, dict) else None
        preset = part.pop("preset", None) if isinstance(part, dict) else None
        if preset is not None:
            if preset not in presets:
                raise ConfigError(f"model.{name}.preset={preset!r} is unknown (known: {', '.join(presets)})")
            model[name] = {**dataclasses.asdict(presets[preset]), **part}


def load_config(cls: Type[Config], path: Path, overrides: Sequence[str] = ()) -> Config:
    """Schema class ``cls`` (a run, or any root with ``model``, ``parallel``, ... sections) from a YAML
    recipe with ``section.key=value`` overrides; presets named by ``model.*.preset``."""
    data = load_yaml(path, overrides)
    _expand_presets(data)
    return from_dict(cls, data)


def load_run_config(path: Path, overrides: Sequence[str] = ()) -> RunConfig:
    return load_config(RunConfig, path, overrides)


def to_dict(config) -> Dict[str, Any]:
    """The configuration as plain nested dicts (for logs, checkpoints and ``from_dict``)."""
    return dataclasses.asdict(config)


def with_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """``config`` with ``section.key=value`` overrides, read as strictly as a file's values."""
    if not overrides:
        return config
    return from_dict(type(config), apply_overrides(to_dict(config), overrides))
