/**
 * Example handlers for a Node.js Trellis worker, and the process that serves them.
 *
 *     node main.js        # see README.md for the environment variables
 *
 * `prepare`, `double`, `square` and `combine` are examples/diamond.yaml's task types (the same
 * logic as examples/diamond_worker.py), so a diamond can run on Node and Python workers mixed.
 * `hold` and `fail` show cancellation and failures.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { NonRetryableError, Worker, connectionFromEnv, consoleLogger } from './worker.js';

/** A failure worth retrying (the node's retry policy decides how often). */
export class TransientError extends Error {
  name = 'TransientError';
}

/** @param {number} holdMs how long `hold` runs unless aborted */
export function makeHandlers({ holdMs = 60_000 } = {}) {
  return {
    /** The execution input, checked: `{"n": 3}`. */
    prepare(input) {
      if (!Number.isInteger(input?.n)) throw new NonRetryableError('input must look like {"n": 3}');
      return { n: input.n };
    },

    double: (input) => ({ doubled: input.n * 2 }),

    square(input, ctx) {
      ctx.heartbeat({ squaring: input.n }); // progress details, sent with the next heartbeat
      return { squared: input.n ** 2 };
    },

    /** Two parents: the input is keyed by their node ids. */
    combine: (input) => ({ sum: input.double.doubled + input.square.squared }),

    /** Runs `holdMs` unless the coordinator cancels it or the lease is lost (ctx.signal). */
    async hold(input, ctx) {
      ctx.log(`holding for ${holdMs} ms`);
      await sleep(holdMs, undefined, { signal: ctx.signal }); // rejects once aborted
      ctx.log('held');
      return { held_by: ctx.workerId };
    },

    /**
     * Throws: `{"message": "...", "non_retryable": true}` fails the node at once; otherwise a
     * TransientError is retried, and `"succeed_on_attempt": n` makes attempt n succeed.
     */
    fail(input, ctx) {
      const { message = `failed on attempt ${ctx.attempt}`, non_retryable: nonRetryable = false, succeed_on_attempt: fixedAt } = input ?? {};
      if (fixedAt && ctx.attempt >= fixedAt) return { succeeded_on_attempt: ctx.attempt };
      throw nonRetryable ? new NonRetryableError(message) : new TransientError(message);
    },
  };
}

/** Reads the environment (here only), then serves until SIGTERM/SIGINT. */
async function main(env) {
  const all = makeHandlers({ holdMs: Number(env.HOLD_MS ?? 60_000) });
  const wanted = (env.NODE_TASKS ?? '').split(',').map((name) => name.trim()).filter(Boolean);
  const unknown = wanted.filter((name) => !(name in all));
  if (unknown.length) throw new Error(`NODE_TASKS names unknown task types: ${unknown.join(', ')} (known: ${Object.keys(all).join(', ')})`);
  const handlers = wanted.length ? Object.fromEntries(wanted.map((name) => [name, all[name]])) : all;
  const worker = new Worker({
    handlers,
    ...connectionFromEnv(env), // address, apiKey, tls, insecure
    concurrency: Number(env.WORKER_CONCURRENCY || 16),
    workerId: env.WORKER_ID || '',
    pollWaitMs: Number(env.POLL_WAIT_MS || 20_000),
    logger: consoleLogger(env.TRELLIS_LOG_LEVEL?.toLowerCase() || 'info'),
  });
  await worker.run();
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  main(process.env).catch((err) => {
    console.error(`node worker: ${err.message}`);
    process.exitCode = 1;
  });
}
