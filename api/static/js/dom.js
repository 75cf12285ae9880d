// Building the page from data, safely: every string becomes text (never parsed as HTML), and formatting helpers.

/**
 * Create an element. `attrs`: `class`, `text`, `dataset` (object), `on` (object of listeners), `hidden`, any other
 * attribute (false/null/undefined are left out). Children: nodes or strings (strings become text nodes).
 */
export function h(tag, attrs = {}, ...children) {
  const svg = tag.startsWith('svg:');
  const el = svg ? document.createElementNS('http://www.w3.org/2000/svg', tag.slice(4)) : document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue;
    if (name === 'text') el.textContent = String(value);
    else if (name === 'dataset') Object.assign(el.dataset, value);
    else if (name === 'on') for (const [event, listener] of Object.entries(value)) el.addEventListener(event, listener);
    else if (name === 'class' && !svg) el.className = value;
    else el.setAttribute(name, value === true ? '' : String(value));
  }
  append(el, children);
  return el;
}

/** Append children (nodes, strings, arrays of them; null and false are skipped). */
export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/**
 * `text` from outside the page (a title, a tool's argument) set apart for a sentence that must be a string (a dialog,
 * an `aria-label`, a summary cut to length): between FIRST STRONG ISOLATE and POP DIRECTIONAL ISOLATE, so a
 * right-to-left override in it (U+202E) ends with it; it reversed the rest of the sentence. In the page's elements,
 * such text goes in a `<bdi>` instead.
 */
export function isolate(text) {
  return `\u2068${text}\u2069`;
}

/** A random id usable in a conversation id (crypto.randomUUID needs a secure context; this does not). */
export function randomId() {
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

const dateTime = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'medium' });
const integer = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });

/** A time for people, in their locale; the ISO text stays in a `<time datetime>`. */
export function timeEl(iso) {
  if (!iso) return h('span', { text: '—' });
  return h('time', { datetime: iso, text: dateTime.format(new Date(iso)) });
}

export function formatInt(value) {
  return value === null || value === undefined ? '—' : integer.format(value);
}

/** Milliseconds: "0.4 ms", "12 ms", "1.25 s". */
export function formatMs(ms) {
  if (ms === null || ms === undefined || Number.isNaN(ms)) return '—';
  if (ms < 10) return `${ms.toFixed(1)} ms`;
  if (ms < 1000) return `${Math.round(ms)} ms`;
  return `${(ms / 1000).toFixed(2)} s`;
}

/** A cost in USD from the API's decimal string; null means the model has no price. */
export function formatCost(value) {
  if (value === null || value === undefined) return 'unpriced';
  const number = Number(value);
  if (number === 0) return '$0';
  return number < 0.01 ? `$${number.toPrecision(2)}` : `$${number.toFixed(2)}`;
}

// The bidirectional embeddings, overrides and isolates (U+202A-E, U+2066-9): the ones that reorder the text after them.
const BIDI_CONTROLS = /[\u202a-\u202e\u2066-\u2069]/g;

/**
 * `text` (a tool's input, output or error, a stored body) for a `<pre>`, each bidirectional control in it written as
 * its escape (`\u202e`, as JSON writes it): a right-to-left override reversed the rest of its line on screen, so
 * the value shown was not the one the tool got or gave. Isolating each line would still reverse the value itself.
 */
export function visibleControls(text) {
  return text.replace(BIDI_CONTROLS, (control) => `\\u${control.charCodeAt(0).toString(16)}`);
}

/** JSON for people: pretty, with bidirectional controls escaped (`visibleControls`), cut at `limit` characters. */
export function prettyJson(value, limit = 20000) {
  let text;
  try {
    text = typeof value === 'string' ? value : JSON.stringify(value, null, 2);
  } catch {
    text = String(value);
  }
  text = visibleControls(text);
  return text.length > limit ? `${text.slice(0, limit)}\n… (${formatInt(text.length - limit)} more characters)` : text;
}

/**
 * A one-line summary of a tool's arguments or result: `key: value, …` with nested objects flattened; with
 * `nestedFirst`, what nested objects hold comes first (that is where calls to one tool usually differ: the
 * `filters` of a search).
 */
export function summariseArgs(input, limit = 90, { nestedFirst = true } = {}) {
  if (input === null || input === undefined) return '';
  // Bidirectional controls written out, as in the panels (`visibleControls`): isolated, `\u202egnp.exe` still read
  // "exe.png" in the closed row.
  if (typeof input !== 'object') return visibleControls(String(input)).slice(0, limit);
  const nested = [];
  const flat = [];
  const walk = (object, into) => {
    for (const [key, value] of Object.entries(object)) {
      if (value === null || value === undefined) continue;
      if (typeof value === 'object' && !Array.isArray(value)) walk(value, nested);
      else if (Array.isArray(value) && value.some((item) => item !== null && typeof item === 'object')) {
        into.push(`${visibleControls(key)}: ${value.length} item${value.length === 1 ? '' : 's'}`);
      } else {
        const shown = visibleControls(String(Array.isArray(value) ? value.join(', ') : value));
        into.push(`${visibleControls(key)}: ${isolate(shown)}`); // keys too: a model names a dict's keys
      }
    }
  };
  walk(input, flat);
  const text = (nestedFirst ? [...nested, ...flat] : [...flat, ...nested]).join(', ');
  return text.length > limit ? `${text.slice(0, limit - 1)}…` : text;
}

/**
 * An alert box (`role="alert"`: read out when it appears) holding `message` (text, or text and elements); `kind` is
 * `error` or `info`.
 */
export function alertBox(message, kind = 'error') {
  return h('div', { class: `alert ${kind}`, role: kind === 'error' ? 'alert' : 'status' }, message);
}
