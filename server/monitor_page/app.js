// The monitor's page: the runs table (#/) and one run (#/run/<name>), redrawn when the run folder changes.
// Every text from a run folder (site names, failure reasons) is set as text, never as HTML.
"use strict";

const POLL_MS = 2000;
let timer = null;
let shown = { route: "", stamp: "", state: "" };
let pickedRound = null;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) if (child !== null && child !== undefined) node.append(child);
  return node;
}

// Plotly renders a few HTML tags (links among them) in chart text: names from a run folder go to it escaped.
const esc = (text) => String(text ?? "").replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
const fmt = (v, digits = 3) => (v === null || v === undefined || Number.isNaN(v) ? "–" : Number(v).toFixed(digits));
const clock = (s) => (s === null || s === undefined ? "–" : `${Math.floor(s / 60)}m${String(Math.round(s % 60)).padStart(2, "0")}s`);
const stateBadge = (state) => el("span", { class: `state state-${state}`, "data-state": state, text: state });

async function getJSON(url) {
  const reply = await fetch(url, { cache: "no-store", credentials: "same-origin" });
  if (!reply.ok) throw new Error(`${url}: ${reply.status} ${await reply.text()}`);
  return reply.json();
}

function setLive(text, ok = true) {
  const live = document.getElementById("live");
  live.textContent = text;
  live.style.color = ok ? "" : "#b42318";
}

// ---- the runs table -------------------------------------------------------------------------------------------

function runsView(runs) {
  const rows = runs.map((r) =>
    el("tr", { "data-run": r.name },
      el("td", {}, el("a", { href: `#/run/${encodeURIComponent(r.name)}`, text: r.name })),
      el("td", {}, stateBadge(r.state), r.why ? el("div", { class: "why", text: r.why }) : null),
      el("td", { class: "num rounds", text: `${Math.max(r.last_round, 0)} of ${r.num_rounds ?? "?"}` }),
      el("td", { class: "num best-auc", text: fmt(r.best_pooled_auc) }),
      el("td", { class: "num heldout-auc", text: fmt(r.heldout_auc) }),
      el("td", { class: "started", text: (r.started || "").replace("T", " ").replace("+00:00", " UTC") }),
      el("td", { class: "num hospitals", text: String(r.n_hospitals ?? "–") }),
      el("td", { class: "settings", text: Object.entries(r.settings).map(([k, v]) => `${k}=${v}`).join("  ") }),
    ));
  return el("section", {},
    el("h1", { text: "Runs" }),
    runs.length ? el("div", { class: "scroll" }, el("table", { id: "runs-table" },
      el("thead", {}, el("tr", {}, ...["run", "state", "rounds", "best pooled AUC", "held-out AUC", "started", "hospitals", "settings"]
        .map((h, i) => el("th", { class: i >= 2 && i <= 4 || i === 6 ? "num" : "", text: h })))),
      el("tbody", {}, rows)))
      : el("p", { text: "No run folders here yet: start one with `fedimaging simulate`." }));
}

// ---- one run --------------------------------------------------------------------------------------------------

const column = (history, name) => history.map((row) => (row[name] === undefined ? null : row[name]));
const rounds = (history) => history.map((row) => row.round);

function band(x, low, high, name, color) {
  return [
    { x, y: high, mode: "lines", line: { width: 0 }, hoverinfo: "skip", showlegend: false, connectgaps: false },
    { x, y: low, mode: "lines", line: { width: 0 }, fill: "tonexty", fillcolor: color, name, hoverinfo: "skip", connectgaps: false },
  ];
}

function lineChart(id, traces, title, yRange = [0, 1.02]) {
  const layout = {
    title: { text: title, font: { size: 14 } }, margin: { l: 44, r: 12, t: 34, b: 30 }, legend: { orientation: "h", y: -0.16, font: { size: 11 } },
    xaxis: { dtick: 1, rangemode: "tozero" }, yaxis: { range: yRange }, hovermode: "x unified",
  };
  Plotly.react(id, traces, layout, { displaylogo: false, displayModeBar: false, responsive: true });
}

function suffixes(run) {
  return run.labels.length > 1 ? run.labels.map((label) => [`__${label}`, label]) : [["", run.labels[0] || ""]];
}

function drawCharts(run) {
  const h = run.history, x = rounds(h);
  for (const [suffix, label] of suffixes(run)) {
    const id = `chart-auc${suffix}`, title = `AUC${label && run.labels.length > 1 ? ` — ${label}` : ""}`;
    lineChart(id, [
      ...band(x, column(h, `global_auc_low${suffix}`), column(h, `global_auc_high${suffix}`), "pooled: range the bins allow", "rgba(23,92,211,0.12)"),
      ...band(x, column(h, `heldout_auc_ci_low${suffix}`), column(h, `heldout_auc_ci_high${suffix}`), "held-out: 95 % CI", "rgba(26,127,55,0.12)"),
      { x, y: column(h, `global_auc${suffix}`), name: "pooled validation", mode: "lines+markers", line: { color: "#175cd3" } },
      { x, y: column(h, `heldout_auc${suffix}`), name: "held-out", mode: "lines+markers", line: { color: "#1a7f37" } },
      ...(suffix ? [] : [
        { x, y: column(h, "mean_site_auc"), name: "mean of sites", mode: "lines", line: { color: "#8e9aaf", dash: "dot" } },
        { x, y: column(h, "worst_site_auc"), name: "worst site", mode: "lines+markers", line: { color: "#b42318", dash: "dash" },
          text: column(h, "worst_site").map(esc), hovertemplate: "%{y:.3f} (%{text})" },
      ]),
    ], title);
    lineChart(`chart-sens${suffix}`, [
      { x, y: column(h, `global_sensitivity${suffix}`), name: "pooled sensitivity", mode: "lines+markers", line: { color: "#175cd3" } },
      { x, y: column(h, `global_specificity${suffix}`), name: "pooled specificity", mode: "lines+markers", line: { color: "#175cd3", dash: "dash" } },
      { x, y: column(h, `heldout_sensitivity${suffix}`), name: "held-out sensitivity", mode: "lines+markers", line: { color: "#1a7f37" } },
      { x, y: column(h, `heldout_specificity${suffix}`), name: "held-out specificity", mode: "lines+markers", line: { color: "#1a7f37", dash: "dash" } },
    ], `Sensitivity and specificity at the threshold${label && run.labels.length > 1 ? ` — ${label}` : ""}`);
  }
  const trained = h.filter((row) => row.round > 0);
  Plotly.react("chart-durations", [{ x: rounds(trained), y: column(trained, "seconds"), type: "bar", name: "seconds", marker: { color: "#8e9aaf" } }],
    { title: { text: "Time per round (s)", font: { size: 14 } }, margin: { l: 44, r: 12, t: 34, b: 36 }, xaxis: { title: { text: "round" }, dtick: 1 } },
    { displaylogo: false, displayModeBar: false, responsive: true });
  const multiples = document.getElementById("hospital-charts");
  for (const [index, site] of run.hospitals.entries()) {
    const id = `hospital-chart-${index}`;
    if (!document.getElementById(id)) multiples.append(el("div", { id, class: "chart", "data-site": site.site }));
    Plotly.react(id, [{ x: site.auc.map((a) => a.round), y: site.auc.map((a) => a.auc), mode: "lines+markers", line: { color: "#175cd3" } }], {
      title: { text: esc(site.site), font: { size: 12 } }, margin: { l: 34, r: 8, t: 26, b: 26 }, yaxis: { range: [0, 1.02] },
      xaxis: { range: [0.5, Math.max(run.last_round, 1) + 0.5], dtick: 1 }, showlegend: false,
    }, { displaylogo: false, responsive: true, staticPlot: true });
  }
}

function facts(run) {
  const last = run.history.length ? run.history[run.history.length - 1] : {};
  const item = (id, label, value) => el("div", {}, el("span", { text: label }), el("b", { id, text: value }));
  return el("div", { class: "facts" },
    item("run-rounds", "rounds", `${Math.max(run.last_round, 0)} of ${run.num_rounds ?? "?"}`),
    item("run-pooled-auc", "pooled AUC (last round)", fmt(last.global_auc)),
    item("run-heldout-auc", "held-out AUC (last round)", fmt(last.heldout_auc)),
    item("run-heldout-ci", "held-out 95 % CI", last.heldout_auc_ci_low === undefined ? "–" : `${fmt(last.heldout_auc_ci_low)}–${fmt(last.heldout_auc_ci_high)}`),
    item("run-best", "best round (pooled)", run.best_round === null || run.best_round === undefined ? "–" : `${run.best_round} (${fmt(run.best_pooled_auc)})`),
    item("run-hospitals", "hospitals", String(run.n_hospitals ?? "–")),
    item("run-eta", "ETA", run.state === "running" ? clock(run.eta_seconds) : "–"),
  );
}

const ROUND_COLUMNS = [
  ["global_auc", "pooled AUC"], ["global_sensitivity", "pooled sens"], ["global_specificity", "pooled spec"], ["worst_site_auc", "worst site AUC"],
  ["heldout_auc", "held-out AUC"], ["heldout_sensitivity", "held-out sens"], ["heldout_specificity", "held-out spec"],
  ["gradcam_border_energy", "Grad-CAM border"], ["n_sites", "sites"], ["n_failed", "failed"], ["seconds", "seconds"],
];

function roundTable(run) {
  const digits = (name) => (name.startsWith("n_") ? 0 : name === "seconds" ? 1 : 3);
  return el("div", { class: "scroll" }, el("table", { id: "round-table" },
    el("thead", {}, el("tr", {}, el("th", { text: "round (★ best so far)" }), ...ROUND_COLUMNS.map(([, label]) => el("th", { class: "num", text: label })))),
    el("tbody", {}, [...run.history].reverse().map((row) => el("tr", { "data-round": row.round },
      el("td", { text: String(row.round) + (row.best === true || row.best === "True" ? " ★" : "") }),
      ...ROUND_COLUMNS.map(([name]) => el("td", { class: "num", "data-col": name, text: fmt(row[name], digits(name)) })))))));
}

function hospitalTable(run) {
  const mean = (xs) => (xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : null);
  return el("div", { class: "scroll" }, el("table", { id: "hospitals-table" },
    el("thead", {}, el("tr", {}, ...["hospital", "training images", "validation images", "rounds taken part", "last AUC", "mean reply (s)", "failures"]
      .map((h, i) => el("th", { class: i > 0 && i < 6 ? "num" : "", text: h })))),
    el("tbody", {}, run.hospitals.map((s) => el("tr", { "data-site": s.site },
      el("td", { text: s.site }),
      el("td", { class: "num", "data-col": "n_train", text: fmt(s.n_train, 0) }),
      el("td", { class: "num", "data-col": "n_val", text: fmt(s.n_val, 0) }),
      el("td", { class: "num", "data-col": "rounds", text: `${s.rounds.length} of ${s.of_rounds}` }),
      el("td", { class: "num", "data-col": "last_auc", text: fmt(s.last_auc) }),
      el("td", { class: "num", "data-col": "reply_seconds", text: fmt(mean(s.reply_seconds.map((r) => r.seconds).filter((v) => v !== null)), 1) }),
      el("td", { "data-col": "failures" }, s.failures.length
        ? el("details", {}, el("summary", { text: `${s.failures.length} failure(s)` }), el("ul", {}, s.failures.map((f) => el("li", { text: `round ${f.round}: ${f.text}` }))))
        : "none"))))));
}

function timeline(run) {
  if (!run.events.length) return el("p", { id: "events", text: "No failures, late replies or warnings." });
  return el("ul", { id: "events", class: "events" }, [...run.events].reverse().map((e) =>
    el("li", { "data-round": e.round, "data-kind": e.kind },
      el("span", { class: `kind kind-${e.kind.replace(/ /g, "-")}`, text: `round ${e.round} · ${e.kind}` }), " ", el("span", { text: e.text }))));
}

function pictureBlock(run) {
  const available = Object.keys(run.pictures).map(Number).sort((a, b) => a - b);
  if (!available.length) return el("p", { id: "round-pictures", text: "No round pictures written yet." });
  if (pickedRound === null || !available.includes(pickedRound)) pickedRound = available[available.length - 1];
  const files = run.pictures[pickedRound];
  const src = (path) => `/files/${encodeURIComponent(run.name)}/${path}`;
  const select = el("select", { id: "round-picker", class: "no-print", onchange: (event) => { pickedRound = Number(event.target.value); render(run); } },
    available.map((r) => el("option", { value: r, selected: r === pickedRound ? "selected" : null, text: `round ${r}` })));
  return el("div", { id: "round-pictures" },
    el("label", { class: "no-print" }, "Round ", select),
    el("div", { class: "pictures" },
      files.report ? el("figure", {}, el("img", { id: "round-report", src: src(files.report), alt: `ROC curves, confusion matrix and reliability, round ${pickedRound}` }),
        el("figcaption", { text: "ROC curves (pooled validation, held-out), held-out confusion matrix at the operating point, reliability" })) : null,
      files.gradcam ? el("figure", {}, el("img", { id: "round-gradcam", src: src(files.gradcam), alt: `Grad-CAM grid, round ${pickedRound}` }),
        el("figcaption", { text: "Grad-CAM on held-out images: does the model look at the lesion?" })) : null));
}

function configTable(run) {
  return el("details", {}, el("summary", { text: "every setting (config.json)" }), el("table", { class: "config", id: "config-table" },
    el("tbody", {}, Object.entries(run.config).map(([k, v]) => el("tr", {}, el("td", { text: k }), el("td", { text: Array.isArray(v) ? v.join(",") : String(v) }))))));
}

function runView(run) {
  const multi = run.labels.length > 1;
  const charts = suffixes(run).flatMap(([suffix]) => [el("div", { id: `chart-auc${suffix}`, class: "chart" }), el("div", { id: `chart-sens${suffix}`, class: "chart" })]);
  return el("div", {},
    el("p", { class: "no-print" }, el("a", { href: "#/", text: "← all runs" })),
    el("section", {},
      el("h1", {}, `${run.name} `, stateBadge(run.state)),
      run.why ? el("p", { id: "run-why", class: "why", text: run.why }) : null,
      facts(run),
      run.missing.length ? el("div", { id: "missing", class: "missing" }, el("b", { text: "Not (yet) in the run folder: " }), run.missing.join("; ")) : null),
    el("section", {}, el("h2", { text: multi ? "Per label: AUC, sensitivity and specificity over rounds" : "Over rounds" }), el("div", { class: "charts" }, charts)),
    el("section", {}, el("h2", { text: "Hospitals" }), hospitalTable(run), el("div", { id: "hospital-charts", class: "small-multiples" })),
    el("section", {}, el("h2", { text: "Failures and warnings" }), timeline(run)),
    el("section", {}, el("h2", { text: "Rounds" }), el("div", { class: "charts" }, el("div", { id: "chart-durations", class: "chart" })), roundTable(run)),
    el("section", {}, el("h2", { text: "ROC, confusion matrix and Grad-CAM of a round" }), pictureBlock(run)),
    el("section", {}, el("h2", { text: "Configuration" }), el("p", { id: "settings-line", text: Object.entries(run.settings).map(([k, v]) => `${k}=${v}`).join("  ") }), configTable(run)),
  );
}

function render(run) {
  const view = document.getElementById("view");
  view.replaceChildren(runView(run));
  if (window.Plotly && run.history.length) drawCharts(run);
  document.title = `${run.name} · ${run.state} · fedimaging`;
}

// ---- routing and polling --------------------------------------------------------------------------------------

function route() {
  const found = location.hash.match(/^#\/run\/(.+)$/);
  try {
    return found ? { run: decodeURIComponent(found[1]) } : { run: null };
  } catch (error) {  // a malformed address: the runs table
    return { run: null };
  }
}

async function refresh() {
  const { run } = route();
  const key = run ?? "";
  try {
    if (run === null) {
      const runs = await getJSON("/api/runs");
      document.getElementById("view").replaceChildren(runsView(runs));
      document.title = "runs · fedimaging";
    } else {
      const mark = await getJSON(`/api/runs/${encodeURIComponent(run)}/stamp`);
      if (shown.route !== key || mark.stamp !== shown.stamp || mark.state !== shown.state) {
        const detail = await getJSON(`/api/runs/${encodeURIComponent(run)}`);
        render(detail);
        shown = { route: key, stamp: mark.stamp, state: mark.state };
      }
    }
    setLive(`updated ${new Date().toLocaleTimeString()}`);
  } catch (error) {
    setLive(`cannot reach the monitor: ${error.message}`, false);
  }
}

function start() {
  clearInterval(timer);
  shown = { route: "", stamp: "", state: "" };
  refresh();
  timer = setInterval(refresh, POLL_MS);
}

window.addEventListener("hashchange", () => { pickedRound = null; start(); });
start();
