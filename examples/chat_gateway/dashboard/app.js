// The chat_gateway dashboard: polls /v1/dashboard/data with the admin key and draws SVG.
// Loaded as a same-origin file under a nonce CSP: no inline script, no inline style.
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const KEY = "palisade-dashboard-key";
  const POLL_MS = 5000;
  const COLORS = ["#3b6fd8", "#d6603b", "#1f9d55", "#9b51e0", "#d69e2e", "#0f9fb3",
                  "#c2185b", "#5d6778", "#6d8c1f", "#8d5524", "#2d3a8c", "#b83280"];
  const $ = (id) => document.getElementById(id);
  let timer = null;
  let violations = 0;

  document.addEventListener("securitypolicyviolation", (e) => {
    violations += 1;
    document.documentElement.dataset.cspViolations = String(violations);
    console.error("CSP violation: " + e.violatedDirective + " " + e.blockedURI);
  });

  function el(name, attrs, parent) {
    const node = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (parent) parent.appendChild(node);
    return node;
  }

  function text(parent, x, y, content, anchor) {
    const t = el("text", { x: x, y: y, "text-anchor": anchor || "start" }, parent);
    t.textContent = content;
    return t;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  function usd(micro) {
    const d = micro / 1e6;
    return d >= 100 ? "$" + d.toFixed(0) : d >= 1 ? "$" + d.toFixed(2) : "$" + d.toFixed(4);
  }

  function clock(ms) {
    const d = new Date(ms);
    return String(d.getHours()).padStart(2, "0") + ":" + String(d.getMinutes()).padStart(2, "0");
  }

  // A line chart of cumulative spend, one line per user and model.
  function drawSpend(data) {
    const svg = $("spend-chart");
    const legend = $("spend-legend");
    clear(svg);
    clear(legend);
    const W = 900, H = 300, L = 64, R = 12, T = 12, B = 28;
    const series = data.spend;
    const n = series.length ? series[0].points_microusd.length : 60;
    let max = 0;
    for (const s of series) for (const p of s.points_microusd) max = Math.max(max, p);
    max = max > 0 ? max * 1.1 : 1000;
    const x = (i) => L + (i * (W - L - R)) / Math.max(1, n - 1);
    const y = (v) => H - B - (v * (H - T - B)) / max;
    for (let k = 0; k <= 4; k++) {
      const v = (max * k) / 4;
      el("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), stroke: "#dde1e7" }, svg);
      text(svg, L - 6, y(v) + 4, usd(v), "end");
    }
    const w = data.window;
    for (let k = 0; k <= 4; k++) {
      const t = w.from_ms + ((w.to_ms - w.from_ms) * k) / 4;
      text(svg, L + ((W - L - R) * k) / 4, H - 8, clock(t), k === 0 ? "start" : k === 4 ? "end" : "middle");
    }
    if (!series.length) {
      text(svg, (W + L) / 2, H / 2, "no metered requests in this window yet", "middle");
    }
    series.forEach((s, i) => {
      const color = COLORS[i % COLORS.length];
      const d = s.points_microusd.map((p, j) => (j ? "L" : "M") + x(j).toFixed(1) + " " + y(p).toFixed(1)).join(" ");
      el("path", { d: d, fill: "none", stroke: color, "stroke-width": 2 }, svg);
      const li = document.createElement("li");
      const swatch = el("svg", { width: 12, height: 12, viewBox: "0 0 12 12" }, li);
      el("rect", { width: 12, height: 12, rx: 2, fill: color }, swatch);
      li.appendChild(document.createTextNode(s.user + " · " + s.model + " · $" + s.cost_usd));
      legend.appendChild(li);
    });
  }

  // Horizontal bars, one per refusal reason.
  function drawRefusals(data) {
    const svg = $("refusal-chart");
    clear(svg);
    const rows = data.refusals.by_reason;
    const W = 440, L = 160, R = 40, rowH = 22, T = 6;
    const max = Math.max(1, ...rows.map((r) => r[1]));
    rows.forEach(([reason, count], i) => {
      const yy = T + i * rowH;
      text(svg, L - 8, yy + 14, reason.replace(/_/g, " "), "end");
      el("rect", { x: L, y: yy + 3, height: rowH - 8, width: Math.max(count ? 2 : 0, ((W - L - R) * count) / max), rx: 2,
                   fill: reason === "budget_exceeded" || reason === "rate_limited" ? "#d69e2e" : "#d64545" }, svg);
      text(svg, L + ((W - L - R) * count) / max + 6, yy + 14, String(count));
    });
  }

  // Columns, one per minute of the last hour.
  function drawRate(data) {
    const svg = $("refusal-rate");
    clear(svg);
    const pts = data.refusals.per_minute;
    const W = 440, H = 260, L = 36, R = 8, T = 10, B = 24;
    const max = Math.max(1, ...pts.map((p) => p[1]));
    const bw = (W - L - R) / Math.max(1, pts.length);
    for (let k = 0; k <= 2; k++) {
      const v = Math.round((max * k) / 2);
      const yy = H - B - (v * (H - T - B)) / max;
      el("line", { x1: L, x2: W - R, y1: yy, y2: yy, stroke: "#dde1e7" }, svg);
      text(svg, L - 4, yy + 4, String(v), "end");
    }
    pts.forEach(([t, count], i) => {
      const h = (count * (H - T - B)) / max;
      el("rect", { x: L + i * bw + 1, y: H - B - h, width: Math.max(1, bw - 2), height: h, fill: "#d64545" }, svg);
    });
    if (pts.length) {
      text(svg, L, H - 6, clock(pts[0][0]));
      text(svg, W - R, H - 6, clock(pts[pts.length - 1][0]), "end");
    }
  }

  function drawBreakers(data) {
    const ul = $("breakers");
    clear(ul);
    if (!data.breakers.length) {
      const li = document.createElement("li");
      li.textContent = "no breakers (layers off)";
      ul.appendChild(li);
    }
    for (const b of data.breakers) {
      const li = document.createElement("li");
      const name = document.createElement("span");
      name.textContent = b.upstream;
      const badge = document.createElement("span");
      badge.className = "badge " + b.state.toLowerCase().replace(/[^a-z]/g, "");
      badge.textContent = b.state;
      li.append(name, badge);
      ul.appendChild(li);
    }
  }

  function drawTable(data) {
    const body = $("spend-table");
    clear(body);
    for (const s of data.spend) {
      const tr = document.createElement("tr");
      for (const v of [s.user, s.model, s.requests, s.input_tokens, s.output_tokens, s.cost_usd]) {
        const td = document.createElement("td");
        td.textContent = String(v);
        tr.appendChild(td);
      }
      body.appendChild(tr);
    }
  }

  function render(data) {
    $("total-cost").textContent = "$" + data.totals.cost_usd;
    const minutes = Math.round((data.window.to_ms - data.window.from_ms) / 60000);
    $("window-label").textContent = "last " + minutes + " minutes";
    $("total-requests").textContent = String(data.totals.requests);
    $("total-fallbacks").textContent = data.totals.fallbacks + " served by a fallback";
    $("total-refusals").textContent = String(data.refusals.by_reason.reduce((a, r) => a + r[1], 0));
    drawBreakers(data);
    drawSpend(data);
    drawRefusals(data);
    drawRate(data);
    drawTable(data);
  }

  function setStatus(textContent, cls) {
    const s = $("status");
    s.textContent = textContent;
    s.className = "status " + (cls || "");
  }

  function askForKey(message) {
    if (timer) clearTimeout(timer);
    timer = null;
    $("board").hidden = true;
    $("key-form").hidden = false;
    $("key-error").textContent = message || "";
    setStatus("needs an admin key");
  }

  async function poll() {
    const key = sessionStorage.getItem(KEY);
    if (!key) return askForKey("");
    try {
      const res = await fetch("/v1/dashboard/data", { headers: { "x-api-key": key }, cache: "no-store" });
      if (res.status === 401 || res.status === 403) {
        sessionStorage.removeItem(KEY);
        const body = await res.json().catch(() => null);
        return askForKey(body && body.error ? body.error.message : "that key was refused");
      }
      if (!res.ok) throw new Error("HTTP " + res.status);
      const data = await res.json();
      $("key-form").hidden = true;
      $("board").hidden = false;
      render(data);
      setStatus("live · updated " + new Date(data.now_ms).toLocaleTimeString(), "live");
      document.documentElement.dataset.state = "live";
    } catch (e) {
      setStatus("cannot reach the gateway (" + e.message + "); retrying", "down");
    }
    timer = setTimeout(poll, POLL_MS);
  }

  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("key-input").value.trim();
    $("key-input").value = "";
    if (key) {
      sessionStorage.setItem(KEY, key);
      poll();
    }
  });

  // `/#key=<admin key>`: taken once, then dropped from the address bar and history.
  const m = /^#key=(.+)$/.exec(location.hash);
  if (m) {
    sessionStorage.setItem(KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
  poll();
})();
