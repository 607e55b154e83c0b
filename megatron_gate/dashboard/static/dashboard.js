// megatron-gate stability dashboard: renders what /api/view returns (or window.DASHBOARD_DATA in an
// exported file) with plotly.js, and polls /api/status every 2 s for new records.
// Every chart shares one step axis: the same x range is set on all of them, zoom included.
"use strict";
(function () {
  const LINE_CHARTS = [
    { metric: "loss", title: "Loss", log: false },
    { metric: "grad_norm", title: "Gradient norm", log: true },
    { metric: "update_norm", title: "Update norm", log: true },
    { metric: "learning_rate", title: "Learning rate", log: false },
  ];
  const HEATMAPS = [
    // max |h| spans decades (massive activations): coloured by log10, labelled in real values,
    // one scale for all runs.
    { metric: "max_abs_residual", title: "max |h|, residual stream", log: true,
      colorscale: "YlOrRd", reversescale: true },
    { metric: "first_token_attention_share", title: "first-token attention share", zmin: 0,
      zmax: 1, colorscale: "Viridis" },
    // A sequential scale without grey: grey reads as "not logged".
    { metric: "gate_sparsity", title: "gate sparsity (share < 0.1)", zmin: 0, zmax: 1,
      colorscale: "YlGnBu", reversescale: true },
  ];
  const HEATMAP_METRICS = new Set(HEATMAPS.map((h) => h.metric));
  const LINE_EVENT_METRICS = new Set(["grad_norm", "update_norm"]); // on their own chart
  const RUN_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf",
    "#8c564b", "#e377c2"];
  const SEVERITY_COLORS = { info: "#1f77b4", warning: "#ff7f0e", critical: "#d62728" };
  const ACTION_SYMBOLS = { log: "circle-open", alert: "diamond", skip_step: "x",
    lr_backoff: "triangle-down", rollback: "star", abort: "square" };
  const POLL_MS = 2000;
  const MAX_TABLE_ROWS = 500;
  const PLOT_CONFIG = { responsive: true, displaylogo: false };
  // The same margins on every chart, so that step N sits at the same x pixel on all of them
  // (the right margin holds the heatmaps' colour bars).
  const MARGIN = { l: 64, r: 96, t: 34, b: 36 };

  const exported = window.DASHBOARD_DATA || null;
  const state = { start: null, end: null, versions: "", inFlight: false, pending: false,
    syncing: false, data: null, filters: { run: "", severity: "", detector: "" } };
  window.dashboardRenders = 0; // read by the browser tests

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

  function fmtAge(seconds) {
    if (seconds === null || seconds === undefined) return "no record yet";
    if (seconds < 90) return `${Math.round(seconds)} s ago`;
    if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
    if (seconds < 172800) return `${(seconds / 3600).toFixed(1)} h ago`;
    return `${Math.round(seconds / 86400)} days ago`;
  }

  function fmtDetails(details) {
    return Object.entries(details || {}).map(([k, v]) => `${k}=${fmt(v)}`).join("  ");
  }

  // ---- banner: the server's own message, visible until the next good answer ----
  function showError(message) {
    const banner = document.getElementById("error-banner");
    banner.textContent = message;
    banner.hidden = false;
  }

  function clearError() { document.getElementById("error-banner").hidden = true; }

  async function getJson(url) {
    let response;
    try {
      response = await fetch(url);
    } catch (error) {
      throw new Error(`server unreachable (${error.message}); is megatron-gate dashboard still running?`);
    }
    let body = null;
    try { body = await response.json(); } catch (_) { /* not JSON: reported below */ }
    if (!response.ok) {
      const message = body && body.error ? body.error : response.statusText;
      throw new Error(`server error ${response.status}: ${message}`);
    }
    if (body === null) throw new Error(`server sent an unreadable answer for ${url}`);
    return body;
  }

  // ---- header: one chip per run ----
  function renderRuns(status) {
    const box = document.getElementById("runs");
    box.replaceChildren();
    status.runs.forEach((run, i) => {
      const chip = el("div", { class: "run", "data-run": run.name });
      const swatch = el("span", { class: "swatch" });
      swatch.style.background = runColor(i);
      chip.append(swatch, el("b", {}, run.name), " ");
      chip.append(el("span", { class: "badge status-" + run.status }, run.status));
      if (run.stale) {
        chip.append(" ", el("span", { class: "badge stale",
          title: `no record for over ${fmt(run.stale_after)} s and no run_end: the run may ` +
            "hang or have died" }, "stale"));
      }
      const latest = run.latest || {};
      chip.append(el("span", { class: "latest" },
        ` step ${run.last_step ?? "–"} · loss ${fmt(latest.loss) || "–"} · ` +
        `grad norm ${fmt(latest.grad_norm) || "–"}`));
      chip.append(el("span", { class: "age" }, ` · last record ${fmtAge(run.last_record_age)}`));
      chip.append(el("span", { class: "muted" },
        ` · ${run.num_layers} layers · ${run.events} events`));
      if (run.skipped_lines > 0) {
        const reasons = Object.entries(run.skipped_reasons).map(([r, n]) => `${n}× ${r}`);
        chip.append(el("span", { class: "warn", title: reasons.join("\n") },
          ` ⚠ ${run.skipped_lines} malformed line(s) skipped`));
      }
      box.append(chip);
    });
    const when = new Date(status.time * 1000);
    document.getElementById("updated").textContent =
      exported ? `exported ${when.toLocaleString()}` : `live · updated ${when.toLocaleTimeString()}`;
  }

  // ---- the shared step axis ----
  function dataExtent(data) {
    let lo = Infinity, hi = -Infinity;
    const take = (xs) => { if (xs.length) { lo = Math.min(lo, xs[0]); hi = Math.max(hi, xs[xs.length - 1]); } };
    data.runs.forEach((run) => {
      Object.values(run.scalars).forEach((s) => take(s.x));
      Object.values(run.heatmaps).forEach((h) => take(h.x));
    });
    if (!(lo <= hi)) return null;
    return lo === hi ? [lo - 0.5, hi + 0.5] : [lo, hi];
  }

  function stepRange(data) {
    if (state.start !== null && state.end !== null) return [state.start, state.end];
    return dataExtent(data);
  }

  function xaxis(range) {
    // The axis' own uirevision follows the range, so that plotly applies the range we set
    // rather than keeping a zoom the user made before it.
    return range ? { title: { text: "step" }, range: range.slice(), autorange: false,
      uirevision: range.join(":") } : { title: { text: "step" } };
  }

  // ---- where an event's marker goes ----
  function eventHeatmap(e) {
    if (!Number.isInteger(e.layer)) return null;
    return HEATMAP_METRICS.has(e.metric) ? e.metric : "max_abs_residual";
  }

  function eventLineChart(e) {
    if (eventHeatmap(e) !== null) return null;
    return LINE_EVENT_METRICS.has(e.metric) ? e.metric : "loss";
  }

  function eventText(e) {
    const kind = e.kind ? ` [${e.kind}]` : "";
    const details = fmtDetails(e.details);
    return `${e.detector}${kind} (${e.severity}) → ${e.action}<br>${e.message}` +
      (details ? `<br>${details}` : "");
  }

  // An episode event (start_step/end_step among its details) draws its extent as a bar
  // through the marker.
  function episodeBars(events, color) {
    const bound = (e, key) => (e.details && Number.isFinite(e.details[key]) ? e.details[key] : null);
    const spans = events.map((e) => [bound(e, "start_step") ?? e.step, bound(e, "end_step") ?? e.step]);
    if (!spans.some(([lo, hi]) => lo !== hi)) return undefined;
    return { type: "data", symmetric: false, width: 0, thickness: 3, color,
      array: events.map((e, k) => Math.max(0, spans[k][1] - e.step)),
      arrayminus: events.map((e, k) => Math.max(0, e.step - spans[k][0])) };
  }

  function markerTrace(run, i, events, x, y) {
    return {
      type: "scatter", mode: "markers", name: `${run.name} events`, legendgroup: run.name,
      x, y, text: events.map(eventText),
      hovertemplate: "step %{x}<br>%{text}<extra>" + run.name + "</extra>",
      marker: { size: 11, line: { width: 2, color: runColor(i) },
        color: events.map((e) => SEVERITY_COLORS[e.severity] || "#444"),
        symbol: events.map((e) => ACTION_SYMBOLS[e.action] || "circle") },
      error_x: episodeBars(events, runColor(i)),
      showlegend: false,
    };
  }

  // ---- line charts: runs overlaid, whole-model events as markers ----
  function lineEventTrace(run, i, metric) {
    const events = run.events.filter((e) => eventLineChart(e) === metric && e.at &&
      e.at[metric] !== null && e.at[metric] !== undefined);
    return markerTrace(run, i, events, events.map((e) => e.step), events.map((e) => e.at[metric]));
  }

  function renderLines(data, range) {
    LINE_CHARTS.forEach((chart) => {
      const traces = [];
      data.runs.forEach((run, i) => {
        const series = run.scalars[chart.metric];
        if (!series) return;
        traces.push({ type: "scatter", mode: "lines", name: run.name, legendgroup: run.name,
          x: series.x, y: series.y, line: { color: runColor(i), width: 1.4 },
          hovertemplate: "step %{x}<br>%{y:.4g}<extra>" + run.name + "</extra>" });
        if (chart.metric !== "learning_rate") traces.push(lineEventTrace(run, i, chart.metric));
      });
      const layout = {
        title: { text: chart.title, font: { size: 14 }, x: 0.02 },
        margin: MARGIN, uirevision: "keep", xaxis: xaxis(range),
        yaxis: chart.log ? { type: "log", dtick: 1, exponentformat: "power" } : { type: "linear" },
        legend: { orientation: "h", y: 1.14, x: 0.3, xanchor: "left" },
        paper_bgcolor: "#fff", plot_bgcolor: "#fff",
      };
      Plotly.react("chart-" + chart.metric, traces, layout, PLOT_CONFIG);
    });
  }

  // ---- per-layer heatmaps, full width, one block per run ----
  function heatmapDiv(runIndex, metric) {
    const id = `heat-${runIndex}-${metric}`;
    let div = document.getElementById(id);
    if (!div) {
      let row = document.getElementById(`heatrow-${runIndex}`);
      if (!row) {
        row = el("div", { id: `heatrow-${runIndex}`, class: "heatrow" });
        document.getElementById("heatmaps").append(row);
      }
      div = el("div", { id, class: "chart heatmap" });
      row.append(div);
    }
    return div;
  }

  function log10Grid(z) { return z.map((row) => row.map((v) => (v > 0 ? Math.log10(v) : null))); }

  function sharedLogRange(data, metric) {
    let lo = Infinity, hi = -Infinity;
    data.runs.forEach((run) => {
      const map = run.heatmaps[metric];
      if (!map) return;
      map.z.forEach((row) => row.forEach((v) => {
        if (v > 0) { const l = Math.log10(v); if (l < lo) lo = l; if (l > hi) hi = l; }
      }));
    });
    if (!(lo <= hi)) return [undefined, undefined];
    return lo === hi ? [lo - 0.5, hi + 0.5] : [lo, hi];
  }

  // Colour-bar ticks of a log10 scale, labelled with the real values (10, 200, 5k, ...):
  // decades when the range spans several, 1-2-5 steps (or every digit) when it is narrow.
  function realValueTicks([lo, hi]) {
    if (lo === undefined) return {};
    const candidates = (mantissas) => {
      const out = [];
      for (let k = Math.floor(lo); k <= Math.ceil(hi); k++) {
        mantissas.forEach((m) => { const t = k + Math.log10(m); if (t >= lo && t <= hi) out.push(t); });
      }
      return out;
    };
    let tickvals = candidates([1]);
    if (tickvals.length < 3) tickvals = candidates([1, 2, 5]);
    if (tickvals.length < 3) tickvals = candidates([1, 2, 3, 4, 5, 6, 7, 8, 9]);
    if (tickvals.length > 8) tickvals = tickvals.filter((_, i) => i % Math.ceil(tickvals.length / 8) === 0);
    return { tickvals, ticktext: tickvals.map((t) => realValue(Math.pow(10, t))) };
  }

  function realValue(v) {
    const units = [[1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]];
    const unit = units.find(([scale]) => v >= scale);
    if (unit && v < 1e15) return Number((v / unit[0]).toPrecision(2)) + unit[1];
    return Number(v.toPrecision(2)).toString();
  }

  function heatmapLabel(runIndex, name) {
    let label = document.getElementById(`heatlabel-${runIndex}`);
    if (!label) {
      label = el("h3", { id: `heatlabel-${runIndex}`, class: "heatlabel" });
      const row = document.getElementById(`heatrow-${runIndex}`);
      document.getElementById("heatmaps").insertBefore(label, row);
    }
    label.textContent = name;
    label.style.color = runColor(runIndex);
  }

  // Whole layer numbers on the y axis: every layer when there are few, else plotly's choice.
  function layerTick(map) { return map && map.z.length <= 16 ? 1 : undefined; }

  function heatmapTrace(h, map, logRange) {
    const layers = map.z.map((_, l) => l + 1);
    const [zmin, zmax] = h.log ? logRange : [h.zmin, h.zmax];
    return { type: "heatmap", x: map.x, y: layers, z: h.log ? log10Grid(map.z) : map.z,
      customdata: map.z, colorscale: h.colorscale, reversescale: !!h.reversescale, zmin, zmax,
      colorbar: { thickness: 10, x: 1.01, xanchor: "left", xpad: 4,
        ...(h.log ? realValueTicks(logRange) : {}) },
      hovertemplate: "step ≥ %{x}<br>layer %{y}<br>max %{customdata:.4g}<extra></extra>" };
  }

  function renderHeatmaps(data, range) {
    const logRange = sharedLogRange(data, "max_abs_residual");
    data.runs.forEach((run, i) => {
      HEATMAPS.forEach((h) => {
        const div = heatmapDiv(i, h.metric);
        const map = run.heatmaps[h.metric];
        const layout = { title: { text: h.title, font: { size: 13 }, x: 0.02 }, margin: MARGIN,
          uirevision: "keep", xaxis: xaxis(range),
          yaxis: { title: { text: "layer" }, dtick: layerTick(map) },
          paper_bgcolor: "#fff" };
        if (!map) {
          layout.annotations = [{ text: "not logged for this run", showarrow: false,
            xref: "paper", yref: "paper", x: 0.5, y: 0.5 }];
          layout.yaxis.visible = false;
          Plotly.react(div, [], layout, PLOT_CONFIG);
          return;
        }
        const events = run.events.filter((e) => eventHeatmap(e) === h.metric);
        const markers = markerTrace(run, i, events, events.map((e) => e.step),
          events.map((e) => e.layer));
        markers.name = `${run.name} layer events`;
        // Filled symbols with a white rim: open ones vanish on a saturated heatmap cell.
        markers.marker.symbol = markers.marker.symbol.map((sym) => sym.replace("-open", ""));
        markers.marker.line = { width: 1.5, color: "#fff" };
        markers.marker.size = 13;
        Plotly.react(div, [heatmapTrace(h, map, logRange), markers], layout, PLOT_CONFIG);
      });
      heatmapLabel(i, run.name);
    });
  }

  // ---- events table: one row per episode, in words; filters; click a row to zoom ----
  const SEVERITY_ORDER = { critical: 0, warning: 1, info: 2 };
  const KIND_WORDS = { spike: "spike", bump: "bump (several steps)",
    level_shift: "level shift (benign)", divergence: "divergence", non_finite: "NaN/Inf",
    threshold: "over its limit" };
  const ACTION_WORDS = { log: "logged only", alert: "alerted", skip_step: "skipped the update",
    lr_backoff: "lowered the learning rate", rollback: "rolled back to the last checkpoint",
    abort: "stopped the run" };
  const TABLE_COLUMNS = 9;

  function episodeRows(data) {
    const rows = [];
    data.runs.forEach((run) => (run.episodes || []).forEach((e) => rows.push([run.name, e])));
    rows.sort((a, b) => (SEVERITY_ORDER[a[1].severity] ?? 3) - (SEVERITY_ORDER[b[1].severity] ?? 3) ||
      b[1].start_step - a[1].start_step);
    return rows;
  }

  function fillFilter(id, values) {
    const select = document.getElementById(id);
    const key = select.dataset.filter;
    const current = state.filters[key];
    const options = [el("option", { value: "" }, `all ${key === "severity" ? "severities" : key + "s"}`)];
    [...new Set(values)].sort().forEach((v) => options.push(el("option", { value: v }, v)));
    select.replaceChildren(...options);
    select.value = [...select.options].some((o) => o.value === current) ? current : "";
    state.filters[key] = select.value;
  }

  function renderEvents(data) {
    const rows = episodeRows(data);
    fillFilter("filter-run", rows.map(([name]) => name));
    fillFilter("filter-severity", rows.map(([, e]) => String(e.severity)));
    fillFilter("filter-detector", rows.map(([, e]) => String(e.detector)));
    const f = state.filters;
    const shown = rows.filter(([name, e]) => (!f.run || name === f.run) &&
      (!f.severity || String(e.severity) === f.severity) &&
      (!f.detector || String(e.detector) === f.detector));
    const total = data.runs.reduce((n, run) => n + run.events_in_range, 0);
    document.getElementById("events-count").textContent =
      `${rows.length} episodes (${total} records) in view` +
      (shown.length !== rows.length ? `, ${shown.length} match the filters` : "") +
      (shown.length > MAX_TABLE_ROWS ? `, ${MAX_TABLE_ROWS} shown` : "");
    const body = document.querySelector("#events tbody");
    body.replaceChildren(...shown.slice(0, MAX_TABLE_ROWS).map(([name, e]) => episodeRow(name, e)));
  }

  function episodeWhat(e) {
    const kind = KIND_WORDS[e.kind] || (e.kind ? String(e.kind) : "event");
    const where = Number.isInteger(e.layer) ? ` in layer ${e.layer}` : "";
    return `${e.metric} ${kind}${where}`;
  }

  function episodeStarted(e) {
    const seen = e.detected_step !== e.start_step ? `, seen at ${e.detected_step}` : "";
    return `step ${e.start_step}${seen}`;
  }

  function episodeLasted(e) {
    const steps = `${e.duration} step${e.duration === 1 ? "" : "s"}`;
    return e.finished ? steps : `ongoing (${steps} so far)`;
  }

  function peakVsThreshold(e) {
    if (e.peak === null || e.peak === undefined) return e.kind === "non_finite" ? "NaN/Inf" : "";
    if (e.threshold === null || e.threshold === undefined) return fmt(e.peak);
    const ratio = e.threshold > 0 ? ` (${Number((e.peak / e.threshold).toPrecision(2))}×)` : "";
    return `${fmt(e.peak)} vs ${fmt(e.threshold)}${ratio}`;
  }

  function episodeRow(name, e) {
    const tr = el("tr", { class: "episode", "data-step": e.detected_step,
      title: `${e.message}\nclick: zoom every chart to this step` });
    const severity = el("td");
    severity.append(el("span", { class: "badge sev-" + e.severity }, e.severity));
    tr.append(severity);
    const cell = (v, cls) => tr.append(el("td", cls ? { class: cls } : {}, v));
    cell(name);
    const what = el("td", { class: "what" }, episodeWhat(e));
    what.append(el("span", { class: "muted" }, ` · ${e.detector}`));
    tr.append(what);
    cell(episodeStarted(e), "num");
    cell(episodeLasted(e), "num");
    cell(peakVsThreshold(e), "num");
    cell(e.actions.map((a) => ACTION_WORDS[a] || a).join(", then "));
    cell(e.signals.join(", "));
    const rawCell = el("td");
    const button = el("button", { class: "raw-toggle", type: "button",
      title: "the monitor's records of this episode, as written" }, `record${e.records.length > 1 ? "s" : ""}`);
    button.addEventListener("click", (event) => { event.stopPropagation(); toggleRaw(tr, e); });
    rawCell.append(button);
    tr.append(rawCell);
    tr.addEventListener("click", () => zoomTo(e.detected_step));
    return tr;
  }

  function toggleRaw(tr, e) {
    const next = tr.nextElementSibling;
    if (next && next.classList.contains("raw")) { next.remove(); return; }
    const row = el("tr", { class: "raw" });
    const td = el("td", { colspan: TABLE_COLUMNS });
    td.append(el("pre", {}, e.records.join("\n")));
    row.append(td);
    tr.after(row);
  }

  function render(data) {
    state.data = data;
    const range = stepRange(data);
    renderRuns(data.status);
    renderLines(data, range);
    renderHeatmaps(data, range);
    renderEvents(data);
    window.dashboardRenders += 1;
  }

  // ---- zoom: every chart follows, the server sends detail for the range ----
  function allCharts() { return Array.from(document.querySelectorAll(".chart")).filter((d) => d.data); }

  function applyRange(range, except) {
    state.syncing = true;
    const update = { "xaxis.range": range.slice(), "xaxis.autorange": false };
    return Promise.all(allCharts().filter((d) => d !== except).map((d) => Plotly.relayout(d, update)))
      .finally(() => { state.syncing = false; });
  }

  function setWindow(start, end, source) {
    state.start = start; state.end = end;
    const range = start === null ? (state.data && dataExtent(state.data)) : [start, end];
    const synced = range ? applyRange(range, start === null ? null : source) : Promise.resolve();
    if (!exported) synced.then(fetchView);
    return synced;
  }

  function zoomTo(step) {
    const extent = (state.data && dataExtent(state.data)) || [step - 10, step + 10];
    const current = stepRange(state.data) || extent;
    const half = Math.max(5, (current[1] - current[0]) / 10);
    return setWindow(step - half, step + half, null);
  }
  window.dashboardZoomTo = zoomTo; // for the browser tests

  function onRelayout(source, event) {
    if (state.syncing) return;
    if (event["xaxis.range[0]"] !== undefined) {
      setWindow(event["xaxis.range[0]"], event["xaxis.range[1]"], source);
    } else if (event["xaxis.range"]) {
      setWindow(event["xaxis.range"][0], event["xaxis.range"][1], source);
    } else if (event["xaxis.autorange"]) {
      setWindow(null, null, source); // double-click: the whole run, on every chart alike
    }
  }

  function attachZoom() {
    allCharts().forEach((div) => {
      if (div.dataset.zoomAttached) return;
      div.dataset.zoomAttached = "1";
      div.on("plotly_relayout", (event) => onRelayout(div, event));
    });
  }

  function attachFilters() {
    document.querySelectorAll("select[data-filter]").forEach((select) => {
      select.addEventListener("change", () => {
        state.filters[select.dataset.filter] = select.value;
        if (state.data) renderEvents(state.data);
      });
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
      const data = await getJson("api/view?" + params);
      state.versions = data.status.runs.map((r) => r.version).join(",");
      render(data);
      attachZoom();
      clearError();
    } catch (error) {
      showError(error.message);
    } finally {
      state.inFlight = false;
      if (state.pending) { state.pending = false; fetchView(); }
    }
  }

  async function poll() {
    try {
      const status = await getJson("api/status");
      const versions = status.runs.map((r) => r.version).join(",");
      if (versions !== state.versions) {
        fetchView();
      } else {
        renderRuns(status);
        clearError();
      }
    } catch (error) {
      showError(error.message);
    }
  }

  attachFilters();
  if (exported) {
    render(exported);
    attachZoom();
  } else {
    fetchView();
    setInterval(poll, POLL_MS);
  }
})();
