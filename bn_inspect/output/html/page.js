// bn-inspect page script: draws the Plotly figures (per-layer ones when their layer opens),
// sorts and filters the tables, and opens a layer's detail when a profile point or link is clicked.
// Data is read with JSON.parse and written with textContent only: nothing from the model file is
// ever parsed as HTML.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("bn-data").textContent);
  var figures = data.figures || {};
  var drawn = {};

  function draw(id) {
    var element = document.getElementById(id);
    var figure = figures[id];
    if (!element || !figure || drawn[id] || typeof Plotly === "undefined") return;
    drawn[id] = true;
    // Plotly keeps and changes the layout it is given: each plot gets its own copy of a shared one.
    var layout = typeof figure.layout === "string" ? data.layouts[figure.layout] : figure.layout;
    Plotly.newPlot(element, figure.data, JSON.parse(JSON.stringify(layout)), data.config);
    var prefix = element.getAttribute("data-target-prefix");
    if (prefix) {
      element.on("plotly_click", function (event) {
        var point = event.points && event.points[0];
        if (point) openTarget(prefix + point.x);
      });
    }
  }

  function drawInside(container) {
    container.querySelectorAll(".plot").forEach(function (element) { draw(element.id); });
  }

  function openTarget(id) {
    var target = document.getElementById(id);
    if (!target) return;
    if (target.tagName === "DETAILS") target.open = true;
    var parent = target.closest("details");
    if (parent) parent.open = true;
    drawInside(target);
    target.scrollIntoView({ block: "start" });
    target.classList.add("flash");
    setTimeout(function () { target.classList.remove("flash"); }, 1200);
    if (history.replaceState) history.replaceState(null, "", "#" + id);
  }

  // A shell glob (*, ?, [...]) matched against the whole name, as --layer matches.
  function globToRegExp(glob) {
    var out = "";
    for (var i = 0; i < glob.length; i++) {
      var c = glob[i];
      if (c === "*") out += ".*";
      else if (c === "?") out += ".";
      else if (c === "[") {
        var end = glob.indexOf("]", i + 2);
        if (end < 0) { out += "\\["; continue; }
        var body = glob.slice(i + 1, end).replace(/\\/g, "\\\\");
        if (body[0] === "!") body = "^" + body.slice(1);
        out += "[" + body + "]";
        i = end;
      } else out += c.replace(/[.+^${}()|\\\]]/g, "\\$&");
    }
    try { return new RegExp("^" + out + "$"); } catch (error) { return null; }
  }

  function filterTable(input) {
    var table = document.getElementById(input.getAttribute("data-table"));
    var glob = input.value.trim();
    var pattern = glob ? globToRegExp(glob) : null;
    var rows = table.tBodies[0].rows;
    var shown = 0;
    for (var i = 0; i < rows.length; i++) {
      var row = rows[i];
      var match = !glob || (pattern !== null && (pattern.test(row.getAttribute("data-name")) ||
        pattern.test(row.getAttribute("data-label"))));
      row.hidden = !match;
      if (match) shown++;
    }
    var count = document.querySelector('.filter-count[data-table="' + table.id + '"]');
    if (count) count.textContent = (glob ? shown + " of " : "") + rows.length + " " + (rows.length === 1 ? "row" : "rows");
  }

  function sortTable(table, header) {
    var headers = Array.prototype.slice.call(header.parentNode.children);
    var column = headers.indexOf(header);
    var numeric = header.getAttribute("data-numeric") === "1";
    var ascending = header.getAttribute("aria-sort") !== "ascending";
    if (numeric && header.getAttribute("aria-sort") === "none") ascending = false;
    headers.forEach(function (h) { h.setAttribute("aria-sort", "none"); });
    header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[column].getAttribute("data-sort");
      var y = b.cells[column].getAttribute("data-sort");
      if (x === "" || y === "") return (x === "") - (y === "");  // missing values last, either way
      var order = numeric ? parseFloat(x) - parseFloat(y) : x.localeCompare(y);
      if (numeric && isNaN(order)) order = 0;
      return ascending ? order : -order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  }

  document.querySelectorAll("table.sortable").forEach(function (table) {
    table.querySelectorAll("thead th").forEach(function (header) {
      header.querySelector("button").addEventListener("click", function () { sortTable(table, header); });
    });
  });
  document.querySelectorAll("input.layer-filter").forEach(function (input) {
    input.addEventListener("input", function () { filterTable(input); });
  });
  document.querySelectorAll("details.layer").forEach(function (details) {
    details.addEventListener("toggle", function () { if (details.open) drawInside(details); });
  });
  document.addEventListener("click", function (event) {
    var link = event.target.closest && event.target.closest("a.jump");
    if (!link) return;
    event.preventDefault();
    openTarget(link.getAttribute("href").slice(1));
  });
  // Plotly.js comes gzip-compressed and base64-encoded (a third of its size): unpacked with the
  // browser's DecompressionStream (Chrome 80, Firefox 113, Safari 16.4) and run as an inline script,
  // which the page's policy allows (script-src 'unsafe-inline'): no eval, no blob: URL, no request.
  function unpackPlotly() {
    var packed = document.getElementById("bn-plotly");
    if (!packed) return Promise.resolve();
    if (typeof DecompressionStream === "undefined") return Promise.reject(new Error("no DecompressionStream"));
    var text = atob(packed.textContent.trim());
    var bytes = new Uint8Array(text.length);
    for (var i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
    var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    return new Response(stream).text().then(function (source) {
      var script = document.createElement("script");
      script.textContent = source;
      document.head.appendChild(script);
    });
  }

  function start() {
    document.querySelectorAll("details.layer[open]").forEach(drawInside);
    document.querySelectorAll(".plot:not(.lazy)").forEach(function (element) { draw(element.id); });
    if (location.hash.length > 1) openTarget(decodeURIComponent(location.hash.slice(1)));
    document.body.setAttribute("data-ready", "plots");
  }

  unpackPlotly().then(start, function () {
    // Tables, links and filters work without Plotly; say why the plots are missing.
    var note = document.createElement("p");
    note.className = "verdict verdict-random";
    note.textContent = "This browser cannot unpack the plots (it lacks DecompressionStream: Chrome 80, " +
      "Firefox 113 or Safari 16.4 and later have it); the tables below are complete.";
    document.body.insertBefore(note, document.body.firstChild);
    document.body.setAttribute("data-ready", "no-plots");
  });
})();
