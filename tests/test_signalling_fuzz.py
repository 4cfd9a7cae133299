"""The WebRTC signalling endpoints fuzzed over HTTP: whatever a client sends to `/v1/webrtc/offer`,
`/v1/whip`, `/v1/sessions/{id}/whep` and the WHIP/WHEP resources, the server answers with a documented
error in the documented JSON shape (or a real SDP answer), never a 5xx other than `busy`, and leaves
no session, slot or traceback behind.

Deterministic: one real offer is made with aiortc, normalised (fixed ids, ufrag, fingerprints) and every
mutation is derived from that text by a seeded generator, so every run sends the same bytes.

Network rule: traffic goes to 127.0.0.1 only. The offer is made with aioice limited to 127.0.0.1, and
every candidate, `c=` line and port in it is then rewritten to a UDP socket on 127.0.0.1 that this test
binds and never answers from: the server's ICE checks go there and nowhere else. `check_loopback_only`
refuses (fails the test) before any body that carries another address, a `.local` name or a host name
in a candidate is sent.

Sessions made by accepted offers never connect: WHIP/WHEP resources are DELETEd at once; the sessions of
`/v1/webrtc/offer` must be closed by the server's connect timeout (STREAMCANVAS_WEBRTC_CONNECT_TIMEOUT_S,
2 s here). Each test collects every problem it sees and fails once, listing them all with the request
that caused each one; every request and answer is also written to artifacts/signalling-fuzz.txt.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import random
import re
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import start_server
from helpers import Client, ServerProcess

SEED = 20261121
SLOTS = 2
CONNECT_TIMEOUT_S = 2.0
SLOT_WAIT_S = CONNECT_TIMEOUT_S + 4.0  # an unconnected offer's slot must be free again by then
REQUEST_TIMEOUT_S = 15.0
MAX_SDP_BYTES = 64 * 1024

PROTOCOL_DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
LOOPBACK_V4 = "127.0.0.1"
LOOPBACK_V6 = "::1"

SDP = {"content-type": "application/sdp"}
JSON = {"content-type": "application/json"}
HELLO: dict[str, Any] = {"protocol": [1]}


# --- the offer everything is derived from -------------------------------------------------------------


@pytest.fixture(scope="module")
def sink_port() -> Iterator[int]:
    """A UDP port on 127.0.0.1 that takes the server's ICE checks and never answers them."""
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind((LOOPBACK_V4, 0))
    try:
        yield sink.getsockname()[1]
    finally:
        sink.close()


async def _aiortc_offer() -> str:
    """A real aiortc offer (video transceiver + data channel), gathered on 127.0.0.1 only."""
    import aioice.ice
    from aiortc import RTCConfiguration, RTCPeerConnection

    original = aioice.ice.get_host_addresses
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: [LOOPBACK_V4] if use_ipv4 else []
    try:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # explicit []: None adds a public STUN server
        try:
            pc.addTransceiver("video", direction="sendrecv")
            pc.createDataChannel("control")
            await pc.setLocalDescription(await pc.createOffer())
            return pc.localDescription.sdp
        finally:
            await pc.close()
    finally:
        aioice.ice.get_host_addresses = original


def normalise_offer(sdp: str, sink: int) -> str:
    """Fixed ids and credentials (so every run sends the same bytes) and loopback-only addresses."""
    out: list[str] = []
    ssrcs: dict[str, str] = {}
    for line in sdp.splitlines():
        if line.startswith("o="):
            line = f"o=- 1000 1000 IN IP4 {LOOPBACK_V4}"
        elif line.startswith("m="):
            kind, _port, rest = line[2:].split(" ", 2)
            line = f"m={kind} {sink} {rest}"
        elif line.startswith("c="):
            line = f"c=IN IP4 {LOOPBACK_V4}"
        elif line.startswith("a=rtcp:"):
            line = f"a=rtcp:{sink} IN IP4 {LOOPBACK_V4}"
        elif line.startswith("a=candidate:"):
            parts = line[len("a=candidate:") :].split()
            parts[0], parts[4], parts[5] = "1", LOOPBACK_V4, str(sink)
            line = "a=candidate:" + " ".join(parts[:8])  # foundation comp transport prio addr port typ host
        elif line.startswith("a=msid:"):
            line = "a=msid:fuzz-stream fuzz-track"
        elif line.startswith(("a=ssrc:", "a=ssrc-group:")):
            for number in re.findall(r"\b\d{5,}\b", line):
                ssrcs.setdefault(number, str(1_000_000_000 + 111_111_111 * (len(ssrcs) + 1)))
                line = line.replace(number, ssrcs[number])
            line = re.sub(r"cname:\S+", "cname:fuzz", line)
        elif line.startswith("a=ice-ufrag:"):
            line = "a=ice-ufrag:fuzz"
        elif line.startswith("a=ice-pwd:"):
            line = "a=ice-pwd:fuzzfuzzfuzzfuzzfuzz22"
        elif line.startswith("a=fingerprint:"):
            algorithm, value = line[len("a=fingerprint:") :].split(" ", 1)
            line = f"a=fingerprint:{algorithm} " + ":".join(["AB"] * len(value.split(":")))
        out.append(line)
    return "\r\n".join(out) + "\r\n"


@pytest.fixture(scope="module")
def template(sink_port: int) -> str:
    # asyncio.run in a thread of its own: no event loop of pytest-asyncio is disturbed.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        raw = pool.submit(asyncio.run, _aiortc_offer()).result(timeout=60)
    text = normalise_offer(raw, sink_port)
    check_loopback_only(text.encode())
    kinds = [line.split()[0] for line in text.splitlines() if line.startswith("m=")]
    assert kinds == ["m=video", "m=application"], f"unexpected aiortc offer layout:\n{text}"
    assert f"{LOOPBACK_V4} {sink_port} typ host" in text
    return text


# --- the network rule, enforced on every body before it is sent -----------------------------------------

_IPV4 = re.compile(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.])")
_LINE_BREAKS = re.compile("[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def check_loopback_only(body: bytes | str) -> None:
    """Fail (before sending) if a body names any address but loopback, a .local name, or a host name
    in a candidate: the server would send ICE checks or mDNS queries to it."""
    texts = [body] if isinstance(body, str) else [body.decode("latin-1"), body.decode("utf-8", "replace")]
    try:  # a JSON offer: its SDP string, unescaped
        document = json.loads(body)
    except (ValueError, RecursionError):
        document = None
    if isinstance(document, dict) and isinstance(document.get("sdp"), str):
        texts.append(document["sdp"])
    for text in texts:
        text = text.replace("\\r", "\n").replace("\\n", "\n")  # escaped line breaks break lines too
        for address in _IPV4.findall(text):
            assert address == LOOPBACK_V4, f"test bug: a body names {address}"
        assert ".local" not in text.lower(), "test bug: a body names an mDNS host"
        for line in _LINE_BREAKS.split(text):
            if "candidate" in line:
                tokens = line.split()
                if len(tokens) > 4:
                    assert tokens[4] in (LOOPBACK_V4, LOOPBACK_V6), f"test bug: candidate address {tokens[4]!r}"
            if re.match(r"\s*(c=|a=rtcp:)", line) and "IP6" in line:
                assert line.split()[-1] == LOOPBACK_V6, f"test bug: {line!r}"


# --- SDP mutations ----------------------------------------------------------------------------------


class Offer:
    """The template split into its session part and its media sections, to rebuild variants from."""

    def __init__(self, text: str) -> None:
        lines = text.rstrip("\r\n").split("\r\n")
        starts = [i for i, line in enumerate(lines) if line.startswith("m=")]
        self.lines = lines
        self.session = lines[: starts[0]]
        self.video = lines[starts[0] : starts[1]]
        self.app = lines[starts[1] :]

    @staticmethod
    def join(lines: list[str], end: str = "\r\n") -> bytes:
        return (end.join(lines) + end).encode("utf-8", "surrogateescape")

    def build(self, session: list[str] | None = None, *sections: list[str]) -> bytes:
        parts = list(self.session if session is None else session)
        for section in sections or (self.video, self.app):
            parts += section
        return self.join(parts)

    def edit(self, predicate: Callable[[str], bool], replace: Callable[[str], str | None], sections: str = "va") -> bytes:
        """Every matching line replaced (None drops it), in the chosen sections (v, a, s)."""

        def apply(lines: list[str], on: bool) -> list[str]:
            out = []
            for line in lines:
                if on and predicate(line):
                    new = replace(line)
                    if new is not None:
                        out.append(new)
                else:
                    out.append(line)
            return out

        return self.build(apply(self.session, "s" in sections), apply(self.video, "v" in sections), apply(self.app, "a" in sections))

    def video_only(self, video: list[str]) -> bytes:
        session = [("a=group:BUNDLE 0" if line.startswith("a=group:") else line) for line in self.session]
        return self.build(session, video)


def _starts(*prefixes: str) -> Callable[[str], bool]:
    return lambda line: line.startswith(prefixes)


def _set(value: str) -> Callable[[str], str]:
    return lambda _line: value


def _drop(_line: str) -> None:
    return None


NO_VIDEO = {400}  # the doc: 400 invalid_sdp for "not SDP, or no video in it"
TOO_LARGE = {413}


def sdp_mutations(text: str, rng: random.Random) -> list[tuple[str, bytes, set[int] | None]]:
    """(label, body, expected statuses or None for "any documented answer") for the offer endpoints."""
    o = Offer(text)
    sink = o.video[0].split()[1]
    cases: list[tuple[str, bytes, set[int] | None]] = []

    def add(label: str, body: bytes, expect: set[int] | None = None) -> None:
        cases.append((label, body, expect))

    add("baseline", o.build(), {200, 201})
    add("lf-line-endings", o.join(o.lines, "\n"), None)
    add("cr-line-endings", o.join(o.lines, "\r"), None)
    add("no-final-crlf", o.build().rstrip(b"\r\n"), None)
    add("leading-blank-lines", b"\r\n\r\n" + o.build(), None)
    add("leading-spaces", b"   " + o.build(), None)
    add("utf8-bom", b"\xef\xbb\xbf" + o.build(), None)
    add("trailing-spaces-on-lines", o.join([line + "   " for line in o.lines]), None)
    add("empty", b"", {400})
    add("crlf-only", b"\r\n", {400})
    add("v-line-only", b"v=0\r\n", {400})
    add("whitespace-only", b" \t \r\n \r\n", {400})
    add("v-line-repeated", b"v=0\r\n" * 2000, {400})
    add("random-bytes", rng.randbytes(512), {400})
    add("nul-bytes", b"\x00" * 256, {400})
    add("json-instead-of-sdp", json.dumps({"type": "offer", "sdp": text}).encode(), {400})

    # Encoding: NULs, bytes that are not UTF-8, other scripts.
    add("nul-inside-rtpmap", o.edit(_starts("a=rtpmap:97"), lambda line: line.replace("VP8", "VP\x008")))
    add("nul-inside-ufrag", o.edit(_starts("a=ice-ufrag:"), lambda line: line + "\x00\x00"))
    add("nul-line", o.build(o.session + ["\x00" * 40]))
    add("non-utf8-session-name", o.build([("s=\udcff\udcfe\udc80" if line.startswith("s=") else line) for line in o.session]))
    add("non-utf8-in-fingerprint", o.edit(_starts("a=fingerprint:sha-256"), lambda line: line[:-2] + "\udcff\udcc3"))
    add("non-utf8-in-rtpmap", o.edit(_starts("a=rtpmap:97"), lambda line: line.replace("VP8", "VP\udce98")))
    add("multibyte-mid", o.edit(_starts("a=mid:0"), _set("a=mid:\u00fc\u6f22\U0001f600")))
    add("control-characters", o.edit(_starts("s="), _set("s=\x01\x02\x1b[31m\x7f"), "s"))
    add("uppercase-v", o.join(["V=0"] + o.lines[1:]), None)
    add("version-1", o.join(["v=1"] + o.lines[1:]), None)
    add("no-v-line", o.join(o.lines[1:]), None)

    # Size: long lines, many lines, at and over the 64 KiB limit.
    base = o.build()
    add("long-attribute-line", o.build(o.session + ["a=x-long:" + "A" * 60_000]), None)
    add("long-fingerprint", o.edit(_starts("a=fingerprint:sha-256"), lambda line: line + ":AB" * 10_000, "v"), None)
    add("long-mid", o.edit(_starts("a=mid:0"), _set("a=mid:" + "m" * 20_000)), None)
    add("long-ufrag", o.edit(_starts("a=ice-ufrag:"), _set("a=ice-ufrag:" + "u" * 5_000)), None)
    add("many-lines", o.build(o.session + ["a=x-n:%d" % i for i in range(5_000)]), None)
    add("many-candidates", o.edit(_starts("a=candidate:"), lambda line: "\r\n".join(
        line.replace("a=candidate:1 ", f"a=candidate:{i} ", 1).replace(" 2130706431 ", f" {2130706431 - i} ") for i in range(200)
    ), "v"), None)
    add("many-rtpmaps", o.edit(_starts("m=video"), lambda line: line + "".join(f" {pt}" for pt in range(35, 65)), "v") , None)
    add("many-sections", o.build(None, o.video, *[
        [line.replace("a=mid:0", f"a=mid:{k}") for line in o.video] for k in range(2, 40)
    ], o.app), None)

    def padded(size: int) -> bytes:
        filler = size - len(base) - len("a=x-pad:\r\n")
        return base + b"a=x-pad:" + b"p" * filler + b"\r\n"

    add("exactly-64KiB", padded(MAX_SDP_BYTES), None)
    add("64KiB-plus-1", padded(MAX_SDP_BYTES + 1), TOO_LARGE)
    add("1MiB", padded(1024 * 1024), TOO_LARGE)

    # Media sections of other kinds.
    audio_vp8 = [line.replace("m=video", "m=audio", 1) for line in o.video]
    add("audio-only-with-vp8", o.video_only(audio_vp8), NO_VIDEO)
    add("audio-with-vp8-and-datachannel", o.build(None, audio_vp8, o.app), NO_VIDEO)
    opus = [f"m=audio {sink} UDP/TLS/RTP/SAVPF 111"] + [
        line for line in o.video[1:]
        if not line.startswith(("a=rtpmap", "a=fmtp", "a=rtcp-fb", "a=ssrc", "a=extmap", "a=msid"))
    ] + ["a=rtpmap:111 opus/48000/2", "a=fmtp:111 minptime=10;useinbandfec=1"]
    add("audio-only-with-opus", o.video_only(opus), NO_VIDEO)
    add("audio-opus-and-datachannel", o.build(None, opus, o.app), NO_VIDEO)
    app_only = [line.replace("a=mid:1", "a=mid:0") for line in o.app]
    add("application-only", o.video_only(app_only), NO_VIDEO)
    add("text-kind", o.video_only([line.replace("m=video", "m=text", 1) for line in o.video]), NO_VIDEO)
    add("message-kind-with-video-codecs", o.build(None, [line.replace("m=video", "m=message", 1) for line in o.video], o.app), NO_VIDEO)
    add("no-media-sections", o.build(o.session, []), NO_VIDEO)
    add("two-video-sections", o.build(
        [("a=group:BUNDLE 0 2 1" if line.startswith("a=group:") else line) for line in o.session],
        o.video, [line.replace("a=mid:0", "a=mid:2") for line in o.video], o.app,
    ))
    add("duplicate-mid", o.build(None, o.video, [line.replace("a=mid:1", "a=mid:0") for line in o.app]))
    add("bundle-unknown-mid", o.edit(_starts("a=group:"), _set("a=group:BUNDLE 0 1 7"), "s"))
    add("bundle-garbage", o.edit(_starts("a=group:"), _set("a=group:BUNDLE"), "s"))
    add("no-bundle-group", o.edit(_starts("a=group:"), _drop, "s"))
    add("application-before-video", o.build(None, o.app, o.video))

    # Codecs and payload types.
    add("video-unknown-codecs", o.edit(_starts("a=rtpmap:"), lambda line: re.sub(r" \S+/", " XYZ-CODEC/", line)), NO_VIDEO)
    add("video-no-rtpmap", o.edit(_starts("a=rtpmap:", "a=fmtp:", "a=rtcp-fb:"), _drop))
    add("video-only-rtx", o.edit(lambda line: line.startswith("a=rtpmap:") and "rtx" not in line, _drop))
    add("video-static-pt-0", o.edit(_starts("m=video"), _set(f"m=video {sink} UDP/TLS/RTP/SAVPF 0"), "v"))
    for label, pts in (("pt-999", "999"), ("pt-128", "128"), ("pt-negative", "-5"), ("pt-text", "vp8"),
                       ("pt-huge", "99999999999999999999"), ("no-payload-types", "")):
        add(f"video-{label}", o.edit(_starts("m=video"), _set(f"m=video {sink} UDP/TLS/RTP/SAVPF {pts}".rstrip()), "v"))
    add("rtpmap-pt-999", o.edit(_starts("a=rtpmap:97"), _set("a=rtpmap:999 VP8/90000")))
    for label, clock in (("zero", "0"), ("huge", "99999999999999999999"), ("text", "abc"), ("missing", ""), ("negative", "-90000")):
        add(f"clock-rate-{label}", o.edit(_starts("a=rtpmap:97"), _set(f"a=rtpmap:97 VP8/{clock}".rstrip("/"))))
    add("rtpmap-no-space", o.edit(_starts("a=rtpmap:97"), _set("a=rtpmap:97")))
    add("rtx-apt-unknown", o.edit(_starts("a=fmtp:98"), _set("a=fmtp:98 apt=55")))
    add("rtx-apt-text", o.edit(_starts("a=fmtp:98"), _set("a=fmtp:98 apt=x")))
    add("fmtp-garbage", o.edit(_starts("a=fmtp:99"), _set("a=fmtp:99 ;;;===;profile-level-id=zz")))
    add("fmtp-pt-text", o.edit(_starts("a=fmtp:99"), _set("a=fmtp:abc packetization-mode=1")))
    add("rtcp-fb-unknown-pt", o.edit(_starts("a=rtcp-fb:97 nack"), lambda line: line + "\r\na=rtcp-fb:250 nack"))
    add("rtcp-fb-wildcard", o.edit(_starts("a=rtcp-fb:97 goog-remb"), _set("a=rtcp-fb:* ccm fir")))

    # Ports, protocols, ids and numbers.
    for label, port in (("0", "0"), ("huge", "99999999999999999999"), ("negative", "-1"), ("65536", "65536"), ("text", "port")):
        add(f"video-port-{label}", o.edit(_starts("m=video"), lambda line, port=port: line.replace(f" {sink} ", f" {port} ", 1), "v"))
    add("video-port-range", o.edit(_starts("m=video"), lambda line: line.replace(f" {sink} ", f" {sink}/2 ", 1), "v"))
    add("proto-rtp-avp", o.edit(_starts("m=video"), lambda line: line.replace("UDP/TLS/RTP/SAVPF", "RTP/AVP"), "v"))
    add("proto-garbage", o.edit(_starts("m=video"), lambda line: line.replace("UDP/TLS/RTP/SAVPF", "FOO/BAR"), "v"))
    add("m-line-truncated", o.edit(_starts("m=video"), _set("m=video"), "v"))
    add("m-line-empty", o.edit(_starts("m=video"), _set("m="), "v"))
    add("ssrc-huge", o.edit(_starts("a=ssrc:"), lambda line: re.sub(r"^a=ssrc:\d+", "a=ssrc:99999999999999999999", line)))
    add("ssrc-text", o.edit(_starts("a=ssrc:"), lambda line: re.sub(r"^a=ssrc:\d+", "a=ssrc:abc", line)))
    add("ssrc-group-garbage", o.edit(_starts("a=ssrc-group:"), _set("a=ssrc-group:FID x")))
    add("ssrc-group-unknown-ssrcs", o.edit(_starts("a=ssrc-group:"), _set("a=ssrc-group:FID 1 2 3 4")))
    add("extmap-id-0", o.edit(_starts("a=extmap:1 "), lambda line: line.replace("a=extmap:1 ", "a=extmap:0 ")))
    add("extmap-id-huge", o.edit(_starts("a=extmap:1 "), lambda line: line.replace("a=extmap:1 ", "a=extmap:99999999999999999999 ")))
    add("extmap-garbage", o.edit(_starts("a=extmap:"), _set("a=extmap:x")))
    add("msid-garbage", o.edit(_starts("a=msid:"), _set("a=msid:")))
    add("rtcp-attribute-garbage", o.edit(_starts("a=rtcp:"), _set("a=rtcp:x IN")))
    for direction in ("recvonly", "sendonly", "inactive"):
        add(f"direction-{direction}", o.edit(_starts("a=sendrecv"), _set(f"a={direction}"), "v"))
    add("two-directions", o.edit(_starts("a=sendrecv"), lambda line: line + "\r\na=inactive", "v"))
    add("sctp-port-text", o.edit(_starts("a=sctp-port:"), _set("a=sctp-port:abc"), "a"))
    add("sctp-port-huge", o.edit(_starts("a=sctp-port:"), _set("a=sctp-port:99999999999999999999"), "a"))
    add("max-message-size-negative", o.edit(_starts("a=max-message-size:"), _set("a=max-message-size:-1"), "a"))
    add("max-message-size-huge", o.edit(_starts("a=max-message-size:"), _set("a=max-message-size:99999999999999999999999"), "a"))

    # Candidates (the address stays 127.0.0.1 or ::1, always).
    def candidate(label: str, replace: Callable[[str], str | None]) -> None:
        add(f"candidate-{label}", o.edit(_starts("a=candidate:"), replace))

    candidate("port-0", lambda line: line.replace(f" {sink} typ", " 0 typ"))
    candidate("port-70000", lambda line: line.replace(f" {sink} typ", " 70000 typ"))
    candidate("port-text", lambda line: line.replace(f" {sink} typ", " port typ"))
    candidate("priority-negative", lambda line: line.replace(" 2130706431 ", " -1 "))
    candidate("priority-huge", lambda line: line.replace(" 2130706431 ", " 99999999999999999999999 "))
    candidate("component-9", lambda line: line.replace("a=candidate:1 1 ", "a=candidate:1 9 "))
    candidate("component-text", lambda line: line.replace("a=candidate:1 1 ", "a=candidate:1 x "))
    candidate("tcp", lambda line: line.replace(" udp ", " tcp ") + " tcptype passive")
    candidate("transport-unknown", lambda line: line.replace(" udp ", " sctp "))
    candidate("typ-relay-no-raddr", lambda line: line.replace("typ host", "typ relay"))
    candidate("typ-srflx-bad-raddr", lambda line: line.replace("typ host", "typ srflx raddr nowhere rport x"))
    candidate("typ-unknown", lambda line: line.replace("typ host", "typ teleport"))
    candidate("no-typ", lambda line: line.replace(" typ host", ""))
    candidate("truncated", _set("a=candidate:1 1 udp"))
    candidate("garbage", _set("a=candidate:xyz"))
    candidate("empty", _set("a=candidate:"))
    candidate("ipv6-loopback", lambda line: line.replace(f" {LOOPBACK_V4} ", f" {LOOPBACK_V6} "))
    candidate("extension-attributes", lambda line: line + " generation 0 ufrag fuzz network-id 1 network-cost 10 x y z")
    add("no-candidates", o.edit(_starts("a=candidate:", "a=end-of-candidates"), _drop))
    add("c-line-truncated", o.edit(_starts("c="), _set("c=IN IP4")))
    add("c-line-ipv6-loopback", o.edit(_starts("c="), _set(f"c=IN IP6 {LOOPBACK_V6}")))
    add("c-line-garbage", o.edit(_starts("c="), _set("c=garbage")))
    add("no-c-lines", o.edit(_starts("c="), _drop))

    # ICE and DTLS credentials.
    add("no-fingerprint", o.edit(_starts("a=fingerprint:"), _drop))
    add("fingerprint-garbled", o.edit(_starts("a=fingerprint:"), lambda line: line.split(" ")[0] + " ZZ:YY:not-hex"))
    add("fingerprint-unknown-algorithm", o.edit(_starts("a=fingerprint:"), lambda line: "a=fingerprint:md99 " + line.split(" ", 1)[1]))
    add("fingerprint-no-value", o.edit(_starts("a=fingerprint:"), lambda line: line.split(" ")[0]))
    add("fingerprint-empty", o.edit(_starts("a=fingerprint:"), _set("a=fingerprint:")))
    add("fingerprint-short", o.edit(_starts("a=fingerprint:"), lambda line: line.split(" ")[0] + " AB:CD"))
    add("fingerprint-video-only", o.edit(_starts("a=fingerprint:"), _drop, "a"))
    add("no-ice-ufrag", o.edit(_starts("a=ice-ufrag:"), _drop))
    add("ice-ufrag-empty", o.edit(_starts("a=ice-ufrag:"), _set("a=ice-ufrag:")))
    add("ice-ufrag-differs-per-section", o.edit(_starts("a=ice-ufrag:"), _set("a=ice-ufrag:other"), "a"))
    add("ice-ufrag-spaces", o.edit(_starts("a=ice-ufrag:"), _set("a=ice-ufrag:a b c")))
    add("no-ice-pwd", o.edit(_starts("a=ice-pwd:"), _drop))
    add("ice-pwd-empty", o.edit(_starts("a=ice-pwd:"), _set("a=ice-pwd:")))
    add("ice-pwd-short", o.edit(_starts("a=ice-pwd:"), _set("a=ice-pwd:x")))
    add("no-ice-credentials", o.edit(_starts("a=ice-ufrag:", "a=ice-pwd:"), _drop))
    add("ice-options-garbage", o.build(o.session + ["a=ice-options:trickle ice2 \x7f"]))
    add("ice-lite", o.build(o.session + ["a=ice-lite"]))
    add("no-setup", o.edit(_starts("a=setup:"), _drop))
    for role in ("active", "passive", "holdconn", "bogus", ""):
        add(f"setup-{role or 'empty'}", o.edit(_starts("a=setup:"), _set(f"a=setup:{role}")))
    add("credentials-at-session-level", o.build(
        o.session + [line for line in o.video if line.startswith(("a=ice-", "a=fingerprint:", "a=setup:"))],
        [line for line in o.video if not line.startswith(("a=ice-", "a=fingerprint:", "a=setup:"))],
        [line for line in o.app if not line.startswith(("a=ice-", "a=fingerprint:", "a=setup:"))],
    ))

    # Session-level lines.
    add("o-line-garbage", o.edit(_starts("o="), _set("o=garbage"), "s"))
    add("no-o-line", o.edit(_starts("o="), _drop, "s"))
    add("no-s-line", o.edit(_starts("s="), _drop, "s"))
    add("t-line-garbage", o.edit(_starts("t="), _set("t=x y"), "s"))
    add("unknown-line-types", o.build(o.session + ["z=unknown", "x=", "=novalue", "a", "a=", ":::"]))

    # Random structural mutations, seeded.
    protected = re.compile(r"candidate|^c=|IN IP")
    for _ in range(16):
        i = rng.randrange(len(o.lines))
        add(f"drop-line-{i}({o.lines[i][:18]})", o.join(o.lines[:i] + o.lines[i + 1 :]))
    for _ in range(8):
        i = rng.randrange(len(o.lines))
        add(f"duplicate-line-{i}({o.lines[i][:18]})", o.join(o.lines[: i + 1] + o.lines[i:]))
    for _ in range(8):
        i, j = rng.sample(range(len(o.lines)), 2)
        swapped = list(o.lines)
        swapped[i], swapped[j] = swapped[j], swapped[i]
        add(f"swap-lines-{i}-{j}", o.join(swapped))
    add("reversed-lines", o.join(o.lines[::-1]))
    shuffled = list(o.lines)
    rng.shuffle(shuffled)
    add("shuffled-lines", o.join(shuffled))
    for _ in range(5):
        cut = rng.randrange(1, len(base))
        add(f"truncated-at-{cut}", base[:cut])
    for round_ in range(8):
        lines = [line.encode("utf-8", "surrogateescape") for line in o.lines]
        for _ in range(6):
            i = rng.randrange(len(lines))
            if protected.search(o.lines[i]) or not lines[i]:
                continue
            position = rng.randrange(len(lines[i]))
            lines[i] = lines[i][:position] + bytes([rng.randrange(256)]) + lines[i][position + 1 :]
        add(f"byte-flips-{round_}", b"\r\n".join(lines) + b"\r\n")
    return cases


# --- the client that sends, checks and records ------------------------------------------------------


def _excerpt(data: bytes | str, limit: int = 160) -> str:
    text = data if isinstance(data, str) else data.decode("utf-8", "replace")
    return repr(text[:limit]) + (f"... ({len(data)} bytes)" if len(data) > limit else "")


def documented_codes() -> set[str]:
    return set(re.findall(r"`([a-z][a-z0-9_]*)`", PROTOCOL_DOC.read_text()))


class Fuzz:
    """Sends requests, checks every answer against the general rules, and keeps what went wrong."""

    def __init__(self, server: ServerProcess, template: str) -> None:
        self.server = server
        self.journal: list[str] = []  # every answer, one line each, written to artifacts/ at the end
        self.template = template
        self.problems: list[str] = []
        self.codes: dict[str, str] = {}  # error code → the first request that got it
        self.sent = 0  # fuzz requests (not counting /v1/info and /healthz polls)
        self.polls = 0
        self.slots_stuck = False
        self.accepted: list[str] = []
        self.started = time.monotonic()

    def client(self) -> httpx.AsyncClient:
        # A new connection per request: an answer that ends its connection cannot spoil the next request.
        limits = httpx.Limits(max_keepalive_connections=0)
        return httpx.AsyncClient(base_url=self.server.base_url, timeout=REQUEST_TIMEOUT_S, limits=limits)

    def problem(self, text: str) -> None:
        self.problems.append(text)

    async def info(self, http: httpx.AsyncClient) -> dict[str, Any]:
        self.polls += 1
        return (await http.get("/v1/info")).json()

    async def wait_for_slot(self, http: httpx.AsyncClient, label: str) -> None:
        if self.slots_stuck:
            return
        deadline = time.monotonic() + SLOT_WAIT_S
        while time.monotonic() < deadline:
            info = await self.info(http)
            if info["slots_free"] > 0:
                return
            await asyncio.sleep(0.2)
        self.slots_stuck = True
        self.problem(
            f"[{label}] no slot came free within {SLOT_WAIT_S:.0f} s (sessions={info['sessions']}, "
            f"slots_free={info['slots_free']}): sessions whose peer never connects must be closed after "
            f"STREAMCANVAS_WEBRTC_CONNECT_TIMEOUT_S={CONNECT_TIMEOUT_S:g} (or a session leaked: see 'left a "
            f"session behind' above); the last accepted offers were {self.accepted[-SLOTS:]}. "
            "The rest of this run may see 503 busy."
        )

    @staticmethod
    def describe(method: str, path: str, params: Any, headers: Any, body: bytes) -> str:
        query = ("?" + str(httpx.QueryParams(params)))[:120] if params else ""
        shown = {}
        for name, value in (headers.items() if isinstance(headers, dict) else headers or []):
            value = value.decode("latin-1") if isinstance(value, bytes) else value
            shown[name] = value if len(value) <= 60 else value[:57] + "..."
        return f"{method} {path[:120]}{query} headers={shown} body={_excerpt(body, 100)}"

    async def request(
        self,
        http: httpx.AsyncClient,
        label: str,
        method: str,
        path: str,
        *,
        body: bytes = b"",
        headers: Any = None,
        params: Any = None,
        expect: set[int] | None = None,
        opens_session: bool = False,
        offer: bool = False,
    ) -> httpx.Response | None:
        """One request; `opens_session`: the endpoint takes a slot (busy → wait once and retry, and no
        session may be left behind unless the answer is a /v1/webrtc/offer 200)."""
        if body:
            check_loopback_only(body)
        description = self.describe(method, path, params, headers, body)
        before = None
        for attempt in (1, 2):
            if opens_session:
                before = await self.info(http)
                if before["slots_free"] == 0:
                    await self.wait_for_slot(http, label)
                    before = await self.info(http)
            try:
                response = await http.request(method, path, content=body or None, headers=headers, params=params)
            except httpx.HTTPError as error:
                self.sent += 1
                self.problem(f"[{label}] {description} → no answer ({type(error).__name__}: {error})")
                return None
            self.sent += 1
            if opens_session and attempt == 1 and self._code(response) == "busy" and not self.slots_stuck:
                await self.wait_for_slot(http, label)
                continue
            break
        self.check(label, description, response, expect, offer)
        if 200 <= response.status_code < 300 and offer:
            self.accepted.append(label)
            location = response.headers.get("location")
            if location:
                # 404 when the server has already closed it (its ICE failed at once, or the connect timeout).
                await self.request(http, f"{label}/delete", "DELETE", location, expect={200, 404})
        if opens_session and before is not None:
            after = await self.info(http)
            allowed = 1 if (path == "/v1/webrtc/offer" and response.status_code == 200) else 0
            if after["sessions"] > before["sessions"] + allowed:
                self.problem(
                    f"[{label}] {description} → {response.status_code} {_excerpt(response.content)}: "
                    f"left a session behind (sessions {before['sessions']} → {after['sessions']}, "
                    f"slots_free {before['slots_free']} → {after['slots_free']})"
                )
        return response

    @staticmethod
    def _code(response: httpx.Response) -> str | None:
        try:
            document = response.json()
        except ValueError:
            return None
        return document.get("error") if isinstance(document, dict) else None

    def check(self, label: str, description: str, response: httpx.Response, expect: set[int] | None, offer: bool) -> None:
        status = response.status_code
        seen = f"[{label}] {description} → {status} {_excerpt(response.content)}"
        self.journal.append(f"{time.monotonic() - self.started:7.2f}s {status} {label}: {_excerpt(response.content, 100)}")
        code = None
        issues = []
        if status >= 500 and not (status == 503 and self._code(response) in ("busy", "too_many_viewers")):
            issues.append("a server error")
        if status >= 400:
            try:
                document = response.json()
            except ValueError:
                document = None
            if isinstance(document, dict) and isinstance(document.get("error"), str) and isinstance(document.get("message"), str):
                code = document["error"]
                self.codes.setdefault(code, seen)
            else:
                issues.append("the error answer is not JSON with string 'error' and 'message'")
        if expect is not None and status not in expect and not (status == 503 and code == "busy"):
            issues.append(f"expected {'/'.join(map(str, sorted(expect)))}")
        if issues:
            self.problem(f"{seen}: {'; '.join(issues)}")
        if offer and 200 <= status < 300:
            self._check_answer(seen, response)

    def _check_answer(self, seen: str, response: httpx.Response) -> None:
        if response.request.url.path == "/v1/webrtc/offer":
            try:
                document = response.json()
            except ValueError:
                self.problem(f"{seen}: a 2xx answer to an offer that is not JSON")
                return
            sdp = document.get("sdp") if isinstance(document, dict) else None
            if not (isinstance(document, dict) and document.get("type") == "answer" and isinstance(document.get("session_id"), str)):
                self.problem(f"{seen}: the 200 answer lacks type 'answer' or a session_id")
        else:
            sdp = response.text
            if not response.headers.get("content-type", "").startswith("application/sdp"):
                self.problem(f"{seen}: a 201 answer that is not application/sdp")
            location = response.headers.get("location", "")
            kind = "whip" if response.request.url.path == "/v1/whip" else "whep"
            if response.status_code != 201 or not location.startswith(f"/v1/{kind}/"):
                self.problem(f"{seen}: expected 201 with a Location /v1/{kind}/...")
        if not (isinstance(sdp, str) and sdp.startswith("v=0")):
            self.problem(f"{seen}: a 2xx answer to an offer that is not an SDP answer")
            return
        addresses = {line.split()[4] for line in sdp.splitlines() if line.startswith("a=candidate:") and len(line.split()) > 4}
        if addresses - {LOOPBACK_V4}:
            self.problem(f"{seen}: the answer offers candidates on {sorted(addresses)}, not only --ice-host-address 127.0.0.1")

    def report(self, since: int = 0) -> str:
        problems = self.problems[since:]
        return f"{len(problems)} problem(s):\n" + "\n".join(f"- {text}" for text in problems)


@pytest.fixture(scope="module")
def fuzz_server(cache_dir: Path, artifacts_dir: Path) -> Iterator[ServerProcess]:
    server = start_server(
        cache_dir, artifacts_dir, "signalling-fuzz", "--slots", str(SLOTS), "--ice-host-address", LOOPBACK_V4,
        env={"STREAMCANVAS_WEBRTC_CONNECT_TIMEOUT_S": f"{CONNECT_TIMEOUT_S:g}"},
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fuzz(fuzz_server: ServerProcess, template: str, artifacts_dir: Path) -> Iterator[Fuzz]:
    fuzz = Fuzz(fuzz_server, template)
    yield fuzz
    journal = [f"{fuzz.sent} requests, {fuzz.polls} polls of /v1/info", *fuzz.journal, "", "problems:", *fuzz.problems]
    (artifacts_dir / "signalling-fuzz.txt").write_text("\n".join(journal) + "\n")


@pytest.fixture(scope="module")
def mutations(template: str) -> list[tuple[str, bytes, set[int] | None]]:
    return sdp_mutations(template, random.Random(SEED))


# --- WHEP: viewers of a live session ---------------------------------------------------------------


def _forged_token(claims: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


async def test_whep_answers_every_offer_and_token_variant_as_documented(
    fuzz: Fuzz, mutations: list[tuple[str, bytes, set[int] | None]]
) -> None:
    mark = len(fuzz.problems)
    rng = random.Random(SEED + 1)
    async with fuzz.client() as http:
        await fuzz.wait_for_slot(http, "whep-setup")
        async with Client.connect(fuzz.server.ws_url) as one, Client.connect(fuzz.server.ws_url) as other:
            ready = await one.hello()
            other_ready = await other.hello()
            path = f"/v1/sessions/{ready['session_id']}/whep"
            viewer = {"authorization": f"Bearer {ready['viewer_token']}"}

            async def whep(
                label: str, body: bytes, headers: Any = None, expect: set[int] | None = None, where: str = path, params: Any = None
            ) -> None:
                headers = {**SDP, **viewer} if headers is None else headers
                await fuzz.request(
                    http, f"whep/{label}", "POST", where, body=body, headers=headers, params=params, expect=expect, offer=True
                )

            # The SDP corpus, a seeded sample of it (viewers take no slot; each accepted one is DELETEd).
            valid = fuzz.template.encode()
            chosen = [case for case in mutations if case[0] == "baseline"] + rng.sample(mutations, 45)
            for label, body, expect in chosen:
                await whep(label, body, expect=expect)
            recvonly = valid.replace(b"a=sendrecv", b"a=recvonly")
            await whep("recvonly-baseline", recvonly, expect={201})

            # Content types.
            for label, content_type, expect in (
                ("no-content-type", None, {415}),
                ("text-plain", "text/plain", {415}),
                ("json", "application/json", {415}),
                ("form", "application/x-www-form-urlencoded", {415}),
                ("sdp-with-charset", "application/sdp; charset=utf-8", {201}),
                ("sdp-uppercase", "APPLICATION/SDP", None),
                ("sdp-prefix-of-other", "application/sdpx", None),
                ("garbage", "garbage/;;;=", {415}),
            ):
                headers = {**viewer, **({"content-type": content_type} if content_type is not None else {})}
                await whep(f"content-type-{label}", valid, headers=headers, expect=expect)

            # Authorization variants.
            forged = _forged_token({"sub": ready["session_id"], "role": "viewer", "exp": 4_102_444_800})
            for label, headers, params, expect in (
                ("none", SDP, None, {401}),
                ("empty", {**SDP, "authorization": ""}, None, {401}),
                ("bearer-no-token", {**SDP, "authorization": "Bearer"}, None, {401}),
                ("garbage", {**SDP, "authorization": "Bearer not.a.jwt"}, None, {401}),
                ("basic-scheme", {**SDP, "authorization": "Basic " + base64.b64encode(b"user:pass").decode()}, None, {401}),
                ("token-without-scheme", {**SDP, "authorization": ready["viewer_token"]}, None, {401}),
                ("lowercase-scheme", {**SDP, "authorization": f"bearer {ready['viewer_token']}"}, None, {201}),
                ("extra-spaces", {**SDP, "authorization": f"Bearer   {ready['viewer_token']}"}, None, {201}),
                ("token-plus-junk", {**SDP, "authorization": f"Bearer {ready['viewer_token']} junk"}, None, {401}),
                ("tampered-signature", {**SDP, "authorization": f"Bearer {ready['viewer_token'][:-4]}AAAA"}, None, {401}),
                ("alg-none", {**SDP, "authorization": f"Bearer {forged}"}, None, {401}),
                ("another-sessions-viewer-token", {**SDP, "authorization": f"Bearer {other_ready['viewer_token']}"}, None, {403}),
                ("another-sessions-control-token", {**SDP, "authorization": f"Bearer {other_ready['token']}"}, None, {403}),
                ("control-token", {**SDP, "authorization": f"Bearer {ready['token']}"}, None, {201}),
                ("query-token", SDP, {"token": ready["viewer_token"]}, {201}),
                ("query-token-of-another-session", SDP, {"token": other_ready["viewer_token"]}, {403}),
                ("very-long-token", {**SDP, "authorization": "Bearer " + "a" * 6000}, None, {401}),
                ("non-ascii-token", {**SDP, "authorization": b"Bearer \xff\xfe\xe9t\xe9"}, None, {401}),
                ("two-headers", [("content-type", "application/sdp"), ("authorization", "Bearer junk"),
                                 ("authorization", f"Bearer {ready['viewer_token']}")], None, None),
            ):
                await whep(f"auth-{label}", valid, headers=headers, params=params, expect=expect)

            # Session ids that do not exist or are not ids at all.
            for label, session_id in (
                ("unknown", "0" * 32), ("other-case", ready["session_id"].upper()), ("nul", "%00"), ("non-utf8", "%FF%FE"),
                ("dot-dot", "..%2F..%2Fhealthz"), ("very-long", "s" * 4000), ("spaces", "a%20b"),
            ):
                await whep(f"session-{label}", valid, where=f"/v1/sessions/{session_id}/whep", expect={404})
            await whep("session-of-other-with-its-token", valid, where=f"/v1/sessions/{other_ready['session_id']}/whep",
                       headers={**SDP, "authorization": f"Bearer {other_ready['viewer_token']}"}, expect={201})
    assert len(fuzz.problems) == mark, fuzz.report(mark)


# --- WHIP/WHEP resources: DELETE, PATCH, OPTIONS --------------------------------------------------


async def test_resource_methods_on_unknown_malformed_and_live_resources(fuzz: Fuzz) -> None:
    mark = len(fuzz.problems)
    async with fuzz.client() as http:
        ids = {
            "unknown-hex": "0123456789abcdef0123456789abcdef",
            "short": "0123",
            "empty-looking": "%20",
            "nul": "%00",
            "non-utf8": "%FF%FE",
            "dot-dot": "..%2F..%2Fv1%2Finfo",
            "very-long": "f" * 4000,
            "unicode": "%E6%BC%A2%F0%9F%98%80",
            "query-like": "x%3Fa%3Db",
        }
        for kind in ("whip", "whep"):
            for label, resource_id in ids.items():
                for method in ("DELETE", "PATCH", "OPTIONS"):
                    body = b"a=ice-ufrag:x\r\na=ice-pwd:y\r\n" if method == "PATCH" else b""
                    headers = {"content-type": "application/trickle-ice-sdpfrag"} if method == "PATCH" else None
                    await fuzz.request(http, f"{method.lower()}-{kind}-{label}", method, f"/v1/{kind}/{resource_id}",
                                       body=body, headers=headers, expect=None if method == "OPTIONS" else {404})
        for method in ("DELETE", "PATCH", "OPTIONS"):
            await fuzz.request(http, f"{method.lower()}-unknown-kind", method, "/v1/whop/0123456789abcdef", expect=None)
            await fuzz.request(http, f"{method.lower()}-nested-id", method, "/v1/whip/abc/def", expect=None)
        # Wrong methods on the endpoints themselves (WHIP clients send OPTIONS first, for CORS and ICE servers).
        for method, path in (("OPTIONS", "/v1/whip"), ("GET", "/v1/whip"), ("PUT", "/v1/whip"), ("GET", "/v1/webrtc/offer"),
                             ("OPTIONS", "/v1/webrtc/offer"), ("GET", "/v1/sessions/x/whep"), ("DELETE", "/v1/webrtc/offer")):
            await fuzz.request(http, f"{method.lower()}-{path}", method, path, expect=None)

        # A live WHIP resource: PATCH is refused as documented, the wrong kind does not find it, DELETE ends it once.
        response = await http.post("/v1/whip", content=fuzz.template, headers=SDP)
        fuzz.sent += 1
        fuzz.check("live-whip", "POST /v1/whip (the valid offer)", response, {201}, offer=True)
        location = response.headers.get("location", "")
        if response.status_code == 201 and location.startswith("/v1/whip/"):
            resource_id = location.rsplit("/", 1)[1]
            patch = await fuzz.request(http, "patch-live", "PATCH", location, body=b"a=ice-ufrag:x\r\na=ice-pwd:y\r\n",
                                       headers={"content-type": "application/trickle-ice-sdpfrag"}, expect={405})
            if patch is not None and "DELETE" not in patch.headers.get("allow", ""):
                fuzz.problem(f"[patch-live] PATCH {location} → 405 without 'Allow: DELETE' ({dict(patch.headers)})")
            await fuzz.request(http, "options-live", "OPTIONS", location, expect=None)
            await fuzz.request(http, "delete-live-as-whep", "DELETE", f"/v1/whep/{resource_id}", expect={404})
            await fuzz.request(http, "delete-live", "DELETE", location, expect={200})
            await fuzz.request(http, "delete-live-again", "DELETE", location, expect={404})
            await fuzz.request(http, "patch-after-delete", "PATCH", location, body=b"a=ice-ufrag:x\r\n",
                               headers={"content-type": "application/trickle-ice-sdpfrag"}, expect={404})
        info = await fuzz.info(http)
        if info["sessions"] != 0:
            fuzz.problem(f"[resources] sessions={info['sessions']} after the live WHIP resource was deleted")
    assert len(fuzz.problems) == mark, fuzz.report(mark)


# --- Content-Length that lies, and bodies without one -------------------------------------------------


async def _raw_exchange(port: int, head: bytes, body: bytes, wait: float) -> tuple[int, dict[str, str], bytes] | None:
    """Send bytes as they are; the parsed answer, or None when none came within `wait` seconds."""
    reader, writer = await asyncio.open_connection(LOOPBACK_V4, port)
    try:
        writer.write(head + body)
        await writer.drain()
        try:
            raw = await asyncio.wait_for(_read_response(reader), wait)
        except asyncio.TimeoutError:
            return None
        return raw
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 2)
        except (asyncio.TimeoutError, OSError):
            pass


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    else:
        body = await reader.read()
    return status, headers, body


class _RawAnswer:
    """A raw answer dressed as enough of an httpx.Response for Fuzz.check."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes, path: str) -> None:
        self.status_code = status
        self.headers = httpx.Headers(headers)
        self.content = body
        self.text = body.decode("utf-8", "replace")
        self.request = httpx.Request("POST", f"http://{LOOPBACK_V4}{path}")

    def json(self) -> Any:
        return json.loads(self.content)


async def test_lying_content_length_and_chunked_bodies(fuzz: Fuzz) -> None:
    mark = len(fuzz.problems)
    port = fuzz.server.port
    offer = fuzz.template.encode()
    check_loopback_only(offer)

    def head(path: str, content_type: str, length: int | str, close: bool = True) -> bytes:
        lines = [f"POST {path} HTTP/1.1", f"Host: {LOOPBACK_V4}:{port}", f"Content-Type: {content_type}",
                 f"Content-Length: {length}"] + (["Connection: close"] if close else [])
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    async with fuzz.client() as http:
        # Declares more than it sends, then stalls: no answer is due, but the server must shrug it off
        # when the client goes away (no traceback, no session; checked at the end).
        for path, content_type in (("/v1/whip", "application/sdp"), ("/v1/webrtc/offer", "application/json")):
            fuzz.sent += 1
            answer = await _raw_exchange(port, head(path, content_type, len(offer) + 500), offer[:200], wait=1.5)
            if answer is not None:
                fuzz.check(f"short-body{path}", f"POST {path} Content-Length {len(offer) + 500}, {200} bytes sent",
                           _RawAnswer(*answer, path), None, offer=False)  # type: ignore[arg-type]

        # Declares more than the 64 KiB limit: the documented 413 is due at once, before any body is read.
        for path, content_type in (("/v1/whip", "application/sdp"), ("/v1/webrtc/offer", "application/json")):
            fuzz.sent += 1
            seen = f"POST {path} Content-Length: 10000000, 200 bytes sent, then nothing"
            answer = await _raw_exchange(port, head(path, content_type, 10_000_000), offer[:200], wait=3.0)
            if answer is None:
                fuzz.problem(f"[declared-10MB{path}] {seen} → no answer in 3 s: a declared body over {MAX_SDP_BYTES} bytes should get 413 "
                             "without the server waiting for (and buffering) it")
            else:
                fuzz.check(f"declared-10MB{path}", seen, _RawAnswer(*answer, path), TOO_LARGE, offer=False)  # type: ignore[arg-type]

        # Declares less than it sends: the server reads the declared bytes only.
        document = json.dumps({"type": "offer", "sdp": fuzz.template, "hello": HELLO}).encode()
        for label, path, content_type, body, length, expect in (
            ("offer-json-cut-at-5", "/v1/webrtc/offer", "application/json", document, 5, {400}),
            ("whip-sdp-cut-at-40", "/v1/whip", "application/sdp", offer, 40, {400}),
            ("whip-zero-length", "/v1/whip", "application/sdp", offer, 0, {400}),
        ):
            before = await fuzz.info(http)
            fuzz.sent += 1
            seen = f"POST {path} Content-Length: {length} with {len(body)} bytes sent, Connection: close"
            answer = await _raw_exchange(port, head(path, content_type, length), body, wait=REQUEST_TIMEOUT_S)
            if answer is None:
                fuzz.problem(f"[{label}] {seen} → no answer in {REQUEST_TIMEOUT_S:g} s")
                continue
            raw = _RawAnswer(*answer, path)
            fuzz.check(label, seen, raw, expect, offer=True)  # type: ignore[arg-type]
            if 200 <= raw.status_code < 300 and raw.headers.get("location"):
                await fuzz.request(http, f"{label}/delete", "DELETE", raw.headers["location"], expect={200, 404})
            after = await fuzz.info(http)
            if raw.status_code >= 400 and after["sessions"] > before["sessions"]:
                fuzz.problem(f"[{label}] {seen} → {raw.status_code}: left a session behind")

        # Chunked bodies (no Content-Length at all): the same limit, the same answers.
        async def chunks(data: bytes, size: int = 4096):  # type: ignore[no-untyped-def]
            for start in range(0, len(data), size):
                yield data[start : start + size]

        big = offer + b"a=x-pad:" + b"p" * (MAX_SDP_BYTES + 100) + b"\r\n"
        big_json = b'{"type": "offer", "sdp": "' + b"v" * (MAX_SDP_BYTES + 10) + b'"}'
        for label, path, content_type, data, expect, opens in (
            ("chunked-valid-whip", "/v1/whip", "application/sdp", offer, {201}, True),
            ("chunked-over-64KiB-whip", "/v1/whip", "application/sdp", big, TOO_LARGE, False),
            ("chunked-over-64KiB-offer", "/v1/webrtc/offer", "application/json", big_json, TOO_LARGE, False),
        ):
            if opens:
                await fuzz.wait_for_slot(http, label)
            try:
                response = await http.post(path, content=chunks(data), headers={"content-type": content_type})
            except httpx.HTTPError as error:
                fuzz.problem(f"[{label}] POST {path} chunked {len(data)} bytes → no answer ({type(error).__name__}: {error})")
                continue
            finally:
                fuzz.sent += 1
            fuzz.check(label, f"POST {path} Transfer-Encoding: chunked, {len(data)} bytes", response, expect, offer=True)
            if response.status_code == 201 and response.headers.get("location"):
                await fuzz.request(http, f"{label}/delete", "DELETE", response.headers["location"], expect={200, 404})

        health = await http.get("/healthz")
        fuzz.polls += 1
        if health.status_code != 200:
            fuzz.problem(f"[content-length] /healthz answered {health.status_code} after the lying requests")
    assert len(fuzz.problems) == mark, fuzz.report(mark)


# --- WHIP: the whole SDP corpus, query parameters, content types, a burst -------------------------


async def test_whip_answers_every_mutated_offer_as_documented(
    fuzz: Fuzz, mutations: list[tuple[str, bytes, set[int] | None]]
) -> None:
    mark = len(fuzz.problems)
    offer = fuzz.template.encode()
    async with fuzz.client() as http:

        async def whip(label: str, body: bytes, headers: Any = SDP, params: Any = None, expect: set[int] | None = None) -> None:
            path = "/v1/whip"
            if isinstance(params, str):  # a raw query string, sent exactly as written
                path, params = f"{path}?{params}", None
            await fuzz.request(http, f"whip/{label}", "POST", path, body=body, headers=headers, params=params,
                               expect=expect, opens_session=True, offer=True)

        for label, body, expect in mutations:
            await whip(label, body, expect=expect)

        for label, content_type, expect in (
            ("none", None, {415}), ("text-plain", "text/plain", {415}), ("json", "application/json", {415}),
            ("multipart", "multipart/form-data; boundary=x", {415}), ("empty", "", {415}),
            ("sdp-with-params", "application/sdp; charset=utf-8; x=y", {201}), ("sdp-uppercase", "Application/SDP", None),
        ):
            headers = {"content-type": content_type} if content_type is not None else {}
            await whip(f"content-type-{label}", offer, headers=headers, expect=expect)

        for label, params, expect in (
            ("width-abc", {"width": "abc"}, {400}), ("width-empty", {"width": ""}, {400}), ("width-float", {"width": "128.0"}, {400}),
            ("width-exponent", {"width": "1e3"}, {400}), ("width-negative", {"width": "-128"}, {400}), ("width-zero", {"width": "0"}, {400}),
            ("width-odd", {"width": "129"}, {400}), ("width-huge", {"width": "99999999999999999999999"}, {400}),
            ("width-64bit", {"width": str(2**63)}, {400}), ("height-huge", {"height": "1" + "0" * 40}, {400}),
            ("height-unicode-digits", {"height": "\u0661\u0662\u0668"}, None), ("size-ok", {"width": "128", "height": "128"}, {201}),
            ("steps-1e9", {"steps": "1e9"}, {400}), ("steps-1000000000", {"steps": "1000000000"}, {400}),
            ("steps-huge", {"steps": "9" * 30}, {400}), ("steps-zero", {"steps": "0"}, {400}),
            ("seed-negative", {"seed": "-1"}, {400}), ("seed-2-64", {"seed": str(2**64)}, {400}),
            ("seed-2-64-minus-1", {"seed": str(2**64 - 1)}, {400}), ("seed-2-32", {"seed": str(2**32)}, {400}),
            ("strength-nan", {"strength": "nan"}, {400}), ("strength-inf", {"strength": "inf"}, {400}),
            ("strength-minus-inf", {"strength": "-inf"}, {400}), ("strength-1e400", {"strength": "1e400"}, {400}),
            ("strength-text", {"strength": "strong"}, {400}), ("guidance-nan", {"guidance_scale": "NaN"}, {400}),
            ("guidance-huge", {"guidance_scale": "1e308"}, {400}),
            ("prompt-2001-chars", {"prompt": "p" * 2001}, {400}), ("prompt-very-long", {"prompt": "q" * 12_000}, {400}),
            ("prompt-ok", {"prompt": "a harbour at dusk"}, {201}), ("prompt-nul", {"prompt": "a\x00b"}, None),
            ("prompt-lone-surrogate-bytes", "prompt=%ED%A0%80", None), ("prompt-non-utf8", "prompt=%FF%FE", None),
            ("negative-prompt-very-long", {"negative_prompt": "n" * 5000}, {400}),
            ("unknown-parameter", {"cfg": "x", "mode": "txt2img", "codec": "gif"}, None),
            ("repeated-width", "width=128&width=abc", None), ("bare-keys", "width&steps&prompt", None),
            ("percent-garbage", "width=%zz&steps=%", None),
            ("every-parameter-bad", dict.fromkeys(("width", "height", "steps", "seed", "strength", "guidance_scale"), "x"), {400}),
        ):
            await whip(f"query-{label}", offer, params=params, expect=expect)

        for label, authorization in (
            ("garbage", "Bearer garbage"), ("wrong-scheme", "Basic dXNlcjpwYXNz"), ("bearer-no-token", "Bearer"),
            ("long", "Bearer " + "k" * 6000), ("non-ascii", b"Bearer \xe9\xff"),
        ):
            await whip(f"authorization-{label}", offer, headers={**SDP, "authorization": authorization}, expect=None)

        # A burst of valid offers at once: at most one per slot is taken, the rest are told `busy`.
        await fuzz.wait_for_slot(http, "burst")
        responses = await asyncio.gather(
            *(http.post("/v1/whip", content=offer, headers=SDP) for _ in range(3 * SLOTS)), return_exceptions=True
        )
        fuzz.sent += len(responses)
        taken = 0
        for index, response in enumerate(responses):
            if isinstance(response, BaseException):
                fuzz.problem(f"[whip/burst-{index}] POST /v1/whip (valid offer, {3 * SLOTS} at once) → no answer ({response!r})")
                continue
            fuzz.check(f"whip/burst-{index}", f"POST /v1/whip (valid offer, {3 * SLOTS} at once)", response, {201, 503}, offer=True)
            if response.status_code == 201:
                taken += 1
                await fuzz.request(http, f"whip/burst-{index}/delete", "DELETE", response.headers["location"], expect={200, 404})
        if taken > SLOTS:
            fuzz.problem(f"[whip/burst] {taken} of {3 * SLOTS} simultaneous offers were accepted with {SLOTS} slots")
        info = await fuzz.info(http)
        if info["sessions"] != 0:
            fuzz.problem(f"[whip] sessions={info['sessions']} after every accepted WHIP resource was deleted")
    assert len(fuzz.problems) == mark, fuzz.report(mark)


# --- /v1/webrtc/offer: JSON of every shape, hellos with bad fields, a sample of the SDP corpus --------


# Mostly offers the server should refuse: each accepted one holds a slot until its connect timeout.
OFFER_SDP_SAMPLE = (
    "baseline", "audio-only-with-vp8", "audio-only-with-opus", "application-only", "video-unknown-codecs",
    "message-kind-with-video-codecs", "no-fingerprint", "no-ice-ufrag", "no-ice-pwd", "setup-holdconn",
    "multibyte-mid", "long-mid", "video-pt-huge", "random-bytes", "empty", "exactly-64KiB", "64KiB-plus-1",
)


async def test_webrtc_offer_answers_every_document_as_documented(
    fuzz: Fuzz, mutations: list[tuple[str, bytes, set[int] | None]]
) -> None:
    mark = len(fuzz.problems)
    sdp = fuzz.template
    async with fuzz.client() as http:

        async def post(label: str, body: bytes, headers: Any = JSON, expect: set[int] | None = None, opens: bool = True) -> None:
            await fuzz.request(http, f"offer/{label}", "POST", "/v1/webrtc/offer", body=body, headers=headers,
                               expect=expect, opens_session=opens, offer=True)

        def document(**fields: Any) -> bytes:
            return json.dumps({"type": "offer", "sdp": sdp, "hello": HELLO, **fields}).encode()

        # Not JSON, or JSON of the wrong shape.
        for label, body in (
            ("empty", b""), ("not-json", b"{nope"), ("nul", b"\x00"), ("non-utf8", b'{"type": "offer", "sdp": "\xff\xfe"}'),
            ("trailing-garbage", document() + b"}}"),
            ("deeply-nested", b"[" * 30_000 + b"]" * 30_000),
            ("deeply-nested-hello", b'{"type": "offer", "sdp": "v=0", "hello": ' + b'{"a":' * 10_000 + b"1" + b"}" * 10_001),
            ("nan-literal", b'{"type": "offer", "sdp": "v=0", "hello": {"protocol": [1], "params": {"strength": NaN}}}'),
        ):
            await post(f"body-{label}", body, expect={400})
        for label, value in (("array", []), ("string", "offer"), ("number", 1), ("null", None), ("object", {}),
                             ("no-sdp", {"type": "offer"}), ("sdp-number", {"type": "offer", "sdp": 5}),
                             ("sdp-null", {"type": "offer", "sdp": None}), ("sdp-list", {"type": "offer", "sdp": [sdp]}),
                             ("type-answer", {"type": "answer", "sdp": sdp}), ("type-missing", {"sdp": sdp}),
                             ("type-pranswer", {"type": "pranswer", "sdp": sdp}), ("type-number", {"type": 1, "sdp": sdp})):
            await post(f"shape-{label}", json.dumps(value).encode(), expect={400})
        for label, hello in (("list", []), ("string", "hello"), ("null", None), ("number", 7)):
            await post(f"hello-{label}", document(hello=hello), expect={400})

        # Hellos with bad fields (a bad hello answers its hello error code, as documented). The SDP is not
        # one, so a hello that passes ends in invalid_sdp at once instead of holding a slot.
        for label, hello in (
            ("empty-object", {}), ("protocol-empty", {"protocol": []}), ("protocol-string", {"protocol": "1"}),
            ("protocol-7", {"protocol": [7]}), ("protocol-huge", {"protocol": [2**70]}), ("protocol-float", {"protocol": [1.5]}),
            ("width-text", {**HELLO, "width": "abc"}), ("width-negative", {**HELLO, "width": -128}), ("width-odd", {**HELLO, "width": 129}),
            ("width-huge", {**HELLO, "width": 10**30}), ("width-64bit", {**HELLO, "width": 2**64}), ("width-float", {**HELLO, "width": 1e308}),
            ("codec-gif", {**HELLO, "codec": "gif"}), ("quality-0", {**HELLO, "quality": 0}), ("quality-huge", {**HELLO, "quality": 10**20}),
            ("mode-bogus", {**HELLO, "mode": "video2video"}), ("params-list", {**HELLO, "params": []}),
            ("params-steps-1e9", {**HELLO, "params": {"steps": 1_000_000_000}}), ("params-seed-2-64", {**HELLO, "params": {"seed": 2**64}}),
            ("params-unknown", {**HELLO, "params": {"sharpness": 3}}), ("prompt-too-long", {**HELLO, "params": {"prompt": "p" * 2001}}),
            ("prompt-number", {**HELLO, "params": {"prompt": 5}}), ("api-key-number", {**HELLO, "api_key": 5}),
            ("unknown-field", {**HELLO, "colour": "red"}), ("seq-negative", {**HELLO, "seq": -1}),
            ("lone-surrogate-prompt", {**HELLO, "params": {"prompt": "\ud800"}}),
            ("lone-surrogate-key", {**HELLO, "params": {"\udfff": 1}}),
        ):
            await post(f"hello-{label}", document(hello=hello, sdp="v=0"), expect={400, 401})
        # Fields the server sets itself (type, queue) are overridden, whatever the client sent; a UTF-8
        # BOM may be ignored (RFC 8259). Again "v=0" as the SDP: these hellos may pass, and then end in
        # invalid_sdp; only two full offers here, as each accepted one holds a slot until its connect timeout.
        await post("hello-queue-true", document(hello={**HELLO, "queue": True}, sdp="v=0"), expect={400})
        await post("hello-queue-text", document(hello={**HELLO, "queue": "yes"}, sdp="v=0"), expect={400})
        await post("hello-type-canvas", document(hello={**HELLO, "type": "canvas"}, sdp="v=0"), expect={400})
        await post("body-utf8-bom", b"\xef\xbb\xbf" + document(sdp="v=0"), expect={400})
        await post("hello-omitted", json.dumps({"type": "offer", "sdp": sdp}).encode(), expect={200})

        # Content types.
        for label, headers, expect in (
            ("none", {}, {415}), ("sdp", SDP, {415}), ("text-plain", {"content-type": "text/plain"}, {415}),
            ("json-charset", {"content-type": "application/json; charset=utf-8"}, {200}),
            ("json-uppercase", {"content-type": "Application/JSON"}, None),
        ):
            body = document() if label == "json-charset" else document(sdp="v=0")
            await post(f"content-type-{label}", body, headers=headers, expect=expect)

        # A sample of the SDP corpus, inside the JSON document; bytes that are not UTF-8 ride as U+FFFD.
        by_label = {label: (body, expect) for label, body, expect in mutations}
        for label in OFFER_SDP_SAMPLE:
            body, expect = by_label[label]
            text = body.decode("utf-8", "replace")
            if expect is not None and expect & {200, 201}:
                expect = {200}
            if label in ("exactly-64KiB",):
                expect = TOO_LARGE  # the JSON around the 64 KiB SDP takes it over the limit
            await post(f"sdp-{label}", json.dumps({"type": "offer", "sdp": text, "hello": HELLO}).encode(), expect=expect)
        await post("sdp-lone-surrogate", json.dumps({"type": "offer", "sdp": sdp.replace("s=-", "s=\ud800"), "hello": HELLO}).encode())
        await post("sdp-nul-escape", json.dumps({"type": "offer", "sdp": sdp.replace("s=-", "s=\u0000"), "hello": HELLO}).encode())
    assert len(fuzz.problems) == mark, fuzz.report(mark)


# --- afterwards: documented codes only, nothing leaked, a clean log -------------------------------------


def test_every_error_code_seen_is_documented(fuzz: Fuzz) -> None:
    documented = documented_codes()
    undocumented = {code: example for code, example in fuzz.codes.items() if code not in documented}
    assert not undocumented, "error codes that docs/protocol.md does not name:\n" + "\n".join(
        f"- `{code}`, e.g. {example}" for code, example in sorted(undocumented.items())
    )


def _exceptions_in(log: str) -> list[str]:
    """The last line of every traceback in a log (the exception and its message)."""
    found = []
    inside = False
    for line in log.splitlines():
        if line.startswith("Traceback (most recent call last):"):
            inside = True
        elif inside and line and not line.startswith((" ", "\t")):
            if line.startswith(("During handling", "The above exception")):
                continue
            found.append(line[:200])
            inside = False
    return found


async def test_nothing_is_left_running_and_the_log_is_clean(fuzz: Fuzz) -> None:
    async with fuzz.client() as http:
        deadline = time.monotonic() + 10
        while True:
            info = await fuzz.info(http)
            if info["sessions"] == 0 and info["slots_free"] == info["slots_total"]:
                break
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.25)
        health = await http.get("/healthz")
    elapsed = time.monotonic() - fuzz.started
    summary = f"{fuzz.sent} fuzz requests, {fuzz.polls} polls, {elapsed:.1f} s"
    print(f"signalling fuzz: {summary}; {len(fuzz.problems)} problem(s); codes seen: {sorted(fuzz.codes)}")
    log = fuzz.server.log()
    problems = []
    if not (info["sessions"] == 0 and info["slots_free"] == info["slots_total"]):
        problems.append(
            f"10 s after the last request: sessions={info['sessions']}, slots_free={info['slots_free']} of "
            f"{info['slots_total']}: something was leaked"
        )
    if health.status_code != 200:
        problems.append(f"/healthz answered {health.status_code}")
    if "Traceback" in log or "Exception in ASGI application" in log:
        exceptions = Counter(_exceptions_in(log))
        at = log.find("Traceback") if "Traceback" in log else log.find("Exception in ASGI application")
        problems.append(
            f"the server log ({fuzz.server.log_path}) has {log.count('Traceback')} 'Traceback' and "
            f"{log.count('Exception in ASGI application')} 'Exception in ASGI application'; exceptions: "
            + "; ".join(f"{count}× {text}" for text, count in exceptions.most_common())
            + f"\nthe first one:\n{log[max(0, at - 200) : at + 2500]}"
        )
    assert not problems, f"({summary})\n" + "\n".join(problems)
