/* fxqat explorer: the graph view. Blocks (Ultralytics layers, nested blocks) collapse into one box; clicking a box
   opens it, clicking an open block's header closes it. Colours follow the "colour by" mode. */
"use strict";
const FXG = (function () {
  const D = JSON.parse(document.getElementById("fxqat-data").textContent);
  const NS = "http://www.w3.org/2000/svg";
  const nodes = D.nodes, byName = {}, groups = D.groups;
  nodes.forEach((n) => { byName[n.name] = n; });
  const members = {};  // block path → node ids
  nodes.forEach((n) => n.groups.forEach((g) => { (members[g] = members[g] || []).push(n.id); }));
  const open = new Set(D.expand === "all" ? Object.keys(groups) : D.expand.filter((g) => groups[g]));
  const PREC = { float: "#d9d9d9", int8: "#6baed6", int4: "#fd8d3c", int16: "#74c476", "other bits": "#9e9ac8", mixed: "#c994c7" };
  const OPC = { conv: "#8fb8de", bn: "#c6dbef", act: "#b5e3b5", concat: "#f6c28b", add: "#f4a3a3", pool: "#d4b9e8",
    resize: "#e8d98f", split: "#f2e6c9", decode: "#d9d9d9", quant: "#ffe066", io: "#ffffff", other: "#eeeeee", layer: "#dde7f3" };
  const ctx = document.createElement("canvas").getContext("2d");
  const textW = (s, bold) => { ctx.font = `${bold ? "600 " : ""}11px system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif`; return ctx.measureText(s).width; };
  const state = { colorBy: D.color_by, selected: null, picked: new Set(), boxes: new Map(), onClick: null };
  const maxScore = Math.max(0, ...nodes.map((n) => (n.analysis ? n.analysis.score : 0)));

  function ramp(stops, t) {  // stops: [[t, [r,g,b]], ...]
    t = Math.max(0, Math.min(1, t));
    for (let k = 1; k < stops.length; k++) {
      if (t <= stops[k][0]) {
        const [t0, a] = stops[k - 1], [t1, b] = stops[k], u = (t - t0) / (t1 - t0 || 1);
        return "rgb(" + a.map((v, i) => Math.round(v + (b[i] - v) * u)).join(",") + ")";
      }
    }
    return "rgb(" + stops[stops.length - 1][1].join(",") + ")";
  }
  const YLORRD = [[0, [255, 255, 204]], [0.35, [254, 217, 118]], [0.65, [253, 141, 60]], [1, [189, 0, 38]]];
  const RDYLGN = [[0, [215, 48, 39]], [0.5, [254, 224, 139]], [1, [26, 152, 80]]];
  const SQNR_LO = 10, SQNR_HI = 45;  // dB: the colour scale's ends
  const sqnrOf = (n) => (n.stats && n.stats.sqnr_db != null ? n.stats.sqnr_db : n.analysis ? n.analysis.act_sqnr : null);
  const counted = (n) => n.op === "call_module" || n.label;

  function fill(ids) {
    const ns = ids.map((i) => nodes[i]);
    if (state.colorBy === "precision") {
      const cls = new Set(ns.filter(counted).map((n) => n.precision));
      return PREC[cls.size > 1 ? "mixed" : cls.size ? [...cls][0] : "float"];
    }
    if (state.colorBy === "sensitivity") {
      const s = ns.filter((n) => n.analysis).map((n) => n.analysis.score);
      return s.length ? ramp(YLORRD, Math.max(...s) / (maxScore || 1)) : "#f2f4f7";
    }
    if (state.colorBy === "sqnr") {
      const s = ns.map(sqnrOf).filter((v) => v != null);
      return s.length ? ramp(RDYLGN, (Math.min(...s) - SQNR_LO) / (SQNR_HI - SQNR_LO)) : "#f2f4f7";
    }
    return ids.length > 1 ? OPC.layer : OPC[ns[0].draw_kind] || OPC.other;
  }

  function legend() {
    const el = document.getElementById("legend");
    const sw = (c, t) => `<span><span class="sw" style="background:${c}"></span>${t}</span>`;
    let h = "";
    if (state.colorBy === "precision") h = Object.entries(PREC).map(([k, c]) => sw(c, k)).join("");
    else if (state.colorBy === "sensitivity") h = maxScore ? [0, 0.5, 1].map((t) => sw(ramp(YLORRD, t), (t * maxScore).toPrecision(2))).join("") + "<span>sensitivity score (block: its highest)</span>"
      : "<span>no analysis given: run <code>fxqat analyze</code> and pass analysis=DIR</span>";
    else if (state.colorBy === "sqnr") h = [SQNR_LO, (SQNR_LO + SQNR_HI) / 2, SQNR_HI].map((v, k) => sw(ramp(RDYLGN, k / 2), `${k === 0 ? "≤" : k === 2 ? "≥" : ""}${v} dB`)).join("") + "<span>SQNR vs FP32 (block: its lowest)</span>";
    else h = Object.entries(OPC).filter(([k]) => !["io", "other"].includes(k)).map(([k, c]) => sw(c, k)).join("");
    el.innerHTML = h + `<span class="note">${esc(D.images_note || "")}</span>`;
  }

  function dark(color) {  // white text on dark fills
    const m = color.startsWith("#") ? [1, 3, 5].map((i) => parseInt(color.slice(i, i + 2), 16)) : color.match(/\d+/g).map(Number);
    return (0.2126 * m[0] + 0.7152 * m[1] + 0.0722 * m[2]) / 255 < 0.5;
  }
  const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));

  function nodeLines(n) {
    const l1 = n.name;
    let l2 = n.target + (n.shape ? " · " + n.shape : "");
    if (n.kind === "quant" && n.quantizer && n.quantizer.scale != null) l2 = `${n.quantizer.label} · s=${n.quantizer.scale.toPrecision(3)}`;
    return n.label && n.kind !== "quant" ? [l1, l2, n.label] : [l1, l2];
  }
  function groupLines(path) {
    const g = groups[path], ids = members[path];
    const labels = new Set(ids.map((i) => nodes[i]).filter((n) => n.kind === "conv" || n.kind === "add").map((n) => n.label));
    const t = g.depth === 0 ? `${g.layer}: ${g.type}` : `${g.type} ${path.split(".").slice(-2).join(".")}`;
    return [t, `${path} · ${ids.length} nodes`, labels.size === 1 ? [...labels][0] : labels.size ? "mixed precision" : "float"];
  }
  const boxSize = (lines) => ({ w: Math.max(...lines.map((s, k) => textW(s, k === 0))) + 16, h: lines.length * 14 + 8 });

  function itemOf(id, depth) {  // the child of a container at nesting `depth` that holds node `id`
    const g = nodes[id].groups;
    return depth < g.length ? "g:" + g[depth] : "n:" + id;
  }
  function layoutContainer(path, depth) {
    const ids = path ? members[path] : nodes.map((n) => n.id);
    const inside = new Set(ids), keys = [], seen = new Map();
    for (const id of ids) { const k = itemOf(id, depth); if (!seen.has(k)) { seen.set(k, keys.length); keys.push(k); } }
    const eset = new Set(), edges = [];
    for (const id of ids) for (const p of nodes[id].inputs) {
      if (!inside.has(p)) continue;
      const a = seen.get(itemOf(p, depth)), b = seen.get(itemOf(id, depth));
      if (a !== b && !eset.has(a + ">" + b)) { eset.add(a + ">" + b); edges.push([a, b]); }
    }
    const items = keys.map((k) => {
      if (k.startsWith("g:") && open.has(k.slice(2))) {
        const sub = layoutContainer(k.slice(2), depth + 1), head = groupLines(k.slice(2))[0] + "  ▾";
        return { key: k, sub, w: Math.max(sub.w, textW(head, true) + 24) + 24, h: sub.h + 40 };
      }
      const lines = k.startsWith("g:") ? groupLines(k.slice(2)) : nodeLines(nodes[+k.slice(2)]);
      return { key: k, lines, ...boxSize(lines) };
    });
    const L = FXL.layered(items, edges);
    return { items, ...L };
  }

  function el(tag, attrs, parent) {
    const e = document.createElementNS(NS, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }
  function label(g, lines, x, y) {
    lines.forEach((s, k) => { const t = el("text", { x: x + 8, y: y + 15 + k * 14, class: k === 0 ? "b" : "m" }, g); t.textContent = s; });
  }

  function drawContainer(L, g, ox, oy) {
    for (const p of L.paths) {
      const pts = p.pts.map((q) => ({ x: q.x + ox, y: q.y + oy }));
      const e = el("path", { d: FXL.pathD(pts), class: "edge" + (p.back ? " back" : ""), "marker-end": "url(#arrow)" }, g);
      e.dataset.from = L.items[p.from].key; e.dataset.to = L.items[p.to].key;
    }
    L.items.forEach((it, i) => {
      const b = L.pos[i], x = b.x + ox, y = b.y + oy;
      if (it.sub) {
        const path = it.key.slice(2), gg = el("g", { class: "group" }, g);
        el("rect", { class: "frame", x, y, width: b.w, height: b.h, rx: 8 }, gg);
        const head = el("g", { class: "ghead" }, gg);
        el("rect", { x, y, width: b.w, height: 24, rx: 8 }, head);
        const t = el("text", { x: x + 10, y: y + 16, class: "b" }, head); t.textContent = groupLines(path)[0] + "  ▾ close";
        head.addEventListener("click", (ev) => { ev.stopPropagation(); toggle(path); });
        state.boxes.set(it.key, { x, y, w: b.w, h: b.h });
        drawContainer(it.sub, gg, x + 12 + (b.w - 24 - it.sub.w) / 2, y + 32);
        return;
      }
      const isGroup = it.key.startsWith("g:");
      const ids = isGroup ? members[it.key.slice(2)] : [+it.key.slice(2)];
      const cls = ["node"];
      if (!isGroup && state.selected === ids[0]) cls.push("sel");
      if (!isGroup && state.picked.has(nodes[ids[0]].name)) cls.push("picked");
      const gg = el("g", { class: cls.join(" ") }, g);
      gg.dataset.key = it.key;
      if (!isGroup) gg.dataset.name = nodes[ids[0]].name;
      const io = !isGroup && (nodes[ids[0]].op === "placeholder" || nodes[ids[0]].op === "output");
      const color = fill(ids);
      if (dark(color)) gg.classList.add("dark");
      el("rect", { x, y, width: b.w, height: b.h, rx: io ? b.h / 2 : isGroup ? 7 : 4, fill: color }, gg);
      if (isGroup) el("rect", { x: x + 3, y: y + 3, width: b.w - 6, height: b.h - 6, rx: 5, fill: "none", "stroke-dasharray": "2 2" }, gg);
      label(gg, it.lines, x, y);
      state.boxes.set(it.key, { x, y, w: b.w, h: b.h });
      gg.addEventListener("click", (ev) => { ev.stopPropagation(); if (state.onClick) state.onClick(it.key, ev); });
    });
  }

  let layout = null;
  function render() {
    const vp = document.getElementById("viewport");
    vp.innerHTML = "";
    state.boxes.clear();
    const svg = document.getElementById("graph");
    if (!svg.querySelector("defs")) {
      const defs = el("defs", {}, null); svg.insertBefore(defs, svg.firstChild);
      const m = el("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" }, defs);
      el("path", { d: "M0,0 L10,5 L0,10 z", fill: "#98a2b3" }, m);
    }
    layout = layoutContainer(null, 0);
    drawContainer(layout, vp, 20, 20);
    legend();
  }
  function toggle(path) { if (open.has(path)) open.delete(path); else open.add(path); render(); }
  function reveal(name) { const n = byName[name]; n.groups.forEach((g) => open.add(g)); render(); }
  function size() { return layout ? { w: layout.w + 40, h: layout.h + 40 } : { w: 0, h: 0 }; }

  return { D, nodes, byName, groups, members, open, state, render, toggle, reveal, size, esc, fill, PREC };
})();
