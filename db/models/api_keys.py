"""API keys for the HTTP API: one account per key, stored as a hash, revocable, with scopes."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, CheckConstraint, DateTime, ForeignKey, LargeBinary, String, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Mapped, mapped_column

from agentrt.db.models.base import Base, CreatedAtMixin

API_KEY_SCOPES = ('chat', 'read')
"""`chat`: run turns and delete conversations; `read`: the audit, costs and conversations."""


class ApiKey(CreatedAtMixin, Base):
    """One API key. Only the public prefix and a SHA-256 of the secret are kept: the key is shown once.

    The key fixes the tenant (`account_id`), so no route takes an account from the caller otherwise.
    """

    __tablename__ = 'api_keys'
    __table_args__ = (
        CheckConstraint("scopes <@ ARRAY['chat', 'read']::varchar[] AND cardinality(scopes) > 0", name='scopes'),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    account_id: Mapped[int] = mapped_column(ForeignKey('accounts.id', ondelete='CASCADE'), nullable=False, index=True)
    prefix: Mapped[str] = mapped_column(String(32), unique=True, nullable=False)
    secret_hash: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    name: Mapped[str] = mapped_column(String(200), nullable=False, server_default='')
    scopes: Mapped[list[str]] = mapped_column(
        ARRAY(String(16)), nullable=False, server_default=text("ARRAY['chat', 'read']::varchar[]")
    )
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
