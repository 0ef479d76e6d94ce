"""The paper's recipes as presets: loading, overriding and validating them.

Presets live in ``avsiam/config/presets``: ``models.yaml`` holds the architecture of each size
and ``<size>.yaml`` holds that size's four recipes, one per column of Tables 4-6 (``tiny`` is
this project's CPU-sized size with the same four recipes). A resolved recipe is the preset
row, its size's architecture as ``arch``, then ``key=value`` overrides (dotted keys reach into
``arch``), validated as a whole by :class:`~avsiam.config.schema.RecipeConfig`.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from avsiam.config.schema import ArchConfig, RecipeConfig

RECIPES = ("pretrain_as2m", "finetune_as20k", "finetune_as2m", "finetune_vggsound")
PAPER_SIZES = ("base", "large", "huge")
SIZES = ("tiny", *PAPER_SIZES)


class ConfigError(ValueError):
    """A configuration problem, phrased with the file, the key and the allowed values."""


def _preset_text(name: str) -> tuple[str, str]:
    ref = resources.files("avsiam.config") / "presets" / name
    return str(ref), ref.read_text(encoding="utf-8")


def load_yaml(path: str | Path, text: str | None = None) -> Any:
    """``yaml.safe_load`` of a file, with errors that name the file."""
    try:
        if text is None:
            text = Path(path).read_text(encoding="utf-8")
        return yaml.safe_load(text)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc


def _choose(kind: str, value: str, allowed: Iterable[str], source: str) -> str:
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{source}: unknown {kind} {value!r}; allowed: {', '.join(allowed)}")
    return value


def format_validation_error(exc: ValidationError, source: str, model: type[BaseModel], prefix: str = "") -> str:
    """One line per problem: ``source: key: what is wrong (allowed: ...)``."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        key = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            fields = _fields_at(model, err["loc"][:-1])
            guess = difflib.get_close_matches(str(err["loc"][-1]), fields, n=1)
            hint = f"; did you mean {guess[0]!r}?" if guess else ""
            msg = f"unknown key{hint} allowed keys: {', '.join(sorted(fields))}"
        elif "input" in err and err["type"] not in ("missing",):
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"{source}: {key}: {msg}")
    return "\n".join(lines)


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return []
    return list(model.model_fields)


def _validate(model: type[BaseModel], data: Any, source: str, prefix: str = "") -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'document'}: expected a mapping, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source, model, prefix)) from None


def model_archs() -> dict[str, dict[str, Any]]:
    path, text = _preset_text("models.yaml")
    data = load_yaml(path, text)
    for size, arch in data.items():
        _validate(ArchConfig, arch, path, f"{size}.")
    return data


def arch_config(size: str) -> ArchConfig:
    archs = model_archs()
    _choose("model size", size, archs, "models.yaml")
    return ArchConfig.model_validate(archs[size])


def preset_rows(size: str) -> tuple[str, dict[str, dict[str, Any]]]:
    _choose("model size", size, SIZES, "--model")
    path, text = _preset_text(f"{size}.yaml")
    data = load_yaml(path, text)
    if not isinstance(data, Mapping) or not isinstance(data.get("recipes"), Mapping):
        raise ConfigError(f"{path}: expected a top-level 'recipes' mapping")
    return path, dict(data["recipes"])


def parse_overrides(items: Iterable[str]) -> list[tuple[str, Any]]:
    """``key=value`` strings to (dotted key, YAML-parsed value) pairs."""
    pairs = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. epochs=1 or arch.depth=2)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from exc
        pairs.append((key, value))
    return pairs


def apply_overrides(data: dict[str, Any], overrides: Iterable[tuple[str, Any]], model: type[BaseModel] = RecipeConfig, source: str = "override") -> dict[str, Any]:
    """Return a copy of ``data`` with dotted-key overrides applied; unknown keys are errors."""
    data = copy.deepcopy(data)
    for key, value in overrides:
        parts = key.split(".")
        node: dict[str, Any] = data
        scope: type[BaseModel] | None = model
        for i, part in enumerate(parts):
            fields = list(scope.model_fields) if scope is not None else list(node)
            if part not in fields:
                where = ".".join(parts[:i]) or "the recipe"
                guess = difflib.get_close_matches(part, fields, n=1)
                hint = f" (did you mean {'.'.join(parts[:i] + [guess[0]])!r}?)" if guess else ""
                raise ConfigError(f"{source} {key}={value!r}: unknown key {part!r} in {where}{hint}; allowed: {', '.join(sorted(fields))}")
            if i == len(parts) - 1:
                node[part] = value
                break
            annotation = scope.model_fields[part].annotation if scope is not None else None
            scope = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
            if scope is None:
                raise ConfigError(f"{source} {key}={value!r}: {'.'.join(parts[: i + 1])!r} is not a section")
            node = node.setdefault(part, {})
    return data


def variants() -> dict[str, dict[str, Any]]:
    """Named override sets (``presets/variants.yaml``), e.g. Table 3's CAV rows."""
    path, text = _preset_text("variants.yaml")
    return load_yaml(path, text)


def explicit_settings(overrides: Iterable[str] = (), variant: str | None = None) -> dict[str, Any]:
    """{dotted key: value} of what a user set on top of the recipe: the variant's, then the overrides'."""
    named = variants().get(variant, {}) if variant is not None else {}
    return {**named, **dict(parse_overrides(overrides))}


def resolve_recipe(
    size: str, recipe: str, overrides: Iterable[str] | Iterable[tuple[str, Any]] = (), variant: str | None = None
) -> RecipeConfig:
    """The resolved configuration of ``recipe`` for model ``size``, then ``variant``'s overrides,
    then ``overrides``."""
    path, rows = preset_rows(size)
    _choose("recipe", recipe, rows, f"{path} (model {size})")
    row = dict(rows[recipe])
    data = {"model": size, "recipe": recipe, **row, "arch": arch_config(size).model_dump(mode="python")}
    _validate(RecipeConfig, data, path, f"recipes.{recipe}.")
    pairs = [parse_overrides([o])[0] if isinstance(o, str) else o for o in overrides]
    if variant is not None:
        named = variants()
        _choose("variant", variant, named, "variants.yaml")
        pairs = list(named[variant].items()) + pairs
    data = apply_overrides(data, pairs)
    return _validate(RecipeConfig, data, "override" if pairs else path)


def load_recipe_file(path: str | Path, overrides: Iterable[str] = ()) -> RecipeConfig:
    """A resolved configuration saved as YAML (e.g. a run's ``config.yaml``)."""
    data = load_yaml(path)
    data = apply_overrides(data if isinstance(data, dict) else {}, parse_overrides(overrides), source=str(path))
    return _validate(RecipeConfig, data, str(path))


def all_presets() -> list[RecipeConfig]:
    return [resolve_recipe(size, recipe) for size in SIZES for recipe in preset_rows(size)[1]]


def preset_summary(cfg: RecipeConfig) -> dict[str, Any]:
    """The JSON object ``avsiam presets --json`` prints for one recipe (key names are an interface)."""
    out = cfg.model_dump(mode="json", exclude={"arch"})
    out["betas"] = list(cfg.betas)
    out["lr_schedule"] = cfg.lr_schedule
    out["arch"] = cfg.arch.model_dump(mode="json")
    return out
