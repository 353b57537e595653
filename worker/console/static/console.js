// Progressive enhancement only: every page and form works without this file.
// A running pipeline's page refreshes its content in place every few seconds, and shows the tokens of
// its streamed steps as they arrive (server-sent events).
(function () {
  var live = document.getElementById("live");
  if (live) follow(live);

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
        if (!next) return;
        var kept = document.getElementById("live");
        var main = document.querySelector("main");
        main.innerHTML = next.innerHTML;
        var slot = document.getElementById("live");
        if (kept && slot) slot.replaceWith(kept);  // the live output keeps streaming across refreshes
        if (document.querySelector("[data-refresh]")) setTimeout(tick, every);
      })
      .catch(function () { setTimeout(tick, every * 2); });
  }
  setTimeout(tick, every);

  function follow(panel) {
    if (!window.EventSource) return;
    var steps = {};
    var source = new EventSource(panel.getAttribute("data-tokens"));
    function block(step) {
      if (!steps[step]) {
        var wrap = document.createElement("div");
        wrap.className = "live-step";
        wrap.setAttribute("data-step", step);
        var title = document.createElement("h3");
        title.textContent = step;
        var pre = document.createElement("pre");
        wrap.appendChild(title);
        wrap.appendChild(pre);
        panel.querySelector(".live-steps").appendChild(wrap);
        steps[step] = pre;
      }
      panel.hidden = false;
      return steps[step];
    }
    source.onmessage = function (message) {
      var event = JSON.parse(message.data);
      var pre = block(event.step);
      if (event.kind === "restart") pre.textContent = "";
      else if (event.kind === "text" && event.text) pre.textContent += event.text;
      else if (event.kind === "error") pre.textContent += "\n[" + (event.error || "error") + "]";
    };
    source.addEventListener("end", function () { source.close(); });
    source.addEventListener("failed", function () { source.close(); });
  }
})();
