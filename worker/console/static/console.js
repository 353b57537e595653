// Progressive enhancement only: every page and form works without this file.
// A running pipeline's page refreshes its content in place every few seconds.
(function () {
  var head = document.querySelector("[data-refresh]");
  if (!head) return;
  var every = 1000 * parseFloat(head.getAttribute("data-refresh"));
  function busy() {
    var el = document.activeElement;
    return el && (el.tagName === "INPUT" || el.tagName === "TEXTAREA" || el.tagName === "SELECT");
  }
  function tick() {
    if (busy() || document.hidden) { setTimeout(tick, every); return; }
    fetch(location.href, { headers: { Accept: "text/html" }, credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (!html) return;
        var next = new DOMParser().parseFromString(html, "text/html").querySelector("main");
        if (next) document.querySelector("main").innerHTML = next.innerHTML;
        if (document.querySelector("[data-refresh]")) setTimeout(tick, every);
      })
      .catch(function () { setTimeout(tick, every * 2); });
  }
  setTimeout(tick, every);
})();
