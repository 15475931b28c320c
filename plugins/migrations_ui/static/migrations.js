// The "Migrations" page: polls api/migrations every 2.5 s and renders every migration, its disks and
// its latest DAG run. Plain JS, no build step. Every size arrives formatted (IEC units) by the server.
(function () {
  "use strict";
  var POLL_MS = 2500;
  var rows = document.getElementById("rows");
  var counts = document.getElementById("counts");
  var updated = document.getElementById("updated");
  var errorBox = document.getElementById("error");
  var filter = document.getElementById("filter");
  var lastText = null;
  var lastDoc = null;
  var openConditions = new Set();

  function esc(value) {
    return String(value === null || value === undefined ? "" : value)
      .replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }

  function cls(value) {
    return String(value === null || value === undefined ? "None" : value).replace(/[^A-Za-z0-9_-]/g, "");
  }

  function badge(value) {
    return '<span class="badge ' + cls(value) + '">' + esc(value === null || value === undefined ? "-" : value) + "</span>";
  }

  function endpoint(side) {
    var provider = side.provider ? esc(side.provider) + (side.providerType ? " (" + esc(side.providerType) + ")" : "") : "";
    return "<strong>" + esc(side.name || "?") + "</strong>" +
      (provider ? ' <span class="muted">on ' + provider + "</span>" : "");
  }

  function diskTable(disks) {
    if (!disks.length) { return ""; }
    var html = '<table class="disks"><thead><tr><th>Disk</th><th>Phase</th><th class="num">Bytes done / total</th>' +
      '<th class="num">Virtual size</th><th class="num">Rate</th><th class="num">ETA</th><th>Checksum</th></tr></thead><tbody>';
    disks.forEach(function (d) {
      var t = d.text || {};
      html += '<tr class="disk" data-disk="' + esc(d.name) + '">' +
        "<td>" + esc(d.name) + "</td><td>" + esc(d.phase || "") + "</td>" +
        '<td class="num bytes">' + esc(t.bytes || "") + "</td>" +
        '<td class="num virtual">' + esc(t.virtual || "") + "</td>" +
        '<td class="num rate">' + esc(t.rate || "") + "</td>" +
        '<td class="num eta">' + esc(t.eta || "") + "</td>" +
        '<td class="checksum">' + (d.checksum ? badge(d.checksum) : "") + "</td></tr>";
    });
    return html + "</tbody></table>";
  }

  function summaryBlock(s) {
    if (!s) { return ""; }
    var t = s.text || {};
    var html = '<div class="summary"><strong>Run summary:</strong> moved ' + esc(t.bytesMoved || "?") +
      (t.seconds ? " in " + esc(t.seconds) : "") + (t.rate ? " at " + esc(t.rate) : "") + "</div>";
    if (s.disks && s.disks.length) {
      html += '<table class="disks summary-disks"><thead><tr><th>Disk</th><th class="num">Virtual</th>' +
        '<th class="num">Allocated</th><th class="num">Moved</th><th class="num">Time</th><th class="num">Rate</th>' +
        "<th>Checksum</th></tr></thead><tbody>";
      s.disks.forEach(function (d) {
        var dt = d.text || {};
        html += '<tr class="summary-disk" data-disk="' + esc(d.name) + '"><td>' + esc(d.name) + "</td>" +
          '<td class="num">' + esc(dt.virtual || "") + '</td><td class="num">' + esc(dt.allocated || "") + "</td>" +
          '<td class="num">' + esc(dt.moved || "") + '</td><td class="num">' + esc(dt.seconds || "") + "</td>" +
          '<td class="num">' + esc(dt.rate || "") + "</td><td>" + (d.checksum ? badge(d.checksum) : "") + "</td></tr>";
      });
      html += "</tbody></table>";
    }
    return html;
  }

  function conditionsBlock(m) {
    if (!m.conditions.length) { return ""; }
    var html = '<details data-key="' + esc(m.key) + '"' + (openConditions.has(m.key) ? " open" : "") +
      "><summary>Conditions (" + m.conditions.length + ')</summary><table class="disks"><thead><tr><th>Type</th>' +
      "<th>Status</th><th>Reason</th><th>Last transition</th><th>Message</th></tr></thead><tbody>";
    m.conditions.forEach(function (c) {
      html += "<tr><td>" + esc(c.type) + "</td><td>" + esc(c.status) + "</td><td>" + esc(c.reason || "") +
        "</td><td>" + esc(c.lastTransitionTime || "") + "</td><td>" + esc(c.message || "") + "</td></tr>";
    });
    return html + "</tbody></table></details>";
  }

  function runCell(m) {
    if (!m.run) { return '<span class="muted">no run yet</span>'; }
    return '<a class="run-link" href="' + esc(m.run.url) + '" title="' + esc(m.run.runId) + '">' +
      esc(m.run.runId) + "</a> " + badge(m.run.state);
  }

  function matches(m, q) {
    if (!q) { return true; }
    var hay = [m.key, m.phase, m.source.name, m.source.provider, m.source.providerType, m.target.name,
      m.target.provider, m.target.providerType, m.storageType, m.run && m.run.state].join(" ").toLowerCase();
    return hay.indexOf(q) !== -1;
  }

  function render(doc) {
    var q = filter.value.trim().toLowerCase();
    var html = "";
    var shown = 0;
    doc.migrations.forEach(function (m) {
      if (!matches(m, q)) { return; }
      shown += 1;
      var progress = typeof m.progress === "number" ? m.progress : 0;
      html += '<tr class="migration ' + cls(m.phase) + '" data-key="' + esc(m.key) + '" data-phase="' + esc(m.phase || "") +
        '" data-progress="' + esc(progress) + '">' +
        '<td class="key"><a class="dag-link" href="' + esc(m.dagUrl) + '">' + esc(m.key) + "</a></td>" +
        '<td class="phase">' + badge(m.phase) + (m.failedPhase ? ' <span class="muted">in ' + esc(m.failedPhase) + "</span>" : "") + "</td>" +
        '<td class="progress"><span class="bar"><span style="width:' + Math.max(0, Math.min(100, progress)) + '%"></span></span>' +
        esc(progress) + "%</td>" +
        '<td class="route">' + endpoint(m.source) + " &rarr; " + endpoint(m.target) + "</td>" +
        "<td>" + esc(m.storageType || "") + "</td>" +
        '<td class="run">' + runCell(m) + "</td>" +
        '<td class="message">' + esc(m.message || "") +
        (m.specError ? '<div class="error-text">' + esc(m.specError) + "</div>" : "") + "</td></tr>";
      var details = diskTable(m.disks) + summaryBlock(m.summary) + conditionsBlock(m);
      if (details) {
        html += '<tr class="details" data-key="' + esc(m.key) + '"><td colspan="7">' + details + "</td></tr>";
      }
    });
    if (!shown) {
      html = '<tr><td colspan="7" class="empty">' + (doc.migrations.length ? "No migration matches the filter." :
        "No migration in the spec store.") + "</td></tr>";
    }
    rows.innerHTML = html;
    var parts = ["<span><strong>" + doc.total + "</strong> migrations</span>"];
    Object.keys(doc.phases).sort().forEach(function (p) { parts.push("<span>" + badge(p) + " " + doc.phases[p] + "</span>"); });
    counts.innerHTML = parts.join("");
    if (!doc.runsAvailable) { showError("The DAG runs could not be read from Airflow's database."); }
  }

  function showError(text) {
    errorBox.textContent = text;
    errorBox.hidden = !text;
  }

  function poll() {
    fetch("api/migrations", { credentials: "same-origin", cache: "no-store", headers: { Accept: "application/json" } })
      .then(function (resp) {
        if (resp.status === 401 || resp.status === 403) { throw new Error("Not logged in to Airflow (HTTP " + resp.status + ")."); }
        if (!resp.ok) { throw new Error("The migrations could not be read (HTTP " + resp.status + ")."); }
        return resp.text();
      })
      .then(function (text) {
        showError("");
        if (text !== lastText) {
          lastText = text;
          lastDoc = JSON.parse(text);
          render(lastDoc);
        }
        updated.textContent = "updated " + new Date().toLocaleTimeString();
      })
      .catch(function (err) { showError(err.message); })
      .then(function () { window.setTimeout(poll, POLL_MS); });
  }

  // Inside the Airflow UI this page is an iframe whose sandbox forbids navigating the top window, so a run
  // link asks the (same-origin) UI's router to show the run, as a click on one of its own links would.
  document.addEventListener("click", function (ev) {
    var a = ev.target.closest ? ev.target.closest("a.run-link, a.dag-link") : null;
    if (!a || window.top === window || ev.button !== 0 || ev.metaKey || ev.ctrlKey || ev.shiftKey) { return; }
    try {
      var url = new URL(a.getAttribute("href"), document.baseURI);
      var top = window.top;
      if (top.location.origin !== url.origin) { return; }
      ev.preventDefault();
      var idx = top.history.state && typeof top.history.state.idx === "number" ? top.history.state.idx + 1 : 0;
      top.history.pushState({ usr: null, key: Math.random().toString(36).slice(2, 10), idx: idx }, "",
        url.pathname + url.search + url.hash);
      top.dispatchEvent(new PopStateEvent("popstate", { state: top.history.state }));
    } catch (e) {
      // not reachable (another origin): the browser follows the link inside the frame
    }
  });

  document.addEventListener("toggle", function (ev) {
    var el = ev.target;
    if (el.tagName === "DETAILS" && el.dataset.key) {
      if (el.open) { openConditions.add(el.dataset.key); } else { openConditions.delete(el.dataset.key); }
    }
  }, true);

  filter.addEventListener("input", function () { if (lastDoc) { render(lastDoc); } });
  poll();
})();
