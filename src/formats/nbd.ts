/**
 * The NBD protocol's client side (the NBD project's doc/proto.md), engine-neutral: the
 * fixed newstyle handshake, NBD_OPT_GO with the export name and the export and block-size
 * information, NBD_OPT_LIST when the server refuses an export, and NBD_CMD_READ so the
 * image planner reads an image's tables over the network as a BlockReader.
 *
 * The server is untrusted: every length it sends is bounded before anything is read or
 * allocated, every reply is checked for its magic and its cookie, and a read returns
 * exactly the bytes asked for or throws. Only simple replies are used (structured replies
 * are never negotiated), so a read's reply is a fixed header and the data.
 *
 * After the handshake the connection is in the transmission phase with nothing in
 * flight: that is the state in which the kernel's nbd driver may take the socket over.
 */
import { FormatError, type BlockReader } from './block-reader.ts';
import { utf8Decode, utf8Encode } from './text.ts';

/** How the protocol reaches the server: a socket, a pipe to `nbdkit -s`, … (blocking). */
export interface NbdTransport {
  write(bytes: Uint8Array): void;
  /** Exactly `length` bytes; throws when the connection ends first. */
  read(length: number): Uint8Array;
}

const NBDMAGIC = 0x4e42444d41474943n; // "NBDMAGIC"
const IHAVEOPT = 0x49484156454f5054n; // "IHAVEOPT"
const OLDSTYLE = 0x0000420281861253n;
const OPT_REPLY_MAGIC = 0x0003e889045565a9n;
const REQUEST_MAGIC = 0x25609513;
const SIMPLE_REPLY_MAGIC = 0x67446698;

/** Handshake flags (server) and client flags. */
const FLAG_FIXED_NEWSTYLE = 1;
const FLAG_NO_ZEROES = 2;

export const NBD_OPT = { EXPORT_NAME: 1, ABORT: 2, LIST: 3, INFO: 6, GO: 7 } as const;
export const NBD_REP = { ACK: 1, SERVER: 2, INFO: 3 } as const;
export const NBD_INFO = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const;
export const NBD_CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3 } as const;

/** Transmission flags (NBD_FLAG_*): what the export allows. */
export const NBD_FLAG = { HAS_FLAGS: 1, READ_ONLY: 2, SEND_FLUSH: 4, SEND_FUA: 8, ROTATIONAL: 16, SEND_TRIM: 32, CAN_MULTI_CONN: 256 } as const;

const REP_ERRORS: Record<number, string> = {
  1: 'NBD_REP_ERR_UNSUP',
  2: 'NBD_REP_ERR_POLICY',
  3: 'NBD_REP_ERR_INVALID',
  4: 'NBD_REP_ERR_PLATFORM',
  5: 'NBD_REP_ERR_TLS_REQD',
  6: 'NBD_REP_ERR_UNKNOWN',
  7: 'NBD_REP_ERR_SHUTDOWN',
  8: 'NBD_REP_ERR_BLOCK_SIZE_REQD',
  9: 'NBD_REP_ERR_TOO_BIG',
};
const REP_ERR_BIT = 0x80000000;

/** The errno values a server may answer a command with (proto.md "Error values"). */
const CMD_ERRORS: Record<number, string> = { 1: 'EPERM', 5: 'EIO', 12: 'ENOMEM', 22: 'EINVAL', 28: 'ENOSPC', 75: 'EOVERFLOW', 95: 'ENOTSUP', 108: 'ESHUTDOWN' };

/** Option replies longer than this are refused: the spec's strings are at most 4 KiB, an info reply a few bytes. */
const MAX_OPTION_REPLY = 64 * 1024;
/** Export names longer than this are refused before they are sent (proto.md: servers may refuse beyond 4096 bytes). */
export const MAX_EXPORT_NAME = 4096;
/** A single read request asks for at most this much (servers commonly refuse more than 32 MiB). */
const MAX_READ_REQUEST = 4 * 1024 * 1024;

export interface NbdBlockSize {
  minimum: number;
  preferred: number;
  maximum: number;
}

export interface NbdExport {
  /** the export name asked for */
  name: string;
  size: number;
  /** transmission flags (NBD_FLAG_*) */
  flags: number;
  readOnly: boolean;
  /** the server's block size constraints, when it sent them */
  blockSize?: NbdBlockSize;
  description?: string;
}

export interface NbdExportListing {
  name: string;
  description?: string;
}

/**
 * The server refused an option or an export. `code` is the reply's error name
 * (NBD_REP_ERR_UNKNOWN, …); `serverText` what the server said; `exports` the list it
 * offered when asked (undefined when it would not say).
 */
export class NbdRefusal extends FormatError {
  constructor(
    message: string,
    readonly code: string,
    readonly serverText: string,
    readonly exports?: NbdExportListing[],
  ) {
    super(message, 'export', code);
  }
}

function u32(n: number): Uint8Array {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setUint32(0, n);
  return b;
}

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

function view(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}

/** A u64 from the server as a JavaScript number, refused beyond 2^53 (8 PiB). */
function safeU64(v: bigint, what: string, where: string): number {
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new FormatError(`${where}: the server says ${what} is ${v}, more than vdboot can address (8 PiB): the server is broken or not an NBD server`, what, v);
  return Number(v);
}

/** One option reply: its type and data (length already bounded). */
interface OptionReply {
  type: number;
  data: Uint8Array;
}

function sendOption(t: NbdTransport, option: number, data: Uint8Array): void {
  const h = new Uint8Array(16);
  const v = new DataView(h.buffer);
  v.setBigUint64(0, IHAVEOPT);
  v.setUint32(8, option);
  v.setUint32(12, data.length);
  t.write(concat([h, data]));
}

function readOptionReply(t: NbdTransport, option: number, where: string): OptionReply {
  const h = view(t.read(20));
  const magic = h.getBigUint64(0);
  if (magic !== OPT_REPLY_MAGIC) throw new FormatError(`${where}: the server's option reply starts with 0x${magic.toString(16)}, not NBD's reply magic: this is not an NBD server, or it broke the protocol`, 'magic', magic);
  const forOption = h.getUint32(8);
  if (forOption !== option) throw new FormatError(`${where}: the server answered option ${forOption} when vdboot asked option ${option}: it broke the protocol`, 'option', forOption);
  const type = h.getUint32(12);
  const length = h.getUint32(16);
  if (length > MAX_OPTION_REPLY) throw new FormatError(`${where}: the server's option reply is ${length} bytes long, more than vdboot accepts (${MAX_OPTION_REPLY}): it is broken or hostile`, 'length', length);
  return { type, data: length ? t.read(length) : new Uint8Array(0) };
}

function isError(type: number): boolean {
  return (type & REP_ERR_BIT) !== 0;
}

function errorName(type: number): string {
  return REP_ERRORS[type & 0x7fffffff] ?? `error 0x${(type >>> 0).toString(16)}`;
}

/** Reads the server's greeting and sends the client flags: the connection is then in the option phase. */
function greet(t: NbdTransport, where: string): { noZeroes: boolean } {
  const g = view(t.read(16));
  const magic = g.getBigUint64(0);
  if (magic !== NBDMAGIC) throw new FormatError(`${where}: the server did not greet with NBD's magic (it sent 0x${magic.toString(16)}): this is not an NBD server; check the address and port (NBD's is 10809)`, 'magic', magic);
  const second = g.getBigUint64(8);
  if (second === OLDSTYLE) throw new FormatError(`${where}: the server speaks NBD's old-style handshake, which has no export names; start it in newstyle mode (nbdkit and qemu-nbd do by default; nbd-server: use an export section)`, 'magic', second);
  if (second !== IHAVEOPT) throw new FormatError(`${where}: the server's greeting has 0x${second.toString(16)} where NBD's newstyle magic belongs: it is not an NBD server vdboot can talk to`, 'magic', second);
  const flags = view(t.read(2)).getUint16(0);
  if ((flags & FLAG_FIXED_NEWSTYLE) === 0) throw new FormatError(`${where}: the server does not speak the fixed newstyle handshake (flags 0x${flags.toString(16)}); use a current NBD server (nbdkit, qemu-nbd, nbd-server 3.x)`, 'flags', flags);
  const noZeroes = (flags & FLAG_NO_ZEROES) !== 0;
  t.write(u32(FLAG_FIXED_NEWSTYLE | (noZeroes ? FLAG_NO_ZEROES : 0)));
  return { noZeroes };
}

/** The export list after a greeting (NBD_OPT_LIST); undefined when the server will not tell. */
function listExports(t: NbdTransport, where: string): NbdExportListing[] | undefined {
  sendOption(t, NBD_OPT.LIST, new Uint8Array(0));
  const out: NbdExportListing[] = [];
  for (let i = 0; ; i++) {
    const r = readOptionReply(t, NBD_OPT.LIST, where);
    if (r.type === NBD_REP.ACK) return out;
    if (isError(r.type)) return undefined;
    if (r.type !== NBD_REP.SERVER) throw new FormatError(`${where}: the server answered the export list with reply type ${r.type}: it broke the protocol`, 'type', r.type);
    if (r.data.length < 4) throw new FormatError(`${where}: an export list entry of ${r.data.length} bytes is too short`, 'length', r.data.length);
    const len = view(r.data).getUint32(0);
    if (len > r.data.length - 4) throw new FormatError(`${where}: an export list entry names ${len} bytes in ${r.data.length - 4}`, 'length', len);
    const entry: NbdExportListing = { name: utf8Decode(r.data.subarray(4, 4 + len)) };
    if (r.data.length > 4 + len) entry.description = utf8Decode(r.data.subarray(4 + len));
    out.push(entry);
    if (i > 100000) throw new FormatError(`${where}: the server lists more than 100000 exports`, 'count', i);
  }
}

/** Ends the option phase politely (NBD_OPT_ABORT); the reply is not waited for. */
function abort(t: NbdTransport): void {
  try {
    sendOption(t, NBD_OPT.ABORT, new Uint8Array(0));
  } catch { /* the server may have closed already */ }
}

/**
 * The export list of a server: a connection of its own, greeted, asked NBD_OPT_LIST and
 * ended. Undefined when the server refuses to list.
 */
export function nbdList(t: NbdTransport, where: string): NbdExportListing[] | undefined {
  greet(t, where);
  const list = listExports(t, where);
  abort(t);
  return list;
}

function describeList(list: NbdExportListing[] | undefined): string {
  if (list === undefined) return 'The server does not list its exports.';
  if (list.length === 0) return 'The server lists no exports.';
  const shown = list.slice(0, 20).map((e) => `"${e.name}"${e.name === '' ? ' (its default export)' : ''}${e.description ? ` (${e.description})` : ''}`);
  return `The server offers: ${shown.join(', ')}${list.length > 20 ? ` and ${list.length - 20} more` : ''}.`;
}

/** The export fields of an NBD_INFO_EXPORT or NBD_OPT_EXPORT_NAME reply. */
function readExportInfo(b: Uint8Array, where: string): { size: number; flags: number } {
  const v = view(b);
  return { size: safeU64(v.getBigUint64(0), 'the export size', where), flags: v.getUint16(8) };
}

function checkBlockSize(bs: NbdBlockSize, where: string): void {
  const pow2 = (n: number) => n > 0 && (n & (n - 1)) === 0;
  if (!pow2(bs.minimum) || bs.minimum > 65536 || !pow2(bs.preferred) || bs.preferred < bs.minimum || bs.maximum < bs.preferred) {
    throw new FormatError(`${where}: the server's block sizes (minimum ${bs.minimum}, preferred ${bs.preferred}, maximum ${bs.maximum}) break NBD's rules (powers of two, minimum ≤ 64 KiB ≤ …, minimum ≤ preferred ≤ maximum)`, 'blockSize', bs.minimum);
  }
}

/**
 * The fixed newstyle handshake for export `name`: greeting, NBD_OPT_GO asking for the
 * export and block-size information (NBD_OPT_EXPORT_NAME when the server does not know
 * NBD_OPT_GO). A refusal throws NbdRefusal with the server's text and, for an export it
 * does not have, the list it offers. `where` names the server in messages
 * ("nbd://10.0.2.100:10809/disk.vhdx").
 */
export function nbdHandshake(t: NbdTransport, name: string, where: string): NbdExport {
  const nameBytes = utf8Encode(name);
  if (nameBytes.length > MAX_EXPORT_NAME) throw new FormatError(`${where}: the export name is ${nameBytes.length} bytes long; NBD servers accept at most ${MAX_EXPORT_NAME}`, 'name', nameBytes.length);
  const { noZeroes } = greet(t, where);
  const go = new Uint8Array(4 + nameBytes.length + 2 + 2);
  const gv = new DataView(go.buffer);
  gv.setUint32(0, nameBytes.length);
  go.set(nameBytes, 4);
  gv.setUint16(4 + nameBytes.length, 1);
  gv.setUint16(6 + nameBytes.length, NBD_INFO.BLOCK_SIZE);
  sendOption(t, NBD_OPT.GO, go);
  let info: { size: number; flags: number } | undefined;
  let blockSize: NbdBlockSize | undefined;
  let description: string | undefined;
  for (let replies = 0; ; replies++) {
    if (replies > 64) throw new FormatError(`${where}: the server sent more than 64 information replies to NBD_OPT_GO: it broke the protocol`, 'replies', replies);
    const r = readOptionReply(t, NBD_OPT.GO, where);
    if (r.type === NBD_REP.ACK) break;
    if (isError(r.type)) {
      const code = errorName(r.type);
      const text = utf8Decode(r.data).trim();
      if (code === 'NBD_REP_ERR_UNSUP') return exportNameFallback(t, name, nameBytes, noZeroes, where);
      const list = code === 'NBD_REP_ERR_UNKNOWN' || code === 'NBD_REP_ERR_INVALID' || code === 'NBD_REP_ERR_POLICY' ? tryList(t, where) : undefined;
      abort(t);
      const what = code === 'NBD_REP_ERR_UNKNOWN' ? 'has no export' : code === 'NBD_REP_ERR_TLS_REQD' ? 'requires TLS (which vdboot does not speak) for the export' : code === 'NBD_REP_ERR_POLICY' ? 'refuses, by its policy, the export' : 'refused the export';
      throw new NbdRefusal(
        `${where}: the NBD server ${what} "${name}" (${code}${text ? `: ${text}` : ''}). ${describeList(list)} ` +
          `Name an export the server has in root=vdisk:nbd://SERVER[:PORT]/EXPORT, or change the server's command line.`,
        code, text, list,
      );
    }
    if (r.type !== NBD_REP.INFO) throw new FormatError(`${where}: the server answered NBD_OPT_GO with reply type ${r.type}: it broke the protocol`, 'type', r.type);
    if (r.data.length < 2) throw new FormatError(`${where}: an information reply of ${r.data.length} bytes is too short`, 'length', r.data.length);
    const v = view(r.data);
    const kind = v.getUint16(0);
    if (kind === NBD_INFO.EXPORT) {
      if (r.data.length !== 12) throw new FormatError(`${where}: NBD_INFO_EXPORT is ${r.data.length} bytes long, not 12`, 'length', r.data.length);
      info = readExportInfo(r.data.subarray(2), where);
    } else if (kind === NBD_INFO.BLOCK_SIZE) {
      if (r.data.length !== 14) throw new FormatError(`${where}: NBD_INFO_BLOCK_SIZE is ${r.data.length} bytes long, not 14`, 'length', r.data.length);
      blockSize = { minimum: v.getUint32(2), preferred: v.getUint32(6), maximum: v.getUint32(10) };
      checkBlockSize(blockSize, where);
    } else if (kind === NBD_INFO.DESCRIPTION) {
      description = utf8Decode(r.data.subarray(2));
    }
    // other information (NBD_INFO_NAME, newer kinds) is not needed
  }
  if (!info) throw new FormatError(`${where}: the server accepted the export "${name}" without saying its size (no NBD_INFO_EXPORT): it broke the protocol`, 'info', 'export');
  return exportOf(name, info, blockSize, description);
}

function tryList(t: NbdTransport, where: string): NbdExportListing[] | undefined {
  try {
    return listExports(t, where);
  } catch {
    return undefined;
  }
}

/** Old servers: NBD_OPT_EXPORT_NAME, whose reply is the size and flags (and 124 zero bytes unless NO_ZEROES). */
function exportNameFallback(t: NbdTransport, name: string, nameBytes: Uint8Array, noZeroes: boolean, where: string): NbdExport {
  sendOption(t, NBD_OPT.EXPORT_NAME, nameBytes);
  let reply: Uint8Array;
  try {
    reply = t.read(10);
  } catch (e) {
    // A server that does not have the export closes the connection here.
    throw new NbdRefusal(`${where}: the NBD server closed the connection when asked for the export "${name}" (${(e as Error).message}): it has no such export, or refuses it. Name an export the server has in root=vdisk:nbd://SERVER[:PORT]/EXPORT.`, 'closed', '');
  }
  if (!noZeroes) t.read(124);
  return exportOf(name, readExportInfo(reply, where), undefined, undefined);
}

function exportOf(name: string, info: { size: number; flags: number }, blockSize: NbdBlockSize | undefined, description: string | undefined): NbdExport {
  const exp: NbdExport = { name, size: info.size, flags: info.flags, readOnly: (info.flags & NBD_FLAG.READ_ONLY) !== 0 };
  if (blockSize) exp.blockSize = blockSize;
  if (description) exp.description = description;
  return exp;
}

/**
 * NBD_CMD_READ over a connection in the transmission phase, one request at a time (the
 * cookie counts up), as a BlockReader over the export's bytes. A reply with another magic
 * or cookie, or an error, throws; the connection is then unusable and `broken` says why.
 */
export class NbdReader implements BlockReader {
  readonly size: number;
  private cookie = 1n;
  broken: string | undefined;

  constructor(private readonly t: NbdTransport, readonly exp: NbdExport, readonly name: string) {
    this.size = exp.size;
  }

  read(offset: number, length: number): Uint8Array {
    const out = new Uint8Array(length);
    this.readInto(offset, out);
    return out;
  }

  readInto(offset: number, into: Uint8Array): void {
    const length = into.length;
    if (!Number.isSafeInteger(offset) || offset < 0 || offset + length > this.size) {
      throw new FormatError(`${this.name}: read of ${length} bytes at offset ${offset} is past the end of the export (${this.size} bytes): the image is truncated or names data beyond its file`, 'offset', offset);
    }
    if (this.broken) throw new FormatError(`${this.name}: the connection is unusable after an earlier failure (${this.broken})`, 'connection', this.broken);
    const bs = this.exp.blockSize;
    const step = Math.min(MAX_READ_REQUEST, bs ? bs.maximum : MAX_READ_REQUEST);
    const min = bs?.minimum ?? 1;
    for (let done = 0; done < length;) {
      // Requests honour the server's minimum block size: widen to it and copy the part asked for.
      const at = offset + done;
      const start = at - (at % min);
      let end = Math.min(start + step, offset + length);
      if (end % min) end = Math.min(end + (min - (end % min)), this.size);
      const got = this.request(start, end - start);
      const from = at - start;
      const n = Math.min(got.length - from, length - done);
      into.set(got.subarray(from, from + n), done);
      done += n;
    }
  }

  private request(offset: number, length: number): Uint8Array {
    const cookie = this.cookie++;
    const h = new Uint8Array(28);
    const v = new DataView(h.buffer);
    v.setUint32(0, REQUEST_MAGIC);
    v.setUint16(4, 0);
    v.setUint16(6, NBD_CMD.READ);
    v.setBigUint64(8, cookie);
    v.setBigUint64(16, BigInt(offset));
    v.setUint32(24, length);
    try {
      this.t.write(h);
      const r = view(this.t.read(16));
      const magic = r.getUint32(0);
      if (magic !== SIMPLE_REPLY_MAGIC) throw new FormatError(`${this.name}: the server's reply to a read starts with 0x${magic.toString(16)}, not NBD's simple reply magic: it broke the protocol`, 'magic', magic);
      const error = r.getUint32(4);
      const got = r.getBigUint64(8);
      if (got !== cookie) throw new FormatError(`${this.name}: the server answered request ${got} when request ${cookie} was the only one asked: it broke the protocol`, 'cookie', got);
      // After an error reply to a read, no data follows (simple replies).
      if (error) throw new FormatError(`${this.name}: the server could not read ${length} bytes at offset ${offset} (${CMD_ERRORS[error] ?? `error ${error}`}): check the image file on the server and the server's log`, 'error', error);
      return this.t.read(length);
    } catch (e) {
      this.broken = (e as Error).message;
      throw e;
    }
  }

  /** NBD_CMD_DISC: the server closes the connection; nothing comes back. */
  disconnect(): void {
    const h = new Uint8Array(28);
    const v = new DataView(h.buffer);
    v.setUint32(0, REQUEST_MAGIC);
    v.setUint16(6, NBD_CMD.DISC);
    v.setBigUint64(8, this.cookie++);
    try {
      this.t.write(h);
    } catch { /* closed already */ }
  }
}

/** nbd://SERVER[:PORT]/EXPORT, as on the command line. */
export interface NbdUrl {
  server: string;
  port: number;
  export: string;
}

export const NBD_DEFAULT_PORT = 10809;

/**
 * Parses nbd://SERVER[:PORT]/EXPORT (an IPv4 address or a host name; [v6] in brackets).
 * The export is everything after the first "/" after the server, "%XX" decoded; it may be
 * empty (the server's default export). Returns a message for a malformed one.
 */
export function parseNbdUrl(text: string): NbdUrl | string {
  const m = /^nbd:\/\/(\[[0-9A-Fa-f:.]+\]|[^/:\[\]]+)(?::(\d+))?(?:\/(.*))?$/.exec(text);
  if (!m) return `${text} is not nbd://SERVER[:PORT]/EXPORT (e.g. nbd://10.0.2.100/disk.vhdx or nbd://server:10809/images/disk.vhdx)`;
  const port = m[2] === undefined ? NBD_DEFAULT_PORT : Number(m[2]);
  if (!(port >= 1 && port <= 65535)) return `${text}: the port ${m[2]} is not between 1 and 65535`;
  let exportName: string;
  try {
    exportName = decodeURIComponent(m[3] ?? '');
  } catch {
    return `${text}: the export name has a malformed %XX escape`;
  }
  if (utf8Encode(exportName).length > MAX_EXPORT_NAME) return `${text}: the export name is longer than ${MAX_EXPORT_NAME} bytes`;
  return { server: m[1]!.replace(/^\[|\]$/g, ''), port, export: exportName };
}

export function formatNbdUrl(u: NbdUrl, exportName = u.export): string {
  const server = u.server.includes(':') ? `[${u.server}]` : u.server;
  return `nbd://${server}${u.port === NBD_DEFAULT_PORT ? '' : `:${u.port}`}/${exportName}`;
}
