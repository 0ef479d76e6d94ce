"""Audio: decoding, 16 kHz mono waveforms, staged wavs and the Kaldi log-mel fbank input.

The fbank recipe is CAV-MAE's (and AVSiam's): 128 mel bins, 25 ms Hann window, 10 ms shift,
no dither, padded or cut to 1024 frames, normalised as ``(x - (-5.081)) / 4.485``.
Two hazards of the published loaders are fixed here:

* the finetuning loader resamples to 16 kHz but passes the *original* rate to ``fbank``,
  which mis-sizes the window and the mel scale for any track that is not 16 kHz already;
  :func:`waveform_to_fbank` always takes 16 kHz input and says so to ``fbank``;
* the pretraining loader reads channel 0 of a stereo file; :func:`load_waveform` averages
  the channels (as the finetuning loader does).
"""

from __future__ import annotations

import io
import math
import wave
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
import torchaudio.functional
from torchaudio.compliance import kaldi

from avsiam.data.errors import DecodeError  # also raised by video.py; callers import it from here

SAMPLE_RATE = 16000
# Dataset statistics of the un-normalised fbank (AudioSet), used for every dataset as published.
FBANK_MEAN = -5.081
FBANK_STD = 4.485
# Kaldi's default 25 ms analysis window at 16 kHz: the shortest waveform with one fbank frame.
WINDOW_SAMPLES = 400
HOP_SAMPLES = 160  # the 10 ms frame shift
# What training reads of a clip's audio: the first 1024 fbank frames, 10.255 s at 16 kHz (the
# paper's 10 s clips give 998 frames, padded). Staging keeps this window and nothing after it,
# so a 60 s download costs 10 s of shard space.
STAGED_AUDIO_FRAMES = 1024
STAGED_AUDIO_SAMPLES = WINDOW_SAMPLES + (STAGED_AUDIO_FRAMES - 1) * HOP_SAMPLES


def decode_audio(path: str | Path) -> tuple[torch.Tensor, int]:
    """Decode the first audio stream of any file FFmpeg reads (wav, flac, mp4/m4a AAC, ...).

    Returns float32 samples ``[channels, samples]`` at the stream's native rate. Raises
    :class:`DecodeError` for a missing file, no audio stream, undecodable or empty audio.
    """
    path = Path(path)
    if not path.is_file():
        raise DecodeError(path, "no such file")
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise DecodeError(path, "no audio stream")
            chunks, sample_rate = _decode_planar_float(path, container, container.streams.audio[0])
    except av.FFmpegError as error:
        raise DecodeError(path, f"cannot decode audio ({error})") from error
    if not any(chunk.shape[1] for chunk in chunks):
        raise DecodeError(path, "the audio stream holds no samples")
    waveform = torch.from_numpy(np.concatenate(chunks, axis=1))
    if not torch.isfinite(waveform).all():
        raise DecodeError(path, "the audio holds non-finite samples")
    return waveform, sample_rate


def _decode_planar_float(
    path: Path, container: av.container.InputContainer, stream: av.AudioStream
) -> tuple[list[np.ndarray], int]:
    """Every decoded frame as a float32 ``[channels, samples]`` array, and the sample rate."""
    # Decoders emit int16, int32, packed or planar samples; converting every frame to planar
    # float keeps the channel layout and the rate (int16 becomes x / 32768, as soundfile reads it).
    to_planar_float = av.AudioResampler(format="fltp")
    chunks: list[np.ndarray] = []
    sample_rate = channels = None
    for frame in container.decode(stream):
        if sample_rate is None:
            sample_rate, channels = frame.sample_rate, frame.layout.nb_channels
        elif (frame.sample_rate, frame.layout.nb_channels) != (sample_rate, channels):
            raise DecodeError(
                path,
                f"the audio format changes mid-stream ({sample_rate} Hz x {channels} channels "
                f"to {frame.sample_rate} Hz x {frame.layout.nb_channels} channels)",
            )
        chunks.extend(converted.to_ndarray() for converted in to_planar_float.resample(frame))
    if sample_rate is not None:
        chunks.extend(converted.to_ndarray() for converted in to_planar_float.resample(None))
    return chunks, sample_rate


def load_waveform(path: str | Path, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Mono float32 waveform ``[samples]`` at ``sample_rate``: channels averaged, then resampled.

    The DC offset is kept: mixup mixes raw waveforms and :func:`waveform_to_fbank` removes it.
    """
    waveform, native_rate = decode_audio(path)
    mono = waveform.mean(dim=0)
    if native_rate != sample_rate:
        mono = torchaudio.functional.resample(mono, native_rate, sample_rate)
    return mono


def encode_wav(waveform: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A mono waveform ``[samples]`` as the bytes of a 16-bit PCM wav, clipped to [-1, 1]."""
    if waveform.ndim != 1:
        raise ValueError(f"encode_wav takes a mono waveform [samples], got shape {tuple(waveform.shape)}")
    if not torch.isfinite(waveform).all():
        raise ValueError("the waveform holds non-finite samples")
    # Readers (soundfile, FFmpeg, decode_wav) decode int16 as x / 32768, so scaling by 32768 makes
    # a write-read round trip exact up to rounding; +1.0 itself saturates at 32767.
    pcm = (waveform.detach().float().cpu().clamp(-1.0, 1.0) * 32768.0).round().clamp(-32768, 32767)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm.to(torch.int16).numpy().astype("<i2").tobytes())
    return buffer.getvalue()


def decode_wav(data: bytes, where: str, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """The mono float32 waveform of a staged wav (:func:`encode_wav`'s bytes).

    Staged audio is always 16-bit mono PCM at 16 kHz, so the standard library's reader
    replaces FFmpeg here: it costs a fraction of a millisecond instead of ~13 ms a clip, the
    largest part of a training sample's CPU. Anything else is a :class:`DecodeError` naming
    ``where``.
    """
    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            shape = (wav.getnchannels(), wav.getsampwidth(), wav.getframerate())
            frames = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as error:
        raise DecodeError(where, f"not a staged wav ({error})") from error
    if shape != (1, 2, sample_rate):
        raise DecodeError(where, f"a staged wav is mono 16-bit at {sample_rate} Hz, this one is "
                                 f"{shape[0]} channels x {8 * shape[1]} bits at {shape[2]} Hz")
    if len(frames) < 2 * WINDOW_SAMPLES:
        raise DecodeError(where, f"the staged wav holds {len(frames) // 2} samples, fewer than one 25 ms analysis window")
    pcm = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0
    return torch.from_numpy(pcm)


def peak_dbfs(waveform: torch.Tensor) -> float:
    """The largest absolute sample in dB relative to full scale (-inf for digital silence)."""
    peak = float(waveform.abs().max()) if waveform.numel() else 0.0
    return 20.0 * math.log10(peak) if peak > 0 else -math.inf


def waveform_to_fbank(waveform: torch.Tensor, target_frames: int = 1024, mel_bins: int = 128) -> torch.Tensor:
    """Un-normalised Kaldi log-mel fbank ``[target_frames, mel_bins]`` of a 16 kHz waveform.

    The mean (DC offset) is removed first. 10 s give 998 frames; shorter input is zero-padded
    at the end (zero in the log-mel domain, as published), longer input keeps its first frames.
    """
    if waveform.ndim != 1:
        raise ValueError(f"waveform_to_fbank takes a mono waveform [samples], got shape {tuple(waveform.shape)}")
    if waveform.numel() < WINDOW_SAMPLES:
        raise ValueError(
            f"the waveform has {waveform.numel()} samples, fewer than one 25 ms analysis window "
            f"({WINDOW_SAMPLES} samples at {SAMPLE_RATE} Hz)"
        )
    waveform = waveform.float()
    fbank = kaldi.fbank(
        (waveform - waveform.mean())[None],
        htk_compat=True,
        sample_frequency=SAMPLE_RATE,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=mel_bins,
        dither=0.0,
        frame_shift=10,  # ms: HOP_SAMPLES at 16 kHz
    )
    return _pad_or_crop_frames(fbank, target_frames)


def _pad_or_crop_frames(fbank: torch.Tensor, target_frames: int) -> torch.Tensor:
    missing = target_frames - fbank.shape[0]
    if missing > 0:
        return F.pad(fbank, (0, 0, 0, missing))
    return fbank[:target_frames]


def normalize_fbank(fbank: torch.Tensor, mean: float = FBANK_MEAN, std: float = FBANK_STD) -> torch.Tensor:
    """``(fbank - mean) / std``: CAV-MAE's and AVSiam's normalisation (AST's divides by 2 std)."""
    return (fbank - mean) / std


def load_fbank(
    path: str | Path,
    mean: float = FBANK_MEAN,
    std: float = FBANK_STD,
    target_frames: int = 1024,
    mel_bins: int = 128,
) -> torch.Tensor:
    """The normalised fbank ``[target_frames, mel_bins]`` of an audio or video file (no augmentation)."""
    waveform = load_waveform(path)
    try:
        fbank = waveform_to_fbank(waveform, target_frames, mel_bins)
    except ValueError as error:
        raise DecodeError(path, str(error)) from error
    return normalize_fbank(fbank, mean, std)
