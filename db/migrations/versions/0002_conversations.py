"""Conversations: records and entries for the PostgreSQL ConversationStore.

Revision ID: 0002_conversations
Revises: 0001_foundation
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0002_conversations'
down_revision: str | None = '0001_foundation'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'conversation_entries',
        sa.Column('id', sa.String(64), nullable=False),
        sa.Column('account_id', sa.BigInteger(), nullable=False),
        sa.Column('parent_id', sa.String(64), nullable=True),
        sa.Column('kind', sa.String(32), nullable=False),
        sa.Column('message', postgresql.JSONB(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint('id', name='pk_conversation_entries'),
        sa.UniqueConstraint('account_id', 'id', name='uq_conversation_entries_account_id_id'),
        sa.ForeignKeyConstraint(
            ['account_id'], ['accounts.id'], name='fk_conversation_entries_account_id_accounts', ondelete='CASCADE'
        ),
        sa.ForeignKeyConstraint(
            ['account_id', 'parent_id'],
            ['conversation_entries.account_id', 'conversation_entries.id'],
            name='fk_conversation_entries_parent',
        ),
    )
    op.create_index('ix_conversation_entries_account_id_parent_id', 'conversation_entries', ['account_id', 'parent_id'])
    op.create_table(
        'conversations',
        sa.Column('account_id', sa.BigInteger(), nullable=False),
        sa.Column('conversation_id', sa.String(200), nullable=False),
        sa.Column('scope', sa.String(200), nullable=True),
        sa.Column('head_id', sa.String(64), nullable=True),
        sa.Column('revision', sa.String(64), nullable=False),
        sa.Column('record', postgresql.JSONB(), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint('account_id', 'conversation_id', name='pk_conversations'),
        sa.ForeignKeyConstraint(
            ['account_id'], ['accounts.id'], name='fk_conversations_account_id_accounts', ondelete='CASCADE'
        ),
        sa.ForeignKeyConstraint(
            ['account_id', 'head_id'],
            ['conversation_entries.account_id', 'conversation_entries.id'],
            name='fk_conversations_head',
            deferrable=True,
            initially='DEFERRED',
        ),
    )
    op.create_index('ix_conversations_account_scope_updated', 'conversations', ['account_id', 'scope', 'updated_at'])
    op.create_index('ix_conversations_account_updated', 'conversations', ['account_id', 'updated_at'])
    op.create_index('ix_conversations_account_head', 'conversations', ['account_id', 'head_id'])


def downgrade() -> None:
    op.drop_table('conversations')
    op.drop_table('conversation_entries')
