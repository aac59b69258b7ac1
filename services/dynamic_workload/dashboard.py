"""The live dashboard served at ``/``: one self-contained page, no external assets.

The page polls ``/status`` every second and ``/pullCompleted`` every few seconds, keeps the
last ten minutes in the browser, and draws its charts as inline SVG: jobs queued and
running, workers live and booting, completions per second, and job duration percentiles
(over the last 200 jobs). Below them, the scaler's latest decisions with their reasons and
the latest results. It works offline: nothing is loaded from anywhere else.
"""

PAGE = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>dynamic-workload</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:14px system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
 h1{font-size:1.3em;margin:0 0 .3em} .muted{color:#777}
 .cards{display:flex;gap:1em;flex-wrap:wrap;margin:1em 0}
 .card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.6em 1em;min-width:7em}
 .card b{display:block;font-size:1.6em}
 .charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(340px,1fr));gap:1em}
 figure{background:#fff;border:1px solid #ddd;border-radius:6px;margin:0;padding:.5em}
 figcaption{font-weight:600;margin-bottom:.3em} svg{width:100%;height:160px}
 table{border-collapse:collapse;background:#fff;width:100%;margin-top:1em}
 td,th{border-bottom:1px solid #eee;padding:.3em .5em;text-align:left;font-family:ui-monospace,monospace;font-size:12px}
 .legend span{margin-right:1em} .err{color:#b00}
</style></head><body>
<h1>dynamic-workload</h1>
<div class="muted" id="state">connecting&hellip;</div>
<div class="cards" id="cards"></div>
<div class="charts">
 <figure><figcaption>Jobs</figcaption><svg id="jobs"></svg><div class="legend" id="jobs-legend"></div></figure>
 <figure><figcaption>Workers</figcaption><svg id="workers"></svg><div class="legend" id="workers-legend"></div></figure>
 <figure><figcaption>Completions per second</figcaption><svg id="rate"></svg><div class="legend" id="rate-legend"></div></figure>
 <figure><figcaption>Job duration, seconds (last 200 jobs)</figcaption><svg id="duration"></svg><div class="legend" id="duration-legend"></div></figure>
</div>
<h2>Scaler decisions</h2><table id="decisions"><tr><th>time</th><th>decision</th></tr></table>
<h2>Latest completed jobs</h2><table id="latest"><tr><th>id</th><th>result</th></tr></table>
<script>
"use strict";
const history = [];  // {t, queued, running, live, booting, completed, p50, p95, p99}
const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"];

function draw(id, series) {
  const svg = document.getElementById(id), w = 600, h = 160, pad = 24;
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  // The window grows with the history, from one minute up to ten.
  const now = Date.now() / 1000;
  const span = Math.min(600, Math.max(60, history.length ? now - history[0].t : 0));
  let top = 1;
  for (const s of series) for (const p of history) top = Math.max(top, s.value(p) || 0);
  const x = t => pad + (w - pad - 4) * (1 - (now - t) / span), y = v => h - pad - (h - 2 * pad) * v / top;
  let out = `<line x1="${pad}" y1="${h - pad}" x2="${w}" y2="${h - pad}" stroke="#ccc"/>` +
            `<text x="2" y="${pad}" font-size="11" fill="#777">${Math.round(top * 100) / 100}</text>` +
            `<text x="${pad}" y="${h - 6}" font-size="11" fill="#777">-${span < 120 ? Math.round(span) + " s" : Math.round(span / 60) + " min"}</text>` +
            `<text x="${w - 24}" y="${h - 6}" font-size="11" fill="#777">now</text>`;
  series.forEach((s, i) => {
    const pts = history.filter(p => s.value(p) !== undefined).map(p => `${x(p.t).toFixed(1)},${y(s.value(p)).toFixed(1)}`);
    if (pts.length) out += `<polyline fill="none" stroke="${COLORS[i]}" stroke-width="2" stroke-linejoin="round" points="${pts.join(" ")}"/>`;
  });
  svg.innerHTML = out;
  document.getElementById(id + "-legend").innerHTML = series.map((s, i) => {
    const last = history.length ? s.value(history[history.length - 1]) : undefined;
    return `<span style="color:${COLORS[i]}">&#9632; ${s.name}: ${last === undefined ? "-" : Math.round(last * 100) / 100}</span>`;
  }).join("");
}

function rate(p) {
  const i = history.indexOf(p);
  if (i < 1) return undefined;
  const q = history[i - 1];
  return Math.max(0, (p.completed - q.completed) / Math.max(0.001, p.t - q.t));
}

async function poll() {
  try {
    const r = await fetch("status", {cache: "no-store", signal: AbortSignal.timeout(4000)});
    const s = await r.json();
    if (!r.ok) throw new Error(s.error || r.status);
    const t = Date.now() / 1000;
    const d = s.job_seconds || {};
    history.push({t, queued: s.queued, running: s.running, live: s.workers_live, booting: s.workers_booting,
                  completed: s.completed, p50: d.p50, p95: d.p95, p99: d.p99});
    while (history.length && history[0].t < t - 600) history.shift();
    document.getElementById("state").textContent = `updated ${new Date().toLocaleTimeString()} - fleet ${s.fleet}, workers ${s.min_workers} to ${s.max_workers}` + (s.fleet_error ? " - " + s.fleet_error : "");
    document.getElementById("cards").innerHTML = ["queued", "running", "completed", "failed", "workers"].map(k => `<div class="card">${k}<b id="card-${k}">${s[k]}</b></div>`).join("");
    draw("jobs", [{name: "queued", value: p => p.queued}, {name: "running", value: p => p.running}]);
    draw("workers", [{name: "live", value: p => p.live}, {name: "booting", value: p => p.booting}]);
    draw("rate", [{name: "completed/s", value: rate}]);
    draw("duration", [{name: "p50", value: p => p.p50}, {name: "p95", value: p => p.p95}, {name: "p99", value: p => p.p99}]);
    document.getElementById("decisions").innerHTML = "<tr><th>time</th><th>decision</th></tr>" +
      s.decisions.slice().reverse().map(d => `<tr><td>${new Date(d.time * 1000).toLocaleTimeString()}</td><td>${d.reason}</td></tr>`).join("");
  } catch (e) {
    document.getElementById("state").innerHTML = `<span class="err">cluster unreachable: ${e.message}</span>`;
  }
}

async function latest() {
  try {
    const r = await fetch("pullCompleted?top=10", {method: "POST", cache: "no-store", signal: AbortSignal.timeout(4000)});
    const jobs = await r.json();
    document.getElementById("latest").innerHTML = "<tr><th>id</th><th>result</th></tr>" +
      jobs.map(j => `<tr><td>${j.id}</td><td>${j.result.slice(0, 32)}&hellip;</td></tr>`).join("");
  } catch (e) { /* the status line already says the cluster is unreachable */ }
}

poll(); latest();
setInterval(poll, 1000); setInterval(latest, 3000);
</script></body></html>
"""
