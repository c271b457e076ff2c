"use strict";

// gpubox's dashboard in the browser: a confirmation before some forms are sent, the live log
// of a job, and charts of its GPU telemetry. Each feature starts only where the page has its
// element. Text from jobs and users only ever goes into the page through textContent, never
// as markup.

const LIVE = new Set(["QUEUED", "RUNNING"]);
const ENDED = new Set(["FINISHED", "ERROR", "CANCELLED"]);

const LOG_PAGE_LINES = 1000; // lines shown on load, and added by each "Load earlier"
const LOG_MAX_LINES = 20000; // lines kept in the page while following; older ones are dropped
const API_PAGE_LINES = 5000; // the most lines the API sends for one ?limit= request
const FLUSH_MS = 50; // streamed lines are added to the page in batches this far apart
const RETRY_MS = 1000; // the wait before reconnecting a log stream, doubled while it fails
const RETRY_MAX_MS = 16000;
// The server sends an empty line after every 15 s of silence; a stream silent this long is
// taken for a dead connection and opened again.
const STALL_MS = 45000;
const POLL_MS = 2000; // how often the charts ask for new telemetry while the job runs

function start() {
  // Capture, so that a declined form never reaches the handlers on the form (htmx's too).
  document.addEventListener("submit", confirmSubmit, true);
  const log = document.getElementById("log");
  if (log) {
    new LogView(log).start();
  }
  const charts = document.getElementById("charts");
  if (charts) {
    new Charts(charts).start();
  }
}

// --- Confirm before submit --------------------------------------------------------------------

function confirmSubmit(event) {
  const form = event.target;
  if (!(form instanceof HTMLFormElement) || !form.dataset.confirm) {
    return;
  }
  if (!window.confirm(form.dataset.confirm)) {
    event.preventDefault();
    event.stopPropagation();
  }
}

// --- HTTP -------------------------------------------------------------------------------------

class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }

  // Asking again will not help: bad request, signed out, forbidden, no such job.
  get permanent() {
    return [400, 401, 403, 404].includes(this.status);
  }
}

async function request(url, signal) {
  const response = await fetch(url, { credentials: "same-origin", cache: "no-store", signal });
  if (response.ok) {
    return response;
  }
  let message = `HTTP ${response.status}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) {
      message += `: ${body.error.message}`;
    }
  } catch {
    // The body was not the API's JSON error; the status says enough.
  }
  throw new HttpError(response.status, message);
}

async function getJson(url) {
  return (await request(url)).json();
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function isPermanent(error) {
  return error instanceof HttpError && error.permanent;
}

// --- The live log -----------------------------------------------------------------------------

// NDJSON text as log lines; empty lines are the server's keep-alives.
function parseLines(text) {
  const lines = [];
  for (const row of text.split("\n")) {
    if (row.trim() === "") {
      continue;
    }
    try {
      lines.push(JSON.parse(row));
    } catch {
      console.warn("gpubox: skipped a log line that is not JSON", row.slice(0, 200));
    }
  }
  return lines;
}

class LogView {
  constructor(element) {
    this.el = element;
    this.jobUrl = `/api/v1/jobs/${encodeURIComponent(element.dataset.job)}`;
    this.stored = Number(element.dataset.last) || 0; // the last line stored when the page was made
    this.running = element.dataset.running === "1";
    this.earlierButton = document.getElementById("log-earlier");
    this.stateEl = document.getElementById("log-state");
    this.first = 0; // seq of the first line in the page; 0 while there is none
    this.last = 0; // seq of the newest line received, in the page or still queued
    this.hasEarlier = false; // whether lines may exist before `first`
    this.queue = []; // lines received from the stream, not yet in the page
    this.flushTimer = 0;
    this.opened = false; // whether the current follow stream got an answer
    this.ended = ""; // the job's end status, from the stream's end record
  }

  async start() {
    this.el.replaceChildren();
    if (!this.el.hasAttribute("tabindex")) {
      this.el.tabIndex = 0; // so that the keyboard can scroll the log
    }
    if (this.earlierButton) {
      this.earlierButton.addEventListener("click", () => this.loadEarlier());
    }
    this.setState("loading…");
    try {
      const since = Math.max(0, this.stored - LOG_PAGE_LINES);
      this.append(await this.read(since, this.stored));
    } catch (error) {
      this.setState(`could not load the log: ${error.message}`);
      return;
    }
    this.hasEarlier = this.first > 1;
    this.showEarlier();
    this.el.scrollTop = this.el.scrollHeight;
    if (this.running) {
      await this.follow();
    } else {
      this.setState(this.last ? "" : "no output");
    }
  }

  setState(text) {
    if (this.stateEl) {
      this.stateEl.textContent = text;
    }
  }

  showEarlier() {
    if (this.earlierButton) {
      this.earlierButton.hidden = !(this.hasEarlier && this.first > 1);
    }
  }

  // The lines with since < seq <= upto, a page at a time: the server also ends a page at about
  // 1 MiB of text, so an answer may hold fewer lines than asked for.
  async read(since, upto) {
    const lines = [];
    while (since < upto) {
      const limit = Math.min(upto - since, API_PAGE_LINES);
      const url = `${this.jobUrl}/logs?format=ndjson&since=${since}&limit=${limit}`;
      const page = parseLines(await (await request(url)).text());
      if (page.length === 0 || page[page.length - 1].seq <= since) {
        break;
      }
      for (const line of page) {
        if (line.seq > since && line.seq <= upto) {
          lines.push(line);
          since = line.seq;
        }
      }
      since = Math.max(since, page[page.length - 1].seq);
    }
    return lines;
  }

  atBottom() {
    const el = this.el;
    return el.scrollHeight - el.scrollTop - el.clientHeight < 4;
  }

  append(lines) {
    if (lines.length === 0) {
      return;
    }
    this.el.append(renderLines(lines));
    if (!this.first) {
      this.first = lines[0].seq;
    }
    this.last = Math.max(this.last, lines[lines.length - 1].seq);
  }

  async loadEarlier() {
    const button = this.earlierButton;
    const first = this.first;
    button.disabled = true;
    try {
      const since = Math.max(0, first - 1 - LOG_PAGE_LINES);
      const lines = await this.read(since, first - 1);
      // Lines streamed meanwhile may have pushed `first` on: these would leave a gap.
      if (this.first === first) {
        this.prepend(lines);
        this.hasEarlier = lines.length > 0;
      }
    } catch (error) {
      this.setState(`could not load earlier lines: ${error.message}`);
    } finally {
      button.disabled = false;
      this.showEarlier();
    }
  }

  prepend(lines) {
    if (lines.length === 0) {
      return;
    }
    const fromBottom = this.el.scrollHeight - this.el.scrollTop;
    this.el.prepend(renderLines(lines));
    this.el.scrollTop = this.el.scrollHeight - fromBottom;
    this.first = lines[0].seq;
  }

  // Follows the job until it ends: one stream after another, each from the last line seen.
  async follow() {
    let failures = 0; // streams in a row that failed before they opened
    for (;;) {
      this.opened = false;
      try {
        if (await this.stream()) {
          if (this.ended) {
            await this.finish(this.ended);
            return;
          }
          if (await this.checkEnded()) {
            return; // an older coordinator, whose streams have no end record
          }
        }
      } catch (error) {
        if (isPermanent(error)) {
          this.setState(`stopped following: ${error.message}`);
          return;
        }
      }
      failures = this.opened ? 0 : failures + 1;
      this.setState("reconnecting…");
      await sleep(Math.min(RETRY_MS * 2 ** Math.max(0, failures - 1), RETRY_MAX_MS));
    }
  }

  // Whether the job has ended; if it has, the view gets its last lines and says so.
  async checkEnded() {
    const job = await getJson(this.jobUrl);
    if (!ENDED.has(job.status)) {
      return false;
    }
    await this.finish(job.status);
    return true;
  }

  // Reads one follow stream. True when it ended after a whole line, as the server ends it
  // when the job ends; false when it was cut in the middle of one. Throws if it fails.
  async stream() {
    const controller = new AbortController();
    let timer = setTimeout(() => controller.abort(), STALL_MS);
    try {
      const url = `${this.jobUrl}/logs?format=ndjson&follow=1&since=${this.last}`;
      const response = await request(url, controller.signal);
      this.opened = true;
      this.setState("following");
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let pending = "";
      for (;;) {
        const { done, value } = await reader.read();
        if (done) {
          return pending === "";
        }
        clearTimeout(timer);
        timer = setTimeout(() => controller.abort(), STALL_MS);
        pending += decoder.decode(value, { stream: true });
        const cut = pending.lastIndexOf("\n");
        if (cut >= 0) {
          this.receive(parseLines(pending.slice(0, cut)));
          pending = pending.slice(cut + 1);
        }
      }
    } finally {
      clearTimeout(timer);
    }
  }

  // Queues the lines not seen yet; a line whose seq is not past the last one was seen. The
  // stream's last record, {"end": true, "status": …}, says how the job ended.
  receive(lines) {
    for (const line of lines) {
      if (line.end === true) {
        this.ended = line.status;
      } else if (line.seq > this.last) {
        this.queue.push(line);
        this.last = line.seq;
      }
    }
    if (this.queue.length > 0 && !this.flushTimer) {
      this.flushTimer = setTimeout(() => this.flush(), FLUSH_MS);
    }
  }

  flush() {
    clearTimeout(this.flushTimer);
    this.flushTimer = 0;
    let lines = this.queue;
    this.queue = [];
    if (lines.length === 0) {
      return;
    }
    const pinned = this.atBottom();
    if (lines.length >= LOG_MAX_LINES) {
      // The batch alone fills the view: what is in the page now would be dropped anyway.
      lines = lines.slice(-LOG_MAX_LINES);
      this.el.replaceChildren();
      this.first = 0;
      this.hasEarlier = true;
    }
    this.el.append(renderLines(lines));
    if (!this.first) {
      this.first = lines[0].seq;
    }
    this.trim(pinned);
    this.showEarlier();
    if (pinned) {
      this.el.scrollTop = this.el.scrollHeight;
    }
  }

  // Drops the oldest lines beyond LOG_MAX_LINES, keeping in view what the reader looks at.
  trim(pinned) {
    const excess = this.el.childElementCount - LOG_MAX_LINES;
    if (excess <= 0) {
      return;
    }
    const height = this.el.scrollHeight;
    const range = document.createRange();
    range.setStartBefore(this.el.firstElementChild);
    range.setEndBefore(this.el.children[excess]);
    range.deleteContents();
    if (!pinned) {
      this.el.scrollTop -= height - this.el.scrollHeight;
    }
    this.first = Number(this.el.firstElementChild.dataset.seq);
    this.hasEarlier = true;
  }

  // The job has ended: add any line stored after the stream's end, then say so.
  async finish(status) {
    try {
      this.receive(await this.read(this.last, Number.MAX_SAFE_INTEGER));
    } catch (error) {
      console.warn("gpubox: could not read the log's last lines", error);
    }
    this.flush();
    this.setState(`job ended: ${status}`);
    showStatus(status);
  }
}

// The status badge in the page's heading, once the job has ended; the notes that were true
// only while it ran (a cancel asked for, why it waits) and its Cancel button go.
function showStatus(status) {
  const badge = document.querySelector("h1 .status");
  if (badge && ENDED.has(status)) {
    badge.textContent = status;
    badge.className = `status status-${status}`;
  }
  for (const gone of document.querySelectorAll(".while-live")) {
    gone.remove();
  }
}

function renderLines(lines) {
  const fragment = document.createDocumentFragment();
  for (const line of lines) {
    fragment.append(renderLine(line));
  }
  return fragment;
}

function renderLine(line) {
  const row = document.createElement("div");
  row.className =
    line.stream === "stderr" || line.stream === "gpubox" ? `line ${line.stream}` : "line";
  row.dataset.seq = line.seq;
  const seq = document.createElement("span");
  seq.className = "seq";
  seq.textContent = line.seq;
  if (line.ts) {
    seq.title = line.ts;
  }
  const text = document.createElement("span");
  text.className = "text";
  appendAnsi(text, typeof line.line === "string" ? line.line : String(line.line ?? ""));
  row.append(seq, text);
  return row;
}

// --- ANSI escape sequences --------------------------------------------------------------------

// Control characters other than tab; ESC (\x1b) starts an escape sequence.
const CONTROL = /[\x00-\x08\x0a-\x1f\x7f-\x9f]/;
// One match per escape sequence, or per run of other control characters.
const ESCAPE = new RegExp(
  [
    String.raw`\x1b\[([0-?]*)[ -/]*([@-~])`, // CSI: parameters (group 1), final byte (group 2)
    String.raw`\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?`, // OSC: to BEL, ESC \, the next ESC or the end
    String.raw`\x1b[ -/]*[0-~]?`, // any other ESC sequence, or a lone ESC
    String.raw`[\x00-\x08\x0a-\x1a\x1c-\x1f\x7f-\x9f]+`, // other controls, but not tab or ESC
  ].join("|"),
  "g",
);

// Appends `text` to `parent` as text nodes and spans with the ansi-* classes of its SGR
// colours and styles. Every line starts in the default style: the page shows lines out of
// order (the newest first, earlier ones on demand), so a style cannot carry from one to the
// next. A carriage return inside a line keeps only the text after it, as a terminal shows a
// progress bar.
function appendAnsi(parent, text) {
  if (!CONTROL.test(text)) {
    parent.textContent = text;
    return;
  }
  const style = new SgrStyle();
  let pieces = []; // [text, class names]
  let overwrite = false;
  let at = 0;
  const add = (piece) => {
    if (overwrite) {
      pieces = [];
      overwrite = false;
    }
    pieces.push([piece, style.className]);
  };
  for (const match of text.matchAll(ESCAPE)) {
    if (match.index > at) {
      add(text.slice(at, match.index));
    }
    at = match.index + match[0].length;
    if (match[2] === "m") {
      style.apply(match[1]);
    } else if (match[0].includes("\r")) {
      overwrite = true;
    }
  }
  if (at < text.length) {
    add(text.slice(at));
  }
  for (let i = 0; i < pieces.length; i++) {
    let [piece, className] = pieces[i];
    while (i + 1 < pieces.length && pieces[i + 1][1] === className) {
      piece += pieces[++i][0];
    }
    if (className) {
      const span = document.createElement("span");
      span.className = className;
      span.textContent = piece;
      parent.append(span);
    } else {
      parent.append(piece);
    }
  }
}

// The state that SGR sequences (ESC [ … m) set: colours 0-15 and three styles.
class SgrStyle {
  constructor() {
    this.reset();
  }

  reset() {
    this.fg = null;
    this.bg = null;
    this.bold = false;
    this.italic = false;
    this.underline = false;
    this.className = "";
  }

  apply(parameters) {
    if (/^[<=>?]/.test(parameters)) {
      return; // a private sequence (xterm's key modes), not a style
    }
    const codes = parameters.split(";");
    for (let i = 0; i < codes.length; i++) {
      const [head, ...sub] = codes[i].split(":");
      const code = Number(head || 0);
      if (code === 38 || code === 48) {
        // 38;5;n and 38;2;r;g;b take the next parameters; 38:5:n holds its own.
        const args = sub.length > 0 ? sub : codes.slice(i + 1);
        if (sub.length === 0) {
          i += args[0] === "5" ? 2 : args[0] === "2" ? 4 : 0;
        }
        const index = args[0] === "5" ? Number(args[1]) : NaN;
        // Only the 16 basic colours have classes; any other shows in the default colour.
        const colour = Number.isInteger(index) && index >= 0 && index < 16 ? index : null;
        if (code === 38) {
          this.fg = colour;
        } else {
          this.bg = colour;
        }
      } else {
        this.set(code, sub);
      }
    }
    this.className = this.classes();
  }

  set(code, sub) {
    if (code === 0) {
      this.reset();
    } else if (code === 1) {
      this.bold = true;
    } else if (code === 3) {
      this.italic = true;
    } else if (code === 4) {
      this.underline = sub[0] !== "0"; // 4:0 is "no underline"
    } else if (code === 22) {
      this.bold = false;
    } else if (code === 23) {
      this.italic = false;
    } else if (code === 24) {
      this.underline = false;
    } else if (code >= 30 && code <= 37) {
      this.fg = code - 30;
    } else if (code === 39) {
      this.fg = null;
    } else if (code >= 40 && code <= 47) {
      this.bg = code - 40;
    } else if (code === 49) {
      this.bg = null;
    } else if (code >= 90 && code <= 97) {
      this.fg = code - 90 + 8;
    } else if (code >= 100 && code <= 107) {
      this.bg = code - 100 + 8;
    }
  }

  classes() {
    const names = [];
    if (this.fg !== null) {
      names.push(`ansi-fg-${this.fg}`);
    }
    if (this.bg !== null) {
      names.push(`ansi-bg-${this.bg}`);
    }
    if (this.bold) {
      names.push("ansi-bold");
    }
    if (this.italic) {
      names.push("ansi-italic");
    }
    if (this.underline) {
      names.push("ansi-underline");
    }
    return names.join(" ");
  }
}

// --- GPU charts -------------------------------------------------------------------------------

const NO_TELEMETRY = "No GPU telemetry (the job holds no GPU, or none was sampled yet).";
const CHART_HEIGHT_PX = 220;
const GPU_COLOURS = [
  "#0969da",
  "#cf222e",
  "#1a7f37",
  "#8250df",
  "#bf8700",
  "#0a7ea4",
  "#d1478a",
  "#57606a",
];

// The charts drawn, each from one field of the points; `top` is the least top of its y axis.
const MEASURES = [
  { title: "Utilization (%)", field: "util_mean", unit: "%", top: () => 100 },
  {
    title: "Memory (MiB)",
    field: "memory_max_mb",
    unit: " MiB",
    top: (points) => maxOf(points, "memory_total_mb"),
  },
  {
    title: "Power (W)",
    field: "power_mean_w",
    unit: " W",
    top: (points) => maxOf(points, "power_mean_w") * 1.1,
    optional: true,
  },
];

function maxOf(points, field) {
  let top = 0;
  for (const point of points) {
    top = Math.max(top, point[field] ?? 0);
  }
  return top;
}

class Charts {
  constructor(element) {
    this.el = element;
    this.url = `/api/v1/jobs/${encodeURIComponent(element.dataset.job)}/telemetry`;
    this.running = element.dataset.running === "1";
    this.points = new Map(); // GPU uuid -> Map(attempt and start -> point)
    this.next = null; // the `since` of the next request
    this.plots = []; // {measure, box, chart}
    this.layout = ""; // the GPUs and measures the plots were built for
    this.observer = new ResizeObserver(() => this.resize());
  }

  async start() {
    if (typeof uPlot !== "function") {
      this.message("Charts are unavailable: uPlot did not load.");
      return;
    }
    for (;;) {
      let answer;
      try {
        answer = await getJson(this.next === null ? this.url : `${this.url}?since=${this.next}`);
      } catch (error) {
        if (this.points.size === 0) {
          this.message(`Could not load GPU telemetry: ${error.message}`);
        }
        if (!this.running || isPermanent(error)) {
          return;
        }
        await sleep(POLL_MS);
        continue;
      }
      this.add(answer.points || []);
      const moved = answer.next !== null && answer.next !== undefined && answer.next !== this.next;
      if (moved) {
        this.next = answer.next;
      }
      if (answer.more && moved) {
        continue; // the answer was cut at the API's limit: the rest comes at once
      }
      this.draw();
      if (!this.running || !LIVE.has(answer.status)) {
        return;
      }
      await sleep(POLL_MS);
    }
  }

  add(points) {
    for (const point of points) {
      if (!this.points.has(point.gpu)) {
        this.points.set(point.gpu, new Map());
      }
      this.points.get(point.gpu).set(`${point.attempt}:${point.start}`, point);
    }
  }

  message(text) {
    this.destroy();
    const p = document.createElement("p");
    p.className = "muted";
    p.textContent = text;
    this.el.replaceChildren(p);
  }

  destroy() {
    for (const plot of this.plots) {
      plot.chart.destroy();
    }
    this.plots = [];
    this.layout = "";
    this.observer.disconnect();
  }

  draw() {
    const gpus = [...this.points.keys()].sort();
    if (gpus.length === 0) {
      this.message(NO_TELEMETRY);
      return;
    }
    const series = gpus.map((gpu) =>
      [...this.points.get(gpu).values()].sort((a, b) => a.end - b.end),
    );
    const all = series.flat();
    const measures = MEASURES.filter(
      (measure) => !measure.optional || all.some((point) => point[measure.field] != null),
    );
    const layout = JSON.stringify([gpus, measures.map((measure) => measure.field)]);
    if (layout !== this.layout) {
      this.build(gpus, measures);
      this.layout = layout;
    }
    for (const plot of this.plots) {
      plot.top = plot.measure.top(all);
      plot.chart.setData(align(series, plot.measure.field));
    }
  }

  build(gpus, measures) {
    this.destroy();
    this.el.replaceChildren();
    this.plots = measures.map((measure) => {
      const box = document.createElement("div");
      box.className = "chart";
      const heading = document.createElement("h3");
      heading.textContent = measure.title;
      box.append(heading);
      this.el.append(box);
      const plot = { measure, box, top: 0, chart: null };
      const data = [[], ...gpus.map(() => [])];
      plot.chart = new uPlot(chartOptions(plot, gpus, box.clientWidth), data, box);
      this.observer.observe(box);
      return plot;
    });
  }

  resize() {
    for (const plot of this.plots) {
      const width = plot.box.clientWidth;
      if (width > 0 && width !== plot.chart.width) {
        plot.chart.setSize({ width, height: CHART_HEIGHT_PX });
      }
    }
  }
}

function chartOptions(plot, gpus, width) {
  const unit = plot.measure.unit;
  // A GPU's label is its uuid's first 12 characters, or all of it where two would look alike.
  const short = gpus.map((gpu) => gpu.slice(0, 12));
  const labels = gpus.map((gpu, i) =>
    short.indexOf(short[i]) === short.lastIndexOf(short[i]) ? short[i] : gpu,
  );
  const shown = (value) =>
    value === null || value === undefined ? "–" : `${Math.round(value * 10) / 10}${unit}`;
  return {
    width: Math.max(width, 200),
    height: CHART_HEIGHT_PX,
    scales: {
      x: { time: true },
      y: { range: (u, min, max) => [0, Math.max(max ?? 0, plot.top) || 1] },
    },
    series: [
      { label: "time" },
      ...gpus.map((gpu, i) => ({
        label: labels[i],
        stroke: GPU_COLOURS[i % GPU_COLOURS.length],
        width: 2,
        spanGaps: true,
        value: (u, value) => shown(value),
      })),
    ],
    axes: [{}, { size: 60 }],
  };
}

// uPlot's data: the x values (the points' ends, in Unix seconds) that any GPU has, and for
// each GPU its `field` at each of them, null where that GPU has no point.
function align(series, field) {
  const xs = [...new Set(series.flatMap((points) => points.map((point) => point.end)))];
  xs.sort((a, b) => a - b);
  const index = new Map(xs.map((x, i) => [x, i]));
  const columns = series.map((points) => {
    const column = new Array(xs.length).fill(null);
    for (const point of points) {
      column[index.get(point.end)] = point[field] ?? null;
    }
    return column;
  });
  return [xs, ...columns];
}

// Last in the file, because start() uses the classes above and a class exists only once its
// declaration has run: a deferred script finds the document parsed already and starts at once.
if (document.readyState === "loading") {
  document.addEventListener("DOMContentLoaded", start);
} else {
  start();
}
