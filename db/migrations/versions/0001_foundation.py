"""Foundation: accounts, agent instances and directory entries.

Revision ID: 0001_foundation
Revises:
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0001_foundation'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'accounts',
        sa.Column('id', sa.BigInteger(), sa.Identity(), primary_key=True),
        sa.Column('slug', sa.String(64), nullable=False),
        sa.Column('name', sa.String(200), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint('id', name='pk_accounts'),
        sa.UniqueConstraint('slug', name='uq_accounts_slug'),
    )
    op.create_table(
        'agent_instances',
        sa.Column('id', sa.BigInteger(), sa.Identity(), primary_key=True),
        sa.Column('account_id', sa.BigInteger(), nullable=False),
        sa.Column('slug', sa.String(64), nullable=False),
        sa.Column('agent_type', sa.String(64), nullable=False),
        sa.Column('config', postgresql.JSONB(), server_default='{}', nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint('id', name='pk_agent_instances'),
        sa.ForeignKeyConstraint(
            ['account_id'], ['accounts.id'], name='fk_agent_instances_account_id_accounts', ondelete='CASCADE'
        ),
        sa.UniqueConstraint('account_id', 'slug', name='uq_agent_instances_account_id_slug'),
    )
    op.create_index('ix_agent_instances_account_id', 'agent_instances', ['account_id'])
    op.create_table(
        'directory_entries',
        sa.Column('id', sa.BigInteger(), sa.Identity(), primary_key=True),
        sa.Column('account_id', sa.BigInteger(), nullable=False),
        sa.Column('external_id', sa.String(64), nullable=False),
        sa.Column('schema_name', sa.String(64), nullable=False),
        sa.Column('name', sa.String(200), nullable=False),
        sa.Column('category', sa.String(100), nullable=False),
        sa.Column('city', sa.String(100), nullable=False),
        sa.Column('attributes', postgresql.JSONB(), server_default='{}', nullable=False),
        sa.Column('search_text', sa.Text(), nullable=False),
        sa.Column(
            'search_vector',
            postgresql.TSVECTOR(),
            sa.Computed("to_tsvector('english', search_text)", persisted=True),
            nullable=False,
        ),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint('id', name='pk_directory_entries'),
        sa.ForeignKeyConstraint(
            ['account_id'], ['accounts.id'], name='fk_directory_entries_account_id_accounts', ondelete='CASCADE'
        ),
        sa.UniqueConstraint('account_id', 'external_id', name='uq_directory_entries_account_id_external_id'),
    )
    op.create_index(
        'ix_directory_entries_scope_category', 'directory_entries', ['account_id', 'schema_name', 'category']
    )
    op.create_index('ix_directory_entries_scope_city', 'directory_entries', ['account_id', 'schema_name', 'city'])
    op.create_index(
        'ix_directory_entries_search_vector', 'directory_entries', ['search_vector'], postgresql_using='gin'
    )
    op.create_index(
        'ix_directory_entries_attributes',
        'directory_entries',
        ['attributes'],
        postgresql_using='gin',
        postgresql_ops={'attributes': 'jsonb_path_ops'},
    )


def downgrade() -> None:
    op.drop_table('directory_entries')
    op.drop_table('agent_instances')
    op.drop_table('accounts')
