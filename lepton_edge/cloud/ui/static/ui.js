// lepton-edge web page: refresh each [data-refresh] region in place, confirm dangerous forms.
// No library: fetch + setInterval. A 401 means the session ended: go to the sign-in page.
(function () {
  "use strict";

  function refresh(region) {
    if (document.hidden || region.dataset.busy) return;
    region.dataset.busy = "1";
    fetch(region.dataset.refresh, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) {
        if (r.status === 401) { window.location.assign("/ui/login"); return null; }
        return r.ok ? r.text() : null;
      })
      .then(function (html) {
        if (html !== null && html !== undefined) {
          region.innerHTML = html;
          region.dataset.updated = String(Date.now());
          region.dispatchEvent(new CustomEvent("lepton:refreshed", { bubbles: true }));
        }
      })
      .catch(function () { region.classList.add("disconnected"); })
      .then(function () { delete region.dataset.busy; });
  }

  function start() {
    document.querySelectorAll("[data-refresh]").forEach(function (region) {
      var every = parseInt(region.dataset.every || "2000", 10);
      setInterval(function () { refresh(region); }, Math.max(every, 500));
    });
  }

  // Forms inside refreshed regions are replaced every few seconds: listen on the document.
  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    if (form.dataset && form.dataset.confirm && !window.confirm(form.dataset.confirm)) ev.preventDefault();
  });

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
