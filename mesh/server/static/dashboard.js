// mesh dashboard: polls /dashboard/state once a second, draws the mesh, streams a chat.
"use strict";

const $ = (id) => document.getElementById(id);
let key = localStorage.getItem("mesh-api-key") || "";
let last = null;          // previous state, for tokens/s
let model = null;
const history = [];       // the chat's messages

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

function bytes(n) {
  if (n === null || n === undefined) return "?";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(i >= 2 ? 1 : 0) + " " + units[i];
}

function bar(fraction, start, cls, label) {
  const b = el("div", { class: "bar" });
  const f = el("div", { class: "fill " + (cls || "") });
  f.style.left = (100 * start) + "%";
  f.style.width = Math.max(0.5, 100 * fraction) + "%";
  b.append(f, el("span", { class: "label" }, label));
  return b;
}

function drawNodes(state) {
  const box = $("nodes");
  box.replaceChildren();
  for (const n of state.nodes) {
    const card = el("div", { class: "node" + (n.up ? "" : " down"), "data-node": n.name,
                             "data-state": n.up ? "up" : "down" });
    const speed = [];
    if (n.compute_ms !== null && n.compute_ms !== undefined)
      speed.push("compute " + n.compute_ms.toFixed(1) + " ms/token");
    if (n.step_ms !== null && n.step_ms !== undefined && n.address !== "local")
      speed.push("step " + n.step_ms.toFixed(1) + " ms");
    card.append(el("div", { class: "head" },
      el("span", { class: "name" }, n.name),
      el("span", { class: "addr" }, n.address || ""),
      el("span", { class: "layers" }, n.layers ? "layers " + n.layers : ""),
      el("span", { class: "speed" }, speed.join(" · ")),
      el("span", { class: "state" }, n.up ? "up" : "down")));
    if (n.total && n.start !== null && n.end !== null) {
      card.append(bar((n.end - n.start) / n.total, n.start / n.total, "",
                      `layers ${n.layers} of ${n.total}`));
    }
    if (n.rss_bytes) {
      const cap = n.capacity_bytes || n.rss_bytes;
      const mem = bar(n.rss_bytes / cap, 0, "",
                      `memory ${bytes(n.rss_bytes)} of ${bytes(cap)} (KV ${bytes(n.kv_bytes)})`);
      const kv = el("div", { class: "fill kv" });
      kv.style.left = "0"; kv.style.width = (100 * (n.kv_bytes || 0) / cap) + "%";
      mem.insertBefore(kv, mem.lastChild);
      card.append(mem);
    }
    box.append(card);
  }
  const members = $("members");
  members.replaceChildren();
  if (state.members.length) {
    members.append(el("h2", {}, "Ensemble members" + (state.strategy ? " · " + state.strategy : "")));
    const total = state.members.reduce((a, m) => a + (m.up ? m.weight : 0), 0) || 1;
    for (const m of state.members) {
      const card = el("div", { class: "node" + (m.up ? "" : " down"), "data-member": m.name,
                               "data-state": m.up ? "up" : "down" });
      card.append(el("div", { class: "head" }, el("span", { class: "name" }, m.name),
        el("span", { class: "addr" }, m.model), el("span", { class: "state" }, m.up ? "up" : "down")));
      card.append(bar(m.up ? m.weight / total : 0, 0, "", "weight " + m.weight.toFixed(3)));
      members.append(card);
    }
  }
}

function drawTopology(state) {
  const svg = $("topology");
  const ns = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  const boxes = [{ name: "client", cls: "client" }];
  if (state.mode === "ensemble") {
    boxes.push({ name: "coordinator", cls: "" });
  }
  const chain = state.mode === "ensemble" ? state.members : state.nodes;
  const w = svg.clientWidth || 600;
  const main = state.mode === "ensemble" ? boxes : boxes.concat(chain.filter((n) => n.up));
  const side = state.mode === "ensemble" ? chain : chain.filter((n) => !n.up);
  const bw = 110, bh = 30;
  const step = Math.max(bw + 20, (w - 20) / Math.max(main.length + (side.length ? 1 : 0), 1));
  const shape = (x, y, n, cls) => {
    const r = document.createElementNS(ns, "rect");
    r.setAttribute("x", x); r.setAttribute("y", y); r.setAttribute("width", bw);
    r.setAttribute("height", bh); r.setAttribute("class", cls);
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", x + 8); t.setAttribute("y", y + 19);
    t.textContent = n.length > 15 ? n.slice(0, 14) + "…" : n;
    svg.append(r, t);
  };
  const line = (x1, y1, x2, y2, cls) => {
    const l = document.createElementNS(ns, "line");
    l.setAttribute("x1", x1); l.setAttribute("y1", y1); l.setAttribute("x2", x2);
    l.setAttribute("y2", y2); l.setAttribute("class", "link " + cls);
    svg.append(l);
  };
  main.forEach((n, i) => {
    const x = 10 + i * step;
    if (i > 0) line(x - step + bw, 45 + bh / 2, x, 45 + bh / 2, "");
    shape(x, 45, n.name, n.cls !== undefined ? n.cls : (n.up ? "" : "down"));
  });
  const sx = 10 + main.length * step;
  side.forEach((n, i) => {
    const y = 8 + i * (bh + 8);
    line(sx - step + bw, 45 + bh / 2, sx, y + bh / 2, n.up ? "" : "down");
    shape(sx, y, n.name, n.up ? "" : "down");
  });
}

function drawEvents(state) {
  const ul = $("events");
  ul.replaceChildren(...state.events.slice().reverse().map((e) => el("li", {}, e)));
  if (!state.events.length) ul.append(el("li", {}, "no node losses or re-plans"));
}

async function poll() {
  try {
    const r = await fetch("/dashboard/state", { headers: headers() });
    if (r.status === 401) { $("keybox").hidden = false; $("status").textContent = "API key needed"; return; }
    if (!r.ok) throw new Error("HTTP " + r.status);
    const state = await r.json();
    model = state.model;
    $("model").textContent = state.model;
    $("mode").textContent = state.mode;
    $("status").textContent = state.status;
    $("status").className = "pill " + (state.status === "ok" ? "ok" : "bad");
    $("running").textContent = state.running;
    $("queued").textContent = state.queued;
    if (last) {
      const dt = state.time - last.time;
      if (dt > 0) $("tps").textContent = ((state.generated_tokens - last.generated_tokens) / dt).toFixed(1);
    }
    last = state;
    drawNodes(state);
    drawTopology(state);
    drawEvents(state);
  } catch (err) {
    $("status").textContent = "unreachable";
    $("status").className = "pill bad";
  }
}

async function send(text) {
  history.push({ role: "user", content: text });
  $("log").append(el("div", { class: "msg user" }, text));
  const out = el("div", { class: "msg assistant", "data-streaming": "1" }, "");
  $("log").append(out);
  $("send").disabled = true;
  let answer = "";
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify({ model: model, messages: history, stream: true, max_tokens: 256 }),
    });
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || "HTTP " + r.status);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, i); buf = buf.slice(i + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          for (const c of chunk.choices || []) {
            if (c.delta && c.delta.content) {
              answer += c.delta.content; out.textContent = answer;
              out.dataset.chunks = String(Number(out.dataset.chunks || 0) + 1);
            }
          }
          $("log").scrollTop = $("log").scrollHeight;
        }
      }
    }
    history.push({ role: "assistant", content: answer });
  } catch (err) {
    out.classList.add("error");
    out.textContent = answer + " [" + err.message + "]";
    history.pop();
  } finally {
    out.setAttribute("data-streaming", "0");
    $("send").disabled = false;
  }
}

$("chat").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || $("send").disabled) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("chat").requestSubmit(); }
});
$("savekey").addEventListener("click", () => {
  key = $("key").value.trim();
  localStorage.setItem("mesh-api-key", key);
  $("keybox").hidden = true;
  poll();
});

poll();
setInterval(poll, 1000);
