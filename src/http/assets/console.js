// labsync's console: the delete dialog. Every text from the server goes
// into the page with textContent, never as markup; every change goes
// through the API with the session's CSRF token.

const csrf = document.querySelector('meta[name="csrf-token"]')?.content ?? "";

async function api(method, path, payload, extra) {
  const headers = { "x-csrf-token": csrf, accept: "application/json", ...(extra ?? {}) };
  if (payload !== undefined) headers["content-type"] = "application/json";
  const r = await fetch(path, {
    method,
    credentials: "same-origin",
    headers,
    body: payload === undefined ? undefined : JSON.stringify(payload),
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
  dialog.close();
  // A lab's own page shows what happened to it: read it again.
  if (r.matches("article.lab")) {
    location.reload();
  } else {
    r.remove();
  }
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
    row = button.closest("[data-lab]");
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
const live = document.querySelector("table.labs, table.fleet, table.runs, article.lab");
if (live && typeof EventSource !== "undefined") {
  let pending = null;
  const redraw = () => {
    clearTimeout(pending);
    pending = setTimeout(async () => {
      const r = await fetch(location.href, { credentials: "same-origin" });
      if (!r.ok) return;
      const fresh = new DOMParser().parseFromString(await r.text(), "text/html");
      if (live.matches("article.lab")) {
        const article = fresh.querySelector("article.lab");
        // Gone: the page says so, with its audit trail.
        if (!article) location.reload();
        else live.replaceChildren(...article.childNodes);
        return;
      }
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
    const row = data.lab_id
      ? document.querySelector(
          `tr[data-worker="${CSS.escape(data.worker_id)}"][data-lab="${CSS.escape(data.lab_id)}"]`,
        )
      : null;
    if ((data.kind === "deleted" || data.kind === "pruned") && row) {
      row.remove();
    } else if (data.kind === "run_finished" && live.matches("table.labs")) {
      // What the run changed comes as lab events of its own.
    } else if (live.matches("table.fleet") && !["run_finished", "deleted", "pruned"].includes(data.kind)) {
      // A run's own lab events: its end redraws the fleet once.
    } else if (live.matches("article.lab") && data.lab_id !== live.dataset.lab) {
      // Another lab's.
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
    for (const kind of ["discovered", "changed", "state_changed", "deleted", "pruned", "delete_failed", "run_finished"]) {
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

// The fleet's actions (admins): each goes through the API, and the page
// is drawn again from the server once it has done.
const fleetMessage = document.getElementById("fleet-message");

function tell(text, bad) {
  if (!fleetMessage) return;
  const line = document.createElement("div");
  line.textContent = text;
  if (bad) line.className = "error";
  fleetMessage.prepend(line);
}

async function redrawFleet() {
  const r = await fetch(location.href, { credentials: "same-origin" });
  if (!r.ok) return;
  const fresh = new DOMParser().parseFromString(await r.text(), "text/html");
  const body = fresh.querySelector("table.fleet tbody");
  const current = document.querySelector("table.fleet tbody");
  if (body && current) current.replaceWith(body);
}

function runLine(run) {
  const counts = `created ${run.created}, updated ${run.updated}, pruned ${run.pruned}, held ${run.held}, failed ${run.failed}`;
  const why = run.error ? `: ${run.error}` : run.skip_reason ? `: ${run.skip_reason}` : "";
  return `Refresh of ${run.worker_id} ${run.status} (${counts})${why}`;
}

// Follows a started run until it ends, then says how and redraws.
async function followRun(run) {
  let wait = 300;
  for (;;) {
    const { status, body } = await api("GET", `/api/v1/refresh-runs/${encodeURIComponent(run.run_id)}`);
    if (status !== 200) {
      tell(problemText(body, status), true);
      return;
    }
    if (body.status !== "running") {
      tell(runLine(body), body.status === "failed");
      await redrawFleet();
      return;
    }
    // A long run is asked less and less often (a run whose process died
    // reads as failed a lease's lifetime later).
    wait = Math.min(wait * 1.5, 5000);
    await new Promise((resolve) => setTimeout(resolve, wait));
  }
}

async function startRefresh(worker, query) {
  const { status, body } = await api(
    "POST",
    `/api/v1/workers/${encodeURIComponent(worker)}/labs/refresh${query}`,
    undefined,
    { prefer: "respond-async" },
  );
  if (status === 202) {
    tell(`Refresh of ${worker} started`);
    await redrawFleet();
    await followRun(body);
  } else {
    tell(problemText(body, status), true);
  }
}

let removing = null;

document.addEventListener("click", async (e) => {
  const button = e.target.closest("button");
  if (!button) return;
  const worker = button.dataset.worker;
  if (button.matches("button.refresh")) {
    button.disabled = true;
    await startRefresh(worker, "");
  } else if (button.matches("button.apply-prune")) {
    // A held prune, applied by an admin after reviewing its labs.
    button.disabled = true;
    await startRefresh(worker, "?force_prune=true");
  } else if (button.id === "refresh-all") {
    button.disabled = true;
    const { status, body } = await api("POST", "/api/v1/labs/refresh");
    if (status === 202) {
      tell(`Refresh of ${body.length} workers started`);
      await redrawFleet();
      await Promise.all(body.map(followRun));
    } else {
      tell(problemText(body, status), true);
    }
    button.disabled = false;
  } else if (button.matches("button.check")) {
    tell(`Testing the connection of ${worker}…`);
    const { status, body } = await api("POST", `/api/v1/workers/${encodeURIComponent(worker)}/connection-check`, {});
    if (status === 200) tell(`${worker}: ${body.ok ? "connection works" : body.problem}: ${body.detail}`, !body.ok);
    else tell(problemText(body, status), true);
  } else if (button.matches("button.toggle")) {
    const enabled = button.dataset.enable === "true";
    const { status, body } = await api("PATCH", `/api/v1/workers/${encodeURIComponent(worker)}`, { enabled });
    if (status === 200) {
      tell(`${worker} ${enabled ? "enabled" : "disabled"}`);
      await redrawFleet();
    } else {
      tell(problemText(body, status), true);
    }
  } else if (button.matches("button.remove")) {
    removing = worker;
    document.getElementById("r-name").textContent = button.closest("tr").dataset.name;
    document.getElementById("r-message").textContent = "";
    document.getElementById("confirm-remove").showModal();
  } else if (button.id === "r-cancel") {
    document.getElementById("confirm-remove").close();
  } else if (button.id === "r-remove") {
    const { status, body } = await api("DELETE", `/api/v1/workers/${encodeURIComponent(removing)}`);
    if (status === 204) {
      document.getElementById("confirm-remove").close();
      tell(`${removing} removed`);
      await redrawFleet();
    } else {
      document.getElementById("r-message").textContent = problemText(body, status);
    }
  }
});

// The worker form: test the connection, then save, both through the API.
const workerForm = document.getElementById("worker-form");

function workerFields(form) {
  const f = new FormData(form);
  const text = (k) => (f.get(k) ?? "").toString();
  const body = {
    name: text("name") || undefined,
    base_url: text("base_url"),
    username: text("username"),
    insecure: f.has("insecure"),
    allow_http: f.has("allow_http"),
    enabled: f.has("enabled"),
    lab_tiles: f.has("lab_tiles"),
  };
  if (text("password")) body.password = text("password");
  if (text("ca_cert_pem").trim()) body.ca_cert_pem = text("ca_cert_pem");
  if (form.dataset.mode === "new") body.id = text("id");
  return body;
}

if (workerForm) {
  const say = (text, bad) => {
    const m = document.getElementById("w-message");
    m.textContent = text;
    m.className = bad ? "error" : "";
  };
  const editing = workerForm.dataset.mode === "edit";
  const id = workerForm.dataset.worker;
  // An edit sends what the person changed, nothing else.
  const initial = workerFields(workerForm);
  const changed = (fields) =>
    Object.fromEntries(Object.entries(fields).filter(([k, v]) => JSON.stringify(v) !== JSON.stringify(initial[k])));
  document.getElementById("w-test").addEventListener("click", async () => {
    say("Testing…");
    const fields = workerFields(workerForm);
    // An edit is tried as it would be saved: the stored settings and
    // password, changed as the form says.
    const r = editing
      ? await api("POST", `/api/v1/workers/${encodeURIComponent(id)}/connection-check`, changed(fields))
      : await api("POST", "/api/v1/connection-checks", fields);
    if (r.status === 200) say(`${r.body.ok ? "Connection works" : `Failed (${r.body.problem})`}: ${r.body.detail}`, !r.body.ok);
    else say(problemText(r.body, r.status), true);
  });
  workerForm.addEventListener("submit", async (e) => {
    e.preventDefault();
    say("Saving…");
    const fields = workerFields(workerForm);
    const r = editing
      ? await api("PATCH", `/api/v1/workers/${encodeURIComponent(id)}`, changed(fields))
      : await api("POST", "/api/v1/workers", fields);
    if (r.status === 200 || r.status === 201) location.assign("/fleet");
    else say(problemText(r.body, r.status), true);
  });
}
