"""Tenant isolation over HTTP: green-grocer's key never reaches acme-health's conversations, audit rows or costs,
whatever ids it sends."""

from __future__ import annotations

import asyncio

import httpx2
from sqlalchemy import text

from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.api_keys import create_api_key, forget_cached_api_keys
from agentrt.services.background import get_supervisor
from agentrt.services.conversations import PostgresConversationStore
from agentrt.services.ledger import get_request_tracker
from tests.agents.conftest import account_id
from tests.api.conftest import Keys, agui_body, auth, chat_body
from tests.factories import scalar

AUDIT = '/api/v1/llm-audit/interactions'


async def test_another_accounts_key_sees_nothing_of_it_whatever_ids_it_sends(
    keys: Keys, client: httpx2.AsyncClient
) -> None:
    turn = await client.post(
        '/api/v1/conversations/shared-id/turns', json={'message': 'Cardiologists in Seattle'}, headers=auth(keys.acme)
    )
    assert turn.status_code == 200
    await get_request_tracker().flush()
    await get_supervisor().join()
    acme_ids = [item['id'] for item in (await client.get(AUDIT, headers=auth(keys.acme))).json()['items']]
    assert len(acme_ids) == 3

    green = auth(keys.green)
    assert (await client.get('/api/v1/conversations', headers=green)).json()['items'] == []
    assert (await client.get('/api/v1/conversations/shared-id', headers=green)).status_code == 404
    assert (await client.delete('/api/v1/conversations/shared-id', headers=green)).status_code == 404
    audit = (await client.get(AUDIT, params={'conversation_id': 'shared-id'}, headers=green)).json()
    assert audit['total'] == 0 and audit['items'] == []
    for request_id in acme_ids:
        response = await client.get(f'{AUDIT}/{request_id}', headers=green)
        assert response.status_code == 404 and request_id not in response.text.replace(
            f'no model request {request_id}', ''
        )
    for by in ('account', 'agent', 'model', 'day'):
        assert (await client.get('/api/v1/costs', params={'by': by}, headers=green)).json()['items'] == []

    # The same conversation id from green's key is green's own conversation: acme's is untouched.
    acme_store = PostgresConversationStore(await account_id('acme-health'))
    before = await acme_store.load('shared-id')
    chat = await client.post('/api/v1/chat', json=chat_body('shared-id', 'Organic berries'), headers=green)
    assert chat.status_code == 200 and chat.text.rstrip().endswith('data: [DONE]') and '"type":"error"' not in chat.text
    acme_conversation = await acme_store.load('shared-id')
    green_conversation = await PostgresConversationStore(await account_id('green-grocer')).load('shared-id')
    assert before is not None and acme_conversation is not None and green_conversation is not None
    assert acme_conversation.revision == before.revision and acme_conversation.messages == before.messages
    assert 'Cardiologists' not in str(green_conversation.messages)
    assert [
        i['conversation_id'] for i in (await client.get('/api/v1/conversations', headers=green)).json()['items']
    ] == ['shared-id']
    await get_request_tracker().flush()
    assert (await client.get(AUDIT, headers=auth(keys.acme))).json()['total'] == 3  # green's turn is not acme's
    assert (await client.get('/api/v1/conversations/shared-id', headers=auth(keys.acme))).status_code == 200


async def test_two_accounts_turns_and_reads_at_once_each_see_their_own(keys: Keys, client: httpx2.AsyncClient) -> None:
    """Both accounts' turns run while both read conversations, audit, costs and budget: every answer is the
    caller's, whatever the other account's requests do to the pool's connections meanwhile."""
    own = {'acme-health': auth(keys.acme), 'green-grocer': auth(keys.green)}
    messages = {'acme-health': 'Cardiologists in Seattle', 'green-grocer': 'Organic berries'}

    async def turn(account: str, n: int) -> None:
        response = await client.post(
            f'/api/v1/conversations/{account}-{n}/turns', json={'message': messages[account]}, headers=own[account]
        )
        assert response.status_code == 200, response.text

    async def reads(account: str) -> list[str]:
        headers = own[account]
        answers = await asyncio.gather(
            client.get('/api/v1/conversations', headers=headers),
            client.get(AUDIT, headers=headers),
            client.get('/api/v1/costs', params={'by': 'account'}, headers=headers),
            client.get('/api/v1/budget', headers=headers),
            client.get('/api/v1/me', headers=headers),
        )
        assert all(answer.status_code == 200 for answer in answers), [answer.text for answer in answers]
        conversations, audit, costs, _budget, _me = (answer.json() for answer in answers)
        assert all(item['conversation_id'].startswith(account) for item in conversations['items'])
        assert all(item['conversation_id'].startswith(account) for item in audit['items'])
        other = next(slug for slug in own if slug != account)
        assert all(other not in answer.text for answer in answers), [answer.text for answer in answers]
        assert [group['key'] for group in costs['items']] in ([], [account]), costs
        return [item['conversation_id'] for item in conversations['items']]

    work = [turn(account, n) for n in range(3) for account in own]
    work += [reads(account) for _ in range(3) for account in own]
    await asyncio.gather(*work)
    await get_request_tracker().flush()
    schemas = {'acme-health': 'medical_providers', 'green-grocer': 'produce_suppliers'}
    for account in own:
        assert sorted(await reads(account)) == [f'{account}-{n}' for n in range(3)]
        for n in range(3):  # the turn's tool calls and results: its own account's directory only
            conversation = await client.get(f'/api/v1/conversations/{account}-{n}', headers=own[account])
            other = next(schema for slug, schema in schemas.items() if slug != account)
            assert schemas[account] in conversation.text and other not in conversation.text


async def test_a_cursor_is_refused_by_another_account_and_by_another_listing(
    keys: Keys, client: httpx2.AsyncClient
) -> None:
    # A cursor is a position in one account's listing. Another account's key was answered with a page of its own rows
    # from that position (a wrong page, silently), and the audit's cursor gave the conversations listing one too.
    for conversation in ('c1', 'c2'):
        for key in (keys.acme, keys.green):
            turn = await client.post(
                f'/api/v1/conversations/{conversation}/turns', json={'message': 'hi'}, headers=auth(key)
            )
            assert turn.status_code == 200
    await get_request_tracker().flush()
    acme, green = auth(keys.acme), auth(keys.green)
    conversations = (await client.get('/api/v1/conversations', params={'limit': 1}, headers=acme)).json()
    audit = (await client.get(AUDIT, params={'page_size': 1}, headers=acme)).json()
    by_update_page = {'limit': 1, 'order': 'updated'}
    by_update = (await client.get('/api/v1/conversations', params=by_update_page, headers=acme)).json()
    assert conversations['next_cursor'] and audit['next_cursor'] and by_update['next_cursor']
    # Its own account and listing: the next page.
    assert (
        await client.get('/api/v1/conversations', params={'cursor': conversations['next_cursor']}, headers=acme)
    ).status_code == 200
    for path, cursor, headers, words in (
        ('/api/v1/conversations', conversations['next_cursor'], green, 'another account'),
        (AUDIT, audit['next_cursor'], green, 'another account'),
        ('/api/v1/conversations', audit['next_cursor'], acme, 'a position in the audit, not in the conversations'),
        (AUDIT, conversations['next_cursor'], acme, 'in the conversations by order=created, not in the audit'),
        # A position by the last update means nothing by creation (the default order): the message says which is
        # which (it named the listings' internal names, 'conversations-created' and 'conversations').
        (
            '/api/v1/conversations',
            by_update['next_cursor'],
            acme,
            'a position in the conversations by order=updated, not in the conversations by order=created',
        ),
    ):
        response = await client.get(path, params={'cursor': cursor}, headers=headers)
        body = response.json()
        assert response.status_code == 422 and body['field'] == 'cursor' and words in body['detail'], (path, body)
    # And back: a position by creation means nothing by the last update.
    params = {'order': 'updated', 'cursor': conversations['next_cursor']}
    response = await client.get('/api/v1/conversations', params=params, headers=acme)
    assert (
        response.status_code == 422
        and 'by order=created, not in the conversations by order=updated' in (response.json()['detail'])
    ), response.text


async def _account_with_an_agent(slug: str, name: str) -> int:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        account = (
            await session.execute(
                text('INSERT INTO accounts (slug, name) VALUES (:slug, :name) RETURNING id'),
                {'slug': slug, 'name': name},
            )
        ).scalar_one()
        await session.execute(
            text(
                'INSERT INTO agent_instances (account_id, slug, agent_type, config) '
                "VALUES (:account, 'bot', 'directory_assistant', '{\"schemas\": [\"medical_providers\"]}')"
            ),
            {'account': account},
        )
        return int(account)


async def _key(slug: str) -> str:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        return (await create_api_key(session=session, account=slug, name=slug)).token


async def test_a_deleted_accounts_key_still_trusted_by_the_server_never_runs_a_turn_of_the_account_given_its_slug(
    demo_data: None, client: httpx2.AsyncClient
) -> None:
    forget_cached_api_keys()
    await _account_with_an_agent('reused-slug', 'Tenant A')
    old_key = await _key('reused-slug')
    assert (await client.get('/api/v1/me', headers=auth(old_key))).status_code == 200  # checked, and now trusted
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await session.execute(text("DELETE FROM accounts WHERE slug = 'reused-slug'"))
    new_account = await _account_with_an_agent('reused-slug', 'Tenant B')
    new_key = await _key('reused-slug')
    first = await client.post(
        '/api/v1/conversations/b-conv/turns', json={'message': 'Tenant B private data'}, headers=auth(new_key)
    )
    assert first.status_code == 200
    await get_request_tracker().flush()
    store = PostgresConversationStore(new_account)
    before = await store.load('b-conv')
    rows = await scalar('SELECT count(*) FROM llm_requests WHERE account_id = :account', account=new_account)

    # The old key, within the server's trust of it, on every chat route: refused, as a key whose account is gone.
    tries = [
        ('/api/v1/conversations/b-conv/turns', {'message': 'what did I say?'}),
        ('/api/v1/chat', chat_body('b-conv', 'what did I say?')),
        ('/api/v1/chat/ag-ui', agui_body('b-conv', 'what did I say?')),
    ]
    for route, body in tries:
        response = await client.post(route, json=body, headers=auth(old_key))
        assert response.status_code == 401, response.text
        refusal = response.json()
        assert refusal['type'] == 'unauthorized' and refusal['detail'] == "the API key's account no longer exists"
    await get_request_tracker().flush()
    after = await store.load('b-conv')
    assert before is not None and after is not None
    assert after.revision == before.revision and after.messages == before.messages
    assert await scalar('SELECT count(*) FROM llm_requests WHERE account_id = :account', account=new_account) == rows
    assert await scalar('SELECT count(*) FROM conversation_turns') == 0  # no claim left behind
    # The new account's own key goes on.
    again = await client.post('/api/v1/conversations/b-conv/turns', json={'message': 'more'}, headers=auth(new_key))
    assert again.status_code == 200
