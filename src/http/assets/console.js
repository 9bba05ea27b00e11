// labsync's console: the delete dialog. Every text from the server goes
// into the page with textContent, never as markup; every change goes
// through the API with the session's CSRF token.

const csrf = document.querySelector('meta[name="csrf-token"]')?.content ?? "";

async function api(method, path) {
  const r = await fetch(path, {
    method,
    credentials: "same-origin",
    headers: { "x-csrf-token": csrf, accept: "application/json" },
  });
  let body = null;
  try {
    body = await r.json();
  } catch {
    body = null;
  }
  return { status: r.status, body };
}

// A problem document in words: its detail and the request to quote.
function problemText(body, status) {
  if (body && typeof body.detail === "string") {
    return `${body.detail} (request ${body.request_id ?? "unknown"})`;
  }
  return `labsync answered ${status}`;
}

const dialog = document.getElementById("confirm");
let row = null;

function say(text) {
  document.getElementById("c-message").textContent = text;
}

function labPath(r) {
  return `/api/v1/workers/${encodeURIComponent(r.dataset.worker)}/labs/${encodeURIComponent(r.dataset.lab)}`;
}

function gone(r) {
  r.remove();
  dialog.close();
}

async function follow(id, target) {
  for (;;) {
    const { status, body } = await api("GET", `/api/v1/delete-requests/${encodeURIComponent(id)}`);
    if (status !== 200) {
      say(problemText(body, status));
      return;
    }
    const last = body.last_error ? `; last error: ${body.last_error}` : "";
    say(`Stop, wipe and delete: ${body.status}, attempt ${body.attempts}${last}`);
    if (body.status === "done") {
      gone(target);
      return;
    }
    if (body.status === "failed" || body.status === "cancelled") {
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
}

if (dialog) {
  document.addEventListener("click", (e) => {
    const button = e.target.closest("button[data-delete]");
    if (!button) return;
    row = button.closest("tr");
    document.getElementById("c-title").textContent = row.dataset.title;
    document.getElementById("c-worker").textContent = row.dataset.worker;
    document.getElementById("c-state").textContent = row.dataset.state;
    document.getElementById("c-force").hidden = true;
    document.getElementById("c-delete").hidden = false;
    say("");
    dialog.showModal();
  });
  document.getElementById("c-cancel").addEventListener("click", () => dialog.close());
  document.getElementById("c-delete").addEventListener("click", async () => {
    // The row this dialog was opened for, whatever is opened next.
    const target = row;
    say("Deleting…");
    const { status, body } = await api("DELETE", labPath(target));
    if (status === 200) {
      gone(target);
    } else if (status === 409 && String(body?.type).endsWith(":lab-running")) {
      say(`${problemText(body, status)}. Stop and wipe it, then delete it?`);
      document.getElementById("c-delete").hidden = true;
      document.getElementById("c-force").hidden = false;
    } else {
      say(problemText(body, status));
    }
  });
  document.getElementById("c-force").addEventListener("click", async () => {
    const target = row;
    document.getElementById("c-force").hidden = true;
    const { status, body } = await api("DELETE", `${labPath(target)}?force=true&mode=async`);
    if (status === 202 && body?.delete_request_id) {
      await follow(body.delete_request_id, target);
    } else {
      say(problemText(body, status));
    }
  });
}

// Several labs at once: each is deleted on its own, and each row says how
// its delete ended (one refusal never hides the others' results).
document.getElementById("delete-selected")?.addEventListener("click", async () => {
  const rows = [...document.querySelectorAll("tr[data-lab]")].filter(
    (r) => r.querySelector("input[data-select]")?.checked,
  );
  await Promise.all(
    rows.map(async (r) => {
      const outcome = r.querySelector("td.outcome");
      outcome.textContent = "deleting…";
      const { status, body } = await api("DELETE", labPath(r));
      if (status === 200) {
        r.remove();
      } else {
        outcome.textContent = problemText(body, status);
        outcome.classList.add("error");
      }
    }),
  );
});

// Live: lab events from every replica, as Server-Sent Events. A lab that
// goes leaves the table at once; anything else redraws the table from the
// server (its own, escaped HTML), so that what is shown is what is stored.
const live = document.querySelector("table.labs, table.fleet");
if (live && typeof EventSource !== "undefined") {
  let pending = null;
  const redraw = () => {
    clearTimeout(pending);
    pending = setTimeout(async () => {
      const r = await fetch(location.href, { credentials: "same-origin" });
      if (!r.ok) return;
      const fresh = new DOMParser().parseFromString(await r.text(), "text/html");
      const body = fresh.querySelector(`table.${live.classList[0]} tbody`);
      const current = live.querySelector("tbody");
      if (!body || !current) return;
      // Keep what the person selected and what they are being told.
      for (const old of current.querySelectorAll("tr[data-lab]")) {
        const fresh = body.querySelector(`tr[data-lab="${CSS.escape(old.dataset.lab)}"]`);
        if (!fresh) continue;
        const box = old.querySelector("input[data-select]");
        const freshBox = fresh.querySelector("input[data-select]");
        if (box && freshBox) freshBox.checked = box.checked;
        const said = old.querySelector("td.outcome");
        const freshSaid = fresh.querySelector("td.outcome");
        if (said && freshSaid) {
          freshSaid.textContent = said.textContent;
          freshSaid.className = said.className;
        }
      }
      current.replaceWith(body);
    }, 300);
  };
  const onEvent = (e) => {
    let data = null;
    try {
      data = JSON.parse(e.data);
    } catch {
      return;
    }
    const row = document.querySelector(
      `tr[data-worker="${CSS.escape(data.worker_id)}"][data-lab="${CSS.escape(data.lab_id)}"]`,
    );
    if ((data.kind === "deleted" || data.kind === "pruned") && row) {
      row.remove();
    } else {
      redraw();
    }
    document.body.dataset.lastEvent = e.lastEventId;
  };
  // EventSource retries a dropped connection by itself, but gives up on
  // an answer such as 503 (too many streams) or 401: then start again a
  // little later, and redraw, which catches up with what was missed.
  const connect = () => {
    const stream = new EventSource("/api/v1/events/stream");
    for (const kind of ["discovered", "changed", "state_changed", "deleted", "pruned", "delete_failed"]) {
      stream.addEventListener(kind, onEvent);
    }
    stream.addEventListener("open", () => {
      document.body.dataset.live = "open";
    });
    stream.addEventListener("error", () => {
      if (stream.readyState === EventSource.CLOSED) {
        document.body.dataset.live = "closed";
        setTimeout(() => {
          connect();
          redraw();
        }, 5000);
      } else {
        document.body.dataset.live = "reconnecting";
      }
    });
  };
  connect();
}

// A held prune, applied by an admin after reviewing its labs: a refresh
// of that worker with force_prune; the page then shows its outcome.
document.addEventListener("click", async (e) => {
  const button = e.target.closest("button.apply-prune");
  if (!button) return;
  button.disabled = true;
  const worker = encodeURIComponent(button.dataset.worker);
  const { status, body } = await api("POST", `/api/v1/workers/${worker}/labs/refresh?force_prune=true`);
  if (status === 200) {
    location.reload();
  } else {
    button.disabled = false;
    button.textContent = problemText(body, status);
  }
});
