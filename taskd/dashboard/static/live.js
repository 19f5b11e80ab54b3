// Live updates without a page reload: every few seconds, fetch this page again and
// swap in its #live part. Pages that hold a form being filled in opt out (no data-live),
// and nothing is swapped while a field has the focus. No library, no build step.
(function () {
  "use strict";
  var PERIOD = 5000;
  function refresh() {
    var live = document.getElementById("live");
    if (!live || !live.hasAttribute("data-live") || document.hidden) return;
    var focused = document.activeElement;
    if (focused && live.contains(focused) && /INPUT|SELECT|TEXTAREA/.test(focused.tagName)) return;
    fetch(window.location.href, { headers: { "X-Taskd-Live": "1" }, credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (!html) return;
        var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("live");
        if (fresh) { live.replaceChildren.apply(live, Array.from(fresh.childNodes)); live.dataset.refreshed = String(Date.now()); }
      })
      .catch(function () { /* the dashboard restarts: try again next time */ });
  }
  setInterval(refresh, PERIOD);
  // A form with data-confirm (e.g. "replay all") asks before it is sent.
  document.addEventListener("submit", function (event) {
    var question = event.target.getAttribute("data-confirm");
    if (question && !window.confirm(question)) event.preventDefault();
  });
})();
