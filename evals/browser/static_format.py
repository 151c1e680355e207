"""How both browser pages write numbers (assets/format.js), in one place so that the index and the
latent pages agree and the rule can be tested in a real browser.

Numbers get `d` significant digits with trailing zeros after the decimal point dropped (0.5000
reads 0.5); zeros before it are digits (10.4 to 2 digits is 10, not 1). Magnitudes outside
[1e-3, 1e5) are written in exponent form; fractions as percentages with 3 digits."""

FORMAT_JS = r"""
(function () {
  "use strict";
  function num(v, d = 4) {
    if (v === null || v === undefined || Number.isNaN(v)) return "\u2013";
    const a = Math.abs(v);
    if (a === 0) return "0";
    if (a < 1e-3 || a >= 1e5) return v.toExponential(2);
    const s = v.toPrecision(d);
    return s.includes(".") && !s.includes("e") ? s.replace(/0+$/, "").replace(/\.$/, "") : s;
  }
  function pct(v) {
    if (v === null || v === undefined || Number.isNaN(v)) return "\u2013";
    if (v === 0) return "0%";
    return v > 0 && v < 1e-4 ? (100 * v).toExponential(1) + "%" : (100 * v).toPrecision(3) + "%";
  }
  window.MDIFF_FORMAT = {num, pct};
})();
"""
