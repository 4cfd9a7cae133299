"""Video jobs: a clip restyled frame by frame through the live stream pipeline, written as H.264 MP4.

`probe` reads only the container's headers (format, streams, size, duration), so a clip over the
limits is refused when the job is created, before a frame is decoded. `restyle` decodes, renders and
encodes in one pass: the output keeps the input's timestamps (so its frame rate), and its audio
packets are copied across untouched. The MP4 is built in memory and only becomes a result file once it
is complete, so a worker killed mid-clip leaves no half file; the retried attempt starts over and,
with the same seed, makes the same frames.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol

import av
import numpy as np
from PIL import Image

from .errors import InvalidJob

CONTAINERS = {"mov,mp4,m4a,3gp,3g2,mj2": "mp4/mov", "matroska,webm": "webm/mkv"}
MP4_AUDIO = {"aac", "mp3", "opus", "ac3", "eac3", "alac", "flac"}
"""Audio codecs an MP4 can carry as they are (others, e.g. Vorbis, would need re-encoding)."""


@dataclass(frozen=True)
class VideoLimits:
    max_bytes: int = 24 * 1024 * 1024
    max_seconds: float = 60.0
    max_frames: int = 3600
    max_side: int = 2048


@dataclass(frozen=True)
class VideoInfo:
    container: str
    width: int
    height: int
    frames: int
    fps: float
    duration_s: float
    audio: str | None


def probe(data: bytes, limits: VideoLimits) -> VideoInfo:
    """The clip's format, size and length from its headers; InvalidJob (field params.video) when it
    is not a video this server takes or is over a limit."""
    if len(data) > limits.max_bytes:
        raise InvalidJob(f"the video is {len(data)} bytes, over the limit of {limits.max_bytes}", field="params.video")
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            kind = CONTAINERS.get(container.format.name)
            if kind is None:
                raise InvalidJob(f"the video is {container.format.name!r}; this server takes MP4, MOV and WebM", field="params.video")
            if not container.streams.video:
                raise InvalidJob("the file has no video stream", field="params.video")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            rate = stream.average_rate or stream.guessed_rate
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / av.time_base
            else:
                raise InvalidJob("the container does not say how long the video is", field="params.video")
            fps = float(rate) if rate else 0.0
            frames = stream.frames or round(duration * fps)
            audio = container.streams.audio[0].codec_context.name if container.streams.audio else None
    except av.FFmpegError as error:
        # FFmpeg's own words ("Invalid data found when processing input"), without its error number and
        # the name of an in-memory file.
        raise InvalidJob(f"the video cannot be read: {error.strerror or type(error).__name__} (MP4, MOV or WebM)", field="params.video") from None
    if not (0 < width <= limits.max_side and 0 < height <= limits.max_side):
        raise InvalidJob(f"the video is {width}x{height}, over the limit of {limits.max_side} a side", field="params.video")
    if duration > limits.max_seconds:
        raise InvalidJob(f"the video lasts {duration:.1f} s, over the limit of {limits.max_seconds:g} s", field="params.video")
    if frames > limits.max_frames:
        raise InvalidJob(f"the video has {frames} frames, over the limit of {limits.max_frames}", field="params.video")
    if not 0 < fps <= 120:
        raise InvalidJob(f"the video's frame rate ({fps:g}) is not one this server takes (0 … 120)", field="params.video")
    if audio is not None and audio not in MP4_AUDIO:
        raise InvalidJob(f"its {audio} audio cannot be copied into an MP4 as it is ({', '.join(sorted(MP4_AUDIO))} can)", field="params.video")
    return VideoInfo(kind, width, height, frames, fps, duration, audio)


class FrameStream(Protocol):
    """What turns input frames into output frames, possibly some frames later (a stream batch)."""

    def feed(self, rgb: np.ndarray, index: int) -> list[tuple[int, np.ndarray]]: ...

    def flush(self) -> Iterator[tuple[int, np.ndarray]]: ...


def restyle(
    data: bytes,
    width: int,
    height: int,
    frames: FrameStream,
    on_frame: Callable[[int, np.ndarray], None],
) -> bytes:
    """The clip with every frame rendered by `frames` at width × height, as an MP4 (H.264, the input's
    timestamps, its audio copied). `on_frame(index, rgb)` after each frame is written (it may raise to
    stop the job there)."""
    output = io.BytesIO()
    with av.open(io.BytesIO(data), mode="r") as source, av.open(output, mode="w", format="mp4") as target:
        video_in = source.streams.video[0]
        audio_in = source.streams.audio[0] if source.streams.audio else None
        rate = video_in.average_rate or video_in.guessed_rate or Fraction(30)
        video_out = target.add_stream("libx264", rate=rate, options={"preset": "veryfast", "crf": "18", "bf": "0"})
        video_out.width, video_out.height, video_out.pix_fmt = width, height, "yuv420p"
        time_base = video_in.time_base or Fraction(1, 1000)
        video_out.time_base = time_base
        video_out.codec_context.time_base = time_base
        audio_out = target.add_stream_from_template(audio_in) if audio_in is not None else None
        stamps: dict[int, int] = {}
        count = 0

        def write(pairs: list[tuple[int, np.ndarray]] | Iterator[tuple[int, np.ndarray]]) -> None:
            for index, rgb in pairs:
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                frame.pts = stamps.pop(index)
                frame.time_base = time_base
                for packet in video_out.encode(frame):
                    target.mux(packet)
                on_frame(index, rgb)

        streams = [video_in] + ([audio_in] if audio_in is not None else [])
        for packet in source.demux(*streams):
            if packet.stream is audio_in:
                if packet.dts is not None and audio_out is not None:
                    packet.stream = audio_out
                    target.mux(packet)
                continue
            for decoded in packet.decode():
                rgb = decoded.to_ndarray(format="rgb24")
                if rgb.shape[:2] != (height, width):
                    rgb = np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.LANCZOS))
                pts = decoded.pts if decoded.pts is not None else round(count / float(rate) / float(time_base))
                stamps[count] = pts
                write(frames.feed(rgb, count))
                count += 1
        write(frames.flush())
        for packet in video_out.encode(None):
            target.mux(packet)
    if count == 0:
        raise ValueError("the video has no frames to render")
    return output.getvalue()


def output_size(width: int, height: int, max_width: int, max_height: int, wanted: tuple[int | None, int | None] = (None, None)) -> tuple[int, int]:
    """The render size: the one asked for, else the clip's, scaled down to fit (keeping its aspect) and
    rounded down to multiples of 8."""
    if wanted[0] and wanted[1]:
        return wanted[0], wanted[1]
    scale = min(1.0, max_width / width, max_height / height)
    return max(64, int(width * scale) // 8 * 8), max(64, int(height * scale) // 8 * 8)
