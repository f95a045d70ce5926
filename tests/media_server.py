"""A local stand-in for the internet in media tests.

Tests have no network, yet media fetching must be tested against real
HTTP: redirects, slow answers, error statuses, bodies that lie about their
size. `MediaServer` serves all of that on 127.0.0.1 (an ephemeral port), and
`StaticResolver` maps test host names such as `images.example.test` to it,
one scripted DNS answer after another (to play DNS rebinding). The sample
media builders make real PNG/JPEG/WebP/GIF images and MP4/WebM/AVI/MPEG-TS
videos, plus a small PNG whose header claims a huge size.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from io import BytesIO
from types import TracebackType
from typing import Self

from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from PIL import Image

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class ServedRequest:
    path: str
    host_header: str | None


@dataclass
class MediaServer:
    """Serves registered paths; records every request it gets."""

    requests: list[ServedRequest] = field(default_factory=list)
    # Requests being answered right now, and the most there ever were at once.
    in_flight: int = 0
    max_in_flight: int = 0
    _routes: dict[str, Handler] = field(default_factory=dict)
    _runner: web.AppRunner | None = None
    port: int = 0

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def add_file(self, path: str, body: bytes, content_type: str) -> None:
        async def handler(_: web.Request) -> web.StreamResponse:
            return web.Response(body=body, content_type=content_type)

        self._routes[path] = handler

    def add_redirect(self, path: str, location: str, status: int = 302) -> None:
        async def handler(_: web.Request) -> web.StreamResponse:
            return web.Response(status=status, headers={"Location": location})

        self._routes[path] = handler

    def add_status(self, path: str, status: int) -> None:
        async def handler(_: web.Request) -> web.StreamResponse:
            return web.Response(status=status, text="nope")

        self._routes[path] = handler

    def add_slow(self, path: str, delay_s: float) -> None:
        async def handler(_: web.Request) -> web.StreamResponse:
            await asyncio.sleep(delay_s)
            return web.Response(body=b"late")

        self._routes[path] = handler

    def add_gated(self, path: str, body: bytes, content_type: str, gate: asyncio.Event, delay_s: float = 0) -> None:
        """`body`, answered only once `gate` is set, then after `delay_s`."""

        async def handler(_: web.Request) -> web.StreamResponse:
            await gate.wait()
            await asyncio.sleep(delay_s)
            return web.Response(body=body, content_type=content_type)

        self._routes[path] = handler

    def add_stream(self, path: str, total_bytes: int, *, declare_length: bool) -> None:
        """A body of `total_bytes`, sent in chunks, with or without a Content-Length."""

        async def handler(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "image/png"})
            if declare_length:
                response.content_length = total_bytes
            await response.prepare(request)
            chunk = b"\0" * 65536
            sent = 0
            while sent < total_bytes:
                piece = chunk[: total_bytes - sent]
                await response.write(piece)
                sent += len(piece)
            await response.write_eof()
            return response

        self._routes[path] = handler

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(ServedRequest(request.path, request.headers.get("Host")))
        handler = self._routes.get(request.path)
        if handler is None:
            raise web.HTTPNotFound()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await handler(request)
        finally:
            self.in_flight -= 1


class StaticResolver(AbstractResolver):
    """DNS for tests: each host name gets its scripted answers, one per lookup (the last one repeats)."""

    def __init__(self, answers: dict[str, Sequence[Sequence[str]]]) -> None:
        self._answers = answers
        self.lookups: dict[str, int] = {}

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        script = self._answers.get(host)
        if script is None:
            raise socket.gaierror(socket.EAI_NONAME, f"{host} is not a test host")
        count = self.lookups.get(host, 0)
        self.lookups[host] = count + 1
        addresses = script[min(count, len(script) - 1)]
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": socket.AF_INET6 if ":" in address else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
            for address in addresses
        ]

    async def close(self) -> None:
        return None


# --- Sample media ---------------------------------------------------------------


def sample_image(image_format: str, size: tuple[int, int] = (64, 48), mode: str = "RGB") -> bytes:
    """A real image of `size`: a gradient, so that resizing has something to average."""
    image = Image.linear_gradient("L").resize(size).convert(mode)
    buffer = BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def sample_mp4(frames: int = 4, size: tuple[int, int] = (32, 32)) -> bytes:
    """A real H.264 MP4 of a few frames."""
    return sample_video(frames=frames, size=size)


VIDEO_CODECS = {"mp4": "libx264", "webm": "libvpx", "avi": "mpeg4", "mpegts": "mpeg2video"}


def sample_video(container: str = "mp4", frames: int = 4, size: tuple[int, int] = (32, 32), fps: int = 4) -> bytes:
    """A real video of `frames` frames at `fps`, in one of VIDEO_CODECS' containers."""
    import av  # imported here so that image-only tests do not load FFmpeg

    buffer = BytesIO()
    with av.open(buffer, mode="w", format=container) as output:
        stream = output.add_stream(VIDEO_CODECS[container], rate=Fraction(fps))
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for index in range(frames):
            frame = av.VideoFrame.from_image(Image.new("RGB", size, (index * 60 % 256, 80, 160)))
            for packet in stream.encode(frame):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return buffer.getvalue()
