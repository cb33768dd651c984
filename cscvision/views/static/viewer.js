// cscvision viewer: the slide as Deep Zoom, one heatmap layer per target above it.
(function () {
  "use strict";
  var state = { slide: null, info: null, layers: {}, opacity: 0.6 };
  window.cscv = state;  // inspected by the browser tests

  var viewer = OpenSeadragon({
    id: "viewer",
    prefixUrl: "/static/openseadragon/images/",
    showNavigator: true,
    maxZoomPixelRatio: 4,
    crossOriginPolicy: false,
    drawer: "canvas"  // no WebGL: works the same in headless and software-rendered browsers
  });

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined) { e.textContent = text; }
    return e;
  }

  // a threshold with the digits it carries: 0.99973, not 1.00 (models/thresholds.py)
  function thresholdText(v) {
    var gap = Math.min(v, 1 - v);
    var digits = (gap <= 0 || gap >= 0.1) ? 2 : Math.max(2, Math.ceil(-Math.log10(gap)) + 1);
    return v.toFixed(Math.min(digits, 8));
  }

  function mapUrl(target, threshold) {
    return "/dzi/" + encodeURIComponent(state.slide) + "/map/" + encodeURIComponent(target) +
      ".dzi?threshold=" + thresholdText(threshold);
  }

  function mapRect() {  // the map's footprint in viewport units (slide width = 1)
    var m = state.info.map, w = state.info.dimensions[0];
    return { x: m.x0_l0 / w, y: m.y0_l0 / w, width: m.cols * m.px_l0 / w };
  }

  function addLayer(target) {
    var layer = state.layers[target];
    var rect = mapRect();
    if (layer.item) { viewer.world.removeItem(layer.item); layer.item = null; }
    layer.url = mapUrl(target, layer.threshold);
    viewer.addTiledImage({
      tileSource: layer.url, x: rect.x, y: rect.y, width: rect.width,
      opacity: layer.visible ? state.opacity : 0,
      success: function (ev) { layer.item = ev.item; layer.loaded = layer.url; }
    });
  }

  function layerControls(t) {
    var layer = state.layers[t.name];
    var box = el("span", { "class": "layer", "data-target": t.name });
    var sw = el("span", { "class": "swatch" }); sw.style.background = t.color;
    var attrs = { type: "checkbox", id: "toggle-" + t.name };
    if (!t.trust) { attrs.checked = "checked"; }  // trust layers (OOD, std, mi) start hidden
    var toggle = el("input", attrs);
    var thr = el("input", { type: "range", min: "0", max: "1", step: "0.01",
                            value: String(t.threshold), id: "threshold-" + t.name });
    var thrText = el("span", { id: "threshold-value-" + t.name }, thresholdText(t.threshold));
    toggle.addEventListener("change", function () {
      layer.visible = toggle.checked;
      if (layer.item) { layer.item.setOpacity(layer.visible ? state.opacity : 0); }
    });
    thr.addEventListener("change", function () {
      layer.threshold = parseFloat(thr.value);
      thrText.textContent = thresholdText(layer.threshold);
      addLayer(t.name);
    });
    box.appendChild(sw); box.appendChild(toggle);
    // a trust layer's slider runs over its display range (OOD 0-2 x p99 shown as 0-1)
    var name = t.trust ? t.name + " [" + t.unit + "; slider over its display range] " : t.name + " ";
    if (!t.trust && t.value_range && (t.value_range[0] !== 0 || t.value_range[1] !== 1)) {
      // a density or score map: its slider runs over the drawn span, shown in its unit
      name = t.name + " [" + t.value_range[0].toFixed(0) + "–" + t.value_range[1].toFixed(0) +
        " " + (t.unit || "") + "; slider over this span] ";
    }
    box.appendChild(el("label", { "for": toggle.id }, name));
    // a map without a threshold (regression, MIL percentiles) draws an outline only on asking
    box.appendChild(document.createTextNode(t.thresholded === false ? "outline at " : "threshold "));
    box.appendChild(thr); box.appendChild(thrText);
    return box;
  }

  var BLANK = "data:image/gif;base64,R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7";

  function blankSlide(dims) {  // an empty tile source of the slide's size, under the maps
    return { width: dims[0], height: dims[1], tileSize: 256,
             getTileUrl: function () { return BLANK; } };
  }

  function openSlide(sid) {
    state.slide = sid;
    fetch("/api/slides/" + encodeURIComponent(sid)).then(function (r) { return r.json(); })
      .then(function (info) {
        state.info = info; state.layers = {};
        var banner = document.getElementById("banner");
        banner.textContent = info.warning || "";
        banner.hidden = !info.warning;
        var bar = document.getElementById("layers");
        bar.innerHTML = "";
        info.targets.forEach(function (t) {
          state.layers[t.name] = { threshold: t.threshold, visible: !t.trust, item: null };
          bar.appendChild(layerControls(t));
        });
        viewer.addOnceHandler("open", function () {
          info.targets.forEach(function (t) { addLayer(t.name); });
        });
        if (info.slide_found === false) {  // slide file moved or deleted: the maps alone
          document.getElementById("readout").textContent =
            "slide file not found: showing its maps alone";
          viewer.open(blankSlide(info.dimensions));
        } else {
          viewer.open("/dzi/" + encodeURIComponent(sid) + "/slide.dzi");
        }
      });
  }

  function valueAt(pointL0) {
    var m = state.info.map;
    var col = Math.floor((pointL0.x - m.x0_l0) / m.px_l0);
    var row = Math.floor((pointL0.y - m.y0_l0) / m.px_l0);
    if (col < 0 || row < 0 || col >= m.cols || row >= m.rows) { return null; }
    return state.info.targets.map(function (t) {
      var v = t.values[row][col];
      if (v === null) { return t.name + " –"; }
      // probabilities to 3 decimals; a density in its unit (cells/mm²) to the cell
      var unit = (!t.trust && t.unit && t.unit !== "probability") ? " " + t.unit : "";
      return t.name + " " + (Math.abs(v) >= 100 ? v.toFixed(0) : v.toFixed(3)) + unit;
    }).join("  ");
  }

  new OpenSeadragon.MouseTracker({
    element: viewer.element,
    moveHandler: function (ev) {
      if (!state.info || !viewer.world.getItemAt(0)) { return; }
      var vp = viewer.viewport.pointFromPixel(ev.position);
      var l0 = viewer.world.getItemAt(0).viewportToImageCoordinates(vp);
      var text = valueAt(l0);
      document.getElementById("readout").textContent =
        "x " + Math.round(l0.x) + ", y " + Math.round(l0.y) + (text ? "  |  " + text : "");
    }
  });

  document.getElementById("opacity").addEventListener("input", function (ev) {
    state.opacity = parseFloat(ev.target.value);
    Object.keys(state.layers).forEach(function (k) {
      var l = state.layers[k];
      if (l.item) { l.item.setOpacity(l.visible ? state.opacity : 0); }
    });
  });

  var picker = document.getElementById("slide-picker");
  picker.addEventListener("change", function () { openSlide(picker.value); });
  fetch("/api/slides").then(function (r) { return r.json(); }).then(function (slides) {
    slides.forEach(function (s) { picker.appendChild(el("option", { value: s.slide_id }, s.slide_id)); });
    var wanted = new URLSearchParams(window.location.search).get("slide");
    var first = slides.some(function (s) { return s.slide_id === wanted; }) ? wanted : slides[0].slide_id;
    picker.value = first;
    openSlide(first);
  });
})();
