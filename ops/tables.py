"""The ops schema: API keys and the prediction log. Alembic migrations mirror these tables."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Float, Index, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # The public part of the key ("fnq_<hex>"): lookup index and the id people see.
    prefix: Mapped[str] = mapped_column(String(32), unique=True, nullable=False)
    key_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    name: Mapped[str] = mapped_column(String(128), nullable=False, index=True)
    tier: Mapped[str] = mapped_column(String(32), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    rotated_to: Mapped[str | None] = mapped_column(String(32))
    # ops.keys.secret_id of the SECRET_KEY the hash was made with; NULL before revision 0002.
    secret_id: Mapped[str | None] = mapped_column(String(16))


class PredictionLogRow(Base):
    __tablename__ = "prediction_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # UNIQUE makes journal replays idempotent: a request id lands exactly once.
    request_id: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    key_id: Mapped[str | None] = mapped_column(String(32))
    inputs: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    probability: Mapped[float] = mapped_column(Float, nullable=False)
    risk_level: Mapped[str] = mapped_column(String(16), nullable=False)
    model_version: Mapped[str] = mapped_column(String(64), nullable=False)
    bento_tag: Mapped[str | None] = mapped_column(String(128))
    latency_ms: Mapped[float] = mapped_column(Float, nullable=False)
    # X-Request-ID as the client sent it: stored and echoed, never the key (request_id is
    # the server's), so a client cannot keep its predictions out of the log.
    client_request_id: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (Index("ix_prediction_log_created_at", "created_at"),)
