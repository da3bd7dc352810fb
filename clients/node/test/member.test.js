// Members against a real `cpmgr run` whose group "members" has a membership block, and the
// emulator; tests/test_node_client.py starts both.

import assert from "node:assert/strict";
import { once } from "node:events";
import { mkdtemp, readFile, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";
import { fileURLToPath, pathToFileURL } from "node:url";

import { CpmgrClient, CpmgrProtocolError, CpmgrUnavailable } from "../src/index.js";

const SOCKET = process.env.CPMGR_SOCKET;
const EMULATOR = process.env.CPMGR_TEST_EMULATOR;
const REMOTE = process.env.CPMGR_TEST_MEMBER_REMOTE; // PROJECT/LOGSTORE/CONSUMER_GROUP of "members"
const SHARDS = Number(process.env.CPMGR_TEST_SHARDS);
if (!SOCKET || !EMULATOR || !REMOTE || !SHARDS) {
  throw new Error("run these through `pytest tests/test_node_client.py`: it starts the daemon and the emulator");
}
const WAIT_MS = 15_000;

const cursor = (n) => Buffer.from(String(n)).toString("base64");
const number = (checkpoint) => BigInt(Buffer.from(checkpoint, "base64").toString());
const plus = (checkpoint, n) => cursor(number(checkpoint) + BigInt(n));

async function atSls(shard) {
  const state = await (await fetch(`${EMULATOR}/_emulator/state`)).json();
  return state.checkpoints[`${REMOTE}/${shard}`] ?? null;
}

async function take(member, count) {
  const events = [];
  while (events.length < count) {
    const event = await member.nextEvent(WAIT_MS);
    assert.notEqual(event, null, `no event in ${WAIT_MS} ms after ${JSON.stringify(events)}`);
    events.push(event);
  }
  return events;
}

const assigned = (events) => new Map(events.filter((e) => e.event === "assigned").map((e) => [e.shard, e.checkpoint]));

test("members share the shards; a revoked shard reaches its new owner with the final checkpoint", async () => {
  const client = new CpmgrClient({ path: SOCKET });
  const a = await client.join("members", "node-a");
  try {
    const first = assigned(await take(a, SHARDS));
    assert.deepEqual([...first.keys()].sort(), [...Array(SHARDS).keys()]);
    for (const [shard, start] of first) await a.commit(shard, plus(start, 10));
    await assert.rejects(a.commit(0, plus(first.get(0), 9)), { code: "CheckpointRegression" });

    const b = await client.join("members", "node-b");
    const revoked = await take(a, SHARDS / 2);
    assert.deepEqual(new Set(revoked.map((e) => `${e.event}:${e.reason}`)), new Set(["revoked:rebalance"]));
    const final = new Map();
    for (const { shard } of revoked) {
      final.set(shard, plus(first.get(shard), 11));
      await a.commit(shard, final.get(shard));
      assert.equal(await a.release(shard), final.get(shard));
      assert.equal(await atSls(shard), final.get(shard));
    }
    await assert.rejects(a.commit(revoked[0].shard, plus(first.get(revoked[0].shard), 12)), (error) => {
      assert.ok(error instanceof CpmgrProtocolError);
      return error.code === "NotOwner";
    });
    assert.deepEqual(assigned(await take(b, SHARDS / 2)), final);
    const members = await client.members("members");
    assert.deepEqual(members.map((m) => m.consumer).sort(), ["node-a", "node-b"]);

    const kept = [...a.shards.keys()].sort();
    assert.deepEqual(await a.assignment(), new Map(kept.map((s) => [s, "held"])));
    assert.equal(await a.leave(), kept.length);
    const rest = [];
    for await (const event of a) rest.push(event);
    assert.deepEqual(rest, []); // the iteration ends with the membership
    await assert.rejects(a.commit(kept[0], cursor(1)), CpmgrUnavailable);
    assert.deepEqual(assigned(await take(b, kept.length)), new Map(kept.map((s) => [s, plus(first.get(s), 10)])));
    assert.equal(await b.leave(), SHARDS);
    b.close();
  } finally {
    a.close();
    client.close();
  }
});

test("a closed member's shards go to the others, with what it committed", async () => {
  const client = new CpmgrClient({ path: SOCKET });
  const a = await client.join("members", "node-c");
  const atA = assigned(await take(a, SHARDS));
  const b = await client.join("members", "node-d");
  try {
    const revoked = await take(a, SHARDS / 2);
    for (const { shard } of revoked) await a.release(shard);
    await take(b, SHARDS / 2);
    const kept = [...a.shards.keys()];
    for (const shard of kept) await a.commit(shard, plus(atA.get(shard), 3));
    a.close(); // no leave: the daemon's disconnect path commits, then releases
    assert.deepEqual(assigned(await take(b, kept.length)), new Map(kept.map((s) => [s, plus(atA.get(s), 3)])));
    await b.leave();
  } finally {
    b.close();
    client.close();
  }
});

test("a refused join rejects with its code", async () => {
  const client = new CpmgrClient({ path: SOCKET });
  try {
    await assert.rejects(client.join("orders", "node-x"), { code: "NotMembershipGroup" });
    await assert.rejects(client.join("members", "bad name!"), { code: "BadRequest" });
    const a = await client.join("members", "node-e");
    await assert.rejects(client.join("members", "node-e"), { code: "ConsumerInUse" });
    await a.leave();
    a.close();
  } finally {
    client.close();
  }
});

test("the README's consumer loop reads every shard and hands it back when stopped", async () => {
  const here = path.dirname(fileURLToPath(import.meta.url));
  const readme = await readFile(path.join(here, "..", "README.md"), "utf8");
  const blocks = [...readme.matchAll(/```js\n([\s\S]*?)```/g)].map((m) => m[1]).filter((b) => b.includes("function consume("));
  assert.equal(blocks.length, 1);
  const dir = await mkdtemp(path.join(os.tmpdir(), "cpmgr-readme-"));
  const file = path.join(dir, "consume.mjs");
  const index = pathToFileURL(path.join(here, "..", "src", "index.js")).href;
  await writeFile(file, blocks[0].replace('from "cpmgr-client"', `from ${JSON.stringify(index)}`));
  const { consume } = await import(pathToFileURL(file).href);

  const ends = new Map();
  const finished = new Set();
  let finish;
  const allRead = new Promise((resolve) => (finish = resolve));
  const readShard = async (shard, from, signal, onBatch) => {
    let at = number(from);
    ends.set(shard, at + 5n);
    while (at < ends.get(shard) && !signal.aborted) await onBatch(cursor((at += 1n)));
    finished.add(shard);
    if (finished.size === SHARDS) finish();
    if (!signal.aborted) await once(signal, "abort");
  };
  const stop = new AbortController();
  const consuming = consume("members", readShard, { stop: stop.signal });
  await Promise.race([allRead, sleepThenFail(WAIT_MS, "the readers did not reach their ends")]);
  stop.abort(); // leave: every last checkpoint is committed before consume() returns
  await consuming;
  for (const [shard, end] of ends) assert.equal(await atSls(shard), cursor(end), `shard ${shard}`);
});

async function sleepThenFail(ms, message) {
  await new Promise((resolve) => setTimeout(resolve, ms).unref());
  throw new Error(message);
}
