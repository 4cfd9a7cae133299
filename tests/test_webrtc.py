"""WebRTC: an aiortc peer streams video to the server and gets rendered video back.

The peer session runs in a network namespace of its own (see tests/webrtc_peer.py), so ICE and media
never touch this machine's real interfaces. The signalling error cases need no ICE and run against the
shared server on loopback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from helpers import Client, ServerProcess, free_port, server_env

PEER = Path(__file__).with_name("webrtc_peer.py")


def run_in_namespace(script: str, cache_dir: Path, *args: str) -> dict:
    """Run a scenario script under `unshare -n` (a private network namespace) and read its JSON."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a private network namespace (unshare -n); CI runs as root")
    completed = subprocess.run(
        ["unshare", "-n", sys.executable, str(PEER.with_name(script)), str(free_port()), *args],
        capture_output=True,
        text=True,
        timeout=240,
        env=server_env(cache_dir),
        cwd=PEER.parent,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def peer_run(cache_dir: Path, artifacts_dir: Path) -> dict:
    log = artifacts_dir / "server-webrtc.log"
    log.unlink(missing_ok=True)
    return run_in_namespace("webrtc_peer.py", cache_dir, str(log))


@pytest.fixture(scope="module")
def browser_run(cache_dir: Path, artifacts_dir: Path) -> dict:
    log = artifacts_dir / "server-webrtc-browser.log"
    log.unlink(missing_ok=True)
    return run_in_namespace("webrtc_browser.py", cache_dir, str(log), str(artifacts_dir / "browser-webrtc.png"))


def test_chromium_with_a_fake_camera_completes_a_webrtc_session(browser_run: dict) -> None:
    assert browser_run["page_errors"] == [] and browser_run["errors_shown"] == 0
    assert browser_run["remote_size"] == [128, 128]  # the rendered track, at the session's size
    assert browser_run["frames"] >= 10
    assert float(browser_run["fps_text"]) > 0  # stats came over the data channel
    assert browser_run["stats"] == 1  # the session was streaming from the camera
    assert browser_run["freed_after_s"] < 10, browser_run  # the page closes its connection when its tab closes


def test_a_webrtc_peer_gets_rendered_video_for_its_video(peer_run: dict) -> None:
    assert peer_run["status"] == 200 and peer_run["ready"]["type"] == "ready"
    assert peer_run["connection"] == "connected"
    # The server offered only the address it was told to advertise (--ice-host-address).
    assert peer_run["candidates"] == ["10.213.0.1"]
    assert peer_run["size"] == [128, 128, 3]  # rendered at the session's size, not the camera's 320x240
    assert peer_run["frames"] > 20 and peer_run["fps"] > 3
    stats = [message for message in peer_run["messages"] if message["type"] == "stats"]
    assert stats, "stats arrive on the data channel"
    # The server took the peer's video frames as its inputs, newest first, and rendered them.
    assert stats[-1]["inputs"] > stats[0]["inputs"] > 0 and stats[-1]["frames"] > stats[0]["frames"]
    assert stats[-1]["latency_ms"]["p50"] > 0


def test_the_data_channel_speaks_the_same_protocol(peer_run: dict) -> None:
    messages = peer_run["messages"]
    assert {"type": "pong", "t": 1.5, "seq": 900} in messages
    errors = [message for message in messages if message["type"] == "error"]
    assert any(error["code"] == "invalid_value" and error["ref_seq"] == 902 for error in errors)
    assert any(error["code"] == "malformed_message" for error in errors)
    assert not any(error["ref_seq"] == 901 for error in errors)  # the valid prompt change was taken
    assert peer_run["frames_after_params"] > 0, "frames keep coming after the parameter changes"


def test_closing_the_peer_ends_the_session(peer_run: dict) -> None:
    assert peer_run["sessions_during"] == 1
    assert peer_run["sessions_after"] == 0 and peer_run["slots_free_after"] == 1


def test_whip_publishes_and_whep_watches(peer_run: dict) -> None:
    whip = peer_run["whip"]
    assert whip["whip_status"] == 201 and whip["whip_content_type"] == "application/sdp"
    assert whip["whip_location"].startswith("/v1/whip/")
    assert whip["whep_status"] == 201 and whip["whep_location"].startswith("/v1/whep/")
    assert whip["whep_frames"] >= 8 and whip["whep_size"] == [128, 128]
    assert whip["patch_status"] == 405  # no trickle ICE: every candidate is in the answer
    assert (whip["delete_whep"], whip["delete_whip"], whip["delete_again"]) == (200, 200, 404)
    assert whip["sessions_after"] == 0


def offer_url(server: ServerProcess) -> str:
    return f"{server.base_url}/v1/webrtc/offer"


def test_signalling_errors_are_clear_and_leave_nothing_running(server: ServerProcess) -> None:
    with httpx.Client(timeout=30) as http:
        wrong_type = http.post(offer_url(server), content=b"v=0", headers={"content-type": "application/sdp"})
        assert wrong_type.status_code == 415
        not_json = http.post(offer_url(server), content=b"{nope", headers={"content-type": "application/json"})
        assert not_json.status_code == 400 and not_json.json()["error"] == "malformed_message"
        no_sdp = http.post(offer_url(server), json={"type": "answer"})
        assert no_sdp.status_code == 400 and no_sdp.json()["error"] == "invalid_field"
        bad_hello = http.post(offer_url(server), json={"type": "offer", "sdp": "v=0", "hello": {"protocol": [7]}})
        assert bad_hello.status_code == 400 and bad_hello.json()["error"] == "unsupported_version"
        bad_sdp = http.post(offer_url(server), json={"type": "offer", "sdp": "this is not sdp", "hello": {"protocol": [1]}})
        assert bad_sdp.status_code == 400 and bad_sdp.json()["error"] == "invalid_sdp"
        assert http.get(f"{server.base_url}/webrtc/nothing").status_code == 404
        whip_json = http.post(f"{server.base_url}/v1/whip", json={"sdp": "v=0"})
        assert whip_json.status_code == 415
        whip_bad = http.post(f"{server.base_url}/v1/whip", content=b"garbage", headers={"content-type": "application/sdp"})
        assert whip_bad.status_code == 400 and whip_bad.json()["error"] == "invalid_sdp"
        whip_nan = http.post(f"{server.base_url}/v1/whip?steps=many", content=b"v=0", headers={"content-type": "application/sdp"})
        assert whip_nan.status_code == 400 and whip_nan.json()["error"] == "invalid_field"
        whep_unknown = http.post(
            f"{server.base_url}/v1/sessions/nope/whep", content=b"v=0",
            headers={"content-type": "application/sdp", "authorization": "Bearer x"},
        )
        assert whep_unknown.status_code == 404
        assert http.delete(f"{server.base_url}/v1/whip/0123").status_code == 404
    info = server.info()
    assert info["sessions"] == 0 and info["slots_free"] == info["slots_total"]


async def test_a_busy_server_answers_503(server: ServerProcess) -> None:
    async with Client.connect(server.ws_url) as one, Client.connect(server.ws_url) as two:
        await one.hello()
        await two.hello()  # both slots taken
        async with httpx.AsyncClient(timeout=30) as http:
            busy = await http.post(offer_url(server), json={"type": "offer", "sdp": "v=0", "hello": {"protocol": [1]}})
        assert busy.status_code == 503 and busy.json()["error"] == "busy"
        assert busy.headers["retry-after"] == "5" and busy.json()["retry_after_s"] == 5.0  # the hello's busy says the same


async def test_whep_needs_the_sessions_token(server: ServerProcess) -> None:
    async with Client.connect(server.ws_url) as one, Client.connect(server.ws_url) as other:
        ready = await one.hello()
        other_ready = await other.hello()
        url = f"{server.base_url}/v1/sessions/{ready['session_id']}/whep"
        async with httpx.AsyncClient(timeout=30) as http:
            missing = await http.post(url, content=b"v=0", headers={"content-type": "application/sdp"})
            foreign = await http.post(
                url, content=b"v=0",
                headers={"content-type": "application/sdp", "authorization": f"Bearer {other_ready['viewer_token']}"},
            )
        assert missing.status_code == 401 and foreign.status_code == 403
