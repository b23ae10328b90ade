// Live job progress: re-fetch the server-rendered fragment every second until the job ends,
// then reload once so the whole page (cancel form included) shows the final state.
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live) { return; }
  function finished() {
    var part = live.querySelector(".job-live");
    return part && part.getAttribute("data-final") === "1";
  }
  if (finished()) { return; }
  var timer = setInterval(function () {
    fetch(live.getAttribute("data-src"), { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (html === null) { return; }
        var doc = new DOMParser().parseFromString(html, "text/html");
        var part = doc.querySelector(".job-live");
        if (!part) { return; }
        live.replaceChildren(document.importNode(part, true));
        if (finished()) { clearInterval(timer); window.location.reload(); }
      })
      .catch(function () { /* the next tick tries again */ });
  }, 1000);
})();
