// The official openai Node SDK through sluice to an upstream of each kind in
// UPSTREAM_KINDS (harness.mjs): plain, streamed, tools (streamed and parallel), errors
// (401, 429 with Retry-After, 500, a stream cut midway) and usage in the gateway's log.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import OpenAI from 'openai';

import { GATEWAY_KEY, MODEL, UPSTREAM_KEY, UPSTREAM_KINDS, eventually, start } from './harness.mjs';

const MESSAGES = [{ role: 'user', content: 'hello' }];
const TOOLS = ['lookup', 'weather'].map((name) => ({
  type: 'function',
  function: { name, parameters: { type: 'object', properties: {} } },
}));

/** Accumulates a streamed chat completion as an SDK user would. */
async function collect(stream) {
  let content = '';
  const calls = [];
  const models = new Set();
  let finish = null;
  for await (const chunk of stream) {
    models.add(chunk.model);
    const choice = chunk.choices[0];
    if (!choice) continue;
    content += choice.delta.content ?? '';
    for (const call of choice.delta.tool_calls ?? []) {
      calls[call.index] ??= { id: '', name: '', arguments: '' };
      calls[call.index].id += call.id ?? '';
      calls[call.index].name += call.function?.name ?? '';
      calls[call.index].arguments += call.function?.arguments ?? '';
    }
    finish = choice.finish_reason ?? finish;
  }
  return { content, calls, models, finish };
}

for (const kind of UPSTREAM_KINDS) {
  describe(`openai Node SDK -> sluice -> ${kind.name} upstream`, () => {
    let gateway;
    let client;

    before(async () => {
      gateway = await start(kind);
      client = new OpenAI({ baseURL: gateway.baseURL, apiKey: GATEWAY_KEY, maxRetries: 0 });
    });

    after(() => {
      const output = gateway?.output() ?? '';
      gateway?.stop();
      for (const secret of [GATEWAY_KEY, UPSTREAM_KEY]) {
        assert.ok(!output.includes(secret), `${secret} appeared in the gateway's output`);
      }
    });

    test('plain chat completion', async () => {
      const reply = await client.chat.completions.create({ model: MODEL, messages: MESSAGES });
      assert.equal(reply.model, MODEL);
      assert.equal(reply.choices[0].finish_reason, 'stop');
      assert.ok(reply.choices[0].message.content.length > 0);
      assert.ok(reply.usage.total_tokens > 0);
    });

    test('streamed chat completion', async () => {
      const stream = await client.chat.completions.create({ model: MODEL, messages: MESSAGES, stream: true });
      const { content, models, finish } = await collect(stream);
      assert.ok(content.length > 0);
      assert.deepEqual([...models], [MODEL]);
      assert.equal(finish, 'stop');
    });

    test('parallel tool calls, plain and streamed', async () => {
      const reply = await client.chat.completions.create({ model: MODEL, messages: MESSAGES, tools: TOOLS });
      const calls = reply.choices[0].message.tool_calls;
      assert.deepEqual(calls.map((c) => c.function.name), ['lookup', 'weather']);
      assert.deepEqual(JSON.parse(calls[1].function.arguments), { query: 'mock' });
      assert.equal(reply.choices[0].finish_reason, 'tool_calls');

      const stream = await client.chat.completions.create({ model: MODEL, messages: MESSAGES, tools: TOOLS, stream: true });
      const streamed = await collect(stream);
      assert.deepEqual(streamed.calls.map((c) => c.name), ['lookup', 'weather']);
      for (const call of streamed.calls) {
        assert.ok(call.id.length > 0);
        assert.deepEqual(JSON.parse(call.arguments), { query: 'mock' }, 'argument deltas reassembled');
      }
      assert.equal(streamed.finish, 'tool_calls');
    });

    test('a wrong gateway key is a 401', async () => {
      const stranger = new OpenAI({ baseURL: gateway.baseURL, apiKey: 'fk-node-nobody-0001', maxRetries: 0 });
      await assert.rejects(stranger.chat.completions.create({ model: MODEL, messages: MESSAGES }), (error) => {
        assert.ok(error instanceof OpenAI.AuthenticationError, String(error));
        assert.equal(error.status, 401);
        return true;
      });
    });

    test("the upstream's 429 arrives with its Retry-After", async () => {
      const request = client.chat.completions.create(
        { model: MODEL, messages: MESSAGES },
        { headers: { 'x-mock-fault': '429:7' } },
      );
      await assert.rejects(request, (error) => {
        assert.ok(error instanceof OpenAI.RateLimitError, String(error));
        assert.equal(error.status, 429);
        assert.equal(error.headers.get('retry-after'), '7');
        return true;
      });
    });

    test("the upstream's 500 is a server error", async () => {
      const request = client.chat.completions.create(
        { model: MODEL, messages: MESSAGES },
        { headers: { 'x-mock-fault': '500' } },
      );
      await assert.rejects(request, (error) => {
        assert.ok(error instanceof OpenAI.InternalServerError, String(error));
        assert.equal(error.status, 500);
        return true;
      });
    });

    test('a stream cut midway fails the iteration', async () => {
      const stream = await client.chat.completions.create(
        { model: MODEL, messages: MESSAGES, stream: true },
        { headers: { 'x-mock-fault': 'cut', 'x-mock-chunks': '20', 'x-mock-interval-ms': '10' } },
      );
      let received = 0;
      await assert.rejects(async () => {
        for await (const chunk of stream) received += chunk.choices.length;
      }, OpenAI.APIError);
      assert.ok(received > 0, 'the stream had begun before it broke');
    });

    test('usage is in the log', async () => {
      // The log is written off the hot path, in batches: wait for every row checked below.
      const rows = await eventually(async () => {
        const log = await gateway.log();
        const ok = log.filter((row) => row.status === 200 && row.path === '/v1/chat/completions');
        const refused = log.some((row) => row.status === 401) && log.some((row) => row.status === 429);
        return ok.length >= 4 && refused ? log : null;
      });
      assert.ok(rows, 'the answered requests were logged');
      const answered = rows.filter((row) => row.status === 200);
      for (const row of answered) {
        assert.equal(row.upstream, kind.name);
        assert.equal(row.model, MODEL);
        assert.ok(row.total_tokens > 0, JSON.stringify(row));
      }
      assert.ok(answered.some((row) => row.stream), 'a streamed request was logged with its usage');
      assert.ok(rows.some((row) => row.status === 401));
      assert.ok(rows.some((row) => row.status === 429));
    });
  });
}
