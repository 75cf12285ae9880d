"""The API's documentation pages, `/docs` (Swagger UI) and `/redoc`, as FastAPI writes them, with a
Content-Security-Policy that lets each load what it needs and nothing else.

FastAPI's pages load their scripts and styles from a CDN (`cdn.jsdelivr.net`; ReDoc its fonts from Google Fonts, the
favicon from fastapi.tiangolo.com), so they need a browser that can reach those: offline they stay blank, while
`/openapi.json` is the server's own. They were served with no policy at all, beside a web UI whose pages have a strict
one. Each page's policy allows those origins, its own inline script by its SHA-256 (hashed per response: the script
holds the URL of `/openapi.json`, which depends on where the app is mounted), the same origin for the document and
"Try it out", and inline styles, which both UIs set in their bundles. Swagger UI's validator badge
(validator.swagger.io, which would be sent the document's URL) stays blocked.

The bundles are pinned to one version each (FastAPI's own URLs name a major version, `swagger-ui-dist@5`: whatever
release the CDN served that day, on the page where a key is pasted into "Authorize"), and each policy allows those
files' URLs alone, not the whole CDN.
"""

from __future__ import annotations

import base64
import hashlib
import re

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from starlette.requests import Request
from starlette.responses import HTMLResponse

CDN = 'https://cdn.jsdelivr.net'
SWAGGER_UI_VERSION = '5.36.0'
"""The `swagger-ui-dist` release `/docs` loads (npm; FastAPI's default is `@5`, the latest 5.x)."""
REDOC_VERSION = '2.5.4'
"""The `redoc` release `/redoc` loads (npm; FastAPI's default is `@2`, the latest 2.x)."""
SWAGGER_JS = f'{CDN}/npm/swagger-ui-dist@{SWAGGER_UI_VERSION}/swagger-ui-bundle.js'
SWAGGER_CSS = f'{CDN}/npm/swagger-ui-dist@{SWAGGER_UI_VERSION}/swagger-ui.css'
REDOC_JS = f'{CDN}/npm/redoc@{REDOC_VERSION}/bundles/redoc.standalone.js'
_COMMON = "default-src 'none'; base-uri 'none'; object-src 'none'; form-action 'none'; frame-ancestors 'none'"
_FAVICON = 'https://fastapi.tiangolo.com'
_SWAGGER_UI = (
    f"script-src {SWAGGER_JS} {{scripts}}; style-src {SWAGGER_CSS} 'unsafe-inline'; img-src 'self' data: {_FAVICON}; "
    f"connect-src 'self'; {_COMMON}"
)
_REDOC = (
    f"script-src {REDOC_JS}; style-src 'unsafe-inline' https://fonts.googleapis.com; "
    # ReDoc's own logo under its sidebar comes from cdn.redoc.ly (blocked before: a console error; QA).
    f"font-src https://fonts.gstatic.com; img-src 'self' data: {_FAVICON} https://cdn.redoc.ly; connect-src 'self'; "
    'worker-src blob:; '  # ReDoc's search runs in a worker it makes from a blob of its own bundle
    f'{_COMMON}'
)
_OAUTH2_REDIRECT = f'script-src {{scripts}}; {_COMMON}'
_INLINE_SCRIPT = re.compile(r'<script>(.*?)</script>', re.DOTALL)


def install_docs_pages(app: FastAPI, *, docs_url: str = '/docs', redoc_url: str = '/redoc') -> None:
    """Serve FastAPI's Swagger UI (and its OAuth2 redirect page) and ReDoc pages with their policies (`app` built
    with `docs_url=None, redoc_url=None`)."""
    oauth2_redirect = f'{docs_url}/oauth2-redirect'

    def root_path(request: Request) -> str:
        return str(request.scope.get('root_path', '')).rstrip('/')

    def openapi_url(request: Request) -> str:
        return root_path(request) + (app.openapi_url or '/openapi.json')

    async def swagger_ui(request: Request) -> HTMLResponse:
        page = get_swagger_ui_html(
            openapi_url=openapi_url(request),
            title=f'{app.title} - Swagger UI',
            swagger_js_url=SWAGGER_JS,
            swagger_css_url=SWAGGER_CSS,
            oauth2_redirect_url=root_path(request) + oauth2_redirect,
            init_oauth=app.swagger_ui_init_oauth,
            swagger_ui_parameters=app.swagger_ui_parameters,
        )
        return _with_policy(page, _SWAGGER_UI)

    async def swagger_ui_redirect(request: Request) -> HTMLResponse:
        return _with_policy(get_swagger_ui_oauth2_redirect_html(), _OAUTH2_REDIRECT)

    async def redoc(request: Request) -> HTMLResponse:
        return _with_policy(
            get_redoc_html(openapi_url=openapi_url(request), title=f'{app.title} - ReDoc', redoc_js_url=REDOC_JS),
            _REDOC,
        )

    app.add_route(docs_url, swagger_ui, include_in_schema=False)
    app.add_route(oauth2_redirect, swagger_ui_redirect, include_in_schema=False)
    app.add_route(redoc_url, redoc, include_in_schema=False)


def _with_policy(page: HTMLResponse, policy: str) -> HTMLResponse:
    """`page` with `policy`, its `{scripts}` the hashes of the page's inline scripts."""
    html = bytes(page.body).decode()
    hashes = ' '.join(
        f"'sha256-{base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()}'"
        for script in _INLINE_SCRIPT.findall(html)
    )
    page.headers['Content-Security-Policy'] = policy.format(scripts=hashes or "'none'")
    page.headers['Referrer-Policy'] = 'no-referrer'
    return page
