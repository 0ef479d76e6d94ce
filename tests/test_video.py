"""Frame extraction (seek and decode-all), frame files and frame normalisation."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch

from avsiam.data import video
from avsiam.data.audio import DecodeError
from avsiam.data.video import (
    FRAME_SIZE,
    NUM_FRAMES,
    decode_frame,
    encode_frame,
    extract_frames,
    load_frame,
    normalize_frames,
    resize_and_crop,
)

REAL = Path(__file__).resolve().parents[2] / "shared/data/real"
REAL_CLIPS = ["00W1lcxW-WU_40.000.mp4", "KlsG1EnBEjc_000361.mp4"]
# Frame k of a synthetic clip is flat grey at this level, so a decoded frame tells its index.
LEVEL_STEP, LEVEL_BASE = 6, 10


def _write_numbered_clip(path: Path, num_frames: int, fps: int = 25, gop: int = 4, width: int = 128, height: int = 64):
    """An h264 clip with B-frames and a keyframe every ``gop`` frames; frame k is grey 10 + 6k."""
    with av.open(str(path), "w") as container:
        options = {"g": str(gop), "bframes": "2", "sc_threshold": "0", "crf": "5"}
        stream = container.add_stream("libx264", rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for k in range(num_frames):
            image = np.full((height, width, 3), LEVEL_BASE + LEVEL_STEP * k, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))


def _frame_indices(frames: torch.Tensor) -> list[int]:
    levels = frames.float().mean(dim=(1, 2, 3))
    return [round((level.item() - LEVEL_BASE) / LEVEL_STEP) for level in levels]


@pytest.fixture(scope="module", params=REAL_CLIPS)
def real_clip_frames(request):
    path = REAL / request.param
    return extract_frames(path, method="seek"), extract_frames(path, method="decode_all")


def test_real_clips_give_ten_frames_and_both_methods_agree(real_clip_frames):
    by_seeking, by_decoding_all = real_clip_frames
    assert by_seeking.shape == (NUM_FRAMES, 3, FRAME_SIZE, FRAME_SIZE) and by_seeking.dtype == torch.uint8
    assert torch.equal(by_seeking, by_decoding_all)
    # Ten different moments of the clip, not one frame repeated.
    assert len({frame.float().mean().item() for frame in by_seeking}) > 1


@pytest.mark.parametrize(("num_frames", "gop", "min_seeks"), [(23, 2, 5), (37, 2, 5), (37, 1, 10), (37, 12, 2)])
def test_frames_are_cav_mae_indices_and_both_methods_agree(tmp_path, monkeypatch, num_frames, gop, min_seeks):
    # Clips shorter than the 10 s span. With keyframes closer together than the sampled
    # frames the seek path jumps ahead; with sparse ones it decodes on instead.
    path = tmp_path / "numbered.mp4"
    _write_numbered_clip(path, num_frames, gop=gop)
    seeks = []

    class CountingDecoder(video._ForwardDecoder):
        def __init__(self, *args, seek_pts=None):
            seeks.append(seek_pts)
            super().__init__(*args, seek_pts=seek_pts)

    monkeypatch.setattr(video, "_ForwardDecoder", CountingDecoder)
    by_seeking = extract_frames(path, method="seek")
    by_decoding_all = extract_frames(path, method="decode_all")

    assert by_seeking.shape == (10, 3, 224, 224)
    assert torch.equal(by_seeking, by_decoding_all)
    assert _frame_indices(by_seeking) == [int(i * num_frames / 10) for i in range(10)]
    assert len([pts for pts in seeks if pts is not None]) >= min_seeks


def test_span_limits_the_sampled_time(tmp_path):
    path = tmp_path / "numbered.mp4"
    _write_numbered_clip(path, 40, fps=10)  # 4 s

    frames = extract_frames(path, num_frames=4, span_seconds=2.0)

    assert _frame_indices(frames) == [0, 5, 10, 15]


def test_aspect_ratio_is_kept_by_a_centre_crop():
    # 2:1 frame: outer quarters black and white, centre half grey. Squashing would keep the
    # black and white bands; resizing the short side and centre-cropping keeps only the grey.
    frame = torch.full((3, 100, 200), 128, dtype=torch.uint8)
    frame[:, :, :50], frame[:, :, 150:] = 0, 255

    out = resize_and_crop(frame)

    assert out.shape == (3, 224, 224) and out.dtype == torch.uint8
    # Bicubic support reaches ~5 output pixels into the crop from the band edges.
    assert (out[:, :, 8:-8] == 128).all()


def test_upscales_small_frames():
    out = resize_and_crop(torch.zeros(3, 144, 256, dtype=torch.uint8), size=32)
    assert out.shape == (3, 32, 32)


def test_save_and_load_frame_round_trip(tmp_path):
    y, x = torch.meshgrid(torch.arange(64), torch.arange(96), indexing="ij")
    frame = torch.stack([x * 2, y * 3, (x + y)]).to(torch.uint8)
    path = tmp_path / "frame.jpg"

    path.write_bytes(encode_frame(frame))
    loaded = load_frame(path)

    assert loaded.shape == frame.shape and loaded.dtype == torch.uint8
    assert (loaded.float() - frame.float()).abs().mean() < 2.0
    assert torch.equal(decode_frame(path.read_bytes(), "frame.jpg"), loaded)


def test_unreadable_frame_names_the_file(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"not a jpeg")
    with pytest.raises(DecodeError, match="broken.jpg"):
        load_frame(path)
    with pytest.raises(DecodeError, match="absent.jpg"):
        load_frame(tmp_path / "absent.jpg")
    with pytest.raises(DecodeError, match="shard-000001.tar: clip abc: member 3.jpg"):
        decode_frame(b"not a jpeg", "shard-000001.tar: clip abc: member 3.jpg")


def test_normalize_frames_single_and_stacked():
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.25, 1.0)
    frame = torch.tensor([0, 255, 51], dtype=torch.uint8).view(3, 1, 1).expand(3, 2, 2)

    single = normalize_frames(frame, mean, std)
    stacked = normalize_frames(torch.stack([frame, frame]), torch.tensor(mean), torch.tensor(std))

    expected = torch.tensor([-1.0, 3.0, 0.2]).view(3, 1, 1).expand(3, 2, 2)
    assert single.dtype == torch.float32
    torch.testing.assert_close(single, expected)
    torch.testing.assert_close(stacked, torch.stack([expected, expected]))
    # Mixed (float, 0-255) frames normalise the same way.
    torch.testing.assert_close(normalize_frames(frame.float(), mean, std), expected)
    with pytest.raises(ValueError, match="shape"):
        normalize_frames(torch.zeros(4, 2, 2, dtype=torch.uint8), mean, std)


@pytest.mark.parametrize("method", ["seek", "decode_all"])
def test_corrupt_file_names_the_file(tmp_path, method):
    path = tmp_path / "corrupt_clip.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(DecodeError, match="corrupt_clip.mp4"):
        extract_frames(path, method=method)


@pytest.mark.parametrize("method", ["seek", "decode_all"])
def test_truncated_file_is_an_error_not_repeated_frames(tmp_path, method):
    # Frame-threaded decoding ends quietly at the cut; the missing frames must not be replaced
    # by the last decoded one.
    path = tmp_path / "numbered.mp4"
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=25, options={"g": "4", "crf": "5"})
        stream.width, stream.height, stream.pix_fmt = 128, 64, "yuv420p"
        for k in range(37):
            image = np.full((64, 128, 3), LEVEL_BASE + LEVEL_STEP * k, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    truncated = tmp_path / "truncated.mp4"
    data = path.read_bytes()
    truncated.write_bytes(data[: int(len(data) * 0.85)])

    with pytest.raises(DecodeError, match=r"truncated.mp4: .*(ends at|decod)"):
        extract_frames(truncated, method=method)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(DecodeError, match=r"absent.mp4: no such file"):
        extract_frames(tmp_path / "absent.mp4")


def test_audio_only_file_has_no_video_stream(tmp_path):
    path = tmp_path / "speech.wav"
    sf.write(path, np.zeros(1600, np.float32), 16000)
    with pytest.raises(DecodeError, match=r"speech.wav: no video stream"):
        extract_frames(path)


@pytest.mark.parametrize("method", ["seek", "decode_all"])
def test_video_stream_without_frames(tmp_path, method):
    # Matroska keeps a declared video track that never received a packet.
    path = tmp_path / "no_frames.mkv"
    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=25)
        video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
        audio = container.add_stream("pcm_s16le", rate=16000, layout="mono")
        samples = av.AudioFrame.from_ndarray(np.zeros((1, 1600), np.int16), format="s16", layout="mono")
        samples.sample_rate = 16000
        container.mux(audio.encode(samples))
        container.mux(audio.encode(None))
    with pytest.raises(DecodeError, match=r"no_frames.mkv: .*no decodable frame"):
        extract_frames(path, method=method)


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="method"):
        extract_frames(REAL / REAL_CLIPS[0], method="fast")
