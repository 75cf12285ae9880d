// The HTTP API of the same origin, with the API key of this tab (sessionStorage only: forgotten when the tab closes).

import { forgetPending } from './pending.js';

const KEY = 'agentrt.apiKey';
const WHO = 'agentrt.me';

export const session = {
  get key() {
    return sessionStorage.getItem(KEY);
  },
  get me() {
    try {
      return JSON.parse(sessionStorage.getItem(WHO) || 'null');
    } catch {
      return null;
    }
  },
  /** Whether the key may read (its `read` scope): a `--scope chat` key may only chat. True when not known. */
  get mayRead() {
    return this.allows('read');
  },
  /** Whether the key may chat (its `chat` scope): a `--scope read` key may only read. True when not known. */
  get mayChat() {
    return this.allows('chat');
  },
  /** Whether the key has `scope` (true when its scopes are not known: the server decides). */
  allows(scope) {
    const scopes = this.me?.scopes;
    return !Array.isArray(scopes) || scopes.includes(scope);
  },
  signIn(key, me) {
    sessionStorage.setItem(KEY, key);
    sessionStorage.setItem(WHO, JSON.stringify(me));
  },
  signOut() {
    sessionStorage.removeItem(KEY);
    sessionStorage.removeItem(WHO);
    forgetPending(); // a message kept for a reload (pending.js) is not the next key's
  },
};

/** An error response of the API: `{detail, type, error_id, field?}`. */
export class ApiError extends Error {
  constructor(status, statusText, body) {
    const detail = body && body.detail !== undefined ? body.detail : statusText;
    super(typeof detail === 'string' ? detail : `HTTP ${status}`);
    this.name = 'ApiError';
    this.status = status;
    this.type = body?.type ?? null;
    this.detail = detail;
    this.errorId = body?.error_id ?? null;
    this.field = body?.field ?? null;
  }
}

/** The server could not be reached at all. */
export class NetworkError extends Error {
  constructor(cause) {
    super('the server cannot be reached');
    this.name = 'NetworkError';
    this.cause = cause;
  }
}

/**
 * Send a request to `api/v1{path}` of the server that served this page. Resolves to the response when it is a success; throws ApiError (after
 * announcing a 401 with the `agentrt:unauthorized` event, so the page returns to sign-in), NetworkError, or the
 * AbortError of `signal`.
 */
export async function request(method, path, { params, body, signal, headers, key } = {}) {
  // Beside this script (`js/api.js`), not at the site's root: an app that mounts agentrt under a prefix
  // (`app.mount('/agent', create_app(web_ui=True))`) serves the page and its API at /agent/.
  const url = new URL(`../api/v1${path}`, import.meta.url);
  for (const [name, value] of Object.entries(params || {})) {
    if (value !== null && value !== undefined && value !== '') url.searchParams.set(name, value);
  }
  const token = key ?? session.key;
  let response;
  try {
    response = await fetch(url, {
      method,
      body,
      signal,
      headers: { Accept: 'application/json', ...(token ? { Authorization: `Bearer ${token}` } : {}), ...headers },
    });
  } catch (error) {
    if (error.name === 'AbortError') throw error;
    throw new NetworkError(error);
  }
  if (response.ok) return response;
  let payload = null;
  try {
    payload = await response.json();
  } catch {
    // Not the API's JSON (a proxy's page, say): the status says enough.
  }
  const error = new ApiError(response.status, response.statusText, payload);
  if (response.status === 401 && key === undefined) {
    window.dispatchEvent(new CustomEvent('agentrt:unauthorized', { detail: error }));
  }
  throw error;
}

export async function getJson(path, params) {
  return (await request('GET', path, { params })).json();
}

export async function remove(path) {
  await request('DELETE', path);
}

/** Start a streamed chat turn (Vercel AI data stream); resolves to the response once its headers arrived. */
export function postChat(body, signal) {
  return request('POST', '/chat', {
    body: JSON.stringify(body),
    signal,
    headers: { 'Content-Type': 'application/json', Accept: 'text/event-stream' },
  });
}

/** What to tell a person about a failed request: one sentence, with the error id of a server error. */
export function errorMessage(error) {
  if (error instanceof NetworkError) {
    // The browser knows when it has no network at all: asking whether the server still runs sent people to restart it.
    if (!navigator.onLine) return 'This browser is offline: the server cannot be reached until the network is back. Try again then.';
    return 'The server cannot be reached. Is `agentrt serve` still running? Try again in a moment.';
  }
  if (!(error instanceof ApiError)) return `This page failed: ${error?.message || error}`;
  const detail = Array.isArray(error.detail)
    ? error.detail.map((item) => `${fieldName(item.loc)}: ${item.msg}`).join('; ')
    : String(error.detail ?? '');
  const status = error.status;
  if (status === 401) return `The API key was not accepted: ${detail}. Sign in again with a valid key.`;
  if (status === 403) return `This API key may not do that: ${detail}.`;
  if (status === 404) return `Not found: ${detail}.`;
  if (status === 409) return sentence(detail); // the server's words: busy, or changed meanwhile; what to do next
  if (status === 413) return 'The message is too large for the server.';
  if (status === 422) {
    return error.field ? `Please check “${error.field}”: ${detail}.` : `The server refused the input: ${detail}.`;
  }
  const id = error.errorId ? ` Error id ${error.errorId}: the server's log has the details.` : '';
  // Busy, or its database unavailable: a moment's wait, not a failure of the server.
  if (status === 503) return `The server cannot take this now (HTTP 503): ${detail}.${id}`;
  if (status >= 500) return `The server failed (HTTP ${status}): ${detail}.${id}`;
  return `The request failed (HTTP ${status}): ${detail}.${id}`;
}

/** `text` as a sentence: capital first letter, full stop at the end. */
function sentence(text) {
  const trimmed = text.trim();
  if (!trimmed) return 'The request failed.';
  const capital = trimmed[0].toUpperCase() + trimmed.slice(1);
  return /[.!?]$/.test(capital) ? capital : `${capital}.`;
}

function fieldName(loc) {
  const parts = (loc || []).filter((part) => part !== 'body' && part !== 'query' && part !== 'path');
  return parts.join('.') || 'input';
}
