"""report.html: the sweep in one self-contained page that opens offline (plotly.js embedded, every image
a data URI): the frontier for every objective pair (hover: config and metrics; click: select the trial),
the selected trial's learning curves, prediction images and reliability diagram, and a sortable table of
every trial, failed ones with their reason; with seed replicates, CI error bars and not-separable flags.
Rendered from a computed `Frontier` plus the sweep folder's history.parquet and checkpoint folders."""
from __future__ import annotations

import base64
import datetime as dt
import html
import itertools
import json
import math
import re
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from detsweep.frontier.front import Frontier, headline_index
from detsweep.frontier.pareto import column_list, config_label, extra_columns
from detsweep.results import CONFIG_COLUMNS
from detsweep.storage import HISTORY_FILE, filesystem, join, read_parquet, write_bytes_atomic

MAX_IMAGES = 4  # prediction images embedded per trial (the worker draws the first 8 val images)
MAX_TRIALS_WITH_IMAGES = 50  # the best-ranked ones: ~0.1 MB per image keeps a big sweep's page openable
METRICS = ("ap", "ap50", "ap75", "ar100", "ece", "nll", "brier", "trainable_params", "total_params",
           "peak_vram_train_mb", "peak_rss_mb", "train_images_per_s", "eval_images_per_s", "wall_s", "gpu_hours",
           "cost_usd")
# The learning curves drawn per trial: history columns by name (DETR's per-decoder-layer `loss_ce_0` left out).
CURVES = {"losses": re.compile(r"loss(_[a-z]+)*"), "AP": re.compile(r"ap(50|75)?"), "learning rate": re.compile(r"lr")}


def _plain(value: Any) -> Any:
    """JSON-safe: NaN and inf become null (JSON.parse refuses them), timestamps ISO text."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    return value


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _read_bytes(fs: pafs.FileSystem, path: str) -> bytes | None:
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except (OSError, FileNotFoundError):
        return None


def _data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def trial_images(checkpoint: str | None) -> dict[str, Any]:
    """The PNGs the worker drew into a trial's last checkpoint folder, as data URIs: `predictions`
    (up to MAX_IMAGES) and `reliability` (or None). Empty when the folder is gone or has none."""
    if not checkpoint:
        return {"predictions": [], "reliability": None}
    fs, path = filesystem(checkpoint)
    infos = fs.get_file_info(pafs.FileSelector(f"{path}/predictions", allow_not_found=True))
    names = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".png"))
    predictions = [d for d in (_read_bytes(fs, p) for p in names[:MAX_IMAGES]) if d]
    reliability = _read_bytes(fs, f"{path}/reliability.png")
    return {"predictions": [_data_uri(d) for d in predictions], "reliability": reliability and _data_uri(reliability)}


def history_curves(history: pa.Table | None) -> dict[str, dict[str, list]]:
    """{trial_id: {"epoch": [...], metric: [...]}} for the metrics of CURVES, per epoch in order."""
    if history is None or "trial_id" not in history.column_names:
        return {}
    keep = [c for c in history.column_names if any(p.fullmatch(c) for p in CURVES.values())]
    out: dict[str, dict[str, list]] = {}
    for row in sorted(history.select(["trial_id", "epoch", *keep]).to_pylist(), key=lambda r: (r["epoch"] or 0)):
        series = out.setdefault(row["trial_id"], {"epoch": []})
        series["epoch"].append(row["epoch"])
        for c in keep:
            series.setdefault(c, []).append(row[c])
    return {tid: {k: v for k, v in s.items() if any(x is not None for x in v)} for tid, s in out.items()}


def _hover(row: dict[str, Any], config: list[str], metrics: list[str]) -> str:
    lines = [f"<b>{html.escape(str(row['trial_id']))}</b> ({row.get('status')}, rank {_fmt(row.get('pareto_rank'))})"]
    lines += [f"{c}: {html.escape(_fmt(row.get(c)))}" for c in config if row.get(c) is not None]
    lines += [f"<b>{c}</b>: {_fmt(row.get(c))}" for c in metrics if row.get(c) is not None]
    return "<br>".join(lines)


def _replicates(fr: Frontier) -> list[dict[str, Any]] | None:
    if fr.replicates is None:
        return None
    from detsweep.frontier.plots import ci_error_bars

    rows = fr.replicates.to_pylist()
    labels = {r["config_id"]: config_label(r["trial_ids"]) for r in rows}  # as the PNGs label them
    cols = [o.column for o in fr.objectives]
    stat = {s: np.array([[r[f"{c}_{s}"] if r[f"{c}_{s}"] is not None else np.nan for c in cols] for r in rows], float)
            for s in ("mean", "ci_low", "ci_high")}
    below, above = ci_error_bars(stat["mean"], stat["ci_low"], stat["ci_high"], fr.norms)
    return [{"config_id": r["config_id"], "label": labels[r["config_id"]], "trial_ids": r["trial_ids"], "n": r["n"],
             "pareto_rank": r["pareto_rank"], "not_separable": r["not_separable"],
             "not_separable_from": [labels[c] for c in r["not_separable_from"]],
             "mean": dict(zip(cols, stat["mean"][i].tolist())), "below": dict(zip(cols, below[i].tolist())),
             "above": dict(zip(cols, above[i].tolist()))} for i, r in enumerate(rows)]


def report_data(fr: Frontier, history: pa.Table | None, images: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Everything the page shows, as plain JSON values."""
    table = fr.table
    config = [c.name for c in CONFIG_COLUMNS if c.name in table.column_names] + extra_columns(table)
    objectives = [o.column for o in fr.objectives]
    metrics = list(dict.fromkeys(objectives + [m for m in METRICS if m in table.column_names]))
    reasons = {e["trial_id"]: e["reason"] for e in fr.excluded}
    trials = []
    for row in table.to_pylist():
        tid = str(row["trial_id"])
        reliability = row.get("reliability")
        trials.append({**{k: row.get(k) for k in ["trial_id", "status", "pareto_rank", *config, *metrics]},
                       "reason": reasons.get(tid), "hover": _hover(row, config, metrics),
                       "dominated_by": row.get("dominated_by"),
                       "reliability": json.loads(reliability) if reliability else None})
    y = headline_index(fr)
    # (y, x) per plot: the headline objective on y wherever it takes part
    pairs = [(j, i) if j == y else (i, j) for i, j in itertools.combinations(range(len(objectives)), 2)]
    valid = [t for t, ok in zip(trials, fr.valid) if ok]
    best = max(valid, key=lambda t: t[objectives[y]] * (1 if fr.objectives[y].maximise else -1), default=None)
    costs = [v for v in column_list(table, "cost_usd") if v is not None and v == v]
    cost = {"total": sum(costs), "mean": sum(costs) / len(costs), "n": len(costs)} if costs else None
    return _plain({"sweep": fr.sweep, "objectives": [{"column": o.column, "direction": o.direction} for o in fr.objectives],
                   "pairs": [[objectives[a], objectives[b]] for a, b in pairs], "config": config, "metrics": metrics,
                   "trials": trials, "replicates": _replicates(fr), "history": history_curves(history),
                   "images": images, "curves": {k: p.pattern for k, p in CURVES.items()}, "notes": fr.notes,
                   "cost": cost,
                   "selected": (best or trials[0])["trial_id"] if trials else None})


def render_html(data: dict[str, Any]) -> str:
    """The page: plotly.js inline, the data inline, the script that draws it. No external resource."""
    from plotly.offline import get_plotlyjs

    payload = json.dumps(data).replace("</", "<\\/")  # never closes the script element early
    title = html.escape(f"Sweep report: {data['sweep']}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\n"
            f"<link rel=\"icon\" href=\"data:,\">\n<style>{_CSS}</style>\n<script>{get_plotlyjs()}</script>\n"
            f"</head><body>\n<h1>{title}</h1>\n{_BODY}\n"
            f"<script type=\"application/json\" id=\"report-data\">{payload}</script>\n<script>{_JS}</script>\n"
            "</body></html>\n")


def write_html(fr: Frontier, sweep_dir: str, out: str) -> str:
    """Write `<out>/report.html` from `fr` and the sweep folder `sweep_dir` (history.parquet, and the
    checkpoint folders the results' `checkpoint_path` names); returns the file's path or URI."""
    try:
        history = read_parquet(join(sweep_dir, HISTORY_FILE))
    except (OSError, pa.ArrowInvalid):
        history = None
    rows = zip(column_list(fr.table, "pareto_rank"), column_list(fr.table, "trial_id"),
               column_list(fr.table, "checkpoint_path"))
    ranked = sorted((r for r in rows if r[2]), key=lambda r: (r[0] is None, r[0] or 0))[:MAX_TRIALS_WITH_IMAGES]
    images = {str(tid): trial_images(path) for _, tid, path in ranked}
    target = join(out, "report.html")
    write_bytes_atomic(render_html(report_data(fr, history, images)).encode(), target)
    return target


_BODY = """<p id="summary"></p>
<section><h2>Frontier</h2><p class="hint">Every pair of objectives; red: the Pareto front over all objectives.
Hover a point for its config and metrics, click it to select the trial.</p><div id="plots"></div></section>
<section id="detail"><h2 id="detail-title">Trial</h2><div class="cols"><div id="detail-config"></div><div>
<div class="row"><div id="curve-0" class="curve"></div><div id="curve-1" class="curve"></div>
<div id="curve-2" class="curve"></div></div>
<div class="row"><div id="reliability" class="curve"></div><div id="predictions"></div></div></div></div></section>
<section id="replicates-section" hidden><h2>Seed replicates</h2><p class="hint">Mean and 95 % CI over seeds;
the error bars in the plots. A front config is <i>not separable</i> when its CI overlaps a dominated
config's on every objective.</p><table id="replicates"></table></section>
<section><h2>All trials</h2><p class="hint">Click a header to sort, a row to select the trial.</p>
<div class="wide"><table id="trials"><thead></thead><tbody></tbody></table></div></section>"""

_CSS = """body{font:14px system-ui,sans-serif;margin:16px 24px;color:#222}h1{font-size:22px}h2{font-size:18px;
margin-top:24px}.hint{color:#666}#plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(440px,1fr));
gap:8px}.plot{height:340px}.row{display:flex;flex-wrap:wrap;gap:8px}.curve{width:340px;height:260px}
#predictions img{height:124px;margin:2px;border:1px solid #ccc}table{border-collapse:collapse;font-size:12px}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:left;white-space:nowrap}th{background:#f3f3f3;
cursor:pointer;position:sticky;top:0}tr.sel td{background:#ffe9a8}tr.failed td{color:#a00}td.reason{white-space:normal;
max-width:420px}#detail-config td{border:none;padding:1px 8px 1px 0}
.wide{overflow-x:auto;max-height:80vh}.cols{display:flex;gap:16px;align-items:flex-start}#detail-config{flex:0 0 300px;overflow:hidden}"""

_JS = r"""
const D = JSON.parse(document.getElementById('report-data').textContent);
const byId = Object.fromEntries(D.trials.map(t => [t.trial_id, t]));
const fmt = v => v === null || v === undefined ? '-' : (typeof v === 'number' && !Number.isInteger(v) ? v.toPrecision(4) : String(v));
const esc = s => String(s).replace(/[&<>"]/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'}[c]));
const CFG = {displaylogo: false, responsive: true}, SMALL = {...CFG, displayModeBar: false};
const plots = [];
const ok = D.trials.filter(t => D.objectives.every(o => t[o.column] !== null) && t.pareto_rank !== null);
document.getElementById('summary').textContent = `${D.trials.length} trials, ${ok.length} ranked; objectives: ` +
  D.objectives.map(o => `${o.column} (${o.direction})`).join(', ') + (D.notes.length ? '. ' + D.notes.join('. ') : '') +
  (D.cost ? `. Cost: $${D.cost.total.toFixed(4)} in total, $${D.cost.mean.toFixed(4)} per priced trial ` +
            `(${D.cost.n}; the workers' time at the sweep file's prices)` : '');

function drawPlots() {
  const box = document.getElementById('plots');
  D.pairs.forEach(([yc, xc], k) => {
    const div = document.createElement('div'); div.className = 'plot'; div.id = 'plot-' + k; box.appendChild(div);
    const pts = sel => ({x: sel.map(t => t[xc]), y: sel.map(t => t[yc]), customdata: sel.map(t => t.trial_id),
      text: sel.map(t => t.hover), hovertemplate: '%{text}<extra></extra>', mode: 'markers', type: 'scatter'});
    const traces = [
      {...pts(ok.filter(t => t.pareto_rank !== 1)), name: 'dominated', marker: {color: '#999', size: 8}},
      {...pts(ok.filter(t => t.pareto_rank === 1)), name: 'Pareto front', marker: {color: '#d62728', size: 10}}];
    if (D.replicates) {
      const r = D.replicates;
      traces.push({x: r.map(c => c.mean[xc]), y: r.map(c => c.mean[yc]), customdata: r.map(c => c.config_id),
        error_x: {type: 'data', symmetric: false, array: r.map(c => c.above[xc]), arrayminus: r.map(c => c.below[xc])},
        error_y: {type: 'data', symmetric: false, array: r.map(c => c.above[yc]), arrayminus: r.map(c => c.below[yc])},
        text: r.map(c => `<b>${esc(c.label)}</b> (seed mean, n=${c.n}, rank ${c.pareto_rank})` +
          (c.not_separable ? `<br>${esc(c.not_separable)} from ${c.not_separable_from.map(esc).join(', ')}` : '')),
        hovertemplate: '%{text}<extra></extra>', mode: 'markers', type: 'scatter', name: 'seed mean ± 95% CI',
        marker: {color: '#1f77b4', size: 11, symbol: r.map(c => c.not_separable ? 'diamond-open' : 'diamond')}});
    }
    traces.push({x: [], y: [], mode: 'markers', type: 'scatter', name: 'selected', hoverinfo: 'skip',
      marker: {size: 20, color: 'rgba(0,0,0,0)', line: {color: '#000', width: 2}}});
    const axis = c => ({title: {text: c + ' (' + D.objectives.find(o => o.column === c).direction + ')'},
      type: c.endsWith('_params') ? 'log' : 'linear'});
    Plotly.newPlot(div, traces, {title: {text: `${yc} vs ${xc}`, x: 0.01, xanchor: 'left'}, xaxis: axis(xc), yaxis: axis(yc),
      margin: {t: 40, r: 30, b: 50, l: 60}, legend: {orientation: 'h', y: -0.25}, hovermode: 'closest',
      modebar: {orientation: 'v'}}, CFG);
    div.on('plotly_click', ev => select(ev.points[0].customdata));
    plots.push({div, xc, yc, last: traces.length - 1});
  });
}

function curves(t) {
  const h = D.history[t.trial_id] || {epoch: []};
  for (const [i, [name, pattern]] of Object.entries(D.curves).entries()) {
    const re = new RegExp('^(' + pattern + ')$');
    const traces = Object.keys(h).filter(k => re.test(k)).map(k => ({x: h.epoch, y: h[k], name: k, mode: 'lines+markers'}));
    Plotly.react('curve-' + i, traces, {title: {text: name + ' per epoch', x: 0.01, xanchor: 'left'},
      xaxis: {title: {text: 'epoch'}, dtick: 1}, yaxis: {type: name === 'learning rate' ? 'log' : 'linear'},
      margin: {t: 40, r: 10, b: 45, l: 55}, annotations: traces.length ? [] : [{text: 'no history', showarrow: false}]}, SMALL);
  }
}

function reliability(t) {
  const r = t.reliability, img = (D.images[t.trial_id] || {}).reliability;
  const div = document.getElementById('reliability');
  if (!r && img) { Plotly.purge(div); div.innerHTML = `<img src="${img}" style="height:300px">`; return; }
  if (div.querySelector('img')) div.innerHTML = '';
  const mid = r ? r.bin_edges.slice(0, -1).map((e, i) => (e + r.bin_edges[i + 1]) / 2) : [];
  Plotly.react(div, r ? [{x: mid, y: r.accuracy, type: 'bar', name: 'accuracy', width: 0.09, customdata: r.count,
      hovertemplate: 'confidence %{x:.2f}: accuracy %{y:.3f}, %{customdata} detections<extra></extra>'},
    {x: [0, 1], y: [0, 1], mode: 'lines', name: 'perfect', line: {dash: 'dash', color: '#000'}}] : [],
    {title: {text: 'reliability', x: 0.01, xanchor: 'left'}, legend: {x: 0.02, y: 0.98}, xaxis: {title: {text: 'confidence'}, range: [0, 1]}, yaxis: {range: [0, 1]},
     margin: {t: 40, r: 10, b: 45, l: 55}, annotations: r ? [] : [{text: 'no reliability data', showarrow: false}]}, SMALL);
}

function select(id) {
  const t = byId[id]; if (!t) return;
  document.getElementById('detail-title').textContent = `Trial ${id} (${t.status}${t.pareto_rank ? ', rank ' + t.pareto_rank : ''})`;
  const rows = [...D.config, ...D.metrics].filter(k => t[k] !== null).map(k => `<tr><td>${esc(k)}</td><td>${esc(fmt(t[k]))}</td></tr>`);
  if (t.reason) rows.push(`<tr><td>reason</td><td>${esc(t.reason)}</td></tr>`);
  document.getElementById('detail-config').innerHTML = `<table>${rows.join('')}</table>`;
  curves(t); reliability(t);
  const imgs = (D.images[id] || {}).predictions || [];
  document.getElementById('predictions').innerHTML = imgs.length ? imgs.map(s => `<img src="${s}" alt="prediction">`).join('')
    : '<p class="hint">no prediction images in its checkpoint folder</p>';
  for (const p of plots) {
    const on = t[p.xc] !== null && t[p.yc] !== null && t.pareto_rank !== null;
    Plotly.restyle(p.div, {x: [on ? [t[p.xc]] : []], y: [on ? [t[p.yc]] : []]}, [p.last]);
  }
  document.querySelectorAll('#trials tr.sel').forEach(r => r.classList.remove('sel'));
  const row = document.querySelector(`#trials tr[data-trial="${CSS.escape(id)}"]`);
  if (row) row.classList.add('sel');
  document.body.dataset.selected = id;
}

function table() {
  const cols = ['trial_id', 'status', 'pareto_rank', ...D.config, ...D.metrics, 'reason'];
  const head = document.querySelector('#trials thead'), body = document.querySelector('#trials tbody');
  head.innerHTML = '<tr>' + cols.map(c => `<th data-col="${esc(c)}">${esc(c)}</th>`).join('') + '</tr>';
  body.innerHTML = D.trials.map(t => `<tr data-trial="${esc(t.trial_id)}" class="${t.status === 'ok' ? '' : 'failed'}">` +
    cols.map(c => `<td${c === 'reason' ? ' class="reason"' : ''}>${esc(fmt(t[c]))}</td>`).join('') + '</tr>').join('');
  body.querySelectorAll('tr').forEach(r => r.addEventListener('click', () => select(r.dataset.trial)));
  let last = null, dir = 1;
  head.querySelectorAll('th').forEach(th => th.addEventListener('click', () => {
    const c = th.dataset.col; dir = last === c ? -dir : 1; last = c;
    const key = r => byId[r.dataset.trial][c];
    [...body.rows].sort((a, b) => { const x = key(a), y = key(b);
      if (x === null || x === undefined) return 1; if (y === null || y === undefined) return -1;
      return (typeof x === 'number' ? x - y : String(x).localeCompare(String(y))) * dir; })
      .forEach(r => body.appendChild(r));
  }));
}

function replicates() {
  if (!D.replicates) return;
  document.getElementById('replicates-section').hidden = false;
  const obj = D.objectives.map(o => o.column);
  document.getElementById('replicates').innerHTML = '<tr><th>config</th><th>n</th><th>rank</th>' +
    obj.map(c => `<th>${esc(c)}</th>`).join('') + '<th>note</th></tr>' + D.replicates.map(c => `<tr><td>${esc(c.label)}</td>` +
    `<td>${c.n}</td><td>${c.pareto_rank}</td>` + obj.map(o => `<td>${fmt(c.mean[o])} (-${fmt(c.below[o])} +${fmt(c.above[o])})</td>`).join('') +
    `<td>${c.not_separable ? esc(c.not_separable + ' from ' + c.not_separable_from.join(', ')) : ''}</td></tr>`).join('');
}

drawPlots(); table(); replicates();
if (D.selected) select(D.selected);
document.body.dataset.ready = 'yes';
"""
