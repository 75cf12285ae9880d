"""API keys: created for an account and shown once, stored as a SHA-256 of the secret, listed, revoked, checked.

A key reads `art_<prefix>_<secret>`: `art_<prefix>` is its public id (listed, used to revoke it, safe in logs),
the secret is 32 random bytes. Only the prefix and the secret's SHA-256 are stored; a hash without salt or
stretching is enough because the secret is random, not a password. `authenticate_api_key` checks a key in its own
short session and then trusts it for `AGENTRT_API_KEY_CACHE_SECONDS` in this process, so a revoked key stops
working within that time (at once in the process that revoked it). A prefix with no usable key (unknown or revoked) is
remembered as refused for the same time, so a client retrying a revoked key in a loop costs no session per request.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

from sqlalchemy import event, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, SessionTransaction

from agentrt.db.engine import current_settings
from agentrt.db.errors import AgentRuntimeError, InvalidInputError
from agentrt.db.forks import forget_in_child
from agentrt.db.models import API_KEY_SCOPES, Account, ApiKey
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.pg_text import describe_char, preview, storable_text
from agentrt.services.tenancy import get_account

KEY_PREFIX = 'art'
_TOKEN = re.compile(r'art_([0-9a-f]{12})_([A-Za-z0-9_-]{43})')
_PUBLIC_ID = re.compile(r'(?:art_)?([0-9a-f]{12})(?:_[A-Za-z0-9_-]{43})?')
_CACHE_LIMIT = 10_000
_T = TypeVar('_T')
_TOUCH_EVERY_S = 60


class UnknownApiKeyError(AgentRuntimeError, LookupError):
    """No API key has this id."""


@dataclass(frozen=True)
class ApiCaller:
    """Who a valid API key speaks for: its account and what it may do."""

    key_id: int
    key_prefix: str
    account_id: int
    account_slug: str
    scopes: frozenset[str]

    @property
    def public_id(self) -> str:
        """The key's public id, `art_<prefix>`, for logs."""
        return f'{KEY_PREFIX}_{self.key_prefix}'


@dataclass(frozen=True)
class ApiKeyInfo:
    """An API key as listed: everything but the secret."""

    id: int
    public_id: str
    account_slug: str
    name: str
    scopes: list[str]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True)
class NewApiKey:
    """A key just created: `token` is the whole key, shown this once and never stored."""

    token: str
    info: ApiKeyInfo


def check_scopes(scopes: Iterable[str]) -> list[str]:
    """The scopes, deduplicated in a fixed order.

    Raises:
        InvalidInputError: an unknown scope, or none at all.
    """
    wanted = {scope.strip().lower() for scope in scopes}
    unknown = sorted(wanted - set(API_KEY_SCOPES))
    if unknown:
        raise InvalidInputError(f'unknown scope {unknown[0]!r}; scopes: {", ".join(API_KEY_SCOPES)}', field='scopes')
    if not wanted:
        raise InvalidInputError(f'a key needs at least one scope: {", ".join(API_KEY_SCOPES)}', field='scopes')
    return [scope for scope in API_KEY_SCOPES if scope in wanted]


MAX_NAME_CHARS = 200
"""The longest key name (its column)."""


def check_key_name(name: str) -> None:
    """Refuse a key name that is too long, or holds a character that does not belong in a one-line label.

    Raises:
        InvalidInputError: field `name`, saying which character and where.
    """
    if len(name) > MAX_NAME_CHARS:
        raise InvalidInputError(
            f'a key name is at most {MAX_NAME_CHARS} characters, this one {len(name):,}', field='name'
        )
    # What a label cannot hold: what Python's `isprintable` refuses. Control characters (a tab or a newline broke
    # `keys list`'s table into extra lines), line and paragraph separators, bidirectional overrides and isolates (a
    # name printed reordered), and invisible format characters (U+200B, U+FEFF, tags: `ad\u200bmin` read `admin`).
    if not name.isprintable():
        position, char = next((i, char) for i, char in enumerate(name) if not char.isprintable())
        raise InvalidInputError(
            f'the key name {preview(name)} has a character not allowed in a name at position {position} '
            f'({describe_char(char)}): a name is one line of printable text',
            field='name',
        )
    if name and not name.strip():
        # Stored as it is, it listed as an empty cell beside keys with no name ('-'): leave `--name` out for none.
        # Said by its length, not quoted: a line of spaces in quotes reads as one (the CLI's error line folds runs of
        # whitespace), or as nothing at all (QA). What is printable and blank is spaces only (a tab, a no-break space:
        # refused above).
        spaces = f'{len(name)} space{"s" if len(name) > 1 else ""}'
        raise InvalidInputError(
            f'the key name is blank (only whitespace: {spaces}): give a visible label, or no name at all', field='name'
        )


async def create_api_key(
    *, session: AsyncSession, account: str, name: str = '', scopes: Sequence[str] = API_KEY_SCOPES
) -> NewApiKey:
    """Create a key for `account`; the returned `token` is the only copy of the secret.

    Raises:
        UnknownTenantError: no such account. InvalidInputError: an unknown scope, or a name `check_key_name` refuses
            (over 200 characters; a control character such as a tab, a newline or an escape, or a NUL or a lone
            surrogate, which PostgreSQL cannot store).
    """
    allowed = check_scopes(scopes)
    check_key_name(name)
    account_row = await get_account(account, session=session)
    prefix, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    row = ApiKey(account_id=account_row.id, prefix=prefix, secret_hash=_digest(secret), name=name, scopes=allowed)
    _refused.pop(prefix, None)
    session.add(row)
    await session.flush()
    await session.refresh(row)
    return NewApiKey(token=f'{KEY_PREFIX}_{prefix}_{secret}', info=_info(row, account_row.slug))


async def list_api_keys(
    *, session: AsyncSession, account: str | None = None, include_revoked: bool = False
) -> list[ApiKeyInfo]:
    """Keys, oldest first: of one account (a slug) or all; revoked ones only when asked."""
    query = select(ApiKey, Account.slug).join(Account, Account.id == ApiKey.account_id).order_by(ApiKey.id)
    if account is not None:
        # As stored text, as `get_account` does: a slug the driver cannot send (an undecodable argument) matches none.
        query = query.where(Account.slug == storable_text(account))
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    return [_info(row, slug) for row, slug in (await session.execute(query))]


def quoted_key_argument(key: str) -> str:
    """`key`, an argument that is not a key id, as an error may quote it: at most its first 16 characters (`art_` and
    12 hex digits, a public id's length), so a whole key pasted with a typo shows none of its secret (the secret's
    redaction needs all of it, which a cut or a typo leaves unrecognised)."""
    text = key.strip()  # as `revoke_api_key` reads it
    return repr(text[:16]) + ('…' if len(text) > 16 else '')


def is_key_id(key: str) -> bool:
    """Whether `key` has the form `revoke_api_key` takes: a public id (`art_<12 hex digits>`), its bare prefix or a
    whole key (a caller can refuse a malformed one before it opens a session)."""
    return _PUBLIC_ID.fullmatch(key.strip()) is not None


async def revoke_api_key(*, session: AsyncSession, key: str) -> ApiKeyInfo:
    """Revoke a key by its public id (`art_<prefix>`), its bare prefix or the whole key. Revoking twice is harmless.

    Raises:
        UnknownApiKeyError: no key has that id.
    """
    match = _PUBLIC_ID.fullmatch(key.strip())
    if match is None:
        raise UnknownApiKeyError(f'not an API key id: {quoted_key_argument(key)} (expected art_ and 12 hex digits)')
    prefix = match.group(1)
    statement = (
        update(ApiKey)
        .where(ApiKey.prefix == prefix)
        .values(revoked_at=func.coalesce(ApiKey.revoked_at, func.now()))
        .returning(ApiKey)
    )
    row = (await session.execute(statement)).scalar_one_or_none()
    if row is None:
        raise UnknownApiKeyError(f'no API key {KEY_PREFIX}_{prefix}')
    slug = (await session.execute(select(Account.slug).where(Account.id == row.account_id))).scalar_one()
    _revoking_in(session, prefix)
    return _info(row, slug)


def _revoking_in(session: AsyncSession, prefix: str) -> None:
    """Forget `prefix`'s key in this process now and when `session`'s transaction ends, and cache no check of it
    meanwhile: a check while the revoke is not committed reads the key as valid (it still is, for everyone), and one
    under way when it commits answers from before; cached, either kept the revoked key working for the cache time."""
    _cache.pop(prefix, None)
    _revoking[prefix] = _revoking.get(prefix, 0) + 1
    ended = False

    def on_end(_: Session, transaction: SessionTransaction) -> None:
        nonlocal ended
        if ended or transaction.parent is not None:  # a savepoint's end: the revoke is not settled yet
            return
        ended = True
        global _revocations
        _revocations += 1  # a lookup that began before this moment is not cached
        if _revoking[prefix] == 1:
            del _revoking[prefix]
        else:
            _revoking[prefix] -= 1
        _cache.pop(prefix, None)

    event.listen(session.sync_session, 'after_transaction_end', on_end)


def is_api_key_shaped(token: str) -> bool:
    """Whether `token` has the form of an API key (`art_<12 hex digits>_<43 characters>`), known or not."""
    return _TOKEN.fullmatch(token) is not None


async def authenticate_api_key(token: str) -> ApiCaller | None:
    """The caller a key speaks for, or None for a malformed, unknown, wrong or revoked key.

    Checked in one short session of its own (which also notes when the key was last used, at most once a minute),
    then cached in this process for `AGENTRT_API_KEY_CACHE_SECONDS`; concurrent first uses of one key share a
    single lookup. The secret is compared in constant time, on every call, cached or not.
    """
    match = _TOKEN.fullmatch(token)
    if match is None:
        return None
    prefix, secret = match.groups()
    refused_until = _refused.get(prefix)
    if refused_until is not None and refused_until >= time.monotonic():
        return None
    digest = _digest(secret)
    cached = _cache.get(prefix)
    if cached is None or cached.expires < time.monotonic():
        cached = await _lookup_once(prefix, digest)
    if cached is None or not hmac.compare_digest(cached.secret_hash, digest):
        return None
    return cached.caller


def forget_cached_api_keys() -> None:
    """Drop every cached key and refusal in this process (the next use of each reads the database again).

    For tests: the runtime never calls it."""
    _cache.clear()
    _refused.clear()


@dataclass(frozen=True)
class _Cached:
    caller: ApiCaller
    secret_hash: bytes
    expires: float


_cache: dict[str, _Cached] = {}
# Prefixes with no usable key, and until when (monotonic) that answer stands. Apart from `_cache`: a flood of unknown
# prefixes must not push the keys in use out of it. A refused prefix can turn usable only by a new key drawing the
# same 48 random bits (`create_api_key` forgets it here; another process's within the cache time).
_refused: dict[str, float] = {}
_inflight: dict[str, asyncio.Future[_Cached | None]] = {}
# Revokes of this process not committed (or rolled back) yet, by prefix, and how many have ended: a check of a key
# under revocation, or one that began before a revoke ended, answers but is not cached (`_revoking_in`).
_revoking: dict[str, int] = {}
_revocations = 0


def _forget_the_parents() -> list[object]:
    """In a forked child: the parent's lookups in flight are futures of the parent's loop, which nothing in the child
    resolves (`agentrt.db.forks`)."""
    left = dict(_inflight)
    _inflight.clear()
    return [left]


forget_in_child(_forget_the_parents)


async def _lookup_once(prefix: str, digest: bytes) -> _Cached | None:
    """One database lookup per prefix at a time: concurrent callers await the same one (its `digest` decides only
    whether the key's use is noted)."""
    pending = _inflight.get(prefix)
    if pending is not None:
        return await asyncio.shield(pending)
    future: asyncio.Future[_Cached | None] = asyncio.get_running_loop().create_future()
    _inflight[prefix] = future
    try:
        found = await _lookup(prefix, digest)
    except BaseException as exc:
        future.set_exception(exc)
        future.exception()  # retrieved here, so a lookup nobody else awaited is not reported as lost
        raise
    else:
        future.set_result(found)
        return found
    finally:
        del _inflight[prefix]


async def _lookup(prefix: str, digest: bytes) -> _Cached | None:
    """The key of `prefix`, noting its use when `digest` is its secret's: a wrong secret (anyone may know a key's
    public id, `art_<prefix>`: it is shown in logs) never makes an unused key look used."""
    query = (
        select(ApiKey.id, ApiKey.secret_hash, ApiKey.scopes, Account.id, Account.slug)
        .join(Account, Account.id == ApiKey.account_id)
        .where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))
    )
    revocations = _revocations
    async with get_db_session(account=Unscoped.TENANT_LOOKUP) as session:  # any account's key
        row = (await session.execute(query)).first()
        if row is None:
            _remember(_refused, prefix, time.monotonic() + current_settings().api_key_cache_seconds)
            return None
        key_id, secret_hash, scopes, account_id, slug = row
        stale = func.now() - timedelta(seconds=_TOUCH_EVERY_S)
        touch = update(ApiKey).where(
            ApiKey.id == key_id,
            ApiKey.secret_hash == digest,
            func.coalesce(ApiKey.last_used_at, stale) <= stale,
        )
        await session.execute(touch.values(last_used_at=func.now()))
    caller = ApiCaller(key_id, prefix, account_id, slug, frozenset(scopes))
    entry = _Cached(caller, bytes(secret_hash), time.monotonic() + current_settings().api_key_cache_seconds)
    if revocations == _revocations and prefix not in _revoking:  # else: the answer of a moment a revoke has passed
        _remember(_cache, prefix, entry)
    _refused.pop(prefix, None)
    return entry


def _remember(entries: dict[str, _T], prefix: str, value: _T) -> None:
    """Store `value` for `prefix`, dropping the oldest entry at `_CACHE_LIMIT`: the cache stays bounded."""
    entries.pop(prefix, None)  # re-inserted last: the newest
    if len(entries) >= _CACHE_LIMIT:
        entries.pop(next(iter(entries)))  # the oldest entry: dicts keep insertion order
    entries[prefix] = value


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _info(row: ApiKey, account_slug: str) -> ApiKeyInfo:
    return ApiKeyInfo(
        id=row.id,
        public_id=f'{KEY_PREFIX}_{row.prefix}',
        account_slug=account_slug,
        name=row.name,
        scopes=list(row.scopes),
        created_at=row.created_at,
        last_used_at=row.last_used_at,
        revoked_at=row.revoked_at,
    )
