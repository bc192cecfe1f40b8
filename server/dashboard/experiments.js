// The experiments panel: each experiment's per-arm figures, its comparisons with the control
// (fixed 95% interval, p-value and the always-valid interval) and its sample-ratio check, exactly
// as GET /v1/experiments/{name} computes them (the state poll carries those summaries).
// Arm, adapter and experiment names are operators' text: they go in through textContent only.
"use strict";

const ARM_COLUMNS = [
  ["Arm", "name"], ["Adapter", "adapter"], ["Weight", "weight"], ["Units", "assignments"], ["Requests", "requests"],
  ["Errors", "errors"], ["Feedback", "feedback"], ["Reward mean", "reward-mean"], ["Thumbs up", "thumbs-up"],
  ["TTFT p50", "ttft-p50"], ["Latency p50", "latency-p50"], ["Versions served", "versions"],
];
const COMPARISON_COLUMNS = [
  ["Arm", "arm"], ["vs", "vs"], ["Metric", "metric"], ["Difference", "diff"], ["95% interval", "ci95"],
  ["p-value", "p-value"], ["Always-valid 95%", "always-valid"],
];

// Four decimals, or three significant digits for tiny values, so a p-value of 1e-7 is not "0".
function formatStat(value) {
  if (value === null || value === undefined) return "–";
  if (value !== 0 && Math.abs(value) < 0.001) return value.toExponential(2);
  return value.toFixed(4);
}

function formatInterval(bounds) {
  return bounds ? "[" + formatStat(bounds[0]) + ", " + formatStat(bounds[1]) + "]" : "–";
}

function headedTable(columns, className) {
  const table = el("table", null, className);
  const head = document.createElement("tr");
  columns.forEach(([title]) => head.appendChild(el("th", title)));
  table.appendChild(document.createElement("thead")).appendChild(head);
  table.appendChild(document.createElement("tbody"));
  return table;
}

function armRow(arm) {
  const versions = Object.entries(arm.versions || {}).map(([version, count]) => "v" + version + ": " + count);
  const cells = {
    name: arm.name, adapter: arm.adapter, weight: arm.weight, assignments: formatCount(arm.assignments),
    requests: formatCount(arm.requests), errors: formatCount(arm.errors), feedback: formatCount(arm.feedback_count),
    "reward-mean": formatStat(arm.reward_mean), "thumbs-up": formatStat(arm.thumbs_up_rate),
    "ttft-p50": formatSeconds(arm.ttft_p50_s), "latency-p50": formatSeconds(arm.latency_p50_s),
    versions: versions.join(", ") || "–",
  };
  const tr = document.createElement("tr");
  tr.dataset.arm = arm.name;
  ARM_COLUMNS.forEach(([, key]) => tr.appendChild(el("td", cells[key], key)));
  return tr;
}

function comparisonRow(comparison) {
  const cells = {
    arm: comparison.arm, vs: comparison.vs, metric: comparison.metric, diff: formatStat(comparison.diff),
    ci95: formatInterval(comparison.ci95), "p-value": formatStat(comparison.p_value),
    "always-valid": formatInterval(comparison.always_valid_ci95),
  };
  const tr = document.createElement("tr");
  tr.dataset.arm = comparison.arm;
  tr.dataset.metric = comparison.metric;
  COMPARISON_COLUMNS.forEach(([, key]) => tr.appendChild(el("td", cells[key], key)));
  if (comparison.note) tr.title = comparison.note;
  return tr;
}

function experimentBlock(summary) {
  const block = el("div", null, "experiment");
  block.dataset.name = summary.name;
  block.appendChild(el("h3", summary.name));
  const facts = "task " + summary.task + " · " + summary.status + (summary.routing ? " (routing)" : " (not routing)") +
    " · control " + summary.control + " · unit " + summary.unit;
  block.appendChild(el("div", facts, "muted"));

  const arms = headedTable(ARM_COLUMNS, "arms");
  summary.arms.forEach((arm) => arms.tBodies[0].appendChild(armRow(arm)));
  block.appendChild(arms);

  const comparisons = headedTable(COMPARISON_COLUMNS, "comparisons");
  summary.comparisons.forEach((comparison) => comparisons.tBodies[0].appendChild(comparisonRow(comparison)));
  if (summary.comparisons.length) block.appendChild(comparisons);

  const srm = el("div", null, "srm");
  srm.appendChild(el("span", "Sample ratio check: p = "));
  srm.appendChild(el("span", formatStat(summary.srm.p_value), "srm-p"));
  srm.appendChild(el("span", " · "));
  const flag = el("span", summary.srm.flagged ? "flagged: the split does not match the weights" : "ok",
    summary.srm.flagged ? "srm-flag warning" : "srm-flag");
  flag.dataset.flagged = String(summary.srm.flagged);
  srm.appendChild(flag);
  block.appendChild(srm);

  if (summary.shadow) {
    const s = summary.shadow;
    block.appendChild(el("div", "shadow " + s.adapter + " at " + formatShare(s.rate) + ": " + formatCount(s.requests) +
      " recorded, " + formatCount(s.errors) + " failed, " + formatCount(s.dropped) + " not sent, " +
      formatCount(s.preempted) + " gave their row to live requests", "muted shadow"));
  }
  return block;
}

function renderExperiments(state) {
  const list = $("experiments-list");
  if (state.experiments === null || state.experiments === undefined) {
    $("experiments-note").textContent = "Experiments are shown to admin keys.";
    list.replaceChildren();
    return;
  }
  $("experiments-note").textContent = state.experiments.length
    ? "Comparisons are against each experiment's control arm; the always-valid interval may be watched as often as you like."
    : "No experiments: create one with PUT /v1/experiments/NAME.";
  list.replaceChildren(...state.experiments.map(experimentBlock));
}
