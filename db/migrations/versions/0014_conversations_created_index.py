"""Index conversations by when each began, the listing's default order.

`GET /api/v1/conversations` (`list_conversations`) pages newest first by `created_at`, a key a turn never changes, so
a page walk lists each conversation once (by `updated_at` a conversation updated between two pages moved ahead of the
cursor and was left out). The index serves that keyset, `(created_at, conversation_id) < cursor` within an account,
read backwards, as `ix_conversations_account_updated` serves the order by the last update.

Revision ID: 0014_conversations_created_index
Revises: 0013_rollup_cancelled_requests
Create Date: 2026-12-02
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0014_conversations_created_index'
down_revision: str | None = '0013_rollup_cancelled_requests'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        'ix_conversations_account_created', 'conversations', ['account_id', 'created_at', 'conversation_id']
    )


def downgrade() -> None:
    op.drop_index('ix_conversations_account_created', table_name='conversations')
