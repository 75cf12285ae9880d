"""The HTTP API (FastAPI): streamed chat, the audit, costs and conversations, per account by API key.

Needs the `http` extra (`pip install -e '.[http]'` in the clone). Build the app with `agentrt.api.app.create_app()`,
or run `agentrt serve`. The modules: `app` (factory, lifespan), `auth` (API keys), `errors` (statuses and public error
bodies, in one place), `chat` / `chat_agui` (streamed turns), `conversations`, `audit`, `costs`, `health`,
`schemas` (response models), `filters` / `cursors` / `turn_input` / `body_limit` / `url_text`
(input checks).
"""
