/**
 * A network image's host side at boot (root=vdisk:nbd://SERVER[:PORT]/EXPORT): TCP
 * connections to the NBD server, the handshake and table reads in TypeScript
 * (formats/nbd.ts), and the sockets handed to the kernel's nbd driver through its
 * generic netlink family (linux/nbd-netlink.h). Each file of the image set is an export
 * of its own (a parent named "base.vhdx" beside "disk.vhdx" is the export "base.vhdx"),
 * and each used file becomes one /dev/nbdN that device-mapper maps, as it maps a file's
 * extents on an NTFS partition.
 *
 * Order of events, and what a failure undoes: exports are opened (connected, handshaken)
 * while the image is planned, reading only; nbd devices are chosen then but connected to
 * the kernel only once the whole plan stands (connectKernel); a socket the kernel took
 * belongs to it, every other one is closed with NBD_CMD_DISC by close().
 */
import { FormatError, type BlockReader } from '../formats/block-reader.ts';
import { formatNbdUrl, nbdHandshake, nbdList, NbdReader, NBD_FLAG, type NbdExport, type NbdTransport, type NbdUrl } from '../formats/nbd.ts';
import { attrString, attrU16, CTRL_ATTR, CTRL_CMD_GETFAMILY, errorOf, GENL_ID_CTRL, mcastGroupId, packGenl, parseAttrs, parseMessages, type NlAttr } from '../formats/netlink.ts';
import { AF, NETLINK, POLLIN, SOCK, isSysError, type Sys } from '../sys/sys.ts';
import type { ImageHost } from './image-host.ts';
import { readTextOr } from './fsutil.ts';
import { parseIpv4 } from './net-cmdline.ts';

/** linux/nbd-netlink.h */
const NBD_GENL_NAME = 'nbd';
const NBD_GENL_VERSION = 1;
export const NBD_NL_CMD = { CONNECT: 1, DISCONNECT: 2, RECONFIGURE: 3, LINK_DEAD: 4 } as const;
export const NBD_ATTR_INDEX = 1;
/** The multicast group on which the kernel announces NBD_CMD_LINK_DEAD. */
const NBD_MCAST_GROUP = 'nbd_mc_group';
const NBD_ATTR = { INDEX: NBD_ATTR_INDEX, SIZE_BYTES: 2, BLOCK_SIZE_BYTES: 3, TIMEOUT: 4, SERVER_FLAGS: 5, CLIENT_FLAGS: 6, SOCKETS: 7, DEAD_CONN_TIMEOUT: 8 } as const;
const NBD_SOCK_ITEM = 1;
const NBD_SOCK_FD = 1;

/** How long connecting and each handshake or table read may take before the boot says so. */
const NET_TIMEOUT_MS = 15_000;

/** a.b.c.d → its four bytes, or undefined */
function sockaddrIn(addr: Uint8Array, port: number): Uint8Array {
  const out = new Uint8Array(16);
  const v = new DataView(out.buffer);
  v.setUint16(0, AF.INET, true);
  v.setUint16(2, port, false);
  out.set(addr, 4);
  return out;
}

/** A blocking TCP connection to SERVER:PORT (an IPv4 address). */
export function tcpConnect(sys: Sys, url: NbdUrl): number {
  const addr = parseIpv4(url.server);
  if (!addr) {
    throw new FormatError(`${formatNbdUrl(url)}: the server "${url.server}" is not an IPv4 address; vdboot does not look names up at boot. Write the server's address, e.g. nbd://192.168.1.10/${url.export}`, 'server', url.server);
  }
  const fd = sys.socket(AF.INET, SOCK.STREAM, 0);
  try {
    sys.connect(fd, sockaddrIn(addr, url.port), NET_TIMEOUT_MS);
  } catch (e) {
    sys.close(fd);
    const code = isSysError(e) ? e.code : (e as Error).message;
    const hint = code === 'ECONNREFUSED' ? 'nothing listens there: is the NBD server running, on that port?'
      : code === 'ETIMEDOUT' ? `no answer within ${NET_TIMEOUT_MS / 1000} s: is the address right, and does a firewall let port ${url.port} through?`
        : code === 'ENETUNREACH' || code === 'EHOSTUNREACH' ? 'no route to it: check ip= (address, netmask, gateway)'
          : 'check the network settings (ip=) and the server';
    throw new FormatError(`Could not connect to the NBD server ${url.server}:${url.port} (${code}): ${hint}`, 'server', url.server);
  }
  return fd;
}

/** Reads and writes on a socket, each read waiting at most NET_TIMEOUT_MS. */
export function socketTransport(sys: Sys, fd: number, where: string): NbdTransport {
  return {
    write(bytes) {
      for (let done = 0; done < bytes.length;) done += sys.write(fd, done ? bytes.subarray(done) : bytes);
    },
    read(length) {
      const out = new Uint8Array(length);
      for (let done = 0; done < length;) {
        const [ready] = sys.poll([{ fd, events: POLLIN }], NET_TIMEOUT_MS);
        if (!ready) throw new FormatError(`${where}: the server sent nothing for ${NET_TIMEOUT_MS / 1000} s (${done} of ${length} bytes arrived)`, 'timeout', NET_TIMEOUT_MS);
        const n = sys.read(fd, out.subarray(done));
        if (n === 0) throw new FormatError(`${where}: the server closed the connection (${done} of ${length} bytes arrived)`, 'closed', done);
        done += n;
      }
      return out;
    },
  };
}

/** One request to a generic netlink family and its reply's attributes (the acknowledgement's, if none). */
function genlRequest(sys: Sys, family: number, cmd: number, version: number, attrs: NlAttr[], what: string): Map<number, Uint8Array> {
  const fd = sys.socket(AF.NETLINK, SOCK.RAW, NETLINK.GENERIC);
  try {
    return genlExchange(sys, fd, family, cmd, version, attrs, what);
  } finally {
    sys.close(fd);
  }
}

/** genlRequest on a socket of the caller's (sending binds it to a port of its own). */
function genlExchange(sys: Sys, fd: number, family: number, cmd: number, version: number, attrs: NlAttr[], what: string): Map<number, Uint8Array> {
  const seq = 1;
  sys.write(fd, packGenl(family, cmd, version, seq, attrs));
  let result = new Map<number, Uint8Array>();
  for (;;) {
    const [ready] = sys.poll([{ fd, events: POLLIN }], NET_TIMEOUT_MS);
    if (!ready) throw new FormatError(`${what}: the kernel did not answer`, 'netlink', what);
    const buf = new Uint8Array(65536);
    const n = sys.read(fd, buf);
    for (const m of parseMessages(buf.subarray(0, n))) {
      const err = errorOf(m);
      if (err !== undefined) {
        if (err !== 0) throw new NetlinkError(what, err);
        return result;
      }
      if (m.type === family && m.payload.length >= 4) result = parseAttrs(m.payload.subarray(4));
    }
  }
}

const ERRNO_NAMES: Record<number, string> = { 1: 'EPERM', 2: 'ENOENT', 12: 'ENOMEM', 16: 'EBUSY', 22: 'EINVAL', 95: 'EOPNOTSUPP', 19: 'ENODEV', 9: 'EBADF', 88: 'ENOTSOCK', 17: 'EEXIST' };

export class NetlinkError extends Error {
  constructor(readonly what: string, readonly errno: number) {
    super(`${what}: the kernel answered ${ERRNO_NAMES[errno] ?? `errno ${errno}`}`);
    this.name = 'NetlinkError';
  }
}

let nbdFamily: { id: number; linkDeadGroup: number | undefined } | undefined;

/** The nbd generic netlink family's id (the nbd module must be loaded). */
function nbdFamilyId(sys: Sys): number {
  return nbdFamilyInfo(sys).id;
}

/**
 * The nbd family's id and the multicast group of its NBD_CMD_LINK_DEAD announcements,
 * asked on `fd` when given: the reconnect daemon asks on the socket that then joins the
 * group, because sending binds a netlink socket to a port of its own, and the kernel's
 * announcements (sent from port 0) skip a socket still at port 0.
 */
export function nbdFamilyInfo(sys: Sys, fd?: number): { id: number; linkDeadGroup: number | undefined } {
  if (nbdFamily !== undefined && fd === undefined) return nbdFamily;
  let reply: Map<number, Uint8Array>;
  try {
    const ask = [{ type: CTRL_ATTR.FAMILY_NAME, str: NBD_GENL_NAME }];
    const what = 'looking up the nbd netlink family';
    reply = fd === undefined ? genlRequest(sys, GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, ask, what) : genlExchange(sys, fd, GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, ask, what);
  } catch (e) {
    if (e instanceof NetlinkError && e.errno === 2) throw new FormatError('The kernel has no nbd driver loaded (no "nbd" netlink family): is the nbd module in the initramfs? Rebuild it with "vdboot mkinitramfs" (it includes nbd).', 'module', 'nbd');
    throw e;
  }
  const id = attrU16(reply.get(CTRL_ATTR.FAMILY_ID));
  if (id === undefined || attrString(reply.get(CTRL_ATTR.FAMILY_NAME)) !== NBD_GENL_NAME) throw new FormatError('The kernel answered the nbd family look-up without its id', 'netlink', 'nbd');
  nbdFamily = { id, linkDeadGroup: mcastGroupId(reply, NBD_MCAST_GROUP) };
  return nbdFamily;
}

export interface KernelNbd {
  index: number;
  socket: number;
  size: number;
  blockSize: number;
  flags: number;
}

/**
 * NBD_CMD_CONNECT: /dev/nbd<index> reads and writes through `socket` (in the transmission
 * phase, nothing in flight), from now on the kernel's. A server that goes away leaves I/O
 * waiting up to the dead-connection timeout for a reconnect.
 */
export function nbdKernelConnect(sys: Sys, k: KernelNbd): void {
  const family = nbdFamilyId(sys);
  genlRequest(sys, family, NBD_NL_CMD.CONNECT, NBD_GENL_VERSION, [
    { type: NBD_ATTR.INDEX, u32: k.index },
    { type: NBD_ATTR.SIZE_BYTES, u64: k.size },
    { type: NBD_ATTR.BLOCK_SIZE_BYTES, u64: k.blockSize },
    { type: NBD_ATTR.SERVER_FLAGS, u64: k.flags },
    { type: NBD_ATTR.TIMEOUT, u64: 120 },
    { type: NBD_ATTR.DEAD_CONN_TIMEOUT, u64: 120 },
    { type: NBD_ATTR.SOCKETS, nested: [{ type: NBD_SOCK_ITEM, nested: [{ type: NBD_SOCK_FD, u32: k.socket }] }] },
  ], `connecting /dev/nbd${k.index}`);
}

/**
 * NBD_CMD_RECONFIGURE: new timeouts (seconds) for a connected /dev/nbd<index>, and/or a
 * new socket (handshaken, in the transmission phase) that replaces its dead connection.
 * The kernel takes the socket only while the old connection is marked dead; otherwise it
 * drops it and still answers success (nbd.c turns ENOSPC into 0), which is why the
 * reconnect daemon hands a socket over only after the kernel announced NBD_CMD_LINK_DEAD.
 */
export function nbdKernelReconfigure(sys: Sys, r: { index: number; socket?: number; timeout?: number; deadConnTimeout?: number }): void {
  const attrs: NlAttr[] = [{ type: NBD_ATTR.INDEX, u32: r.index }];
  if (r.timeout !== undefined) attrs.push({ type: NBD_ATTR.TIMEOUT, u64: r.timeout });
  if (r.deadConnTimeout !== undefined) attrs.push({ type: NBD_ATTR.DEAD_CONN_TIMEOUT, u64: r.deadConnTimeout });
  if (r.socket !== undefined) attrs.push({ type: NBD_ATTR.SOCKETS, nested: [{ type: NBD_SOCK_ITEM, nested: [{ type: NBD_SOCK_FD, u32: r.socket }] }] });
  genlRequest(sys, nbdFamilyId(sys), NBD_NL_CMD.RECONFIGURE, NBD_GENL_VERSION, attrs, `reconfiguring /dev/nbd${r.index}`);
}

/** NBD_CMD_DISCONNECT: the kernel ends the connection (the server sees NBD_CMD_DISC). */
export function nbdKernelDisconnect(sys: Sys, index: number): void {
  genlRequest(sys, nbdFamilyId(sys), NBD_NL_CMD.DISCONNECT, NBD_GENL_VERSION, [{ type: NBD_ATTR.INDEX, u32: index }], `disconnecting /dev/nbd${index}`);
}

/** An export the kernel serves as /dev/nbd<index>: what a reconnect must find again. */
export interface ConnectedNbd {
  device: string;
  index: number;
  url: NbdUrl;
  /** the export's size and transmission flags at the first connection */
  size: number;
  flags: number;
  /** the block size the kernel was given */
  blockSize: number;
}

interface OpenExport {
  fd: number;
  reader: NbdReader;
  exp: NbdExport;
  /** the nbd device chosen for it, once a layout was asked */
  index?: number;
}

/** The image set of one NBD server: each path "/EXPORT" is the export EXPORT. */
export class NbdImageHost {
  private readonly open = new Map<string, OpenExport>();
  private readonly taken = new Set<number>();
  /** the image's path in the plan: "/" + the export name */
  readonly path: string;
  readonly host: ImageHost;
  readonly rootExport: NbdExport;

  constructor(private readonly sys: Sys, readonly url: NbdUrl) {
    this.path = `/${url.export}`;
    const first = this.openExport(this.path);
    this.rootExport = first.exp;
    this.host = {
      description: `the NBD server ${url.server}:${url.port}`,
      device: `${url.server}:${url.port}`,
      chain: { openFile: (p) => this.openExport(p).reader, listDir: (d) => this.listDir(d) },
      layout: (p) => this.layout(p),
      writeBlocker: first.exp.readOnly ? `the server exports ${url.export} read-only (for one client to write it, start the server without --readonly/-r)` : null,
      logicalBlockSize: 512,
      layoutSource: 'the NBD export',
    };
  }

  private openExport(path: string): OpenExport {
    let o = this.open.get(path);
    if (o) return o;
    if (!path.startsWith('/')) throw new FormatError(`${path}: an export is named by a path from the server's root`, 'path', path);
    const name = path.slice(1);
    const where = formatNbdUrl(this.url, name);
    const fd = tcpConnect(this.sys, this.url);
    try {
      const t = socketTransport(this.sys, fd, where);
      const exp = nbdHandshake(t, name, where);
      o = { fd, exp, reader: new NbdReader(t, exp, path) };
    } catch (e) {
      this.sys.close(fd);
      throw e;
    }
    this.open.set(path, o);
    return o;
  }

  /**
   * The exports in folder `dir` (a VDI's parent is found by its UUID among its neighbours):
   * NBD_OPT_LIST on a connection of its own; none when the server will not list.
   */
  private listDir(dir: string): string[] {
    const prefix = dir === '/' ? '' : `${dir.replace(/^\/+|\/+$/g, '')}/`;
    const fd = tcpConnect(this.sys, this.url);
    try {
      const list = nbdList(socketTransport(this.sys, fd, formatNbdUrl(this.url, '')), formatNbdUrl(this.url, '')) ?? [];
      return list.map((e) => e.name).filter((n) => n.startsWith(prefix) && n.length > prefix.length && !n.slice(prefix.length).includes('/')).map((n) => n.slice(prefix.length));
    } finally {
      this.sys.close(fd);
    }
  }

  /** The whole export on /dev/nbdN: one extent, the file's offsets are the device's. */
  private layout(path: string) {
    const o = this.openExport(path);
    if (o.index === undefined) o.index = this.freeIndex();
    return { device: `/dev/nbd${o.index}`, extents: [{ kind: 'data' as const, fileOffset: 0, length: o.exp.size, deviceOffset: 0 }], size: o.exp.size };
  }

  /** A /dev/nbdN no connection holds (sysfs shows a pid for a connected one) and this boot has not chosen. */
  private freeIndex(): number {
    for (let i = 0; i < 256; i++) {
      if (this.taken.has(i)) continue;
      if (readTextOr(this.sys, `/sys/block/nbd${i}/size`) === undefined) break;
      if (readTextOr(this.sys, `/sys/block/nbd${i}/pid`) !== undefined) continue;
      this.taken.add(i);
      return i;
    }
    throw new FormatError('No free /dev/nbdN: the nbd module has no device left (load it with nbds_max= larger), or it is not loaded', 'nbd', 'free');
  }

  /** A reader of an export (for tests and the planner's own reads). */
  reader(path: string): BlockReader {
    return this.openExport(path).reader;
  }

  /**
   * Hands every export a layout was asked for to the kernel, in the order chosen; returns
   * the devices. Exports the plan did not map are closed. A failure part-way disconnects
   * the devices connected so far.
   */
  connectKernel(log: { info(m: string): void }): ConnectedNbd[] {
    const done: ConnectedNbd[] = [];
    try {
      for (const [path, o] of this.open) {
        if (o.index === undefined) continue;
        const min = o.exp.blockSize?.minimum ?? 512;
        const blockSize = Math.min(4096, Math.max(512, min));
        nbdKernelConnect(this.sys, { index: o.index, socket: o.fd, size: o.exp.size, blockSize, flags: o.exp.flags | NBD_FLAG.HAS_FLAGS });
        done.push({ device: `/dev/nbd${o.index}`, index: o.index, url: { ...this.url, export: path.slice(1) }, size: o.exp.size, flags: o.exp.flags, blockSize });
        log.info(`/dev/nbd${o.index}: ${formatNbdUrl(this.url, path.slice(1))} (${o.exp.size} bytes${o.exp.readOnly ? ', read-only' : ''})`);
        // the kernel holds its own reference to the socket
        this.sys.close(o.fd);
        o.fd = -1;
      }
    } catch (e) {
      for (const d of done) {
        try { nbdKernelDisconnect(this.sys, d.index); } catch { /* reported by the caller's failure */ }
      }
      throw e;
    }
    return done;
  }

  /** Closes every connection the kernel did not take (NBD_CMD_DISC first). */
  close(): void {
    for (const o of this.open.values()) {
      if (o.fd < 0) continue;
      o.reader.disconnect();
      try { this.sys.close(o.fd); } catch { /* closed */ }
      o.fd = -1;
    }
  }
}
