"""LLM ledger: one row per model request, and its stored prompt, response or error.

Revision ID: 0003_llm_ledger
Revises: 0002_conversations
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003_llm_ledger'
down_revision: str | None = '0002_conversations'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'llm_requests',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('run_id', sa.String(64), nullable=True),
        sa.Column('run_step', sa.Integer(), nullable=True),
        sa.Column('conversation_id', sa.String(200), nullable=True),
        sa.Column('chat_session_id', sa.String(200), nullable=True),
        sa.Column('account_id', sa.BigInteger(), nullable=True),
        sa.Column('account_slug', sa.String(64), nullable=True),
        sa.Column('agent_instance_id', sa.BigInteger(), nullable=True),
        sa.Column('agent_instance_slug', sa.String(64), nullable=True),
        sa.Column('agent_type', sa.String(64), nullable=True),
        sa.Column('agent_name', sa.String(200), nullable=True),
        sa.Column('provider', sa.String(100), nullable=True),
        sa.Column('model', sa.String(200), nullable=False),
        sa.Column('response_model', sa.String(200), nullable=True),
        sa.Column('streamed', sa.Boolean(), nullable=False),
        sa.Column('input_tokens', sa.BigInteger(), nullable=False),
        sa.Column('output_tokens', sa.BigInteger(), nullable=False),
        sa.Column('cache_read_tokens', sa.BigInteger(), nullable=False),
        sa.Column('cache_write_tokens', sa.BigInteger(), nullable=False),
        sa.Column('reasoning_tokens', sa.BigInteger(), nullable=False),
        sa.Column('total_tokens', sa.BigInteger(), nullable=False),
        sa.Column('usage_reported', sa.Boolean(), nullable=False),
        sa.Column('input_cost', sa.Numeric(), nullable=True),
        sa.Column('output_cost', sa.Numeric(), nullable=True),
        sa.Column('total_cost', sa.Numeric(), nullable=True),
        sa.Column('price_source', sa.String(200), nullable=True),
        sa.Column('latency_ms', sa.Float(), nullable=False),
        sa.Column('time_to_first_token_ms', sa.Float(), nullable=True),
        sa.Column('status', sa.String(16), nullable=False),
        sa.Column('success', sa.Boolean(), nullable=False),
        sa.Column('finish_reason', sa.String(32), nullable=True),
        sa.Column('error_type', sa.String(200), nullable=True),
        sa.Column('error_message', sa.Text(), nullable=True),
        sa.Column('provider_response_id', sa.String(200), nullable=True),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('recorded_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint('id', name='pk_llm_requests'),
        sa.CheckConstraint("status IN ('complete', 'error', 'cancelled')", name='ck_llm_requests_status'),
    )
    op.create_index('ix_llm_requests_started_at', 'llm_requests', ['started_at'])
    op.create_index('ix_llm_requests_account_id_started_at', 'llm_requests', ['account_id', 'started_at'])
    op.create_index('ix_llm_requests_chat_session_id', 'llm_requests', ['chat_session_id'])
    op.create_table(
        'llm_request_contents',
        sa.Column('request_id', sa.Uuid(), nullable=False),
        sa.Column('kind', sa.String(16), nullable=False),
        sa.Column('body', sa.Text(), nullable=False),
        sa.Column('size_bytes', sa.BigInteger(), nullable=False),
        sa.Column('truncated', sa.Boolean(), nullable=False),
        sa.Column('redactions', sa.Integer(), nullable=False),
        sa.Column('recorded_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint('request_id', 'kind', name='pk_llm_request_contents'),
        sa.ForeignKeyConstraint(
            ['request_id'],
            ['llm_requests.id'],
            name='fk_llm_request_contents_request_id_llm_requests',
            ondelete='CASCADE',
        ),
        sa.CheckConstraint("kind IN ('prompt', 'response', 'error')", name='ck_llm_request_contents_kind'),
    )


def downgrade() -> None:
    op.drop_table('llm_request_contents')
    op.drop_table('llm_requests')
