// The console's only script (the CSP allows no inline script): passkey ceremonies.
// A passkey button asks the broker for options (the challenge names the action, its subject and
// the spec hash), runs the WebAuthn ceremony, puts the response in the form and submits it.
"use strict";

function b64u(buf) {
  const bytes = new Uint8Array(buf);
  let s = "";
  for (const b of bytes) s += String.fromCharCode(b);
  return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function unb64u(s) {
  s = s.replace(/-/g, "+").replace(/_/g, "/");
  while (s.length % 4) s += "=";
  return Uint8Array.from(atob(s), (c) => c.charCodeAt(0));
}

function csrf() {
  return document.querySelector('meta[name="csrf-token"]').content;
}

async function options(url, body) {
  const resp = await fetch(url, {
    method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf()},
    body: JSON.stringify(body),
  });
  const data = await resp.json();
  if (!resp.ok) throw new Error(data.error || "refused");
  return data;
}

function credentialJSON(cred) {
  const r = cred.response;
  const response = {clientDataJSON: b64u(r.clientDataJSON)};
  if (r.attestationObject) {
    response.attestationObject = b64u(r.attestationObject);
    if (r.getTransports) response.transports = r.getTransports();
  } else {
    response.authenticatorData = b64u(r.authenticatorData);
    response.signature = b64u(r.signature);
    if (r.userHandle) response.userHandle = b64u(r.userHandle);
  }
  return JSON.stringify({id: cred.id, rawId: b64u(cred.rawId), type: cred.type, response,
                         clientExtensionResults: cred.getClientExtensionResults()});
}

function showError(message) {
  let p = document.getElementById("error");
  if (!p) {
    p = document.createElement("p");
    p.id = "error";
    p.className = "error";
    document.querySelector("main").prepend(p);
  }
  p.textContent = message;  // text, never HTML
}

async function assertWith(button) {
  const form = button.form;
  const body = {action: button.dataset.action, subject: button.dataset.subject};
  for (const name of ["repo", "change_type", "approver"]) {
    if (form.elements[name]) body[name] = form.elements[name].value;
  }
  if (body.action === "signin") body.subject = body.approver;
  const data = await options(form.dataset.optionsUrl, body);
  const pk = data.options;
  pk.challenge = unb64u(pk.challenge);
  for (const c of pk.allowCredentials || []) c.id = unb64u(c.id);
  const cred = await navigator.credentials.get({publicKey: pk});
  form.elements.challenge_id.value = data.challenge_id;
  form.elements.credential.value = credentialJSON(cred);
  form.submit();
}

async function createWith(button) {
  const form = button.form;
  const data = await options(form.dataset.optionsUrl, {});
  const pk = data.options;
  pk.challenge = unb64u(pk.challenge);
  pk.user.id = unb64u(pk.user.id);
  for (const c of pk.excludeCredentials || []) c.id = unb64u(c.id);
  const cred = await navigator.credentials.create({publicKey: pk});
  form.elements.challenge_id.value = data.challenge_id;
  form.elements.credential.value = credentialJSON(cred);
  form.submit();
}

// A code works once: after a sign-in (or an action) with a code, the code on the approver's
// screen is spent. The page counts down to the next one, and a code form holding the code just
// spent in this tab is held (not sent, so no refusal is recorded) until the next code is due.
const SPENT = "intake-spent-code";
const PENDING = "intake-sent-code";
let codeDueIn = 0;

function remember(form) {
  // Sent, not yet known to be spent: the next page says (no error shown: it was accepted).
  const code = form.elements.code ? form.elements.code.value.trim() : "";
  if (code) sessionStorage.setItem(PENDING, code);
}

function settleSentCode() {
  const sent = sessionStorage.getItem(PENDING);
  sessionStorage.removeItem(PENDING);
  if (sent && !document.getElementById("error")) sessionStorage.setItem(SPENT, sent);  // a spent one-time code
}

function guardCodeForms() {
  for (const form of document.querySelectorAll("form")) {
    if (!form.querySelector("button.totp-submit")) continue;
    form.addEventListener("submit", (event) => {
      const code = form.elements.code ? form.elements.code.value.trim() : "";
      if (codeDueIn > 0 && code && code === sessionStorage.getItem(SPENT)) {
        event.preventDefault();
        showError(`That code was already used (a code works once); your next code is due in ${codeDueIn} s.`);
        return;
      }
      remember(form);
    });
  }
}

function waitForNextCode() {
  const notice = document.getElementById("next-code");
  if (!notice) return;
  codeDueIn = parseInt(notice.dataset.dueIn, 10) || 0;
  const tick = () => {
    if (codeDueIn > 0) {
      notice.querySelector(".due").textContent = String(codeDueIn);
      codeDueIn -= 1;
      setTimeout(tick, 1000);
    } else {
      notice.textContent = "Your next authenticator code is ready.";
    }
  };
  tick();
}

document.addEventListener("DOMContentLoaded", () => {
  settleSentCode();
  waitForNextCode();
  guardCodeForms();
  for (const b of document.querySelectorAll("button.passkey-assert")) {
    b.addEventListener("click", () => assertWith(b).catch((e) => showError("passkey: " + e.message)));
  }
  for (const b of document.querySelectorAll("button.passkey-create")) {
    b.addEventListener("click", () => createWith(b).catch((e) => showError("passkey: " + e.message)));
  }
});

// Live updates (progressive enhancement: every page works without this). The broker streams one
// "change" event per audit entry (/console/events, Server-Sent Events); the page then fetches its
// own URL and swaps its [data-live] parts, so forms being filled in are never replaced, and says
// so in the polite live region for screen readers.
(function live() {
  const url = document.body && document.body.dataset.events;
  const parts = document.querySelectorAll("[data-live]");
  if (!url || !parts.length || !window.EventSource) return;
  let pending = false;
  async function refresh() {
    pending = false;
    const resp = await fetch(window.location.href, {credentials: "same-origin"});
    if (!resp.ok) return;
    const doc = new DOMParser().parseFromString(await resp.text(), "text/html");
    for (const part of parts) {
      const fresh = doc.getElementById(part.id);
      if (fresh) part.replaceChildren(...Array.from(fresh.childNodes).map((n) => document.importNode(n, true)));
    }
    const status = document.getElementById("live-status");
    if (status) status.textContent = "Updated " + new Date().toLocaleTimeString();
    document.body.dataset.liveUpdates = String(Number(document.body.dataset.liveUpdates || 0) + 1);
  }
  const source = new EventSource(url);
  source.addEventListener("change", () => {
    if (!pending) { pending = true; setTimeout(refresh, 200); }  // one fetch per burst of events
  });
  source.addEventListener("open", () => { document.body.dataset.liveConnected = "1"; });
})();

// A countdown beside every code field: codes change every 30 s, and each step's code works once,
// so an action right after another needs the next one.
(function countdown() {
  const fields = document.querySelectorAll("input.code");
  if (!fields.length) return;
  const notes = Array.from(fields).map((field) => {
    const note = document.createElement("span");
    note.className = "countdown muted";
    note.setAttribute("aria-live", "off");
    field.closest("label").after(note);
    return note;
  });
  function tick() {
    const left = 30 - Math.floor(Date.now() / 1000) % 30;
    for (const note of notes) note.textContent = ` next code in ${left} s (a code works once)`;
  }
  tick();
  setInterval(tick, 1000);
})();
