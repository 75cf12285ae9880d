"""Who holds a conversation's claim (host, pid, process start), so a turn can take over a dead process's claim.

A claim (`conversation_turns`) of a process that was killed (SIGKILL, the OOM killer, a power cut of a container)
held its conversation until its lease expired (`AGENTRT_TURN_LEASE_SECONDS`, 60 by default): the user's next message
was refused as a concurrent turn for up to a minute. A turn that finds a claim of a process on its own host that no
longer runs now takes it over at once (`services/conversations/_claims.py`). Nullable: claims taken before this
revision, or by an earlier version in a rolling upgrade, have no holder and expire as before.

Revision ID: 0017_claim_holders
Revises: 0016_queue_grants
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0017_claim_holders'
down_revision: str | None = '0016_queue_grants'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('conversation_turns', sa.Column('holder_host', sa.String(255), nullable=True))
    op.add_column('conversation_turns', sa.Column('holder_pid', sa.Integer(), nullable=True))
    op.add_column('conversation_turns', sa.Column('holder_started', sa.Float(), nullable=True))


def downgrade() -> None:
    op.drop_column('conversation_turns', 'holder_started')
    op.drop_column('conversation_turns', 'holder_pid')
    op.drop_column('conversation_turns', 'holder_host')
