/* fxqat explorer: pan/zoom, the details panel (rule, quantizers, histograms, SQNR, sensitivity), search, and the
   selection → qconfig YAML download. window.fxqatExplorer exposes qconfigYaml / select / reveal for tests. */
"use strict";
(function () {
  const { D, nodes, byName, groups, members, open, state, render, toggle, reveal, size, esc } = FXG;
  const $ = (id) => document.getElementById(id);
  const svg = $("graph"), vp = $("viewport");
  const view = { k: 1, x: 0, y: 0 };
  const apply = () => vp.setAttribute("transform", `translate(${view.x},${view.y}) scale(${view.k})`);
  const fmt = (v, d = 4) => (v == null ? "–" : Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(d - 1).replace(/\.?0+e/, "e") : (+v.toPrecision(d)).toString());

  function fit() {
    const s = size(), r = svg.getBoundingClientRect();
    view.k = Math.min(1.4, r.width / s.w, r.height / s.h) || 1;
    view.x = (r.width - s.w * view.k) / 2; view.y = Math.max(0, (r.height - s.h * view.k) / 2);
    apply();
  }
  function center(key, k) {
    const b = state.boxes.get(key); if (!b) return;
    const r = svg.getBoundingClientRect();
    view.k = k || Math.max(view.k, 0.9);
    view.x = r.width / 2 - (b.x + b.w / 2) * view.k; view.y = r.height / 2 - (b.y + b.h / 2) * view.k; apply();
  }
  svg.addEventListener("wheel", (ev) => {
    ev.preventDefault();
    const r = svg.getBoundingClientRect(), px = ev.clientX - r.left, py = ev.clientY - r.top;
    const k = Math.max(0.05, Math.min(4, view.k * Math.exp(-ev.deltaY * 0.0015)));
    view.x = px - (px - view.x) * k / view.k; view.y = py - (py - view.y) * k / view.k; view.k = k; apply();
  }, { passive: false });
  let drag = null, moved = false;
  svg.addEventListener("mousedown", (ev) => { drag = { x: ev.clientX, y: ev.clientY, vx: view.x, vy: view.y }; moved = false; });
  window.addEventListener("mousemove", (ev) => {
    if (!drag) return;
    if (Math.abs(ev.clientX - drag.x) + Math.abs(ev.clientY - drag.y) > 3) { svg.classList.add("panning"); moved = true; }
    view.x = drag.vx + ev.clientX - drag.x; view.y = drag.vy + ev.clientY - drag.y; apply();
  });
  window.addEventListener("mouseup", () => { drag = null; svg.classList.remove("panning"); });

  function toast(msg) { const t = $("toast"); t.textContent = msg; t.classList.add("show"); clearTimeout(toast.h); toast.h = setTimeout(() => t.classList.remove("show"), 2600); }

  // ---------------------------------------------------------------------------------------------- histograms
  function hist(canvas, h, grid) {
    const dpr = window.devicePixelRatio || 1, W = canvas.clientWidth || 400, H = canvas.clientHeight || 130;
    canvas.width = W * dpr; canvas.height = H * dpr;
    const c = canvas.getContext("2d"); c.scale(dpr, dpr);
    const pad = { l: 6, r: 6, t: 6, b: 18 }, w = W - pad.l - pad.r, hh = H - pad.t - pad.b;
    const logy = $("logy") ? $("logy").checked : true, f = (v) => (logy ? Math.log10(1 + v) : v);
    const top = Math.max(1e-9, ...h.a.map(f), ...(h.b || []).map(f)), bw = w / h.a.length;
    const X = (v) => pad.l + (v - h.lo) / (h.hi - h.lo) * w;
    c.fillStyle = "rgba(152,162,179,.55)";
    h.a.forEach((v, i) => { const y = f(v) / top * hh; c.fillRect(pad.l + i * bw, pad.t + hh - y, Math.max(1, bw - 0.5), y); });
    if (h.b) {
      c.strokeStyle = "#1f6feb"; c.lineWidth = 1.4; c.fillStyle = "rgba(31,111,235,.18)"; c.beginPath();
      c.moveTo(pad.l, pad.t + hh);
      h.b.forEach((v, i) => { const y = pad.t + hh - f(v) / top * hh; c.lineTo(pad.l + i * bw, y); c.lineTo(pad.l + (i + 1) * bw, y); });
      c.lineTo(pad.l + w, pad.t + hh); c.fill(); c.stroke();
    }
    if (grid) {
      c.strokeStyle = "#d92d20"; c.setLineDash([4, 3]); c.lineWidth = 1.2;
      for (const g of grid) { if (g == null) continue; const x = Math.max(pad.l, Math.min(pad.l + w, X(g))); c.beginPath(); c.moveTo(x, pad.t); c.lineTo(x, pad.t + hh); c.stroke(); }
      c.setLineDash([]);
    }
    c.fillStyle = "#667085"; c.font = "10px system-ui, sans-serif"; c.textBaseline = "top";
    c.textAlign = "left"; c.fillText(fmt(h.lo, 3), pad.l, pad.t + hh + 4);
    c.textAlign = "right"; c.fillText(fmt(h.hi, 3), pad.l + w, pad.t + hh + 4);
    if (h.lo < 0 && h.hi > 0) { c.textAlign = "center"; c.fillText("0", X(0), pad.t + hh + 4); c.fillRect(X(0), pad.t + hh, 1, 3); }
  }
  function scalesChart(canvas, s) {
    const dpr = window.devicePixelRatio || 1, W = canvas.clientWidth || 400, H = canvas.clientHeight || 46;
    canvas.width = W * dpr; canvas.height = H * dpr;
    const c = canvas.getContext("2d"); c.scale(dpr, dpr);
    const m = Math.max(...s), bw = (W - 8) / s.length;
    c.fillStyle = "#6baed6";
    s.forEach((v, i) => { const y = v / m * (H - 8); c.fillRect(4 + i * bw, H - 4 - y, Math.max(0.8, bw - 0.4), y); });
  }

  // ------------------------------------------------------------------------------------------------- details
  const link = (n) => `<a class="node-link" data-go="${esc(n.name)}">${esc(n.name)}</a>`;
  const row = (k, v, id) => (v == null || v === "" ? "" : `<tr><td>${k}</td><td${id ? ` id="${id}"` : ""}>${v}</td></tr>`);
  function specText(s) { return s ? `<code>${esc(s.label)}</code> ${s.bits}-bit ${s.symmetric ? "symmetric" : "asymmetric"}${s.per_channel != null ? ", per channel (axis " + s.per_channel + ")" : ""}, ${esc(s.observer)}${s.learnable ? ", learnable" : ""}${s.fixed ? ", fixed " + s.fixed.join(" / ") : ""}` : "float"; }
  function quantTable(q, idp) {
    if (!q) return "";
    let h = row("quantizer", `<code>${esc(q.path)}</code> <span class="pill">${esc(q.label)}</span>`);
    if (q.per_channel) {
      h += row("scales", `${q.scales.length} channels, ${fmt(q.scale_range[0])} … ${fmt(q.scale_range[1])}`, idp + "scale");
      h += row("zero points", q.zero_points.every((z) => z === q.zero_points[0]) ? `all ${q.zero_points[0]}` : q.zero_points.join(", "));
    } else {
      h += row("scale", fmt(q.scale, 6), idp + "scale") + row("zero point", q.zero_point, idp + "zp");
      h += row("grid range", q.grid ? `[${fmt(q.grid[0])}, ${fmt(q.grid[1])}]` : null);
    }
    h += row("observed range", q.observed ? `[${fmt(q.observed[0])}, ${fmt(q.observed[1])}] <span class="key">(${esc(q.observer)})</span>` : null);
    if (!q.initialized) h += row("state", "not initialized (never observed data)");
    return h;
  }
  function histBlock(id, title, h, grid) {
    if (!h) return "";
    const total = h.a.reduce((s, v) => s + v, 0);
    return `<div class="hist-head"><span>${title}</span><span>${total.toLocaleString()} values · ${h.a.length} bins</span></div><canvas class="hist" id="${id}"></canvas>`;
  }

  function showNode(n) {
    const st = n.stats || {}, an = n.analysis, r = n.rule;
    let h = `<h2 id="d-name">${esc(n.name)}</h2><div class="sub">${esc(n.op)} · <code>${esc(n.target)}</code> · kind <b>${esc(n.kind)}</b></div><table>`;
    h += row("module path", n.module_path ? `<code>${esc(n.module_path)}</code>` : null);
    h += row("layer", n.layer != null ? `model.${n.layer} (${esc(n.layer_type)})${n.block && n.block !== n.layer_type ? " · block " + esc(n.block) : ""}` : null);
    h += row("role", n.role ? `<code>${esc(n.role)}</code>` : "–");
    h += row("shape", n.shape ? `<code>${esc(n.shape)}</code>` : null);
    h += row("precision", `<span class="pill" style="background:${FXG.PREC[n.precision] || "#eee"}">${esc(n.precision)}</span> <code>${esc(n.label || "")}</code>`);
    h += "</table>";
    if (r) {
      h += `<h3>set by</h3><div id="d-rule"><span class="rule-where">${esc(r.where || r.source)}</span>`;
      if (r.text) h += `<pre>${esc(r.text)}</pre>`;
      if (r.matched && r.matched.length > 1) h += `<div class="key">rules matching this node, in precedence order (the last wins):</div><pre>${r.matched.map((m) => esc(m.where + "  " + m.rule)).join("\n")}</pre>`;
      h += "</div>";
    }
    if (st.sqnr_db != null || st.weight_sqnr_db != null || an) {
      h += `<h3>error</h3><table id="d-sqnr">`;
      h += row("SQNR vs FP32", st.sqnr_db != null ? `${fmt(st.sqnr_db, 3)} dB <span class="key">(whole fake-quant model up to here)</span>` : null);
      h += row("own quantizer", st.act_sqnr_db != null ? `${fmt(st.act_sqnr_db, 3)} dB <span class="key">(this grid alone, FP32 input)</span>` : null);
      h += row("weights", st.weight_sqnr_db != null ? `${fmt(st.weight_sqnr_db, 3)} dB` : null);
      if (an) {
        const total = nodes.filter((m) => m.analysis).length;
        h += row("sensitivity", `rank <b>${an.rank}</b> of ${total} · score ${fmt(an.score, 3)}`, "d-rank");
        h += row("analysis", `gain ${fmt(100 * an.gain, 3)} % · alone NSR ${fmt(an.alone_nsr, 3)} · w ${fmt(an.weight_sqnr, 3)} dB · a ${fmt(an.act_sqnr, 3)} dB`);
      }
      h += "</table>";
    }
    if (st.weight || st.act) {
      h += `<h3>histograms <label class="key" style="float:right;text-transform:none"><input type="checkbox" id="logy" checked> log counts</label></h3>`;
      h += `<div class="key"><i style="background:rgba(152,162,179,.8)"></i>FP32<i style="background:#1f6feb"></i>fake-quant<i style="background:#d92d20"></i>grid range</div>`;
      h += histBlock("c-weight", "weights (BN folded)", st.weight) + histBlock("c-act", n.quantizer ? "output, as consumers see it" : "output", st.act);
    } else if (!D.has_stats) h += `<p class="key">${esc(D.images_note)}</p>`;
    if (n.weight_spec !== undefined || n.output_spec !== undefined) {
      h += "<h3>quantization</h3><table>";
      if (n.kind === "conv") h += row("weights", specText(n.weight_spec));
      h += row(n.shared ? "output (shared)" : "output", specText(n.output_spec));
      if (n.grid_owner && n.grid_owner !== n.name) h += row("grid owner", byName[n.grid_owner] ? link(byName[n.grid_owner]) : esc(n.grid_owner));
      h += "</table>";
    }
    if (n.quantizer || n.weight_quantizer) {
      h += `<h3>quantizers</h3><table>${quantTable(n.quantizer, "d-")}${quantTable(n.weight_quantizer, "d-w")}</table>`;
      if (n.weight_quantizer && n.weight_quantizer.scales) h += `<div class="hist-head"><span>per-channel weight scales</span></div><canvas class="scales" id="c-scales"></canvas>`;
    }
    const users = nodes.filter((m) => m.inputs.includes(n.id));
    h += `<h3>inputs / users</h3><div>${n.inputs.map((i) => link(nodes[i])).join("") || "–"}<br>→ ${users.map(link).join("") || "–"}</div>`;
    h += `<p><button class="small" id="pick-btn">${state.picked.has(n.name) ? "remove from" : "add to"} qconfig selection</button></p>`;
    const el = $("details"); el.innerHTML = h; el.dataset.node = n.name;
    if (n.weight_quantizer && n.weight_quantizer.scales) scalesChart($("c-scales"), n.weight_quantizer.scales);
    const draw = () => {
      if (st.weight) hist($("c-weight"), st.weight, null);
      if (st.act) hist($("c-act"), st.act, n.quantizer && n.quantizer.grid);
    };
    draw();
    if ($("logy")) $("logy").addEventListener("change", draw);
    $("pick-btn").addEventListener("click", () => pick(n));
  }

  function showGroup(path) {
    const g = groups[path], ns = members[path].map((i) => nodes[i]);
    const by = {}; ns.filter((n) => n.kind === "conv" || n.kind === "add").forEach((n) => { by[n.label] = (by[n.label] || 0) + 1; });
    const worst = ns.filter((n) => n.stats && n.stats.sqnr_db != null).sort((a, b) => a.stats.sqnr_db - b.stats.sqnr_db)[0];
    const sens = ns.filter((n) => n.analysis).sort((a, b) => a.analysis.rank - b.analysis.rank)[0];
    let h = `<h2 id="d-name">${esc(path)}</h2><div class="sub">${esc(g.type)} · ${ns.length} nodes</div><table>`;
    h += row("precisions", Object.entries(by).map(([k, v]) => `<code>${esc(k)}</code> ×${v}`).join(", ") || "float");
    h += row("lowest SQNR", worst ? `${link(worst)} ${fmt(worst.stats.sqnr_db, 3)} dB` : null);
    h += row("most sensitive", sens ? `${link(sens)} rank ${sens.analysis.rank}` : null);
    h += `</table><h3>nodes</h3><div>${ns.map(link).join(" ")}</div>`;
    $("details").innerHTML = h; $("details").dataset.node = path;
  }

  function intro() {
    const q = nodes.filter((n) => n.kind === "conv" || n.kind === "add");
    const by = {}; q.forEach((n) => { by[n.label] = (by[n.label] || 0) + 1; });
    const s = D.analysis_summary;
    $("details").innerHTML = `<h2>${esc(D.title)}</h2><div class="sub">${nodes.length} nodes · ${Object.keys(groups).length} blocks${D.seconds ? ` · built in ${D.seconds} s` : ""}</div>
      <p>Click a block to open it, a node for its details (the rule that set it, its scales, histograms).
      <b>Ctrl / ⌘ / Shift-click</b> adds a node to the qconfig selection below.</p>
      <table>${row("quantized ops", Object.entries(by).map(([k, v]) => `<code>${esc(k)}</code> ×${v}`).join("<br>"))}
      ${row("qconfig", D.qconfig ? `<code>${esc(D.qconfig.source)}</code>` : "not prepared (no quantizers)")}
      ${row("images", esc(D.images_note))}
      ${row("analysis", s ? `head SQNR ${fmt(s.head_sqnr_db, 3)} dB all quantized; ${s.units} layers ranked` : "none given (analysis=)")}</table>`;
    delete $("details").dataset.node;
  }

  function select(name) {
    const n = byName[name];
    state.selected = n.id; reveal(name); showNode(n);
    return n;
  }

  // ---------------------------------------------------------------------------------------- selection → YAML
  let action = Object.keys(D.actions)[0];
  function qconfigYaml(names, act) {
    const sel = names.map((x) => byName[x]);
    const lines = [`# fxqat explore: ${sel.length} node(s) set to ${act}: ${D.actions[act]}`, `# base qconfig: ${D.yaml.source}`];
    sel.forEach((s) => lines.push(`#   ${s.name} (${s.module_path || "-"}, ${s.role || "-"})`));
    let rules = D.yaml.items;
    sel.forEach((s) => { rules += [`- match: {name: "${s.name}"}`].concat(D.action_lines[act]).join("\n") + "\n"; });
    return lines.join("\n") + "\n" + D.yaml.head + "rules:" + (rules ? "\n" + rules : " []\n");
  }
  function pick(n) {
    let t = n;
    if (!t.quantizable) {
      const o = t.grid_owner && byName[t.grid_owner];
      if (!o || !o.quantizable) { toast(`${n.name}: not a conv or residual add; qconfig rules select those only`); return; }
      t = o; toast(`${n.name} lies on ${o.name}'s grid: selected ${o.name}`);
    }
    if (!D.yaml) { toast("this graph has no qconfig (not prepared)"); return; }
    if (state.picked.has(t.name)) state.picked.delete(t.name); else state.picked.add(t.name);
    const keep = state.selected; render(); state.selected = keep; selection();
    if (keep != null && $("details").dataset.node === nodes[keep].name) showNode(nodes[keep]);
  }
  function selection() {
    const el = $("selection"), names = [...state.picked];
    if (!D.yaml) { el.innerHTML = ""; return; }
    let h = `<h3>qconfig selection (${names.length})</h3>`;
    h += names.map((x) => `<div class="picked">${link(byName[x])}<a class="node-link" data-unpick="${esc(x)}">✕</a></div>`).join("") || `<div class="key">none yet: Ctrl / ⌘ / Shift-click nodes</div>`;
    h += `<select id="action">${Object.entries(D.actions).map(([k, v]) => `<option value="${k}"${k === action ? " selected" : ""}>${k}: ${esc(v)}</option>`).join("")}</select>`;
    h += `<div><button class="small primary" id="download"${names.length ? "" : " disabled"}>download qconfig YAML</button> <button class="small" id="clear"${names.length ? "" : " disabled"}>clear</button></div>`;
    if (names.length) h += `<pre id="yaml">${esc(qconfigYaml(names, action))}</pre>`;
    el.innerHTML = h;
    $("action").addEventListener("change", (ev) => { action = ev.target.value; selection(); });
    $("clear").addEventListener("click", () => { state.picked.clear(); render(); selection(); });
    $("download").addEventListener("click", () => {
      const a = document.createElement("a");
      a.href = URL.createObjectURL(new Blob([qconfigYaml(names, action)], { type: "text/yaml" }));
      a.download = "explore_qconfig.yaml"; document.body.appendChild(a); a.click(); a.remove();
    });
  }

  // ---------------------------------------------------------------------------------------------- wiring
  state.onClick = (key, ev) => {
    if (moved) return;  // the end of a pan, not a click
    if (key.startsWith("g:")) { const p = key.slice(2); toggle(p); showGroup(p); return; }
    const n = nodes[+key.slice(2)];
    if (ev.ctrlKey || ev.metaKey || ev.shiftKey) { pick(n); return; }
    state.selected = n.id; render(); showNode(n);
  };
  document.addEventListener("click", (ev) => {
    const go = ev.target.closest && ev.target.closest("[data-go]"), un = ev.target.closest && ev.target.closest("[data-unpick]");
    if (go) { select(go.dataset.go); center("n:" + byName[go.dataset.go].id); }
    if (un) { state.picked.delete(un.dataset.unpick); render(); selection(); }
  });
  const search = $("search"), results = $("results");
  function matches(q) {
    q = q.trim().toLowerCase(); if (!q) return [];
    return nodes.filter((n) => n.name.toLowerCase().includes(q) || (n.module_path || "").toLowerCase().includes(q) || (n.role || "").toLowerCase().includes(q)).slice(0, 40);
  }
  search.addEventListener("input", () => {
    const m = matches(search.value);
    results.innerHTML = m.map((n, k) => `<div data-go="${esc(n.name)}"${k === 0 ? ' class="active"' : ""}>${esc(n.name)}<small>${esc(n.module_path || n.op)}</small></div>`).join("");
    document.querySelectorAll("svg .node.hit").forEach((e) => e.classList.remove("hit"));
    const names = new Set(m.map((n) => n.name));
    document.querySelectorAll("svg .node[data-name]").forEach((e) => { if (names.has(e.dataset.name)) e.classList.add("hit"); });
  });
  search.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter") { const m = matches(search.value); if (m.length) { select(m[0].name); center("n:" + m[0].id); results.innerHTML = ""; } }
    if (ev.key === "Escape") { search.value = ""; results.innerHTML = ""; }
  });
  results.addEventListener("click", () => { results.innerHTML = ""; });
  const cb = $("colorby"); cb.value = state.colorBy;
  cb.addEventListener("change", () => { state.colorBy = cb.value; render(); });
  $("expand-all").addEventListener("click", () => { Object.keys(groups).forEach((g) => open.add(g)); render(); fit(); });
  $("collapse-all").addEventListener("click", () => { open.clear(); render(); fit(); });
  $("fit").addEventListener("click", fit);
  $("title").textContent = D.title;
  if (D.qconfig) $("qconfig-text").textContent = D.qconfig.text.split("\n").map((l, i) => String(i + 1).padStart(3) + "  " + l).join("\n");
  else $("qconfig-box").style.display = "none";
  render(); fit(); intro(); selection();
  window.fxqatExplorer = { data: D, qconfigYaml, select, reveal, pick: (name) => pick(byName[name]), state, center, fit };
})();
