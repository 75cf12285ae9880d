"""`/docs` and `/redoc`: a Content-Security-Policy that lets each page load what it loads (they had none), checked
against the page's HTML, and in a browser with the CDN's files stood in for (this machine, like an offline browser,
cannot reach the CDN: the pages need one that can)."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path
from urllib.parse import urlsplit

import httpx2
import pytest
from fastapi import FastAPI
from playwright.async_api import Route

from agentrt.api.app import create_app
from agentrt.api.docs_pages import REDOC_VERSION, SWAGGER_UI_VERSION
from tests.api.conftest import serve
from tests.api.test_web_ui import CHROMIUM, browser_page

PAGES = ['/docs', '/redoc', '/docs/oauth2-redirect']


def _policy(header: str) -> dict[str, list[str]]:
    directives = (part.strip().split() for part in header.split(';') if part.strip())
    return {name: sources for name, *sources in directives}


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f'{parts.scheme}://{parts.netloc}'


@pytest.mark.parametrize('mounted', [False, True], ids=['app', 'mounted'])
async def test_each_docs_page_has_a_policy_that_allows_what_it_loads_and_no_more(mounted: bool) -> None:
    app = create_app(manage_runtime=False)
    served = app
    if mounted:  # the inline script names /agent/openapi.json there: its hash follows
        served = FastAPI()
        served.mount('/agent', app)
    prefix = '/agent' if mounted else ''
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=served), base_url='http://test') as client:
        for path in PAGES:
            response = await client.get(prefix + path)
            assert response.status_code == 200, path
            policy = _policy(response.headers.get('content-security-policy', ''))
            assert policy.get('default-src') == ["'none'"] and policy.get('frame-ancestors') == ["'none'"], path
            assert "'unsafe-inline'" not in policy['script-src'] and "'unsafe-eval'" not in policy['script-src']
            for script in re.findall(r'<script>(.*?)</script>', response.text, re.DOTALL):
                digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
                assert f"'sha256-{digest}'" in policy['script-src'], path
            # Each bundle by its own URL, not its origin: the policy allows nothing else of the CDN.
            for url in re.findall(r'<script src="([^"]+)"', response.text):
                assert url in policy['script-src'] and _origin(url) not in policy['script-src'], (path, url)
            for url in re.findall(r'<link[^>]*rel="stylesheet"[^>]*href="([^"]+)"', response.text):
                assert url in policy['style-src'] and _origin(url) not in policy['style-src'], (path, url)
            for url in re.findall(r'<link[^>]*rel="shortcut icon"[^>]*href="([^"]+)"', response.text):
                assert _origin(url) in policy['img-src'], (path, url)
            if path != '/docs/oauth2-redirect':
                assert f'{prefix}/openapi.json' in response.text and policy['connect-src'] == ["'self'"], path
            if path == '/redoc':  # the logo ReDoc's bundle loads under its sidebar (QA: blocked, a console error)
                assert 'https://cdn.redoc.ly' in policy['img-src'], policy


async def test_the_docs_pages_load_pinned_releases() -> None:
    # FastAPI's URLs name a major version (`swagger-ui-dist@5`, `redoc@2`): whatever release the CDN serves that day.
    app = create_app(manage_runtime=False)
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url='http://test') as client:
        docs, redoc = (await client.get('/docs')).text, (await client.get('/redoc')).text
    assert f'swagger-ui-dist@{SWAGGER_UI_VERSION}/swagger-ui-bundle.js' in docs
    assert f'swagger-ui-dist@{SWAGGER_UI_VERSION}/swagger-ui.css' in docs
    assert f'redoc@{REDOC_VERSION}/bundles/redoc.standalone.js' in redoc
    for version in (SWAGGER_UI_VERSION, REDOC_VERSION):
        assert re.fullmatch(r'\d+\.\d+\.\d+', version), version
    assert not re.search(r'@\d+/', docs + redoc)  # no major version alone anywhere
    readme = (Path(__file__).parents[2] / 'README.md').read_text()  # which the README names
    assert f'swagger-ui-dist@{SWAGGER_UI_VERSION}' in readme and f'redoc@{REDOC_VERSION}' in readme


# Stand-ins for the CDN's bundles: each does what its real one needs the policy for (the page's own inline script
# calls Swagger UI's; ReDoc's makes a worker from a blob and adds a style element), and fetches the document.
_SWAGGER_UI = """
window.SwaggerUIBundle = function (config) {
  fetch(config.url).then((r) => r.json()).then((doc) => {
    document.querySelector(config.dom_id).textContent = 'rendered ' + doc.info.title;
  });
};
SwaggerUIBundle.presets = { apis: {} };
SwaggerUIBundle.SwaggerUIStandalonePreset = {};
"""
_REDOC = """
const element = document.querySelector('redoc');
const style = document.createElement('style');
style.textContent = 'redoc { color: rgb(1, 2, 3); }';
document.head.append(style);
const worker = new Worker(URL.createObjectURL(new Blob(['postMessage(1)'], { type: 'text/javascript' })));
worker.onmessage = () => fetch(element.getAttribute('spec-url')).then((r) => r.json()).then((doc) => {
  element.textContent = 'rendered ' + doc.info.title;
});
"""


@pytest.mark.skipif(CHROMIUM is None, reason='no Chromium to drive: see tests/api/test_web_ui.py')
async def test_the_docs_pages_work_under_their_policy_in_a_browser(tmp_path: Path) -> None:
    async def cdn(route: Route) -> None:
        url = route.request.url
        if url.endswith('swagger-ui-bundle.js'):
            await route.fulfill(body=_SWAGGER_UI, content_type='text/javascript')
        elif url.endswith('redoc.standalone.js'):
            await route.fulfill(body=_REDOC, content_type='text/javascript')
        elif url.startswith('https://'):
            await route.fulfill(body='', content_type='text/css' if 'css' in url else 'image/png')
        else:
            await route.continue_()

    async for url in serve(create_app(manage_runtime=False)):
        async with browser_page(tmp_path / 'profile') as page:
            page.set_default_timeout(15_000)
            await page.route('**/*', cdn)
            await page.context.add_init_script(
                "window.violations = []; document.addEventListener('securitypolicyviolation', "
                "(e) => window.violations.push(e.effectiveDirective + ' ' + e.blockedURI));"
            )
            for path, where in (('/docs', '#swagger-ui'), ('/redoc', 'redoc')):
                await page.goto(url + path)
                await page.locator(where).get_by_text('rendered agentrt').wait_for()
                assert await page.evaluate('window.violations') == [], path
