// LineCore and MemberState fed bytes: no daemon needed.

import assert from "node:assert/strict";
import { test } from "node:test";

import { CpmgrError, LineCore, MemberState } from "../src/index.js";

const line = (obj) => JSON.stringify(obj) + "\n";
const ASSIGNED = { event: "assigned", group: "g", consumer: "c", shard: 3, checkpoint: "MTA=" };
const REVOKED = { event: "revoked", group: "g", consumer: "c", shard: 3, reason: "rebalance", deadline: 10 };
const FUTURE = { event: "split", group: "g", consumer: "c", parent: 1 };

function stream() {
  const core = new LineCore();
  core.send({ op: "ping" });
  core.send({ op: "commit", group: "g", shard: 3, checkpoint: "MTA=" });
  core.send({ op: "release", group: "g", shard: 3 });
  const data = Buffer.from(
    [
      line(ASSIGNED),
      line({ ok: true, id: 1 }),
      line(REVOKED),
      "\r\n",
      line({ ok: true, id: 2 }),
      line(FUTURE),
      line({ ok: true, checkpoint: "MTA=", id: 3 }),
    ].join(""),
  );
  return { core, data };
}

const describe = (items) => items.map((i) => (i.type === "reply" ? ["reply", i.id, i.answer] : ["event", i.event]));

test("requests are pipelined with ids", () => {
  const core = new LineCore();
  assert.equal(core.send({ op: "ping" }).bytes.toString(), '{"op":"ping","id":1}\n');
  assert.equal(core.send({ op: "flush" }).id, 2);
  assert.equal(core.waiting.length, 2);
});

test("events go apart; answers match their requests in order", () => {
  const { core, data } = stream();
  const items = core.receive(data);
  assert.deepEqual(
    items.map((i) => (i.type === "reply" ? i.payload.op : i.event.event)),
    ["assigned", "ping", "revoked", "commit", "split", "release"],
  );
  assert.deepEqual(items[5].answer, { ok: true, checkpoint: "MTA=", id: 3 });
  assert.deepEqual(items[4].event, FUTURE); // an unknown kind is passed on whole
  assert.equal(core.waiting.length, 0);
});

test("any split of the stream gives the same replies and events", () => {
  const { core: whole, data } = stream();
  const expected = describe(whole.receive(data));
  let seed = 7;
  const random = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
  for (let run = 0; run < 300; run++) {
    const { core } = stream();
    const cuts = Array.from({ length: Math.floor(random() * 12) }, () => Math.floor(random() * data.length)).sort(
      (a, b) => a - b,
    );
    const bounds = [0, ...cuts, data.length];
    const items = [];
    for (let i = 0; i + 1 < bounds.length; i++) items.push(...core.receive(data.subarray(bounds[i], bounds[i + 1])));
    assert.deepEqual(describe(items), expected, `cuts ${cuts}`);
  }
});

test("an out-of-step stream is an error", () => {
  for (const [bytes, message] of [
    [line({ ok: true, id: 9 }), /answer for request 9, expected 1/],
    ["nope\n", /not JSON/],
    ["[1]\n", /not an object/],
  ]) {
    const core = new LineCore();
    core.send({ op: "ping" });
    assert.throws(() => core.receive(Buffer.from(bytes)), message);
  }
  assert.throws(() => new LineCore().receive(Buffer.from(line({ ok: true }))), CpmgrError);
  const small = new LineCore({ maxLineBytes: 10 });
  assert.throws(() => small.receive(Buffer.from("x".repeat(11))), /too long/);
});

test("a connection-level refusal answers every waiting request", () => {
  const core = new LineCore();
  core.send({ op: "ping" });
  core.send({ op: "ping" });
  const refusal = { ok: false, error: { code: "Forbidden", message: "uid 5 not allowed" } };
  const items = core.receive(Buffer.from(line(refusal)));
  assert.deepEqual(describe(items), [
    ["reply", 1, refusal],
    ["reply", 2, refusal],
  ]);
  assert.deepEqual(core.refused, refusal);
});

test("unanswered requests are handed back in order", () => {
  const core = new LineCore();
  core.send({ op: "ping" });
  core.send({ op: "flush" });
  core.receive(Buffer.from(line({ ok: true, id: 1 }) + '{"ok":tr'));
  assert.deepEqual(core.unanswered(), [{ op: "flush" }]);
});

test("member state follows events and answers in arrival order", () => {
  const state = new MemberState("g", "c");
  const core = new LineCore();
  core.send({ op: "release", group: "g", shard: 3 });
  // The release answer and the shard's next assignment in one read: the late answer must not
  // drop the new holding.
  const data = line(ASSIGNED) + line(REVOKED) + line({ ok: true, id: 1 }) + line({ ...ASSIGNED, checkpoint: "MjA=" });
  const passed = core.receive(Buffer.from(data)).map((item) => state.observe(item));
  assert.deepEqual(passed.filter(Boolean).map((e) => e.event), ["assigned", "revoked", "assigned"]);
  assert.deepEqual([...state.shards], [[3, "held"]]);
  state.observe({ type: "event", event: { ...REVOKED, reason: "shutdown" } });
  assert.deepEqual([...state.shards], [[3, "releasing"]]);
  assert.deepEqual(state.disconnected(), {
    event: "lost",
    group: "g",
    consumer: "c",
    shards: [3],
    reason: "disconnected",
  });
  assert.equal(state.ended, true);
});

test("ended drops the shard, also one that was never assigned", () => {
  const state = new MemberState("g", "c");
  const ended = (shard) => ({ type: "event", event: { event: "ended", group: "g", consumer: "c", shard } });
  state.observe({ type: "event", event: ASSIGNED });
  assert.equal(state.observe(ended(3)).event, "ended");
  assert.deepEqual([...state.shards], []);
  // A read-only shard with nothing left to read: the daemon finishes it and sends `ended` only.
  assert.equal(state.observe(ended(9)).event, "ended");
  assert.deepEqual([...state.shards], []);
  assert.equal(state.ended, false); // the membership goes on
});
