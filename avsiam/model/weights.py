"""Weight files: ImageNet ViT initialisation, this project's checkpoints, the published layout.

Files are read with ``safetensors`` or ``torch.load(weights_only=True)``: nothing is unpickled.

* :func:`init_from_timm_vit` turns a timm ViT state dict (e.g. a local copy of
  ``vit_base_patch16_224.augreg_in21k``) into the initial encoder and fusion layers: the visual
  side is copied, the audio side derived from it (the published recipe), and the fusion layers
  start as copies of the last blocks.
* :func:`load_pretrained` loads a pretrained model into a pretraining or finetuning model, from
  this project's state dict (``encoder.*``, ``fusion.*``; the decoder is dropped when the model
  has none) or from the published AVSiam checkpoint layouts (``module.vit_base.*``,
  ``module.vit_large.*``, ``module.vit_huge.*``, ``mm_layer_*``, ...), and reports what matched.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from torch import nn

from avsiam.config import ArchConfig, ConfigError, RecipeConfig
from avsiam.config.schema import AudioPosInit, FusionInit
from avsiam.model.encoder import AudioVisualEncoder

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


class CheckpointError(ConfigError):
    """A weights file that does not fit the model it is loaded into; the message names the file
    (a ConfigError: the command's inputs disagree, reported without a traceback)."""
_ARCH_DEFAULTS = ArchConfig.model_fields


@dataclass
class LoadReport:
    """What a weight load did, by parameter name."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # model tensors left as initialised
    unexpected: list[str] = field(default_factory=list)  # file tensors with no place in the model
    dropped: list[str] = field(default_factory=list)  # file tensors known not to belong (decoder, ...)

    def by_group(self) -> dict[str, dict[str, int]]:
        """{"loaded" | "missing" | "unexpected" | "dropped": {top-level module: tensors}}."""
        out: dict[str, dict[str, int]] = {}
        for label in ("loaded", "missing", "unexpected", "dropped"):
            counts: dict[str, int] = {}
            for key in getattr(self, label):
                group = key.removeprefix("module.").split(".", 1)[0]
                counts[group] = counts.get(group, 0) + 1
            out[label] = counts
        return out

    def tags(self) -> dict[str, str]:
        """The report as MLflow tags (counts by group), e.g. ``avsiam.init.loaded``: ``encoder 238, heads 6``."""
        tags = {"avsiam.init": self.source}
        for label, counts in self.by_group().items():
            tags[f"avsiam.init.{label}"] = ", ".join(f"{group} {n}" for group, n in sorted(counts.items())) or "none"
        return tags

    def __str__(self) -> str:
        def names(keys: list[str], limit: int = 12) -> str:
            shown = ", ".join(keys[:limit])
            return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")

        lines = [f"{self.source}: loaded {len(self.loaded)} tensors"]
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected), ("dropped", self.dropped)):
            if keys:
                lines.append(f"  {label} ({len(keys)}): {names(keys)}")
        return "\n".join(lines)


def read_state_dict(path: str | Path, mmap: bool = False) -> StateDict:
    """A state dict from a ``.safetensors`` file or a torch file (never unpickled); a checkpoint
    that wraps it under ``state_dict``, ``model`` or ``module`` is unwrapped. ``mmap``: map a
    torch file instead of reading it (for its key names)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    return dict(state)


def _split_prefix_tokens(pos_embed: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A [1, prefix + side^2, D] timm table -> (the square grid part, side); the prefix slots
    (cls, register tokens) are dropped: this encoder has no prefix tokens."""
    rows = pos_embed.shape[1]
    side = math.isqrt(rows)
    return pos_embed[:, rows - side * side :], side


def audio_positions_from_visual(
    visual: torch.Tensor, visual_grid: tuple[int, int], audio_grid: tuple[int, int], method: AudioPosInit = _ARCH_DEFAULTS["audio_pos_init"].default
) -> torch.Tensor:
    """The audio position table [1, F * T, D] derived from a visual one [1, H * W, D].

    ``bicubic`` resizes the 2-D table to the (frequency, time) grid, so neighbouring audio
    patches start with neighbouring positions. ``nearest_1d`` is the published recipe: the
    table read as a 1-D sequence and stretched to F * T entries (audio token i gets visual
    position floor(i * HW / FT)), which ignores the 2-D structure; use it to reproduce the
    published initialisation.
    """
    if method == "bicubic":
        return resample_abs_pos_embed(visual, list(audio_grid), old_size=list(visual_grid), num_prefix_tokens=0)
    if method == "nearest_1d":
        num_audio = audio_grid[0] * audio_grid[1]
        return F.interpolate(visual.transpose(1, 2), size=num_audio, mode="nearest").transpose(1, 2)
    raise ValueError(f"unknown audio position initialisation {method!r}; allowed: bicubic, nearest_1d")


def _timm_key(key: str) -> str:
    """This encoder's key -> the timm ViT key it is copied from: both patch embedding biases,
    the modality norms of a shared block, both modalities' stacks of separate blocks, and both
    final norms all start from the one timm tensor."""
    key = re.sub(r"^patch_embed\.(audio|visual)\.", "patch_embed.", key)
    key = re.sub(r"^blocks\.(audio|visual)\.", "blocks.", key)
    key = re.sub(r"\.(norm[12])\.(audio|visual)\.", r".\1.", key)
    return re.sub(r"^norm\.(audio|visual)\.", "norm.", key)


def _num_blocks(state: Mapping[str, torch.Tensor]) -> int:
    """Blocks in a timm ViT or an encoder state dict (per modality for separate blocks)."""
    indices = {int(m[1]) for k in state if (m := re.match(r"blocks\.(?:audio\.|visual\.)?(\d+)\.", k))}
    return len(indices)


def init_from_timm_vit(
    encoder: AudioVisualEncoder,
    fusion: nn.Sequential | None,
    vit: StateDict | str | Path,
    audio_pos_init: AudioPosInit = _ARCH_DEFAULTS["audio_pos_init"].default,
    fusion_init: FusionInit = _ARCH_DEFAULTS["fusion_init"].default,
) -> LoadReport:
    """Initialise ``encoder`` (and ``fusion``) from a timm ViT of the same width, depth and patch.

    Visual patch embedding, positions (prefix slots dropped; resized if the grid differs),
    blocks and final norm are copied; every modality norm starts as the generic norm; the audio
    patch kernel is the mean of the visual kernel over RGB (CAV-MAE used the sum) with the same
    bias; audio positions come from :func:`audio_positions_from_visual`; fusion layer j starts
    as block ``depth - fusion_depth + j`` (``last_blocks``; the published finetuning class) or
    as the last block (``last_block``: the published pretraining copies it into both). The final norm must be a token norm (``norm.*``): a checkpoint
    of an average-pooling ViT whose only norm is ``fc_norm`` (applied after pooling) is refused.
    """
    source = str(vit) if not isinstance(vit, Mapping) else "timm ViT state dict"
    state = read_state_dict(vit) if not isinstance(vit, Mapping) else dict(vit)
    needed = {"patch_embed.proj.weight", "pos_embed", "norm.weight"}
    if not needed <= state.keys():
        lacking = sorted(needed - state.keys())
        raise CheckpointError(f"{source}: not a timm ViT state dict with a token norm; lacks {lacking}")
    visual_pos, side = _split_prefix_tokens(state["pos_embed"])
    kernel = state["patch_embed.proj.weight"]
    derived: StateDict = {
        "pos_embed.visual": resample_abs_pos_embed(
            visual_pos, new_size=list(encoder.grid("visual")), old_size=[side, side], num_prefix_tokens=0
        ),
        "pos_embed.audio": audio_positions_from_visual(visual_pos, (side, side), encoder.grid("audio"), audio_pos_init),
        "patch_embed.visual.proj.weight": kernel,
        "patch_embed.audio.proj.weight": kernel.mean(dim=1, keepdim=True),
    }
    used = {"pos_embed", "patch_embed.proj.weight"}
    # Every other tensor is copied from one timm tensor: (target key, source key) pairs.
    copies = [(k, _timm_key(k)) for k in encoder.state_dict() if k not in derived]
    depth = _num_blocks(encoder.state_dict())
    if _num_blocks(state) != depth:
        raise CheckpointError(f"{source}: has {_num_blocks(state)} blocks, the encoder {depth}")
    if fusion is not None:
        if depth < len(fusion):
            raise CheckpointError(f"{source}: {len(fusion)} fusion layers need at least as many ViT blocks, found {depth}")
        if fusion_init not in ("last_blocks", "last_block"):
            raise ValueError(f"unknown fusion initialisation {fusion_init!r}; allowed: last_blocks, last_block")
        for key in fusion.state_dict():
            index, rest = key.split(".", 1)
            block = depth - 1 if fusion_init == "last_block" else depth - len(fusion) + int(index)
            copies.append((f"fusion.{key}", f"blocks.{block}.{rest}"))
    missing = [target for target, src in copies if src not in state]
    if missing:
        raise CheckpointError(f"{source}: no timm ViT tensors for {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    converted = {**derived, **{target: state[src] for target, src in copies}}
    used.update(src for _, src in copies)
    encoder.load_state_dict({k: v for k, v in converted.items() if not k.startswith("fusion.")})
    if fusion is not None:
        fusion.load_state_dict({k.removeprefix("fusion."): v for k, v in converted.items() if k.startswith("fusion.")})
    return LoadReport(source, loaded=sorted(converted), unexpected=sorted(state.keys() - used))


# The published checkpoint layout (the key names of GenjiB/AVSiam's released checkpoints), after
# the DDP "module." prefix is removed. A rule maps a key to this project's name or, with None,
# drops a tensor known to have no place here. The first matching rule wins. The shared ViT is
# ``vit_base`` in the Base model class, ``vit_large`` / ``vit_huge`` in the Large and Huge ones,
# with the same structure below the prefix; "{vit}" in a rule stands for any of the three.
_PUBLISHED_SIZES = "base|large|huge"
_PUBLISHED_VIT = re.compile(rf"^vit_({_PUBLISHED_SIZES})\.")
_DROP = None
_Rule = tuple[re.Pattern, str | Callable[[re.Match], str] | None]
_PUBLISHED_RULES: list[_Rule] = [
    (re.compile(p.replace("{vit}", f"vit_(?:{_PUBLISHED_SIZES})")), r)
    for p, r in [
        (r"^{vit}\.patch_embed\.proj\.", "encoder.patch_embed.visual.proj."),
        (r"^{vit}\.patch_embed_a\.proj\.", "encoder.patch_embed.audio.proj."),
        (r"^{vit}\.pos_embed$", "encoder.pos_embed.visual"),  # its cls slot is removed below
        (r"^{vit}\.pos_embed_a$", "encoder.pos_embed.audio"),
        (r"^{vit}\.blocks\.(\d+)\.norm([12])_a\.", r"encoder.blocks.\1.norm\2.audio."),
        (r"^{vit}\.blocks\.(\d+)\.norm([12])_v\.", r"encoder.blocks.\1.norm\2.visual."),
        (r"^{vit}\.blocks\.(\d+)\.(attn|mlp)\.", r"encoder.blocks.\1.\2."),
        (r"^{vit}\.norm_a\.", "encoder.norm.audio."),
        (r"^{vit}\.norm\.", "encoder.norm.visual."),
        # The published fusion layers always run with their audio norms.
        (r"^mm_layer_(\d+)\.norm([12])_a\.", lambda m: f"fusion.{int(m[1]) - 1}.norm{m[2]}."),
        (r"^mm_layer_(\d+)\.(attn|mlp)\.", lambda m: f"fusion.{int(m[1]) - 1}.{m[2]}."),
        (r"^mlp_head\.", "heads.visual."),
        (r"^mlp_head_a\.", "heads.audio."),
        (r"^mlp_head_mm\.", "heads.multimodal."),
        # Known tensors with no place in this model:
        (r"^{vit}\.blocks\.\d+\.norm[12]\.", _DROP),  # generic norms, unused by the shared path
        (r"^mm_layer_\d+\.norm[12](_v)?\.", _DROP),  # fusion norms never used
        (r"^{vit}\.(cls_token$|head\.)", _DROP),  # no cls token; the dead in21k classifier
        (r"^my_blocks\.", _DROP),  # the same tensors as vit_base.blocks, saved twice
        (r"^my_patch_embed", _DROP),  # unused copies of the patch embeddings
        (r"^ast_base\.", _DROP),  # the Base .py's audio ViT copy for the MAE step
        (r"^(decoder_|mask_token$)", _DROP),  # the pretraining decoder
        (r"^mlp_head_mm_v2\.", _DROP),  # an unused head
    ]
]


def convert_published_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[StateDict, list[str], list[str]]:
    """Published AVSiam keys -> (this project's state dict, dropped keys, unrecognised keys)."""
    converted: StateDict = {}
    dropped: list[str] = []
    unrecognised: list[str] = []
    for key, tensor in state.items():
        name = key.removeprefix("module.")
        for pattern, replacement in _PUBLISHED_RULES:
            if pattern.search(name):
                if replacement is _DROP:
                    dropped.append(key)
                else:
                    converted[pattern.sub(replacement, name, count=1)] = tensor
                break
        else:
            unrecognised.append(key)
    if "encoder.pos_embed.visual" in converted:
        converted["encoder.pos_embed.visual"] = _split_prefix_tokens(converted["encoder.pos_embed.visual"])[0]
    return converted, sorted(dropped), sorted(unrecognised)


def _check_published_size(source: str, size: str, converted: StateDict, model: nn.Module) -> None:
    """A published Large checkpoint cannot fill a Base model: say so before torch's shape errors."""
    key = "encoder.patch_embed.visual.proj.weight"
    ours = model.state_dict().get(key)
    if key not in converted or ours is None:
        return  # a missing encoder tensor is reported by the load itself
    file_shape, model_shape = tuple(converted[key].shape), tuple(ours.shape)
    if file_shape != model_shape:
        raise CheckpointError(f"{source}: a published vit_{size} checkpoint (patch embedding {list(file_shape)}) does not fit "
                         f"this model (patch embedding {list(model_shape)}); pass --model {size}")


# What the released AVSiam weights were trained with (ArchConfig fields): a published checkpoint
# implies them, and a model without them does not compute what the weights were trained for.
PUBLISHED_ARCHITECTURE = {"input_doubling": True, "block_norm_eps": 1e-5}


def _published_vits(names: list[str], source: str) -> str | None:
    sizes = sorted({match[1] for n in names if (match := _PUBLISHED_VIT.match(n.removeprefix("module.")))})
    if len(sizes) > 1:
        raise CheckpointError(f"{source}: published layout with several ViTs ({', '.join(f'vit_{p}' for p in sizes)})")
    return sizes[0] if sizes else None


def published_size(checkpoint: str | Path) -> str | None:
    """The model size of a published AVSiam checkpoint file (``base``, ``large``, ``huge``), or
    None for any other layout; reads the key names only (memory-mapped for torch files)."""
    path = Path(checkpoint)
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
    else:
        names = list(read_state_dict(path, mmap=True))
    return _published_vits(names, str(path))


def published_architecture_mismatch(model: nn.Module) -> dict[str, object]:
    """{ArchConfig field: the model's value} where ``model`` differs from :data:`PUBLISHED_ARCHITECTURE`."""
    block_norm = next(m for m in model.encoder.blocks.modules() if isinstance(m, nn.LayerNorm))
    actual = {"input_doubling": model.encoder.input_doubling, "block_norm_eps": block_norm.eps}
    return {k: v for k, v in actual.items() if v != PUBLISHED_ARCHITECTURE[k]}


def _as_validated(arch: ArchConfig, name: str, value: object) -> object:
    """``value`` as the field ``name`` of ``arch`` holds it (an override's "1e-5" is a string
    until the schema reads it); a value the schema refuses stays as given."""
    try:
        return getattr(arch.model_validate({**arch.model_dump(), name: value}), name)
    except ValidationError:
        return value


def resolve_checkpoint_recipe(recipe: RecipeConfig, checkpoint: str | Path, explicit: Mapping[str, object],
                              option: str) -> RecipeConfig:
    """``recipe`` with the architecture ``checkpoint`` was trained with: a published AVSiam
    checkpoint implies :data:`PUBLISHED_ARCHITECTURE`; any other file changes nothing.
    ``explicit``: the settings the user gave (overrides and variant, ``arch.*`` keys), which
    must not contradict it; ``option`` names the file's option in the error."""
    if not Path(checkpoint).is_file():
        return recipe  # the command names a missing file where it checks its inputs
    try:
        size = published_size(checkpoint)
    except Exception as exc:  # noqa: BLE001 - torch and safetensors raise many types for a file that is neither
        reason = next(iter(str(exc).strip().splitlines()), type(exc).__name__)
        raise ConfigError(f"{option} {checkpoint}: not a readable safetensors or torch checkpoint ({reason[:200]})") from None
    if size is None:
        return recipe
    for name, value in PUBLISHED_ARCHITECTURE.items():
        given = _as_validated(recipe.arch, name, explicit.get(f"arch.{name}", value))
        if given != value:
            raise ConfigError(f"{option} {checkpoint}: a published AVSiam checkpoint, trained with arch.{name}={value}; "
                              f"arch.{name}={given} contradicts it (drop that setting)")
    if all(getattr(recipe.arch, k) == v for k, v in PUBLISHED_ARCHITECTURE.items()):
        return recipe
    logger.info("%s %s: a published AVSiam checkpoint: building the model with %s", option, checkpoint,
                " ".join(f"arch.{k}={v}" for k, v in PUBLISHED_ARCHITECTURE.items()))
    return recipe.model_copy(update={"arch": recipe.arch.model_copy(update=PUBLISHED_ARCHITECTURE)})


def load_pretrained(model: nn.Module, checkpoint: StateDict | str | Path) -> LoadReport:
    """Load a pretrained encoder (and fusion layers, and heads if present) into ``model``.

    Accepts this project's layout (a pretraining or finetuning model's state dict; ``decoder.*``
    is dropped when ``model`` has no decoder) and the published AVSiam layout. Every encoder
    tensor must be found; anything else the file lacks stays as initialised and is listed in
    the report. The released weights were trained with :data:`PUBLISHED_ARCHITECTURE`; a model
    built without it is refused, naming the options (``resolve_checkpoint_recipe`` sets them).
    """
    source = str(checkpoint) if not isinstance(checkpoint, Mapping) else "state dict"
    state = read_state_dict(checkpoint) if not isinstance(checkpoint, Mapping) else dict(checkpoint)
    names = [k.removeprefix("module.") for k in state]
    published = _published_vits(names, source)
    if published:
        converted, dropped, unrecognised = convert_published_state_dict(state)
        _check_published_size(source, published, converted, model)
        if mismatch := published_architecture_mismatch(model):
            wanted = " ".join(f"arch.{k}={PUBLISHED_ARCHITECTURE[k]}" for k in mismatch)
            have = ", ".join(f"arch.{k}={v}" for k, v in mismatch.items())
            raise CheckpointError(f"{source}: a published AVSiam checkpoint, trained with {wanted}; this model has {have} "
                             "(build it with --variant published, or those overrides)")
    elif any(n.startswith("encoder.") for n in names):
        converted = {k.removeprefix("module."): v for k, v in state.items()}
        has_decoder = getattr(model, "decoder", None) is not None
        dropped = sorted(k for k in converted if k.startswith("decoder.") and not has_decoder)
        converted = {k: v for k, v in converted.items() if k not in dropped}
        unrecognised = []
    else:
        raise CheckpointError(f"{source}: neither this project's layout (encoder.*) nor the published one "
                         "(vit_base.*, vit_large.*, vit_huge.*)")
    result = model.load_state_dict(converted, strict=False)
    missing = sorted(result.missing_keys)
    missing_encoder = [k for k in missing if k.startswith("encoder.")]
    if missing_encoder:
        raise CheckpointError(f"{source}: the checkpoint lacks encoder tensors {missing_encoder[:8]} (a different encoder?)")
    report = LoadReport(
        source,
        loaded=sorted(converted.keys() - set(result.unexpected_keys)),
        missing=missing,
        unexpected=sorted([*result.unexpected_keys, *unrecognised]),
        dropped=dropped,
    )
    logger.info("%s", report)
    return report
