// scopegate reviewer page: list blocked retrievals, open one, replay it (now, or as of
// the decision with the timeline of the relationship changes since).
// Dependency-free. Every value from the server is rendered as text (text nodes or
// textContent), never as HTML; the token lives in sessionStorage for this tab only.
"use strict";

(() => {
  const TOKEN_KEY = "scopegate.reviewer.token";
  const API = "v1/audit/decisions"; // relative: works behind a path prefix too
  const PAGE_SIZE = 50;

  const $ = (id) => document.getElementById(id);
  const state = { cursor: null, filters: {}, shown: 0, hidden: 0, current: null, whatIf: [], previous: null };

  // -- DOM helpers (text only) ---------------------------------------------------------

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (key === "class") node.className = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  function pill(value, extra) {
    const text = value === null || value === undefined ? "–" : String(value);
    return el("span", { class: "pill " + text.replace(/[^a-z_]/g, "") + (extra ? " " + extra : "") }, text.replace(/_/g, " "));
  }

  function checks(names) {
    if (!names || names.length === 0) return "–";
    return names.map((name) => el("span", { class: "check-name" }, name));
  }

  function explanations(lines) {
    if (!lines || lines.length === 0) return "–";
    return el("ul", { class: "explain" }, lines.map((line) => el("li", {}, line)));
  }

  function when(iso) {
    const moment = new Date(iso);
    if (Number.isNaN(moment.getTime())) return String(iso);
    return moment.toISOString().replace("T", " ").slice(0, 19);
  }

  function setStatus(id, text, bad) {
    const node = $(id);
    node.textContent = text || "";
    node.classList.toggle("bad", Boolean(bad));
  }

  // -- token ------------------------------------------------------------------------

  function token() {
    return sessionStorage.getItem(TOKEN_KEY);
  }

  function claims(jwt) {
    try {
      const part = jwt.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      return JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), "=")));
    } catch (err) {
      return {};
    }
  }

  function showSignedIn() {
    const c = claims(token() || "");
    $("whoami").textContent = "signed in as " + (c.sub || "?") + " @ " + (c.tenant || "?");
    $("session").hidden = false;
    $("auth").hidden = true;
    $("browse").hidden = false;
  }

  function signOut(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    $("session").hidden = true;
    $("auth").hidden = false;
    $("browse").hidden = true;
    $("detail").hidden = true;
    clear($("decision-rows"));
    setStatus("auth-status", message || "", Boolean(message));
  }

  // -- API ----------------------------------------------------------------------------

  async function api(method, path, body) {
    const headers = { authorization: "Bearer " + token(), accept: "application/json" };
    const init = { method, headers, cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer" };
    if (body !== undefined) {
      headers["content-type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    let data = null;
    try {
      data = await response.json();
    } catch (err) {
      data = null;
    }
    if (!response.ok) {
      const detail = (data && data.error) || {};
      const error = new Error(detail.message || "HTTP " + response.status);
      error.status = response.status;
      throw error;
    }
    return data;
  }

  function failed(statusId, error) {
    if (error.status === 401) {
      signOut("The token was rejected: " + error.message);
    } else if (error.status === 403) {
      setStatus(statusId, "Forbidden: this token's user is not a reviewer of its tenant.", true);
    } else {
      setStatus(statusId, "Error: " + error.message, true);
    }
  }

  // -- list ---------------------------------------------------------------------------

  function readFilters() {
    return {
      outcome: $("f-outcome").value,
      user: $("f-user").value.trim(),
      agent: $("f-agent").value.trim(),
      task: $("f-task").value.trim(),
      blockedOnly: $("f-blocked").checked,
    };
  }

  async function search() {
    state.filters = readFilters();
    state.cursor = null;
    state.shown = 0;
    state.hidden = 0;
    clear($("decision-rows"));
    await loadPage();
  }

  async function loadPage() {
    const params = new URLSearchParams({ limit: String(PAGE_SIZE) });
    for (const key of ["outcome", "user", "agent", "task"]) {
      if (state.filters[key]) params.set(key, state.filters[key]);
    }
    if (state.cursor) params.set("cursor", state.cursor);
    setStatus("list-status", "Loading…");
    let page;
    try {
      page = await api("GET", API + "?" + params.toString());
    } catch (error) {
      failed("list-status", error);
      return;
    }
    for (const decision of page.decisions) {
      const blocked = decision.kind === "retrieve" && decision.blocked > 0;
      if (state.filters.blockedOnly && !blocked) {
        state.hidden += 1;
        continue;
      }
      $("decision-rows").append(decisionRow(decision));
      state.shown += 1;
    }
    state.cursor = page.next_cursor;
    $("more").hidden = !state.cursor;
    const hidden = state.hidden ? " (" + state.hidden + " without blocked candidates hidden)" : "";
    setStatus("list-status", state.shown + " decision(s)" + hidden + (state.cursor ? "; more available" : ""));
  }

  function decisionRow(d) {
    const open = () => openDetail(d.request_id);
    const row = el(
      "tr",
      { "data-request-id": d.request_id, onclick: open },
      el("td", { class: "mono" }, when(d.time)),
      el("td", {}, d.user),
      el("td", {}, d.agent || "–"),
      el("td", { class: "mono" }, d.task || "–"),
      el("td", {}, pill(d.outcome)),
      el("td", { class: "num" }, d.candidates),
      el("td", { class: "num" }, d.blocked),
      el("td", {}, el("button", { type: "button", class: "link", onclick: (event) => { event.stopPropagation(); open(); } }, "Open")),
    );
    return row;
  }

  // -- detail -------------------------------------------------------------------------

  async function openDetail(requestId, from) {
    for (const row of $("decision-rows").children) {
      row.classList.toggle("selected", row.getAttribute("data-request-id") === requestId);
    }
    let record;
    try {
      record = await api("GET", API + "/" + encodeURIComponent(requestId));
    } catch (error) {
      failed("list-status", error);
      return;
    }
    state.current = record;
    state.previous = from || null;
    state.whatIf = [];
    renderWhatIf();
    $("back-to-decision").hidden = !state.previous;
    const admin = record.kind === "admin";
    $("detail-title").textContent = (admin ? "Admin request " : "Decision ") + record.request_id;
    renderMeta(record);
    renderAdminChanges(record);
    $("verdicts-title").hidden = admin;
    $("verdicts-box").hidden = admin;
    const rows = $("verdict-rows");
    clear(rows);
    for (const c of record.candidates) {
      rows.append(
        el(
          "tr",
          { "data-document": c.document_id },
          el("td", { class: "mono" }, c.document_id),
          el("td", {}, c.source || "–"),
          el("td", {}, pill(c.verdict)),
          el("td", {}, checks(c.failed_checks.concat(c.errored_checks))),
          el("td", {}, explanations(c.explanations)),
        ),
      );
    }
    if (record.candidates.length === 0) {
      rows.append(el("tr", {}, el("td", { colspan: "5" }, "No candidates were recorded for this request.")));
    }
    const replayable = record.kind === "retrieve" && record.task;
    $("replay").disabled = !replayable;
    $("replay-as-of").disabled = !replayable;
    $("what-if").hidden = !replayable;
    $("replay-result").hidden = true;
    $("asof-result").hidden = true;
    setStatus("replay-status", "");
    $("detail").hidden = false;
    $("detail").scrollIntoView({ behavior: "smooth", block: "start" });
  }

  function local(ref, tenant) {
    return String(ref).split(":" + tenant + "/").join(":");
  }

  function renderAdminChanges(r) {
    const list = $("admin-change-list");
    clear(list);
    const extra = r.extra || {};
    const groups = [["writes", "write"], ["wanted", "write"], ["deletes", "delete"]];
    for (const [key, verb] of groups) {
      for (const t of extra[key] || []) {
        if (!Array.isArray(t) || t.length !== 3) continue;
        list.append(el("li", { "data-op": verb }, verb + " " + local(t[0], r.tenant) + " " + t[1] + " " + local(t[2], r.tenant)));
      }
    }
    $("admin-changes").hidden = r.kind !== "admin";
    if (r.kind === "admin" && !list.firstChild) list.append(el("li", {}, "none recorded here (see the request's intent record)"));
  }

  function renderMeta(r) {
    const meta = $("detail-meta");
    clear(meta);
    const query = r.query !== null ? r.query : "redacted (keyed hash " + String(r.query_hash || "").slice(0, 16) + "…)";
    const fields = [
      ["Time", when(r.time) + " UTC"],
      ["Tenant", r.tenant],
      ["User", r.user],
      ["Agent", r.agent || "–"],
      ["Task", r.task || "–"],
      ["Outcome", pill(r.outcome)],
      ["Query", query],
      ["Sources", (r.sources || []).join(", ") || "–"],
      ["Strategy", r.strategy || "–"],
      ["Authorization model", r.model_id],
      ["Consistency", r.consistency],
      ["Latency", r.latency_ms + " ms"],
      ["Error", r.error_code || "–"],
      ["Action", (r.extra && r.extra.action) ? r.extra.action + (r.extra.phase ? " (" + r.extra.phase + ")" : "") : "–"],
      ["Chain", "entry " + r.seq + ", hash " + String(r.hash).slice(0, 16) + "…"],
    ];
    for (const [name, value] of fields) {
      meta.append(el("dt", {}, name), el("dd", {}, value));
    }
  }

  // -- replay -------------------------------------------------------------------------

  // -- replay as of the decision: then / now and the timeline of changes ------------

  async function replayAsOf() {
    const record = state.current;
    if (!record) return;
    setStatus("replay-status", "Rebuilding the relationships as of the decision…");
    let result;
    try {
      result = await api("POST", API + "/" + encodeURIComponent(record.request_id) + "/replay", { as_of: "decision" });
    } catch (error) {
      failed("replay-status", error);
      return;
    }
    renderAsOf(result);
    setStatus("replay-status", "Rebuilt as of " + when(result.as_of.decided_at) + " UTC and replayed at " + when(result.replayed_at) + " UTC (a scratch store, removed; nothing was written)");
  }

  function renderAsOf(result) {
    const a = result.as_of;
    const exact = a.exact
      ? "Every verdict rebuilt as of the decision matches the record"
      : "The rebuilt verdicts differ from the record for " + a.mismatches.join(", ");
    $("asof-summary").textContent = exact + " · decided " + when(a.decided_at) + " UTC · change-log position " +
      (a.archive_seq === null ? "–" : a.archive_seq) + " · " + a.tuples_reconstructed + " relationships rebuilt · " +
      result.changes.length + " change(s) since";
    const rows = $("asof-rows");
    clear(rows);
    for (const d of result.documents) {
      const match = d.then_matches_was === false ? "then-differs" : "then-match";
      const flips = (d.changes || []).filter((c) => c.flips).length;
      rows.append(
        el(
          "tr",
          { "data-document": d.document_id, class: d.flipped_checks && d.flipped_checks.length ? "changed" : "" },
          el("td", { class: "mono" }, d.document_id),
          el("td", {}, pill(d.was)),
          el("td", {}, pill(d.then, match)),
          el("td", {}, pill(d.now)),
          el("td", { class: "flipped" }, checks(d.flipped_checks)),
          el("td", { class: "num" }, flips),
        ),
      );
    }
    const line = $("timeline");
    clear(line);
    line.append(el("li", { class: "marker", "data-kind": "decision" },
      el("span", { class: "when" }, when(a.decided_at)),
      "Decided (change-log position " + (a.archive_seq === null ? "–" : a.archive_seq) + ")"));
    const flipping = new Set();
    for (const d of result.documents) for (const c of d.changes || []) if (c.flips) flipping.add(c.seq);
    for (const c of result.changes) {
      const verb = c.operation === "write" ? "wrote" : "deleted";
      const by = c.admin_request_id
        ? el("span", { class: "by" }, "by admin request ",
            el("a", { href: "#", class: "admin-link", "data-request-id": c.admin_request_id,
              onclick: (event) => { event.preventDefault(); openDetail(c.admin_request_id, result.request_id); } },
              c.admin_request_id),
            " (" + c.admin_action + ", user:" + c.admin_user + ")")
        : el("span", { class: "by" }, "not made through the gateway");
      line.append(
        el(
          "li",
          { class: c.operation + (flipping.has(c.seq) ? " flips" : ""), "data-seq": c.seq },
          el("span", { class: "when" }, when(c.time)),
          el("span", { class: "op" }, verb),
          el("span", { class: "tuple" }, c.user + " " + c.relation + " " + c.object),
          " ",
          checks(c.checks),
          by,
        ),
      );
    }
    line.append(el("li", { class: "marker", "data-kind": "now" },
      el("span", { class: "when" }, when(result.replayed_at)), "Now"));
    const notes = $("asof-notes");
    clear(notes);
    for (const note of result.notes || []) notes.append(el("li", {}, note));
    $("asof-result").hidden = false;
  }

  async function replay(withWhatIf) {
    const record = state.current;
    if (!record) return;
    const body = withWhatIf && state.whatIf.length ? { what_if: { writes: state.whatIf } } : undefined;
    setStatus("replay-status", "Replaying…");
    let result;
    try {
      result = await api("POST", API + "/" + encodeURIComponent(record.request_id) + "/replay", body);
    } catch (error) {
      failed("replay-status", error);
      return;
    }
    renderReplay(result);
    setStatus("replay-status", "Replayed at " + when(result.replayed_at) + " UTC" + (result.what_if ? " with what-if (nothing was written)" : ""));
  }

  function renderReplay(result) {
    const s = result.summary || {};
    const parts = [];
    for (const key of ["now_allowed", "now_blocked", "still_blocked", "still_allowed"]) {
      if (s[key]) parts.push(s[key] + " " + key.replace(/_/g, " "));
    }
    let summary = parts.join(" · ") || "no candidates";
    if (result.model_changed) summary += " — the authorization model changed since the request";
    if (result.what_if) summary += " — what-if would change " + result.what_if.changed_documents + " document(s)";
    $("replay-summary").textContent = summary;

    const withWhatIf = Boolean(result.what_if);
    for (const cell of document.querySelectorAll(".what-if-col")) cell.hidden = !withWhatIf;
    const rows = $("diff-rows");
    clear(rows);
    for (const d of result.documents) {
      const cells = [
        el("td", { class: "mono" }, d.document_id),
        el("td", {}, pill(d.was)),
        el("td", {}, pill(d.now)),
        el("td", {}, pill(d.now_at_recorded_model)),
        el("td", {}, pill(d.change), d.cause ? el("div", { class: "hint" }, d.cause.replace(/_/g, " ")) : null),
        el("td", {}, checks(d.failed_checks.concat(d.errored_checks || []))),
        el("td", {}, explanations(d.explanations)),
      ];
      if (withWhatIf) {
        const w = d.what_if || {};
        const why = w.explanations && w.explanations.length ? explanations(w.explanations) : null;
        cells.push(el("td", { class: "what-if-col" }, pill(w.verdict), w.changed ? el("div", { class: "hint" }, "would change") : null, why));
      }
      rows.append(el("tr", { "data-document": d.document_id, class: d.changed ? "changed" : "" }, cells));
    }
    const notes = $("replay-notes");
    clear(notes);
    for (const note of result.notes || []) notes.append(el("li", {}, note));
    $("replay-result").hidden = false;
  }

  // -- what-if ------------------------------------------------------------------------

  function renderWhatIf() {
    const list = $("what-if-list");
    clear(list);
    state.whatIf.forEach((w, index) => {
      const remove = () => {
        state.whatIf.splice(index, 1);
        renderWhatIf();
      };
      list.append(el("li", {}, w.user + " " + w.relation + " " + w.object + " ", el("button", { type: "button", class: "link", title: "remove", onclick: remove }, "×")));
    });
    $("replay-what-if").disabled = state.whatIf.length === 0;
  }

  function addWhatIf(event) {
    event.preventDefault();
    const user = $("wi-user").value.trim();
    const object = $("wi-object").value.trim();
    if (!user || !object) {
      setStatus("replay-status", "A what-if needs a user and an object, e.g. agent:summarizer and document:d1.", true);
      return;
    }
    state.whatIf.push({ user, relation: $("wi-relation").value, object });
    $("wi-user").value = "";
    $("wi-object").value = "";
    renderWhatIf();
  }

  // -- wiring -------------------------------------------------------------------------

  function start() {
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("token").value.trim();
      $("token").value = "";
      if (!value) {
        setStatus("auth-status", "Paste a token first.", true);
        return;
      }
      sessionStorage.setItem(TOKEN_KEY, value);
      setStatus("auth-status", "");
      showSignedIn();
      search();
    });
    $("sign-out").addEventListener("click", () => signOut(""));
    $("filters").addEventListener("submit", (event) => {
      event.preventDefault();
      search();
    });
    $("more").addEventListener("click", loadPage);
    $("close-detail").addEventListener("click", () => {
      $("detail").hidden = true;
      state.current = null;
    });
    $("replay").addEventListener("click", () => replay(false));
    $("replay-as-of").addEventListener("click", replayAsOf);
    $("back-to-decision").addEventListener("click", () => {
      if (state.previous) openDetail(state.previous);
    });
    $("replay-what-if").addEventListener("click", () => replay(true));
    $("what-if-form").addEventListener("submit", addWhatIf);
    if (token()) {
      showSignedIn();
      search();
    }
  }

  document.addEventListener("DOMContentLoaded", start);
})();
