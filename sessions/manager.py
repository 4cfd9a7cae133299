"""The session layer's front door: configuration, the shared model, the slot pool, live sessions."""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt

from streamcanvas.codecs.images import ImageLimits
from streamcanvas.codecs.messages import PROTOCOL_VERSIONS
from streamcanvas.pipelines.loading import LoadedModel
from streamcanvas.pipelines.stream import StreamParams

from .session import CloseReason, Session, SessionState
from .slots import SlotPool


@dataclass(frozen=True)
class SessionConfig:
    default_width: int = 512
    default_height: int = 512
    max_width: int = 1024
    max_height: int = 1024
    slots: int = 1
    max_waiting: int = 8
    max_connections: int = 64
    max_message_bytes: int = 8 * 1024 * 1024
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    idle_timeout_s: float = 120.0
    stats_interval_s: float = 1.0
    busy_retry_after_s: float = 5.0
    control_queue_size: int = 64
    api_keys: frozenset[str] = frozenset()
    token_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    token_ttl_s: float = 12 * 3600
    max_viewers: int = 64
    recordings_dir: Path = Path("recordings")
    max_recording_s: float = 3600.0
    default_params: StreamParams = field(default_factory=StreamParams)
    """Where a session starts before its hello's params: StreamParams' defaults, or the model's own."""

    def limits_dict(self) -> dict[str, int]:
        return {
            "max_message_bytes": self.max_message_bytes,
            "max_width": self.max_width,
            "max_height": self.max_height,
            "max_image_width": self.image_limits.max_width,
            "max_image_height": self.image_limits.max_height,
            "max_image_pixels": self.image_limits.max_pixels,
            "idle_timeout_s": int(self.idle_timeout_s),
        }


class TooManyConnections(Exception):
    pass


class TokenRejected(Exception):
    """A token that is malformed or expired, or (forbidden) valid but for another session or role."""

    def __init__(self, message: str, forbidden: bool = False) -> None:
        super().__init__(message)
        self.forbidden = forbidden


class Tokens:
    """Signed session tokens (HS256 JWTs): `control` may drive a session, `viewer` may only watch it."""

    def __init__(self, secret: str, ttl_s: float) -> None:
        self.secret = secret
        self.ttl_s = ttl_s

    def issue(self, session_id: str, role: str) -> str:
        claims = {"sub": session_id, "role": role, "exp": int(time.time() + self.ttl_s)}
        return jwt.encode(claims, self.secret, algorithm="HS256")

    def verify(self, token: str, session_id: str, roles: tuple[str, ...]) -> str:
        """The token's role, if it is valid for this session and one of `roles`; else TokenRejected."""
        try:
            claims = jwt.decode(token, self.secret, algorithms=["HS256"], options={"require": ["exp", "sub"]})
        except jwt.ExpiredSignatureError:
            raise TokenRejected("the token has expired") from None
        except jwt.InvalidTokenError as error:
            raise TokenRejected(f"not a valid token ({error})") from None
        if claims["sub"] != session_id:
            raise TokenRejected("the token is for another session", forbidden=True)
        if claims.get("role") not in roles:
            raise TokenRejected(
                f"a {claims.get('role')} token may not do this (needs {' or '.join(roles)})", forbidden=True
            )
        return claims["role"]


class SessionManager:
    def __init__(self, config: SessionConfig, model: LoadedModel, threads_per_slot: int | None = None) -> None:
        self.config = config
        self.model = model
        self.model_description = model.describe()
        self.pool = SlotPool(model, config.slots, config.max_waiting, threads_per_slot)
        self.sessions: dict[str, Session] = {}
        self.tokens = Tokens(config.token_secret, config.token_ttl_s)

    def start(self) -> None:
        self.pool.start()

    async def stop(self) -> None:
        for session in list(self.sessions.values()):
            session.close(CloseReason.SHUTDOWN)
        await asyncio.to_thread(self.pool.stop)

    def open(self, transport: str) -> Session:
        if len(self.sessions) >= self.config.max_connections:
            raise TooManyConnections(f"{len(self.sessions)} connections are open, the limit is {self.config.max_connections}")
        session = Session(self, transport)
        self.sessions[session.id] = session
        return session

    def forget(self, session: Session) -> None:
        """Called by Session.close(): drop it and free its slot or place in line at once."""
        self.sessions.pop(session.id, None)
        self.pool.release(session)

    def info(self) -> dict[str, Any]:
        states = [session.state for session in self.sessions.values()]
        return {
            "slots_total": self.pool.size,
            "slots_free": self.pool.free,
            "queue_length": self.pool.queue_length,
            "sessions": len(states),
            "streaming": sum(1 for state in states if state is SessionState.STREAMING),
            "protocol_versions": list(PROTOCOL_VERSIONS),
        }
