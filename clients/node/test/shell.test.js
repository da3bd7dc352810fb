// The socket shell against a scripted daemon on a real Unix socket: reconnects, timeouts,
// refusals and a member whose connection drops. No cpmgr needed.

import assert from "node:assert/strict";
import { mkdtemp } from "node:fs/promises";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";

import { CpmgrClient, CpmgrUnavailable } from "../src/index.js";

/** A Unix socket server: `script(request, connection)` answers each request line. */
async function scripted(script) {
  const dir = await mkdtemp(path.join(os.tmpdir(), "cp"));
  const socketPath = path.join(dir, "s");
  const seen = [];
  let connections = 0;
  const server = net.createServer((socket) => {
    const connection = { number: ++connections, socket, write: (obj) => socket.write(JSON.stringify(obj) + "\n") };
    let buffered = "";
    socket.on("data", (chunk) => {
      buffered += chunk;
      let end;
      while ((end = buffered.indexOf("\n")) >= 0) {
        const request = JSON.parse(buffered.slice(0, end));
        buffered = buffered.slice(end + 1);
        seen.push({ connection: connection.number, ...request });
        script(request, connection);
      }
    });
    socket.on("error", () => {});
  });
  await new Promise((resolve) => server.listen(socketPath, resolve));
  return { socketPath, seen, close: () => new Promise((resolve) => server.close(resolve)) };
}

test("calls a lost connection did not answer are sent again on a new one", async () => {
  const daemon = await scripted((request, connection) => {
    if (connection.number === 1 && request.id === 2) {
      connection.write({ ok: true, id: 1 });
      connection.socket.destroy(); // answers the first, then hangs up
    } else if (connection.number > 1) connection.write({ ok: true, id: request.id });
  });
  const client = new CpmgrClient({ path: daemon.socketPath, initialBackoffMs: 1 });
  try {
    await Promise.all([client.commit("g", 1, "MQ=="), client.commit("g", 2, "Mg==")]);
    assert.deepEqual(
      daemon.seen.map((r) => [r.connection, r.shard]),
      [
        [1, 1],
        [1, 2],
        [2, 2],
      ],
    );
  } finally {
    client.close();
    await daemon.close();
  }
});

test("a daemon that does not answer in time rejects with CpmgrUnavailable", async () => {
  const daemon = await scripted(() => {});
  const client = new CpmgrClient({ path: daemon.socketPath, timeoutMs: 30 });
  try {
    await assert.rejects(client.ping(), (error) => error instanceof CpmgrUnavailable && /in time/.test(error.message));
  } finally {
    client.close();
    await daemon.close();
  }
});

test("a connection-level refusal rejects every waiting call with its code", async () => {
  const daemon = await scripted((request, connection) => {
    if (request.id === 2) {
      connection.write({ ok: false, error: { code: "Forbidden", message: "uid 1000 is not allowed" } });
      connection.socket.end();
    }
  });
  const client = new CpmgrClient({ path: daemon.socketPath });
  try {
    const results = await Promise.allSettled([client.ping(), client.ping()]);
    assert.deepEqual(
      results.map((r) => r.reason?.code),
      ["Forbidden", "Forbidden"],
    );
  } finally {
    client.close();
    await daemon.close();
  }
});

test("a member whose connection drops gets a lost event and its iteration ends", async () => {
  const daemon = await scripted((request, connection) => {
    if (request.op !== "join") return;
    connection.write({ ok: true, group: "g", consumer: "c", id: request.id });
    connection.write({ event: "assigned", group: "g", consumer: "c", shard: 3, checkpoint: "MTA=" });
    connection.write({ event: "future-kind", group: "g" });
    setImmediate(() => connection.socket.destroy());
  });
  const client = new CpmgrClient({ path: daemon.socketPath });
  try {
    const member = await client.join("g", "c");
    const events = [];
    for await (const event of member) events.push(event);
    assert.deepEqual(events, [
      { event: "assigned", group: "g", consumer: "c", shard: 3, checkpoint: "MTA=" },
      { event: "future-kind", group: "g" }, // unknown kinds are passed on
      { event: "lost", group: "g", consumer: "c", shards: [3], reason: "disconnected" },
    ]);
    assert.equal(member.ended, true);
    assert.equal(await member.nextEvent(10), null);
    await assert.rejects(member.commit(3, "MTE="), CpmgrUnavailable);
  } finally {
    client.close();
    await daemon.close();
  }
});
