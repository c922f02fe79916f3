#!/usr/bin/env node
// The official `openai` Node SDK against openai-proxy, as a user would point it there.
//
//   node node_sdk.mjs BASE_URL [UPLOAD_FILE]
//       A chat completion, a streamed chat completion, an embeddings call and a file upload.
//   node node_sdk.mjs BASE_URL --expect-error STATUS ERROR_JSON
//       Every call must fail with the SDK's status error carrying the proxy's own error object.
//
// Exits 0 and prints a short summary, or exits 1 with the reason. tests/sdk.rs runs it against
// the fake upstream and then checks what that upstream received.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { isDeepStrictEqual } from 'node:util';

let OpenAI;
try {
  ({ default: OpenAI } = await import('openai'));
} catch (e) {
  console.error(
    `node_sdk.mjs: the \`openai\` package is missing (${e.code ?? e.message}); ` +
      'install it with: cd tests/clients && npm ci',
  );
  process.exit(1);
}
const { VERSION } = await import('openai/version');

// The key the SDK is given: a client's own OpenAI key, or a token of the proxy's (tokens mode).
const API_KEY = process.env.OPENAI_PROXY_TEST_API_KEY ?? 'sk-test-SECRET-KEY-123';
const MODEL = 'gpt-4o-mini';
// The fake upstream reads these headers: this many content events, this far apart. The gap is
// wide enough that a stream buffered anywhere on the way shows up as chunks arriving together.
const STREAM_EVENTS = 6;
const STREAM_GAP_MS = 100;
// A proxy that answers before reading the request body and then closes at once races the client
// still sending it: the client's write fails and it never reads the answer. Whether one upload
// loses that race is chance, so the error check makes several.
const ERROR_UPLOADS = 8;

class Failure extends Error {}

function check(condition, message) {
  if (!condition) throw new Failure(message);
}

function client(baseURL) {
  // No retries: a retry would hide a flaky proxy and turn a 502 check into three requests.
  return new OpenAI({ apiKey: API_KEY, baseURL, maxRetries: 0, timeout: 30_000 });
}

async function chat(c) {
  const completion = await c.chat.completions.create({
    model: MODEL,
    messages: [{ role: 'user', content: 'Say hello' }],
  });
  check(completion.object === 'chat.completion', `chat: object is ${completion.object}`);
  const text = completion.choices[0].message.content;
  check(text === 'Hello from the fake upstream.', `chat: content is ${JSON.stringify(text)}`);
  check(completion.usage?.total_tokens === 11, 'chat: usage lost');
  check(
    completion._request_id === 'req_upstream_123',
    `chat: OpenAI's x-request-id did not reach the SDK: ${completion._request_id}`,
  );
  return `chat: ${JSON.stringify(text)}`;
}

async function stream(c) {
  const response = await c.chat.completions.create(
    { model: MODEL, messages: [{ role: 'user', content: 'Count' }], stream: true },
    {
      headers: {
        'x-test-stream': 'node-sdk',
        'x-test-events': String(STREAM_EVENTS),
        'x-test-gap-ms': String(STREAM_GAP_MS),
      },
    },
  );
  const chunks = [];
  const arrivals = [];
  for await (const chunk of response) {
    chunks.push(chunk);
    arrivals.push(performance.now());
  }
  // One chunk per content event, then the one that carries finish_reason.
  check(
    chunks.length === STREAM_EVENTS + 1,
    `stream: ${chunks.length} chunks arrived, expected ${STREAM_EVENTS + 1}`,
  );
  const text = chunks.map((ch) => ch.choices[0].delta.content ?? '').join('');
  const expected = Array.from({ length: STREAM_EVENTS }, (_, i) => `tok${i} `).join('');
  check(text === expected, `stream: text joined to ${JSON.stringify(text)}, expected ${JSON.stringify(expected)}`);
  const finish = chunks.at(-1).choices[0].finish_reason;
  check(finish === 'stop', `stream: last chunk's finish_reason is ${finish}`);
  check(chunks.every((ch) => ch.object === 'chat.completion.chunk'), 'stream: not all chunks');
  const span = arrivals[STREAM_EVENTS - 1] - arrivals[0];
  const sentSpan = (STREAM_EVENTS - 1) * STREAM_GAP_MS;
  // Half the upstream's spread is far from both a buffered stream (~0) and scheduler noise.
  check(
    span >= sentSpan / 2,
    `stream: content chunks arrived within ${span.toFixed(0)} ms although the upstream spread ` +
      `them over ${sentSpan} ms: something buffered the stream`,
  );
  return `stream: ${chunks.length} chunks over ${span.toFixed(0)} ms, ${JSON.stringify(text.trim())}`;
}

async function embeddings(c) {
  // The fake upstream always answers with floats, so ask for them rather than the SDK's base64.
  const result = await c.embeddings.create({
    model: 'text-embedding-3-small',
    input: 'The quick brown fox',
    encoding_format: 'float',
  });
  check(result.data.length === 1, `embeddings: ${result.data.length} vectors`);
  const vector = result.data[0].embedding;
  check(isDeepStrictEqual(vector, [0.25, -0.5, 0.125]), `embeddings: vector is ${JSON.stringify(vector)}`);
  return `embeddings: ${JSON.stringify(vector)}`;
}

async function upload(c, file) {
  const size = fs.statSync(file).size;
  const created = await c.files.create({ file: fs.createReadStream(file), purpose: 'fine-tune' });
  const name = path.basename(file);
  check(created.id === 'file-test123', `upload: id is ${created.id}`);
  check(created.filename === name, `upload: upstream saw filename ${created.filename}`);
  check(created.purpose === 'fine-tune', `upload: purpose is ${created.purpose}`);
  // The fake upstream counts the multipart body it received: the file plus the part headers.
  check(
    created.bytes > size && created.bytes < size + 4096,
    `upload: upstream received a ${created.bytes}-byte body for a ${size}-byte file`,
  );
  return `upload: ${name} (${size} bytes) arrived in a ${created.bytes}-byte multipart body`;
}

function sampleFile(directory, count = 2000) {
  const file = path.join(directory, 'train.jsonl');
  const lines = [];
  for (let i = 0; i < count; i++) {
    lines.push(
      JSON.stringify({
        messages: [
          { role: 'user', content: `question ${i} ünïcødé` },
          { role: 'assistant', content: `answer ${i}` },
        ],
      }) + '\n',
    );
  }
  fs.writeFileSync(file, lines.join(''));
  return file;
}

async function withTempDir(f) {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'node-sdk-'));
  try {
    return await f(directory);
  } finally {
    fs.rmSync(directory, { recursive: true, force: true });
  }
}

async function happy(baseURL, uploadPath) {
  const c = client(baseURL);
  const lines = [await chat(c), await stream(c), await embeddings(c)];
  if (uploadPath === undefined) {
    lines.push(await withTempDir((d) => upload(c, sampleFile(d))));
  } else {
    lines.push(await upload(c, uploadPath));
  }
  return lines;
}

async function expectError(baseURL, status, expected) {
  const c = client(baseURL);
  return withTempDir(async (directory) => {
    // About 1 MB: more than the socket buffers hold, so the body is still being sent.
    const file = sampleFile(directory, 9000);
    const calls = {
      chat: () => c.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'hi' }] }),
      stream: () =>
        c.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'hi' }], stream: true }),
      embeddings: () =>
        c.embeddings.create({ model: 'text-embedding-3-small', input: 'x', encoding_format: 'float' }),
    };
    for (let i = 1; i <= ERROR_UPLOADS; i++) {
      calls[`upload ${i}/${ERROR_UPLOADS}`] = () =>
        c.files.create({ file: fs.createReadStream(file), purpose: 'fine-tune' });
    }
    const lines = [];
    const failures = [];
    for (const [name, call] of Object.entries(calls)) {
      try {
        lines.push(await errorCall(name, call, status, expected));
      } catch (e) {
        if (!(e instanceof Failure)) throw e;
        failures.push(e.message);
      }
    }
    // Every failing call, not just the first: how many uploads lost the race is the evidence.
    const total = Object.keys(calls).length;
    check(failures.length === 0, `${failures.length} of ${total} calls failed:\n  ${failures.join('\n  ')}`);
    return lines;
  });
}

async function errorCall(name, call, status, expected) {
  let error;
  try {
    const result = await call();
    throw new Failure(`${name}: expected an error ${status}, the call returned ${JSON.stringify(result)}`);
  } catch (e) {
    if (e instanceof Failure) throw e;
    error = e;
  }
  if (!(error instanceof OpenAI.APIError) || error.status === undefined) {
    const causes = [];
    for (let c = error?.cause; c && causes.length < 5; c = c.cause) {
      causes.push(c.code ? `${c.code}: ${c.message}` : String(c.message ?? c));
    }
    throw new Failure(
      `${name}: expected the SDK's status error ${status}, got ${error?.constructor?.name}: ${error?.message}` +
        ` (cause: ${causes.join(' <- ') || 'none'})`,
    );
  }
  check(error.status === status, `${name}: status ${error.status}, expected ${status}`);
  if (status >= 500) {
    check(error instanceof OpenAI.InternalServerError, `${name}: ${error.constructor.name} is not InternalServerError`);
  }
  check(
    isDeepStrictEqual(error.error, expected),
    `${name}: SDK's error body is ${JSON.stringify(error.error)}, expected ${JSON.stringify(expected)}`,
  );
  check(error.code === expected.code, `${name}: error.code is ${error.code}`);
  check(error.type === expected.type, `${name}: error.type is ${error.type}`);
  check(error.param === null, `${name}: error.param is ${error.param}`);
  check(error.message === `${status} ${expected.message}`, `${name}: error.message is ${JSON.stringify(error.message)}`);
  const ours = error.headers?.get('x-proxy-request-id');
  check(Boolean(ours), `${name}: no x-proxy-request-id on the proxy's error`);
  return `${name}: ${error.constructor.name} ${error.status} ${error.code}: ${JSON.stringify(expected.message)} (id ${ours})`;
}

// A chat completion without retries must fail with RateLimitError and Retry-After; then one with
// the SDK's retries, honouring Retry-After, must succeed once the proxy lets it in.
async function rateLimited(baseURL) {
  let error;
  try {
    const result = await chat(client(baseURL));
    throw new Failure(`chat: expected RateLimitError, the call returned ${JSON.stringify(result)}`);
  } catch (e) {
    if (e instanceof Failure) throw e;
    error = e;
  }
  check(error instanceof OpenAI.RateLimitError, `chat: ${error?.constructor?.name} is not RateLimitError: ${error?.message}`);
  check(error.code === 'rate_limit_exceeded', `429: error.code is ${error.code}`);
  const retryAfter = error.headers?.get('retry-after');
  check(retryAfter === '1', `429: Retry-After is ${retryAfter}`);
  const patient = new OpenAI({ apiKey: API_KEY, baseURL, maxRetries: 8, timeout: 30_000 });
  const started = performance.now();
  const line = await chat(patient);
  return [
    `RateLimitError 429 ${error.code}, Retry-After ${retryAfter}`,
    `retried: ${line} after ${((performance.now() - started) / 1000).toFixed(1)}s`,
  ];
}

async function main(argv) {
  const usage =
    'usage: node node_sdk.mjs BASE_URL [UPLOAD_FILE]\n' +
    '       node node_sdk.mjs BASE_URL --expect-error STATUS ERROR_JSON\n' +
    '       node node_sdk.mjs BASE_URL --rate-limited';
  let lines;
  if (argv.length === 2 && argv[1] === '--rate-limited') {
    lines = await rateLimited(argv[0]);
  } else if (argv.length === 4 && argv[1] === '--expect-error') {
    lines = await expectError(argv[0], Number(argv[2]), JSON.parse(argv[3]));
  } else if ((argv.length === 1 || argv.length === 2) && !argv[0].startsWith('-')) {
    lines = await happy(argv[0], argv[1]);
  } else {
    console.error(usage);
    return 2;
  }
  console.log(`node openai ${VERSION} via ${argv[0]}`);
  for (const line of lines) console.log(`  ok ${line}`);
  return 0;
}

try {
  process.exitCode = await main(process.argv.slice(2));
} catch (e) {
  if (e instanceof Failure) {
    console.error(`node_sdk.mjs FAILED: ${e.message}`);
  } else {
    console.error('node_sdk.mjs FAILED with an exception:', e);
  }
  process.exitCode = 1;
}
