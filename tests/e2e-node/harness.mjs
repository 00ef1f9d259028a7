// The harness of the Node SDK tests: the real `sluice` binary (SLUICE_TEST_BIN, else
// target/debug/sluice) as the gateway, and `sluice mock-upstream` speaking each upstream
// kind. An upstream kind is one entry of UPSTREAM_KINDS: the mock's arguments and the
// config of an upstream of that kind; every case in sdk.test.mjs runs against each entry.

import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const BIN = process.env.SLUICE_TEST_BIN ?? join(ROOT, 'target', 'debug', 'sluice');

export const GATEWAY_KEY = 'fk-node-alice-0001';
export const UPSTREAM_KEY = 'sk-node-upstream-0001';
export const ADMIN_KEY = 'admin-node-0001';
/** The model every case asks for; each kind's upstream serves it. */
export const MODEL = 'gpt-4o';

/**
 * Upstream kinds the cases run against. Adding one is an entry here: `mock` are the
 * arguments of `sluice mock-upstream` that make it speak the kind, `upstream(address)`
 * the YAML of an upstream of the kind (listed under `upstreams:`) in front of that mock.
 */
export const UPSTREAM_KINDS = [
  {
    name: 'openai',
    mock: ['--protocol', 'openai'],
    upstream: (address) => `
  - name: openai
    base_url: http://${address}
    keys: [${UPSTREAM_KEY}]`,
  },
  {
    name: 'azure',
    mock: ['--protocol', 'azure'],
    upstream: (address) => `
  - name: azure
    kind: azure
    base_url: http://${address}
    api_version: '2024-10-21'
    keys: [${UPSTREAM_KEY}]
    deployments: {${MODEL}: gpt-4o}`,
  },
  {
    name: 'anthropic',
    mock: ['--protocol', 'anthropic'],
    upstream: (address) => `
  - name: anthropic
    kind: anthropic
    base_url: http://${address}
    keys: [${UPSTREAM_KEY}]`,
  },
  {
    name: 'gemini',
    mock: ['--protocol', 'gemini'],
    upstream: (address) => `
  - name: gemini
    kind: gemini
    base_url: http://${address}
    keys: [${UPSTREAM_KEY}]`,
  },
];

/** A child process whose address is read from its `listening on http://…` line. */
class Child {
  constructor(args, cwd) {
    this.output = '';
    this.proc = spawn(BIN, args, {
      cwd,
      env: { ...process.env, SLUICE_LOG: 'info', OPENAI_API_KEY: '', SLUICE_CONFIG: '' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    this.address = new Promise((resolveAddress, reject) => {
      const timer = setTimeout(() => reject(new Error(`no address within 20 s:\n${this.output}`)), 20_000);
      const read = (chunk) => {
        this.output += chunk;
        const found = /listening on http:\/\/([^/\s]+)/.exec(this.output);
        if (found) {
          clearTimeout(timer);
          resolveAddress(found[1]);
        }
      };
      this.proc.stdout.on('data', read);
      this.proc.stderr.on('data', read);
      this.proc.on('exit', (code) => reject(new Error(`exited with ${code}:\n${this.output}`)));
    });
  }

  stop() {
    this.proc.kill('SIGTERM');
  }
}

/**
 * Starts a mock of `kind` and a gateway in front of it (retries off, so an upstream's
 * error reaches the client as it is). Returns the gateway's base URL, a way to read its
 * log, and `stop`.
 */
export async function start(kind) {
  const dir = mkdtempSync(join(tmpdir(), `sluice-node-${kind.name}-`));
  const mock = new Child(['mock-upstream', '--listen', '127.0.0.1:0', '--record', '--keys', UPSTREAM_KEY, ...kind.mock], dir);
  const mockAddress = await mock.address;
  const config = `
admin: {key: ${ADMIN_KEY}}
routing: {retries: 0}
access:
  keys:
    - {name: alice, key: ${GATEWAY_KEY}}
upstreams:${kind.upstream(mockAddress)}
`;
  writeFileSync(join(dir, 'sluice.yaml'), config);
  const gateway = new Child(['serve', '--config', join(dir, 'sluice.yaml'), '--listen', '127.0.0.1:0'], dir);
  let address;
  try {
    address = await gateway.address;
  } catch (error) {
    mock.stop();
    throw error;
  }
  return {
    baseURL: `http://${address}/v1`,
    /** The gateway's request log, newest first. */
    async log() {
      const response = await fetch(`http://${address}/api/requests?per_page=100`, {
        headers: { authorization: `Bearer ${ADMIN_KEY}` },
      });
      return (await response.json()).data;
    },
    /** What the gateway wrote to its own output (to look for secrets in it). */
    output: () => gateway.output,
    stop() {
      gateway.stop();
      mock.stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Waits until `check()` resolves truthy, for at most `ms`. */
export async function eventually(check, ms = 5000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value || Date.now() > deadline) return value;
    await new Promise((r) => setTimeout(r, 25));
  }
}
