/* fxqat explorer: layered (Sugiyama-style) layout of a compound graph, in plain JS.
   A container (the root or an open block) lays out its children: nodes, closed blocks (one box) and open blocks
   (laid out recursively first, then placed as one big box). Long edges get dummy vertices so they route between
   boxes; vertex order per layer comes from barycenter sweeps; x positions from isotonic regression (PAV) toward
   the neighbours' mean, which keeps chains straight. */
"use strict";
const FXL = (function () {
  const GAP_X = 22, GAP_Y = 34, DUMMY_W = 6;

  function rankOf(n, preds) {
    const rank = new Array(n).fill(0);
    for (let i = 0; i < n; i++) for (const p of preds[i]) rank[i] = Math.max(rank[i], rank[p] + 1);
    // sources sit just above their first consumer (the image input next to layer 0, not at the top by default)
    for (let i = n - 1; i >= 0; i--) {
      if (preds[i].length) continue;
      let m = Infinity;
      for (let j = 0; j < n; j++) if (preds[j].includes(i)) m = Math.min(m, rank[j] - 1);
      if (m !== Infinity && m > rank[i]) rank[i] = m;
    }
    return rank;
  }

  function pav(target, offs) {  // minimize sum (x_i - target_i)^2 s.t. x_{i+1} - x_i >= offs_{i+1} - offs_i
    const blocks = [];
    for (let i = 0; i < target.length; i++) {
      blocks.push({ sum: target[i] - offs[i], n: 1 });
      while (blocks.length > 1) {
        const b = blocks[blocks.length - 1], a = blocks[blocks.length - 2];
        if (a.sum / a.n <= b.sum / b.n) break;
        a.sum += b.sum; a.n += b.n; blocks.pop();
      }
    }
    const out = []; let i = 0;
    for (const b of blocks) for (let k = 0; k < b.n; k++, i++) out.push(b.sum / b.n + offs[i]);
    return out;
  }

  /* items: [{key, w, h}] in topological order; edges: [[a, b]] as item indices. Returns {w, h, pos, paths}. */
  function layered(items, edges) {
    const n = items.length;
    const preds = items.map(() => []), fwd = [], back = [];
    for (const [a, b] of edges) {
      if (a === b) continue;
      if (a < b) { preds[b].push(a); fwd.push([a, b]); } else { preds[a].push(b); back.push([a, b]); }
    }
    const rank = rankOf(n, preds);
    const V = items.map((it, i) => ({ w: it.w, h: it.h, rank: rank[i], up: [], down: [], x: 0, real: i }));
    const chains = [];
    for (const [a, b] of fwd.concat(back.map(([a, b]) => [b, a]))) {
      let prev = a; const chain = [a];
      for (let r = V[a].rank + 1; r < V[b].rank; r++) {
        const d = V.length; V.push({ w: DUMMY_W, h: 0, rank: r, up: [prev], down: [], x: 0, real: -1 });
        V[prev].down.push(d); chain.push(d); prev = d;
      }
      V[prev].down.push(b); V[b].up.push(prev); chain.push(b);
      chains.push({ chain, back: back.some(([x, y]) => x === b && y === a) });
    }
    const nr = Math.max(0, ...V.map((v) => v.rank)) + 1;
    const layers = Array.from({ length: nr }, () => []);
    V.forEach((v, i) => layers[v.rank].push(i));
    const order = new Array(V.length);
    const renumber = () => layers.forEach((L) => L.forEach((v, k) => { order[v] = k; }));
    renumber();
    const bary = (v, dir) => {
      const nb = dir ? V[v].up : V[v].down;
      return nb.length ? nb.reduce((s, u) => s + order[u], 0) / nb.length : order[v];
    };
    for (let it = 0; it < 8; it++) {  // barycenter sweeps, down then up
      const down = it % 2 === 0;
      const rs = down ? [...Array(nr).keys()].slice(1) : [...Array(nr).keys()].reverse().slice(1);
      for (const r of rs) {
        const b = new Map(layers[r].map((v) => [v, bary(v, down)]));
        layers[r].sort((p, q) => b.get(p) - b.get(q) || order[p] - order[q]);
        layers[r].forEach((v, k) => { order[v] = k; });
      }
    }
    const offsOf = (L) => { const o = [0]; for (let k = 1; k < L.length; k++) o.push(o[k - 1] + (V[L[k - 1]].w + V[L[k]].w) / 2 + GAP_X); return o; };
    layers.forEach((L) => { const o = offsOf(L); L.forEach((v, k) => { V[v].x = o[k]; }); });
    for (let it = 0; it < 12; it++) {  // pull every vertex toward its neighbours' mean, keeping the order and gaps
      const down = it % 2 === 0;
      const rs = down ? [...Array(nr).keys()] : [...Array(nr).keys()].reverse();
      for (const r of rs) {
        const L = layers[r];
        const t = L.map((v) => {
          const nb = (down ? V[v].up : V[v].down).concat(it > 6 ? (down ? V[v].down : V[v].up) : []);
          return nb.length ? nb.reduce((s, u) => s + V[u].x, 0) / nb.length : V[v].x;
        });
        pav(t, offsOf(L)).forEach((x, k) => { V[L[k]].x = x; });
      }
    }
    let minX = Infinity, maxX = -Infinity;
    V.forEach((v) => { minX = Math.min(minX, v.x - v.w / 2); maxX = Math.max(maxX, v.x + v.w / 2); });
    const ys = []; let y = 0;
    layers.forEach((L, r) => { ys[r] = y; y += Math.max(0, ...L.map((v) => V[v].h)) + GAP_Y; });
    const layerH = layers.map((L) => Math.max(0, ...L.map((v) => V[v].h)));
    const pos = items.map((it, i) => {
      const v = V[i];
      return { x: v.x - v.w / 2 - minX, y: ys[v.rank] + (layerH[v.rank] - v.h) / 2, w: v.w, h: v.h };
    });
    const paths = chains.map(({ chain, back: isBack }) => {
      const pts = chain.map((v, k) => {
        if (V[v].real < 0) return { x: V[v].x - minX, y: ys[V[v].rank] + layerH[V[v].rank] / 2, dummy: true };
        const p = pos[v];
        return { x: p.x + p.w / 2, y: k === 0 ? p.y + p.h : p.y, v };
      });
      return { pts, back: isBack, from: chain[0], to: chain[chain.length - 1] };
    });
    spreadPorts(paths, pos);
    return { w: n ? maxX - minX : 0, h: Math.max(0, y - GAP_Y), pos, paths };
  }

  function spreadPorts(paths, pos) {  // fan several edges out along a box's top / bottom side
    const ins = new Map(), outs = new Map();
    for (const p of paths) {
      if (!ins.has(p.to)) ins.set(p.to, []); ins.get(p.to).push(p);
      if (!outs.has(p.from)) outs.set(p.from, []); outs.get(p.from).push(p);
    }
    const spread = (m, endIdx, nbIdx) => m.forEach((list, v) => {
      if (list.length < 2) return;
      const b = pos[v];
      list.sort((a, c) => a.pts[nbIdx(a)].x - c.pts[nbIdx(c)].x);
      list.forEach((p, k) => { p.pts[endIdx(p)].x = b.x + b.w * (k + 1) / (list.length + 1); });
    });
    spread(ins, (p) => p.pts.length - 1, (p) => p.pts.length - 2);
    spread(outs, () => 0, () => 1);
  }

  function pathD(pts) {
    let d = `M${pts[0].x.toFixed(1)},${pts[0].y.toFixed(1)}`;
    for (let k = 1; k < pts.length; k++) {
      const a = pts[k - 1], b = pts[k], dy = (b.y - a.y) / 2;
      d += `C${a.x.toFixed(1)},${(a.y + dy).toFixed(1)} ${b.x.toFixed(1)},${(b.y - dy).toFixed(1)} ${b.x.toFixed(1)},${b.y.toFixed(1)}`;
    }
    return d;
  }

  return { layered, pathD, GAP_X, GAP_Y };
})();
