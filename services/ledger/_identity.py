"""Who a ledger row belongs to, read from a run's `ctx.deps` through the `RunIdentity` protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@runtime_checkable
class RunIdentity(Protocol):
    """What the ledger reads from `ctx.deps`. `SessionDependencies` has it; so may any deps type of your own.

    A run whose deps lack any of these (or are None) is still recorded, without identity.
    """

    @property
    def session_id(self) -> str:
        """The chat session (conversation) id."""
        ...

    @property
    def account_id(self) -> int:
        """The account (tenant) id."""
        ...

    @property
    def account_slug(self) -> str:
        """The account's slug."""
        ...

    @property
    def agent_instance_id(self) -> int:
        """The agent instance id."""
        ...

    @property
    def agent_instance_slug(self) -> str:
        """The agent instance's slug."""
        ...

    @property
    def agent_type(self) -> str:
        """The kind of agent, e.g. `simple_chat`."""
        ...


@dataclass(frozen=True, slots=True)
class LedgerIdentity:
    """The identity columns of a ledger row; None where the deps did not say."""

    chat_session_id: str | None = None
    account_id: int | None = None
    account_slug: str | None = None
    agent_instance_id: int | None = None
    agent_instance_slug: str | None = None
    agent_type: str | None = None


_MEMBERS = ('session_id', 'account_id', 'account_slug', 'agent_instance_id', 'agent_instance_slug', 'agent_type')
_MISSING = object()


def identity_of(deps: object) -> LedgerIdentity:
    """The ledger identity of a run's deps: from a `RunIdentity`, with values of the wrong type left out.

    What `isinstance(deps, RunIdentity)` checks (every member present), read once, without the protocol check's cost.
    """
    values = [getattr(deps, name, _MISSING) for name in _MEMBERS]
    if any(value is _MISSING for value in values):
        return LedgerIdentity()
    session_id, account_id, account_slug, agent_instance_id, agent_instance_slug, agent_type = values
    return LedgerIdentity(
        chat_session_id=str(session_id) if isinstance(session_id, str | int) else None,
        account_id=_id(account_id),
        account_slug=_text(account_slug),
        agent_instance_id=_id(agent_instance_id),
        agent_instance_slug=_text(agent_instance_slug),
        agent_type=_text(agent_type),
    )


def _id(value: object) -> int | None:
    # Deps are typed `Any` at run time: a bool or a string id would be a wrong billing row, not an error.
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None
