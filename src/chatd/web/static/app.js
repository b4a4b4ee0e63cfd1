// chatd's web page: sign in with a token, list and watch chats, chat with a streamed answer.
// Plain JavaScript, no build step, no library. Text from the server is only ever set with
// textContent (never as HTML). Routes live in the URL hash: #/chats/<id>, #/new, #/inbox.
"use strict";

const API = "/api/v1";
const TOKEN_KEY = "chatd.token";
const RECONNECT_MIN_MS = 500;
const RECONNECT_MAX_MS = 10000;

const $ = (id) => document.getElementById(id);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

// -- the API ---------------------------------------------------------------------------------

class ApiFailure extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.code = err.code;
    this.field = err.field;
  }
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${state.token}` };
  const init = { method, headers };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(API + path, init);
  if (response.status === 401) {
    signOut("Your token was refused: sign in again.");
    throw new ApiFailure(401, null);
  }
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok) throw new ApiFailure(response.status, data);
  return data;
}

function socketUrl(path, params) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const query = new URLSearchParams({ access_token: state.token, ...params });
  return `${scheme}//${location.host}${API}${path}?${query}`;
}

function showError(node, error) {
  if (!error) {
    node.hidden = true;
    node.textContent = "";
    return;
  }
  node.textContent = error.field ? `${error.message} (${error.field})` : String(error.message || error);
  node.hidden = false;
}

// A WebSocket that reconnects by itself with a backoff; `url()` is asked again each time.
class LiveSocket {
  constructor(name, url, onFrame, onState) {
    this.name = name;
    this.url = url;
    this.onFrame = onFrame;
    this.onState = onState || (() => {});
    this.delay = RECONNECT_MIN_MS;
    this.closed = false;
    this.ws = null;
    this.timer = null;
    this.open();
  }

  open() {
    if (this.closed) return;
    const ws = new WebSocket(this.url());
    this.ws = ws;
    this.onState("connecting");
    let opened = false;
    ws.onopen = () => {
      opened = true;
      this.delay = RECONNECT_MIN_MS;
      this.onState("open");
    };
    ws.onmessage = (message) => {
      const frame = JSON.parse(message.data);
      for (const event of Array.isArray(frame) ? frame : [frame]) this.onFrame(event);
    };
    ws.onclose = () => {
      if (this.ws !== ws || this.closed) return;
      this.onState("closed");
      // A refused handshake says nothing to a browser: a revoked token signs out (api does).
      if (!opened) api("GET", "/users/me").catch(() => {});
      this.timer = setTimeout(() => this.open(), this.delay);
      this.delay = Math.min(this.delay * 2, RECONNECT_MAX_MS);
    };
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    if (this.ws) this.ws.close(1000);
  }
}

// -- state -----------------------------------------------------------------------------------

const state = {
  token: localStorage.getItem(TOKEN_KEY),
  me: null,
  chats: new Map(), // id -> chat (from GET /chats, kept current by the watch socket)
  showArchived: false,
  watch: null,
  inboxWatch: null,
  unread: 0,
  view: null, // the open chat (ChatView) or null
  modelConfigs: [],
};

// -- sign in ---------------------------------------------------------------------------------

async function signIn(token) {
  state.token = token;
  try {
    state.me = await api("GET", "/users/me");
  } catch (error) {
    state.token = null;
    throw error;
  }
  localStorage.setItem(TOKEN_KEY, token);
  $("signin").hidden = true;
  $("app").hidden = false;
  $("me-name").textContent = state.me.name + (state.me.is_admin ? " (admin)" : "");
  startWatch();
  startInbox();
  route();
}

function signOut(message) {
  localStorage.removeItem(TOKEN_KEY);
  state.token = null;
  for (const socket of [state.watch, state.inboxWatch]) if (socket) socket.close();
  state.watch = state.inboxWatch = null;
  if (state.view) state.view.close();
  state.view = null;
  $("app").hidden = true;
  $("signin").hidden = false;
  showError($("signin-error"), message ? { message } : null);
}

// -- the chat list ---------------------------------------------------------------------------

async function loadChats() {
  const page = await api("GET", `/chats?limit=100&archived=${state.showArchived}`);
  state.chats = new Map(page.chats.map((chat) => [chat.id, chat]));
  renderChatList();
}

function startWatch() {
  state.watch = new LiveSocket(
    "watch",
    () => socketUrl("/chats/watch", {}),
    onWatchEvent,
    (status) => {
      $("watch-state").dataset.state = status;
      // The watch socket carries only what happens while it is open: list again on (re)open.
      if (status === "open") loadChats().catch(() => {});
    },
  );
}

function onWatchEvent(event) {
  const chat = state.chats.get(event.chat_id);
  switch (event.kind) {
    case "created":
      if (event.archived === state.showArchived) {
        state.chats.set(event.chat_id, { id: event.chat_id, title: event.title, status: event.status, archived: event.archived, updated_at: new Date().toISOString() });
      }
      break;
    case "status_change":
      if (event.archived !== state.showArchived) state.chats.delete(event.chat_id);
      else if (chat) Object.assign(chat, { status: event.status, archived: event.archived, updated_at: new Date().toISOString() });
      else loadChats().catch(() => {});
      break;
    case "title_change":
      if (chat) chat.title = event.title;
      if (state.view && state.view.id === event.chat_id) state.view.setTitle(event.title);
      break;
    case "action_required":
      if (chat) chat.status = "requires_action";
      break;
    case "deleted":
      state.chats.delete(event.chat_id);
      if (state.view && state.view.id === event.chat_id) location.hash = "#/";
      break;
    default:
      return;
  }
  renderChatList();
}

function renderChatList() {
  const list = $("chat-list");
  const chats = [...state.chats.values()].sort((a, b) => (b.updated_at || "").localeCompare(a.updated_at || ""));
  list.replaceChildren(
    ...chats.map((chat) => {
      const item = el("li", "chat-item");
      item.dataset.chatId = chat.id;
      if (state.view && state.view.id === chat.id) item.classList.add("active");
      const link = el("a", "chat-link");
      link.href = `#/chats/${chat.id}`;
      link.append(el("span", "chat-item-title", chat.title || "New chat"));
      const status = el("span", `status status-${chat.status}`, chat.status.replace("_", " "));
      status.dataset.status = chat.status;
      link.append(status);
      item.append(link);
      return item;
    }),
  );
}

// -- the inbox -------------------------------------------------------------------------------

function setUnread(count) {
  state.unread = Math.max(0, count);
  const badge = $("inbox-count");
  badge.textContent = String(state.unread);
  badge.hidden = state.unread === 0;
}

function startInbox() {
  state.inboxWatch = new LiveSocket(
    "inbox",
    () => socketUrl("/notifications/inbox/watch", {}),
    (event) => {
      if (event.type !== "notification") return;
      if (!event.read) setUnread(state.unread + 1);
      if (!$("inbox").hidden) $("inbox-list").prepend(notificationItem(event));
    },
    (status) => {
      if (status === "open") loadInbox().catch(() => {});
    },
  );
}

async function loadInbox() {
  const page = await api("GET", "/notifications/inbox?limit=50");
  setUnread(page.unread_count);
  $("inbox-list").replaceChildren(...page.notifications.map(notificationItem));
}

function notificationItem(n) {
  const item = el("li", n.read ? "note read" : "note unread");
  const head = el("div", "row");
  head.append(el("strong", null, n.title), el("span", "hint", new Date(n.created_at).toLocaleString()));
  item.append(head, el("div", null, n.body));
  item.addEventListener("click", async () => {
    if (!n.read) {
      await api("PUT", `/notifications/inbox/${n.id}/read-status`, { read: true });
      n.read = true;
      item.className = "note read";
      setUnread(state.unread - 1);
    }
    if (n.chat_id) location.hash = `#/chats/${n.chat_id}`;
  });
  return item;
}

// -- one open chat ---------------------------------------------------------------------------

// The chat's stream: the page holds the committed messages and the preview of the answer in
// progress, and the cursor of the last event it holds. A page (re)load starts from an empty
// cursor and the stream replays the chat once (its history, then the answer so far); a dropped
// connection reconnects with the cursor and gets only what came after: nothing twice.
class ChatView {
  constructor(id) {
    this.id = id;
    this.chat = null;
    this.lastSeq = 0; // message_seq of the cursor
    this.episode = null; // {history_version, generation_attempt} of the preview
    this.partSeq = 0;
    this.messages = new Map(); // seq -> {message, node}
    this.callNames = new Map(); // tool call id -> name
    this.status = null;
    this.preview = null;
    $("messages").replaceChildren();
    this.clearPreview();
    $("queue").replaceChildren();
    showError($("chat-error"), null);
    $("chat-retry").hidden = true;
    $("action-form").hidden = true;
    $("chat-title").textContent = "";
    this.socket = new LiveSocket("stream", () => socketUrl(`/chats/${id}/stream`, this.cursor()), (e) => this.onEvent(e), (s) => {
      $("stream-state").dataset.state = s;
    });
    api("GET", `/chats/${id}`)
      .then((chat) => {
        this.chat = chat;
        this.setTitle(chat.title);
        this.setArchived(chat.archived);
      })
      .catch((error) => {
        if (error.status === 404) this.close();
        showError($("chat-error"), error.status === 404 ? { message: "No such chat: it was deleted, or it is not yours." } : error);
      });
  }

  cursor() {
    const cursor = { message_seq: String(this.lastSeq) };
    if (this.episode) {
      cursor.history_version = String(this.episode.history_version);
      cursor.generation_attempt = String(this.episode.generation_attempt);
      cursor.part_seq = String(this.partSeq);
    }
    return cursor;
  }

  close() {
    this.socket.close();
  }

  // Test and debugging aid: drop the stream's connection as a network failure would.
  dropConnection() {
    if (this.socket.ws) this.socket.ws.close(4000, "dropped by the page");
  }

  setTitle(title) {
    $("chat-title").textContent = title || "New chat";
  }

  setArchived(archived) {
    if (this.chat) this.chat.archived = archived;
    $("archive-button").textContent = archived ? "Unarchive" : "Archive";
  }

  onEvent(event) {
    switch (event.type) {
      case "message_part":
        return this.onPart(event);
      case "message":
        return this.onMessage(event);
      case "preview_reset":
        this.episode = { history_version: event.history_version, generation_attempt: event.generation_attempt };
        this.partSeq = 0;
        return this.clearPreview();
      case "history_reset":
        for (const [seq, entry] of this.messages) {
          if (seq > event.after_seq) {
            entry.node.remove();
            this.messages.delete(seq);
          }
        }
        this.lastSeq = Math.min(this.lastSeq, event.after_seq);
        return this.clearPreview();
      case "status":
        return this.onStatus(event);
      case "error":
        return showError($("chat-error"), { message: `${event.error.kind}: ${event.error.message}` });
      case "retry": {
        const at = new Date(event.retrying_at).toLocaleTimeString();
        $("chat-retry").textContent = `${event.error.kind}: retry ${event.attempt} at ${at}`;
        $("chat-retry").hidden = false;
        return undefined;
      }
      case "queue_update":
        return this.renderQueue(event.queue);
      case "action_required":
        return this.renderAction(event.calls, event.deadline);
      default:
        return undefined;
    }
  }

  sameEpisode(a, b) {
    return a && b && a.history_version === b.history_version && a.generation_attempt === b.generation_attempt;
  }

  onPart(event) {
    const episode = { history_version: event.history_version, generation_attempt: event.generation_attempt };
    if (!this.sameEpisode(episode, this.episode)) {
      this.episode = episode;
      this.partSeq = 0;
      this.clearPreview();
    }
    if (event.seq <= this.partSeq) return; // held already
    this.partSeq = event.seq;
    const part = event.part;
    const preview = this.previewState();
    switch (part.type) {
      case "text":
        if (!preview.text) {
          preview.text = el("div", "text");
          preview.node.append(preview.text);
        }
        preview.text.textContent += part.text;
        break;
      case "reasoning":
        if (!preview.reasoning) {
          preview.reasoning = el("div", "reasoning");
          preview.node.prepend(preview.reasoning);
        }
        preview.reasoning.textContent += part.text;
        break;
      case "tool_call_start": {
        const call = toolCallNode(part.name, "");
        call.node.classList.add("running");
        preview.calls.set(part.index, call);
        preview.text = null; // text after a call starts a new block
        preview.node.append(call.node);
        this.callNames.set(part.id, part.name);
        break;
      }
      case "tool_call_delta": {
        const call = preview.calls.get(part.index);
        if (call) call.args.textContent += part.arguments;
        break;
      }
      case "tool_call_end": {
        const call = preview.calls.get(part.index);
        if (call) call.node.classList.remove("running");
        break;
      }
      default:
        break;
    }
    $("preview").hidden = false;
    scrollDown();
  }

  previewState() {
    if (!this.preview) {
      const node = $("preview");
      node.replaceChildren();
      this.preview = { node, text: null, reasoning: null, calls: new Map() };
    }
    return this.preview;
  }

  clearPreview() {
    this.preview = null;
    $("preview").replaceChildren();
    $("preview").hidden = true;
  }

  onMessage(message) {
    if (message.seq <= this.lastSeq) return; // held already
    this.lastSeq = message.seq;
    if (message.role !== "user") this.clearPreview(); // the committed answer replaces its preview
    const node = this.messageNode(message);
    this.messages.set(message.seq, { message, node });
    $("messages").append(node);
    scrollDown();
  }

  messageNode(message) {
    const node = el("li", `msg ${message.role}`);
    node.dataset.seq = String(message.seq);
    for (const part of message.content) {
      switch (part.type) {
        case "text":
          node.append(message.role === "user" ? userText(part.text) : el("div", "text", part.text));
          break;
        case "reasoning":
          node.append(el("div", "reasoning", part.text));
          break;
        case "tool_call":
          this.callNames.set(part.id, part.name);
          node.append(toolCallNode(part.name, part.arguments).node);
          break;
        case "tool_result": {
          const box = el("div", part.is_error ? "tool-result failed" : "tool-result");
          box.append(el("span", "tool-name", `${this.callNames.get(part.call_id) || part.call_id} →`), el("code", null, part.output));
          node.append(box);
          break;
        }
        case "chat_summarized":
          node.append(el("div", "summary", `The conversation up to here was summarized (through message ${part.through_seq}).`));
          break;
        default:
          break;
      }
    }
    if (message.role === "user") {
      const edit = el("button", "ghost small edit", "Edit");
      edit.type = "button";
      edit.addEventListener("click", () => this.editMessage(message, node));
      node.append(edit);
    }
    return node;
  }

  editMessage(message, node) {
    const text = message.content.filter((p) => p.type === "text").map((p) => p.text).join("");
    const form = el("form", "edit-form");
    const area = el("textarea");
    area.value = text;
    area.rows = 3;
    const save = el("button", null, "Save and regenerate");
    save.type = "submit";
    const cancel = el("button", "ghost", "Cancel");
    cancel.type = "button";
    const error = el("p", "error");
    error.hidden = true;
    form.append(area, save, cancel, error);
    const old = [...node.childNodes];
    node.replaceChildren(form);
    cancel.addEventListener("click", () => node.replaceChildren(...old));
    form.addEventListener("submit", async (submit) => {
      submit.preventDefault();
      try {
        await api("PATCH", `/chats/${this.id}/messages/${message.id}`, { text: area.value });
        // The stream's history_reset and the new message replace this one.
      } catch (failure) {
        showError(error, failure);
      }
    });
    area.focus();
  }

  onStatus(event) {
    this.status = event.status;
    const badge = $("chat-status");
    badge.textContent = event.status.replace("_", " ");
    badge.className = `status status-${event.status}`;
    badge.dataset.status = event.status;
    this.setArchived(event.archived);
    const busy = event.status === "running" || event.status === "interrupting";
    $("interrupt-button").hidden = !busy;
    $("send-button").textContent = busy ? "Queue" : "Send";
    if (event.status !== "requires_action") $("action-form").hidden = true;
    if (event.status !== "error") showError($("chat-error"), null);
    if (event.status !== "running") $("chat-retry").hidden = true;
    const listed = state.chats.get(this.id);
    if (listed && listed.status !== event.status) {
      listed.status = event.status;
      renderChatList();
    }
  }

  renderQueue(queue) {
    $("queue").replaceChildren(
      ...queue.map((entry) => {
        const item = el("li", "queued");
        item.append(el("span", "hint", "queued"), userText(entry.text));
        const promote = el("button", "ghost small", "Send next");
        promote.type = "button";
        promote.addEventListener("click", () => api("POST", `/chats/${this.id}/queue/${entry.id}/promote`).catch((e) => showError($("composer-error"), e)));
        const remove = el("button", "ghost small", "Remove");
        remove.type = "button";
        remove.addEventListener("click", () => api("DELETE", `/chats/${this.id}/queue/${entry.id}`).catch((e) => showError($("composer-error"), e)));
        item.append(promote, remove);
        return item;
      }),
    );
  }

  renderAction(calls, deadline) {
    const box = $("action-calls");
    box.replaceChildren(
      ...calls.map((call) => {
        const field = el("div", "action-call");
        field.dataset.callId = call.id;
        field.dataset.toolName = call.name;
        field.append(toolCallNode(call.name, call.arguments).node);
        const label = el("label", null, "Result (JSON)");
        const area = el("textarea", "tool-output");
        area.rows = 2;
        area.spellcheck = false;
        area.placeholder = '{"answer": ...}';
        area.addEventListener("input", () => showError($("action-error"), null));
        label.append(area);
        field.append(label);
        return field;
      }),
    );
    $("action-deadline").textContent = `answer before ${new Date(deadline).toLocaleTimeString()}`;
    showError($("action-error"), null);
    $("action-form").hidden = false;
    scrollDown();
  }

  async submitAction() {
    const results = [];
    for (const field of $("action-calls").querySelectorAll(".action-call")) {
      const output = field.querySelector("textarea").value.trim();
      try {
        JSON.parse(output);
      } catch {
        showError($("action-error"), { message: `the result of ${field.dataset.toolName} must be JSON` });
        return;
      }
      results.push({ call_id: field.dataset.callId, output });
    }
    try {
      await api("POST", `/chats/${this.id}/tool-results`, { results });
      $("action-form").hidden = true;
    } catch (error) {
      showError($("action-error"), error);
    }
  }
}

// A user's text, with the demo model's [[fake-llm {...}]] markers (instructions to chatd's fake
// provider) shown as a small chip that holds the marker in its tooltip.
const MARKER = "[[fake-llm";

function userText(text) {
  const node = el("div", "text");
  let rest = text;
  for (let at = rest.indexOf(MARKER); at >= 0; at = rest.indexOf(MARKER)) {
    let end = -1;
    for (let close = rest.indexOf("]]", at); close >= 0; close = rest.indexOf("]]", close + 1)) {
      try {
        JSON.parse(rest.slice(at + MARKER.length, close));
        end = close + 2;
        break;
      } catch {
        // not the marker's end yet
      }
    }
    if (end < 0) break;
    if (at > 0) node.append(rest.slice(0, at));
    const chip = el("span", "knobs", "fake-llm");
    chip.title = rest.slice(at, end);
    node.append(chip);
    rest = rest.slice(end).replace(/^\s+/, "");
  }
  node.append(rest);
  return node;
}

function toolCallNode(name, args) {
  const node = el("div", "tool-call");
  const argsNode = el("code", "args", args);
  node.append(el("span", "tool-name", `${name}(`), argsNode, el("span", "tool-name", ")"));
  return { node, args: argsNode };
}

function scrollDown() {
  const transcript = $("transcript");
  transcript.scrollTop = transcript.scrollHeight;
}

// -- the new chat form -----------------------------------------------------------------------

async function showNewChat() {
  const select = $("new-model");
  const { model_configs: configs } = await api("GET", "/model-configs");
  state.modelConfigs = configs;
  select.replaceChildren(
    ...configs.map((config) => {
      const option = el("option", null, `${config.name} (${config.model})${config.is_default ? " — default" : ""}`);
      option.value = config.id;
      option.selected = config.is_default;
      return option;
    }),
  );
  if (configs.length === 0) {
    showError($("new-chat-error"), { message: "No model config yet: an admin adds a provider and a model config first (README, \"The API\")." });
  }
  $("new-text").focus();
}

async function createChat() {
  const body = { text: $("new-text").value };
  if ($("new-model").value) body.model_config_id = $("new-model").value;
  if ($("new-title").value.trim()) body.title = $("new-title").value.trim();
  if ($("new-system").value.trim()) body.system_prompt = $("new-system").value;
  const tools = $("new-tools").value.trim();
  if (tools) {
    try {
      body.dynamic_tools = JSON.parse(tools);
    } catch {
      showError($("new-chat-error"), { message: "dynamic tools must be a JSON array", field: "dynamic_tools" });
      return;
    }
  }
  try {
    const chat = await api("POST", "/chats", body);
    $("new-chat-form").reset();
    showError($("new-chat-error"), null);
    if (!state.showArchived) state.chats.set(chat.id, chat);
    renderChatList();
    location.hash = `#/chats/${chat.id}`;
  } catch (error) {
    showError($("new-chat-error"), error);
  }
}

// -- routing ---------------------------------------------------------------------------------

function show(panel) {
  for (const id of ["welcome", "new-chat", "inbox", "chat"]) $(id).hidden = id !== panel;
}

function route() {
  if (!state.token) return;
  const hash = location.hash || "#/";
  const match = hash.match(/^#\/chats\/([0-9a-f-]{36})$/);
  if (state.view && (!match || match[1] !== state.view.id)) {
    state.view.close();
    state.view = null;
  }
  if (match) {
    if (!state.view) state.view = new ChatView(match[1]);
    show("chat");
    $("composer-text").focus();
  } else if (hash === "#/new") {
    show("new-chat");
    showNewChat().catch((error) => showError($("new-chat-error"), error));
  } else if (hash === "#/inbox") {
    show("inbox");
    loadInbox().catch(() => {});
  } else {
    show("welcome");
  }
  renderChatList();
}

// -- wiring ----------------------------------------------------------------------------------

async function send() {
  const view = state.view;
  const area = $("composer-text");
  const text = area.value;
  if (!view || !text.trim()) return;
  const body = { text };
  if ($("send-interrupt").checked) body.busy_behavior = "interrupt";
  try {
    await api("POST", `/chats/${view.id}/messages`, body);
    area.value = "";
    showError($("composer-error"), null);
  } catch (error) {
    showError($("composer-error"), error);
  }
}

function wire() {
  $("signin-form").addEventListener("submit", (event) => {
    event.preventDefault();
    signIn($("signin-token").value.trim()).catch((error) => {
      showError($("signin-error"), error.status === 401 ? { message: "That token is unknown or revoked." } : error);
    });
  });
  $("signout-button").addEventListener("click", () => signOut(null));
  $("new-chat-button").addEventListener("click", () => {
    location.hash = "#/new";
  });
  $("inbox-button").addEventListener("click", () => {
    location.hash = "#/inbox";
  });
  $("mark-all-read").addEventListener("click", async () => {
    await api("PUT", "/notifications/inbox/mark-all-as-read");
    await loadInbox();
  });
  $("show-archived").addEventListener("change", (event) => {
    state.showArchived = event.target.checked;
    loadChats().catch(() => {});
  });
  $("new-chat-form").addEventListener("submit", (event) => {
    event.preventDefault();
    createChat();
  });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("composer-text").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  $("interrupt-button").addEventListener("click", () => {
    if (state.view) api("POST", `/chats/${state.view.id}/interrupt`).catch((e) => showError($("composer-error"), e));
  });
  $("archive-button").addEventListener("click", async () => {
    const view = state.view;
    if (!view || !view.chat) return;
    const chat = await api("PATCH", `/chats/${view.id}`, { archived: !view.chat.archived });
    view.setArchived(chat.archived);
  });
  $("delete-button").addEventListener("click", async () => {
    const view = state.view;
    if (!view || !confirm("Delete this chat and its history?")) return;
    await api("DELETE", `/chats/${view.id}`);
    state.chats.delete(view.id);
    location.hash = "#/";
  });
  $("action-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (state.view) state.view.submitAction();
  });
  window.addEventListener("hashchange", route);
}

// For tests and debugging from the console: the open chat's stream, to drop its connection.
window.chatdPage = {
  dropStream: () => state.view && state.view.dropConnection(),
};

wire();
if (state.token) {
  signIn(state.token).catch(() => signOut("Could not sign in with the saved token."));
} else {
  signOut(null);
}
