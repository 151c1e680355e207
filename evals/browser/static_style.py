"""The browser's stylesheet (assets/browser.css), shared by the index and the latent page.

Kept as a Python string so that it ships with the package like any module (no package-data
rules) and the pages stay plain files that open from disk with nothing else installed.
"""

CSS = r"""
:root{--ink:#1f2937;--muted:#6b7280;--line:#e5e7eb;--soft:#f8fafc;--accent:#2563eb;--hot:234,88,12;
  --pos:#15803d;--neg:#b91c1c;--mono:ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono",monospace}
*{box-sizing:border-box}
html,body{margin:0;padding:0}
body{font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:var(--ink);
  background:#fff}
a{color:var(--accent);text-decoration:none}a:hover{text-decoration:underline}
header.top{position:sticky;top:0;z-index:5;background:rgba(255,255,255,.96);border-bottom:1px solid var(--line);
  backdrop-filter:blur(4px)}
header.top .bar{max-width:1240px;margin:0 auto;padding:10px 20px;display:flex;gap:14px;align-items:center;
  flex-wrap:wrap}
header.top .brand{font-weight:650;letter-spacing:-.01em}
header.top .brand small{font-weight:400;color:var(--muted);margin-left:6px}
.spacer-flex{flex:1}
main{max-width:1240px;margin:0 auto;padding:18px 20px 48px}
h1{font-size:24px;margin:6px 0 2px;letter-spacing:-.015em}
h2{font-size:16px;margin:26px 0 10px;letter-spacing:-.01em}
h3{font-size:13px;margin:0 0 8px;color:var(--muted);font-weight:600;text-transform:uppercase;letter-spacing:.04em}
.sub{color:var(--muted);margin:0 0 14px}
input[type=search],input[type=text],select{font:inherit;padding:5px 9px;border:1px solid #d1d5db;border-radius:7px;
  background:#fff;color:var(--ink)}
input[type=search]{width:210px}
button,.btn{font:inherit;padding:5px 11px;border:1px solid #d1d5db;border-radius:7px;background:#fff;color:var(--ink);
  cursor:pointer}
button:hover,.btn:hover{background:var(--soft);text-decoration:none}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(330px,1fr));gap:14px}
.card{border:1px solid var(--line);border-radius:10px;padding:12px 14px;background:#fff}
.kv{width:100%;border-collapse:collapse}
.kv td{padding:3px 0;border-bottom:1px dashed #eef0f3;vertical-align:top}
.kv td.num{text-align:right;font-variant-numeric:tabular-nums;font-family:var(--mono);font-size:12.5px}
.kv tr:last-child td{border-bottom:0}
.note{color:var(--muted);font-size:12.5px}
.badge{display:inline-block;padding:1px 8px;border-radius:999px;font-size:12px;font-weight:600;
  background:#eef2ff;color:#3730a3;margin-left:6px;vertical-align:middle}
.badge.dead{background:#fee2e2;color:#991b1b}.badge.shared{background:#ecfdf5;color:#065f46}
.badge.nu{background:#fef3c7;color:#92400e}
.meter{height:8px;border-radius:4px;background:#dbeafe;position:relative;min-width:2px}
.meter>i{position:absolute;left:0;top:0;bottom:0;border-radius:4px;background:var(--accent)}
.figs{display:flex;flex-wrap:wrap;gap:10px}
.figs figure{margin:0;border:1px solid var(--line);border-radius:10px;padding:6px;background:#fff}
.summary td{padding:2px 14px 2px 0}.summary td:first-child{color:var(--muted)}
/* the index table */
.controls{display:flex;gap:10px;align-items:center;flex-wrap:wrap;margin:12px 0}
.table{border:1px solid var(--line);border-radius:10px;overflow:hidden}
.thead,.row{display:grid;grid-template-columns:var(--cols);align-items:center}
.thead{background:var(--soft);border-bottom:1px solid var(--line);font-weight:600;font-size:12.5px}
.thead button{border:0;border-radius:0;background:none;padding:8px 10px;text-align:left;font-weight:600;
  white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.thead button.num{text-align:right}
.thead button[aria-sort=ascending]::after{content:" \25B2";color:var(--accent)}
.thead button[aria-sort=descending]::after{content:" \25BC";color:var(--accent)}
.viewport{height:min(70vh,calc(100vh - 230px));min-height:240px;overflow-y:auto;position:relative}
.vspace{position:relative;width:100%}
.rows{position:absolute;left:0;right:0;top:0;will-change:transform}
.row{height:28px;border-bottom:1px solid #f1f3f6;color:var(--ink);font-size:13px}
.row:hover{background:#f5f8ff;text-decoration:none}
.row.focus{background:#fff7ed;box-shadow:inset 3px 0 0 rgb(var(--hot))}
.row>span{padding:0 10px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.row>span.num{text-align:right;font-family:var(--mono);font-size:12px;font-variant-numeric:tabular-nums}
.row>span.nan{color:#c0c4cc}
.cls{display:inline-block;padding:0 7px;border-radius:999px;font-size:11.5px;background:#eef2ff;color:#3730a3}
.cls.dead{background:#fee2e2;color:#991b1b}.cls.shared{background:#ecfdf5;color:#065f46}
.cls.only,.badge.only{background:#fff7ed;color:#9a3412}
/* examples */
.group{margin:14px 0 6px}
.group .title{font-size:12.5px;font-weight:600;color:var(--muted);margin:0 0 4px}
.ex{display:flex;gap:10px;align-items:baseline;padding:3px 0;border-bottom:1px solid #f3f4f6}
.ex .val{flex:0 0 118px;text-align:right;font-family:var(--mono);font-size:12px;color:#9a3412}
.ex .val small{display:block;color:var(--muted);font-size:10.5px;line-height:1.3;white-space:nowrap;overflow:hidden;
  text-overflow:ellipsis}
.ex .text{font-family:var(--mono);font-size:12.5px;line-height:1.95;white-space:pre-wrap;word-break:break-all}
.tok{white-space:pre;border-radius:3px;padding:1px 0;box-shadow:inset -1px 0 0 rgba(15,23,42,.10)}
.tok.hit{outline:1.5px solid rgb(var(--hot));outline-offset:-1px;font-weight:650}
.tok.off{color:#9ca3af}
.logits{display:grid;grid-template-columns:1fr 1fr;gap:4px 18px}
.logit{display:flex;justify-content:space-between;font-family:var(--mono);font-size:12px;padding:1px 6px;
  border-radius:4px}
.logit.pos{background:#f0fdf4}.logit.neg{background:#fef2f2}
.logit b{font-weight:500;white-space:pre;overflow:hidden;text-overflow:ellipsis;max-width:70%}
.logit.pos em{color:var(--pos);font-style:normal}.logit.neg em{color:var(--neg);font-style:normal}
.tabs{display:flex;gap:6px;margin:0 0 6px}
.tabs button[aria-pressed=true]{background:var(--ink);color:#fff;border-color:var(--ink)}
.error{background:#fef2f2;color:#991b1b;border:1px solid #fecaca;border-radius:8px;padding:10px 12px}
svg text{font:11px system-ui,sans-serif;fill:#374151}
"""
