// Building blocks of the dashboard page: DOM helpers, number formatting and SVG charts.
// Every text goes in through textContent and every chart is built node by node, so no
// name or figure is ever parsed as HTML.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const CURVE_COLOURS = ["#2e90fa", "#f04438", "#12b76a", "#f79009", "#7a5af8", "#ee46bc"];

function $(id) { return document.getElementById(id); }

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

// ---- formatting ---------------------------------------------------------------------------

function formatBytes(n) {
  if (n === null || n === undefined) return "unknown";
  const units = ["B", "KiB", "MiB", "GiB"];
  let unit = 0;
  while (n >= 1024 && unit < units.length - 1) { n /= 1024; unit += 1; }
  return (unit === 0 ? n : n.toFixed(1)) + " " + units[unit];
}

function formatAgo(unixSeconds) {
  if (!unixSeconds) return "never";
  const seconds = Math.max(0, Date.now() / 1000 - unixSeconds);
  if (seconds < 90) return Math.round(seconds) + " s ago";
  if (seconds < 5400) return Math.round(seconds / 60) + " min ago";
  return Math.round(seconds / 3600) + " h ago";
}

function formatSeconds(value) {
  if (value === null || value === undefined) return "–";
  return value < 1 ? (value * 1000).toFixed(0) + " ms" : value.toFixed(2) + " s";
}

function formatRate(value) { return value === null || value === undefined ? "–" : value.toFixed(2); }

function formatCount(value) { return String(Math.round(value)); }

function formatShare(fraction) { return (fraction * 100).toFixed(1) + "%"; }

// ---- charts (SVG built node by node) ------------------------------------------------------

function polyline(values, xs, width, height, yMax, colour) {
  const line = document.createElementNS(SVG_NS, "polyline");
  const xMin = xs[0], xSpan = (xs[xs.length - 1] - xs[0]) || 1;
  const points = [];
  values.forEach((value, i) => {
    if (value === null || value === undefined) return;
    const x = ((xs[i] - xMin) / xSpan) * (width - 2) + 1;
    const y = height - 1 - (value / (yMax || 1)) * (height - 2);
    points.push(x.toFixed(1) + "," + y.toFixed(1));
  });
  line.setAttribute("points", points.join(" "));
  if (colour) line.setAttribute("stroke", colour);
  return line;
}

function sparkline(values, xs) {
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", "0 0 96 24");
  const yMax = Math.max(0, ...values.filter((v) => v !== null));
  if (values.length > 1) svg.appendChild(polyline(values, xs, 96, 24, yMax));
  return svg;
}

function lossCurve(run) {
  const figure = el("div");
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("class", "curve");
  svg.setAttribute("viewBox", "0 0 480 160");
  const steps = run.train.map((p) => p.step);
  const series = [{ label: "loss", values: run.train.map((p) => p.loss) }];
  run.tasks.forEach((task, i) => series.push({ label: task, values: run.train.map((p) => p.task_loss[i] ?? null) }));
  const yMax = Math.max(0, ...series.flatMap((s) => s.values.filter((v) => v !== null)));
  const legend = el("div", null, "legend");
  if (steps.length > 1) {
    series.forEach((s, i) => {
      const colour = CURVE_COLOURS[i % CURVE_COLOURS.length];
      svg.appendChild(polyline(s.values, steps, 480, 160, yMax, colour));
      const key = el("span", "— " + s.label);
      key.style.color = colour;
      legend.appendChild(key);
    });
  }
  figure.appendChild(svg);
  figure.appendChild(legend);
  figure.appendChild(el("div", "train loss by step (max " + yMax.toFixed(3) + ")", "muted"));
  return figure;
}
