// megatron-gate stability dashboard: renders what /api/view returns (or window.DASHBOARD_DATA in an
// exported file) with plotly.js, and polls /api/status every 2 s for new records.
"use strict";
(function () {
  const LINE_CHARTS = [
    { metric: "loss", title: "Loss", log: false },
    { metric: "grad_norm", title: "Gradient norm", log: true },
    { metric: "update_norm", title: "Update norm", log: true },
    { metric: "learning_rate", title: "Learning rate", log: false },
  ];
  const HEATMAPS = [
    // max |h| spans decades (massive activations): coloured by log10, one scale for all runs.
    { metric: "max_abs_residual", title: "log10 max |h|, residual stream", log: true,
      colorscale: "YlOrRd" },
    { metric: "first_token_attention_share", title: "first-token attention share", zmin: 0,
      zmax: 1, colorscale: "Viridis" },
    { metric: "gate_sparsity", title: "gate sparsity (share < 0.1)", zmin: 0, zmax: 1,
      colorscale: "Cividis" },
  ];
  const RUN_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf",
    "#8c564b", "#e377c2"];
  const SEVERITY_COLORS = { info: "#1f77b4", warning: "#ff7f0e", critical: "#d62728" };
  const ACTION_SYMBOLS = { log: "circle-open", alert: "diamond", skip_step: "x",
    lr_backoff: "triangle-down", rollback: "star", abort: "square" };
  const POLL_MS = 2000;
  const MAX_TABLE_ROWS = 500;
  const PLOT_CONFIG = { responsive: true, displaylogo: false };

  const exported = window.DASHBOARD_DATA || null;
  const state = { start: null, end: null, versions: "", inFlight: false, pending: false,
    syncing: false, runNames: [] };
  window.dashboardRenders = 0; // read by the browser test

  function runColor(i) { return RUN_COLORS[i % RUN_COLORS.length]; }

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    Object.entries(attrs || {}).forEach(([k, v]) => node.setAttribute(k, v));
    if (text !== undefined && text !== null) node.textContent = String(text); // never innerHTML
    return node;
  }

  function fmt(v) {
    if (v === null || v === undefined) return "";
    return typeof v === "number" ? Number(v.toPrecision(4)).toString() : String(v);
  }

  // ---- header: one chip per run ----
  function renderRuns(status) {
    const box = document.getElementById("runs");
    box.replaceChildren();
    status.runs.forEach((run, i) => {
      const chip = el("div", { class: "run", "data-run": run.name });
      const swatch = el("span", { class: "swatch" });
      swatch.style.background = runColor(i);
      chip.append(swatch, el("b", {}, run.name), " · ");
      chip.append(el("span", { class: "status-" + run.status }, run.status));
      chip.append(` · step ${run.last_step ?? "–"} · ${run.steps_logged} steps logged · ` +
        `${run.num_layers} layers · ${run.events} events`);
      if (run.skipped_lines > 0) {
        const reasons = Object.entries(run.skipped_reasons).map(([r, n]) => `${n}× ${r}`);
        chip.append(el("span", { class: "warn", title: reasons.join("\n") },
          `⚠ ${run.skipped_lines} malformed line(s) skipped`));
      }
      box.append(chip);
    });
    const when = new Date(status.time * 1000).toLocaleTimeString();
    document.getElementById("updated").textContent =
      exported ? `exported ${new Date(status.time * 1000).toLocaleString()}` : `live · updated ${when}`;
  }

  // ---- line charts: runs overlaid, events as markers ----
  // An event sits on the chart of its own metric; events of other metrics (per-layer
  // detectors, NaN/Inf) sit on the loss curve.
  const OWN_CHART = new Set(["grad_norm", "update_norm"]);

  function eventTrace(run, i, metric) {
    const onThisChart = (e) => (OWN_CHART.has(e.metric) ? e.metric === metric : metric === "loss");
    const events = run.events.filter((e) => onThisChart(e) && e.at && e.at[metric] !== null);
    return {
      type: "scatter", mode: "markers", name: `${run.name} events`, legendgroup: run.name,
      x: events.map((e) => e.step), y: events.map((e) => e.at[metric]),
      text: events.map((e) => `${e.detector} (${e.severity}) → ${e.action}<br>${e.message}`),
      hovertemplate: "step %{x}<br>%{text}<extra>" + run.name + "</extra>",
      marker: { size: 11, line: { width: 2, color: runColor(i) },
        color: events.map((e) => SEVERITY_COLORS[e.severity] || "#444"),
        symbol: events.map((e) => ACTION_SYMBOLS[e.action] || "circle") },
      showlegend: false,
    };
  }

  function renderLines(data) {
    LINE_CHARTS.forEach((chart) => {
      const traces = [];
      data.runs.forEach((run, i) => {
        const series = run.scalars[chart.metric];
        if (!series) return;
        traces.push({ type: "scatter", mode: "lines", name: run.name, legendgroup: run.name,
          x: series.x, y: series.y, line: { color: runColor(i), width: 1.4 },
          hovertemplate: "step %{x}<br>%{y:.4g}<extra>" + run.name + "</extra>" });
        if (chart.metric !== "learning_rate") traces.push(eventTrace(run, i, chart.metric));
      });
      const layout = {
        title: { text: chart.title, font: { size: 14 }, x: 0.02 },
        margin: { l: 60, r: 16, t: 36, b: 36 }, uirevision: "keep",
        xaxis: { title: { text: "step" } },
        yaxis: chart.log ? { type: "log", dtick: 1, exponentformat: "power" } : { type: "linear" },
        legend: { orientation: "h", y: 1.12, x: 0.3, xanchor: "left" },
        paper_bgcolor: "#fff", plot_bgcolor: "#fff",
      };
      Plotly.react("chart-" + chart.metric, traces, layout, PLOT_CONFIG);
    });
  }

  // ---- per-layer heatmaps, one row per run ----
  function heatmapDiv(runIndex, metric) {
    const id = `heat-${runIndex}-${metric}`;
    let div = document.getElementById(id);
    if (!div) {
      let row = document.getElementById(`heatrow-${runIndex}`);
      if (!row) {
        row = el("div", { id: `heatrow-${runIndex}`, class: "heatrow" });
        document.getElementById("heatmaps").append(row);
      }
      div = el("div", { id, class: "chart" });
      row.append(div);
    }
    return div;
  }

  function log10Grid(z) { return z.map((row) => row.map((v) => (v > 0 ? Math.log10(v) : null))); }

  function sharedRange(data, metric) {
    let lo = Infinity, hi = -Infinity;
    data.runs.forEach((run) => {
      const map = run.heatmaps[metric];
      if (!map) return;
      map.z.forEach((row) => row.forEach((v) => {
        if (v > 0) { const l = Math.log10(v); if (l < lo) lo = l; if (l > hi) hi = l; }
      }));
    });
    return lo <= hi ? [lo, hi] : [undefined, undefined];
  }

  function heatmapLabel(runIndex, name) {
    let label = document.getElementById(`heatlabel-${runIndex}`);
    if (!label) {
      label = el("h3", { id: `heatlabel-${runIndex}`, class: "heatlabel" });
      document.getElementById("heatmaps").append(label);
    }
    label.textContent = name;
    label.style.color = runColor(runIndex);
  }

  function renderHeatmaps(data) {
    const logRange = sharedRange(data, "max_abs_residual");
    data.runs.forEach((run, i) => {
      heatmapLabel(i, run.name);
      HEATMAPS.forEach((h) => {
        const div = heatmapDiv(i, h.metric);
        const map = run.heatmaps[h.metric];
        const title = { text: h.title, font: { size: 13 }, x: 0.02 };
        const layout = { title, margin: { l: 50, r: 10, t: 34, b: 36 }, uirevision: "keep",
          xaxis: { title: { text: "step" } }, yaxis: { title: { text: "layer" } },
          paper_bgcolor: "#fff" };
        if (!map) {
          layout.annotations = [{ text: "not logged for this run", showarrow: false,
            xref: "paper", yref: "paper", x: 0.5, y: 0.5 }];
          layout.xaxis.visible = false; layout.yaxis.visible = false;
          Plotly.react(div, [], layout, PLOT_CONFIG);
          return;
        }
        const layers = map.z.map((_, l) => l + 1);
        const [zmin, zmax] = h.log ? logRange : [h.zmin, h.zmax];
        const trace = { type: "heatmap", x: map.x, y: layers, z: h.log ? log10Grid(map.z) : map.z,
          customdata: map.z, colorscale: h.colorscale, reversescale: h.log, zmin, zmax,
          colorbar: { thickness: 10 },
          hovertemplate: "step ≥ %{x}<br>layer %{y}<br>max %{customdata:.4g}<extra></extra>" };
        Plotly.react(div, [trace], layout, PLOT_CONFIG);
      });
    });
  }

  // ---- events table ----
  function renderEvents(data) {
    const rows = [];
    data.runs.forEach((run) => run.events.forEach((e) => rows.push([run.name, e])));
    rows.sort((a, b) => b[1].step - a[1].step);
    const total = data.runs.reduce((n, run) => n + run.events_in_range, 0);
    document.getElementById("events-count").textContent =
      `${total} in view` + (rows.length > MAX_TABLE_ROWS ? `, newest ${MAX_TABLE_ROWS} shown` : "");
    const body = document.querySelector("#events tbody");
    body.replaceChildren(...rows.slice(0, MAX_TABLE_ROWS).map(([name, e]) => {
      const tr = el("tr", { class: "sev-" + e.severity });
      [name, e.step, e.severity, e.detector, e.metric, e.layer, e.value, e.threshold, e.action,
        e.message].forEach((v, k) => tr.append(el("td", typeof v === "number" && k !== 0 ?
        { class: "num" } : {}, fmt(v))));
      return tr;
    }));
  }

  function render(data) {
    state.runNames = data.runs.map((r) => r.name);
    renderRuns(data.status);
    renderLines(data);
    renderHeatmaps(data);
    renderEvents(data);
    window.dashboardRenders += 1;
  }

  // ---- zoom: every chart follows, the server sends detail for the range ----
  function allCharts() { return Array.from(document.querySelectorAll(".chart")).filter((d) => d.data); }

  function onRelayout(source, event) {
    if (state.syncing) return;
    let start = null, end = null;
    if (event["xaxis.range[0]"] !== undefined) {
      start = event["xaxis.range[0]"]; end = event["xaxis.range[1]"];
    } else if (event["xaxis.range"]) {
      [start, end] = event["xaxis.range"];
    } else if (!event["xaxis.autorange"]) {
      return; // not an x-axis change
    }
    state.start = start; state.end = end;
    state.syncing = true;
    const update = start === null ? { "xaxis.autorange": true } : { "xaxis.range": [start, end] };
    Promise.all(allCharts().filter((d) => d !== source).map((d) => Plotly.relayout(d, update)))
      .finally(() => { state.syncing = false; });
    if (!exported) fetchView();
  }

  function attachZoom() {
    allCharts().forEach((div) => {
      if (div.dataset.zoomAttached) return;
      div.dataset.zoomAttached = "1";
      div.on("plotly_relayout", (event) => onRelayout(div, event));
    });
  }

  // ---- live mode: poll the status, fetch the view when something changed ----
  function requestSize() {
    const lineWidth = document.getElementById("chart-loss").clientWidth || 800;
    return { points: Math.min(4000, Math.max(200, 2 * lineWidth)),
      heatmap: Math.min(1000, Math.max(100, Math.round(lineWidth / 1.5))) };
  }

  async function fetchView() {
    if (state.inFlight) { state.pending = true; return; }
    state.inFlight = true;
    try {
      const size = requestSize();
      const params = new URLSearchParams({ points: size.points, heatmap: size.heatmap });
      if (state.start !== null) { params.set("start", state.start); params.set("end", state.end); }
      const response = await fetch("api/view?" + params);
      const data = await response.json();
      state.versions = data.status.runs.map((r) => r.version).join(",");
      render(data);
      attachZoom();
    } catch (error) {
      document.getElementById("updated").textContent = "server unreachable: " + error;
    } finally {
      state.inFlight = false;
      if (state.pending) { state.pending = false; fetchView(); }
    }
  }

  async function poll() {
    try {
      const status = await (await fetch("api/status")).json();
      const versions = status.runs.map((r) => r.version).join(",");
      if (versions !== state.versions) fetchView(); else renderRuns(status);
    } catch (error) {
      document.getElementById("updated").textContent = "server unreachable: " + error;
    }
  }

  if (exported) {
    render(exported);
    attachZoom();
  } else {
    fetchView();
    setInterval(poll, POLL_MS);
  }
})();
