// deploykit dashboard: live updates. Each element with a data-live
// attribute is replaced by the HTML its server-sent event stream carries;
// the server escapes that HTML as it does the page's. Without this script
// the pages are the same, only not live.
(function () {
  "use strict";
  if (!window.EventSource) {
    return;
  }
  var nodes = document.querySelectorAll("[data-live]");
  Array.prototype.forEach.call(nodes, function (node) {
    var updates = 0;
    var source = new EventSource(node.getAttribute("data-live"));
    source.addEventListener("update", function (e) {
      node.innerHTML = e.data;
      updates += 1;
      node.setAttribute("data-updates", String(updates));
    });
    // Leaving the page closes the stream before the browser reports it cut.
    window.addEventListener("pagehide", function () {
      source.close();
    });
  });
})();
