// The protocol without I/O: requests become bytes, bytes become replies and events.
//
// One LineCore per connection. It frames lines (each byte is scanned for the newline once,
// however the stream is split), matches answers to requests in order (checking echoed ids),
// and routes event lines (an `event` field and no `ok` field) out as events, never to a
// waiting request. The client feeds it what the socket reads and writes what it returns.

export const MAX_ANSWER_BYTES = 64 * 1024 * 1024;

/** The root of this client's errors. */
export class CpmgrError extends Error {
  constructor(message, options) {
    super(message, options);
    this.name = this.constructor.name;
  }
}

/** The daemon answered `ok:false`; `answer` is the whole answer. */
export class CpmgrProtocolError extends CpmgrError {
  constructor(answer) {
    const error = answer && typeof answer.error === "object" && answer.error ? answer.error : {};
    const code = String(error.code ?? "Unknown");
    super(`${code}: ${error.message ?? ""}`);
    this.code = code;
    this.answer = answer;
  }

  /** For a failed `wait` or `release`: whether the value was given up (null if not said). */
  get dropped() {
    const value = this.answer.error?.dropped;
    return typeof value === "boolean" ? value : null;
  }
}

/** The daemon could not be reached, did not answer in time, or the connection dropped. */
export class CpmgrUnavailable extends CpmgrError {}

/** A request object; undefined, null and false options are left out (they are the defaults). */
export function buildRequest(op, fields = {}) {
  const payload = { op };
  for (const [key, value] of Object.entries(fields)) {
    if (value !== undefined && value !== null && value !== false) payload[key] = value;
  }
  return payload;
}

/** The answer if it is a success; throws its CpmgrProtocolError otherwise. */
export function checked(answer) {
  if (answer.ok !== true) throw new CpmgrProtocolError(answer);
  return answer;
}

export class LineCore {
  constructor({ maxLineBytes = MAX_ANSWER_BYTES } = {}) {
    this.maxLineBytes = maxLineBytes;
    this.nextId = 1;
    this.waiting = []; // [{id, payload}] in the order sent
    this.parts = []; // the unfinished line, as received
    this.partBytes = 0;
    this.refused = null; // an id-less Forbidden: the daemon closes the connection after it
  }

  /** The bytes of one request; it now waits for its answer. Returns {id, bytes}. */
  send(payload) {
    const id = this.nextId++;
    this.waiting.push({ id, payload });
    return { id, bytes: Buffer.from(JSON.stringify({ ...payload, id }) + "\n") };
  }

  /**
   * Replies ({type:"reply", id, payload, answer}) and events ({type:"event", event}) for the
   * bytes read, in the order their lines arrived. Throws CpmgrError when the stream is out of
   * step (not JSON, an answer to no request, another id, a line too long).
   */
  receive(chunk) {
    const received = [];
    let start = 0;
    while (this.refused === null) {
      const end = chunk.indexOf(10, start);
      if (end < 0) break;
      const line = this.#take(chunk.subarray(start, end));
      start = end + 1;
      received.push(...this.#line(line));
    }
    if (start < chunk.length && this.refused === null) {
      this.parts.push(chunk.subarray(start));
      this.partBytes += chunk.length - start;
      if (this.partBytes > this.maxLineBytes) throw new CpmgrError("answer line too long");
    }
    return received;
  }

  /** The connection is gone: the requests it did not answer, in order. */
  unanswered() {
    const payloads = this.waiting.map((w) => w.payload);
    this.waiting = [];
    this.parts = [];
    this.partBytes = 0;
    return payloads;
  }

  #take(tail) {
    if (this.parts.length === 0) return tail;
    const line = Buffer.concat([...this.parts, tail]);
    this.parts = [];
    this.partBytes = 0;
    return line;
  }

  #line(bytes) {
    const text = bytes.toString("utf8");
    if (text.trim() === "") return [];
    let obj;
    try {
      obj = JSON.parse(text);
    } catch {
      throw new CpmgrError(`the daemon sent a line that is not JSON: ${text.slice(0, 200)}`);
    }
    if (obj === null || typeof obj !== "object" || Array.isArray(obj)) {
      throw new CpmgrError(`the daemon sent an answer that is not an object: ${text.slice(0, 200)}`);
    }
    if ("event" in obj && !("ok" in obj)) return [{ type: "event", event: obj }];
    const head = this.waiting.shift();
    if (head === undefined) throw new CpmgrError("the daemon answered a request never sent");
    // An answer without an id is for a line the daemon could not read: it still comes in order.
    if ("id" in obj && obj.id !== head.id) {
      throw new CpmgrError(`answer for request ${JSON.stringify(obj.id)}, expected ${head.id}`);
    }
    const reply = { type: "reply", id: head.id, payload: head.payload, answer: obj };
    if (!isConnectionLevel(obj)) return [reply];
    this.refused = obj;
    const rest = this.waiting.map((w) => ({ type: "reply", id: w.id, payload: w.payload, answer: obj }));
    this.waiting = [];
    return [reply, ...rest];
  }
}

function isConnectionLevel(answer) {
  return !("id" in answer) && answer.ok === false && answer.error?.code === "Forbidden";
}

/** What a member holds, kept from its events and answers in arrival order. */
export class MemberState {
  constructor(group, consumer) {
    this.group = group;
    this.consumer = consumer;
    this.shards = new Map(); // shard -> "held" | "releasing"
    this.ended = false;
  }

  /** Apply one reply or event read on the joined connection; the event to pass on, or null. */
  observe(item) {
    if (item.type === "reply") {
      this.#onAnswer(item.payload, item.answer);
      return null;
    }
    const event = item.event;
    if (event.event === "assigned") this.shards.set(event.shard, "held");
    else if (event.event === "revoked" && this.shards.has(event.shard)) this.shards.set(event.shard, "releasing");
    else if (event.event === "ended") this.shards.delete(event.shard);
    else if (event.event === "lost") for (const shard of event.shards ?? []) this.shards.delete(shard);
    return event;
  }

  #onAnswer(payload, answer) {
    if (answer.ok !== true) return;
    if (payload.op === "release") this.shards.delete(payload.shard);
    else if (payload.op === "leave") {
      this.shards.clear();
      this.ended = true;
    }
  }

  /** The joined connection dropped: every shard is lost and the membership is over. */
  disconnected() {
    const shards = [...this.shards.keys()].sort((a, b) => a - b);
    this.shards.clear();
    this.ended = true;
    return { event: "lost", group: this.group, consumer: this.consumer, shards, reason: "disconnected" };
  }
}
