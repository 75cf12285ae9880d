"""The read API: the audit (pages, filters, totals, cursor, detail), costs, and conversations; the non-streamed turn."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx2
import jsonschema_rs
import pytest
from sqlalchemy import text as sql

from agentrt.api.conversations import entity_tag
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.background import get_supervisor
from agentrt.services.ledger import LedgerRecord, LLMRequestTracker, get_request_tracker, prune_contents
from tests.agents.conftest import account_id
from tests.api.conftest import Keys, auth, chat_body
from tests.factories import fast_config, ledger_record

AUDIT = '/api/v1/llm-audit/interactions'
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


async def _record(tmp_path: Path, records: list[LedgerRecord]) -> None:
    tracker = LLMRequestTracker(fast_config(tmp_path))
    for record in records:
        await tracker.track_request(record)
    await tracker.flush()


def _row(account: int, slug: str, minute: int, *, success: bool = True, **fields: Any) -> LedgerRecord:
    values: dict[str, Any] = {
        'started_at': T0 + timedelta(minutes=minute),
        'cost': '0.001',
        'account_id': account,
        'account_slug': slug,
        'agent_instance_slug': 'helper',
        'chat_session_id': f'conv-{minute % 3}',
        'error_type': None if success else 'ModelHTTPError',
        'error_message': None if success else 'status_code: 503, body: overloaded',
        'raw_contents': [('prompt', '{"q": "hello"}'), ('response' if success else 'error', '{"a": "done"}')],
    }
    return ledger_record(success=success, **(values | fields))


@pytest.fixture
async def ledger(keys: Keys, tmp_path: Path) -> tuple[int, int]:
    """25 requests of acme (every fifth failed, two models) and 3 of green-grocer."""
    acme, green = await account_id('acme-health'), await account_id('green-grocer')
    rows = [
        _row(acme, 'acme-health', m, success=m % 5 != 4, model='gpt-4o' if m % 2 else 'gpt-4o-mini') for m in range(25)
    ]
    rows += [_row(green, 'green-grocer', m) for m in range(3)]
    await _record(tmp_path, rows)
    return acme, green


async def test_audit_pages_newest_first_with_totals_and_filters(
    ledger: tuple[int, int], keys: Keys, client: httpx2.AsyncClient
) -> None:
    first = (await client.get(AUDIT, params={'page': 1, 'page_size': 10}, headers=auth(keys.acme))).json()
    assert (first['total'], first['total_pages'], len(first['items'])) == (25, 3, 10)
    started = [item['started_at'] for item in first['items']]
    assert started == sorted(started, reverse=True) and started[0] == (T0 + timedelta(minutes=24)).isoformat().replace(
        '+00:00', 'Z'
    )
    last = (await client.get(AUDIT, params={'page': 3, 'page_size': 10}, headers=auth(keys.acme))).json()
    assert len(last['items']) == 5 and last['next_cursor'] is None
    beyond = (await client.get(AUDIT, params={'page': 4, 'page_size': 10}, headers=auth(keys.acme))).json()
    assert beyond['items'] == [] and beyond['total'] == 25

    failed = (await client.get(AUDIT, params={'success': 'false'}, headers=auth(keys.acme))).json()
    assert failed['total'] == 5
    assert {(i['status'], i['success'], i['error_type']) for i in failed['items']} == {
        ('error', False, 'ModelHTTPError')
    }
    model = (await client.get(AUDIT, params={'model': 'gpt-4o'}, headers=auth(keys.acme))).json()
    assert model['total'] == 12 and {i['model'] for i in model['items']} == {'gpt-4o'}
    window = {'since': '2026-03-01T12:10:00', 'until': '2026-03-01T13:15:00+01:00', 'conversation_id': 'conv-1'}
    ranged = (await client.get(AUDIT, params=window, headers=auth(keys.acme))).json()
    assert sorted(i['started_at'][14:16] for i in ranged['items']) == ['10', '13']  # minutes 10..14, conv-1
    assert (await client.get(AUDIT, params={'agent': 'helper'}, headers=auth(keys.acme))).json()['total'] == 25
    assert (await client.get(AUDIT, params={'agent': 'other'}, headers=auth(keys.acme))).json()['total'] == 0


async def test_audit_cursor_walks_every_row_once_while_new_ones_arrive(
    ledger: tuple[int, int], keys: Keys, client: httpx2.AsyncClient, tmp_path: Path
) -> None:
    seen: list[str] = []
    cursor = None
    for step in range(10):
        params: dict[str, Any] = {'page_size': 7} | ({'cursor': cursor} if cursor else {})
        page = (await client.get(AUDIT, params=params, headers=auth(keys.acme))).json()
        seen += [item['id'] for item in page['items']]
        if step == 0:  # a newer row lands after the first page: it must not shift the next ones
            await _record(tmp_path, [_row(ledger[0], 'acme-health', 60)])
        cursor = page['next_cursor']
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 25


async def test_audit_detail_shows_the_stored_prompt_and_response_or_error(
    ledger: tuple[int, int], keys: Keys, client: httpx2.AsyncClient
) -> None:
    failed = (await client.get(AUDIT, params={'success': 'false', 'page_size': 1}, headers=auth(keys.acme))).json()
    detail = (await client.get(f'{AUDIT}/{failed["items"][0]["id"]}', headers=auth(keys.acme))).json()
    assert detail['success'] is False and detail['error_message'] == 'status_code: 503, body: overloaded'
    assert [(c['kind'], c['body']) for c in detail['contents']] == [
        ('prompt', '{"q": "hello"}'),
        ('error', '{"a": "done"}'),
    ]
    missing = await client.get(f'{AUDIT}/01a23014-ea87-791c-afe7-823174d274a5', headers=auth(keys.acme))
    assert missing.status_code == 404 and missing.json()['type'] == 'not_found'


async def test_audit_detail_of_a_request_whose_bodies_were_pruned(
    ledger: tuple[int, int], keys: Keys, client: httpx2.AsyncClient
) -> None:
    acme, _ = ledger
    report = await prune_contents(conversation='conv-0', account=acme)
    assert report.requests == 9  # minutes 0, 3, ... 24
    listed = (await client.get(AUDIT, params={'conversation_id': 'conv-0'}, headers=auth(keys.acme))).json()
    assert listed['total'] == 9
    detail = await client.get(f'{AUDIT}/{listed["items"][0]["id"]}', headers=auth(keys.acme))
    assert detail.status_code == 200 and detail.json()['contents'] == []
    assert detail.json()['total_cost'] == '0.001'


async def test_costs_group_the_accounts_own_requests(
    ledger: tuple[int, int], keys: Keys, client: httpx2.AsyncClient
) -> None:
    by_model = (await client.get('/api/v1/costs', params={'by': 'model'}, headers=auth(keys.acme))).json()
    assert by_model['source'] == 'ledger'
    assert {(r['key'], r['requests'], r['failed'], r['total_cost']) for r in by_model['items']} == {
        ('gpt-4o-mini', 13, 3, '0.013'),
        ('gpt-4o', 12, 2, '0.012'),
    }
    by_day = (await client.get('/api/v1/costs', params={'by': 'day'}, headers=auth(keys.acme))).json()
    assert [(r['key'], r['requests']) for r in by_day['items']] == [('2026-03-01', 25)]
    account = (await client.get('/api/v1/costs', params={'by': 'account'}, headers=auth(keys.green))).json()
    assert [(r['key'], r['requests']) for r in account['items']] == [('green-grocer', 3)]
    rollup = await client.get(
        '/api/v1/costs', params={'source': 'rollup', 'since': '2026-03-01T12:30:00Z'}, headers=auth(keys.acme)
    )
    assert rollup.status_code == 422 and rollup.json()['field'] == 'source' and 'UTC day' in rollup.json()['detail']
    assert rollup.json()['detail'].startswith('since 2026-03-01T12:30:00+00:00 is not')  # the query's name, not a flag


async def test_json_turns_continue_a_conversation_that_can_be_listed_read_and_deleted(
    keys: Keys, client: httpx2.AsyncClient
) -> None:
    path = '/api/v1/conversations/script-1'
    first = await client.post(f'{path}/turns', json={'message': 'Cardiologists in Seattle'}, headers=auth(keys.acme))
    assert first.status_code == 200, first.text
    body = first.json()
    assert 'Seattle' in body['output'] and body['conversation_id'] == 'script-1' and body['model_name'] == 'demo'
    assert body['usage']['requests'] == 3 and body['usage']['tool_calls'] >= 2 and body['cost'] is None
    second = await client.post(f'{path}/turns', json={'message': 'and in Boston?'}, headers=auth(keys.acme))
    assert second.status_code == 200 and second.json()['usage']['requests'] == 3  # this turn's usage only
    await get_supervisor().join()
    await get_request_tracker().flush()

    listing = (await client.get('/api/v1/conversations', headers=auth(keys.acme))).json()
    assert [item['conversation_id'] for item in listing['items']] == ['script-1']
    item = listing['items'][0]
    assert item['title'] and item['summary'] and item['usage']['requests'] == 6

    read = await client.get(path, headers=auth(keys.acme))
    vercel = read.json()
    # The revision and the title's digest as the entity tag: for If-None-Match, and If-Match takes it (or the revision).
    assert read.headers['etag'] == f'"{entity_tag(vercel["revision"], vercel["title"])}"'
    assert read.headers['etag'].startswith(f'"{vercel["revision"]}.t')
    # Polling with the tag: 304 and no body while the revision stands (weak or listed tags too), the body when not.
    for tag in (read.headers['etag'], f'W/{read.headers["etag"]}', f'"other", {read.headers["etag"]}', '*'):
        unchanged = await client.get(path, headers={**auth(keys.acme), 'If-None-Match': tag})
        assert unchanged.status_code == 304 and unchanged.content == b'', tag
        assert unchanged.headers['etag'] == read.headers['etag']
    changed = await client.get(path, headers={**auth(keys.acme), 'If-None-Match': '"an-older-revision"'})
    assert changed.status_code == 200 and changed.json() == vercel
    assert vercel['title'] == item['title']  # the title as listed, on every page (the web UI's heading)
    roles = [message['role'] for message in vercel['messages']]
    assert vercel['format'] == 'vercel' and roles.count('user') == 2 and roles[0] == 'user' and roles[-1] == 'assistant'
    texts = [p['text'] for m in vercel['messages'] if m['role'] == 'user' for p in m['parts'] if p['type'] == 'text']
    assert texts == ['Cardiologists in Seattle', 'and in Boston?']
    native = (await client.get(path, params={'format': 'pydantic'}, headers=auth(keys.acme))).json()
    assert [m['kind'] for m in native['messages']][:2] == ['request', 'response']

    # Renamed (a title changes without a new revision): the tag changes, so a poll gets the new title, not a 304 (QA).
    # (As `update(title=...)` of pydantic-ai 2.78's store, or a title made in the background, leave the revision.)
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await session.execute(
            sql("UPDATE conversations SET title = 'Renamed by me' WHERE conversation_id = :c AND account_id = :a"),
            {'c': path.rsplit('/', 1)[1], 'a': await account_id('acme-health')},
        )
    renamed = await client.get(path, headers={**auth(keys.acme), 'If-None-Match': read.headers['etag']})
    assert renamed.status_code == 200 and renamed.json()['title'] == 'Renamed by me', renamed.status_code
    assert renamed.headers['etag'] != read.headers['etag'] and renamed.json()['revision'] == vercel['revision']
    stale = await client.delete(path, headers={**auth(keys.acme), 'If-Match': '"not-the-revision"'})
    assert stale.status_code == 409
    stale_list = '"not-it", "nor-this"'
    assert (await client.delete(path, headers={**auth(keys.acme), 'If-Match': stale_list})).status_code == 409
    # A list of no tag at all matches nothing ever: a 422 naming the header, not the 409 a client retried for ever.
    empty_list = await client.delete(path, headers={**auth(keys.acme), 'If-Match': ', ,'})
    assert empty_list.status_code == 422 and empty_list.json()['field'] == 'If-Match', empty_list.text
    # A list of tags matches when one does (RFC 9110; the list was read as one tag, a 409), a weak validator names the
    # same revision (it was a 409).
    listed = ', '.join([*(f'"not-it-{n:032}"' for n in range(6)), f'W/{renamed.headers["etag"]}'])  # 300 characters
    gone = await client.delete(path, headers={**auth(keys.acme), 'If-Match': listed})
    assert gone.status_code == 204  # the GET's ETag names its revision
    assert (await client.get(path, headers=auth(keys.acme))).status_code == 404
    assert (await client.delete(path, headers=auth(keys.acme))).status_code == 404
    # `If-Match: *`: whatever revision exists (RFC 9110); it was taken for a revision named "*", a 409
    assert (await client.delete(path, headers={**auth(keys.acme), 'If-Match': '*'})).status_code == 404
    again = await client.post(f'{path}/turns', json={'message': 'Dermatologists'}, headers=auth(keys.acme))
    assert again.status_code == 200, again.text
    assert (await client.delete(path, headers={**auth(keys.acme), 'If-Match': '*'})).status_code == 204
    # Several If-Match lines are one list (RFC 9110): only the first was read, a 409 where the second named it (QA).
    again = await client.post(f'{path}/turns', json={'message': 'Dermatologists'}, headers=auth(keys.acme))
    tag = (await client.get(path, headers=auth(keys.acme))).headers['etag']
    lines = [*auth(keys.acme).items(), ('If-Match', '"not-it"'), ('If-Match', tag)]
    assert (await client.delete(path, headers=lines)).status_code == 204
    # Empty lines only: the empty header's refusal, not "',' is not an entity tag" (QA).
    empty_lines = [*auth(keys.acme).items(), ('If-Match', ''), ('If-Match', ' ')]
    refused = await client.delete(path, headers=empty_lines)
    assert refused.status_code == 422 and refused.json()['detail'].startswith('If-Match is empty'), refused.text
    # `*` among empty list elements is `*` (RFC 9110 ignores empty elements; it was a 422).
    for listed_any in ('*,', ', *'):
        again = await client.post(f'{path}/turns', json={'message': 'Dermatologists'}, headers=auth(keys.acme))
        assert again.status_code == 200, again.text
        deleted = await client.delete(path, headers={**auth(keys.acme), 'If-Match': listed_any})
        assert deleted.status_code == 204, (listed_any, deleted.text)


async def test_concurrent_json_turns_on_one_conversation_one_wins_the_other_gets_409(
    keys: Keys, client: httpx2.AsyncClient
) -> None:
    outcomes = await asyncio.gather(
        *(
            client.post('/api/v1/conversations/race/turns', json={'message': text}, headers=auth(keys.acme))
            for text in ('Cardiologists in Seattle', 'Dermatologists in Boston')
        )
    )
    assert sorted(response.status_code for response in outcomes) == [200, 409]
    conflict = next(response for response in outcomes if response.status_code == 409).json()
    assert conflict['type'] == 'concurrent_turn' and 'another turn' in conflict['detail']


async def _walk(client: httpx2.AsyncClient, keys: Keys, between: Any = None, **query: Any) -> list[str]:
    """Every conversation id of a page walk of 2 a page, `between(page_number)` awaited after each page."""
    seen: list[str] = []
    cursor = None
    for number in range(1, 100):
        params: dict[str, Any] = {'limit': 2} | query | ({'cursor': cursor} if cursor else {})
        response = await client.get('/api/v1/conversations', params=params, headers=auth(keys.acme))
        assert response.status_code == 200, response.text
        page = response.json()
        seen += [item['conversation_id'] for item in page['items']]
        cursor = page['next_cursor']
        if cursor is None:
            return seen
        if between is not None:
            await between(number)
    raise AssertionError('the walk did not end')


async def test_conversation_list_pages_with_a_cursor(keys: Keys, client: httpx2.AsyncClient) -> None:
    for n in range(5):
        response = await client.post(
            f'/api/v1/conversations/c{n}/turns', json={'message': 'hi'}, headers=auth(keys.acme)
        )
        assert response.status_code == 200
    assert await _walk(client, keys) == ['c4', 'c3', 'c2', 'c1', 'c0']
    assert await _walk(client, keys, order='created') == ['c4', 'c3', 'c2', 'c1', 'c0']

    async def turn(number: int) -> None:
        # After the first page: one not listed yet (c1) and one listed already (c4) take a turn.
        for conversation in ('c1', 'c4') if number == 1 else ():
            answered = await client.post(
                f'/api/v1/conversations/{conversation}/turns', json={'message': 'again'}, headers=auth(keys.acme)
            )
            assert answered.status_code == 200

    # Newest first by creation, which a turn does not change: each conversation once, though two were updated
    # between pages (ordered by the time of the last update, c1 moved ahead of the cursor and was never listed).
    assert await _walk(client, keys, turn) == ['c4', 'c3', 'c2', 'c1', 'c0']
    # order=updated: most recently updated first (c4 then c1, from the turns above), for a first page of what is
    # recent; a walk is not stable, as README says.
    assert (await _walk(client, keys, order='updated'))[:2] == ['c4', 'c1']


async def test_costs_count_cancelled_requests_apart_from_failed_ones_in_both_sources(
    keys: Keys, client: httpx2.AsyncClient, tmp_path: Path
) -> None:
    from agentrt.services.ledger import roll_up_pending

    acme = await account_id('acme-health')
    stopped = {'status': 'cancelled', 'streamed': True, 'error_message': 'stream stopped before the response ended'}
    refused = {'status': 'refused', 'error_type': 'BudgetExceededError', 'error_message': 'not sent', 'cost': '0'}
    rows = [
        _row(acme, 'acme-health', 0),
        _row(acme, 'acme-health', 1, success=False),
        _row(acme, 'acme-health', 2, success=False, **stopped),
        _row(acme, 'acme-health', 3, success=False, **(stopped | {'streamed': False, 'error_type': 'CancelledError'})),
        _row(acme, 'acme-health', 4, success=False, **refused),
    ]
    await _record(tmp_path, rows)
    await roll_up_pending(T0 - timedelta(days=1000))
    for source in ('ledger', 'rollup'):
        body = await client.get('/api/v1/costs', params={'by': 'account', 'source': source}, headers=auth(keys.acme))
        [row] = body.json()['items']
        assert (row['requests'], row['failed'], row['cancelled']) == (4, 1, 2), source


async def test_costs_from_the_rollup_count_the_accounts_rows_no_roll_up_reached(
    keys: Keys, client: httpx2.AsyncClient, tmp_path: Path
) -> None:
    """Rows of an agent of one's own (`ledger_capability()`: no post-turn roll-up) were left out of `source=rollup`
    (QA): the read rolls up the account's queued rows first, and only its own."""
    acme, grocer = await account_id('acme-health'), await account_id('green-grocer')
    await _record(
        tmp_path, [_row(acme, 'acme-health', 0), _row(acme, 'acme-health', 1), _row(grocer, 'green-grocer', 2)]
    )
    for source in ('rollup', 'ledger'):
        body = await client.get('/api/v1/costs', params={'by': 'account', 'source': source}, headers=auth(keys.acme))
        [row] = body.json()['items']
        assert row['requests'] == 2, source
    async with get_db_session(account=Unscoped.ADMIN) as session:
        queued = await session.execute(sql('SELECT account_id FROM usage_pending_requests'))
        assert list(queued.scalars()) == [grocer]  # the other account's row waits for its own roll-up


async def test_costs_from_the_rollup_during_a_recompute_answer_from_the_ledger_at_once(
    keys: Keys, client: httpx2.AsyncClient, tmp_path: Path
) -> None:
    """The rollup read's roll-up waited 30 s for a recompute's exclusive lock, then answered 503 (QA): now the
    ledger answers at once while a recompute runs, and the report says which source it read."""
    from agentrt.services.ledger._rollups import _LOCK_EXCLUSIVE, _LOCK_KEYS

    acme = await account_id('acme-health')
    await _record(tmp_path, [_row(acme, 'acme-health', 0), _row(acme, 'acme-health', 1)])
    params = {'by': 'account', 'source': 'rollup'}
    async with get_db_session(account=Unscoped.JOBS) as recompute:
        await recompute.execute(_LOCK_EXCLUSIVE, _LOCK_KEYS)  # a recompute holds the roll-ups off
        started = asyncio.get_running_loop().time()
        body = (await client.get('/api/v1/costs', params=params, headers=auth(keys.acme))).json()
        assert asyncio.get_running_loop().time() - started < 5
    assert body['source'] == 'ledger' and [row['requests'] for row in body['items']] == [2]
    body = (await client.get('/api/v1/costs', params=params, headers=auth(keys.acme))).json()
    assert body['source'] == 'rollup' and [row['requests'] for row in body['items']] == [2]


async def test_costs_from_the_rollup_while_another_roll_up_holds_queued_rows_answer_from_the_ledger(
    keys: Keys, client: httpx2.AsyncClient, tmp_path: Path
) -> None:
    """The read's roll-up skipped the queued rows another roll-up was taking, then answered from the rollup without
    them, labelled `rollup` (QA: 375,439 requests of 3,333,001). Now the ledger answers, and the report says so."""
    acme = await account_id('acme-health')
    await _record(tmp_path, [_row(acme, 'acme-health', m, success=m != 3) for m in range(6)])
    ledger = {'by': 'day', 'source': 'ledger'}
    expected = (await client.get('/api/v1/costs', params=ledger, headers=auth(keys.acme))).json()['items']
    assert [row['requests'] for row in expected] == [6]
    params = {'by': 'day', 'source': 'rollup'}
    async with get_db_session(account=Unscoped.JOBS) as other_roll_up:
        await other_roll_up.execute(
            sql('SELECT 1 FROM usage_pending_requests WHERE account_id = :a ORDER BY request_id LIMIT 4 FOR UPDATE'),
            {'a': acme},
        )
        body = (await client.get('/api/v1/costs', params=params, headers=auth(keys.acme))).json()
    assert body['source'] == 'ledger' and body['items'] == expected
    body = (await client.get('/api/v1/costs', params=params, headers=auth(keys.acme))).json()
    assert body['source'] == 'rollup' and body['items'] == expected  # released: the next read caught up


async def test_a_conversation_is_read_in_its_latest_messages_from_the_start_of_a_turn(
    keys: Keys, client: httpx2.AsyncClient
) -> None:
    # Read whole, a conversation of 600 demo turns was 3.7 MB and held the server's event loop for about 0.8 s
    # (the web UI read it so on opening it); `limit` reads only the latest messages.
    path = '/api/v1/conversations/paged'
    questions = ['Cardiologists in Seattle', 'Dermatologists in Boston', 'Neurologists in Austin']
    for question in questions:
        response = await client.post(f'{path}/turns', json={'message': question}, headers=auth(keys.acme))
        assert response.status_code == 200, response.text
    whole = (await client.get(path, params={'format': 'pydantic'}, headers=auth(keys.acme))).json()
    per_turn = len(whole['messages']) // 3
    assert whole['earlier'] is False and len(whole['messages']) == 3 * per_turn

    def prompts(messages: list[dict[str, Any]]) -> list[str]:
        return [p['content'] for m in messages for p in m['parts'] if p['part_kind'] == 'user-prompt']

    # A window reaching into the middle of turn 2 starts at turn 3: no tool result without its call.
    latest = await client.get(path, params={'format': 'pydantic', 'limit': per_turn + 2}, headers=auth(keys.acme))
    assert latest.json()['earlier'] is True and prompts(latest.json()['messages']) == questions[2:]
    assert latest.json()['messages'] == whole['messages'][-per_turn:]
    vercel = (await client.get(path, params={'limit': 2 * per_turn}, headers=auth(keys.acme))).json()
    texts = [p['text'] for m in vercel['messages'] if m['role'] == 'user' for p in m['parts'] if p['type'] == 'text']
    assert vercel['earlier'] is True and texts == questions[1:]
    everything = (await client.get(path, params={'limit': 3 * per_turn}, headers=auth(keys.acme))).json()
    assert everything['earlier'] is False and len(everything['messages']) == len(vercel['messages']) * 3 // 2
    inside = (await client.get(path, params={'limit': 2}, headers=auth(keys.acme))).json()
    # No turn starts in the last 2 messages (a tool's results, the answer): the page starts at the model's answer.
    assert inside['earlier'] is True and [m['role'] for m in inside['messages']] == ['assistant']
    assert [p['type'] for p in inside['messages'][0]['parts']] == ['text']
    for bad in (0, 100_001, 'x'):
        assert (await client.get(path, params={'limit': bad}, headers=auth(keys.acme))).status_code == 422


async def test_a_conversation_read_in_either_format_is_what_the_openapi_document_says(
    keys: Keys, client: httpx2.AsyncClient
) -> None:
    # The document's messages were a list of anything: now pydantic-ai's `UIMessage` or `ModelMessage`, each with its
    # parts' kinds, and the bytes the route writes itself (`messages_body`) must match them, in both formats.
    path = '/api/v1/conversations/schema-1'
    for text in ('Cardiologists in Seattle', 'and "in" Boston?\n🙂 <b>\\u0041</b>\tß'):
        turn = await client.post(f'{path}/turns', json={'message': text}, headers=auth(keys.acme))
        assert turn.status_code == 200, turn.text
    streamed = await client.post('/api/v1/chat', json=chat_body('schema-1', 'Dermatologists?'), headers=auth(keys.acme))
    assert streamed.status_code == 200 and '"type":"finish"' in streamed.text.replace(' ', '')
    document = (await client.get('/openapi.json')).json()
    answer = document['paths']['/api/v1/conversations/{conversation_id}']['get']['responses']['200']
    schema = answer['content']['application/json']['schema']
    components = document['components']
    # Formats asserted, as schemathesis checks a response: a `duration` of `PT0.010479S` is not RFC 3339's.
    validator = jsonschema_rs.validator_for({**schema, 'components': components}, validate_formats=True)
    for format, one_of in (('vercel', 'UIMessage'), ('pydantic', 'ModelMessage')):
        body = (await client.get(path, params={'format': format}, headers=auth(keys.acme))).json()
        assert body['format'] == format and len(body['messages']) >= 6
        assert [str(error) for error in validator.iter_errors(body)] == []
        # Each message matches its format's schema, not merely one of the two.
        own = jsonschema_rs.validator_for(
            {'$ref': f'#/components/schemas/{one_of}', 'components': components}, validate_formats=True
        )
        assert all(own.is_valid(message) for message in body['messages'])
    # A body that is not what the document says fails the check (the check can fail).
    assert not validator.is_valid({**body, 'messages': [{'kind': 'request', 'parts': 'not a list'}]})
