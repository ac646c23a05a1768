/**
 * device-mapper through its ioctls on /dev/mapper/control, packed here (no dmsetup):
 * create, load a table, resume, remove. Layouts follow linux/dm-ioctl.h (interface 4);
 * test/boot/dm.test.ts checks every offset and request number against the C header.
 */
import { utf8Encode } from '../formats/text.ts';
import { isSysError, O, S, type Sys } from '../sys/sys.ts';

/** sizeof(struct dm_ioctl) */
export const DM_IOCTL_SIZE = 312;
/** sizeof(struct dm_target_spec) */
export const DM_TARGET_SPEC_SIZE = 40;
export const DM_NAME_LEN = 128;
export const DM_UUID_LEN = 129;
const DM_MAX_TYPE_NAME = 16;

export const DM_CMD = {
  VERSION: 0, REMOVE_ALL: 1, LIST_DEVICES: 2, DEV_CREATE: 3, DEV_REMOVE: 4, DEV_RENAME: 5, DEV_SUSPEND: 6,
  DEV_STATUS: 7, DEV_WAIT: 8, TABLE_LOAD: 9, TABLE_CLEAR: 10, TABLE_DEPS: 11, TABLE_STATUS: 12,
} as const;

/**
 * udev flags carried in DM_COOKIE (libdevmapper's libdm-common.h): PRIMARY_SOURCE says the
 * change event comes from a proper activation, so the dm udev rules run their disk rules
 * (blkid, /dev/disk/by-uuid and by-label links) instead of disabling them.
 */
export const DM_UDEV = { DISABLE_LIBRARY_FALLBACK: 0x0020, PRIMARY_SOURCE: 0x0040 } as const;

export const DM_FLAG = {
  READONLY: 1 << 0,
  SUSPEND: 1 << 1,
  PERSISTENT_DEV: 1 << 3,
  STATUS_TABLE: 1 << 4,
  BUFFER_FULL: 1 << 8,
  DEFERRED_REMOVE: 1 << 17,
} as const;

/** _IOWR(0xfd, nr, struct dm_ioctl) */
export function dmRequest(nr: number): number {
  return ((3 << 30) | (DM_IOCTL_SIZE << 16) | (0xfd << 8) | nr) >>> 0;
}

export interface DmTarget {
  /** 512-byte sectors */
  start: number;
  length: number;
  /** "linear", "zero", "snapshot", … */
  type: string;
  /** e.g. "/dev/sda1 2048" or "254:1 2048" */
  params: string;
}

export interface DmIoctlFields {
  name?: string;
  uuid?: string;
  flags?: number;
  dev?: { major: number; minor: number };
  eventNr?: number;
}

/** Packs struct dm_ioctl followed by `targets` (each dm_target_spec + params, 8-aligned). */
export function packDmIoctl(fields: DmIoctlFields, targets: DmTarget[] = [], extra = 0): ArrayBuffer {
  const specs = targets.map((t) => {
    if (t.type.length >= DM_MAX_TYPE_NAME) throw new Error(`device-mapper target type "${t.type}" is too long`);
    const params = utf8Encode(t.params);
    const size = align8(DM_TARGET_SPEC_SIZE + params.length + 1);
    return { t, params, size };
  });
  const dataSize = DM_IOCTL_SIZE + specs.reduce((a, s) => a + s.size, 0) + extra;
  const buf = new ArrayBuffer(dataSize);
  const v = new DataView(buf);
  const bytes = new Uint8Array(buf);
  v.setUint32(0, 4, true); // version 4.0.0: the oldest interface the kernel must speak
  v.setUint32(4, 0, true);
  v.setUint32(8, 0, true);
  v.setUint32(12, dataSize, true);
  v.setUint32(16, DM_IOCTL_SIZE, true);
  v.setUint32(20, targets.length, true);
  v.setUint32(28, fields.flags ?? 0, true);
  v.setUint32(32, fields.eventNr ?? 0, true);
  if (fields.dev) v.setBigUint64(40, BigInt(encodeDev(fields.dev.major, fields.dev.minor)), true);
  putString(bytes, 48, DM_NAME_LEN, fields.name ?? '', 'device-mapper name');
  putString(bytes, 176, DM_UUID_LEN, fields.uuid ?? '', 'device-mapper uuid');
  let off = DM_IOCTL_SIZE;
  for (const { t, params, size } of specs) {
    if (!Number.isSafeInteger(t.start) || !Number.isSafeInteger(t.length) || t.start < 0 || t.length <= 0) {
      throw new Error(`device-mapper target at sector ${t.start} has a bad length ${t.length}`);
    }
    v.setBigUint64(off, BigInt(t.start), true);
    v.setBigUint64(off + 8, BigInt(t.length), true);
    v.setUint32(off + 20, size, true); // next: offset of the following spec from this one
    putString(bytes, off + 24, DM_MAX_TYPE_NAME, t.type, 'target type');
    bytes.set(params, off + DM_TARGET_SPEC_SIZE);
    off += size;
  }
  return buf;
}

export interface DmIoctlReply {
  version: [number, number, number];
  dataSize: number;
  dataStart: number;
  targetCount: number;
  openCount: number;
  flags: number;
  eventNr: number;
  dev: { major: number; minor: number };
  name: string;
  uuid: string;
}

export function unpackDmIoctl(buf: ArrayBuffer): DmIoctlReply {
  const v = new DataView(buf);
  const bytes = new Uint8Array(buf);
  const dev = Number(v.getBigUint64(40, true));
  return {
    version: [v.getUint32(0, true), v.getUint32(4, true), v.getUint32(8, true)],
    dataSize: v.getUint32(12, true),
    dataStart: v.getUint32(16, true),
    targetCount: v.getUint32(20, true),
    openCount: v.getInt32(24, true),
    flags: v.getUint32(28, true),
    eventNr: v.getUint32(32, true),
    dev: decodeDev(dev),
    name: getString(bytes, 48, DM_NAME_LEN),
    uuid: getString(bytes, 176, DM_UUID_LEN),
  };
}

/** A target of a live table, as DM_TABLE_STATUS returns it. */
export interface DmLiveTarget {
  /** in 512-byte sectors */
  start: number;
  length: number;
  type: string;
  params: string;
}

/**
 * The targets of a DM_TABLE_STATUS reply: dm_target_spec records from data_start, each
 * followed by its parameters; `next` is the offset of the following record from data_start.
 */
export function unpackDmTable(buf: ArrayBuffer, reply: DmIoctlReply): DmLiveTarget[] {
  const v = new DataView(buf);
  const bytes = new Uint8Array(buf);
  const end = Math.min(reply.dataSize, buf.byteLength);
  const out: DmLiveTarget[] = [];
  let rel = 0;
  for (let i = 0; i < reply.targetCount; i++) {
    const at = reply.dataStart + rel;
    if (at + DM_TARGET_SPEC_SIZE > end) throw new Error(`device-mapper: table status of ${reply.name}: target ${i} lies past the reply (${at} of ${end} bytes)`);
    const next = v.getUint32(at + 20, true);
    out.push({
      start: Number(v.getBigUint64(at, true)),
      length: Number(v.getBigUint64(at + 8, true)),
      type: getString(bytes, at + 24, DM_MAX_TYPE_NAME),
      params: getString(bytes, at + DM_TARGET_SPEC_SIZE, end - at - DM_TARGET_SPEC_SIZE),
    });
    if (i < reply.targetCount - 1 && next <= rel) throw new Error(`device-mapper: table status of ${reply.name}: target ${i}'s next offset ${next} does not move forward`);
    rel = next;
  }
  return out;
}

/** The kernel's huge_encode_dev / new_encode_dev: minor's low byte, major, minor's high bits. */
export function encodeDev(major: number, minor: number): number {
  return (minor & 0xff) + major * 256 + (minor & ~0xff) * 4096;
}

export function decodeDev(dev: number): { major: number; minor: number } {
  const major = Math.floor(dev / 256) & 0xfff;
  const minor = (dev & 0xff) | (Math.floor(dev / 4096) & ~0xff);
  return { major, minor };
}

function align8(n: number): number {
  return (n + 7) & ~7;
}

function putString(bytes: Uint8Array, off: number, max: number, s: string, what: string): void {
  const b = utf8Encode(s);
  if (b.length >= max) throw new Error(`${what} "${s}" is longer than ${max - 1} bytes`);
  bytes.set(b, off);
}

function getString(bytes: Uint8Array, off: number, max: number): string {
  let end = off;
  while (end < off + max && bytes[end] !== 0) end++;
  let s = '';
  for (let i = off; i < end; i++) s += String.fromCharCode(bytes[i]!);
  return s;
}

export const DM_CONTROL = '/dev/mapper/control';

/** device-mapper's control node, opened once; creates the node when devtmpfs has not. */
export class DeviceMapper {
  private fd = -1;

  constructor(private readonly sys: Sys) {}

  private control(): number {
    if (this.fd >= 0) return this.fd;
    try {
      this.fd = this.sys.open(DM_CONTROL, O.RDWR | O.CLOEXEC);
    } catch (e) {
      if (!isSysError(e, 'ENOENT')) throw e;
      // misc device 10:236 is device-mapper's control node.
      try { this.sys.mkdir('/dev/mapper', 0o755); } catch { /* exists */ }
      this.sys.mknod(DM_CONTROL, S.IFCHR | 0o600, 10, 236);
      this.fd = this.sys.open(DM_CONTROL, O.RDWR | O.CLOEXEC);
    }
    return this.fd;
  }

  private call(cmd: number, fields: DmIoctlFields, targets: DmTarget[] = [], extra = 0): DmIoctlReply {
    const buf = packDmIoctl(fields, targets, extra);
    this.sys.ioctl(this.control(), dmRequest(cmd), buf);
    return unpackDmIoctl(buf);
  }

  version(): [number, number, number] {
    return this.call(DM_CMD.VERSION, {}).version;
  }

  /**
   * Creates `name`, loads `targets` and resumes it: the device is live when this returns.
   * A failure after creation removes the half-made device again, so nothing is left
   * pointing at the disk.
   */
  create(name: string, uuid: string, targets: DmTarget[], readOnly: boolean, opts: { udevFlags?: number; makeNode?: boolean } = {}): { major: number; minor: number; path: string } {
    const created = this.call(DM_CMD.DEV_CREATE, { name, uuid });
    try {
      this.call(DM_CMD.TABLE_LOAD, { name, flags: readOnly ? DM_FLAG.READONLY : 0 }, targets);
      // The resume's event_nr reaches udev as DM_COOKIE: its upper 16 bits are the udev
      // flags (libdevmapper's cookie, with no semaphore in the lower bits).
      this.call(DM_CMD.DEV_SUSPEND, { name, flags: 0, eventNr: ((opts.udevFlags ?? 0) << 16) >>> 0 });
    } catch (e) {
      try { this.remove(name); } catch { /* reported by the caller's error */ }
      throw e;
    }
    const path = `/dev/mapper/${name}`;
    if (opts.makeNode === false) return { ...created.dev, path };
    try {
      this.sys.mknod(path, S.IFBLK | 0o600, created.dev.major, created.dev.minor);
    } catch (e) {
      if (!isSysError(e, 'EEXIST')) throw e;
    }
    return { ...created.dev, path };
  }

  /**
   * The live table of `name` as the kernel holds it (DM_TABLE_STATUS with the table flag):
   * one entry per target, in sectors. The buffer grows while the kernel says it is full.
   */
  table(name: string): DmLiveTarget[] {
    for (let extra = 16 * 1024; extra <= 4 * 1024 * 1024; extra *= 4) {
      const buf = packDmIoctl({ name, flags: DM_FLAG.STATUS_TABLE }, [], extra);
      this.sys.ioctl(this.control(), dmRequest(DM_CMD.TABLE_STATUS), buf);
      const reply = unpackDmIoctl(buf);
      if (reply.flags & DM_FLAG.BUFFER_FULL) continue;
      return unpackDmTable(buf, reply);
    }
    throw new Error(`device-mapper: the table of ${name} does not fit 4 MiB`);
  }

  remove(name: string): void {
    this.call(DM_CMD.DEV_REMOVE, { name });
    try { this.sys.unlink(`/dev/mapper/${name}`); } catch { /* the node was never made */ }
  }

  close(): void {
    if (this.fd >= 0) this.sys.close(this.fd);
    this.fd = -1;
  }
}
