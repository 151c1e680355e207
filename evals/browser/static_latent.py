"""The latent page's script (assets/latent.js): one latent, loaded on demand, at latent.html#<id>.

The page holds the run's metadata and the vocabulary (data/meta.js, data/vocab.js); a latent's
record is in the data file of its block of latents, added as a <script> when first needed
(fetch() of file:// URLs is blocked in Chromium, script tags are not), so opening latent 40,000
of 64k reads one small file. Everything is built with DOM calls and textContent: token strings
from the data are never parsed as HTML. Plain ES2020, no libraries.
"""

LATENT_JS = r"""
(function () {
  "use strict";
  const t0 = performance.now(), M = window.MDIFF_META, V = window.MDIFF_VOCAB, blocks = {};
  const main = document.getElementById("latent");
  const multi = M.columns.length > 1, crosscoder = M.kind.includes("crosscoder");
  window.mdiffBlock = (b, recs) => { blocks[b] = recs; };

  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") e.textContent = v;
      else if (k === "style") e.style.cssText = v;
      else e.setAttribute(k, v);
    }
    for (const k of kids) {
      if (k !== null && k !== undefined) e.appendChild(typeof k === "string" ? document.createTextNode(k) : k);
    }
    return e;
  }
  const {num, pct} = window.MDIFF_FORMAT;
  const tok = (id) => (id >= 0 && id < V.length ? V[id] : "<id " + id + ">");
  const card = (title, ...kids) => el("div", {class: "card"}, el("h3", {text: title}), ...kids);
  const note = (text) => el("p", {class: "note", text});
  function kv(rows) {
    return el("table", {class: "kv"}, ...rows.map(([k, v, title]) =>
      el("tr", title ? {title} : {}, el("td", {text: k}), el("td", {class: "num", text: v}))));
  }
  function meterRow(label, value, max, text) {
    const w = max > 0 ? Math.max(0, Math.min(100, 100 * value / max)) : 0;
    return el("tr", {}, el("td", {text: label, style: "width:38%"}),
      el("td", {}, el("div", {class: "meter"}, el("i", {style: `width:${w}%`}))),
      el("td", {class: "num", text, style: "width:80px"}));
  }
  function histogram(h, max) {
    const W = 520, H = 140, L = 34, B = 18, n = h.counts.length;
    const shown = Math.max(1, Math.min(n, Math.ceil(max / h.range * n))), top = Math.max(1, ...h.counts);
    const ns = "http://www.w3.org/2000/svg", s = document.createElementNS(ns, "svg");
    const add = (parent, tag, a, text) => {
      const e = document.createElementNS(ns, tag);
      for (const k in a) e.setAttribute(k, a[k]);
      if (text) e.textContent = text;
      return parent.appendChild(e);
    };
    s.setAttribute("width", W); s.setAttribute("height", H); s.setAttribute("viewBox", `0 0 ${W} ${H}`);
    s.style.maxWidth = "100%";
    const bw = (W - L - 6) / shown;
    for (let i = 0; i < shown; i++) {
      const c = h.counts[i], bh = c > 0 ? Math.max(1, (H - B - 8) * Math.log1p(c) / Math.log1p(top)) : 0;
      const r = add(s, "rect", {x: L + i * bw, y: H - B - bh, width: Math.max(bw - 1, 1), height: bh,
        fill: "rgb(234,88,12)", opacity: 0.75});
      add(r, "title", {}, `[${num(i * h.range / n, 3)}, ${num((i + 1) * h.range / n, 3)}): ${c}`);
    }
    add(s, "line", {x1: L, y1: H - B, x2: W - 6, y2: H - B, stroke: "#9ca3af"});
    add(s, "text", {x: L, y: H - 4}, "0");
    add(s, "text", {x: W - 6, y: H - 4, "text-anchor": "end"}, num(shown * h.range / n, 3));
    add(s, "text", {x: 2, y: 12}, "count (log)");
    return s;
  }
  function example(ex, colMax, contrib) {
    const text = el("span", {class: "text"});
    ex.t.forEach((id, k) => {
      if (id < 0) return;  // outside the sequence
      const q = ex.a[k], act = q >= 0 ? q / 1000 * colMax : null;
      const span = el("span", {class: "tok" + (k === M.center ? " hit" : "") + (act === null ? " off" : ""),
        text: tok(id), title: `${JSON.stringify(tok(id))} (id ${id}) \u00b7 ` +
          (act === null ? "not encoded" : `activation ${num(act, 3)}`)});
      const alpha = act === null ? 0 : Math.min(1, act / (colMax || 1));
      if (alpha > 0) span.style.background = `rgba(234,88,12,${(0.08 + 0.72 * alpha).toFixed(3)})`;
      text.appendChild(span);
    });
    const ctx = M.context_length, where = `sequence ${Math.floor(ex.row / ctx)}, position ${ex.row % ctx}`;
    const val = el("span", {class: "val", title: `${where}, store row ${ex.row}`},
      num(ex.v, 3));
    if (contrib) for (const line of contrib(ex.v)) val.appendChild(el("small", {text: line}));
    return el("div", {class: "ex"}, val, text);
  }
  function header(id, r) {
    const cls = r.class.replace(/[^a-z]/gi, "") + (r.class.endsWith("-only") ? " only" : "");
    // Latent Scaling classes an exclusive latent (genuine, shrinkage, ...); the others' classes
    // (shared, other) only restate the relative norm, so they get no badge
    const nu = (r.diff.nu || []).filter((s) => (M.nu_badge_classes || []).includes(s.class))
      .map((s) => el("span", {class: "badge nu", title: `Latent Scaling, ${s.pair}`, text: "\u03bd: " + s.class}));
    return el("div", {}, el("h1", {}, `Latent ${id}`, el("span", {class: "badge " + cls, text: r.class}),
      r.dead ? el("span", {class: "badge dead", text: "dead in training"}) : null, ...nu),
      el("p", {class: "sub",
        text: [M.dictionary, M.kind, M.hook, `${M.n_rows.toLocaleString()} tokens scanned`].join(" \u00b7 ")}));
  }
  function activity(r) {
    return card("Activity", kv(r.act.flatMap((a, c) => {
      const p = multi ? M.columns[c] + ": " : "";
      return [[p + "firing density", pct(a.density), `fired on ${a.fired} of ${M.n_rows} tokens`],
              [p + "max activation", num(a.max)], [p + "mean when active", num(a.mean)]];
    })));
  }
  function modelDiff(r) {
    const d = r.diff, top = Math.max(...d.norms), norms = el("table", {class: "kv"}), rows = [];
    M.models.forEach((m, i) => norms.appendChild(meterRow("\u2016d\u2016 " + m, d.norms[i], top, num(d.norms[i]))));
    if (d.r !== undefined) {
      rows.push(["relative norm r", num(d.r), "|d_B| / (|d_A| + |d_B|) (Anthropic)"],
                ["\u0394norm (Minder et al.)", num(d.delta), "1/2 ((|d_B| - |d_A|) / max(|d_A|, |d_B|) + 1)"]);
    }
    if (d.shares) M.models.forEach((m, i) => rows.push(["share " + m, num(d.shares[i])]));
    if (d.cos !== undefined) rows.push(["decoder cosine", num(d.cos)]);
    for (const s of d.nu || []) rows.push([`\u03bd_\u03b5 ${s.pair}`, num(s.eps)], [`\u03bd_r ${s.pair}`, num(s.r)]);
    return card(M.models.length > 1 ? "Model diff" : "Decoder", norms, kv(rows),
      note("Decoder norms in normalized units (each model's rows scaled to mean norm \u221ad)."));
  }
  function whereItFires(r) {
    const box = card("Where it fires");
    for (const kind of ["source", "class"]) {
      const idx = M.groups.map((g, i) => (g.kind === kind ? i : -1)).filter((i) => i >= 0);
      if (!idx.length) continue;
      box.appendChild(note(kind === "source" ? "firing frequency by token-set source" : "by token class"));
      const t = el("table", {class: "kv"}), top = Math.max(1e-12, ...idx.flatMap((i) => r.groups[i]));
      for (const i of idx) {
        r.groups[i].forEach((f, c) => t.appendChild(
          meterRow(M.groups[i].name + (multi ? " \u00b7 " + M.columns[c] : ""), f, top, pct(f))));
      }
      box.appendChild(t);
    }
    return box;
  }
  function histograms(r) {
    const box = card("Activation histogram");
    r.act.forEach((a, c) => {
      if (a.hist.range > 0) box.appendChild(el("div", {}, multi ? note(M.columns[c]) : null, histogram(a.hist, a.max)));
    });
    return box;
  }
  function logitEffects(r) {
    const box = card("Logit effects (per unit activation)");
    if (!r.logits.length) box.appendChild(note(M.logit_note || "not computed"));
    r.logits.forEach((lg, m) => {
      if (!lg) return;
      box.appendChild(note(M.logit_models[m] + ": promoted \u00b7 suppressed"));
      const g = el("div", {class: "logits"});
      for (let k = 0; k < Math.max(lg.pos.length, lg.neg.length); k++) {
        for (const [kind, it] of [["pos", lg.pos[k]], ["neg", lg.neg[k]]]) {
          g.appendChild(!it ? el("div")
            : el("div", {class: "logit " + kind}, el("b", {text: tok(it[0])}), el("em", {text: num(it[1], 3)})));
        }
      }
      box.appendChild(g);
    });
    return box;
  }
  function examples(r) {
    const box = el("div", {}, el("h2", {text: "Examples"}));
    const contrib = crosscoder ? (v) => M.models.map((m, i) => `${m} ${num(v * r.diff.norms[i], 2)}`) : null;
    r.examples.forEach((groups, c) => {
      if (multi) box.appendChild(el("h3", {text: "on " + M.columns[c]}));
      if (!groups.length) box.appendChild(note("never active on the tokens scanned"));
      for (const g of groups) {
        const title = g.band < 0 ? "Top activations"
          : `Band ${num(g.lo, 3)} \u2013 ${num(g.hi, 3)} \u00b7 contains ${pct(g.share)} of activations`;
        const group = el("div", {class: "group"}, el("p", {class: "title", text: title}));
        if (!g.items.length) group.appendChild(note("no further context: this band's sampled ones are shown above"));
        g.items.forEach((ex) => group.appendChild(example(ex, r.act[c].max, contrib)));
        box.appendChild(group);
      }
    });
    if (crosscoder) {
      box.appendChild(note("Under each value: \u2016activation \u00d7 d_model\u2016 per model, the latent's " +
        "contribution to each model's reconstruction (normalized units)."));
    }
    return box;
  }
  function render(id, r) {
    document.title = `Latent ${id} \u00b7 ${M.title}`;
    main.replaceChildren(header(id, r), el("div", {class: "grid"}, activity(r), modelDiff(r), whereItFires(r)),
      el("div", {class: "grid", style: "margin-top:14px"}, histograms(r), logitEffects(r)), examples(r));
    document.getElementById("json").onclick = () => download(id, r);
    document.getElementById("prev").href = "#" + Math.max(0, id - 1);
    document.getElementById("next").href = "#" + Math.min(M.n_latents - 1, id + 1);
    document.getElementById("back").href = "index.html#latent-" + id;
    document.body.dataset.latent = id;
    if (!document.body.dataset.ready) document.body.dataset.ready = (performance.now() - t0).toFixed(1);
  }
  function download(id, r) {
    const rec = JSON.parse(JSON.stringify(r));
    rec.examples.forEach((groups, c) => groups.forEach((g) => g.items.forEach((ex) => {
      ex.tokens = ex.t.map((t) => (t >= 0 ? tok(t) : null));
      ex.activations = ex.a.map((q) => (q >= 0 ? q / 1000 * r.act[c].max : null));
    })));
    const doc = {latent: id, dictionary: M.dictionary, columns: M.columns, models: M.models, record: rec};
    const blob = new Blob([JSON.stringify(doc, null, 1)], {type: "application/json"});
    const a = el("a", {href: URL.createObjectURL(blob), download: `${M.dictionary}-latent-${id}.json`});
    document.body.appendChild(a);
    a.click();
    a.remove();
  }
  function fail(text) {
    main.replaceChildren(el("p", {class: "error", text}));
    document.body.dataset.latent = "error";
  }
  function route() {
    const raw = location.hash.slice(1), id = parseInt(raw, 10);
    if (!(id >= 0 && id < M.n_latents)) {
      return fail(`No latent ${JSON.stringify(raw)}: give an id from 0 to ${M.n_latents - 1}, e.g. latent.html#0.`);
    }
    document.getElementById("q").value = id;
    const b = Math.floor(id / M.block_size), show = () => render(id, blocks[b][id - b * M.block_size]);
    if (blocks[b]) return show();
    const s = el("script", {src: "data/" + M.block_files[b]});
    s.onload = show;
    s.onerror = () => fail(`Could not load data/${M.block_files[b]} ` +
      `(latents ${b * M.block_size}\u2013${(b + 1) * M.block_size - 1}).`);
    document.head.appendChild(s);
  }
  const q = document.getElementById("q");
  q.addEventListener("keydown", (e) => { if (e.key === "Enter") location.hash = "#" + parseInt(q.value, 10); });
  document.addEventListener("keydown", (e) => {
    if (e.target.tagName === "INPUT") return;
    const id = parseInt(location.hash.slice(1), 10) || 0;
    if (e.key === "ArrowLeft" && id > 0) location.hash = "#" + (id - 1);
    if (e.key === "ArrowRight" && id < M.n_latents - 1) location.hash = "#" + (id + 1);
  });
  window.addEventListener("hashchange", route);
  if (!location.hash) location.hash = "#0";
  else route();
})();
"""
