// The client against a real `cpmgr run` and the emulator, which tests/test_node_client.py
// starts; it passes their addresses in the environment.

import assert from "node:assert/strict";
import { test } from "node:test";

import { CpmgrClient, CpmgrProtocolError, CpmgrUnavailable } from "../src/index.js";

const SOCKET = process.env.CPMGR_SOCKET;
const EMULATOR = process.env.CPMGR_TEST_EMULATOR;
const REMOTE = process.env.CPMGR_TEST_REMOTE; // PROJECT/LOGSTORE/CONSUMER_GROUP of "orders"
if (!SOCKET || !EMULATOR || !REMOTE) {
  throw new Error("run these through `pytest tests/test_node_client.py`: it starts the daemon and the emulator");
}

const cursor = (n) => Buffer.from(String(n)).toString("base64");

async function atSls(shard) {
  const state = await (await fetch(`${EMULATOR}/_emulator/state`)).json();
  return state.checkpoints[`${REMOTE}/${shard}`] ?? null;
}

async function withClient(body) {
  const client = new CpmgrClient({ path: SOCKET });
  try {
    return await body(client);
  } finally {
    client.close();
  }
}

test("ping and status", () =>
  withClient(async (client) => {
    await client.ping();
    const status = await client.status();
    assert.equal(status.ok, true);
    assert.deepEqual(Object.keys(status.groups).sort(), ["audit", "members", "orders"]);
  }));

test("commit with wait reaches SLS before it resolves", () =>
  withClient(async (client) => {
    await client.commit("orders", 0, cursor(100));
    assert.equal(await atSls(0), null); // a 1 h interval: nothing committed yet
    await client.commit("orders", 0, cursor(101), { wait: true, timeout: 10 });
    assert.equal(await atSls(0), cursor(101));
    const [entry] = await client.get("orders", 0);
    assert.equal(entry.committed, cursor(101));
    assert.equal(entry.pending, null);
  }));

test("commitMany takes an object, a Map or items; flush commits them", () =>
  withClient(async (client) => {
    assert.equal(await client.commitMany("orders", { 1: cursor(10), 2: cursor(20) }), 2);
    assert.equal(await client.commitMany("orders", new Map([[3, cursor(30)]])), 1);
    assert.equal(await client.commitMany("orders", [[4, cursor(40)], { shard: 5, checkpoint: cursor(50) }]), 2);
    assert.equal(await client.flush("orders", { timeout: 10 }), 5);
    for (const shard of [1, 2, 3, 4, 5]) assert.equal(await atSls(shard), cursor(shard * 10));
  }));

test("refusals reject with the protocol code and leave the client usable", () =>
  withClient(async (client) => {
    await client.commit("orders", 6, cursor(60));
    await assert.rejects(client.commit("orders", 6, cursor(59)), (error) => {
      assert.ok(error instanceof CpmgrProtocolError);
      assert.equal(error.code, "CheckpointRegression");
      assert.equal(error.answer.ok, false);
      assert.equal(error.dropped, null);
      return true;
    });
    await assert.rejects(client.get("nope"), { code: "UnknownGroup" });
    await assert.rejects(client.commit("orders", 6, "not base64!"), { code: "InvalidShardCheckPoint" });
    await assert.rejects(client.commitMany("orders", []), { code: "BadRequest" });
    await client.commit("orders", 6, cursor(59), { force: true });
    assert.equal((await client.get("orders", 6))[0].pending, cursor(59));
  }));

test("concurrent calls share one connection; answers find their callers", () =>
  withClient(async (client) => {
    const calls = [];
    for (let n = 0; n < 400; n++) calls.push(client.commit("audit", n % 8, cursor(1000 + n)));
    calls.splice(123, 0, client.commit("nope", 1, cursor(1)));
    const results = await Promise.allSettled(calls);
    const rejected = results.flatMap((r, i) => (r.status === "rejected" ? [[i, r.reason.code]] : []));
    assert.deepEqual(rejected, [[123, "UnknownGroup"]]);
    const shards = await client.get("audit");
    assert.deepEqual(
      shards.map((s) => [s.shard, s.pending]),
      [0, 1, 2, 3, 4, 5, 6, 7].map((shard) => [shard, cursor(1000 + 392 + shard)]),
    );
  }));

test("a flush of everything, and one that has nothing to do", () =>
  withClient(async (client) => {
    await client.flush(undefined, { timeout: 10 });
    assert.equal(await client.flush("orders"), 0);
    assert.deepEqual(await client.call("ping"), { ok: true });
  }));

test("an unreachable daemon rejects with CpmgrUnavailable after bounded retries", async () => {
  const client = new CpmgrClient({ path: `${SOCKET}.missing`, reconnectAttempts: 2, initialBackoffMs: 1 });
  await assert.rejects(client.ping(), (error) => error instanceof CpmgrUnavailable && /cannot connect/.test(error.message));
  client.close();
});
