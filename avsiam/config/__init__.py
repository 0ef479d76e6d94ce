"""Typed configuration and the paper's recipes as presets."""

from avsiam.config.lr_schedule import LrSchedule
from avsiam.config.presets import (
    RECIPES,
    SIZES,
    ConfigError,
    all_presets,
    arch_config,
    explicit_settings,
    load_recipe_file,
    preset_summary,
    resolve_recipe,
)
from avsiam.config.schema import RESULT_NEUTRAL_FIELDS, RESUMABLE_FIELDS, ArchConfig, RecipeConfig

__all__ = [
    "RECIPES",
    "RESULT_NEUTRAL_FIELDS",
    "RESUMABLE_FIELDS",
    "SIZES",
    "ArchConfig",
    "ConfigError",
    "LrSchedule",
    "RecipeConfig",
    "all_presets",
    "arch_config",
    "explicit_settings",
    "load_recipe_file",
    "preset_summary",
    "resolve_recipe",
]
