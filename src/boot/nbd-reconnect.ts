/**
 * The NBD reconnect daemon: a server that goes away must not lose a client.
 *
 * The kernel's nbd driver marks a connection dead when the server closes it, a send fails
 * or a request times out, and announces it with NBD_CMD_LINK_DEAD (the device's index) on
 * the nbd generic netlink family's multicast group. With one connection, I/O then waits
 * for a new one: requests submitted after the loss wait up to the dead-connection timeout
 * (DEAD_CONN_TIMEOUT), requests that were in flight are sent again when their request
 * timeout (TIMEOUT) runs out. Nothing in the kernel opens a new connection: this daemon
 * does. On LINK_DEAD it connects to the same server again, does the same handshake for the
 * same export, checks that the export is still the one the device was made from (same size;
 * not read-only where it was writable; no request the kernel sends refused), and hands the
 * socket over with NBD_CMD_RECONFIGURE. It retries with a growing delay, writes a console
 * line when the server is lost and when it is back, and gives up when the dead-connection
 * timeout is over: from then on the kernel fails the device's I/O.
 *
 * The daemon is vdboot's own /init started under argv[0] "@vdboot-nbd" (main.ts chooses by
 * that name), from the initramfs, right after the devices are connected. The "@" spares it
 * from systemd's final kill; it needs no file after it started (netlink and TCP only), so
 * it lives on after switch_root with the initramfs gone. The shutdown hand-off stops it
 * before it disconnects the nbd devices.
 *
 * Timeouts: the devices are connected with TIMEOUT and DEAD_CONN_TIMEOUT of 120 s (what
 * holds while nobody reconnects: a dead server fails the I/O after two minutes). Once the
 * daemon watches, it sets DEAD_CONN_TIMEOUT to rd.vdisk.nbd.timeout (default 300 s: a
 * server may reboot) and TIMEOUT to 30 s, so a read that was in flight when the server
 * went away is sent again at most 30 s later; a server that answers nothing for 30 s is
 * taken for dead and reconnected (without the daemon, that would fail the I/O: the
 * shorter TIMEOUT is set only by the daemon).
 */
import { FormatError } from '../formats/block-reader.ts';
import { formatNbdUrl, nbdHandshake, NbdReader, NbdRefusal, NBD_FLAG, parseNbdUrl, type NbdExport, type NbdUrl } from '../formats/nbd.ts';
import { attrU32, parseAttrs, parseMessages } from '../formats/netlink.ts';
import { AF, isSysError, NETLINK, NETLINK_ADD_MEMBERSHIP, POLLIN, SOCK, SOL_NETLINK, type Sys } from '../sys/sys.ts';
import { ConsoleLog } from './console.ts';
import { NBD_ATTR_INDEX, NBD_NL_CMD, nbdFamilyInfo, nbdKernelReconfigure, socketTransport, tcpConnect, type ConnectedNbd } from './nbd-client.ts';

/** argv[0] of the daemon: main.ts runs runNbdReconnect() under this name. */
export const RECONNECT_ARGV0 = '@vdboot-nbd';
/** The request timeout (s) while the daemon watches: how late a request in flight at the loss is sent again. */
export const WATCHED_REQUEST_TIMEOUT_S = 30;
/** The longest wait between two attempts. */
const MAX_DELAY_MS = 5000;
/** A failure that repeats with the same message is written again after this long. */
const REPEAT_MS = 30_000;

/** One device the daemon watches: what a reconnect must find again. */
export type WatchedNbd = Pick<ConnectedNbd, 'index' | 'url' | 'size' | 'flags' | 'blockSize'>;

/** The delay before attempt `failures + 1` (after `failures` failed ones): 0.5 s, 1 s, 2 s, 4 s, then 5 s. */
export function reconnectDelayMs(failures: number): number {
  return Math.min(MAX_DELAY_MS, 500 * 2 ** Math.max(0, failures - 1));
}

/** An export name in an nbd:// URL: each path segment percent-encoded, so parseNbdUrl gives it back. */
function urlOf(w: { url: NbdUrl }): string {
  return formatNbdUrl(w.url, w.url.export.split('/').map(encodeURIComponent).join('/'));
}

/** A device on the daemon's command line: nbdINDEX,SIZE,FLAGS,BLOCKSIZE,URL (the URL last: it may hold commas). */
export function formatWatchArg(w: WatchedNbd): string {
  return `nbd${w.index},${w.size},${w.flags},${w.blockSize},${urlOf(w)}`;
}

export function parseWatchArg(text: string): WatchedNbd | string {
  const m = /^nbd(\d{1,3}),(\d{1,16}),(\d{1,5}),(\d{3,5}),(nbd:\/\/.*)$/.exec(text);
  if (!m) return `"${text}" is not nbdINDEX,SIZE,FLAGS,BLOCKSIZE,nbd://SERVER[:PORT]/EXPORT`;
  const [index, size, flags, blockSize] = [m[1], m[2], m[3], m[4]].map(Number) as [number, number, number, number];
  if (!Number.isSafeInteger(size) || flags > 0xffff || blockSize < 512 || blockSize > 65536 || (blockSize & (blockSize - 1)) !== 0) return `"${text}": a size, flags or block size out of range`;
  const url = parseNbdUrl(m[5]!);
  if (typeof url === 'string') return url;
  return { index, size, flags, blockSize, url };
}

export interface ReconnectArgs {
  /** DEAD_CONN_TIMEOUT while the daemon watches, in seconds */
  deadTimeoutS: number;
  quiet: boolean;
  watched: WatchedNbd[];
}

/** @vdboot-nbd [--quiet] --dead-timeout=S nbdINDEX,… …: a message for a bad command line. */
export function parseReconnectArgs(args: string[]): ReconnectArgs | string {
  let deadTimeoutS: number | undefined;
  let quiet = false;
  const watched: WatchedNbd[] = [];
  for (const a of args) {
    const t = /^--dead-timeout=(\d{1,5})$/.exec(a);
    if (t) deadTimeoutS = Number(t[1]);
    else if (a === '--quiet') quiet = true;
    else {
      const w = parseWatchArg(a);
      if (typeof w === 'string') return w;
      watched.push(w);
    }
  }
  if (deadTimeoutS === undefined || deadTimeoutS < 1) return 'no --dead-timeout=SECONDS (1 or more)';
  if (!watched.length) return 'no device to watch (nbdINDEX,SIZE,FLAGS,BLOCKSIZE,URL)';
  return { deadTimeoutS, quiet, watched };
}

/** The /dev/nbdN indexes NBD_CMD_LINK_DEAD names in one datagram of the nbd family's multicast group. */
export function linkDeadIndexes(datagram: Uint8Array, family: number): number[] {
  const out: number[] = [];
  for (const m of parseMessages(datagram)) {
    if (m.type !== family || m.payload.length < 4 || m.payload[0] !== NBD_NL_CMD.LINK_DEAD) continue;
    const index = attrU32(parseAttrs(m.payload.subarray(4)).get(NBD_ATTR_INDEX));
    if (index !== undefined) out.push(index);
  }
  return out;
}

/** What the kernel sends that a server must still accept (transmission flags). */
const KERNEL_USES = [
  [NBD_FLAG.SEND_FLUSH, 'flush'],
  [NBD_FLAG.SEND_FUA, 'forced unit access'],
  [NBD_FLAG.SEND_TRIM, 'trim'],
  [64, 'write zeroes'],
] as const;

/**
 * Why the export a reconnect found is not the one /dev/nbdN was made from, or undefined
 * when it is. The device keeps its size, flags and block size (RECONFIGURE changes none of
 * them), and the data above it (device-mapper, a filesystem) was read from the old export:
 * another size means another image, and is refused.
 */
export function exportMismatch(w: WatchedNbd, exp: NbdExport): string | undefined {
  const dev = `/dev/nbd${w.index}`;
  if (exp.size !== w.size) {
    return `the export is now ${exp.size} bytes; it was ${w.size} bytes when ${dev} was connected, so the server serves another image under that name. vdboot does not reconnect to it (the system above ${dev} was read from the other one): serve the original image again`;
  }
  if (exp.readOnly && (w.flags & NBD_FLAG.READ_ONLY) === 0) return `the server now exports it read-only; ${dev} was connected writable. Restart the server without --readonly/-r`;
  const lost = KERNEL_USES.filter(([bit]) => (w.flags & bit) !== 0 && (exp.flags & bit) === 0).map(([, name]) => name);
  if (lost.length) return `the server no longer accepts ${lost.join(', ')} requests, which ${dev} sends. Restart the server with the options it had`;
  const min = exp.blockSize?.minimum ?? 1;
  if (min > w.blockSize) return `the server now needs blocks of at least ${min} bytes; ${dev} uses ${w.blockSize}`;
  return undefined;
}

/** One reconnect attempt's failure: its message, and whether the server answered but refused (another export). */
export interface AttemptFailure {
  error: string;
  refused?: boolean;
}

export interface ReconnectIo {
  /** monotonic milliseconds */
  now(): number;
  /** One attempt: undefined once the kernel took a new connection for the device. */
  attempt(w: WatchedNbd): AttemptFailure | undefined;
  log: { info(m: string): void; warn(m: string): void; error(m: string): void };
}

interface Outage {
  since: number;
  failures: number;
  nextAt: number;
  shown?: string;
  shownAt: number;
}

/**
 * The daemon's state, apart from its sockets: the devices watched, the ones whose server
 * is lost, when each is tried next. `linkDead` starts an outage, `runDue` makes the
 * attempts that are due; a device whose outage outlasted the dead-connection timeout is
 * given up and no longer watched.
 */
export class ReconnectWatch {
  private readonly watched = new Map<number, WatchedNbd>();
  private readonly outages = new Map<number, Outage>();

  constructor(devices: WatchedNbd[], readonly deadTimeoutMs: number, private readonly io: ReconnectIo) {
    for (const d of devices) this.watched.set(d.index, d);
  }

  /** how many devices are still watched */
  get watching(): number {
    return this.watched.size;
  }

  /** devices whose server is lost now */
  get lost(): number[] {
    return [...this.outages.keys()];
  }

  /** The kernel announced NBD_CMD_LINK_DEAD for /dev/nbd<index>; another device's or a repeated one is ignored. */
  linkDead(index: number): void {
    const w = this.watched.get(index);
    if (!w || this.outages.has(index)) return;
    const now = this.io.now();
    this.outages.set(index, { since: now, failures: 0, nextAt: now, shownAt: now });
    this.io.log.warn(`nbd: lost the connection to ${urlOf(w)} (/dev/nbd${index}); reconnecting. I/O on /dev/nbd${index} waits until the server is back (at most ${this.deadTimeoutMs / 1000} s)`);
  }

  /** Milliseconds until the next attempt is due (0: now); undefined when no server is lost. */
  nextDueIn(): number | undefined {
    let next: number | undefined;
    for (const o of this.outages.values()) next = next === undefined ? o.nextAt : Math.min(next, o.nextAt);
    return next === undefined ? undefined : Math.max(0, next - this.io.now());
  }

  /** Makes the attempts that are due. */
  runDue(): void {
    for (const [index, o] of [...this.outages]) {
      if (o.nextAt > this.io.now()) continue;
      const w = this.watched.get(index)!;
      const dev = `/dev/nbd${index}`;
      const failure = this.io.attempt(w);
      const after = this.io.now();
      const took = `${((after - o.since) / 1000).toFixed(1)} s`;
      if (!failure) {
        this.outages.delete(index);
        this.io.log.info(`nbd: reconnected ${dev} to ${urlOf(w)} after ${took} (${o.failures + 1} attempt${o.failures ? 's' : ''}); its I/O goes on`);
        continue;
      }
      o.failures++;
      const deadline = o.since + this.deadTimeoutMs;
      if (after >= deadline) {
        this.outages.delete(index);
        this.watched.delete(index);
        this.io.log.error(`nbd: gave up reconnecting ${dev} to ${urlOf(w)} after ${took} and ${o.failures} attempts (last: ${failure.error}). ` +
          `The kernel's dead-connection timeout (${this.deadTimeoutMs / 1000} s, rd.vdisk.nbd.timeout=) is over: I/O on ${dev} fails from now on. ` +
          'Bring the server back and restart this machine; a longer rd.vdisk.nbd.timeout= waits longer.');
        continue;
      }
      if (failure.error !== o.shown || after - o.shownAt >= REPEAT_MS) {
        const line = `nbd: ${dev}: ${failure.error} (attempt ${o.failures}; retrying for ${Math.ceil((deadline - after) / 1000)} s more)`;
        if (failure.refused) this.io.log.error(line);
        else this.io.log.warn(line);
        o.shown = failure.error;
        o.shownAt = after;
      }
      // the last attempt falls on the deadline itself
      o.nextAt = Math.min(after + reconnectDelayMs(o.failures), deadline);
    }
  }
}

/**
 * One attempt for real: a TCP connection to the same server, the handshake for the same
 * export, the export checked against the device, and the socket handed to the kernel
 * (NBD_CMD_RECONFIGURE), which keeps its own reference; ours is closed either way.
 */
export function attemptReconnect(sys: Sys, w: WatchedNbd): AttemptFailure | undefined {
  let fd: number;
  try {
    fd = tcpConnect(sys, w.url);
  } catch (e) {
    return { error: (e as Error).message };
  }
  try {
    const where = urlOf(w);
    const t = socketTransport(sys, fd, where);
    const exp = nbdHandshake(t, w.url.export, where);
    const mismatch = exportMismatch(w, exp);
    if (mismatch) {
      new NbdReader(t, exp, where).disconnect();
      return { error: `${where}: ${mismatch}`, refused: true };
    }
    nbdKernelReconfigure(sys, { index: w.index, socket: fd });
    return undefined;
  } catch (e) {
    return { error: (e as Error).message, ...(e instanceof NbdRefusal ? { refused: true } : {}) };
  } finally {
    try { sys.close(fd); } catch { /* closed */ }
  }
}

/** The command line that starts the daemon for `devices` (the same binary as /init). */
export function reconnectArgv(devices: WatchedNbd[], deadTimeoutS: number, quiet: boolean): string[] {
  return [RECONNECT_ARGV0, `--dead-timeout=${deadTimeoutS}`, ...(quiet ? ['--quiet'] : []), ...devices.map(formatWatchArg)];
}

/** A u32 in host (little-endian) order, as setsockopt takes the group id. */
function u32le(n: number): Uint8Array {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setUint32(0, n, true);
  return b;
}

/** The daemon: watches until no device is left to watch. Returns the exit code. */
export function runNbdReconnect(sys: Sys, args: string[]): number {
  const log = new ConsoleLog(sys);
  const parsed = parseReconnectArgs(args);
  if (typeof parsed === 'string') {
    log.error(`${RECONNECT_ARGV0}: ${parsed}. This program is started by vdboot's init for network images.`);
    return 2;
  }
  const devices = parsed.watched.map((w) => `/dev/nbd${w.index}`).join(', ');
  let fd: number;
  let family: number;
  try {
    fd = sys.socket(AF.NETLINK, SOCK.RAW, NETLINK.GENERIC);
    // asked on the socket that joins: the question binds it (see nbdFamilyInfo)
    const info = nbdFamilyInfo(sys, fd);
    if (info.linkDeadGroup === undefined) throw new FormatError('the kernel\'s nbd netlink family has no multicast group "nbd_mc_group"', 'netlink', 'nbd_mc_group');
    family = info.id;
    sys.setsockopt(fd, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, u32le(info.linkDeadGroup));
  } catch (e) {
    log.error(`nbd: cannot watch ${devices} for a lost server (${(e as Error).message}): if the server goes away, their I/O waits 120 s, then fails.`);
    return 1;
  }
  for (const w of parsed.watched) {
    try {
      nbdKernelReconfigure(sys, { index: w.index, timeout: WATCHED_REQUEST_TIMEOUT_S, deadConnTimeout: parsed.deadTimeoutS });
    } catch (e) {
      log.warn(`nbd: could not set /dev/nbd${w.index}'s timeouts (${(e as Error).message}): I/O waits 120 s for a lost server, not ${parsed.deadTimeoutS} s`);
    }
  }
  if (!parsed.quiet) log.info(`nbd: watching ${devices}: if the server goes away, I/O waits up to ${parsed.deadTimeoutS} s while vdboot reconnects`);
  const watch = new ReconnectWatch(parsed.watched, parsed.deadTimeoutS * 1000, {
    now: () => sys.monotonicMs(),
    attempt: (w) => attemptReconnect(sys, w),
    log,
  });
  const buf = new Uint8Array(65536);
  while (watch.watching > 0) {
    const wait = watch.nextDueIn();
    const [ready] = sys.poll([{ fd, events: POLLIN }], wait === undefined ? -1 : Math.ceil(wait));
    // POLLIN, or an error the read reports (and clears)
    if (ready) {
      try {
        const n = sys.read(fd, buf);
        for (const index of linkDeadIndexes(buf.subarray(0, n), family)) watch.linkDead(index);
      } catch (e) {
        // ENOBUFS: announcements were dropped (a burst the socket could not hold)
        log.warn(`nbd: reading the kernel's announcements failed (${isSysError(e) ? e.code : (e as Error).message}); watching on`);
      }
    }
    watch.runDue();
  }
  return 1;
}
