"""The index page's script (assets/index.js): every latent in one sortable, filterable table.

Only the rows in view exist in the document (a virtualized list of fixed-height rows inside a
spacer as tall as the whole table), so 64k latents open as fast as 64. The table's columns come
columnar from data/index.js; sorting and filtering work on index arrays. The page's state lives
in the URL fragment (#sort=-density&class=shared&live=1), so a view can be linked; #latent-123
scrolls to latent 123 and highlights it. Plain ES2020, no libraries: it must run from file://.
"""

INDEX_JS = r"""
(function () {
  "use strict";
  const M = window.MDIFF_META, D = window.MDIFF_INDEX, F = window.MDIFF_FORMAT;
  const t0 = performance.now();
  const ROW = 28, n = M.n_latents, cols = D.columns;
  const $ = (id) => document.getElementById(id);
  const byKey = {};
  cols.forEach((c) => {
    byKey[c.key] = c;
    if (c.kind === "num") c.num = Float64Array.from(c.values, (v) => (v === null ? NaN : v));
  });
  const clsCol = byKey["class"], deadCol = byKey["dead"], densCol = byKey[D.density_key];
  const state = {sort: D.default_sort, desc: D.default_desc, cls: "", live: false, focus: -1};
  let view = new Int32Array(0);

  function fmt(c, v) {
    if (c.kind === "cat") return c.cats[v];
    if (c.kind === "int") return String(v);
    return c.pct ? F.pct(v) : F.num(v);
  }
  function readHash() {
    const h = decodeURIComponent(location.hash.slice(1));
    const m = /^latent-(\d+)$/.exec(h);
    if (m) { state.focus = +m[1]; state.cls = ""; state.live = false; return; }
    const p = new URLSearchParams(h);
    const s = p.get("sort");
    if (s && byKey[s.replace(/^[-+]/, "")]) { state.desc = s[0] === "-"; state.sort = s.replace(/^[-+]/, ""); }
    state.cls = p.get("class") || "";
    state.live = p.get("live") === "1";
  }
  function writeHash() {
    const p = new URLSearchParams();
    p.set("sort", (state.desc ? "-" : "") + state.sort);
    if (state.cls) p.set("class", state.cls);
    if (state.live) p.set("live", "1");
    history.replaceState(null, "", "#" + p.toString());
  }
  function keep(i) {
    if (state.cls && clsCol.cats[clsCol.values[i]] !== state.cls) return false;
    if (state.live && ((deadCol && deadCol.values[i]) || (densCol && !(densCol.num[i] > 0)))) return false;
    return true;
  }
  function apply() {
    const ids = [];
    for (let i = 0; i < n; i++) if (keep(i)) ids.push(i);
    const c = byKey[state.sort], dir = state.desc ? -1 : 1;
    let cmp;
    if (c.kind === "num") {
      const v = c.num;
      cmp = (a, b) => {
        const x = v[a], y = v[b], nx = Number.isNaN(x), ny = Number.isNaN(y);
        if (nx || ny) return nx === ny ? a - b : (nx ? 1 : -1);  // missing values last either way
        return x === y ? a - b : (x < y ? -dir : dir);
      };
    } else if (c.kind === "cat") {
      const v = c.values, names = c.cats;
      cmp = (a, b) => names[v[a]].localeCompare(names[v[b]]) * dir || a - b;
    } else {
      const v = c.values;
      cmp = v ? (a, b) => (v[a] - v[b]) * dir || a - b : (a, b) => (a - b) * dir;
    }
    ids.sort(cmp);
    view = Int32Array.from(ids);
    $("vspace").style.height = view.length * ROW + "px";
    $("count").textContent = view.length === n ? `${n.toLocaleString()} latents`
      : `${view.length.toLocaleString()} of ${n.toLocaleString()} latents`;
    document.querySelectorAll("#thead button").forEach((b) => {
      b.setAttribute("aria-sort", b.dataset.key === state.sort ? (state.desc ? "descending" : "ascending") : "none");
    });
    render();
  }
  function cell(c, i) {
    const s = document.createElement("span");
    const v = c.kind === "num" ? c.num[i] : (c.values ? c.values[i] : i);
    if (c.kind === "cat") {
      const b = document.createElement("span");
      b.className = "cls " + c.cats[v].replace(/[^a-z]/gi, "") + (c.cats[v].endsWith("-only") ? " only" : "");
      b.textContent = c.cats[v];
      s.appendChild(b);
    } else {
      s.textContent = c.key === "id" ? String(i) : fmt(c, v);
      s.className = "num" + (c.kind === "num" && Number.isNaN(v) ? " nan" : "");
    }
    return s;
  }
  function render() {
    const vp = $("viewport"), top = vp.scrollTop, h = vp.clientHeight || 600;
    const first = Math.max(0, Math.floor(top / ROW) - 8);
    const last = Math.min(view.length, Math.ceil((top + h) / ROW) + 8);
    const rows = $("rows"), frag = document.createDocumentFragment();
    rows.style.transform = `translateY(${first * ROW}px)`;
    for (let k = first; k < last; k++) {
      const i = view[k], a = document.createElement("a");
      a.className = "row" + (i === state.focus ? " focus" : "");
      a.href = "latent.html#" + i;
      a.dataset.latent = i;
      for (const c of D.shown) a.appendChild(cell(byKey[c], i));
      frag.appendChild(a);
    }
    rows.replaceChildren(frag);
  }
  function focus(i) {
    state.focus = i;
    const k = view.indexOf(i);
    if (k >= 0) $("viewport").scrollTop = Math.max(0, k * ROW - 3 * ROW);
    render();
  }
  function build() {
    const head = $("thead");
    document.documentElement.style.setProperty("--cols", D.shown.map((k) => byKey[k].width || "1fr").join(" "));
    for (const k of D.shown) {
      const c = byKey[k], b = document.createElement("button");
      b.textContent = c.label;
      b.title = c.title || c.label;
      b.dataset.key = k;
      if (c.kind !== "cat") b.className = "num";
      b.addEventListener("click", () => {
        state.desc = state.sort === k ? !state.desc : c.kind === "num";
        state.sort = k;
        writeHash();
        apply();
      });
      head.appendChild(b);
    }
    const sel = $("cls");
    for (const [name, count] of D.class_counts) {
      const o = document.createElement("option");
      o.value = name;
      o.textContent = `${name} (${count.toLocaleString()})`;
      sel.appendChild(o);
    }
    sel.addEventListener("change", () => { state.cls = sel.value; writeHash(); apply(); });
    $("live").addEventListener("change", (e) => { state.live = e.target.checked; writeHash(); apply(); });
    const q = $("q");
    q.addEventListener("input", () => {
      const i = parseInt(q.value, 10);
      q.setCustomValidity(q.value && !(i >= 0 && i < n) ? "no such latent" : "");
      if (i >= 0 && i < n) focus(i);
    });
    q.addEventListener("keydown", (e) => {
      const i = parseInt(q.value, 10);
      if (e.key === "Enter" && i >= 0 && i < n) location.href = "latent.html#" + i;
    });
    $("viewport").addEventListener("scroll", () => requestAnimationFrame(render), {passive: true});
    window.addEventListener("resize", render);
    window.addEventListener("hashchange", () => {
      readHash();
      sync();
      apply();
      if (state.focus >= 0) focus(state.focus);
    });
  }
  function sync() { $("cls").value = state.cls; $("live").checked = state.live; }
  build();
  readHash();
  sync();
  apply();
  if (state.focus >= 0) focus(state.focus);
  document.body.dataset.ready = (performance.now() - t0).toFixed(1);
})();
"""
