// The tool calls of one assistant turn, as a list with a timeline: each call's bar runs from when the server said it
// started (`tool-input-available`) to when its result arrived (`tool-output-available`), on one time axis per
// turn, so calls that ran at the same time show as overlapping bars. Times are the browser's, in milliseconds since
// the turn was sent (`data-start-ms`, `data-end-ms` on each call).

import { formatMs, h, prettyJson, summariseArgs, visibleControls } from './dom.js';

/** The most calls running at one moment, from `[start, end]` intervals (a call ending as another starts: not both). */
export function maxParallel(intervals) {
  const points = [];
  for (const { start, end } of intervals) {
    points.push([start, 1], [end, -1]);
  }
  points.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  let running = 0;
  let most = 0;
  for (const [, step] of points) {
    running += step;
    most = Math.max(most, running);
  }
  return most;
}

export class ToolTimeline {
  /** `live`: calls are timed as they run; otherwise they come from the stored history (no times kept there). */
  constructor({ live, clock }) {
    this.live = live;
    this.clock = clock;
    this.calls = new Map();
    this.summary = h('p', { class: 'tools-summary' });
    this.list = h('ol', { class: 'tool-list' });
    this.axis = h('div', { class: 'tool-axis', 'aria-hidden': 'true' });
    this.element = h(
      'section',
      { class: 'tools', 'aria-label': 'Tool calls', hidden: true, dataset: { live: String(live) } },
      this.summary,
      this.list,
      live ? this.axis : null,
    );
    this.ticker = null;
  }

  /** The model began writing a call's arguments. */
  announce(id, name) {
    this.call(id, name);
    this.update();
  }

  /** The call was handed to the tool. */
  start(id, name, input) {
    const call = this.call(id, name);
    call.input = input;
    call.start = this.clock();
    call.state = 'running';
    this.update();
    this.tick();
  }

  /** The call's result arrived (`error` set when the tool failed or its arguments were refused). */
  finish(id, { output, error } = {}) {
    const call = this.call(id);
    call.end = this.clock();
    if (call.start === null) call.start = call.end;
    call.output = output;
    call.error = error ?? null;
    call.state = error ? 'error' : 'done';
    this.update();
  }

  /** A call from the stored conversation (no timing is stored). */
  addStored(id, name, { input, output, error }) {
    const call = this.call(id, name);
    Object.assign(call, { input, output, error: error ?? null, state: error ? 'error' : 'done' });
    this.update();
  }

  /** Calls still running when the turn ended (stopped or failed) are marked so. */
  abandon() {
    for (const call of this.calls.values()) {
      if (call.state === 'running' || call.state === 'pending') {
        call.state = 'stopped';
        call.end = this.clock();
        if (call.start === null) call.start = call.end;
      }
    }
    this.update();
  }

  call(id, name = 'tool') {
    let call = this.calls.get(id);
    if (!call) {
      call = { id, name, state: 'pending', start: null, end: null, input: undefined, output: undefined, error: null };
      call.view = this.row(call);
      this.calls.set(id, call);
      this.list.append(call.view.item);
    }
    if (name !== 'tool') call.name = name;
    return call;
  }

  row(call) {
    const name = h('span', { class: 'tool-name' });
    const args = h('span', { class: 'tool-args' });
    const bar = h('span', { class: 'tool-bar' });
    const track = h('span', { class: 'tool-track', 'aria-hidden': 'true' }, bar);
    const status = h('span', { class: 'tool-status' });
    const io = h('div', { class: 'tool-io' });
    const details = h('details', {}, h('summary', {}, name, args, this.live ? track : null, status), io);
    // The input and output are rendered when first opened: a search result can be large.
    details.addEventListener('toggle', () => {
      if (!details.open) return;
      io.replaceChildren(
        h('h4', { text: 'Input' }),
        h('pre', { text: prettyJson(call.input ?? null) }),
        h('h4', { text: call.error ? 'Error' : 'Output' }),
        h('pre', { text: call.error ? visibleControls(call.error) : prettyJson(call.output ?? null) }),
      );
    });
    return { item: h('li', { class: 'tool' }, details), name, args, bar, status };
  }

  update() {
    const calls = [...this.calls.values()];
    this.element.hidden = calls.length === 0;
    const now = this.clock();
    const timed = calls.filter((call) => call.start !== null);
    const origin = Math.min(...timed.map((call) => call.start));
    const last = Math.max(...timed.map((call) => call.end ?? now));
    const span = Math.max(last - origin, 1);
    for (const call of calls) {
      const { item, name, args, bar, status } = call.view;
      name.textContent = visibleControls(call.name);
      args.textContent = summariseArgs(call.input);
      item.dataset.toolCallId = call.id;
      item.dataset.toolName = call.name;
      item.dataset.state = call.state;
      status.textContent = this.statusText(call, now);
      if (call.start !== null) {
        item.dataset.startMs = call.start.toFixed(2);
        const end = call.end ?? now;
        bar.style.left = `${((call.start - origin) / span) * 100}%`;
        bar.style.width = `${Math.max(((end - call.start) / span) * 100, 0.6)}%`;
      }
      if (call.end !== null) {
        item.dataset.endMs = call.end.toFixed(2);
        item.dataset.durationMs = (call.end - call.start).toFixed(2);
      }
    }
    const intervals = timed.map((call) => ({ start: call.start, end: call.end ?? now }));
    const parallel = this.live ? maxParallel(intervals) : 0;
    this.element.dataset.maxParallel = String(parallel);
    const count = `${calls.length} tool call${calls.length === 1 ? '' : 's'}`;
    if (!this.live) {
      this.summary.textContent = `${count} (durations are measured live; the stored conversation has none)`;
    } else {
      const atOnce = parallel > 1 ? ` · up to ${parallel} at once` : '';
      this.summary.textContent = timed.length ? `${count}${atOnce} · ${formatMs(last - origin)} from first to last` : count;
      // No axis before a call has started (the model is still writing its arguments): its range would be
      // "0 … -Infinity ms".
      this.axis.hidden = timed.length === 0;
      this.axis.replaceChildren(
        timed.length
          ? h('span', { class: 'tool-axis-range' }, h('span', { text: '0' }), h('span', { text: formatMs(last - origin) }))
          : '',
      );
    }
  }

  statusText(call, now) {
    if (!this.live) return call.state === 'error' ? 'failed' : 'done';
    if (call.state === 'pending') return 'preparing…';
    if (call.state === 'running') return `running ${formatMs(now - call.start)}`;
    const took = formatMs(call.end - call.start);
    if (call.state === 'error') return `failed after ${took}`;
    if (call.state === 'stopped') return `stopped after ${took}`;
    return took;
  }

  /** While a call runs, its bar grows. */
  tick() {
    if (this.ticker !== null) return;
    this.ticker = window.setInterval(() => {
      if (![...this.calls.values()].some((call) => call.state === 'running')) {
        window.clearInterval(this.ticker);
        this.ticker = null;
        return;
      }
      this.update();
    }, 100);
  }
}
