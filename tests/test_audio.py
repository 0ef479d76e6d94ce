"""Audio decoding, resampling, staged wavs and the fbank input."""

from __future__ import annotations

import pickle
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
import torchaudio.functional
from torchaudio.compliance import kaldi

from avsiam.data.audio import (
    SAMPLE_RATE,
    DecodeError,
    decode_audio,
    decode_wav,
    encode_wav,
    load_fbank,
    load_waveform,
    normalize_fbank,
    waveform_to_fbank,
)

REAL = Path(__file__).resolve().parents[2] / "shared/data/real"
REAL_CLIPS = ["00W1lcxW-WU_40.000.mp4", "KlsG1EnBEjc_000361.mp4"]


def _test_signal(seconds: float, sample_rate: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """Tones, noise and a DC offset, [samples, channels] float32 in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    columns = [
        0.3 * np.sin(2 * np.pi * (220 + 330 * c) * t) + 0.05 * rng.standard_normal(t.size) + 0.02
        for c in range(channels)
    ]
    return np.stack(columns, axis=1).astype(np.float32)


def _oracle_fbank(waveform: torch.Tensor, mean: float = -5.081, std: float = 4.485) -> torch.Tensor:
    """The published recipe, written out: DC removal, Kaldi fbank at 16 kHz, pad to 1024, normalise."""
    fbank = kaldi.fbank(
        (waveform - waveform.mean())[None],
        htk_compat=True,
        sample_frequency=16000,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=128,
        dither=0.0,
        frame_shift=10,
    )
    fbank = F.pad(fbank, (0, 0, 0, 1024 - fbank.shape[0]))
    return (fbank - mean) / std


def test_load_fbank_matches_the_soundfile_and_kaldi_oracle(tmp_path):
    path = tmp_path / "clip.wav"
    sf.write(path, _test_signal(3.7, 16000)[:, 0], 16000, subtype="PCM_16")
    samples, rate = sf.read(path, dtype="float32")
    assert rate == 16000
    expected = _oracle_fbank(torch.from_numpy(samples))

    fbank = load_fbank(path)

    assert fbank.shape == (1024, 128) and fbank.dtype == torch.float32
    torch.testing.assert_close(fbank, expected, atol=1e-4, rtol=0)
    # 3.7 s give 368 frames; the rest is log-mel zero padding, (0 + 5.081) / 4.485 once normalised.
    torch.testing.assert_close(fbank[368:], torch.full((1024 - 368, 128), 5.081 / 4.485))


def test_stereo_44k_is_averaged_then_resampled(tmp_path):
    path = tmp_path / "stereo.wav"
    sf.write(path, _test_signal(2.0, 44100, channels=2), 44100, subtype="FLOAT")
    samples, _ = sf.read(path, dtype="float32")
    expected = torchaudio.functional.resample(torch.from_numpy(samples).mean(dim=1), 44100, SAMPLE_RATE)

    waveform = load_waveform(path)

    assert waveform.dtype == torch.float32 and waveform.ndim == 1
    torch.testing.assert_close(waveform, expected, atol=1e-5, rtol=0)


def test_decode_audio_keeps_channels_and_native_rate(tmp_path):
    path = tmp_path / "stereo.flac"
    signal = _test_signal(0.5, 22050, channels=2)
    sf.write(path, signal, 22050, subtype="PCM_16")

    waveform, rate = decode_audio(path)

    assert rate == 22050 and waveform.shape == (2, signal.shape[0]) and waveform.dtype == torch.float32
    torch.testing.assert_close(waveform, torch.from_numpy(sf.read(path, dtype="float32")[0].T.copy()))


@pytest.mark.parametrize("name", REAL_CLIPS)
def test_real_clips_give_a_deterministic_fbank(name):
    fbank = load_fbank(REAL / name)

    assert fbank.shape == (1024, 128) and fbank.dtype == torch.float32
    assert torch.isfinite(fbank).all()
    # A 10 s clip fills 998 frames with sound, the rest is padding.
    assert fbank[:998].std() > 0.1
    assert torch.equal(fbank, load_fbank(REAL / name))


def test_a_long_waveform_keeps_its_first_frames():
    waveform = torch.from_numpy(_test_signal(12.0, 16000)[:, 0])
    full = kaldi.fbank(
        (waveform - waveform.mean())[None],
        htk_compat=True,
        sample_frequency=16000,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=128,
        dither=0.0,
        frame_shift=10,
    )
    assert full.shape[0] > 1024
    torch.testing.assert_close(waveform_to_fbank(waveform), full[:1024])


def test_normalize_fbank_divides_by_one_std():
    fbank = torch.tensor([[-5.081, 0.0, 4.485 - 5.081]])
    torch.testing.assert_close(normalize_fbank(fbank), torch.tensor([[0.0, 5.081 / 4.485, 1.0]]))


def test_encode_wav_is_16_bit_mono_and_clips(tmp_path):
    path = tmp_path / "out.wav"
    waveform = torch.tensor([0.0, 0.25, -0.5, 1.5, -1.5, 1.0, -1.0])

    path.write_bytes(encode_wav(waveform))

    info = sf.info(path)
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    samples, _ = sf.read(path, dtype="float32")
    torch.testing.assert_close(
        torch.from_numpy(samples), torch.tensor([0.0, 0.25, -0.5, 32767 / 32768, -1.0, 32767 / 32768, -1.0])
    )


def test_staged_wav_reproduces_the_waveform_with_both_readers(tmp_path):
    waveform = torch.from_numpy(_test_signal(1.0, 16000)[:, 0])
    data = encode_wav(waveform)
    (tmp_path / "staged.wav").write_bytes(data)

    decoded = decode_wav(data, "staged.wav")
    torch.testing.assert_close(decoded, waveform, atol=1 / 32768, rtol=0)
    # The fast reader of staged audio gives exactly what FFmpeg (and soundfile) give.
    assert torch.equal(decoded, load_waveform(tmp_path / "staged.wav"))
    assert torch.equal(decoded, torch.from_numpy(sf.read(tmp_path / "staged.wav", dtype="float32")[0]))


def test_decode_wav_refuses_what_staging_never_writes(tmp_path):
    stereo = tmp_path / "stereo.wav"
    sf.write(stereo, _test_signal(1.0, 16000, channels=2), 16000, subtype="PCM_16")
    with pytest.raises(DecodeError, match="clip x: a staged wav is mono 16-bit at 16000 Hz, this one is 2 channels"):
        decode_wav(stereo.read_bytes(), "clip x")
    with pytest.raises(DecodeError, match="where: not a staged wav"):
        decode_wav(b"RIFF garbage", "where")
    with pytest.raises(DecodeError, match="fewer than one 25 ms analysis window"):
        decode_wav(encode_wav(torch.zeros(100)), "short")


def test_encode_wav_rejects_multichannel_input():
    with pytest.raises(ValueError, match="mono"):
        encode_wav(torch.zeros(2, 100))


def test_corrupt_file_names_the_file(tmp_path):
    path = tmp_path / "corrupt_clip.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())

    for load in (decode_audio, load_waveform, load_fbank):
        with pytest.raises(DecodeError, match="corrupt_clip.mp4"):
            load(path)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(DecodeError, match=r"absent\.wav: no such file"):
        load_fbank(tmp_path / "absent.wav")


def test_file_without_audio_stream(tmp_path):
    path = tmp_path / "silent_video.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))

    with pytest.raises(DecodeError, match=r"silent_video.mp4: no audio stream"):
        load_waveform(path)


def test_empty_audio(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, np.float32), 16000, subtype="PCM_16")

    with pytest.raises(DecodeError, match=r"empty.wav: .*no samples"):
        decode_audio(path)


def test_audio_shorter_than_one_window(tmp_path):
    path = tmp_path / "blip.wav"
    sf.write(path, np.full(399, 0.1, np.float32), 16000, subtype="PCM_16")

    with pytest.raises(ValueError, match="399 samples"):
        waveform_to_fbank(load_waveform(path))
    with pytest.raises(DecodeError, match=r"blip.wav: .*analysis window"):
        load_fbank(path)


def test_decode_error_survives_pickling():
    # DataLoader workers send exceptions to the main process.
    error = pickle.loads(pickle.dumps(DecodeError("/data/a.mp4", "no audio stream")))
    assert isinstance(error, ValueError) and str(error) == "/data/a.mp4: no audio stream"
