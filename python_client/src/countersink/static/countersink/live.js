/* countersink live badges: keeps every element with data-countersink-stream up to date through
 * Server-Sent Events from the sidecar. Rendered by {% live_unread_badge user %}; loaded by
 * {% countersink_live_script %} (inline) or as the static file countersink/live.js.
 * Each "count" event carries {"user_id": .., "unread_count": ..}; the first one after every
 * (re)connect is the current count. The browser reconnects by itself; if the sidecar refuses a
 * reconnect (the page's token expired), a fresh URL is fetched from data-countersink-refresh.
 * Every update fires a bubbling "countersink:count" event with detail {count}. */
(function () {
  "use strict";
  var REFRESH_DELAY_MS = 5000;

  function render(el, count) {
    var max = parseInt(el.getAttribute("data-countersink-max") || "99", 10);
    el.setAttribute("data-unread-count", String(count));
    el.textContent = count > max ? max + "+" : String(count);
    el.setAttribute("aria-label", count + " unread notification" + (count === 1 ? "" : "s"));
    el.hidden = count <= 0;
    el.dispatchEvent(new CustomEvent("countersink:count", { bubbles: true, detail: { count: count } }));
  }

  function connect(el, url) {
    var source = new EventSource(url);
    source.addEventListener("count", function (event) {
      var data = JSON.parse(event.data);
      render(el, data.unread_count);
      el.setAttribute("data-countersink-live", "open");
    });
    source.onerror = function () {
      if (source.readyState !== EventSource.CLOSED) {
        el.setAttribute("data-countersink-live", "reconnecting");
        return; // the browser retries by itself
      }
      el.setAttribute("data-countersink-live", "closed");
      var refresh = el.getAttribute("data-countersink-refresh");
      if (refresh) {
        setTimeout(function () { renew(el, refresh); }, REFRESH_DELAY_MS);
      }
    };
  }

  function renew(el, refresh) {
    fetch(refresh, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (response) { return response.ok ? response.json() : Promise.reject(response.status); })
      .then(function (body) { connect(el, body.url); })
      .catch(function () { setTimeout(function () { renew(el, refresh); }, REFRESH_DELAY_MS * 6); });
  }

  function start() {
    var badges = document.querySelectorAll("[data-countersink-stream]");
    for (var i = 0; i < badges.length; i++) {
      if (!badges[i].hasAttribute("data-countersink-live")) {
        badges[i].setAttribute("data-countersink-live", "connecting");
        connect(badges[i], badges[i].getAttribute("data-countersink-stream"));
      }
    }
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
