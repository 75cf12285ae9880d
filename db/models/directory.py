"""Directory entries searched by the directory tools (providers, suppliers, ...), scoped per account."""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Computed, ForeignKey, Identity, Index, String, Text, UniqueConstraint
from sqlalchemy.dialects.postgresql import JSONB, TSVECTOR
from sqlalchemy.orm import Mapped, mapped_column

from agentrt.db.models.base import Base, CreatedAtMixin


class DirectoryEntry(CreatedAtMixin, Base):
    """One searchable entry; `schema_name` names the directory (e.g. `medical_providers`)."""

    __tablename__ = 'directory_entries'
    __table_args__ = (
        UniqueConstraint('account_id', 'external_id'),
        Index('ix_directory_entries_scope_category', 'account_id', 'schema_name', 'category'),
        Index('ix_directory_entries_scope_city', 'account_id', 'schema_name', 'city'),
        Index('ix_directory_entries_search_vector', 'search_vector', postgresql_using='gin'),
        Index(
            'ix_directory_entries_attributes',
            'attributes',
            postgresql_using='gin',
            postgresql_ops={'attributes': 'jsonb_path_ops'},
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)  # as migration 0001 made it
    account_id: Mapped[int] = mapped_column(ForeignKey('accounts.id', ondelete='CASCADE'), nullable=False)
    external_id: Mapped[str] = mapped_column(String(64), nullable=False)
    schema_name: Mapped[str] = mapped_column(String(64), nullable=False)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    category: Mapped[str] = mapped_column(String(100), nullable=False)
    city: Mapped[str] = mapped_column(String(100), nullable=False)
    attributes: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default='{}')
    search_text: Mapped[str] = mapped_column(Text, nullable=False)
    search_vector: Mapped[Any] = mapped_column(
        TSVECTOR, Computed("to_tsvector('english', search_text)", persisted=True), nullable=False
    )
