/** Netlink packing and parsing (src/formats/netlink.ts): the bytes the kernel expects, and replies bounds-checked. */
import { describe, expect, it } from 'vitest';
import { attrString, attrU16, attrU32, errorOf, packAttrs, packGenl, parseAttrs, parseMessages } from '../../src/formats/netlink.ts';

const hex = (b: Uint8Array): string => Buffer.from(b).toString('hex');

describe('netlink messages', () => {
  it('a generic netlink family look-up, byte for byte (linux/netlink.h, genetlink.h)', () => {
    const m = packGenl(0x10, 3, 1, 7, [{ type: 2, str: 'nbd' }]);
    // nlmsghdr: len 28, type 0x10, flags REQUEST|ACK, seq 7, pid 0; genlmsghdr: cmd 3, version 1; nla: len 8, type 2, "nbd\0"
    expect(hex(m)).toBe('1c000000' + '1000' + '0500' + '07000000' + '00000000' + '03010000' + '0800' + '0200' + '6e626400');
  });
  it('attributes are padded to 4 bytes; nested ones carry NLA_F_NESTED', () => {
    const a = packAttrs([{ type: 1, u8: 9 }, { type: 7, nested: [{ type: 1, nested: [{ type: 1, u32: 5 }] }] }, { type: 2, u64: 2 ** 40 }]);
    expect(hex(a)).toBe('0500' + '0100' + '09000000' + '1000' + '0780' + '0c00' + '0180' + '0800' + '0100' + '05000000' + '0c00' + '0200' + '0000000000010000');
    const parsed = parseAttrs(a);
    expect(parsed.get(1)).toEqual(Uint8Array.of(9));
    const inner = parseAttrs(parseAttrs(parsed.get(7)!).get(1)!);
    expect(attrU32(inner.get(1))).toBe(5);
  });
  it('a reply: messages, attributes, the error code', () => {
    const reply = packGenl(0x10, 1, 2, 7, [{ type: 1, u16: 0x25 }, { type: 2, str: 'nbd' }], 0);
    const err = new Uint8Array(20 + 16);
    const v = new DataView(err.buffer);
    v.setUint32(0, 36, true); v.setUint16(4, 2, true); v.setInt32(16, -2, true);
    const both = new Uint8Array(reply.length + err.length);
    both.set(reply); both.set(err, reply.length);
    const msgs = parseMessages(both);
    expect(msgs).toHaveLength(2);
    const attrs = parseAttrs(msgs[0]!.payload.subarray(4));
    expect(attrU16(attrs.get(1))).toBe(0x25);
    expect(attrString(attrs.get(2))).toBe('nbd');
    expect(errorOf(msgs[0]!)).toBeUndefined();
    expect(errorOf(msgs[1]!)).toBe(2);
  });
  it('lengths past the received bytes are refused', () => {
    const m = packGenl(0x10, 3, 1, 1, [{ type: 2, str: 'nbd' }]);
    expect(() => parseMessages(m.subarray(0, 20))).toThrow(/does not fit the 20 received/);
    const a = packAttrs([{ type: 2, str: 'nbd' }]);
    expect(() => parseAttrs(a.subarray(0, 6))).toThrow(/does not fit its 6-byte message/);
  });
});
