// ytrainer board: the page. Plain JavaScript, no build step; charts by uPlot (vendored, MIT).
'use strict';

const QS = new URLSearchParams(location.search);
const TOKEN = QS.get('token');
const POLL_MS = Math.max(250, Number(QS.get('poll')) || 2000);
const COLORS = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#17becf'];
const ZONE_COLORS = { learned: '#2ca02c', learning: '#1f77b4', hard: '#ff7f0e', noise: '#d62728' };

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') e.className = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null) e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c ?? ''));
  return e;
};
const fmt = (x, d = 4) => (x === null || x === undefined || Number.isNaN(x)) ? '–' : Number(x).toFixed(d);

// Every call to the server: JSON in, an Error with the server's message out.
async function api(path, params = {}) {
  const q = new URLSearchParams(params);
  if (TOKEN) q.set('token', TOKEN);
  let r;
  try {
    r = await fetch(`/api/${path}?${q}`, { cache: 'no-store' });
  } catch (e) {
    setConn(false);
    throw new Error('the board server does not answer (was `ytrainer board` stopped?)');
  }
  setConn(true);
  let body;
  try { body = await r.json(); } catch (e) { throw new Error(`HTTP ${r.status}: the answer is not JSON`); }
  if (!r.ok) throw new Error(body && body.error ? body.error : `HTTP ${r.status}`);
  return body;
}

function setConn(ok) {
  const c = $('#conn');
  c.textContent = ok ? '' : 'server unreachable';
  c.className = ok ? '' : 'bad';
}

function showError(box, msg) {
  box.hidden = !msg;
  box.textContent = msg || '';
}

// ---------------------------------------------------------------------------------------------------- routing
const views = ['runs', 'tokens', 'sweeps', 'curves'];
function route() {
  const [name, query] = (location.hash.slice(1) || 'runs').split('?');
  const view = views.includes(name) ? name : 'runs';
  const params = new URLSearchParams(query || '');
  for (const v of views) {
    $(`#view-${v}`).hidden = v !== view;
    $(`#nav-${v}`).classList.toggle('active', v === view);
  }
  document.body.dataset.view = view;
  if (view === 'runs') Runs.enter(params);
  if (view === 'tokens') Tokens.enter(params);
  if (view === 'sweeps') Sweeps.enter(params);
  if (view === 'curves') Curves.enter(params);
}
window.addEventListener('hashchange', route);

// ------------------------------------------------------------------------------------------------------ charts
// One uPlot chart in `box`; `tables` is a list of [xs, ys] per series, joined on x.
function drawChart(box, title, xlabel, series, tables, opts = {}) {
  const points = tables.reduce((n, t) => n + t[0].length, 0);
  box.dataset.points = String(points);
  box.dataset.series = String(series.length);
  if (!series.length) {
    if (box._u) { box._u.destroy(); box._u = null; }
    box.replaceChildren(el('div', { class: 'empty' }, `${title}: no data yet`));
    return;
  }
  const data = tables.length === 1 ? [tables[0][0], tables[0][1]] : uPlot.join(tables.map(t => [t[0], t[1]]));
  const key = title + '|' + series.map(s => s.label).join('|');
  if (box._u && box._key === key) {
    box._u.setData(data);
    return;
  }
  if (box._u) box._u.destroy();
  box.replaceChildren();
  const width = Math.max(320, box.clientWidth || 560);
  box._key = key;
  box._u = new uPlot({
    title,
    width,
    height: opts.height || 240,
    scales: { x: { time: false }, ...(opts.scales || {}) },
    axes: [{ label: xlabel }, { label: opts.ylabel || '' }],
    series: [{ label: xlabel }, ...series.map(s => ({ spanGaps: true, width: 1.5, ...s }))],
    hooks: opts.hooks || {},
    cursor: opts.cursor || {},
  }, data, box);
}

function column(rows, key) {
  const xs = [], ys = [];
  for (const r of rows) {
    if (typeof r.step === 'number' && typeof r[key] === 'number') { xs.push(r.step); ys.push(r[key]); }
  }
  return [xs, ys];
}

// -------------------------------------------------------------------------------------------------------- runs
const Runs = {
  selected: new Set(),
  touched: false,
  timer: null,
  runs: [],
  details: {},
  enter(params) {
    const sel = params.get('select');
    if (sel) { this.selected = new Set(sel.split(',')); this.touched = true; }
    this.refresh();
    clearInterval(this.timer);
    this.timer = setInterval(() => { if (document.body.dataset.view === 'runs') this.refresh(); }, POLL_MS);
  },
  async refresh() {
    const gerr = $('#global-error');
    try {
      this.runs = await api('runs');
      showError(gerr, '');
    } catch (e) {
      showError(gerr, `cannot list the runs: ${e.message}`);
      return;
    }
    if (!this.touched && this.selected.size === 0) this.runs.slice(0, 3).forEach(r => this.selected.add(r.id));
    this.renderTable();
    const msgs = [];
    for (const r of this.runs) for (const w of r.warnings || []) msgs.push(`${r.name}: ${w}`);
    await Promise.all([...this.selected].map(async id => {
      try {
        this.details[id] = await api('run', { id });
      } catch (e) {
        delete this.details[id];
        msgs.push(`run ${id}: ${e.message}`);
      }
    }));
    const box = $('#runs-messages');
    box.replaceChildren(...msgs.map(m => el('div', { class: 'warning' }, m)));
    this.renderCharts();
  },
  renderTable() {
    const body = $('#runs-table tbody');
    const rows = this.runs.map((r, i) => {
      const tick = el('input', { type: 'checkbox', 'data-run': r.id });
      tick.checked = this.selected.has(r.id);
      tick.addEventListener('change', () => {
        this.touched = true;
        if (tick.checked) this.selected.add(r.id); else this.selected.delete(r.id);
        this.refresh();
      });
      const strategy = r.loss ? (r.loss_params ? `${r.loss} (${r.loss_params})` : r.loss) : '–';
      const steps = r.steps == null ? '–' : (r.max_steps ? `${r.steps} / ${r.max_steps}` : String(r.steps));
      return el('tr', { 'data-run': r.id, class: this.selected.has(r.id) ? 'selected' : '' },
        el('td', {}, tick),
        el('td', { title: r.path }, el('span', { class: 'swatch', style: `background:${COLORS[i % COLORS.length]}` }), r.name || r.id),
        el('td', { class: `status ${r.status}` }, r.status),
        el('td', { class: 'steps' }, steps),
        el('td', {}, strategy),
        el('td', {}, r.adapter || '–'),
        el('td', {}, fmt(r.last_loss)),
        el('td', {}, r.eval_first == null ? '–' : `${fmt(r.eval_first)} → ${fmt(r.eval_last)}`),
        el('td', {}, el('a', { href: `#tokens?run=${encodeURIComponent(r.id)}` }, 'tokens')));
    });
    if (!rows.length) rows.push(el('tr', {}, el('td', { colspan: 9, class: 'empty' }, 'no runs found under these folders (a run folder holds metrics.jsonl or config.resolved.toml)')));
    body.replaceChildren(...rows);
  },
  renderCharts() {
    const chosen = this.runs.map((r, i) => [r, i]).filter(([r]) => this.selected.has(r.id) && this.details[r.id]);
    const lines = (key, from = 'metrics') => {
      const series = [], tables = [];
      for (const [r, i] of chosen) {
        const t = column(this.details[r.id][from] || [], key);
        if (!t[0].length) continue;
        series.push({ label: `${r.name} ${key}`, stroke: COLORS[i % COLORS.length] });
        tables.push(t);
      }
      return [series, tables];
    };
    drawChart($('#chart-loss'), 'training loss (sum w·ce / normaliser)', 'step', ...lines('loss'));
    drawChart($('#chart-eval'), 'eval loss', 'step', ...lines('eval_loss', 'eval'));
    drawChart($('#chart-lr'), 'learning rate', 'step', ...lines('lr'));
    drawChart($('#chart-grad'), 'gradient norm (before clipping)', 'step', ...lines('grad_norm'));
    const zs = [], zt = [];
    for (const [r, i] of chosen) {
      for (const z of ['learned', 'learning', 'hard', 'noise']) {
        const t = column(this.details[r.id].metrics || [], `zone_${z}`);
        if (!t[0].length) continue;
        zs.push({ label: `${r.name} ${z}`, stroke: ZONE_COLORS[z], dash: i ? [4 * i, 3] : undefined });
        zt.push(t);
      }
    }
    drawChart($('#chart-zones'), 'NLIRG zones (fraction of tokens)', 'step', zs, zt);
    drawChart($('#chart-weight'), 'mean weight and plain CE', 'step', ...(() => {
      const [s1, t1] = lines('mean_weight');
      const [s2, t2] = lines('ce');
      return [s1.concat(s2.map(s => ({ ...s, dash: [5, 3] }))), t1.concat(t2)];
    })());
    const first = chosen[0];
    $('#run-config-name').textContent = first ? first[0].name : '';
    $('#run-config pre').textContent = first ? (this.details[first[0].id].config || '(no config.resolved.toml)') : '';
  },
};

// ------------------------------------------------------------------------------------------------------ tokens
const Tokens = {
  plugins: null,
  async enter(params) {
    // What the panels show is stale until the new answers arrive.
    for (const p of ['#panel-a', '#panel-b']) $(p).dataset.state = 'loading';
    try {
      const [runs, plugins] = await Promise.all([api('runs'), this.plugins ? this.plugins : api('plugins')]);
      this.plugins = plugins;
      const sel = $('#tok-run');
      const want = params.get('run') || sel.value;
      sel.replaceChildren(...runs.filter(r => r.loss).map(r => el('option', { value: r.id }, `${r.name} (${r.loss})`)));
      if (want && ![...sel.options].some(o => o.value === want)) sel.append(el('option', { value: want }, want));
      if (want) sel.value = want;
      const tokenPlugins = plugins.filter(p => p.kind === 'token');
      for (const [panel, def] of [['#panel-a', ''], ['#panel-b', 'ce']]) {
        const s = $(`${panel} .strategy`);
        const cur = s.value || def;
        s.replaceChildren(el('option', { value: '' }, "run's own"), ...tokenPlugins.map(p => el('option', { value: p.name }, p.name)));
        s.value = cur;
      }
      // An address naming a run or a model says everything: fields it leaves out are cleared.
      if (params.has('run') || params.has('model')) {
        for (const k of ['model', 'adapter', 'data']) $(`#tok-${k}`).value = params.get(k) || '';
      }
      if ($('#tok-model').value) $('#tok-model-box').open = true;
      if (params.has('record')) $('#tok-record').value = params.get('record');
      if (params.has('split')) $('#tok-split').value = params.get('split');
      for (const [k, panel] of [['a', '#panel-a'], ['b', '#panel-b']]) {
        if (!params.has(k)) continue;
        const [stage, strategy, p] = params.get(k).split(':');
        if (stage) $(`${panel} .stage`).value = stage;
        if (strategy !== undefined) $(`${panel} .strategy`).value = strategy;
        if (p !== undefined) $(`${panel} .params`).value = p;
      }
    } catch (e) {
      showError($('#panel-a .error'), e.message);
      return;
    }
    if ($('#tok-run').value || $('#tok-model').value) this.show();
  },
  async show() {
    const model = $('#tok-model').value.trim();
    const base = model
      ? { model, adapter: $('#tok-adapter').value.trim(), data: $('#tok-data').value.trim(), record: $('#tok-record').value }
      : { run: $('#tok-run').value, record: $('#tok-record').value, split: $('#tok-split').value };
    await Promise.all(['#panel-a', '#panel-b'].map(p => this.panel($(p), base)));
  },
  async panel(box, base) {
    const q = { ...base, stage: $('.stage', box).value, strategy: $('.strategy', box).value, params: $('.params', box).value };
    const out = $('.tokens', box);
    box.dataset.state = 'loading';
    $('.summary', box).textContent = 'scoring…';
    try {
      const v = await api('tokens', q);
      showError($('.error', box), '');
      this.render(box, v);
      box.dataset.state = 'ready';
    } catch (e) {
      out.replaceChildren();
      $('.summary', box).textContent = '';
      showError($('.error', box), e.message);
      box.dataset.state = 'error';
    }
  },
  render(box, v) {
    const by = $('#tok-color').value;
    const sup = v.tokens.filter(t => t.s);
    const maxW = Math.max(1e-9, ...sup.map(t => t.weight));
    const params = Object.entries(v.params).map(([k, x]) => `${k}=${x}`).join(', ');
    $('.summary', box).textContent =
      `${v.stage} training · ${v.strategy}${params ? ` (${params})` : ''} · record ${v.record} of ${v.samples} (${v.origin}) · ` +
      `${sup.length} supervised tokens · mean loss ${fmt(v.mean_loss)} · mean weight ${fmt(v.mean_weight)}`;
    const spans = v.tokens.map((t, i) => {
      if (!t.s) return el('span', { class: 'tok prompt' }, t.t);
      const f = by === 'loss' ? Math.min(1, t.loss / 10) : t.weight / maxW;
      const bg = by === 'loss' ? `rgba(214,39,40,${(0.08 + 0.8 * f).toFixed(3)})` : `rgba(31,119,180,${(0.08 + 0.8 * f).toFixed(3)})`;
      const tip = `loss ${fmt(t.loss)} · entropy ${fmt(t.entropy)} · weight ${fmt(t.weight)} · zone ${t.zone} · rank ${t.rank}`;
      const s = el('span', {
        class: `tok sup zone-${t.zone}`, style: `background:${bg}`, title: tip,
        'data-i': i, 'data-loss': t.loss, 'data-entropy': t.entropy, 'data-weight': t.weight, 'data-zone': t.zone,
      }, t.t);
      s.addEventListener('mouseenter', () => { $('#tok-hover').textContent = `${JSON.stringify(t.t)}: ${tip}`; });
      return s;
    });
    $('.tokens', box).replaceChildren(...spans);
  },
};
$('#tokens-form').addEventListener('submit', e => { e.preventDefault(); Tokens.show(); });
$('#tok-color').addEventListener('change', () => Tokens.show());

// ------------------------------------------------------------------------------------------------------ sweeps
const Sweeps = {
  async enter() {
    const box = $('#sweeps');
    let sweeps;
    try {
      sweeps = await api('sweeps');
    } catch (e) {
      box.replaceChildren(el('div', { class: 'error' }, `cannot list the sweeps: ${e.message}`));
      return;
    }
    if (!sweeps.length) {
      box.replaceChildren(el('p', { class: 'empty' }, 'no sweeps under these folders (a sweep folder holds trials/<trial>/trial.json)'));
      return;
    }
    box.replaceChildren(...sweeps.map(s => this.sweep(s)));
  },
  sweep(s) {
    const stat = x => x ? `${fmt(x.mean)} ± ${fmt(x.std)}` : '–';
    const strat = sortable(
      ['strategy', 'n', 'domain gain', 'general increase', 'gain / forgetting', 'domain after', 'general after'],
      s.strategies.map(r => [r.strategy, r.n, [r.domain_gain.mean, stat(r.domain_gain)], [r.general_increase.mean, stat(r.general_increase)],
        r.gain_per_forgetting == null ? [null, 'n/a'] : [r.gain_per_forgetting, fmt(r.gain_per_forgetting, 2)],
        [r.domain_after.mean, stat(r.domain_after)], [r.general_after.mean, stat(r.general_after)]]), 'sweep-strategies');
    const finished = s.trials.filter(t => t.status === 'finished');
    const trials = sortable(
      ['trial', 'strategy', 'seed', 'gain (learning)', 'forgetting', 'domain after', 'general after', 'steps', 'status'],
      s.trials.map(t => [t.id, t.strategy || '–', t.seed ?? '–', [t.gain, fmt(t.gain)], [t.forgetting, fmt(t.forgetting)],
        [t.domain_after, fmt(t.domain_after)], [t.general_after, fmt(t.general_after)], t.steps ?? '–', t.status]),
      'sweep-trials', i => `#runs?select=${encodeURIComponent(s.trials[i].run)}`);
    const chart = el('div', { class: 'chart scatter' });
    const out = el('div', { class: 'sweep', 'data-sweep': s.id },
      el('h2', {}, `sweep ${s.name}`), el('div', { class: 'hint' }, s.path),
      ...s.warnings.map(w => el('div', { class: 'warning' }, w)),
      el('h3', {}, 'per strategy (mean ± std over seeds)'), strat,
      el('h3', {}, 'learning vs forgetting (click a point to open its run)'), chart,
      el('h3', {}, 'trials (click a row to open its run)'), trials);
    requestAnimationFrame(() => this.scatter(chart, finished));
    return out;
  },
  scatter(box, trials) {
    const order = trials.map((t, i) => i).filter(i => Number.isFinite(trials[i].gain)).sort((a, b) => trials[a].gain - trials[b].gain);
    const xs = order.map(i => trials[i].gain);
    const names = [...new Set(order.map(i => trials[i].strategy))];
    const series = names.map((n, k) => ({ label: n, stroke: COLORS[k % COLORS.length], fill: COLORS[k % COLORS.length], paths: () => null, points: { show: true, size: 9 } }));
    const data = [xs, ...names.map(n => order.map(i => trials[i].strategy === n ? trials[i].forgetting : null))];
    box.dataset.points = String(xs.length);
    if (!xs.length) { box.replaceChildren(el('div', { class: 'empty' }, 'no finished trials yet')); return; }
    const u = new uPlot({
      title: 'domain gain (learning) vs general loss increase (forgetting)', width: Math.max(320, box.clientWidth || 560), height: 300,
      // A margin around the points, so none sits on the plot's edge (where it could not be clicked).
      scales: { x: { time: false, range: padded }, y: { range: padded } }, axes: [{ label: 'gain (domain loss drop)' }, { label: 'forgetting (general loss rise)' }],
      series: [{ label: 'gain' }, ...series],
    }, data, box);
    box._u = u;
    u.over.addEventListener('click', () => {
      const idx = u.cursor.idx;
      if (idx == null) return;
      location.hash = `#runs?select=${encodeURIComponent(trials[order[idx]].run)}`;
    });
  },
};

// A scale range 10% wider than the data on each side.
function padded(u, min, max) {
  const pad = max > min ? (max - min) * 0.1 : Math.abs(min) * 0.1 || 0.5;
  return [min - pad, max + pad];
}

// A table whose columns sort on a click; a cell is a value or [sort key, text].
function sortable(headers, rows, cls, link) {
  const table = el('table', { class: `grid ${cls}` });
  let by = -1, dir = 1;
  const key = c => Array.isArray(c) ? c[0] : c;
  const text = c => String(Array.isArray(c) ? c[1] : c);
  const body = el('tbody');
  const fill = () => {
    const idx = rows.map((r, i) => i);
    if (by >= 0) idx.sort((a, b) => {
      const x = key(rows[a][by]), y = key(rows[b][by]);
      if (x === y) return 0;
      if (x === null || x === undefined || x === '–') return 1;
      if (y === null || y === undefined || y === '–') return -1;
      return (x < y ? -1 : 1) * dir;
    });
    body.replaceChildren(...idx.map(i => {
      const tr = el('tr', { 'data-row': i }, ...rows[i].map(c => el('td', {}, text(c))));
      if (link) { tr.classList.add('link'); tr.addEventListener('click', () => { location.hash = link(i); }); }
      return tr;
    }));
  };
  const head = el('tr', {}, ...headers.map((h, j) => el('th', {
    class: 'sort', onclick: () => { dir = by === j ? -dir : 1; by = j; fill(); },
  }, h)));
  table.append(el('thead', {}, head), body);
  fill();
  return table;
}

// ------------------------------------------------------------------------------------------------------ curves
const Curves = {
  plugins: null,
  async enter(params) {
    try {
      if (!this.plugins) this.plugins = (await api('plugins')).filter(p => p.kind === 'token');
    } catch (e) {
      showError($('#curve-error'), e.message);
      return;
    }
    const sel = $('#curve-plugin');
    if (!sel.options.length) {
      sel.replaceChildren(...this.plugins.map(p => el('option', { value: p.name }, p.name)));
      sel.value = this.plugins.some(p => p.name === 'nlirg') ? 'nlirg' : (this.plugins[0] || {}).name;
      sel.addEventListener('change', () => { this.sliders(); this.draw(); });
      for (const id of ['#curve-from', '#curve-to', '#curve-entropy', '#curve-loss', '#curve-ref']) $(id).addEventListener('change', () => this.draw());
      $('#curve-vs').addEventListener('change', () => {
        $('#curve-from').value = 0;
        $('#curve-to').value = $('#curve-vs').value === 'entropy' ? 1 : 20;
        this.draw();
      });
    }
    if (params.get('plugin')) sel.value = params.get('plugin');
    if (params.get('vs')) {
      $('#curve-vs').value = params.get('vs');
      $('#curve-from').value = 0;
      $('#curve-to').value = params.get('vs') === 'entropy' ? 1 : 20;
    }
    this.sliders();
    this.draw();
  },
  plugin() { return this.plugins.find(p => p.name === $('#curve-plugin').value); },
  sliders() {
    const p = this.plugin();
    const box = $('#curve-sliders');
    $('#curve-desc').textContent = p ? `${p.description}${p.formula ? ' — ' + p.formula : ''}` : '';
    box.replaceChildren(...(p ? p.params : []).map(s => {
      const d = s.default;
      const span = Math.max(1, Math.abs(d) * 2);
      const [lo, hi] = d >= 0 ? [0, span] : [-span, span];
      const input = el('input', { type: 'range', min: lo, max: hi, step: 'any', value: d, 'data-param': s.name });
      const shown = el('span', { class: 'value' }, String(d));
      input.addEventListener('input', () => { shown.textContent = Number(input.value).toPrecision(4); this.draw(); });
      return el('label', { title: s.help }, `${s.name} `, input, shown, el('span', { class: 'hint' }, ` ${s.help}`));
    }));
  },
  async draw() {
    const p = this.plugin();
    if (!p) return;
    const inputs = [...document.querySelectorAll('#curve-sliders input')];
    const params = inputs.map(i => `${i.dataset.param}=${i.value}`).join(',');
    const vs = $('#curve-vs').value;
    const range = {
      from: $('#curve-from').value, to: $('#curve-to').value, vs,
      entropy: $('#curve-entropy').value, loss: $('#curve-loss').value, reference_loss: $('#curve-ref').value,
    };
    const seq = (this.seq = (this.seq || 0) + 1);
    try {
      const [now, def] = await Promise.all([
        api('curve', { plugin: p.name, params, ...range }),
        api('curve', { plugin: p.name, ...range }),
      ]);
      if (seq !== this.seq) return;
      showError($('#curve-error'), '');
      const box = $('#chart-curve');
      box.dataset.params = params;
      box.dataset.weights = JSON.stringify(now.weight.slice(0, 5));
      drawChart(box, `${p.name}: weight vs ${vs === 'entropy' ? 'normalised entropy' : 'token loss'}`,
        vs === 'entropy' ? 'normalised entropy' : 'loss (nats)',
        [{ label: `${p.name} (sliders)`, stroke: COLORS[0], width: 2 }, { label: `${p.name} (defaults)`, stroke: '#999', dash: [5, 4] }],
        [[now.x, now.weight], [def.x, def.weight]], { height: 360, ylabel: 'weight' });
    } catch (e) {
      showError($('#curve-error'), e.message);
    }
  },
};

api('roots').then(r => { $('#roots').textContent = r.join(', '); }).catch(e => showError($('#global-error'), e.message));
route();
