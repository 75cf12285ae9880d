"""Looking up accounts and agent instances by slug, with errors that list what exists."""

from __future__ import annotations

import json
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

from sqlalchemy import Select, Text, bindparam, cast, exists, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from agentrt.db.driver import DriverStatement, DriverTransaction
from agentrt.db.errors import AgentRuntimeError, ConfigError, InvalidInputError
from agentrt.db.models import Account, AccountBudget, AgentInstance
from agentrt.db.models.ledger import LLMRequestRow
from agentrt.db.roles import Unscoped
from agentrt.db.session import entered_account, entering_account, get_read_only_session, row_security
from agentrt.services.pg_text import storable_text


class UnknownTenantError(AgentRuntimeError):
    """An account or agent slug that does not exist.

    Attributes:
        what: `'account'` or `'agent'`: which of the two was not found.
    """

    def __init__(self, message: str, *, what: Literal['account', 'agent'] = 'account') -> None:
        super().__init__(message)
        self.what = what


async def get_account(slug: str | int, *, session: AsyncSession) -> Account:
    """Return the account with `slug`, or with that id when it is an `int` (an operator's `--account 7`).

    Raises:
        UnknownTenantError: listing the accounts that exist (for an id: naming it).
    """
    if isinstance(slug, int):
        found = (await session.execute(select(Account).where(Account.id == slug))).scalar_one_or_none()
        if found is None:
            raise UnknownTenantError(f'unknown account id {slug}')
        return found
    # As stored text: a slug the driver cannot send (a lone surrogate of an undecodable argument) is simply unknown.
    stored = storable_text(slug)
    account = (await session.execute(select(Account).where(Account.slug == stored))).scalar_one_or_none()
    if account is None:
        known = (await session.execute(select(Account.slug).order_by(Account.slug))).scalars().all()
        hint = ', '.join(known) if known else 'none (run `agentrt db seed`)'
        raise UnknownTenantError(f'unknown account {slug!r}; accounts: {hint}')
    return account


MAX_ACCOUNT_ID = 2**63 - 1
"""`accounts.id` is a bigint."""


ID_PREFIX = 'id:'
"""`id:N` is always the account id N: a colon is no slug's (`agentrt.agents.turn_input`), so it names what an
all-digit value cannot when it is one account's slug and another's id."""


async def account_slug_or_id(value: str, *, session: AsyncSession, ledger: bool = False) -> str | int:
    """What an operator's account "slug or id" names, as `get_account` and `LedgerFilters` take it: a slug, or an id.

    `id:N` is the id N. Slugs may be all digits (`2`, `007`), so an all-digit value can be a slug, an id, or both: a
    slug of one account and the id of another is refused, never guessed (an id taken for it pruned and budgeted
    another tenant, QA). A value that is only an account's slug stays that slug; one that is no account's slug is an
    id (an unknown id is `get_account`'s error, and the ledger keeps a deleted account's rows by id). Only ASCII
    digits make an id: Python's `isdigit` takes `²` and `١` (Arabic-Indic one), which were an internal error and
    another account.

    Args:
        value: the operator's value.
        session: a session that reads every account (and, with `ledger`, every ledger row).
        ledger: the command reads or prunes ledger rows, which outlive their account: a live account's slug that is
            also the id of a deleted account with ledger rows is refused too (it listed, and pruned, the live one's).

    Raises:
        InvalidInputError: (`field` `account`) `value` is the slug of one account and the id of another, naming both
            and what names each; or an `id:` without an id (no digits, other characters, past a bigint).
    """
    if value.startswith(ID_PREFIX):
        return _explicit_id(value)
    if not (value.isascii() and value.isdigit()):
        return value
    as_id = _bigint(value)
    named = Account.slug == value if as_id is None else or_(Account.slug == value, Account.id == as_id)
    found = (await session.execute(select(Account.id, Account.slug).where(named))).all()
    by_slug = next((id_ for id_, slug in found if slug == value), None)
    by_id = next(((id_, slug) for id_, slug in found if id_ == as_id), None)
    if by_slug is not None and by_id is not None and by_id[0] != by_slug:
        # Its own id is what always names each; a slug too when it is not all digits (then it is never ambiguous),
        # never the refused value itself nor another all-digit slug that may be refused as well (a swapped pair).
        other = f'{ID_PREFIX}{by_id[0]}' + ('' if by_id[1].isascii() and by_id[1].isdigit() else f' / {by_id[1]}')
        raise InvalidInputError(
            f'account {value!r} is ambiguous: {value!r} is the slug of account {by_slug} and the id of account '
            f'{by_id[0]} ({by_id[1]}); give {ID_PREFIX}{by_slug} for account {by_slug}, or {other} for account '
            f'{by_id[0]}',
            field='account',
        )
    if (
        by_slug is not None
        and by_id is None
        and as_id is not None
        and ledger
        and await _has_ledger_rows(as_id, session)
    ):
        raise InvalidInputError(
            f'account {value!r} is ambiguous: {value!r} is the slug of account {by_slug} and the id of a deleted '
            f'account {as_id} whose model requests are in the ledger; give {ID_PREFIX}{by_slug} for account '
            f'{by_slug}, or {ID_PREFIX}{as_id} for the deleted account {as_id}',
            field='account',
        )
    if by_slug is not None or as_id is None:
        return value
    return as_id


async def _has_ledger_rows(account_id: int, session: AsyncSession) -> bool:
    """Whether the ledger has a row of `account_id`: one probe of `ix_llm_requests_account_id_started_at`."""
    return bool((await session.execute(select(exists().where(LLMRequestRow.account_id == account_id)))).scalar())


def _bigint(digits: str) -> int | None:
    """ASCII `digits` as an account id, None past a bigint: the length first, no `int()` of thousands of digits
    (Python refuses past 4,300) nor a bind past a bigint."""
    if len(digits) > len(str(MAX_ACCOUNT_ID)):
        return None
    number = int(digits)
    return number if number <= MAX_ACCOUNT_ID else None


def _explicit_id(value: str) -> int:
    """The id of an `id:N` value; `InvalidInputError` when N is not one (an id of digits, at most a bigint)."""
    digits = value[len(ID_PREFIX) :]
    as_id = _bigint(digits) if digits.isascii() and digits.isdigit() else None
    if as_id is not None:
        return as_id
    shown = reprlib.repr(value)
    raise InvalidInputError(
        f'account {shown} is not an account id: {ID_PREFIX} takes the digits of one (at most {MAX_ACCOUNT_ID})',
        field='account',
    )


async def get_agent_instance(account: Account, slug: str | None, *, session: AsyncSession) -> AgentInstance:
    """Return the account's agent instance `slug`, or its first one when `slug` is None.

    Raises:
        UnknownTenantError: listing the account's agents.
    """
    query = select(AgentInstance).where(AgentInstance.account_id == account.id).order_by(AgentInstance.id)
    agents = (await session.execute(query)).scalars().all()
    for agent in agents:
        if slug is None or agent.slug == slug:
            return agent
    hint = ', '.join(a.slug for a in agents) or 'none'
    raise UnknownTenantError(f'unknown agent {slug!r} for account {account.slug!r}; agents: {hint}', what='agent')


@dataclass(frozen=True)
class Tenant:
    """An account and one of its agent instances: what a chat turn needs to know about who is asking."""

    account_id: int
    account_slug: str
    agent_instance_id: int
    agent_instance_slug: str
    agent_type: str
    config: dict[str, Any]
    has_budget: bool | None = None
    """Whether the account had a budget when it was looked up (None: not asked)."""


async def lookup_tenant(
    account: str, agent_instance: str | None, *, session: AsyncSession, enter: bool = False
) -> Tenant:
    """The account `account` and its agent instance `agent_instance` (its first one when None): one query.

    With `enter`, the same statement makes the rest of the session's transaction the found account's (the request
    role with its tenant: `agentrt.db.session.entering_account`): for a session opened with
    `Unscoped.TENANT_LOOKUP` that goes on as the tenant, without a statement more.

    Raises:
        UnknownTenantError: listing the accounts, or the account's agents, that exist.
    """
    query = _tenant_query(agent_instance is not None, enter and row_security())
    params = {'account': account} if agent_instance is None else {'account': account, 'agent_instance': agent_instance}
    row = (await session.execute(query, params)).first()
    if row is None:
        raise await _unknown(account, agent_instance, session)
    if enter:
        entered_account(session, row[0])
    return _tenant_of(row, row[5])


async def lookup_tenant_on(
    transaction: DriverTransaction, account: str, agent_instance: str | None, *, enter: bool = False
) -> Tenant | None:
    """`lookup_tenant`'s statement in a transaction on the driver connection (a chat turn's start); None when it
    found nothing (`unknown_tenant_error` says what exists, in a session of its own).

    With `enter`, the rest of the transaction is the found account's, as for `lookup_tenant`.
    """
    statement = _tenant_statement(agent_instance is not None, enter and row_security())
    rows = await transaction.fetch(statement, {'account': account, 'agent_instance': agent_instance})
    if not rows:
        return None
    return _tenant_of(rows[0], rows[0][5])


async def unknown_tenant_error(account: str, agent_instance: str | None) -> UnknownTenantError:
    """The error for slugs `lookup_tenant_on` found nothing for, listing what exists (a read-only session)."""
    async with get_read_only_session(account=Unscoped.TENANT_LOOKUP) as session:
        return await _unknown(account, agent_instance, session)


async def _unknown(account: str, agent_instance: str | None, session: AsyncSession) -> UnknownTenantError:
    """The error for slugs the tenant query found nothing for: the queries that know say what exists."""
    try:
        account_row = await get_account(account, session=session)
        await get_agent_instance(account_row, agent_instance, session=session)
    except UnknownTenantError as exc:
        return exc
    return UnknownTenantError(f'unknown agent {agent_instance!r} for account {account!r}', what='agent')


def _tenant_of(row: Any, config: str | None) -> Tenant:
    """The `Tenant` of a row of `_tenant_query` (`config`: its config column, JSON text).

    Raises:
        ConfigError: the agent instance's config is not a JSON object, or its `schemas` not a list of names.
    """
    checked = _checked_config(row[1], row[3], None if config is None else json.loads(config))
    return Tenant(row[0], row[1], row[2], row[3], row[4], checked, has_budget=bool(row[6]))


def _checked_config(account: str, agent: str, config: Any) -> dict[str, Any]:
    """An agent instance's config as a dict, checked where the runtime reads it. A malformed one (written by hand in
    the table) was a raw `TypeError` in the turn, or read a string of schemas letter by letter; and the directory
    tools took `schemas` they could not read as no restriction at all."""
    where = f'the config of agent instance {agent!r} of account {account!r}'
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ConfigError(f'{where} must be a JSON object (or null), not {_json_type(config)}; fix its row')
    try:
        configured_schemas(config, where=where)
    except ConfigError as exc:
        raise ConfigError(f'{exc}; fix its row') from None
    return dict(config)


def configured_schemas(config: Mapping[str, Any], *, where: str = 'the agent config') -> list[str] | None:
    """The directories an agent's config (`config['schemas']`) restricts its directory tools to: the one reading of it.

    The tenant lookup checks a stored config with it; the directory tools and the agent's instructions read
    `SessionDependencies.config` with it on each use, since deps built by hand never went through the lookup.

    Args:
        config: an agent instance's config, as `SessionDependencies.config`.
        where: what the config belongs to, named by the error.

    Returns:
        The schema names (possibly none), or None when `schemas` is absent or null: no restriction.

    Raises:
        ConfigError: `schemas` is present but not a list or tuple of strings (the value named): a string would be
            read letter by letter, and a value that cannot be read must never mean every directory.
    """
    schemas = config.get('schemas')
    if schemas is None:
        return None
    if isinstance(schemas, list | tuple) and all(isinstance(name, str) for name in schemas):
        return list(schemas)
    holding = ' holding other values' if isinstance(schemas, list | tuple) else ''
    raise ConfigError(
        f'{where}: "schemas" must be a list of schema names (text), not {_json_type(schemas)}{holding}: '
        f'{reprlib.repr(schemas)}'
    )


def _json_type(value: Any) -> str:
    """The JSON type of a decoded value, in JSON's words (a tuple, as `SessionDependencies` may hold, an array)."""
    for types, name in ((bool, 'a boolean'), (int | float, 'a number'), (str, 'a string'), (list | tuple, 'an array')):
        if isinstance(value, types):
            return name
    return 'an object' if isinstance(value, dict) else type(value).__name__


@cache
def _tenant_statement(by_agent: bool, enter: bool) -> DriverStatement:
    """`_tenant_query` compiled for the driver connection, once per shape."""
    return DriverStatement.of(_tenant_query(by_agent, enter))


@cache
def _tenant_query(by_agent: bool, enter: bool) -> Select[*tuple[Any, ...]]:
    """`lookup_tenant`'s statement, built once per shape: the slugs are parameters (`account`, `agent_instance`), so
    SQLAlchemy neither rebuilds it nor computes its cache key on each turn."""
    query: Select[*tuple[Any, ...]] = (  # seven columns, eight with `enter`
        select(
            Account.id,
            Account.slug,
            AgentInstance.id,
            AgentInstance.slug,
            AgentInstance.agent_type,
            # As JSON text on both paths, decoded in `_tenant_of`: the driver decodes JSON itself, and a config that
            # is a JSON string holding JSON text could not be told from text still to decode.
            cast(AgentInstance.config, Text),
            exists().where(AccountBudget.account_id == Account.id),
        )
        .join(AgentInstance, AgentInstance.account_id == Account.id)
        .where(Account.slug == bindparam('account'))
        .order_by(AgentInstance.id)
        .limit(1)
    )
    if by_agent:
        query = query.where(AgentInstance.slug == bindparam('agent_instance'))
    if enter:  # one account's rows at most (the slug is unique), so whichever row computes it sets the same tenant
        query = query.add_columns(*entering_account(Account.id))
    return query
