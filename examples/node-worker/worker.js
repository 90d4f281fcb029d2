/**
 * A small Trellis worker for Node.js that follows docs/protocol.md. It loads the .proto files
 * from ../../proto at run time (no code generation), registers, long-polls for up to its free
 * capacity, runs handlers concurrently, heartbeats all its leases in one call, and delivers
 * each result until it is accepted or the lease is gone. `stop()` (SIGTERM/SIGINT under
 * `run()`) stops polling and lets in-flight handlers finish and deliver.
 *
 *     await new Worker({ handlers: { double: (input) => ({ doubled: input.n * 2 }) } }).run();
 */
import { readFileSync } from 'node:fs';
import os from 'node:os';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

export const DEFAULT_ADDRESS = '127.0.0.1:7400';
const PROTO_ROOT = fileURLToPath(new URL('../../proto', import.meta.url));
const PACKAGE = JSON.parse(readFileSync(new URL('./package.json', import.meta.url), 'utf8'));
const RPC_TIMEOUT_MS = 30_000;
const POLL_DEADLINE_SLACK_MS = 10_000; // a poll's deadline is its wait + this
const DEFAULT_HEARTBEAT_MS = 10_000; // until RegisterWorker says otherwise
const MIN_HEARTBEAT_MS = 50;
const CHANNEL_OPTIONS = {
  'grpc.initial_reconnect_backoff_ms': 100, // reconnect quickly after a coordinator restart
  'grpc.max_reconnect_backoff_ms': 10_000,
  'grpc.max_receive_message_length': 64 * 1024 * 1024, // large batches of tasks
};
const S = grpc.status; // S.UNAVAILABLE === 14, S[14] === 'UNAVAILABLE'
/** "Not now" rather than "never": retried with backoff. */
const TRANSIENT = new Set([
  S.UNAVAILABLE, S.DEADLINE_EXCEEDED, S.RESOURCE_EXHAUSTED, S.ABORTED, S.INTERNAL, S.UNKNOWN, S.CANCELLED,
]);
/** On delivery: the lease is no longer ours (superseded, expired, unknown). Drop the result. */
const LEASE_GONE = new Set([S.FAILED_PRECONDITION, S.NOT_FOUND]);
/** The worker is misconfigured: the first registration gives up. */
const FATAL = new Set([S.INVALID_ARGUMENT, S.UNIMPLEMENTED, S.PERMISSION_DENIED, S.UNAUTHENTICATED]);

const TRUE = new Set(['1', 'true', 'yes', 'on']);
const LOOPBACK_HOSTS = new Set(['127.0.0.1', 'localhost', '::1', '[::1]']);

/**
 * @typedef {object} TlsOptions  TLS to the coordinator
 * @property {string} [caFile]  the CA bundle (PEM) that signs the coordinator's certificate;
 *   unset: Node's default CAs
 * @property {string} [certFile]  a client certificate (PEM) for mutual TLS, with `keyFile`
 * @property {string} [keyFile]
 * @property {string} [serverName]  the name to check the certificate against when it differs
 *   from the address's host
 */
/**
 * @typedef {object} Connection  how to reach the coordinator
 * @property {string} address  host:port
 * @property {string} apiKey  sent as `authorization: Bearer <key>` on every call ('' : none)
 * @property {TlsOptions|null} tls  null: plaintext
 * @property {boolean} insecure  plaintext to an address that is not loopback, chosen explicitly
 */

/**
 * The connection named by the `TRELLIS_*` variables of `env`, the same ones the Python SDK
 * reads: TRELLIS_ADDRESS, TRELLIS_API_KEY, TRELLIS_CA_FILE, TRELLIS_CLIENT_CERT_FILE,
 * TRELLIS_CLIENT_KEY_FILE, TRELLIS_TLS_SERVER_NAME, TRELLIS_TLS (TLS with the default CAs)
 * and TRELLIS_INSECURE. Unset and empty are alike.
 * @returns {Connection}
 */
export function connectionFromEnv(env) {
  const get = (name) => (env[name] ?? '').trim();
  const flag = (name) => TRUE.has(get(name).toLowerCase());
  const [caFile, certFile] = [get('TRELLIS_CA_FILE'), get('TRELLIS_CLIENT_CERT_FILE')];
  const tls = caFile || certFile || flag('TRELLIS_TLS')
    ? { caFile, certFile, keyFile: get('TRELLIS_CLIENT_KEY_FILE'), serverName: get('TRELLIS_TLS_SERVER_NAME') }
    : null;
  return {
    address: get('TRELLIS_ADDRESS') || DEFAULT_ADDRESS, apiKey: get('TRELLIS_API_KEY'), tls, insecure: flag('TRELLIS_INSECURE'),
  };
}

/**
 * The channel credentials and client options for a connection; throws when it would send
 * plaintext to an address that is not loopback unasked (the Python SDK's rule), or names
 * half a client certificate.
 *
 * The API key rides as call credentials over TLS. grpc-js refuses to compose call credentials
 * onto insecure channel credentials, so in plaintext a client interceptor adds the header.
 * @param {{address: string, apiKey?: string, tls?: TlsOptions|null, insecure?: boolean}} connection
 * @returns {{credentials: grpc.ChannelCredentials, options: object}}
 */
export function channelSetup({ address, apiKey = '', tls = null, insecure = false }) {
  const options = { ...CHANNEL_OPTIONS };
  if (tls) {
    if (Boolean(tls.certFile) !== Boolean(tls.keyFile)) {
      throw new Error('mutual TLS needs both TRELLIS_CLIENT_CERT_FILE and TRELLIS_CLIENT_KEY_FILE');
    }
    const read = (file) => (file ? readFileSync(file) : null);
    let credentials = grpc.credentials.createSsl(read(tls.caFile), read(tls.keyFile), read(tls.certFile));
    if (tls.serverName) options['grpc.ssl_target_name_override'] = tls.serverName;
    if (apiKey) {
      const bearer = grpc.credentials.createFromMetadataGenerator((_params, callback) => {
        const metadata = new grpc.Metadata();
        metadata.set('authorization', `Bearer ${apiKey}`);
        callback(null, metadata);
      });
      credentials = grpc.credentials.combineChannelCredentials(credentials, bearer);
    }
    return { credentials, options };
  }
  if (!isLoopback(address) && !insecure) {
    throw new Error(`refusing plaintext to ${address}: set TRELLIS_CA_FILE (or TRELLIS_TLS=true) to connect `
      + 'over TLS, or TRELLIS_INSECURE=true to choose plaintext');
  }
  if (apiKey) options.interceptors = [bearerInterceptor(apiKey)];
  return { credentials: grpc.credentials.createInsecure(), options };
}

/** A client interceptor adding `authorization: Bearer <key>` to every call's metadata. */
function bearerInterceptor(apiKey) {
  return (options, nextCall) => new grpc.InterceptingCall(nextCall(options), {
    start(metadata, listener, next) {
      metadata.set('authorization', `Bearer ${apiKey}`);
      next(metadata, listener);
    },
  });
}

function isLoopback(address) {
  const colon = address.lastIndexOf(':');
  return LOOPBACK_HOSTS.has(colon < 0 ? address : address.slice(0, colon));
}

/** Throw this (or any error with `nonRetryable = true`) to fail the node without retries. */
export class NonRetryableError extends Error {
  constructor(message, options) {
    super(message, options);
    this.name = 'NonRetryableError';
    this.nonRetryable = true;
  }
}

/** Delays of uniform(0, min(maxMs, initialMs * 2^n)) for the n-th failure in a row ("full jitter"). */
export class Backoff {
  constructor(initialMs = 100, maxMs = 10_000) {
    Object.assign(this, { initialMs, maxMs, failures: 0 });
  }
  next() {
    return Math.random() * Math.min(this.maxMs, this.initialMs * 2 ** Math.min(this.failures++, 30));
  }
  reset() {
    this.failures = 0;
  }
}

/**
 * @typedef {{ [level in 'debug'|'info'|'warn'|'error']: (msg: string, fields?: object) => void }} Logger
 *   pino and the like fit; `consoleLogger()` writes `time LEVEL message {fields}` lines to stderr.
 */
/** @returns {Logger} */
export function consoleLogger(level = 'info') {
  const levels = ['debug', 'info', 'warn', 'error'];
  const min = Math.max(levels.indexOf(level === 'warning' ? 'warn' : level), 0);
  const write = (name) => (msg, fields) => {
    const extra = fields ? ` ${JSON.stringify(fields)}` : '';
    process.stderr.write(`${new Date().toISOString()} ${name.toUpperCase()} trellis.worker ${msg}${extra}\n`);
  };
  return Object.fromEntries(levels.map((name, rank) => [name, rank >= min ? write(name) : () => {}]));
}

/**
 * @typedef {object} TaskContext  what a handler gets besides its input
 * @property {AbortSignal} signal  aborted when the coordinator cancels the task or the lease is lost:
 *   stop; whatever the handler then returns or throws is not sent
 * @property {string} executionId
 * @property {string} nodeId
 * @property {string} taskType
 * @property {number} attempt  from 1
 * @property {string} idempotencyKey  `<execution id>:<node id>`, the same for every attempt
 * @property {string} workerId
 * @property {any} config  the node's static configuration (null when none)
 * @property {Date|null} leaseDeadline  the attempt fails unless completed before this
 * @property {(details: any) => void} heartbeat  progress details, sent with the next heartbeat
 * @property {(msg: string) => void} log  logs at info with the execution, node and attempt
 * @property {object} task  the raw trellis.v1.Task
 */
/** @typedef {(input: any, ctx: TaskContext) => any} Handler  returns (or resolves to) a JSON value */

/** Serves `handlers` (task type → Handler) to a Trellis coordinator. */
export class Worker {
  /**
   * @param {object} options
   * @param {Record<string, Handler>} options.handlers
   * @param {string} [options.address]  host:port of the coordinator
   * @param {string} [options.apiKey]  the credential, sent as `authorization: Bearer` (with mutual
   *   TLS a client certificate whose common name an admin registered may stand in for it)
   * @param {TlsOptions|null} [options.tls]  TLS to the coordinator (null: plaintext, which only
   *   a loopback address gets unless `insecure`)
   * @param {boolean} [options.insecure]  plaintext to an address that is not loopback
   * @param {number} [options.concurrency]  handlers run at once (and leases held at once)
   * @param {string} [options.workerId]  a stable id; the coordinator assigns one when empty
   * @param {number} [options.pollWaitMs]  how long one long-poll waits for work
   * @param {Record<string, string>} [options.labels]
   * @param {Logger} [options.logger]
   */
  constructor({
    handlers, address = DEFAULT_ADDRESS, apiKey = '', tls = null, insecure = false, concurrency = 10, workerId = '',
    pollWaitMs = 20_000, labels = {}, logger = consoleLogger(),
  }) {
    this.taskTypes = Object.keys(handlers ?? {}).sort();
    if (!this.taskTypes.length) throw new TypeError('a Worker needs at least one handler');
    for (const type of this.taskTypes) {
      if (typeof handlers[type] !== 'function') throw new TypeError(`the handler for ${type} is not a function`);
    }
    if (!Number.isInteger(concurrency) || concurrency < 1) {
      throw new RangeError(`concurrency must be a positive integer, got ${concurrency}`);
    }
    if (!(pollWaitMs > 0)) throw new RangeError(`pollWaitMs must be positive, got ${pollWaitMs}`);
    Object.assign(this, { handlers, address, concurrency, workerId, pollWaitMs, labels, log: logger });
    this.channel = channelSetup({ address, apiKey, tls, insecure }); // throws on a refused setup
    const definition = protoLoader.loadSync('trellis/v1/worker_service.proto', {
      includeDirs: [PROTO_ROOT], keepCase: true, longs: Number, enums: String, defaults: true,
    });
    this.Service = grpc.loadPackageDefinition(definition).trellis.v1.WorkerService;
    this.identity = `${os.hostname()}:${process.pid}`;
    this.leases = new Map(); // lease token → { task, abort, dropped, details, fields, done }
    this.wakers = new Set(); // see nap()
    this.heartbeatMs = DEFAULT_HEARTBEAT_MS;
  }

  /** Serves until SIGTERM or SIGINT; a second signal exits at once (held leases then expire). */
  async run() {
    const onSignal = (signal) => {
      if (this.stopping) {
        this.log.warn(`received ${signal} again: exiting without waiting for ${this.leases.size} tasks`);
        process.exit(1);
      }
      this.log.info(`received ${signal}: stopping; send it again to exit at once`, { worker_id: this.workerId });
      this.stop();
    };
    process.on('SIGTERM', onSignal).on('SIGINT', onSignal);
    try {
      await this.serve();
    } finally {
      process.off('SIGTERM', onSignal).off('SIGINT', onSignal);
    }
  }

  /** Serves until stop(); resolves once in-flight tasks have finished and been delivered. */
  async serve() {
    Object.assign(this, { stopping: false, closed: false, registered: false });
    this.client = new this.Service(this.address, this.channel.credentials, this.channel.options);
    try {
      if (!(await this.register(true))) return;
      this.scheduleHeartbeat();
      await this.pollLoop();
      if (this.leases.size) this.log.info(`stopping: waiting for ${this.leases.size} in-flight tasks`);
      await Promise.all([...this.leases.values()].map((lease) => lease.done));
    } finally {
      this.closed = true;
      clearTimeout(this.heartbeatTimer);
      this.client.close();
      this.log.info('worker stopped', { worker_id: this.workerId });
    }
  }

  /** Stops polling at once; serve() resolves when in-flight tasks are delivered. */
  stop() {
    if (this.stopping) return;
    this.stopping = true;
    this.current?.cancel(); // the long-poll (or registration) in flight
    this.wake();
  }

  /** A unary call as a promise; `track` lets stop() cancel it. */
  call(method, request, timeoutMs, track = false) {
    return new Promise((resolve, reject) => {
      const call = this.client[method](request, { deadline: Date.now() + timeoutMs }, (err, reply) => {
        if (this.current === call) this.current = null;
        if (err) reject(err);
        else resolve(reply);
      });
      if (track) this.current = call;
    });
  }

  /** Resolves after `ms` (never when undefined) or at the next wake(): a freed slot, stop(). */
  nap(ms) {
    return new Promise((resolve) => {
      const done = () => { clearTimeout(timer); this.wakers.delete(done); resolve(); };
      const timer = ms === undefined ? undefined : setTimeout(done, ms);
      this.wakers.add(done);
    });
  }

  wake() {
    for (const done of [...this.wakers]) done();
  }

  // -- protocol §1 and §2: register, then long-poll ---------------------------------------------

  /** Registers, retrying transient failures; false when stopped first. */
  async register(initial) {
    const backoff = new Backoff();
    while (!this.stopping) {
      try {
        const reply = await this.call('RegisterWorker', {
          worker_id: this.workerId, task_types: this.taskTypes, capacity: this.concurrency, labels: this.labels,
          sdk_language: 'node', sdk_version: PACKAGE.version, identity: this.identity,
        }, RPC_TIMEOUT_MS, true);
        this.workerId = reply.worker_id || this.workerId;
        this.heartbeatMs = Math.max(durationMs(reply.heartbeat_interval) || DEFAULT_HEARTBEAT_MS, MIN_HEARTBEAT_MS);
        this.registered = true;
        this.log.info(`registered with ${this.address} as ${this.workerId} for ${this.taskTypes.join(', ')} `
          + `(heartbeat every ${this.heartbeatMs} ms)`, { worker_id: this.workerId });
        return true;
      } catch (err) {
        if (this.stopping) return false;
        if (initial && FATAL.has(err.code)) throw err;
        const delay = backoff.next();
        this.log.warn(`cannot register with ${this.address} (${describe(err)}); retrying in ${seconds(delay)}`);
        await this.nap(delay);
      }
    }
    return false;
  }

  async pollLoop() {
    const backoff = new Backoff();
    while (!this.stopping) {
      if (!this.registered && !(await this.register(false))) break;
      const free = this.concurrency - this.leases.size;
      if (free <= 0) {
        await this.nap(); // until a lease is delivered
        continue;
      }
      let reply;
      try {
        reply = await this.call('PollTasks', {
          worker_id: this.workerId, task_types: this.taskTypes, max_tasks: free, wait: toDuration(this.pollWaitMs),
        }, this.pollWaitMs + POLL_DEADLINE_SLACK_MS, true);
      } catch (err) {
        if (this.stopping) break;
        // Reconnecting, or the coordinator forgot us: register again before the next poll.
        if (err.code === S.UNAVAILABLE || LEASE_GONE.has(err.code)) this.registered = false;
        const delay = backoff.next();
        this.log.warn(`polling ${this.address} failed (${describe(err)}); retrying in ${seconds(delay)}`);
        await this.nap(delay);
        continue;
      }
      backoff.reset();
      for (const task of reply.tasks) this.start(task);
    }
  }

  // -- protocol §4: run a task, then complete or fail it ------------------------------------------

  start(task) {
    const { execution_id, node_id, attempt } = task;
    const fields = { worker_id: this.workerId, execution_id, node_id, attempt };
    const lease = { task, abort: new AbortController(), dropped: null, details: Buffer.alloc(0), fields };
    this.leases.set(task.lease_token, lease);
    // A lease with a short heartbeat_timeout may need the next heartbeat sooner than planned.
    const timeout = durationMs(task.heartbeat_timeout);
    if (timeout > 0 && this.heartbeatTimer && this.nextHeartbeatAt > Date.now() + timeout / 2) {
      this.scheduleHeartbeat();
    }
    lease.done = this.execute(lease)
      .then((result) => result && !lease.dropped && this.deliver(lease, result))
      .catch((err) => this.log.error(`unexpected error: ${err?.stack ?? err}`, fields))
      .finally(() => { this.leases.delete(task.lease_token); this.wake(); });
  }

  /** Runs the handler; resolves to the CompleteTask or FailTask call to make (null: send nothing). */
  async execute(lease) {
    const { task } = lease;
    const handler = this.handlers[task.task_type];
    if (!handler) return this.failure(lease, 'UnknownTaskType', `this worker does not serve ${task.task_type}`);
    let input, config;
    try {
      [input, config] = [decodeJson(task.input), decodeJson(task.config)];
    } catch (err) {
      return this.failure(lease, 'InvalidPayload', `the task's input or config is not JSON: ${err.message}`, true);
    }
    const ctx = {
      signal: lease.abort.signal, executionId: task.execution_id, nodeId: task.node_id, taskType: task.task_type,
      attempt: task.attempt, idempotencyKey: task.idempotency_key, workerId: this.workerId, config,
      leaseDeadline: toDate(task.lease_deadline), task,
      heartbeat: (details) => { lease.details = encodeJson(details); },
      log: (msg) => this.log.info(msg, lease.fields),
    };
    let output;
    try {
      output = await handler(input, ctx);
    } catch (err) {
      if (lease.dropped) return this.dropped(lease);
      const message = err instanceof Error ? err.message : String(err);
      const details = err?.stack ? encodeJson({ stack: String(err.stack).slice(-32_000) }) : undefined;
      return this.failure(lease, errorType(err), message, err?.nonRetryable === true, details);
    }
    if (lease.dropped) return this.dropped(lease);
    try {
      const request = { lease_token: task.lease_token, output: encodeJson(output), worker_id: this.workerId };
      return { method: 'CompleteTask', request };
    } catch (err) {
      return this.failure(lease, 'OutputNotSerializable', `the handler's result is not JSON: ${err.message}`, true);
    }
  }

  dropped(lease) {
    const why = lease.dropped === 'cancelled' ? 'cancelled by the coordinator' : 'lease lost';
    this.log.info(`${lease.task.task_type}: dropped without a result (${why})`, lease.fields);
    return null;
  }

  failure(lease, type, message, nonRetryable = false, details = Buffer.alloc(0)) {
    const note = nonRetryable ? ' (not retryable)' : '';
    this.log.warn(`${lease.task.task_type} failed: ${type}: ${message}${note}`, lease.fields);
    const error = { type, message: message.slice(0, 4_000), non_retryable: nonRetryable, details };
    return { method: 'FailTask', request: { lease_token: lease.task.lease_token, error, worker_id: this.workerId } };
  }

  /** Sends a result until it is accepted, refused for good, or the lease is dropped. */
  async deliver(lease, result) {
    const backoff = new Backoff();
    while (!lease.dropped) {
      try {
        await this.call(result.method, result.request, RPC_TIMEOUT_MS);
        return;
      } catch (err) {
        const why = `${result.method} refused (${describe(err)})`;
        if (LEASE_GONE.has(err.code)) {
          this.log.warn(`${why}: the lease is gone; result dropped`, lease.fields);
          return;
        }
        const invalid = err.code === S.INVALID_ARGUMENT // e.g. over the payload limit; gRPC's own limit:
          || (err.code === S.RESOURCE_EXHAUSTED && /larger than max/i.test(err.details));
        if (invalid && result.method === 'CompleteTask') {
          result = this.failure(lease, 'OutputRejected', `the coordinator refused the output: ${err.details}`, true);
          continue;
        }
        if (invalid || !TRANSIENT.has(err.code)) {
          this.log.error(`${why}: giving up (the lease will expire and the task be retried)`, lease.fields);
          return;
        }
        const delay = backoff.next();
        this.log.warn(`${why}; result kept, retrying in ${seconds(delay)}`, lease.fields);
        await sleep(delay);
      }
    }
  }

  // -- protocol §3: heartbeats ---------------------------------------------------------------------

  /** Every heartbeat_interval, or half the shortest heartbeat_timeout of a held lease if shorter. */
  scheduleHeartbeat() {
    if (this.closed) return;
    clearTimeout(this.heartbeatTimer);
    let ms = this.heartbeatMs;
    for (const { task } of this.leases.values()) {
      const timeout = durationMs(task.heartbeat_timeout);
      if (timeout > 0) ms = Math.min(ms, timeout / 2);
    }
    ms = Math.max(ms, MIN_HEARTBEAT_MS);
    this.nextHeartbeatAt = Date.now() + ms;
    this.heartbeatTimer = setTimeout(async () => {
      this.heartbeatTimer = null; // a heartbeat is in flight; it schedules the next one
      await this.heartbeat();
      this.scheduleHeartbeat();
    }, ms);
  }

  /** One Heartbeat for every lease held; aborts the handlers of cancelled and lost leases. */
  async heartbeat() {
    const held = [...this.leases.values()].filter((lease) => !lease.dropped);
    if (!held.length) return;
    const leases = held.map((lease) => ({ lease_token: lease.task.lease_token, details: lease.details }));
    let reply;
    try {
      reply = await this.call('Heartbeat', { worker_id: this.workerId, leases }, Math.max(1_000, this.heartbeatMs));
    } catch (err) {
      if (!this.closed) this.log.warn(`heartbeat for ${held.length} leases failed (${describe(err)})`);
      return;
    }
    for (const token of reply.cancelled_lease_tokens) this.drop(token, 'cancelled');
    for (const token of reply.lost_lease_tokens) this.drop(token, 'lost');
  }

  drop(token, reason) {
    const lease = this.leases.get(token);
    if (!lease || lease.dropped) return;
    lease.dropped = reason;
    const error = new Error(reason === 'cancelled' ? 'the coordinator cancelled the task' : 'the lease was lost');
    error.name = 'AbortError';
    lease.abort.abort(error);
    this.log.info(`lease ${reason}: aborting the handler`, lease.fields);
  }
}

// -- conversions -------------------------------------------------------------------------------------

/** JSON bytes → value; empty bytes mean null. */
function decodeJson(bytes) {
  return bytes?.length ? JSON.parse(Buffer.from(bytes).toString('utf8')) : null;
}

/** Value → JSON bytes (undefined becomes null); throws on what JSON cannot carry (BigInt, cycles). */
function encodeJson(value) {
  const text = JSON.stringify(value ?? null);
  if (text === undefined) throw new TypeError(`a ${typeof value} is not JSON`);
  return Buffer.from(text, 'utf8');
}

const durationMs = (d) => (d ? Number(d.seconds) * 1000 + d.nanos / 1e6 : 0);
const toDuration = (ms) => ({ seconds: Math.floor(ms / 1000), nanos: Math.round((ms % 1000) * 1e6) });
const toDate = (ts) => (ts ? new Date(Number(ts.seconds) * 1000 + Math.floor(ts.nanos / 1e6)) : null);
const seconds = (ms) => `${(ms / 1000).toFixed(1)}s`;
const describe = (err) => `${S[err.code] ?? err.code}: ${err.details ?? err.message}`;

/** The error's name; for `class MyError extends Error {}` (name left "Error"), its class name. */
function errorType(err) {
  if (!(err instanceof Error)) return 'Error';
  return err.name !== 'Error' ? err.name : err.constructor?.name || 'Error';
}
