// The socket shell around LineCore: CpmgrClient (pipelined calls, reconnects) and Member.

import net from "node:net";
import { once } from "node:events";
import { setTimeout as sleep } from "node:timers/promises";

import {
  CpmgrError,
  CpmgrUnavailable,
  LineCore,
  MemberState,
  buildRequest,
  checked,
} from "./core.js";

export const DEFAULT_SOCKET_PATH = "/run/cpmgr/cpmgr.sock";

/** `$CPMGR_SOCKET` if set and non-empty, else /run/cpmgr/cpmgr.sock. */
export function defaultSocketPath(env = process.env) {
  return env.CPMGR_SOCKET || DEFAULT_SOCKET_PATH;
}

/** Exponential backoff with full jitter: ms before retry `attempt` (1-based). */
export function backoffDelay(attempt, { initialMs, maxMs, random = Math.random }) {
  return Math.min(maxMs, initialMs * 2 ** Math.min(attempt - 1, 62)) * random();
}

class ConnectionLost extends CpmgrError {}

/**
 * One connection: requests go out as they come; every reply and event read is shown to
 * `observe` in arrival order, then the reply's caller is resolved.
 */
class Connection {
  constructor(socket, { observe = () => {}, onLost = () => {} } = {}) {
    this.socket = socket;
    this.core = new LineCore();
    this.observe = observe;
    this.onLost = onLost;
    this.calls = new Map(); // id -> {resolve, reject, timer}
    this.alive = true;
    socket.on("data", (chunk) => this.#receive(chunk));
    socket.on("error", () => {}); // "close" follows, and fails what is waiting
    socket.on("close", () => this.#fail(new ConnectionLost("the connection was lost")));
  }

  static async open(path) {
    const socket = net.createConnection({ path });
    await once(socket, "connect"); // rejects with the socket's error
    return socket;
  }

  /** Send one request; resolves with its answer (ok:false included). */
  request(payload, timeoutMs) {
    const { id, bytes } = this.core.send(payload);
    return new Promise((resolve, reject) => {
      const timer =
        timeoutMs == null
          ? null
          : setTimeout(() => {
              this.calls.delete(id);
              reject(new CpmgrUnavailable("no answer from the daemon in time"));
            }, timeoutMs);
      this.calls.set(id, { resolve, reject, timer });
      this.socket.write(bytes);
    });
  }

  #receive(chunk) {
    let items;
    try {
      items = this.core.receive(chunk);
    } catch (error) {
      this.#fail(error); // out of step: nothing more on this connection can be trusted
      return;
    }
    for (const item of items) {
      this.observe(item);
      if (item.type !== "reply") continue;
      const call = this.calls.get(item.id);
      if (call === undefined) continue; // its caller timed out
      this.calls.delete(item.id);
      clearTimeout(call.timer);
      call.resolve(item.answer);
    }
    if (this.core.refused !== null) this.#fail(new ConnectionLost("the daemon closed the connection"));
  }

  #fail(error) {
    const wasAlive = this.alive;
    this.alive = false;
    for (const call of this.calls.values()) {
      clearTimeout(call.timer);
      call.reject(error);
    }
    this.calls.clear();
    this.socket.destroy();
    if (wasAlive) this.onLost();
  }

  close() {
    this.onLost = () => {}; // closed on purpose: nothing was lost
    this.#fail(new CpmgrUnavailable("the client was closed"));
  }
}

function readTimeout(baseMs, payload) {
  if (baseMs == null) return null;
  return baseMs + (typeof payload.timeout === "number" ? payload.timeout * 1000 : 0);
}

function commitPayload(group, shard, checkpoint, { consumer, force, wait, timeout } = {}) {
  return buildRequest("commit", { group, shard, checkpoint, consumer, force, wait, timeout });
}

/** {shard: checkpoint}, a Map, or [shard, checkpoint, consumer?] / {shard, checkpoint, consumer?} items. */
function batchItems(checkpoints) {
  let entries;
  if (checkpoints instanceof Map) entries = [...checkpoints.entries()];
  else if (Array.isArray(checkpoints)) entries = checkpoints;
  else entries = Object.entries(checkpoints).map(([shard, checkpoint]) => [Number(shard), checkpoint]);
  return entries.map((entry) => {
    const [shard, checkpoint, consumer] = Array.isArray(entry)
      ? entry
      : [entry.shard, entry.checkpoint, entry.consumer];
    return consumer == null ? { shard, checkpoint } : { shard, checkpoint, consumer };
  });
}

function batchPayload(group, checkpoints, { consumer, force, wait, timeout } = {}) {
  const items = batchItems(checkpoints);
  return buildRequest("commit", { group, checkpoints: items, consumer, force, wait, timeout });
}

function withoutId(answer) {
  const { id: _id, ...rest } = answer;
  return rest;
}

/**
 * A client on one connection: any number of concurrent calls share it (pipelined), answers
 * are matched in order. A lost connection is opened again with backoff and the calls it did
 * not answer are sent again (every op is safe to repeat: an equal checkpoint is a no-op).
 */
export class CpmgrClient {
  constructor({
    path = defaultSocketPath(),
    timeoutMs = 60_000,
    reconnectAttempts = 3,
    initialBackoffMs = 50,
    maxBackoffMs = 2_000,
  } = {}) {
    this.path = path;
    this.timeoutMs = timeoutMs;
    this.reconnectAttempts = reconnectAttempts;
    this.backoff = { initialMs: initialBackoffMs, maxMs: maxBackoffMs };
    this.connection = null;
    this.connecting = null;
  }

  /** Hand over one checkpoint; with `wait`, resolves once it is committed to SLS. */
  async commit(group, shard, checkpoint, options = {}) {
    await this.#run(commitPayload(group, shard, checkpoint, options));
  }

  /** Hand over several checkpoints as one all-or-nothing batch; resolves with the accepted count. */
  async commitMany(group, checkpoints, options = {}) {
    return (await this.#run(batchPayload(group, checkpoints, options))).accepted;
  }

  /** Commit everything pending now (of one group); resolves with how many were committed. */
  async flush(group, { timeout } = {}) {
    return (await this.#run(buildRequest("flush", { group, timeout }))).committed;
  }

  /** The shards of a group (or one shard) as the daemon sees them. */
  async get(group, shard, { remote } = {}) {
    return (await this.#run(buildRequest("get", { group, shard, remote }))).shards;
  }

  /** The daemon's status (version, uptime, per-group counts). */
  async status() {
    return withoutId(await this.#run(buildRequest("status")));
  }

  async ping() {
    await this.#run(buildRequest("ping"));
  }

  /** The members on the daemon (of one group) that this peer may see. */
  async members(group) {
    return (await this.#run(buildRequest("members", { group }))).members;
  }

  /** Any request; resolves with its answer (without `id`), rejects on `ok:false`. */
  async call(op, fields = {}) {
    return withoutId(await this.#run(buildRequest(op, fields)));
  }

  /**
   * Join a membership group as `consumer` on a connection of its own. The Member yields
   * events (`for await`, or nextEvent) and commits, releases and leaves on that connection.
   */
  async join(group, consumer) {
    const member = new Member(new MemberState(group, consumer), this.timeoutMs);
    const socket = await this.#open();
    member.attach(socket);
    try {
      await member.request(buildRequest("join", { group, consumer }));
    } catch (error) {
      member.close();
      throw error;
    }
    return member;
  }

  /** Close the connection; calls still waiting reject with CpmgrUnavailable. */
  close() {
    const connection = this.connection;
    this.connection = null;
    connection?.close();
  }

  async #run(payload) {
    for (let failures = 0; ; ) {
      const connection = await this.#connected();
      try {
        return checked(await connection.request(payload, readTimeout(this.timeoutMs, payload)));
      } catch (error) {
        if (!(error instanceof ConnectionLost)) throw error;
        failures += 1;
        if (failures > this.reconnectAttempts) {
          throw new CpmgrUnavailable(`lost the connection to ${this.path}`, { cause: error });
        }
        await sleep(backoffDelay(failures, this.backoff));
      }
    }
  }

  async #connected() {
    if (this.connection?.alive) return this.connection;
    // One connect shared by every call that needs it at the same time.
    this.connecting ??= this.#open()
      .then((socket) => (this.connection = new Connection(socket)))
      .finally(() => (this.connecting = null));
    return this.connecting;
  }

  async #open() {
    for (let attempt = 0; ; attempt++) {
      try {
        return await Connection.open(this.path);
      } catch (error) {
        if (attempt >= this.reconnectAttempts) {
          throw new CpmgrUnavailable(`cannot connect to ${this.path}: ${error.message}`, { cause: error });
        }
        await sleep(backoffDelay(attempt + 1, this.backoff));
      }
    }
  }
}

/**
 * A joined membership: its events, and ops on its connection. A dropped connection ends the
 * membership with a `lost` event (reason `disconnected`, every shard it held); it is never
 * reconnected behind your back, since a new connection is not a member: join again.
 */
export class Member {
  #state;
  #events = [];
  #waiters = [];
  #connection = null;

  constructor(state, timeoutMs) {
    this.#state = state;
    this.timeoutMs = timeoutMs;
  }

  attach(socket) {
    this.#connection = new Connection(socket, {
      observe: (item) => this.#observe(item),
      onLost: () => this.#lost(),
    });
  }

  get group() {
    return this.#state.group;
  }

  get consumer() {
    return this.#state.consumer;
  }

  /** The shards held (shard -> "held" | "releasing"), as the events so far say. */
  get shards() {
    return new Map(this.#state.shards);
  }

  /** Whether the membership is over (left, closed, or its connection dropped). */
  get ended() {
    return this.#state.ended;
  }

  /** Hand over one checkpoint of a held shard (`NotOwner` if it is not held). */
  async commit(shard, checkpoint, { force, wait, timeout } = {}) {
    await this.request(commitPayload(this.group, shard, checkpoint, { force, wait, timeout }));
  }

  /** Hand over several checkpoints as one batch; resolves with the accepted count. */
  async commitMany(checkpoints, { force, wait, timeout } = {}) {
    return (await this.request(batchPayload(this.group, checkpoints, { force, wait, timeout }))).accepted;
  }

  /** Hand a shard back once its last checkpoint is settled at SLS; resolves with that checkpoint. */
  async release(shard) {
    return (await this.request(buildRequest("release", { group: this.group, shard }))).checkpoint ?? null;
  }

  /** Release every shard, then end the membership; resolves with how many were released. */
  async leave() {
    return (await this.request(buildRequest("leave", { group: this.group }))).released;
  }

  /** The shards the daemon says this member holds: Map shard -> "held" | "releasing". */
  async assignment() {
    const answer = await this.request(buildRequest("assignment", { group: this.group }));
    return new Map(answer.shards.map((entry) => [entry.shard, entry.state]));
  }

  /** Commit everything pending in this group now; resolves with how many were committed. */
  async flush({ timeout } = {}) {
    return (await this.request(buildRequest("flush", { group: this.group, timeout }))).committed;
  }

  /** Send any request on the joined connection; resolves with its answer, rejects on ok:false. */
  async request(payload) {
    if (this.#state.ended || this.#connection === null) {
      throw new CpmgrUnavailable(`the membership of ${this.consumer} in ${this.group} is over`);
    }
    try {
      return checked(await this.#connection.request(payload, readTimeout(this.timeoutMs, payload)));
    } catch (error) {
      if (error instanceof ConnectionLost) {
        throw new CpmgrUnavailable("lost the connection: the membership is over", { cause: error });
      }
      throw error;
    }
  }

  /**
   * The next event, as the daemon sent it ({event: "assigned", shard, checkpoint, ...});
   * null if `timeoutMs` passes first, or once the membership is over and every event was taken.
   */
  nextEvent(timeoutMs = null) {
    if (this.#events.length > 0) return Promise.resolve(this.#events.shift());
    if (this.#state.ended || timeoutMs === 0) return Promise.resolve(null);
    return new Promise((resolve) => {
      const waiter = { resolve, timer: null };
      if (timeoutMs != null) {
        waiter.timer = setTimeout(() => {
          this.#waiters = this.#waiters.filter((w) => w !== waiter);
          resolve(null);
        }, timeoutMs);
      }
      this.#waiters.push(waiter);
    });
  }

  async *[Symbol.asyncIterator]() {
    for (let event; (event = await this.nextEvent()) !== null; ) yield event;
  }

  /**
   * Close the connection: the daemon commits what it accepted, then releases the shards (its
   * disconnect path). Idempotent.
   */
  close() {
    this.#end();
    this.#connection?.close();
  }

  #observe(item) {
    const event = this.#state.observe(item);
    if (event !== null) this.#push(event);
    if (this.#state.ended) this.#end(); // left
  }

  #lost() {
    if (!this.#state.ended) this.#push(this.#state.disconnected());
    this.#end();
  }

  #push(event) {
    const waiter = this.#waiters.shift();
    if (waiter === undefined) {
      this.#events.push(event);
      return;
    }
    clearTimeout(waiter.timer);
    waiter.resolve(event);
  }

  #end() {
    this.#state.ended = true;
    if (this.#events.length > 0) return; // waiters exist only while nothing is queued
    for (const waiter of this.#waiters.splice(0)) {
      clearTimeout(waiter.timer);
      waiter.resolve(null);
    }
  }
}
