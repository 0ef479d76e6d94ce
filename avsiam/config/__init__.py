"""Typed configuration and the paper's recipes as presets."""

from avsiam.config.presets import (
    RECIPES,
    SIZES,
    ConfigError,
    all_presets,
    arch_config,
    load_recipe_file,
    preset_summary,
    resolve_recipe,
)
from avsiam.config.schema import ArchConfig, RecipeConfig, lr_at_epoch

__all__ = [
    "RECIPES",
    "SIZES",
    "ArchConfig",
    "ConfigError",
    "RecipeConfig",
    "all_presets",
    "arch_config",
    "load_recipe_file",
    "lr_at_epoch",
    "preset_summary",
    "resolve_recipe",
]
