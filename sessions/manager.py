"""The session layer's front door: configuration, the shared model, the slot pool, live sessions."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import jwt

from streamcanvas.codecs.messages import PROTOCOL_VERSIONS
from streamcanvas.pipelines.loading import LoadedModel
from streamcanvas.pipelines.models import ModelSet

from .config import SessionConfig
from .session import CloseReason, Session, SessionState
from .slots import SlotPool

__all__ = ["SessionConfig", "SessionManager", "TokenRejected", "Tokens", "TooManyConnections"]

logger = logging.getLogger(__name__)


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
    def __init__(self, config: SessionConfig, models: ModelSet | LoadedModel, threads_per_slot: int | None = None) -> None:
        self.config = config
        self.models = models if isinstance(models, ModelSet) else ModelSet.single(models)
        self.model = self.models.default
        self.model_descriptions = {entry["id"]: entry for entry in self.models.describe()}
        """What `ready.model` says of each model (its description, and "id": the name a hello gives)."""
        self.pool = SlotPool(
            self.models,
            config.slots,
            config.max_waiting,
            threads_per_slot,
            sessions_per_slot=config.sessions_per_slot,
            batching=config.batching,
            frame_target_ms=config.frame_target_ms,
            overlap_decode=config.overlap_decode,
        )
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
        session = Session(self, self.config, transport)
        self.sessions[session.id] = session
        return session

    # The broker a session sees (`sessions.session.SessionBroker`) ----------------------------------

    @property
    def slots_total(self) -> int:
        return self.pool.size

    @property
    def queue_length(self) -> int:
        return self.pool.queue_length

    def acquire(self, session: Session) -> bool:
        return self.pool.acquire(session)

    def enqueue(self, session: Session) -> int | None:
        return self.pool.enqueue(session)

    def describe_model(self, name: str | None) -> dict[str, object]:
        return self.model_descriptions[name or self.models.default_name]

    def issue_token(self, session_id: str, role: str) -> str:
        return self.tokens.issue(session_id, role)

    def resume(self, session: Session, session_id: str, token: str) -> bool:
        """A client reconnecting (a new size or model, a dropped network) continues its session under the
        same id, so the addresses made for that id (viewer links, its WHEP endpoint, recording
        downloads) go on working: viewers that reconnect find the new session. The old session's
        control token proves the client's; a session still open under the id (its close not seen yet)
        is ended first."""
        try:
            self.tokens.verify(token, session_id, ("control",))
        except TokenRejected:
            return False
        holder = self.sessions.get(session_id)
        if holder is not None and holder is not session:
            holder.replace()
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]
        session.id = session_id
        self.sessions[session_id] = session
        logger.info("session %s resumed", session_id)
        return True

    def forget(self, session: Session) -> None:
        """Called by Session.close(): drop it and free its slot or place in line at once."""
        if self.sessions.get(session.id) is session:  # a session that was resumed is under its id already
            del self.sessions[session.id]
        self.pool.release(session)

    def info(self) -> dict[str, Any]:
        states = [session.state for session in self.sessions.values()]
        return {
            **self.pool.describe(),
            "sessions": len(states),
            "streaming": sum(1 for state in states if state is SessionState.STREAMING),
            "protocol_versions": list(PROTOCOL_VERSIONS),
        }
