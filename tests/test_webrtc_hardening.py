"""WebRTC signalling against peers that never arrive, viewers that outlive their session, and RFC 9725.

Everything runs on loopback: the server offers only 127.0.0.1 (--ice-host-address), and the aiortc
peers in this process gather on 127.0.0.1 only (aioice's host-address lookup is replaced for the test,
as the server's own --ice-host-address does). Peers that must never connect send offers whose
candidates point at a loopback port nobody answers on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aioice.ice
import httpx
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription, VideoStreamTrack
from aiortc.mediastreams import MediaStreamError
from av import VideoFrame

from conftest import start_server
from helpers import Client, ServerProcess, make_canvas

SIZE = 128
CONNECT_TIMEOUT_S = 2.0
ORIGIN = "http://app.example"


@pytest.fixture(scope="module")
def rtc_server(cache_dir: Path, artifacts_dir: Path) -> Iterator[ServerProcess]:
    process = start_server(
        cache_dir, artifacts_dir, "webrtc-hardening",
        "--slots", "1", "--ice-host-address", "127.0.0.1",
        "--webrtc-connect-timeout", str(CONNECT_TIMEOUT_S), "--idle-timeout", "6",
        "--allowed-origin", ORIGIN,
        env={"STREAMCANVAS_MAX_VIEWERS": "2"},
    )  # fmt: skip
    yield process
    process.stop()


@pytest.fixture(scope="module")
def keyed_server(cache_dir: Path, artifacts_dir: Path) -> Iterator[ServerProcess]:
    process = start_server(
        cache_dir, artifacts_dir, "webrtc-keyed",
        "--api-key", "sesame", "--ice-host-address", "127.0.0.1",
        "--ice-server", "stun:127.0.0.1:3478",
        "--ice-server", "turn:alice:s%40cret@127.0.0.1:3478?transport=udp",
    )  # fmt: skip
    yield process
    process.stop()


@pytest.fixture
def loopback_ice(monkeypatch: pytest.MonkeyPatch) -> None:
    """aiortc peers in this process gather candidates on 127.0.0.1 only."""
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"] if use_ipv4 else [])


class Pattern(VideoStreamTrack):
    async def recv(self) -> VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = VideoFrame.from_ndarray(make_canvas(SIZE, 3), format="rgb24")
        frame.pts, frame.time_base = pts, time_base
        return frame


def unreachable(sdp: str) -> str:
    """The offer with every candidate moved to a loopback port where nothing answers: a peer that
    never arrives (and whose checks never leave this machine)."""
    lines = []
    for line in sdp.splitlines():
        if line.startswith("a=candidate"):
            parts = line.split()
            parts[4], parts[5] = "127.0.0.1", "9"
            line = " ".join(parts)
        elif line.startswith("c=IN IP4"):
            line = "c=IN IP4 127.0.0.1"
        lines.append(line)
    return "\r\n".join(lines) + "\r\n"


async def offer_sdp(send_video: bool = True, channel: bool = False) -> tuple[RTCPeerConnection, str]:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    if send_video:
        pc.addTransceiver(Pattern(), direction="sendonly")
    else:
        pc.addTransceiver("video", direction="recvonly")
    if channel:
        pc.createDataChannel("control")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


async def wait_for(predicate, timeout: float, interval: float = 0.1) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(interval)
    return await predicate()


async def info(http: httpx.AsyncClient) -> dict:
    return (await http.get("/v1/info")).json()


async def test_a_peer_that_never_connects_gives_its_slot_back(rtc_server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=rtc_server.base_url, timeout=30) as http:
        for endpoint in ("offer", "whip"):
            pc, sdp = await offer_sdp(channel=endpoint == "offer")
            if endpoint == "offer":
                answer = await http.post("/v1/webrtc/offer", json={"type": "offer", "sdp": unreachable(sdp), "hello": {"protocol": [1]}})
                assert answer.status_code == 200
            else:
                answer = await http.post("/v1/whip", content=unreachable(sdp), headers={"content-type": "application/sdp"})
                assert answer.status_code == 201
            taken = time.monotonic()
            assert (await info(http))["slots_free"] == 0
            # The slot is back once the connect deadline has passed, long before the idle timeout.
            assert await wait_for(lambda: _all_free(http), CONNECT_TIMEOUT_S + 3)
            assert time.monotonic() - taken >= CONNECT_TIMEOUT_S - 0.5
            if endpoint == "whip":
                gone = await http.delete(answer.headers["location"])
                assert gone.status_code == 404  # the resource went with its session
            await pc.close()


async def test_a_whip_url_and_resource_take_only_what_they_document(rtc_server: ServerProcess) -> None:
    pc, sdp = await offer_sdp()
    offer, headers = unreachable(sdp), {"content-type": "application/sdp"}
    try:
        async with httpx.AsyncClient(base_url=rtc_server.base_url, timeout=30) as http:
            # A misspelt, repeated or non-numeric query parameter is refused naming it, before any session opens.
            for query, named, words in (
                ("strenght=0.6", "strenght", "unknown query parameter 'strenght'"),
                ("width=abc", "width", "width must be a whole number, got 'abc'"),
                ("steps=2&steps=3", "params.steps", "steps is given twice"),
                ("guidance_scale=lots", "params.guidance_scale", "guidance_scale must be a number"),
            ):
                refused = await http.post(f"/v1/whip?{query}", content=offer, headers=headers)
                assert refused.status_code == 400 and refused.json()["field"] == named, refused.text
                assert words in refused.json()["message"], refused.text
                assert await _all_free(http)
            created = await http.post("/v1/whip?prompt=a%20harbour&strength=0.6&style=pencil", content=offer, headers=headers)
            assert created.status_code == 201, created.text
            location = created.headers["location"]
            live = await http.options(location)
            assert live.status_code == 204 and live.headers["allow"] == "OPTIONS, DELETE"
            # A 405 names only what the resource takes, whatever the method.
            for method in ("GET", "PATCH", "PUT", "POST"):
                refused = await http.request(method, location)
                assert refused.status_code == 405 and refused.headers["allow"] == "OPTIONS, DELETE", (method, refused.text)
            assert (await http.delete(location)).status_code == 200
            for method in ("OPTIONS", "DELETE"):  # an ended resource is gone for every method
                gone = await http.request(method, location)
                assert gone.status_code == 404 and gone.json()["error"] == "unknown_resource", method
            # An offer that cannot be used says why, in words, not as a Python exception.
            bad = await http.post("/v1/whip", content=b"v=0\r\n", headers=headers)
            assert bad.status_code == 400 and "Error:" not in bad.json()["message"], bad.text
            assert await wait_for(lambda: _all_free(http), 5)
    finally:
        await pc.close()


async def _all_free(http: httpx.AsyncClient) -> bool:
    state = await info(http)
    return state["sessions"] == 0 and state["slots_free"] == state["slots_total"]


async def test_an_audio_only_offer_listing_vp8_is_refused_and_holds_nothing(rtc_server: ServerProcess) -> None:
    pc, sdp = await offer_sdp()
    audio_with_vp8 = unreachable(sdp).replace("m=video", "m=audio")
    assert "VP8/90000" in audio_with_vp8
    async with httpx.AsyncClient(base_url=rtc_server.base_url, timeout=30) as http:
        for endpoint, body, headers in (
            ("/v1/whip", audio_with_vp8, {"content-type": "application/sdp"}),
            ("/v1/webrtc/offer", None, None),
        ):
            if body is None:
                answer = await http.post(endpoint, json={"type": "offer", "sdp": audio_with_vp8, "hello": {"protocol": [1]}})
            else:
                answer = await http.post(endpoint, content=body, headers=headers)
            assert answer.status_code == 400, answer.text
            assert answer.json()["error"] == "invalid_sdp"
            assert await _all_free(http)
    await pc.close()
    assert "Traceback" not in rtc_server.log()


async def test_an_idle_webrtc_session_times_out_like_a_websocket_one(rtc_server: ServerProcess, loopback_ice: None) -> None:
    """A connected peer whose video sends nothing and whose data channel is silent is idle."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")  # no video from us: no input at all
    pc.createDataChannel("control")
    await pc.setLocalDescription(await pc.createOffer())
    async with httpx.AsyncClient(base_url=rtc_server.base_url, timeout=30) as http:
        answer = await http.post("/v1/webrtc/offer", json={"type": "offer", "sdp": pc.localDescription.sdp, "hello": {"protocol": [1]}})
        assert answer.status_code == 200
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer.json()["sdp"], type="answer"))
        assert await wait_for(lambda: _connected(pc), 10)
        opened = time.monotonic()
        assert (await info(http))["slots_free"] == 0
        assert await wait_for(lambda: _all_free(http), 15)
        assert time.monotonic() - opened >= 5  # the idle timeout (6 s), not the connect deadline
        assert await wait_for(lambda: _closed(pc), 10)
    await pc.close()


async def _connected(pc: RTCPeerConnection) -> bool:
    return pc.connectionState == "connected"


async def _closed(pc: RTCPeerConnection) -> bool:
    return pc.connectionState in ("closed", "failed")


@dataclass
class Watched:
    frames: list = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)


async def watch(http: httpx.AsyncClient, session_id: str, token: str) -> tuple[RTCPeerConnection, httpx.Response, Watched]:
    viewer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    viewer.addTransceiver("video", direction="recvonly")
    watched = Watched()
    frames, ended = watched.frames, watched.ended

    @viewer.on("track")
    def on_track(track) -> None:  # type: ignore[no-untyped-def]
        async def consume() -> None:
            try:
                while True:
                    frames.append(await track.recv())
            except MediaStreamError:
                ended.set()

        asyncio.ensure_future(consume())

    await viewer.setLocalDescription(await viewer.createOffer())
    answer = await http.post(
        f"/v1/sessions/{session_id}/whep",
        content=viewer.localDescription.sdp,
        headers={"content-type": "application/sdp", "authorization": f"Bearer {token}"},
    )
    assert answer.status_code == 201, answer.text
    await viewer.setRemoteDescription(RTCSessionDescription(sdp=answer.text, type="answer"))
    return viewer, answer, watched


async def test_a_whep_viewer_ends_with_its_session(rtc_server: ServerProcess, loopback_ice: None) -> None:
    async with httpx.AsyncClient(base_url=rtc_server.base_url, timeout=30) as http:
        # 1. The session is a WebSocket client's; it ends when the client leaves.
        async with Client.connect(rtc_server.ws_url) as client:
            ready = await client.hello(width=SIZE, height=SIZE)
            await client.frame_for(await client.send_canvas(make_canvas(SIZE, 1)))
            viewer, answer, frames = await watch(http, ready["session_id"], ready["viewer_token"])
            assert await wait_for(lambda: _connected(viewer), 10)
            assert await wait_for(lambda: _has_frames(frames), 10), "the newest frame comes at once, even with no new input"
        ended_at = time.monotonic()
        assert await wait_for(lambda: _closed(viewer), 5), viewer.connectionState
        assert time.monotonic() - ended_at < 5
        assert frames.ended.is_set()  # its track ended
        assert (await http.delete(answer.headers["location"])).status_code == 404
        await viewer.close()

        # 2. The session is a WHIP publisher's; it ends with the publisher's DELETE.
        publisher, sdp = await offer_sdp()
        published = await http.post("/v1/whip", content=sdp, headers={"content-type": "application/sdp"})
        assert published.status_code == 201
        await publisher.setRemoteDescription(RTCSessionDescription(sdp=published.text, type="answer"))
        viewer, answer, frames = await watch(
            http, published.headers["x-streamcanvas-session"], published.headers["x-streamcanvas-viewer-token"]
        )
        assert await wait_for(lambda: _has_frames(frames), 20)
        assert (await http.delete(published.headers["location"])).status_code == 200
        assert await wait_for(lambda: _closed(viewer), 5), viewer.connectionState
        assert (await http.delete(answer.headers["location"])).status_code == 404
        assert await _all_free(http)
        await viewer.close()
        await publisher.close()


async def _has_frames(watched: Watched) -> bool:
    return len(watched.frames) > 0


async def test_one_viewer_limit_across_mjpeg_and_whep(rtc_server: ServerProcess) -> None:
    """STREAMCANVAS_MAX_VIEWERS=2: any mix of viewers stops at two, counted from admission."""
    async with Client.connect(rtc_server.ws_url) as client, httpx.AsyncClient(base_url=rtc_server.base_url, timeout=30) as http:
        ready = await client.hello(width=SIZE, height=SIZE)
        session, token = ready["session_id"], ready["viewer_token"]
        auth = {"authorization": f"Bearer {token}"}
        sdp_headers = {**auth, "content-type": "application/sdp"}
        peers = []

        async def whep() -> httpx.Response:
            pc, sdp = await offer_sdp(send_video=False)
            peers.append(pc)
            return await http.post(f"/v1/sessions/{session}/whep", content=unreachable(sdp), headers=sdp_headers)

        first, second, third = await whep(), await whep(), await whep()
        assert (first.status_code, second.status_code, third.status_code) == (201, 201, 503)
        assert third.json()["error"] == "too_many_viewers"
        mjpeg = await http.get(f"/v1/sessions/{session}/mjpeg", headers=auth)
        assert mjpeg.status_code == 503 and mjpeg.json()["error"] == "too_many_viewers"
        # A WHEP viewer that leaves gives its place to an MJPEG viewer, and then WHEP is full again.
        assert (await http.delete(first.headers["location"])).status_code == 200
        async with http.stream("GET", f"/v1/sessions/{session}/mjpeg", headers=auth) as stream:
            assert stream.status_code == 200
            refused = await whep()
            assert refused.status_code == 503 and refused.json()["error"] == "too_many_viewers"
        assert (await http.delete(second.headers["location"])).status_code == 200
        for pc in peers:
            await pc.close()


async def test_whip_and_whep_answer_options_with_cors(rtc_server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=rtc_server.base_url, timeout=30) as http:
        for path in ("/v1/whip", "/v1/sessions/anything/whep"):
            plain = await http.options(path)
            assert plain.status_code == 204 and plain.headers["accept-post"] == "application/sdp"
            assert "POST" in plain.headers["allow"]
            preflight = await http.options(
                path,
                headers={
                    "origin": ORIGIN,
                    "access-control-request-method": "POST",
                    "access-control-request-headers": "authorization, content-type",
                },
            )
            assert preflight.status_code == 200
            assert preflight.headers["access-control-allow-origin"] == ORIGIN
            assert "POST" in preflight.headers["access-control-allow-methods"]
            assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
            foreign = await http.options(
                path, headers={"origin": "http://evil.example", "access-control-request-method": "POST"}
            )
            assert "access-control-allow-origin" not in foreign.headers
        offer_preflight = await http.options(
            "/v1/webrtc/offer",
            headers={"origin": ORIGIN, "access-control-request-method": "POST", "access-control-request-headers": "content-type"},
        )
        assert offer_preflight.status_code == 200 and offer_preflight.headers["access-control-allow-origin"] == ORIGIN
        unknown = await http.options("/v1/whip/0123")
        assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_resource"
        # A cross-origin answer exposes the headers a WHIP client must read.
        refused = await http.post("/v1/whip", content=b"v=0", headers={"origin": ORIGIN, "content-type": "text/plain"})
        assert refused.headers["access-control-allow-origin"] == ORIGIN
        assert "location" in refused.headers["access-control-expose-headers"].lower()


async def test_whip_asks_for_credentials_before_reading_the_offer(keyed_server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=keyed_server.base_url, timeout=30) as http:
        for headers in ({}, {"authorization": "Bearer wrong"}):
            refused = await http.post("/v1/whip", content=b"v=0", headers={**headers, "content-type": "application/sdp"})
            assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"
            assert refused.headers["www-authenticate"].startswith("Bearer")
        offer = await http.post(
            "/v1/webrtc/offer", json={"type": "offer", "sdp": "v=0", "hello": {"protocol": [1]}},
        )
        assert offer.status_code == 401 and offer.headers["www-authenticate"].startswith("Bearer")


async def test_turn_credentials_reach_the_client(keyed_server: ServerProcess) -> None:
    pc, sdp = await offer_sdp(channel=True)
    async with httpx.AsyncClient(base_url=keyed_server.base_url, timeout=60) as http:
        published = await http.post(
            "/v1/whip", content=unreachable(sdp),
            headers={"content-type": "application/sdp", "authorization": "Bearer sesame"},
        )  # fmt: skip
        assert published.status_code == 201, published.text
        links = published.headers["link"]
        assert '<stun:127.0.0.1:3478>; rel="ice-server"' in links
        assert (
            '<turn:127.0.0.1:3478?transport=udp>; rel="ice-server"; username="alice"; credential="s@cret"; '
            'credential-type="password"'
        ) in links
        await http.delete(published.headers["location"], headers={"authorization": "Bearer sesame"})
        answer = await http.post(
            "/v1/webrtc/offer",
            json={"type": "offer", "sdp": unreachable(sdp), "hello": {"protocol": [1], "api_key": "sesame"}},
        )
        assert answer.status_code == 200
        assert answer.json()["ice_servers"] == [
            {"urls": ["stun:127.0.0.1:3478"]},
            {"urls": ["turn:127.0.0.1:3478?transport=udp"], "username": "alice", "credential": "s@cret"},
        ]
    await pc.close()


def test_bad_ice_server_settings_stop_the_server_before_it_listens(cache_dir: Path, artifacts_dir: Path) -> None:
    with pytest.raises(RuntimeError, match="turn:USER:CREDENTIAL@HOST"):
        start_server(cache_dir, artifacts_dir, "bad-ice", "--ice-server", "stun:alice:x@127.0.0.1:3478")
