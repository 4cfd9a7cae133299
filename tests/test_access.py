"""API keys, session tokens and the Origin check, against a real server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
import websockets

from conftest import start_server
from helpers import Client, ServerProcess

KEY = "test-key-4f1c"
SECRET = "test-secret-for-tokens-0123456789abcdef"


@pytest.fixture(scope="module")
def keyed_server(cache_dir: Path, artifacts_dir: Path) -> Iterator[ServerProcess]:
    process = start_server(
        cache_dir,
        artifacts_dir,
        "keyed",
        "--api-key",
        KEY,
        "--allowed-origin",
        "https://canvas.example",
        env={"STREAMCANVAS_TOKEN_SECRET": SECRET},
    )
    yield process
    process.stop()


async def test_a_key_is_required_and_a_token_issued(keyed_server: ServerProcess) -> None:
    async with Client.connect(keyed_server.ws_url) as client:
        await client.send_raw(_hello(api_key=None))
        error = await client.expect("error")
        assert error["code"] == "unauthorized" and error["fatal"] is True and error["field"] == "api_key"
        with pytest.raises(websockets.ConnectionClosed):
            await client.recv(timeout=5)
    async with Client.connect(keyed_server.ws_url) as client:
        await client.send_raw(_hello(api_key="wrong"))
        assert (await client.expect("error"))["code"] == "unauthorized"
    async with Client.connect(keyed_server.ws_url) as client:
        ready = await client.hello(api_key=KEY)
        claims = jwt.decode(ready["token"], SECRET, algorithms=["HS256"])
        assert claims["sub"] == ready["session_id"] and claims["role"] == "control"
    assert keyed_server.info()["auth"] == "api_key"


async def test_cross_site_websocket_is_refused(keyed_server: ServerProcess) -> None:
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with Client.connect(keyed_server.ws_url, origin="https://evil.example"):
            pass
    assert refused.value.response.status_code == 403
    # The server's own origin and the allow-listed one are accepted.
    for origin in (keyed_server.base_url, "https://canvas.example"):
        async with Client.connect(keyed_server.ws_url, origin=origin) as client:
            await client.hello(api_key=KEY)


def test_binding_beyond_loopback_without_keys_is_called_out() -> None:
    from streamcanvas.realtime_server.settings import Settings

    assert Settings().host == "127.0.0.1"
    assert Settings(host="0.0.0.0").binds_beyond_loopback
    assert not Settings(host="127.0.0.2").binds_beyond_loopback
    assert not Settings(host="::1").binds_beyond_loopback


def _hello(api_key: str | None) -> bytes:
    from streamcanvas.codecs.messages import Hello, serialize

    return serialize(Hello(protocol=(1,), api_key=api_key))
