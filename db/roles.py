"""Who a transaction runs as: the tenant (row-level security) and the function role (least privilege).

Every table with an `account_id` has row-level security enabled and forced (migration 0012_row_level_security).
A transaction of the request path runs as `agentrt_app` (no BYPASSRLS, owns nothing) with the transaction-local
setting `app.account_id`; its policies show it that account's rows only, and none when the setting is empty. Work
that spans accounts names its role explicitly with an `Unscoped` member: the ledger writer, background jobs, the
tenant lookup (API key, account slug) and the operator's commands. Both ride on the transaction's BEGIN
(`TransactionSetup`): `set_config('role', ..., true)` and `set_config('app.account_id', ..., true)`, transaction-local,
so nothing of them survives the transaction (safe through a transaction pooler), and no extra round trip.

The login role of `DATABASE_URL` is a member of the function roles (the migration grants it, or the operator does:
README "Tenant isolation"); it owns the tables and runs the migrations.
"""

from __future__ import annotations

import enum

TENANT_SETTING = 'app.account_id'
"""The transaction-local setting the policies compare `account_id` with."""

APP_ROLE = 'agentrt_app'
"""The request path (tools, conversation store, read API): one account's rows, as the policies allow."""

AUTH_ROLE = 'agentrt_auth'
"""Tenant lookup: finds the account of an API key or a slug (reads accounts, agent instances, API keys)."""

LEDGER_ROLE = 'agentrt_ledger'
"""The ledger writer: inserts ledger rows and contents of any account, settles budget holds; reads no content."""

JOBS_ROLE = 'agentrt_jobs'
"""Background jobs across accounts: usage rollups, budget sweeps; reads ledger figures, no content."""

ADMIN_ROLE = 'agentrt_admin'
"""The operator's commands (keys, budgets, seed, audit and costs over all accounts): every row of every table."""

FUNCTION_ROLES = (APP_ROLE, AUTH_ROLE, LEDGER_ROLE, JOBS_ROLE, ADMIN_ROLE)


class Unscoped(enum.Enum):
    """A session that is not one tenant's: the cross-account role it runs as, chosen explicitly in code.

    The value is the role's name.
    """

    NO_TENANT = APP_ROLE
    """The request role with no tenant set: it sees no tenant's row (health checks)."""
    TENANT_LOOKUP = AUTH_ROLE
    """Finding the tenant of an API key or an account slug, before the account is known."""
    LEDGER = LEDGER_ROLE
    """The ledger writer and its spool replay."""
    JOBS = JOBS_ROLE
    """Background work over all accounts: usage rollups, budget sweeps."""
    ADMIN = ADMIN_ROLE
    """The operator: CLI commands over all accounts, seeding, tests' set-up."""
    OWNER = ''
    """The login role itself, no role switch (it owns the tables and runs migrations): for what must work before
    migration 0012 made the roles (`agentrt db status`) and for DDL and grants of your own
    (README "Tables of your own"). Forced row-level security hides every account's rows from an owner that is not
    a superuser."""


Account = int | Unscoped
"""What a session opener takes as `account=`: a tenant's account id, or an explicit `Unscoped` role."""


def scope_of(account: Account) -> tuple[str | None, int | None]:
    """The role a session for `account` runs as (None: the login role), and the tenant it sets (None: no tenant).

    Raises:
        TypeError: `account` is neither an account id nor an `Unscoped` member (None included: a session without
            a tenant is a choice, `Unscoped.NO_TENANT`).
        ValueError: `account` is an integer out of the range of account ids (bigint).
    """
    if isinstance(account, Unscoped):
        return account.value or None, None
    if isinstance(account, int) and not isinstance(account, bool):
        if not -(2**63) <= account < 2**63:  # else PostgreSQL's own "out of range for type bigint" at the BEGIN
            raise ValueError(f'account {account} is not an account id: ids are 64-bit integers (bigint)')
        return APP_ROLE, account
    raise TypeError(f'account must be an account id or an Unscoped member, not {account!r}')
