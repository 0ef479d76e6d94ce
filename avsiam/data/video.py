"""Video: the 10 frames of a clip, as staged JPEGs and as normalised model input.

Frames follow CAV-MAE's extraction: the frames on screen at ``t_i = i * T / 10`` (``i = 0..9``,
``T = min(duration, 10 s)``, i.e. CAV-MAE's frame indices ``int(i * total / 10)``), resized so
the shorter side is 224 (bicubic, antialiased) and centre-cropped to 224 x 224. Published
AVSiam instead decodes every frame of the mp4 at load time and squashes it to 224 x 224,
distorting the aspect ratio; here the aspect ratio is kept and only the GOPs holding the 10
frames are decoded.
"""

from __future__ import annotations

import bisect
import io
import math
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from avsiam.data.errors import DecodeError

NUM_FRAMES = 10
FRAME_SIZE = 224
JPEG_QUALITY = 95


def extract_frames(
    path: str | Path,
    num_frames: int = NUM_FRAMES,
    span_seconds: float = 10.0,
    size: int = FRAME_SIZE,
    method: str = "seek",
) -> torch.Tensor:
    """``num_frames`` evenly spaced frames of the first ``span_seconds`` of a video, as uint8
    ``[num_frames, 3, size, size]``.

    A clip shorter than the span gives its frames spread over its whole duration.
    ``method="seek"`` decodes only from the keyframe before each frame (skipping a seek when
    no keyframe lies between the decoder's position and the frame); ``method="decode_all"``
    decodes every frame of the file, as the published loader does. Both give the same frames.
    Raises :class:`DecodeError` for a missing file, no video stream or no decodable frame.
    """
    if method not in ("seek", "decode_all"):
        raise ValueError(f"method must be 'seek' or 'decode_all', got {method!r}")
    if num_frames < 1 or span_seconds <= 0 or size < 1:
        raise ValueError(f"need num_frames >= 1, span_seconds > 0, size >= 1; got {num_frames}, {span_seconds}, {size}")
    path = Path(path)
    if not path.is_file():
        raise DecodeError(path, "no such file")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DecodeError(path, "no video stream")
            stream = container.streams.video[0]
            # As many decoder threads as this process's compute budget: all cores in a plain
            # process, one in a Ray task of one CPU (Ray sets OMP_NUM_THREADS), where FFmpeg's
            # default of one thread per core would make parallel shard tasks fight for cores.
            stream.thread_type = "AUTO"
            stream.thread_count = torch.get_num_threads()
            targets = _target_pts(path, container, stream, num_frames, span_seconds)
            if method == "seek":
                frames = _frames_by_seeking(path, container, stream, targets)
            else:
                frames = _frames_by_decoding_all(path, container, stream, targets)
            images = [frame.to_ndarray(format="rgb24") for frame in frames]
    except av.FFmpegError as error:
        raise DecodeError(path, f"cannot decode video ({error})") from error
    return torch.stack([resize_and_crop(torch.from_numpy(image).permute(2, 0, 1), size) for image in images])


def _target_pts(
    path: Path,
    container: av.container.InputContainer,
    stream: av.VideoStream,
    num_frames: int,
    span_seconds: float,
) -> list[int]:
    """Timestamps (in ``stream.time_base``) at ``start + i * T / num_frames``, floored.

    Integer timestamps make "the frame on screen at t" exact: a frame at exactly t counts.
    """
    time_base = stream.time_base
    if stream.duration is not None:
        duration = stream.duration
    elif container.duration is not None:
        duration = math.floor(Fraction(container.duration, av.time_base) / time_base)
    else:
        raise DecodeError(path, "the video duration is unknown (neither the stream nor the container has one)")
    if duration <= 0:
        raise DecodeError(path, f"the video stream has a duration of {duration * time_base} s")
    span = min(duration, math.floor(Fraction(span_seconds) / time_base))
    start = stream.start_time or 0
    return [start + i * span // num_frames for i in range(num_frames)]


class _ForwardDecoder:
    """Decodes a video stream forward from where it is (or from a seek) and answers, for
    increasing timestamps, which frame is on screen then."""

    def __init__(
        self,
        path: Path,
        container: av.container.InputContainer,
        stream: av.VideoStream,
        seek_pts: int | None = None,
    ) -> None:
        if seek_pts is not None:
            # Lands on the keyframe at or before seek_pts; seeking also flushes the decoder.
            container.seek(seek_pts, stream=stream, backward=True)
        self._path, self._time_base = path, stream.time_base
        self._frames = _timestamped_frames(path, container, stream)
        self.shown: av.VideoFrame | None = None  # the last frame at or before the last query
        self.upcoming: av.VideoFrame | None = next(self._frames, None)  # the first one after it

    @property
    def position(self) -> float:
        """Timestamp the decoder has reached (infinite once the stream is exhausted)."""
        return math.inf if self.upcoming is None else self.upcoming.pts

    def frame_at(self, pts: int) -> av.VideoFrame | None:
        """The last frame at or before ``pts``; the first frame when ``pts`` precedes them all;
        None when the stream has no frame."""
        while self.upcoming is not None and self.upcoming.pts <= pts:
            self.shown, self.upcoming = self.upcoming, next(self._frames, None)
        if self.upcoming is None and self.shown is not None:
            # The stream ended: the last frame must still be on screen at pts, otherwise the
            # file stops short of its declared duration (e.g. a truncated download, which
            # frame-threaded decoding ends quietly) and that frame would stand in for others.
            end = self.shown.pts + (self.shown.duration or 0)
            if end <= pts:
                raise DecodeError(
                    self._path,
                    f"the video stream ends at {float(end * self._time_base):.3f} s, before the frame "
                    f"sampled at {float(pts * self._time_base):.3f} s (truncated, or a wrong duration)",
                )
        return self.upcoming if self.shown is None else self.shown

    def drain(self) -> None:
        """Decode the rest of the stream."""
        for _ in self._frames:
            pass


def _timestamped_frames(
    path: Path, container: av.container.InputContainer, stream: av.VideoStream
) -> Iterator[av.VideoFrame]:
    for frame in container.decode(stream):
        if frame.pts is None:
            raise DecodeError(path, "a decoded video frame has no timestamp")
        yield frame


def _frames_by_decoding_all(
    path: Path, container: av.container.InputContainer, stream: av.VideoStream, targets: Sequence[int]
) -> list[av.VideoFrame]:
    decoder = _ForwardDecoder(path, container, stream)
    frames = [decoder.frame_at(target) for target in targets]
    # The baseline decodes the whole stream, as the published loader does.
    decoder.drain()
    if frames[0] is None:
        raise DecodeError(path, "the video stream has no decodable frame")
    return frames


def _frames_by_seeking(
    path: Path, container: av.container.InputContainer, stream: av.VideoStream, targets: Sequence[int]
) -> list[av.VideoFrame]:
    keyframes = _keyframe_pts(container, stream, until_pts=targets[-1])
    if not keyframes:
        raise DecodeError(path, "the video stream has no decodable frame (no keyframe in the sampled span)")
    frames = []
    decoder = None
    for target in targets:
        # The keyframe at or before the target (the first one when the target precedes them all).
        keyframe = keyframes[max(bisect.bisect_right(keyframes, target) - 1, 0)]
        # Seek only when it saves decoding: a keyframe between the decoder and the target.
        if decoder is None or keyframe > decoder.position:
            decoder = _ForwardDecoder(path, container, stream, seek_pts=keyframe)
        frame = decoder.frame_at(target)
        if decoder.shown is None and keyframe != keyframes[0]:
            # The seek landed past the target (an imprecise container index): start over from
            # the first keyframe so the answer is the one sequential decoding gives.
            decoder = _ForwardDecoder(path, container, stream, seek_pts=keyframes[0])
            frame = decoder.frame_at(target)
        if frame is None:
            raise DecodeError(path, "the video stream has no decodable frame")
        frames.append(frame)
    return frames


def _keyframe_pts(container: av.container.InputContainer, stream: av.VideoStream, until_pts: int) -> list[int]:
    """Sorted timestamps of the keyframes up to ``until_pts``, from the packets (no decoding).

    Reads on from the container's position: call it on a freshly opened container.
    """
    keyframes = []
    for packet in container.demux(stream):
        # Packets come in decode order and a frame is decoded before it is shown (dts <= pts),
        # so once the dts passes the last target no later keyframe can be needed.
        decode_ts = packet.dts if packet.dts is not None else packet.pts
        if decode_ts is not None and decode_ts > until_pts:
            break
        if packet.is_keyframe and packet.pts is not None:
            keyframes.append(packet.pts)
    return sorted(keyframes)


def resize_and_crop(frame: torch.Tensor, size: int = FRAME_SIZE) -> torch.Tensor:
    """Resize a uint8 ``[3, H, W]`` frame so its shorter side is ``size`` (bicubic, antialiased),
    then centre-crop it to ``[3, size, size]``: the aspect ratio is kept, never squashed."""
    _check_frame(frame)
    resized = TF.resize(frame, [size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return TF.center_crop(resized, [size, size]).contiguous()


def encode_frame(frame: torch.Tensor) -> bytes:
    """A uint8 ``[3, H, W]`` frame as the bytes of a JPEG (quality 95)."""
    _check_frame(frame)
    buffer = io.BytesIO()
    Image.fromarray(frame.permute(1, 2, 0).cpu().numpy()).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def load_frame(path: str | Path) -> torch.Tensor:
    """Read an image file as a uint8 ``[3, H, W]`` RGB frame."""
    return _read_image(path, path)


def decode_frame(data: bytes, where: str) -> torch.Tensor:
    """An encoded image (a staged JPEG) as a uint8 ``[3, H, W]`` RGB frame; errors name ``where``."""
    return _read_image(io.BytesIO(data), where)


def _read_image(source: str | Path | io.BytesIO, where: str | Path) -> torch.Tensor:
    try:
        with Image.open(source) as image:
            rgb = np.array(image.convert("RGB"))
    except (OSError, Image.DecompressionBombError) as error:
        raise DecodeError(where, f"cannot read the image ({error})") from error
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def normalize_frames(
    frames: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """``(frames / 255 - mean) / std`` per channel, as float32, for ``[3, H, W]`` or ``[T, 3, H, W]``.

    ``frames`` is uint8, or float on the same 0-255 scale (e.g. two frames mixed by mixup).
    """
    if frames.ndim not in (3, 4) or frames.shape[-3] != 3:
        raise ValueError(f"frames must be [3, H, W] or [T, 3, H, W], got shape {tuple(frames.shape)}")
    mean = torch.as_tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (frames.float() / 255.0 - mean) / std


def _check_frame(frame: torch.Tensor) -> None:
    if frame.dtype != torch.uint8 or frame.ndim != 3 or frame.shape[0] != 3:
        raise ValueError(f"a frame must be uint8 [3, H, W], got {frame.dtype} {tuple(frame.shape)}")
