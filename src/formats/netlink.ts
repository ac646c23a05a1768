/**
 * Netlink messages, packed and parsed in TypeScript (linux/netlink.h, linux/genetlink.h):
 * a header, a generic netlink header and attributes (type-length-value, 4-byte aligned,
 * nested for lists). Used for the kernel's nbd family (nbd-netlink.h); the kernel's
 * replies are bounds-checked like any other input.
 */
import { FormatError } from './block-reader.ts';
import { utf8Decode, utf8Encode } from './text.ts';

export const NLM_F = { REQUEST: 1, MULTI: 2, ACK: 4 } as const;
export const NLMSG = { NOOP: 1, ERROR: 2, DONE: 3 } as const;
/** The generic netlink controller (resolves family names to ids). */
export const GENL_ID_CTRL = 0x10;
export const CTRL_CMD_GETFAMILY = 3;
export const CTRL_ATTR = { FAMILY_ID: 1, FAMILY_NAME: 2, MCAST_GROUPS: 7 } as const;
/** An entry of CTRL_ATTR_MCAST_GROUPS: a family's multicast group, by name and id. */
export const CTRL_ATTR_MCAST_GRP = { NAME: 1, ID: 2 } as const;
const NLA_F_NESTED = 0x8000;

/** One attribute to pack: a number of the given width, a string (NUL-terminated), raw bytes, or nested attributes. */
export type NlAttr =
  | { type: number; u8: number }
  | { type: number; u16: number }
  | { type: number; u32: number }
  | { type: number; u64: number }
  | { type: number; str: string }
  | { type: number; bytes: Uint8Array }
  | { type: number; nested: NlAttr[] };

function align4(n: number): number {
  return (n + 3) & ~3;
}

export function packAttrs(attrs: NlAttr[]): Uint8Array {
  const parts: Uint8Array[] = [];
  for (const a of attrs) {
    let value: Uint8Array;
    let type = a.type;
    if ('u8' in a) value = Uint8Array.of(a.u8);
    else if ('u16' in a) { value = new Uint8Array(2); new DataView(value.buffer).setUint16(0, a.u16, true); }
    else if ('u32' in a) { value = new Uint8Array(4); new DataView(value.buffer).setUint32(0, a.u32 >>> 0, true); }
    else if ('u64' in a) { value = new Uint8Array(8); new DataView(value.buffer).setBigUint64(0, BigInt(a.u64), true); }
    else if ('str' in a) { const s = utf8Encode(a.str); value = new Uint8Array(s.length + 1); value.set(s); }
    else if ('bytes' in a) value = a.bytes;
    else { value = packAttrs(a.nested); type |= NLA_F_NESTED; }
    const out = new Uint8Array(align4(4 + value.length));
    const v = new DataView(out.buffer);
    v.setUint16(0, 4 + value.length, true);
    v.setUint16(2, type, true);
    out.set(value, 4);
    parts.push(out);
  }
  const total = parts.reduce((n, p) => n + p.length, 0);
  const out = new Uint8Array(total);
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}

/** A netlink message: header, then `payload` (a generic netlink header and attributes, an ifinfomsg, …). */
export function packMessage(type: number, flags: number, seq: number, payload: Uint8Array): Uint8Array {
  const out = new Uint8Array(16 + payload.length);
  const v = new DataView(out.buffer);
  v.setUint32(0, out.length, true);
  v.setUint16(4, type, true);
  v.setUint16(6, flags, true);
  v.setUint32(8, seq, true);
  v.setUint32(12, 0, true);
  out.set(payload, 16);
  return out;
}

/** A generic netlink request: command, version, attributes. */
export function packGenl(family: number, cmd: number, version: number, seq: number, attrs: NlAttr[], flags = NLM_F.REQUEST | NLM_F.ACK): Uint8Array {
  const a = packAttrs(attrs);
  const payload = new Uint8Array(4 + a.length);
  payload[0] = cmd;
  payload[1] = version;
  payload.set(a, 4);
  return packMessage(family, flags, seq, payload);
}

export interface NlMessage {
  type: number;
  flags: number;
  seq: number;
  payload: Uint8Array;
}

/** The messages in one datagram from the kernel. */
export function parseMessages(buf: Uint8Array): NlMessage[] {
  const out: NlMessage[] = [];
  const v = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  let at = 0;
  while (at + 16 <= buf.length) {
    const len = v.getUint32(at, true);
    if (len < 16 || at + len > buf.length) throw new FormatError(`netlink: a message of ${len} bytes at ${at} does not fit the ${buf.length} received`, 'nlmsg_len', len);
    out.push({ type: v.getUint16(at + 4, true), flags: v.getUint16(at + 6, true), seq: v.getUint32(at + 8, true), payload: buf.subarray(at + 16, at + len) });
    at += align4(len);
  }
  return out;
}

/** Attributes by type (the last of a type wins), values as raw bytes; nested ones parse the same way. */
export function parseAttrs(buf: Uint8Array): Map<number, Uint8Array> {
  const out = new Map<number, Uint8Array>();
  const v = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  let at = 0;
  while (at + 4 <= buf.length) {
    const len = v.getUint16(at, true);
    if (len < 4 || at + len > buf.length) throw new FormatError(`netlink: an attribute of ${len} bytes at ${at} does not fit its ${buf.length}-byte message`, 'nla_len', len);
    out.set(v.getUint16(at + 2, true) & 0x3fff, buf.subarray(at + 4, at + len));
    at += align4(len);
  }
  return out;
}

export function attrU32(a: Uint8Array | undefined): number | undefined {
  return a && a.length >= 4 ? new DataView(a.buffer, a.byteOffset, 4).getUint32(0, true) : undefined;
}

export function attrU16(a: Uint8Array | undefined): number | undefined {
  return a && a.length >= 2 ? new DataView(a.buffer, a.byteOffset, 2).getUint16(0, true) : undefined;
}

export function attrString(a: Uint8Array | undefined): string | undefined {
  if (!a) return undefined;
  const nul = a.indexOf(0);
  return utf8Decode(nul < 0 ? a : a.subarray(0, nul));
}

/** NLMSG_ERROR's errno (0: an acknowledgement), or undefined for another message. */
export function errorOf(m: NlMessage): number | undefined {
  if (m.type !== NLMSG.ERROR) return undefined;
  if (m.payload.length < 4) throw new FormatError('netlink: an error message without its code', 'nlmsgerr', m.payload.length);
  return -new DataView(m.payload.buffer, m.payload.byteOffset, 4).getInt32(0, true);
}

/**
 * The id of the multicast group `name` in a CTRL_CMD_GETFAMILY reply's attributes
 * (CTRL_ATTR_MCAST_GROUPS: a list of nested entries, each a name and an id), or undefined
 * when the family has no such group.
 */
export function mcastGroupId(family: Map<number, Uint8Array>, name: string): number | undefined {
  const list = family.get(CTRL_ATTR.MCAST_GROUPS);
  if (!list) return undefined;
  for (const entry of parseAttrs(list).values()) {
    const group = parseAttrs(entry);
    if (attrString(group.get(CTRL_ATTR_MCAST_GRP.NAME)) === name) return attrU32(group.get(CTRL_ATTR_MCAST_GRP.ID));
  }
  return undefined;
}
