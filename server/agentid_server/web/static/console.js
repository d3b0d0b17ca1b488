// The console's one script: keeps the pending approvals list live. The server sends an event
// (Server-Sent Events, /console/step-ups/events) whenever one of the user's step-ups changes;
// the list is then fetched again as server-rendered, escaped HTML. Nothing an agent wrote is
// ever turned into markup here. No inline script anywhere: the CSP allows only this file.
'use strict';
(function () {
  const box = document.getElementById('step-ups');
  const status = document.getElementById('live-status');
  if (!box || !status || typeof EventSource === 'undefined') {
    return;
  }
  function show(text) {
    status.textContent = text;
    status.hidden = false;
  }
  let busy = false;
  let again = false;
  function refresh() {
    if (busy) {
      again = true;
      return;
    }
    busy = true;
    fetch(box.dataset.list, { credentials: 'same-origin', redirect: 'manual' })
      .then(function (response) {
        if (!response.ok) {
          throw new Error('status ' + response.status);
        }
        return response.text();
      })
      .then(function (html) {
        box.innerHTML = html; // rendered and escaped by the server's templates
      })
      .catch(function () {
        show('Could not refresh the list: reload the page.');
      })
      .finally(function () {
        busy = false;
        if (again) {
          again = false;
          refresh();
        }
      });
  }
  const events = new EventSource(box.dataset.events);
  events.addEventListener('open', function () {
    show('Live: new approvals appear here as your agents ask.');
  });
  events.addEventListener('step-up', refresh);
  events.addEventListener('end', function (event) {
    const reason = JSON.parse(event.data).reason;
    if (reason === 'SIGNED_OUT' || reason === 'SESSION_REVOKED') {
      events.close();
      show('Your console session has ended: sign in again to see new approvals.');
    }
    // Otherwise (the server stops, the stream fell behind) the browser reconnects by itself.
  });
  events.addEventListener('error', function () {
    if (events.readyState === EventSource.CLOSED) {
      show('Not live any more: reload the page.');
    }
  });
})();
