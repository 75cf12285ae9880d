"""The daily usage rollup keyed on the agent's name too: one bucket per UTC day, account, agent instance, agent name
and model.

The bucket key was the day, account, agent instance and model; the agent's name was a label, the greatest seen in the
bucket. Two agents on one instance (`simple_chat(agent=...)` with an agent of one's own on the account's instance), or
agents without an instance (one's own with `ledger_capability()`), shared a bucket under the alphabetically greatest
name, and the rollup's reports filtered and grouped on that label: `agentrt costs --agent simple_chat` answered no
rows and `--agent zeta-bot` the whole day's usage of both (QA), where the ledger told them apart.

Upgrade: each bucket is split, in one statement, into the buckets of the names of the ledger rows it counted (the rows
marked counted, `usage_rolled_up_requests`, of its day, account, instance and model; the refused excepted, as the
roll-up does). What a bucket holds beyond its rows (a ledger row deleted after it was rolled up takes its mark with it,
ON DELETE CASCADE, migration 0013) stays under the bucket's old name, so the totals of each day, account, instance
and model are what they were, and each counted row is in exactly one bucket. The marks and the queue are left as they
are. Downgrade merges the names back into one bucket each (the greatest name its label, as before).

Cost: one pass over the counted ledger rows, as migration 0019's backfill, and a rewrite of the rollup; under this
transaction's lock on `usage_daily_rollups` (its first statement), so no roll-up or recompute runs meanwhile: they wait
for the commit. An older version's roll-up fails after it (its conflict target is gone) and leaves what it took
queued, for this version's to count.

Revision ID: 0021_rollup_agent_name_key
Revises: 0020_conversation_branches_index
Create Date: 2026-12-07
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0021_rollup_agent_name_key'
down_revision: str | None = '0020_conversation_branches_index'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TABLE = 'usage_daily_rollups'
_OLD_KEY = ['day', 'account_id', 'agent_instance_id', 'model']
_OLD_CONSTRAINT = 'uq_usage_daily_rollups_day_account_id_agent_instance_id_model'
_NEW_KEY = ['day', 'account_id', 'agent_instance_id', 'agent_name', 'model']
_NEW_CONSTRAINT = 'uq_usage_daily_rollups_bucket'  # the convention's name would pass PostgreSQL's 63 characters

_COUNTERS = (
    'requests',
    'failed_requests',
    'cancelled_requests',
    'unpriced_requests',
    'input_tokens',
    'output_tokens',
    'cache_read_tokens',
    'cache_write_tokens',
    'reasoning_tokens',
    'total_tokens',
    'input_cost',
    'output_cost',
    'total_cost',
)
_SUMS = ', '.join(f'sum(p.{name}) AS {name}' for name in _COUNTERS)
_COUNTER_LIST = ', '.join(_COUNTERS)

# As the roll-up of this revision sums a bucket's rows (services/ledger/_rollups.py, `_LEDGER_AGGREGATES`).
_LEDGER_AGGREGATES = """
    count(*) AS requests,
    count(*) FILTER (WHERE NOT r.success AND r.status <> 'cancelled') AS failed_requests,
    count(*) FILTER (WHERE r.status = 'cancelled') AS cancelled_requests,
    count(*) FILTER (WHERE r.total_cost IS NULL) AS unpriced_requests,
    coalesce(sum(r.input_tokens), 0)::bigint AS input_tokens,
    coalesce(sum(r.output_tokens), 0)::bigint AS output_tokens,
    coalesce(sum(r.cache_read_tokens), 0)::bigint AS cache_read_tokens,
    coalesce(sum(r.cache_write_tokens), 0)::bigint AS cache_write_tokens,
    coalesce(sum(r.reasoning_tokens), 0)::bigint AS reasoning_tokens,
    coalesce(sum(r.total_tokens), 0)::bigint AS total_tokens,
    coalesce(sum(r.input_cost), 0) AS input_cost,
    coalesce(sum(r.output_cost), 0) AS output_cost,
    coalesce(sum(r.total_cost), 0) AS total_cost
"""

# `parts`: each old bucket (`is_old`) and the sums of the counted rows of each of its names. A window over the old key
# (PARTITION BY takes NULLs as one, as the constraint does; a join on IS NOT DISTINCT FROM could not be hashed) gives
# each old bucket what is left of it beyond its rows, kept under its old name when anything is; counted rows of no
# bucket (none are: a roll-up claims and adds in one statement) stay out, as they were. Grouped by the new key, so a
# rest lands in its name's bucket.
_SPLIT = f"""
WITH old AS (
    DELETE FROM usage_daily_rollups RETURNING *
), counted AS (
    SELECT (r.started_at AT TIME ZONE 'UTC')::date AS day, r.account_id, r.agent_instance_id, r.agent_name, r.model,
        max(r.account_slug) AS account_slug, max(r.agent_instance_slug) AS agent_instance_slug, {_LEDGER_AGGREGATES}
    FROM llm_requests AS r JOIN usage_rolled_up_requests AS m ON m.request_id = r.id
    WHERE r.status <> 'refused'
    GROUP BY 1, 2, 3, 4, 5
), parts AS (
    SELECT true AS is_old, day, account_id, agent_instance_id, agent_name, model, account_slug, agent_instance_slug,
        {_COUNTER_LIST}
    FROM old
    UNION ALL
    SELECT false, day, account_id, agent_instance_id, agent_name, model, account_slug, agent_instance_slug,
        {_COUNTER_LIST}
    FROM counted
), rests AS (
    SELECT p.*, bool_or(p.is_old) OVER bucket AS bucketed,
        {', '.join(f'sum(p.{name}) FILTER (WHERE NOT p.is_old) OVER bucket AS {name}_counted' for name in _COUNTERS)}
    FROM parts AS p
    WINDOW bucket AS (PARTITION BY p.day, p.account_id, p.agent_instance_id, p.model)
), kept AS (
    SELECT day, account_id, agent_instance_id, agent_name, model, account_slug, agent_instance_slug,
        {', '.join(f'{name} - coalesce({name}_counted, 0) AS {name}' for name in _COUNTERS)}
    FROM rests WHERE is_old
    UNION ALL
    SELECT day, account_id, agent_instance_id, agent_name, model, account_slug, agent_instance_slug, {_COUNTER_LIST}
    FROM rests WHERE NOT is_old AND bucketed
)
INSERT INTO usage_daily_rollups ({', '.join(_NEW_KEY)}, account_slug, agent_instance_slug, {_COUNTER_LIST})
SELECT p.day, p.account_id, p.agent_instance_id, p.agent_name, p.model, max(p.account_slug), max(p.agent_instance_slug),
    {_SUMS}
FROM kept AS p
GROUP BY p.day, p.account_id, p.agent_instance_id, p.agent_name, p.model
HAVING {' OR '.join(f'sum(p.{name}) <> 0' for name in _COUNTERS)}
"""

_MERGE = f"""
WITH old AS (
    DELETE FROM usage_daily_rollups RETURNING *
)
INSERT INTO usage_daily_rollups ({', '.join(_OLD_KEY)}, account_slug, agent_instance_slug, agent_name, {_COUNTER_LIST})
SELECT p.day, p.account_id, p.agent_instance_id, p.model, max(p.account_slug), max(p.agent_instance_slug),
    max(p.agent_name), {_SUMS}
FROM old AS p
GROUP BY p.day, p.account_id, p.agent_instance_id, p.model
"""


def upgrade() -> None:
    op.drop_constraint(_OLD_CONSTRAINT, _TABLE, type_='unique')
    op.execute(_SPLIT)
    op.create_unique_constraint(_NEW_CONSTRAINT, _TABLE, _NEW_KEY, postgresql_nulls_not_distinct=True)


def downgrade() -> None:
    op.drop_constraint(_NEW_CONSTRAINT, _TABLE, type_='unique')
    op.execute(_MERGE)
    op.create_unique_constraint(_OLD_CONSTRAINT, _TABLE, _OLD_KEY, postgresql_nulls_not_distinct=True)
