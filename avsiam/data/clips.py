"""One clip's media, from a video file to the model's input, the same way for every consumer.

* :func:`staged_members`: a clip's staged members, a 16 kHz mono wav of the audio window
  training reads and its 10 frames as JPEGs: what staging writes into a shard.
* :func:`eval_inputs`: those members -> the deterministic model input (normalised fbank
  ``[frames, mel]``, normalised frames ``[10, 3, 224, 224]``): what evaluation reads.

Labelling a new video (``avsiam predict``, the served model) goes video -> members -> input,
so a clip is seen exactly as it would be had it been staged and evaluated, JPEG round trip
included.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from avsiam.config import RecipeConfig
from avsiam.data.audio import (
    STAGED_AUDIO_SAMPLES,
    WINDOW_SAMPLES,
    DecodeError,
    decode_wav,
    encode_wav,
    load_waveform,
    normalize_fbank,
    waveform_to_fbank,
)
from avsiam.data.shards import AUDIO_MEMBER, FRAME_MEMBERS
from avsiam.data.video import NUM_FRAMES, decode_frame, encode_frame, extract_frames, normalize_frames


def media_members(waveform: torch.Tensor, frames: Sequence[torch.Tensor] | torch.Tensor, where: str | Path) -> dict[str, bytes]:
    """The staged members of a decoded clip (16 kHz mono ``waveform``, 10 uint8 frames);
    raises :class:`DecodeError` naming ``where`` for audio shorter than one fbank frame."""
    if waveform.numel() < WINDOW_SAMPLES:
        raise DecodeError(where, f"audio too short ({waveform.numel()} samples at 16 kHz)")
    return {AUDIO_MEMBER: encode_wav(waveform[:STAGED_AUDIO_SAMPLES]),
            **{member: encode_frame(frame) for member, frame in zip(FRAME_MEMBERS, frames, strict=True)}}


def staged_members(video: str | Path) -> dict[str, bytes]:
    """The staged members of a video file (any container FFmpeg reads); raises :class:`DecodeError`."""
    return media_members(load_waveform(video), extract_frames(video, num_frames=NUM_FRAMES), video)


def eval_inputs(members: Mapping[str, bytes], recipe: RecipeConfig, where: str) -> dict[str, torch.Tensor]:
    """``{"audio": fbank [audio_frames, mel_bins], "frames": [10, 3, H, W]}`` of a clip's
    staged members, normalised as the recipe says, with no augmentation."""
    waveform = decode_wav(members[AUDIO_MEMBER], f"{where}: member {AUDIO_MEMBER}")
    fbank = normalize_fbank(waveform_to_fbank(waveform, recipe.arch.audio_frames, recipe.arch.mel_bins),
                            recipe.input_norm_mean, recipe.input_norm_std)
    frames = torch.stack([decode_frame(members[m], f"{where}: member {m}") for m in FRAME_MEMBERS])
    return {"audio": fbank, "frames": normalize_frames(frames, recipe.arch.image_mean, recipe.arch.image_std)}
