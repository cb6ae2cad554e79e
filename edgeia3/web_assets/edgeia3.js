// edgeia3 in the browser: one onnxruntime-web session, IA3 adapters as per-request input tensors.
//
//   import { loadModel } from "./edgeia3.js";
//   const model = await loadModel();                 // this folder; WebGPU if the browser offers it, else WASM
//                                                    // options: { backend: "auto"|"wasm"|"webgpu", threads }
//   await model.loadAdapter("sentiment");            // optional: generate() fetches listed adapters on demand
//   const res = await model.generate({
//     messages: [{ role: "user", content: "..." }],  // or prompt: "...", or ids: [...]
//     adapter: "sentiment",                          // per call; null = no adapter (all-ones inputs)
//     maxTokens: 32, signal: abortController.signal, // abort: stops after the current token
//     onToken: (delta, text, id) => { ... },         // streaming
//   });                                              // -> { text, ids, promptIds, aborted, stats }
//   model.unloadAdapter("sentiment");
//
// Greedy decoding; one request at a time (later calls queue). Prompts are rendered with the export's
// chat template (an adapter's recorded one wins) and tokenized under its token contract (edgeia3.json
// "token_contract": BOS first where the base's tokenizer adds it). A listed adapter file is checked
// against its size and sha256; every adapter file against this export's id, input names and shapes,
// and for finite values - a failed check is an EdgeIA3WebError, never a silent wrong answer.
// Written by `edgeia3 export web`; the files it reads are described in edgeia3.json.
import { Tokenizer } from "./runtime/tokenizers.min.mjs";
import { Template } from "./runtime/jinja.mjs";

const HERE = new URL(".", import.meta.url);
const ADAPTER_FORMAT = "edgeia3-web-ia3/1";
const MAX_HEADER = 16 * 1024 * 1024;

// Resolves on the next macrotask without setTimeout's 4 ms clamp: awaiting session.run() only ever
// queues microtasks, so without this nothing else on the page runs until a whole answer is done.
function nextTask() {
  return new Promise((resolve) => {
    const ch = new MessageChannel();
    ch.port1.onmessage = () => resolve();
    ch.port2.postMessage(null);
  });
}

export class EdgeIA3WebError extends Error {
  constructor(message) { super(message); this.name = "EdgeIA3WebError"; }
}

async function fetchOk(url, what) {
  let res;
  try { res = await fetch(url); } catch (e) { throw new EdgeIA3WebError(`cannot fetch ${what} (${url}): ${e.message}`); }
  if (!res.ok) throw new EdgeIA3WebError(`cannot fetch ${what} (${url}): HTTP ${res.status}`);
  return res;
}

async function webgpuAdapter() {
  try { return navigator.gpu ? await navigator.gpu.requestAdapter() : null; } catch { return null; }
}

/** Load the exported model in folder `base` (default: this module's folder). */
export async function loadModel(base = HERE, options = {}) {
  const model = new Model(new URL(base, location.href), options);
  await model._init();
  return model;
}

export class Model {
  constructor(base, { backend = "auto", threads = null, prefillChunk = null, onProgress = null } = {}) {
    this.base = base.href.endsWith("/") ? base : new URL(base.href + "/");
    this.options = { backend, threads, prefillChunk, onProgress };
    this.adapters = new Map(); // name -> { tensors, ms, bytes }
    this.sessionsCreated = 0;
    this._queue = Promise.resolve();
  }

  url(path) { return new URL(path, this.base).href; }

  async _init() {
    const t0 = performance.now();
    const progress = this.options.onProgress || (() => {});
    progress("manifest");
    this.manifest = await (await fetchOk(this.url("edgeia3.json"), "the export manifest")).json();
    if (this.manifest.kind !== "web") throw new EdgeIA3WebError("edgeia3.json is not a web export manifest");
    let backend = this.options.backend;
    if (backend === "auto") backend = (await webgpuAdapter()) ? "webgpu" : "wasm";
    if (backend !== "wasm" && backend !== "webgpu") throw new EdgeIA3WebError(`unknown backend ${backend}`);
    const rt = this.manifest.runtime;
    this.ort = await import(this.url(backend === "webgpu" ? rt.webgpu : rt.wasm));
    const ort = this.ort;
    ort.env.wasm.wasmPaths = this.url("runtime/");
    const cores = navigator.hardwareConcurrency || 1;
    this.threads = this.options.threads || (self.crossOriginIsolated ? Math.min(4, cores) : 1);
    ort.env.wasm.numThreads = this.threads;
    ort.env.logLevel = "error";
    progress("tokenizer");
    const [tj, tc] = await Promise.all([
      fetchOk(this.url(this.manifest.tokenizer.json), "tokenizer.json").then((r) => r.json()),
      fetchOk(this.url(this.manifest.tokenizer.config), "tokenizer_config.json").then((r) => r.json()),
    ]);
    this.tokenizer = new Tokenizer(tj, tc);
    const tfile = this.manifest.chat_template;
    this.templateText = tfile ? await (await fetchOk(this.url(tfile), "the chat template")).text() : null;
    this._templates = new Map();
    progress("model");
    const g = this.manifest.graph;
    const opts = {
      executionProviders: [backend],
      graphOptimizationLevel: "all",
      externalData: g.external_data.map((f) => ({ path: f, data: this.url(f) })),
      extra: g.session_options,
    };
    try {
      this.session = await ort.InferenceSession.create(this.url(g.file), opts);
    } catch (e) {
      throw new EdgeIA3WebError(`onnxruntime-web (${backend}) cannot load the model: ${e.message || e}`);
    }
    this.sessionsCreated += 1;
    this.backend = backend;
    const d = this.manifest.decoder;
    this.prefillChunk = this.options.prefillChunk || (backend === "webgpu" ? d.webgpu_prefill_chunk : 0);
    this._ones = {};
    for (const inp of this.manifest.ia3_inputs) {
      this._ones[inp.name] = new ort.Tensor("float32", new Float32Array(inp.size).fill(1), [1, 1, inp.size]);
    }
    this.loadMs = performance.now() - t0;
    progress("ready");
  }

  /** Names of the adapters this export lists (loadable by name). */
  get adapterNames() { return Object.keys(this.manifest.adapters); }

  /** Names of the adapters loaded now. */
  loadedAdapters() { return [...this.adapters.keys()]; }

  /** Fetch, check and keep adapter `name` (a listed one, or any file given by `url`). */
  async loadAdapter(name, url = null) {
    if (this.adapters.has(name) && !url) return this.adapters.get(name);
    const entry = this.manifest.adapters[name];
    if (!entry && !url) {
      throw new EdgeIA3WebError(`unknown adapter '${name}' (this export has: ${this.adapterNames.join(", ") || "none"})`);
    }
    const t0 = performance.now();
    const src = url ? new URL(url, location.href).href : this.url(entry.file);
    const buf = await (await fetchOk(src, `adapter '${name}'`)).arrayBuffer();
    if (entry && !url) await this._checkListed(name, entry, buf);
    const tensors = this._parseAdapter(name, buf);
    const loaded = { tensors, ms: performance.now() - t0, bytes: buf.byteLength };
    this.adapters.set(name, loaded);
    return loaded;
  }

  /** Forget adapter `name`; later requests for it fetch it again. */
  unloadAdapter(name) { return this.adapters.delete(name); }

  async _checkListed(name, entry, buf) {
    if (buf.byteLength !== entry.bytes) {
      throw new EdgeIA3WebError(`adapter '${name}': the file has ${buf.byteLength} bytes, the export wrote ${entry.bytes} (damaged or replaced)`);
    }
    if (crypto.subtle) {
      const h = [...new Uint8Array(await crypto.subtle.digest("SHA-256", buf))].map((b) => b.toString(16).padStart(2, "0")).join("");
      if (h !== entry.sha256) throw new EdgeIA3WebError(`adapter '${name}': sha256 ${h.slice(0, 12)}... is not the exported file's (damaged or replaced)`);
    }
  }

  _parseAdapter(name, buf) {
    const bad = (why) => new EdgeIA3WebError(`adapter '${name}' is not an adapter for this model: ${why}`);
    if (buf.byteLength < 8) throw bad("the file is too short");
    const dv = new DataView(buf);
    const n = Number(dv.getBigUint64(0, true));
    if (n < 2 || n > MAX_HEADER || 8 + n > buf.byteLength) throw bad("no safetensors header (damaged file)");
    let header;
    try {
      header = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(new Uint8Array(buf, 8, n)));
    } catch (e) { throw bad(`unreadable safetensors header (${e.message})`); }
    if (!header || typeof header !== "object" || Array.isArray(header)) throw bad("unreadable safetensors header");
    const meta = header.__metadata__ || {};
    if (meta.format !== ADAPTER_FORMAT) throw bad(`format ${JSON.stringify(meta.format ?? null)}, expected ${ADAPTER_FORMAT}`);
    if (meta.export !== this.manifest.export_id) {
      throw bad(`it was exported for another model or export (id ${meta.export}; this one is ${this.manifest.export_id})`);
    }
    const dataStart = 8 + n;
    const expected = new Map(this.manifest.ia3_inputs.map((i) => [i.name, i.size]));
    const names = Object.keys(header).filter((k) => k !== "__metadata__");
    const missing = [...expected.keys()].filter((k) => !names.includes(k));
    const extra = names.filter((k) => !expected.has(k));
    if (missing.length || extra.length) {
      throw bad(`its tensors do not match this model's IA3 inputs (missing: ${missing.slice(0, 3).join(", ") || "none"}; unknown: ${extra.slice(0, 3).join(", ") || "none"})`);
    }
    const tensors = {};
    for (const k of names) {
      const t = header[k];
      const size = expected.get(k);
      if (!t || t.dtype !== "F32") throw bad(`tensor ${k} is ${t && t.dtype}, expected F32`);
      if (!Array.isArray(t.shape) || t.shape.join(",") !== `1,1,${size}`) throw bad(`tensor ${k} has shape [${t.shape}], expected [1,1,${size}]`);
      const [b, e] = t.data_offsets || [];
      if (!Number.isInteger(b) || !Number.isInteger(e) || e - b !== 4 * size || dataStart + e > buf.byteLength || b < 0) {
        throw bad(`tensor ${k}: data offsets out of the file (damaged file)`);
      }
      const v = new Float32Array(buf.slice(dataStart + b, dataStart + e));
      for (let i = 0; i < v.length; i++) if (!Number.isFinite(v[i])) throw bad(`tensor ${k} holds non-finite values`);
      tensors[k] = new this.ort.Tensor("float32", v, [1, 1, size]);
    }
    return tensors;
  }

  _template(adapter) {
    const entry = adapter && this.manifest.adapters[adapter];
    const text = (entry && entry.chat_template) || this.templateText;
    if (!text) return null;
    if (!this._templates.has(text)) this._templates.set(text, new Template(text));
    return this._templates.get(text);
  }

  /** Token ids of a chat (list of {role, content}) under the export's token contract. */
  encodeChat(messages, adapter = null) {
    const t = this._template(adapter);
    if (!t) throw new EdgeIA3WebError("this model has no chat template; pass token ids or raw text");
    return this.encodeText(t.render({ messages, add_generation_prompt: true }));
  }

  /** Token ids of `text`: special tokens parsed, none added, then BOS/EOS as the base's tokenization adds them. */
  encodeText(text) {
    const ids = Array.from(this.tokenizer.encode(text, { add_special_tokens: false }).ids, Number);
    const c = this.manifest.token_contract;
    if (c.add_bos && (ids.length === 0 || ids[0] !== c.bos_id)) ids.unshift(c.bos_id);
    if (c.add_eos && (ids.length === 0 || ids[ids.length - 1] !== c.eos_id)) ids.push(c.eos_id);
    return ids;
  }

  decode(ids) { return this.tokenizer.decode(ids, { skip_special_tokens: true }); }

  /** Next-token logits at every position of `ids` with `adapter` (null: the base), as a Float32Array
   * [ids.length * vocab]; queued like `generate`. For drift checks against a reference. */
  logits(ids, adapter = null) {
    const run = this._queue.then(async () => {
      const ia3 = adapter ? (await this.loadAdapter(adapter)).tensors : this._ones;
      const d = this.manifest.decoder;
      const past = {};
      for (let i = 0; i < d.num_layers; i++) {
        for (const kind of ["key", "value"]) {
          past[d.past_names[kind].replace("%d", i)] = new this.ort.Tensor("float32", new Float32Array(0), [1, d.kv_heads, 0, d.head_size]);
        }
      }
      const out = new Float32Array(ids.length * d.vocab_size);
      const chunk = this.prefillChunk > 0 ? this.prefillChunk : ids.length;
      for (let s = 0; s < ids.length; s += chunk) {
        const part = ids.slice(s, s + chunk);
        const res = await this.session.run({
          ...ia3, ...past,
          input_ids: new this.ort.Tensor("int64", BigInt64Array.from(part, BigInt), [1, part.length]),
          attention_mask: new this.ort.Tensor("int64", new BigInt64Array(s + part.length).fill(1n), [1, s + part.length]),
        });
        for (let i = 0; i < d.num_layers; i++) {
          for (const kind of ["key", "value"]) {
            past[d.past_names[kind].replace("%d", i)] = res[d.present_names[kind].replace("%d", i)];
          }
        }
        out.set(res.logits.data, s * d.vocab_size);
      }
      return out;
    });
    this._queue = run.catch(() => {});
    return run;
  }

  /** Greedy generation; one request at a time (later calls wait). */
  generate(request) {
    const run = this._queue.then(() => this._generate(request));
    this._queue = run.catch(() => {});
    return run;
  }

  async _generate({ messages = null, prompt = null, ids = null, adapter = null, maxTokens = 128, signal = null, onToken = null, ignoreEos = false } = {}) {
    const ort = this.ort;
    const t0 = performance.now();
    let adapterMs = 0;
    let ia3 = this._ones;
    if (adapter) {
      const had = this.adapters.has(adapter);
      const a = await this.loadAdapter(adapter);
      adapterMs = had ? 0 : a.ms;
      ia3 = a.tensors;
    }
    if (ids === null) {
      if (messages === null && prompt === null) throw new EdgeIA3WebError("give messages, prompt or ids");
      ids = this.encodeChat(messages ?? [{ role: "user", content: prompt }], adapter);
    }
    const d = this.manifest.decoder;
    const eos = new Set(d.eos_token_ids);
    const past = {};
    for (let i = 0; i < d.num_layers; i++) {
      for (const kind of ["key", "value"]) {
        past[d.past_names[kind].replace("%d", i)] = new ort.Tensor("float32", new Float32Array(0), [1, d.kv_heads, 0, d.head_size]);
      }
    }
    const out = [];
    let text = "";
    let total = 0;
    let tFirst = 0;
    let aborted = false;
    let decodeSteps = 0;
    if (signal && signal.aborted) throw new EdgeIA3WebError("aborted before it started");
    const step = async (tokens) => {
      total += tokens.length;
      const feeds = {
        ...ia3, ...past,
        input_ids: new ort.Tensor("int64", BigInt64Array.from(tokens, BigInt), [1, tokens.length]),
        attention_mask: new ort.Tensor("int64", new BigInt64Array(total).fill(1n), [1, total]),
      };
      const res = await this.session.run(feeds);
      for (let i = 0; i < d.num_layers; i++) {
        for (const kind of ["key", "value"]) {
          past[d.past_names[kind].replace("%d", i)] = res[d.present_names[kind].replace("%d", i)];
        }
      }
      return res.logits;
    };
    let logits;
    const chunk = this.prefillChunk > 0 ? this.prefillChunk : ids.length;
    for (let s = 0; s < ids.length; s += chunk) logits = await step(ids.slice(s, s + chunk));
    while (out.length < maxTokens) {
      const v = logits.dims[2];
      const data = logits.data;
      const off = (logits.dims[1] - 1) * v;
      let best = 0;
      for (let j = 1; j < v; j++) if (data[off + j] > data[off + best]) best = j;
      if (out.length === 0) tFirst = performance.now();
      if (eos.has(best) && !ignoreEos) break;
      out.push(best);
      const now = this.decode(out);
      if (onToken) onToken(now.slice(text.length), now, best);
      text = now;
      await nextTask();  // let the page paint the token and handle events (abort, scripts polling) now
      if (signal && signal.aborted) { aborted = true; break; }
      if (out.length >= maxTokens) break;
      logits = await step([best]);
      decodeSteps += 1;
    }
    const tEnd = performance.now();
    return {
      text, ids: out, promptIds: ids, aborted,
      stats: {
        backend: this.backend, threads: this.threads, load_ms: this.loadMs, adapter, adapter_load_ms: adapterMs,
        prompt_tokens: ids.length, new_tokens: out.length, ttft_ms: tFirst - t0,
        decode_tok_s: decodeSteps > 0 ? decodeSteps / ((tEnd - tFirst) / 1000) : null, decode_steps: decodeSteps,
        total_ms: tEnd - t0, sessions_created: this.sessionsCreated,
        cross_origin_isolated: !!self.crossOriginIsolated,
      },
    };
  }
}
