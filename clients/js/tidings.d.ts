// Types of the tidings browser client (tidings.js). docs/CLIENT.md has the rules.

/** A version, `"<16 hex digits epoch>:<offset>"`. */
export type Version = string;

/** The protocol's filter: top-level fields of an event's data and the scalars allowed. */
export type Filter = Record<string, Array<string | number | boolean | null>>;

/** A message as the gateway sends it (every transport hands over this shape). */
export type Message =
  | { type: 'event'; topic: string; offset: number; version: Version; data: unknown; ts?: number }
  | { type: 'snapshot'; topic: string; version: Version; state: unknown; ts?: number }
  | { type: 'change'; topic: string; diff: unknown[]; old_version: Version; new_version: Version; ts?: number }
  | { type: 'history_truncated'; topic: string; last_version: Version | null; first_available: Version; version: Version; ts?: number }
  | { type: 'closed'; topic: string; version: Version | null; ts?: number };

export type TransportName = 'websocket' | 'sse' | 'poll';
export type Status = 'idle' | 'connecting' | 'open' | 'waiting' | 'closed';

export interface Backoff {
  /** First window, ms (default 500). */
  base: number;
  /** Largest window, ms (default 30000). */
  cap: number;
  /** A connection up this long resets the backoff, ms (default 10000). */
  healthy: number;
}

export interface Options {
  /** A JWT (sent as the `tidings.token.<jwt>` subprotocol, or `Authorization` over
   * SSE and polling) or an API key (headers only: SSE and polling). */
  token?: string;
  /** Called for a token before connecting when the current one is missing or within
   * `refreshBefore` seconds of its `exp`, on `token_expiring`, and after a 4001 close. */
  getToken?: () => string | Promise<string>;
  /** Transports in order of preference (default all three). */
  transports?: TransportName[];
  backoff?: Partial<Backoff>;
  pingInterval?: number;
  pongTimeout?: number;
  openTimeout?: number;
  sseSilence?: number;
  /** Long-poll wait in seconds (default 25). */
  pollWait?: number;
  pollInterval?: number;
  maxLongPolls?: number;
  refreshBefore?: number;
  /** 'header' (default: the WebSocket subprotocol, `Authorization` over SSE and polling)
   * or 'query' (`?token=`; a JWT only, and URLs end up in proxies' logs). */
  tokenIn?: 'header' | 'query';
  fallbackAfter?: number;
  /** A WebSocket class (default the global one). */
  WebSocket?: typeof WebSocket;
  /** A fetch function (default the global one). */
  fetch?: typeof fetch;
  /** The jitter's random source (default Math.random). */
  random?: () => number;
}

export interface Subscription {
  /** Resolves once the gateway holds the subscription: what is published from then on
   * is delivered. */
  readonly ready: Promise<void>;
  /** The topic's last version processed (null before any). */
  readonly version: Version | null;
  /** A state document's current value (undefined before its snapshot). */
  readonly doc: unknown;
  unsubscribe(): void;
}

export interface SubscribeOptions {
  filter?: Filter;
  /** Resume from a version the application kept. */
  since?: Version;
}

export interface StateOptions {
  since?: Version;
  onClosed?: (msg: Message) => void;
}

export interface Stats {
  connects: number;
  failures: number;
  fallbacks: number;
  resyncs: number;
  duplicates: number;
}

export declare const DEFAULTS: Readonly<Required<Omit<Options, 'token' | 'getToken' | 'WebSocket' | 'fetch' | 'random'>>>;

export declare class Tidings {
  constructor(url: string, options?: Options);
  /** Events of a topic or a pattern (`runs:*`), each message once and in order. */
  subscribe(topicOrPattern: string, cb: (msg: Message) => void, options?: SubscribeOptions): Subscription;
  /** A state document: `cb(doc, version)` after its snapshot and each change. */
  state<T = unknown>(topic: string, cb: (doc: T, version: Version) => void, options?: StateOptions): Subscription;
  on(event: 'status', fn: (status: Status, transport: TransportName | null) => void): () => void;
  on(event: 'open', fn: (transport: TransportName) => void): () => void;
  on(event: 'error', fn: (error: { code: string; message: string; topic?: string }) => void): () => void;
  on(event: 'reconnect', fn: (info: { attempt: number; delay: number }) => void): () => void;
  close(): void;
  readonly url: string;
  readonly status: Status;
  readonly transportName: TransportName | null;
  readonly stats: Stats;
}

export declare function backoffDelay(attempt: number, backoff: Pick<Backoff, 'base' | 'cap'>, random?: () => number): number;
export declare function parseVersion(version: unknown): { epoch: string; offset: number } | null;
export declare function isPattern(name: string): boolean;
export declare function patternMatches(pattern: string, topic: string): boolean;
export declare function matchesFilter(filter: Filter | null, data: unknown): boolean;
export declare function buildCursor(versions: Array<[string, Version]>, baseMs?: number | null, topics?: string[]): string;
export declare function parseCursor(id: string, topics: string[]): { base: number | null; versions: Map<string, Version> } | null;
export declare function tokenExpiry(token: unknown): number | null;
export declare class SseParser {
  push(text: string): Array<{ event?: string; data?: string; id?: string | null; retry?: number; comment?: boolean }>;
}
export default Tidings;
