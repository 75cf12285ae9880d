"""The web UI against faults, hostile text and the basics of access, in a real browser (Chromium through playwright,
as `test_web_ui.py`): a key revoked as a message is sent, a browser gone offline. One browser for the module, a new
context (an empty tab state) for each short test; skipped without Chromium like `test_web_ui.py`."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, DeltaToolCalls, FunctionModel

from agentrt.api.app import create_app
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.api_keys import create_api_key, forget_cached_api_keys, revoke_api_key
from tests.api.conftest import Keys, serve
from tests.api.test_web_ui import CHROMIUM, CHROMIUM_ARGS, _send

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason='no Chromium to drive: see tests/api/test_web_ui.py')


def _quick_model() -> FunctionModel:
    """A model answering 'ok' at once, streamed or not."""

    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[TextPart('ok')])

    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
        yield 'ok'

    return FunctionModel(respond, stream_function=stream, model_name='quick')


@pytest.fixture(scope='module')
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as driver:
        launched = await driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture(scope='module')
async def site() -> AsyncIterator[str]:
    async for url in serve(create_app(manage_runtime=False, model=_quick_model(), web_ui=True)):
        yield url


@pytest.fixture
async def page(browser: Browser, site: str, keys: Keys) -> AsyncIterator[Page]:
    """A new tab state, signed in with acme's key, on a new chat; no script error may happen in it."""
    context = await browser.new_context(viewport={'width': 1280, 'height': 800})
    page = await context.new_page()
    page.set_default_timeout(15_000)
    expect.set_options(timeout=15_000)
    crashes: list[str] = []
    page.on('pageerror', lambda error: crashes.append(str(error)))
    await page.goto(site)
    await _sign_in(page, keys.acme)
    try:
        yield page
    finally:
        await context.close()
    assert crashes == []


async def _sign_in(page: Page, key: str) -> None:
    await page.get_by_label('API key').fill(key)
    await page.get_by_label('API key').press('Enter')
    await expect(page.get_by_role('button', name='Sign out')).to_be_visible()


async def _revoke(key: str) -> None:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await revoke_api_key(session=session, key=key)
    forget_cached_api_keys()


async def test_a_message_sent_as_the_key_is_revoked_comes_back_after_signing_in_again(page: Page, site: str) -> None:
    # The key stops working as a message is sent (401): the page returns to sign-in, and the message was gone with it,
    # to be typed again from memory. It comes back in the box once a key of the same account signs in.
    turn = await _send(page, 'first question')
    await expect(turn).to_have_attribute('data-state', 'done')
    conversation = page.url.split('#/chat/', 1)[1]
    key = await page.evaluate("sessionStorage.getItem('agentrt.apiKey')")
    await _revoke(key)
    await _send(page, 'my second, long-considered question')
    await expect(page.get_by_role('alert')).to_contain_text('The API key was not accepted')
    async with get_db_session(account=Unscoped.ADMIN) as session:
        again = await create_api_key(session=session, account='acme-health', name='again')
    await _sign_in(page, again.token)
    box = page.get_by_role('textbox', name='Message')
    await expect(box).to_have_value('my second, long-considered question')
    await expect(page.locator('.notice')).to_contain_text('before the page returned to sign-in')
    await expect(page.locator('.message.user')).to_have_text(['Youfirst question'])  # as saved: the refused one is not

    # Typed but not sent, as another view's request finds the key revoked: kept too, but never for another account.
    await box.fill('a draft of mine')
    await _revoke(again.token)
    await page.get_by_role('link', name='Audit', exact=True).click()
    await expect(page.get_by_role('alert')).to_contain_text('The API key was not accepted')
    async with get_db_session(account=Unscoped.ADMIN) as session:
        other = await create_api_key(session=session, account='green-grocer', name='other')
    await _sign_in(page, other.token)
    await page.goto(f'{site}/#/chat/{conversation}')
    await expect(page.locator('.notice')).to_contain_text('This conversation has no saved messages yet')
    await expect(box).to_have_value('')
    assert await page.evaluate("sessionStorage.getItem('agentrt.pendingMessage')") is None


async def test_a_message_sent_offline_says_the_browser_is_offline(page: Page) -> None:
    # It said "The server cannot be reached. Is `agentrt serve` still running?", which sent people to restart a server
    # that was fine.
    await page.context.set_offline(True)
    await _send(page, 'sent without a network')
    alert = page.locator('.notice .alert')
    await expect(alert).to_contain_text('This browser is offline')
    await expect(alert).not_to_contain_text('agentrt serve')
    box = page.get_by_role('textbox', name='Message')
    await expect(box).to_have_value('sent without a network')
    await page.context.set_offline(False)
    await box.press('Enter')
    await expect(page.locator('.message.assistant')).to_have_attribute('data-state', 'done')
