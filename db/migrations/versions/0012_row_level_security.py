"""Tenant isolation: function roles with least privilege, row-level security forced on every account table.

Roles (cluster-wide, created if missing, safe when several databases or processes migrate at once), each NOLOGIN,
NOBYPASSRLS, owning nothing; the migrating (login) role becomes a member of each, so sessions switch with a
transaction-local `SET ROLE` (`agentrt.db.roles`):
- `agentrt_app`, the request path: one account's rows (`app.account_id`, transaction-local); no ledger writes.
- `agentrt_auth`, tenant lookup: accounts, agent instances, API keys of every account (to find a key's account).
- `agentrt_ledger`, the ledger writer: inserts ledger rows and contents, settles budget holds; selects no content.
- `agentrt_jobs`, rollups and budget sweeps: ledger figures and their own tables; no content, no conversations.
- `agentrt_admin`, the operator's commands: every row of every table.

Policies: `agentrt_app` sees `account_id = (SELECT nullif(current_setting('app.account_id', true), '')::bigint)`
(no tenant: no row; the sub-select is evaluated once per statement), the cross-account roles see every row, and
their GRANTs bound what they may do with it. `llm_request_contents` follows its ledger row; `accounts` shows the
request role its own account. Independent of other migrations' tables (procrastinate's): only the tables named here.

Revision ID: 0012_row_level_security
Revises: 0011_procrastinate
Create Date: 2026-12-12
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0012_row_level_security'
down_revision: str | None = '0011_procrastinate'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROLES = ('agentrt_app', 'agentrt_auth', 'agentrt_ledger', 'agentrt_jobs', 'agentrt_admin')
CROSS_ACCOUNT = ('agentrt_auth', 'agentrt_ledger', 'agentrt_jobs', 'agentrt_admin')

# Every table with an `account_id` column (tests/db/test_row_level_security.py finds them in the catalog).
ACCOUNT_TABLES = (
    'agent_instances',
    'directory_entries',
    'conversation_entries',
    'conversations',
    'conversation_turns',
    'llm_requests',
    'usage_daily_rollups',
    'api_keys',
    'account_budgets',
    'budget_periods',
    'budget_reservations',
    'budget_settlements',
)
ALL_TABLES = (*ACCOUNT_TABLES, 'accounts', 'llm_request_contents', 'usage_rolled_up_requests')

TENANT = "(SELECT nullif(current_setting('app.account_id', true), '')::bigint)"

GRANTS: dict[str, dict[str, tuple[str, ...]]] = {
    'agentrt_app': {
        'SELECT': (
            'accounts',
            'agent_instances',
            'directory_entries',
            'llm_requests',
            'llm_request_contents',
            'usage_daily_rollups',
            'api_keys',
            'account_budgets',
            'alembic_version',  # the readiness check compares the schema's revision with the code's
        ),
        # Budget admission folds the account's pending settlements into its window (services/budgets/_reserve.py).
        'SELECT, DELETE': ('budget_settlements',),
        'SELECT, INSERT, UPDATE, DELETE': (
            'conversation_entries',
            'conversations',
            'conversation_turns',
            'budget_reservations',
        ),
        'SELECT, INSERT, UPDATE': ('budget_periods',),
    },
    'agentrt_auth': {
        # The tenant lookup also reads whether the account has a budget (one EXISTS in its statement).
        'SELECT': ('accounts', 'agent_instances', 'api_keys', 'account_budgets'),
        'UPDATE (last_used_at)': ('api_keys',),
    },
    'agentrt_ledger': {
        'INSERT': ('llm_requests', 'llm_request_contents', 'budget_settlements'),
        # The figures settling reads, and what the insert returns; not the row's texts (error message, labels).
        'SELECT (id, account_id, started_at, total_cost, total_tokens, usage_reported, status, error_status_code)': (
            'llm_requests',
        ),
        # The key `ON CONFLICT (request_id, kind) DO NOTHING` checks; never a body.
        'SELECT (request_id, kind)': ('llm_request_contents',),
        'SELECT, DELETE': ('budget_reservations',),
        'SELECT': ('budget_periods',),
    },
    'agentrt_jobs': {
        'SELECT': ('llm_requests', 'account_budgets'),
        # The reconcile job finds conversations left without a summary: their keys and heads, not their content.
        'SELECT (account_id, conversation_id, head_id, summary_head_id, updated_at)': ('conversations',),
        'SELECT, INSERT, UPDATE, DELETE': (
            'usage_daily_rollups',
            'usage_rolled_up_requests',
            'budget_reservations',
            'budget_settlements',
        ),
        'SELECT, UPDATE': ('budget_periods',),
    },
    'agentrt_admin': {'ALL': ALL_TABLES},
}

_CREATE_ROLES = """
DO $$
DECLARE
    name text;
    -- PostgreSQL 16 and later grant membership with options; SET ROLE needs the SET option.
    with_set boolean := current_setting('server_version_num')::int >= 160000;
BEGIN
    FOREACH name IN ARRAY ARRAY[{roles}] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = name) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN NOINHERIT NOBYPASSRLS', name);
            EXCEPTION
                WHEN duplicate_object OR unique_violation THEN NULL;  -- another database's migration made it first
                WHEN insufficient_privilege THEN
                    RAISE EXCEPTION 'role % does not exist and % may not create it', name, current_user
                        USING HINT = 'create the roles as README "Tenant isolation" says, or grant CREATEROLE';
            END;
        END IF;
        IF NOT pg_has_role(current_user, name, CASE WHEN with_set THEN 'SET' ELSE 'MEMBER' END) THEN
            BEGIN
                EXECUTE format('GRANT %I TO %I', name, current_user)
                    || CASE WHEN with_set THEN ' WITH SET TRUE' ELSE '' END;
            EXCEPTION WHEN insufficient_privilege THEN
                RAISE EXCEPTION '% is not a member of role % and may not grant it to itself', current_user, name
                    USING HINT = 'grant it as README "Tenant isolation" says';
            END;
        END IF;
    END LOOP;
END $$
"""


def upgrade() -> None:
    op.execute(_CREATE_ROLES.format(roles=', '.join(f"'{role}'" for role in ROLES)))
    for role, grants in GRANTS.items():
        for privileges, tables in grants.items():
            op.execute(f'GRANT {privileges} ON {", ".join(tables)} TO {role}')
    for table in ALL_TABLES:
        # Identity and serial columns: the roles that insert need the sequence.
        op.execute(f"""
DO $$
DECLARE
    sequence text;
BEGIN
    FOR sequence IN
        SELECT pg_get_serial_sequence('{table}', attname) FROM pg_attribute
        WHERE attrelid = '{table}'::regclass AND attnum > 0 AND NOT attisdropped
          AND pg_get_serial_sequence('{table}', attname) IS NOT NULL
    LOOP
        EXECUTE format('GRANT USAGE ON SEQUENCE %s TO agentrt_app, agentrt_ledger, agentrt_jobs, agentrt_admin',
                       sequence);
    END LOOP;
END $$""")
    for table in ALL_TABLES:
        op.execute(f'ALTER TABLE {table} ENABLE ROW LEVEL SECURITY')
        op.execute(f'ALTER TABLE {table} FORCE ROW LEVEL SECURITY')
        op.execute(
            f'CREATE POLICY cross_account ON {table} TO {", ".join(CROSS_ACCOUNT)} USING (true) WITH CHECK (true)'
        )
    for table in ACCOUNT_TABLES:
        op.execute(
            f'CREATE POLICY tenant ON {table} TO agentrt_app USING (account_id = {TENANT}) WITH CHECK '
            f'(account_id = {TENANT})'
        )
    op.execute(f'CREATE POLICY tenant ON accounts TO agentrt_app USING (id = {TENANT})')
    op.execute(
        'CREATE POLICY tenant ON llm_request_contents TO agentrt_app '
        'USING (EXISTS (SELECT 1 FROM llm_requests AS r WHERE r.id = request_id))'
    )


def downgrade() -> None:
    for table in ALL_TABLES:
        op.execute(f'DROP POLICY IF EXISTS tenant ON {table}')
        op.execute(f'DROP POLICY IF EXISTS cross_account ON {table}')
        op.execute(f'ALTER TABLE {table} NO FORCE ROW LEVEL SECURITY')
        op.execute(f'ALTER TABLE {table} DISABLE ROW LEVEL SECURITY')
    for role in ROLES:  # the roles stay (other databases of the server may use them); this database's rights go
        op.execute(f'REVOKE ALL ON {", ".join(ALL_TABLES)} FROM {role}')
        op.execute(f'REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {role}')
