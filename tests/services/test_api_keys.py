"""API keys: created and shown once, stored as a hash, listed, revoked, checked (and cached) in one short session."""

from __future__ import annotations

import asyncio
import hashlib
import re

import pytest
from sqlalchemy import select, text, update

from agentrt.db.engine import current_settings
from agentrt.db.errors import InvalidInputError
from agentrt.db.models import ApiKey
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services import api_keys
from agentrt.services.api_keys import (
    UnknownApiKeyError,
    authenticate_api_key,
    create_api_key,
    forget_cached_api_keys,
    list_api_keys,
    revoke_api_key,
)
from agentrt.services.tenancy import UnknownTenantError


@pytest.fixture(autouse=True)
def _cold_cache() -> None:
    forget_cached_api_keys()


async def _create(account: str = 'acme-health', **kwargs: object) -> str:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        return (await create_api_key(session=session, account=account, **kwargs)).token  # type: ignore[arg-type]


async def test_a_key_is_shown_once_and_only_its_hash_is_stored(demo_data: None) -> None:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        created = await create_api_key(session=session, account='acme-health', name='ci', scopes=['read', 'chat'])
    match = re.fullmatch(r'art_([0-9a-f]{12})_([A-Za-z0-9_-]{43})', created.token)
    assert match is not None
    prefix, secret = match.groups()
    assert created.info.public_id == f'art_{prefix}' and created.info.scopes == ['chat', 'read']
    async with get_db_session(account=Unscoped.ADMIN) as session:
        row = (await session.execute(select(ApiKey))).scalar_one()
        dump = str((await session.execute(text('SELECT row_to_json(api_keys)::text FROM api_keys'))).scalar_one())
    assert row.prefix == prefix and bytes(row.secret_hash) == hashlib.sha256(secret.encode()).digest()
    assert secret not in dump and created.token not in dump


async def test_bad_scopes_names_and_accounts_are_refused(demo_data: None) -> None:
    with pytest.raises(InvalidInputError, match="unknown scope 'admin'") as bad_scope:
        await _create(scopes=['chat', 'admin'])
    assert bad_scope.value.field == 'scopes'
    with pytest.raises(InvalidInputError, match='at least one scope'):
        await _create(scopes=[])
    with pytest.raises(InvalidInputError, match='200 characters'):
        await _create(name='n' * 201)
    # NUL (PostgreSQL text cannot hold it) and a lone surrogate (an undecodable byte of argv under surrogateescape:
    # the driver cannot encode it) are refused with the field named, never a driver error.
    for name, said in (('ci\x00', 'U+0000, NUL'), ('\udcffci', 'U+DCFF, a lone surrogate'), ('c\ud800i', 'U+D800')):
        with pytest.raises(
            InvalidInputError, match=f'not allowed in a name at position .* \\({re.escape(said)}'
        ) as bad_name:
            await _create(name=name)
        assert bad_name.value.field == 'name'
    with pytest.raises(UnknownTenantError, match='unknown account'):
        await _create(account='nobody')


async def test_list_and_revoke(demo_data: None) -> None:
    acme, green = await _create(name='a'), await _create('green-grocer', name='g')
    async with get_db_session(account=Unscoped.ADMIN) as session:
        first = await revoke_api_key(session=session, key=acme[:16])  # the public id
        again = await revoke_api_key(session=session, key=acme)  # the whole key: harmless twice
        assert first.revoked_at is not None and again.revoked_at == first.revoked_at
        assert [k.name for k in await list_api_keys(session=session)] == ['g']
        assert [k.name for k in await list_api_keys(session=session, include_revoked=True)] == ['a', 'g']
        assert [k.name for k in await list_api_keys(session=session, account='green-grocer')] == ['g']
        for unknown in ('art_000000000000', 'nonsense', green[4:16] + 'zz'):
            with pytest.raises(UnknownApiKeyError):
                await revoke_api_key(session=session, key=unknown)
        # A whole key mistyped: the error quotes no part of its secret (it quoted 23 characters of it).
        with pytest.raises(UnknownApiKeyError, match='not an API key id') as mistyped:
            await revoke_api_key(session=session, key=green + 'x')
        assert green[17:23] not in str(mistyped.value) and green[:16] in str(mistyped.value)
    assert await authenticate_api_key(acme) is None
    caller = await authenticate_api_key(green)
    assert caller is not None and caller.account_slug == 'green-grocer' and caller.scopes == {'chat', 'read'}


async def test_a_checked_key_is_trusted_for_the_cache_time_only(
    demo_data: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = await _create()
    assert await authenticate_api_key(token) is not None
    assert await authenticate_api_key(token[:-1] + ('A' if token[-1] != 'A' else 'B')) is None  # cached, still checked
    async with get_db_session(
        account=Unscoped.ADMIN
    ) as session:  # revoked by another process: this one does not know yet
        await session.execute(update(ApiKey).values(revoked_at=text('now()')))
    assert await authenticate_api_key(token) is not None
    monkeypatch.setattr(current_settings(), 'api_key_cache_seconds', 0.0)
    forget_cached_api_keys()
    token2 = await _create()
    assert await authenticate_api_key(token2) is not None
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await session.execute(update(ApiKey).values(revoked_at=text('now()')))
    assert await authenticate_api_key(token2) is None  # no cache: refused at once


async def test_concurrent_first_uses_of_a_key_share_one_lookup(
    demo_data: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = await _create()
    lookups = 0
    real = api_keys._lookup

    async def counted(prefix: str, digest: bytes) -> object:
        nonlocal lookups
        lookups += 1
        await asyncio.sleep(0.05)
        return await real(prefix, digest)

    monkeypatch.setattr(api_keys, '_lookup', counted)
    callers = await asyncio.gather(*(authenticate_api_key(token) for _ in range(50)))
    assert lookups == 1 and all(caller is not None for caller in callers)


async def test_a_wrong_secret_with_a_keys_public_id_does_not_note_the_key_as_used(demo_data: None) -> None:
    # The public id (`art_<prefix>`) is shown in logs and listings: knowing it, anyone could keep an unused key
    # looking used (`agentrt keys list`'s last use), the sign an operator revokes stale keys by.
    token = await _create()
    wrong = token[:-1] + ('A' if token[-1] != 'A' else 'B')
    assert await authenticate_api_key(wrong) is None
    async with get_db_session(account=Unscoped.ADMIN) as session:
        assert (await session.execute(select(ApiKey.last_used_at))).scalar_one() is None
    forget_cached_api_keys()
    assert await authenticate_api_key(token) is not None
    async with get_db_session(account=Unscoped.ADMIN) as session:
        assert (await session.execute(select(ApiKey.last_used_at))).scalar_one() is not None


async def test_a_refused_key_is_remembered_for_the_cache_time(demo_data: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # A client retrying a revoked (or made-up) key in a loop opened a database session per request.
    lookups = 0
    real = api_keys._lookup

    async def counted(prefix: str, digest: bytes) -> object:
        nonlocal lookups
        lookups += 1
        return await real(prefix, digest)

    monkeypatch.setattr(api_keys, '_lookup', counted)
    revoked = await _create()
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await revoke_api_key(session=session, key=revoked)
    unknown = 'art_0123456789ab_' + 'A' * 43
    for _ in range(20):
        assert await authenticate_api_key(revoked) is None
        assert await authenticate_api_key(unknown) is None
    assert lookups == 2
    # A key created in this process under a remembered prefix (48 random bits, so only by chance) is usable at once.
    monkeypatch.setattr(api_keys.secrets, 'token_hex', lambda _: '0123456789ab')
    made = await _create()
    assert made.startswith('art_0123456789ab_') and await authenticate_api_key(made) is not None
    # Past the cache time, a refusal is asked again.
    monkeypatch.setattr(current_settings(), 'api_key_cache_seconds', 0.0)
    forget_cached_api_keys()
    assert await authenticate_api_key(revoked) is None
    await asyncio.sleep(0.01)
    assert await authenticate_api_key(revoked) is None
    assert lookups == 5


def test_a_flood_of_unknown_prefixes_stays_bounded_and_keeps_the_keys_in_use() -> None:
    cached = api_keys._Cached(api_keys.ApiCaller(1, 'f' * 12, 1, 'acme', frozenset({'chat'})), b'h', float('inf'))
    api_keys._cache['f' * 12] = cached
    for n in range(api_keys._CACHE_LIMIT + 50):
        api_keys._remember(api_keys._refused, f'{n:012x}', float('inf'))
    assert len(api_keys._refused) == api_keys._CACHE_LIMIT and '000000000000' not in api_keys._refused
    assert api_keys._cache == {'f' * 12: cached}
    forget_cached_api_keys()
    assert not api_keys._refused and not api_keys._cache


async def test_a_revoke_takes_effect_at_once_in_its_process_even_with_checks_during_it(demo_data: None) -> None:
    # The revoke dropped the key from this process's cache before its transaction committed: a check in between read
    # the key as still valid (the revoke not committed yet) and cached it again, and so did a check whose lookup was
    # under way when the revoke committed: the revoked key then worked for AGENTRT_API_KEY_CACHE_SECONDS (30 s).
    during, across = await _create(), await _create()
    assert await authenticate_api_key(during) is not None
    forget_cached_api_keys()
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await revoke_api_key(session=session, key=during)
        await revoke_api_key(session=session, key=across)
        assert await authenticate_api_key(during) is not None  # not committed yet: still valid for everyone
        # A first use notes the key as used: that update waits for the revoke's lock on the row, after reading it.
        in_flight = asyncio.create_task(authenticate_api_key(across))
        while not await _waiting_for_a_lock():  # noqa: ASYNC110 - polling the server
            await asyncio.sleep(0.02)
    assert await in_flight is not None  # read before the revoke committed
    assert await authenticate_api_key(during) is None
    assert await authenticate_api_key(across) is None


async def _waiting_for_a_lock() -> bool:
    """Whether a session of this test's database waits for a lock (pg_locks: pg_stat_activity hides another role's
    wait events)."""
    async with get_db_session(account=Unscoped.ADMIN) as session:
        waiting = await session.execute(
            text(
                'SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) '
                'WHERE NOT l.granted AND a.datname = current_database()'
            )
        )
        return bool(waiting.scalar_one())
