// Costs of the account (GET /costs): a chart by day, and tables by model and by agent, over the last 7, 30 or 90
// days. Requests without a cost count in requests and tokens, not in cost: those of unpriced models (the offline demo
// model, say), and those whose usage the provider never reported (a failure or a cancellation before any usage),
// whichever the model: the API's `unpriced` counts both, so the page does not call them the model's.

import { ApiError, errorMessage, getJson } from './api.js';
import { alertBox, formatCost, formatInt, h } from './dom.js';
import { barChart } from './chart.js';

const RANGES = [7, 30, 90];
const METRICS = {
  cost: { label: 'Cost (USD)', value: (row) => Number(row.total_cost ?? 0), format: (v) => formatCost(String(v)) },
  tokens: { label: 'Tokens', value: (row) => row.total_tokens, format: formatInt },
  requests: { label: 'Requests', value: (row) => row.requests, format: formatInt },
};

function utcDay(date) {
  return date.toISOString().slice(0, 10);
}

/** Every UTC day from `days - 1` days ago to today, with that day's row or zeros. */
function fillDays(rows, days) {
  const byKey = new Map(rows.map((row) => [row.key, row]));
  const today = new Date();
  const out = [];
  for (let back = days - 1; back >= 0; back -= 1) {
    const key = utcDay(new Date(Date.UTC(today.getUTCFullYear(), today.getUTCMonth(), today.getUTCDate() - back)));
    out.push(byKey.get(key) ?? { key, requests: 0, failed: 0, cancelled: 0, input_tokens: 0, output_tokens: 0, total_tokens: 0, total_cost: null, unpriced: 0 });
  }
  return out;
}

function groupTable(caption, rows, keyName) {
  if (!rows.length) return h('p', { class: 'subtle', text: 'No requests in this period.' });
  const head = [keyName, 'Requests', 'Failed', 'Cancelled', 'Tokens in / out', 'Cost'];
  return h(
    'div',
    { class: 'table-wrap' },
    h(
      'table',
      { class: 'data numbers responsive' },
      h('caption', { class: 'sr-only', text: caption }),
      h('thead', {}, h('tr', {}, head.map((name) => h('th', { scope: 'col', text: name })))),
      h(
        'tbody',
        {},
        rows.map((row) =>
          h(
            'tr',
            { dataset: { key: row.key } },
            // In a <bdi>, as titles are: a model's or an agent's name with a right-to-left override read reversed.
            h('th', { scope: 'row', 'data-label': keyName }, h('bdi', { text: row.key })),
            h('td', { 'data-label': head[1], text: formatInt(row.requests) }),
            h('td', { 'data-label': head[2], text: formatInt(row.failed) }),
            h('td', { 'data-label': head[3], text: formatInt(row.cancelled) }),
            h('td', { 'data-label': head[4], text: `${formatInt(row.input_tokens)} / ${formatInt(row.output_tokens)}` }),
            h('td', { 'data-label': head[5], text: costText(row) }),
          ),
        ),
      ),
    ),
  );
}

function costText(row) {
  if (row.total_cost === null) return row.requests ? 'no cost' : '$0';
  return row.unpriced ? `${formatCost(row.total_cost)} (+${row.unpriced} without a cost)` : formatCost(row.total_cost);
}

/**
 * One grouping of the costs since `since` (a UTC midnight), from the daily rollup: this view never asks what the
 * rollup cannot answer (a time within a day, a model), and the API rolls up the account's rows not counted yet
 * first, so the numbers are the ledger's, in milliseconds where a scan of the ledger took 0.2-0.4 s each at a
 * million rows. A server that refuses the rollup for this question (422) is asked the ledger.
 */
async function costsBy(by, since) {
  try {
    return await getJson('/costs', { by, since, source: 'rollup' });
  } catch (error) {
    if (error instanceof ApiError && error.status === 422) return getJson('/costs', { by, since, source: 'ledger' });
    throw error;
  }
}

export async function costsView(query) {
  const days = RANGES.includes(Number(query.get('days'))) ? Number(query.get('days')) : 30;
  const title = h('h1', { id: 'costs-title', tabindex: '-1', text: 'Costs' });
  const range = h('select', { id: 'costs-range' });
  for (const value of RANGES) range.append(h('option', { value, text: `Last ${value} days`, selected: value === days }));
  range.addEventListener('change', () => {
    window.location.hash = `#/costs?days=${range.value}`;
  });
  const metric = h('select', { id: 'costs-metric' });
  const notice = h('div', { class: 'notice' });
  const element = h(
    'section',
    { class: 'view costs-view', 'aria-labelledby': 'costs-title' },
    h(
      'div',
      { class: 'view-head' },
      h('div', {}, title, h('p', { class: 'subtle', text: 'Model requests, tokens and cost of this account, by UTC day.' })),
      h('div', { class: 'field head-actions' }, h('label', { for: 'costs-range', text: 'Period' }), range),
    ),
    notice,
  );
  const done = { element, title: 'Costs', focus: () => title.focus() };

  const today = new Date();
  const since = new Date(Date.UTC(today.getUTCFullYear(), today.getUTCMonth(), today.getUTCDate() - (days - 1)));
  let byDay;
  let byModel;
  let byAgent;
  try {
    [byDay, byModel, byAgent] = await Promise.all(
      ['day', 'model', 'agent'].map((by) => costsBy(by, since.toISOString())),
    );
  } catch (error) {
    notice.append(alertBox(`The costs could not be loaded. ${errorMessage(error)}`));
    return done;
  }

  const rows = fillDays(byDay.items, days);
  const total = (name) => byDay.items.reduce((sum, row) => sum + Number(row[name] ?? 0), 0);
  const unpriced = total('unpriced');
  const priced = byDay.items.some((row) => row.total_cost !== null && Number(row.total_cost) > 0);
  for (const [value, { label }] of Object.entries(METRICS)) {
    metric.append(h('option', { value, text: label, selected: value === (priced ? 'cost' : 'tokens') }));
  }
  const requests = total('requests');
  const totals = [`${formatInt(requests)} requests (${formatInt(total('failed'))} failed, ${formatInt(total('cancelled'))} cancelled)`, `${formatInt(total('total_tokens'))} tokens`];
  if (unpriced < requests) totals.push(`${formatCost(String(total('total_cost')))} spent`);
  if (unpriced) {
    const why = 'unpriced models, failures or cancellations before any usage';
    totals.push(unpriced === requests ? `none with a cost (${why})` : `${formatInt(unpriced)} requests without a cost (${why})`);
  }

  const chartBox = h('div', { class: 'chart-box' });
  const dayTable = h('details', { class: 'raw' }, h('summary', { text: 'The chart as a table' }), groupTable('Costs by day', byDay.items, 'Day'));
  const draw = () => {
    const chosen = METRICS[metric.value];
    const points = rows.map((row) => ({ label: row.key, short: row.key.slice(5), value: chosen.value(row) }));
    const peak = points.reduce((best, point) => (point.value > best.value ? point : best), points[0]);
    const width = Math.max(Math.floor(chartBox.clientWidth), 280);
    chartBox.replaceChildren(
      barChart({
        points,
        format: chosen.format,
        width,
        idPrefix: 'day-chart',
        title: `${chosen.label} by day, last ${days} days`,
        summary: peak.value > 0 ? `Highest on ${peak.label}: ${chosen.format(peak.value)}.` : 'Nothing in this period.',
      }),
    );
  };
  metric.addEventListener('change', draw);

  element.append(
    h('p', { class: 'totals', role: 'status', text: `Last ${days} days: ${totals.join(' · ')}.` }),
    h(
      'section',
      { class: 'panel', 'aria-labelledby': 'by-day-title' },
      h(
        'div',
        { class: 'panel-head' },
        h('h2', { id: 'by-day-title', text: 'By day' }),
        h('div', { class: 'field' }, h('label', { for: 'costs-metric', text: 'Show' }), metric),
      ),
      chartBox,
      dayTable,
    ),
    // One under the other: side by side (half of the page's 1,120 px each), a table of six columns was cut off at
    // its right edge, its cost column hidden behind a sideways scroll.
    h('section', { class: 'panel', 'aria-labelledby': 'by-model-title' }, h('h2', { id: 'by-model-title', text: 'By model' }), groupTable('Costs by model', byModel.items, 'Model')),
    h('section', { class: 'panel', 'aria-labelledby': 'by-agent-title' }, h('h2', { id: 'by-agent-title', text: 'By agent' }), groupTable('Costs by agent', byAgent.items, 'Agent')),
  );
  let lastWidth = 0;
  const observer = new ResizeObserver(() => {
    if (!chartBox.isConnected) {
      observer.disconnect();
      return;
    }
    const width = Math.floor(chartBox.clientWidth);
    if (width && width !== lastWidth) {
      lastWidth = width;
      draw();
    }
  });
  observer.observe(chartBox);
  return done;
}
