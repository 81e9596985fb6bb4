// fedmerge dashboard: live refresh. Polls /api/fingerprint; when the store (or the intake queue)
// changed, fetches the current page and swaps <main id="content"> without reloading the page.
(function () {
  "use strict";
  var body = document.body;
  var period = parseInt(body.getAttribute("data-refresh-ms") || "2000", 10);
  var live = document.getElementById("live");
  var last = null;
  var busy = false;
  body.setAttribute("data-refreshes", "0");

  function openDetails() {
    var open = [];
    document.querySelectorAll("main details").forEach(function (d, i) { if (d.open) { open.push(i); } });
    return open;
  }

  function swap() {
    return fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) { if (!r.ok) { throw new Error("HTTP " + r.status); } return r.text(); })
      .then(function (html) {
        var doc = new DOMParser().parseFromString(html, "text/html");
        var fresh = doc.getElementById("content");
        var main = document.getElementById("content");
        if (!fresh || !main) { return; }
        var keep = openDetails();
        main.replaceChildren.apply(main, Array.prototype.slice.call(fresh.childNodes).map(function (n) {
          return document.importNode(n, true);
        }));
        document.querySelectorAll("main details").forEach(function (d, i) { if (keep.indexOf(i) >= 0) { d.open = true; } });
        body.setAttribute("data-refreshes", String(parseInt(body.getAttribute("data-refreshes"), 10) + 1));
        if (live) { live.classList.add("flash"); setTimeout(function () { live.classList.remove("flash"); }, 600); }
      });
  }

  function poll() {
    if (busy) { return; }
    busy = true;
    fetch("/api/fingerprint", { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { if (!r.ok) { throw new Error("HTTP " + r.status); } return r.json(); })
      .then(function (data) {
        if (live) { live.classList.add("on"); }
        var changed = last !== null && data.fingerprint !== last;
        last = data.fingerprint;
        return changed ? swap() : null;
      })
      .catch(function () { if (live) { live.classList.remove("on"); } })
      .then(function () { busy = false; });
  }

  if (period > 0) {
    poll();
    setInterval(poll, period);
  }
})();
