"""API keys for the HTTP API: per account, stored hashed, revocable, with scopes.

Revision ID: 0007_api_keys
Revises: 0006_conversation_turns
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0007_api_keys'
down_revision: str | None = '0006_conversation_turns'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'api_keys',
        sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column('account_id', sa.BigInteger(), nullable=False),
        sa.Column('prefix', sa.String(32), nullable=False),
        sa.Column('secret_hash', sa.LargeBinary(), nullable=False),
        sa.Column('name', sa.String(200), server_default='', nullable=False),
        sa.Column(
            'scopes',
            postgresql.ARRAY(sa.String(16)),
            server_default=sa.text("ARRAY['chat', 'read']::varchar[]"),
            nullable=False,
        ),
        sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.CheckConstraint(
            "scopes <@ ARRAY['chat', 'read']::varchar[] AND cardinality(scopes) > 0", name='ck_api_keys_scopes'
        ),
        sa.ForeignKeyConstraint(
            ['account_id'], ['accounts.id'], name='fk_api_keys_account_id_accounts', ondelete='CASCADE'
        ),
        sa.PrimaryKeyConstraint('id', name='pk_api_keys'),
        sa.UniqueConstraint('prefix', name='uq_api_keys_prefix'),
    )
    op.create_index('ix_api_keys_account_id', 'api_keys', ['account_id'])


def downgrade() -> None:
    op.drop_index('ix_api_keys_account_id', table_name='api_keys')
    op.drop_table('api_keys')
