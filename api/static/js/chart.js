// A bar chart drawn as SVG, sized to its container (so its text stays readable on a phone). Each bar has a tooltip
// (`<title>`); the chart is one image to assistive technology, labelled by its title and a text summary, and the
// page shows the same numbers as a table.

import { h } from './dom.js';

const HEIGHT = 220;
const MARGIN = { top: 12, right: 8, bottom: 28, left: 64 };

function niceStep(max, ticks) {
  if (!(max > 0)) return 1;
  const raw = max / ticks;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const unit = raw / magnitude;
  return (unit <= 1 ? 1 : unit <= 2 ? 2 : unit <= 5 ? 5 : 10) * magnitude;
}

/**
 * `points`: [{label, value}] in order; `format(value)` for axis labels and tooltips; `title` and `summary` describe
 * the chart to assistive technology.
 */
export function barChart({ points, format, title, summary, width, idPrefix }) {
  const innerWidth = Math.max(width - MARGIN.left - MARGIN.right, 60);
  const innerHeight = HEIGHT - MARGIN.top - MARGIN.bottom;
  const step = niceStep(Math.max(...points.map((point) => point.value), 0), 4);
  const top = Math.max(step * Math.ceil(Math.max(...points.map((point) => point.value), 0) / step), step);
  const y = (value) => MARGIN.top + innerHeight - (value / top) * innerHeight;
  const slot = innerWidth / Math.max(points.length, 1);
  const svg = h('svg:svg', {
    class: 'chart',
    width,
    height: HEIGHT,
    viewBox: `0 0 ${width} ${HEIGHT}`,
    role: 'img',
    'aria-labelledby': `${idPrefix}-title ${idPrefix}-desc`,
  });
  svg.append(h('svg:title', { id: `${idPrefix}-title`, text: title }), h('svg:desc', { id: `${idPrefix}-desc`, text: summary }));
  for (let tick = 0; tick <= top + step / 2; tick += step) {
    const at = y(tick);
    svg.append(
      h('svg:line', { class: 'grid', x1: MARGIN.left, x2: width - MARGIN.right, y1: at, y2: at }),
      h('svg:text', { class: 'axis-label', x: MARGIN.left - 6, y: at + 4, 'text-anchor': 'end', text: format(tick) }),
    );
  }
  // Every n-th day is labelled, counted back from the last (today), so the newest bar always has its label.
  const labelEvery = Math.max(1, Math.ceil(points.length / Math.max(1, Math.floor(innerWidth / 56))));
  points.forEach((point, index) => {
    const x = MARGIN.left + index * slot;
    const barWidth = Math.max(slot * 0.7, 1);
    if (point.value > 0) {
      const bar = h('svg:rect', {
        class: 'bar',
        x: x + (slot - barWidth) / 2,
        y: y(point.value),
        width: barWidth,
        height: Math.max(y(0) - y(point.value), 1),
        'data-label': point.label,
        'data-value': point.value,
      });
      bar.append(h('svg:title', { text: `${point.label}: ${format(point.value)}` }));
      svg.append(bar);
    }
    if ((points.length - 1 - index) % labelEvery === 0) {
      const last = index === points.length - 1; // ends at the chart's edge rather than past it
      svg.append(
        h('svg:text', {
          class: 'axis-label',
          x: last ? x + slot : x + slot / 2,
          y: HEIGHT - 8,
          'text-anchor': last ? 'end' : 'middle',
          text: point.short ?? point.label,
        }),
      );
    }
  });
  svg.append(h('svg:line', { class: 'baseline', x1: MARGIN.left, x2: width - MARGIN.right, y1: y(0), y2: y(0) }));
  return svg;
}
