// Case report viewer: slice scroller, window presets, SVG boxes, threshold, findings, FROC.
// Plain script (no modules, no fetch): the data is the inline JSON block, so file:// works.
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("report-data").textContent);
  var SVG = "http://www.w3.org/2000/svg";
  var PRELOAD = 3;  // slices loaded on each side of the current one
  var DISPLAY_W = 512;  // CSS px of the picture's width
  var $ = function (id) { return document.getElementById(id); };
  var img = $("slice-img"), overlay = $("overlay"), range = $("slice-range");
  var thresh = $("thresh"), viewer = $("viewer");
  var state = { index: 0, preset: D.presets[0].key, thr: 0 };
  var cache = {};  // image URL -> Image being loaded or loaded, current slice +- PRELOAD only
  window.reportRequested = [];  // every picture URL the page asked for, in order (for checks)
  var predicted = {};
  D.predicted.forEach(function (n) { predicted[n] = true; });
  var bySlice = {};  // slice number -> detections
  D.detections.forEach(function (d, i) {
    d.id = i;
    (bySlice[d.s] = bySlice[d.s] || []).push(d);
  });

  function el(tag, attrs, parent, ns) {
    var e = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (parent) parent.appendChild(e);
    return e;
  }
  function text(parent, tag, s, attrs) { var e = el(tag, attrs, parent); e.textContent = s; return e; }
  function url(i, preset) { return D.image_dir + "/" + preset + "/" + D.files[i]; }
  function shown(d) { return d.score >= state.thr; }

  // ---------------------------------------------------------------- header, layout
  $("case-name").textContent = D.case;
  $("case-info").textContent = D.kind + " \u00b7 " + D.slices.length + " slices (" +
    D.predicted.length + " predicted) \u00b7 " + D.width + " \u00d7 " + D.height + " px \u00b7 " +
    D.spacing[0] + " \u00d7 " + D.spacing[1] + " mm/px \u00b7 " + D.slice_interval +
    " mm between slices \u00b7 " + D.detections.length + " detections, " + D.findings.length +
    " findings";
  D.warnings.forEach(function (w) { text($("warnings"), "li", w); });
  var aspect = (D.height * D.spacing[1]) / (D.width * D.spacing[0]);  // square mm on screen
  viewer.style.width = DISPLAY_W + "px";
  viewer.style.height = Math.round(DISPLAY_W * aspect) + "px";
  overlay.setAttribute("viewBox", "0 0 " + D.width + " " + D.height);
  range.max = D.slices.length - 1;
  var legend = $("legend");
  function swatch(color, dash, label) {
    var s = el("span", { "class": "sw" }, legend);
    s.style.borderTop = "2px " + (dash ? "dashed " : "solid ") + color;
    legend.appendChild(document.createTextNode(label));
  }
  if (D.has_gt) {
    swatch("#ffd400", false, "hit (IoU \u2265 " + D.hit_iou + ")");
    swatch("#ff3030", true, "false positive");
    swatch("#ff3030", false, "detection, slice not annotated");
    swatch("#30ff30", false, "lesion found");
    swatch("#ff30ff", true, "lesion missed");
  } else {
    swatch("#ff3030", false, "detection (score, F = finding)");
  }

  // ---------------------------------------------------------------- presets
  D.presets.forEach(function (p, k) {
    var b = text($("presets"), "button", p.label, { "type": "button", "data-preset": p.key,
      "title": "HU " + p.window[0] + " to " + p.window[1] + " (key " + (k + 1) + ")" });
    b.addEventListener("click", function () { setPreset(p.key); });
  });
  function markPreset(key) {
    state.preset = key;
    Array.prototype.forEach.call($("presets").children, function (b) {
      b.classList.toggle("active", b.getAttribute("data-preset") === key);
    });
  }
  function setPreset(key) {
    markPreset(key);
    cache = {};
    showImage();
  }

  // ---------------------------------------------------------------- slices
  function showImage() {
    var i = state.index, keep = {};
    img.src = url(i, state.preset);
    window.reportRequested.push(img.src);
    // lazy: only the current slice and PRELOAD on each side are requested
    for (var j = Math.max(0, i - PRELOAD); j <= Math.min(D.slices.length - 1, i + PRELOAD); j++) {
      var u = url(j, state.preset);
      keep[u] = cache[u] || new Image();
      if (!cache[u]) {
        keep[u].src = u;
        window.reportRequested.push(keep[u].src);
      }
    }
    cache = keep;
  }
  function goTo(i) {
    i = Math.max(0, Math.min(D.slices.length - 1, i));
    state.index = i;
    range.value = i;
    var n = D.slices[i];
    $("slice-label").textContent = "slice " + n + " (" + (i + 1) + " / " + D.slices.length + ")" +
      (predicted[n] ? "" : " \u00b7 not predicted") + (D.gt[n] ? " \u00b7 annotated" : "");
    document.body.setAttribute("data-slice", n);
    document.body.setAttribute("data-index", i);
    showImage();
    drawOverlay();
    Array.prototype.forEach.call(document.querySelectorAll("#findings tbody tr[data-finding]"), function (r) {
      var f = D.findings[+r.getAttribute("data-finding")];
      r.classList.toggle("current", n >= f.slice_first && n <= f.slice_last);
    });
  }

  // ---------------------------------------------------------------- overlay
  function rect(box, cls) {
    return el("rect", { "class": cls, "x": box[0], "y": box[1], "width": box[2] - box[0],
      "height": box[3] - box[1] }, overlay, SVG);
  }
  function gtHits(n) {  // lesion index -> hit by a detection shown at the threshold
    var hit = {};
    (bySlice[n] || []).forEach(function (d) {
      if (shown(d) && d.match) d.match.forEach(function (g) { hit[g] = true; });
    });
    return hit;
  }
  function drawOverlay() {
    var n = D.slices[state.index], dets = bySlice[n] || [], lesions = D.gt[n];
    while (overlay.firstChild) overlay.removeChild(overlay.firstChild);
    var fs = Math.max(6, D.width / 40);  // label size in image pixels
    if (lesions) {
      var hit = gtHits(n);
      lesions.forEach(function (b, g) {
        rect(b, "gt " + (hit[g] ? "hit" : "miss")).setAttribute("data-gt", g);
      });
    }
    var count = 0;
    dets.forEach(function (d) {
      var cls = "det" + (d.match ? (d.match.length ? " tp" : " fp") : "") + (shown(d) ? "" : " off");
      var r = rect(d.box, cls);
      r.setAttribute("data-det", d.id);
      r.setAttribute("data-score", d.score);
      var t = el("text", { "class": "lbl" + (shown(d) ? "" : " off"), "x": d.box[0],
        "y": Math.max(fs, d.box[1] - 2), "font-size": fs }, overlay, SVG);
      t.textContent = (d.finding >= 0 ? "F" + d.finding + " " : "") + d.score.toFixed(2) +
        (d.label ? " " + d.label : "");
      if (shown(d)) count++;
    });
    $("shown-count").textContent = count + " of " + dets.length +
      " detections shown on this slice (score \u2265 " + state.thr.toFixed(2) + ")";
  }

  // ---------------------------------------------------------------- threshold
  function gtSummary() {
    if (!D.has_gt) return;
    var lesions = 0, hits = 0, fps = 0, slices = Object.keys(D.gt);
    slices.forEach(function (n) {
      var hit = gtHits(+n);
      lesions += D.gt[n].length;
      hits += Object.keys(hit).length;
      (bySlice[n] || []).forEach(function (d) { if (shown(d) && !d.match.length) fps++; });
    });
    var s = $("gt-summary");
    s.textContent = "Ground truth: " + hits + " of " + lesions + " lesions hit, " + fps +
      " false positives on " + slices.length + " annotated slices (score \u2265 " +
      state.thr.toFixed(2) + ")";
    s.setAttribute("data-hits", hits);
    s.setAttribute("data-lesions", lesions);
    s.setAttribute("data-fps", fps);
  }
  function setThreshold(v) {
    state.thr = v;
    $("thresh-value").textContent = v.toFixed(2);
    Array.prototype.forEach.call(document.querySelectorAll("#findings tbody tr[data-finding]"), function (r) {
      r.classList.toggle("below", D.findings[+r.getAttribute("data-finding")].best_score < v);
    });
    drawOverlay();
    gtSummary();
  }
  thresh.addEventListener("input", function () { setThreshold(parseFloat(thresh.value)); });

  // ---------------------------------------------------------------- findings table
  var tbody = document.querySelector("#findings tbody");
  D.findings.forEach(function (f, k) {
    var r = el("tr", { "data-finding": k, "title": "go to slice " + f.best_slice }, tbody);
    [f.finding_id, f.slice_first + "\u2013" + f.slice_last, f.extent_mm.toFixed(1),
      f.largest_diameter_mm.toFixed(1), f.best_score.toFixed(3), f.best_slice
    ].forEach(function (v, c) { text(r, "td", String(v), c > 1 ? { "class": "num" } : {}); });
    r.addEventListener("click", function () {
      goTo(D.slices.indexOf(f.best_slice));
      viewer.focus();
    });
  });
  if (!D.findings.length) text(el("tr", {}, tbody), "td", "no finding", { "colspan": 6 });

  // ---------------------------------------------------------------- FROC (drawn from numbers)
  function drawFroc(fr) {
    var panel = $("froc-panel");
    text(panel, "h2", "FROC of this case");
    text(panel, "p", fr.num_gt + " lesions on " + fr.num_images + " annotated slices; " +
      "sensitivity at " + Object.keys(fr.at).map(function (k) {
        return k + " FP: " + fr.at[k].toFixed(2);
      }).join(", "));
    var W = 320, H = 200, L = 36, B = 28, xmax = 1;
    fr.fp.forEach(function (v) { xmax = Math.max(xmax, v); });
    Object.keys(fr.at).forEach(function (k) { xmax = Math.max(xmax, +k); });
    var svg = el("svg", { "id": "froc", "width": W, "height": H, "viewBox": "0 0 " + W + " " + H },
      panel, SVG);
    var X = function (v) { return L + (W - L - 8) * v / xmax; };
    var Y = function (v) { return H - B - (H - B - 8) * v; };
    el("path", { "d": "M" + L + " 8V" + (H - B) + "H" + (W - 8), "stroke": "#222", "fill": "none" },
      svg, SVG);
    [0, 0.5, 1].forEach(function (v) {
      var t = el("text", { "x": 4, "y": Y(v) + 4 }, svg, SVG); t.textContent = v.toFixed(1);
    });
    [0, xmax / 2, xmax].forEach(function (v) {
      var t = el("text", { "x": X(v) - 6, "y": H - B + 14 }, svg, SVG); t.textContent = +v.toFixed(1);
    });
    var lab = el("text", { "x": W / 2 - 40, "y": H - 2 }, svg, SVG);
    lab.textContent = "FPs per slice";
    var d = "M" + X(0) + " " + Y(0);
    fr.fp.forEach(function (v, k) { d += "L" + X(v) + " " + Y(fr.sens[k]); });
    el("path", { "d": d, "stroke": "#c00", "stroke-width": 2, "fill": "none", "class": "curve" },
      svg, SVG);
  }
  if (D.froc) drawFroc(D.froc);

  // ---------------------------------------------------------------- input
  range.addEventListener("input", function () { goTo(parseInt(range.value, 10)); });
  viewer.addEventListener("wheel", function (e) {
    e.preventDefault();  // the wheel scrolls slices, not the page
    if (e.deltaY) goTo(state.index + (e.deltaY > 0 ? 1 : -1));
  }, { passive: false });
  document.addEventListener("keydown", function (e) {
    if (e.target.tagName === "INPUT" || e.altKey || e.ctrlKey || e.metaKey) return;
    var step = { ArrowDown: 1, ArrowRight: 1, ArrowUp: -1, ArrowLeft: -1, PageDown: 10,
      PageUp: -10 }[e.key];
    if (step) goTo(state.index + step);
    else if (e.key === "Home") goTo(0);
    else if (e.key === "End") goTo(D.slices.length - 1);
    else if (D.presets[+e.key - 1]) setPreset(D.presets[+e.key - 1].key);
    else return;
    e.preventDefault();
  });

  // ---------------------------------------------------------------- start
  function ready() {
    img.removeEventListener("load", ready);
    window.reportReadyMs = performance.now();  // ms since navigation start
    window.reportReady = true;
    document.body.setAttribute("data-ready", "1");
  }
  img.addEventListener("load", ready);
  // open at the best finding's key slice, else the first predicted slice
  var start = D.findings.length ? D.findings[0].best_slice : D.predicted[0];
  markPreset(state.preset);
  setThreshold(0);
  goTo(Math.max(0, D.slices.indexOf(start)));
})();
