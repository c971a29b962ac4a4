"""The page served at `/`: one self-contained HTML file (no build step, no external assets) to read a document into a
memory and chat over it, through the same API any client uses."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>longllama serve</title>
<style>
body{font:15px/1.45 system-ui,sans-serif;margin:0;color:#1b1f24;background:#f6f7f9}
main{max-width:960px;margin:0 auto;padding:16px;display:grid;grid-template-columns:300px 1fr;gap:16px}
section{background:#fff;border:1px solid #d8dde3;border-radius:8px;padding:12px}
h1{font-size:18px;margin:12px 16px 0}h2{font-size:15px;margin:0 0 8px}
input,select,textarea,button{font:inherit}input[type=password],select,textarea{width:100%;box-sizing:border-box}
#drop{border:2px dashed #9aa5b1;border-radius:8px;padding:18px;text-align:center;color:#57606a;cursor:pointer}
#drop.over{background:#eef4ff;border-color:#3b82f6}progress{width:100%}
#memories{list-style:none;padding:0;margin:0}#memories li{padding:6px;border-radius:6px;cursor:pointer;font-size:13px}
#memories li.current{background:#e6efff}#memories li button{float:right;font-size:12px}
#log{min-height:260px;max-height:60vh;overflow:auto;white-space:pre-wrap}
.q{color:#0b5394;margin-top:10px}.a{margin:4px 0 0}.err{color:#b42318}.small{font-size:12px;color:#57606a}
</style></head><body>
<h1>longllama serve <span class="small" id="model"></span></h1>
<main>
<div>
<section><h2>API key</h2><input id="key" type="password" placeholder="only if the server has --api-key"
 autocomplete="off"></section>
<section><h2>Document</h2>
<div id="drop">Drop a text file here, or click to pick one</div>
<input id="file" type="file" hidden>
<label class="small">format <select id="template"><option value="">chat (server default)</option>
<option value="none">plain continuation (base model)</option></select></label>
<progress id="progress" max="1" value="0"></progress><div id="status" class="small"></div></section>
<section><h2>Memories</h2><ul id="memories"></ul><button id="refresh">refresh</button></section>
</div>
<section><h2>Chat <span class="small" id="current">(no memory: plain chat)</span></h2>
<div id="log"></div>
<textarea id="question" rows="3" placeholder="Ask about the document (Ctrl+Enter sends)"></textarea>
<button id="send">Send</button> <button id="reset">New conversation</button>
<div id="stats" class="small"></div></section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let modelId = null, current = null, history = [], busy = false;
$("key").value = sessionStorage.getItem("longllama-key") || "";
$("key").addEventListener("change", () => {
  sessionStorage.setItem("longllama-key", $("key").value); listMemories();
});
function headers(json) {
  const h = {};
  if ($("key").value) h["Authorization"] = "Bearer " + $("key").value;
  if (json) h["Content-Type"] = "application/json";
  return h;
}
async function errorText(response) {
  try { return (await response.json()).error.message; }
  catch (e) { return response.status + " " + response.statusText; }
}
function setStatus(text, error) {
  $("status").textContent = text; $("status").className = error ? "small err" : "small";
}
async function health() {
  const r = await fetch("/health"); const body = await r.json();
  modelId = body.model; $("model").textContent = modelId;
}
async function listMemories() {
  const r = await fetch("/v1/memories", {headers: headers()});
  if (!r.ok) { setStatus(await errorText(r), true); return; }
  const list = $("memories"); list.textContent = "";
  for (const m of (await r.json()).data) {
    const li = document.createElement("li"); li.dataset.id = m.id; li.dataset.template = m.template;
    li.textContent = m.tokens + " tokens, " + m.template + ", " + new Date(m.created * 1000).toLocaleString();
    if (current && current.id === m.id) li.className = "current";
    const del = document.createElement("button"); del.textContent = "delete";
    del.onclick = async (event) => {
      event.stopPropagation();
      const d = await fetch("/v1/memories/" + m.id, {method: "DELETE", headers: headers()});
      if (!d.ok) setStatus(await errorText(d), true);
      if (current && current.id === m.id) useMemory(null);
      listMemories();
    };
    li.appendChild(del); li.onclick = () => useMemory(m); list.appendChild(li);
  }
}
function useMemory(m) {
  current = m; history = []; $("log").textContent = "";
  $("current").textContent = m ? "over memory " + m.id.slice(0, 12) + "… (" + m.tokens + " tokens)"
                               : "(no memory: plain chat)";
  for (const li of $("memories").children) li.className = m && li.dataset.id === m.id ? "current" : "";
}
function upload(file) {
  // ?stream=true: the reply streams the reading's progress (server-sent events), then the memory
  const form = new FormData(); form.append("file", file);
  if ($("template").value) form.append("template", $("template").value);
  const xhr = new XMLHttpRequest(); const start = performance.now(); let seen = 0, memory = null, failure = null;
  xhr.open("POST", "/v1/memories?stream=true");
  for (const [k, v] of Object.entries(headers())) xhr.setRequestHeader(k, v);
  xhr.upload.onprogress = (e) => {
    if (!e.lengthComputable) return;
    $("progress").value = e.loaded / e.total;
    setStatus("uploading " + file.name + ": " + Math.round(100 * e.loaded / e.total) + "%");
  };
  xhr.upload.onload = () => {
    $("progress").removeAttribute("value"); setStatus("reading " + file.name + " into memory…");
  };
  const readEvents = () => {
    let cut;
    while ((cut = xhr.responseText.indexOf("\\n\\n", seen)) >= 0) {
      const event = xhr.responseText.slice(seen, cut); seen = cut + 2;
      if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
      const data = JSON.parse(event.slice(6));
      if (data.error) failure = data.error.message;
      else if (data.object === "memory.progress") {
        $("progress").value = data.tokens / data.total;
        setStatus("reading " + file.name + ": " + data.tokens + " / " + data.total + " tokens");
      } else if (data.object === "memory") memory = data;
    }
  };
  xhr.onprogress = () => { if (xhr.status === 200) readEvents(); };
  xhr.onload = () => {
    $("progress").value = 1;
    if (xhr.status !== 200) {
      let body = null; try { body = JSON.parse(xhr.responseText); } catch (e) {}
      setStatus(body && body.error ? body.error.message : "upload failed: " + xhr.status, true); return;
    }
    readEvents();
    if (failure || !memory) { setStatus(failure || "the reply held no memory", true); return; }
    const seconds = (performance.now() - start) / 1000;
    setStatus(file.name + ": " + memory.tokens + " tokens in " + seconds.toFixed(1) + " s");
    useMemory(memory); listMemories();
  };
  xhr.onerror = () => setStatus("upload failed: the server could not be reached", true);
  xhr.send(form);
}
$("drop").onclick = () => $("file").click();
$("file").addEventListener("change", () => { if ($("file").files.length) upload($("file").files[0]); });
$("drop").addEventListener("dragover", (e) => { e.preventDefault(); $("drop").className = "over"; });
$("drop").addEventListener("dragleave", () => { $("drop").className = ""; });
$("drop").addEventListener("drop", (e) => {
  e.preventDefault(); $("drop").className = ""; if (e.dataTransfer.files.length) upload(e.dataTransfer.files[0]);
});
$("refresh").onclick = listMemories;
$("reset").onclick = () => useMemory(current);
function add(cls, text) {
  const div = document.createElement("div"); div.className = cls; div.textContent = text;
  $("log").appendChild(div); return div;
}
async function send() {
  const question = $("question").value; if (!question.trim() || busy) return;
  busy = true; $("send").disabled = true; $("question").value = "";
  add("q", question); const answer = add("a", ""); answer.dataset.done = "0";
  const plain = current && current.template === "none";
  const body = {model: modelId, stream: true, stream_options: {include_usage: true}, max_tokens: 256, temperature: 0};
  if (current) body.memory = current.id;
  if (plain) body.prompt = question; else body.messages = history.concat([{role: "user", content: question}]);
  if (plain) body.stop = ["\\n"];
  const start = performance.now(); let first = null, text = "", usage = null;
  try {
    const route = plain ? "/v1/completions" : "/v1/chat/completions";
    const r = await fetch(route, {method: "POST", headers: headers(true), body: JSON.stringify(body)});
    if (!r.ok) throw new Error(await errorText(r));
    const reader = r.body.getReader(); const decoder = new TextDecoder(); let buffer = "";
    for (;;) {
      const {value, done} = await reader.read(); if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\\n\\n")) >= 0) {
        const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6); if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const piece = plain ? choice.text : (choice.delta && choice.delta.content) || "";
          if (piece) { if (first === null) first = performance.now(); text += piece; answer.textContent = text; }
        }
        $("log").scrollTop = $("log").scrollHeight;
      }
    }
    if (!plain) history.push({role: "user", content: question}, {role: "assistant", content: text});
    const total = (performance.now() - start) / 1000, ttft = ((first || performance.now()) - start) / 1000;
    if (usage) {
      const cached = usage.prompt_tokens_details.cached_tokens;
      const rate = usage.completion_tokens / Math.max(total - ttft, 1e-3);
      $("stats").textContent = "prompt " + usage.prompt_tokens + " tokens (" + cached + " from memory), answer " +
        usage.completion_tokens + " tokens; first token " + ttft.toFixed(2) + " s, total " + total.toFixed(2) +
        " s, " + rate.toFixed(1) + " tokens/s";
    }
  } catch (e) { answer.className = "a err"; answer.textContent = e.message; }
  answer.dataset.done = "1"; busy = false; $("send").disabled = false;
}
$("send").onclick = send;
$("question").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) send(); });
health().then(listMemories);
</script></body></html>
"""
