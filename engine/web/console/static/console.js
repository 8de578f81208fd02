// RadBridge console: the little JavaScript it has. Pages work without it; it adds live refresh
// and confirmation of destructive actions. No inline scripts (the Content-Security-Policy forbids them).
"use strict";

// <div data-refresh="/overview/live" data-every="5">: its content is fetched again every N seconds
// (not while the tab is hidden, and not while keyboard focus is inside it).
function startRefresh(el) {
  const every = Math.max(2, Number(el.dataset.every || 5)) * 1000;
  const url = el.dataset.refresh;
  async function tick() {
    if (!document.hidden && !el.contains(document.activeElement)) {
      try {
        const res = await fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } });
        if (res.ok) {
          el.innerHTML = await res.text();
          el.dataset.refreshedAt = new Date().toISOString();
        } else if (res.status === 401 || res.redirected) {
          window.location.assign("/login?next=" + encodeURIComponent(window.location.pathname));
          return;
        }
      } catch (e) { /* the engine is restarting: try again next time */ }
    }
    window.setTimeout(tick, every);
  }
  window.setTimeout(tick, every);
}

// <form data-confirm="Discard delivery 12?">: asks first.
function confirmForms() {
  document.addEventListener("submit", (ev) => {
    const form = ev.target;
    if (form instanceof HTMLFormElement && form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
      ev.preventDefault();
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-refresh]").forEach(startRefresh);
  confirmForms();
});
