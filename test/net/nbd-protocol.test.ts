/**
 * The NBD client (src/formats/nbd.ts) against a real server, nbdkit on stdio: the
 * handshake's options, refusals with the server's text and export list, block sizes, and
 * reads checked byte for byte against the served file. Hostile replies that no real
 * server sends are scripted byte by byte.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { nbdHandshake, nbdList, NbdReader, parseNbdUrl, formatNbdUrl, type NbdTransport } from '../../src/formats/nbd.ts';
import { openImage } from '../../src/formats/chain.ts';
import { nodeChainHost } from '../../src/sys/node-reader.ts';
import { startStdioNbdkit, type StdioNbd } from '../kit/nbd-server.ts';

let dir: string;
const servers: StdioNbd[] = [];
function serve(args: string[]): StdioNbd {
  const s = startStdioNbdkit(args);
  servers.push(s);
  return s;
}

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'nbd-proto-'));
  writeFileSync(join(dir, 'data.bin'), randomBytes(3 * 1024 * 1024 + 4096));
  writeFileSync(join(dir, 'other.img'), randomBytes(64 * 1024));
});
afterAll(() => {
  for (const s of servers) s.close();
  rmSync(dir, { recursive: true, force: true });
});

describe('NBD handshake against nbdkit', () => {
  it('NBD_OPT_GO gives the export size and flags; a read-only server says so', () => {
    const file = join(dir, 'data.bin');
    const rw = serve(['file', file]);
    const e = nbdHandshake(rw.transport, '', 'test');
    expect(e.size).toBe(readFileSync(file).length);
    expect(e.readOnly).toBe(false);
    const ro = serve(['-r', 'file', file]);
    const r = nbdHandshake(ro.transport, '', 'test');
    expect(r.readOnly).toBe(true);
    expect(r.size).toBe(e.size);
  });

  it('block sizes the server announces are reported, and reads honour its minimum and maximum', () => {
    const file = join(dir, 'data.bin');
    const s = serve(['--filter=blocksize-policy', 'file', file, 'blocksize-minimum=4096', 'blocksize-preferred=65536', 'blocksize-maximum=131072', 'blocksize-error-policy=error']);
    const e = nbdHandshake(s.transport, '', 'test');
    expect(e.blockSize).toEqual({ minimum: 4096, preferred: 65536, maximum: 131072 });
    const reader = new NbdReader(s.transport, e, 'nbd:data.bin');
    const want = readFileSync(file);
    // unaligned and longer than the maximum: widened to 4096 and split in 128 KiB requests
    for (const [off, len] of [[0, 512], [4095, 3], [100_001, 700_000], [want.length - 10, 10], [12_345, 1]] as const) {
      expect(Buffer.from(reader.read(off, len)).equals(want.subarray(off, off + len))).toBe(true);
    }
    expect(() => reader.read(want.length - 1, 2)).toThrow(/past the end of the export/);
  });

  it('an unknown export is refused with the server\'s text and the exports it offers', () => {
    const s = serve(['file', `dir=${dir}`]);
    let err: Error | undefined;
    try {
      nbdHandshake(s.transport, 'missing.vhdx', 'nbd://10.0.2.100/missing.vhdx');
    } catch (e) {
      err = e as Error;
    }
    expect(err?.name).toBe('FormatError');
    expect(err!.message).toMatch(/has no export "missing\.vhdx" \(NBD_REP_ERR_UNKNOWN/);
    expect(err!.message).toContain('"data.bin"');
    expect(err!.message).toContain('"other.img"');
    expect((err as unknown as { exports: { name: string }[] }).exports.map((x) => x.name).sort()).toEqual(['data.bin', 'other.img']);
  });

  it('dir= serves each file as an export that reads as the file', () => {
    const s = serve(['file', `dir=${dir}`]);
    const e = nbdHandshake(s.transport, 'other.img', 'test');
    const want = readFileSync(join(dir, 'other.img'));
    expect(e.size).toBe(want.length);
    const reader = new NbdReader(s.transport, e, 'other.img');
    expect(Buffer.from(reader.read(0, want.length)).equals(want)).toBe(true);
    reader.disconnect();
  });

  it('NBD_OPT_LIST on a connection of its own', () => {
    const s = serve(['file', `dir=${dir}`]);
    expect(nbdList(s.transport, 'test')!.map((x) => x.name).sort()).toEqual(['data.bin', 'other.img']);
  });

  it('a server that refuses by policy: its export list reaches the message', () => {
    const s = serve(['--filter=exportname', 'file', join(dir, 'data.bin'), 'exportname-strict=true', 'exportname-list=explicit', 'exportname=allowed']);
    expect(() => nbdHandshake(s.transport, 'other', 'test')).toThrow(/NBD server .*"other" \(NBD_REP_ERR_(UNKNOWN|POLICY|INVALID).*The server offers: "allowed"\./s);
  });

  it('a failed read reports the server\'s errno and leaves the reader unusable', () => {
    const s = serve(['--filter=error', 'file', join(dir, 'data.bin'), 'error=EIO', 'error-pread-rate=100%']);
    const e = nbdHandshake(s.transport, '', 'test');
    const reader = new NbdReader(s.transport, e, 'nbd:data.bin');
    expect(() => reader.read(0, 512)).toThrow(/could not read 512 bytes at offset 0 \(EIO\)/);
  });

  it('a dynamic VHDX over NBD gives the same map as the file', () => {
    const vhdx = join(dir, 'disk.vhdx');
    execFileSync('qemu-img', ['create', '-q', '-f', 'vhdx', '-o', 'subformat=dynamic', vhdx, '64M']);
    execFileSync('qemu-io', ['-f', 'vhdx', '-c', 'write -P 0x5a 3M 1M', '-c', 'write -P 0x33 40M 64k', vhdx]);
    const local = nodeChainHost();
    const want = openImage(vhdx, local);
    const s = serve(['-r', 'file', `dir=${dir}`]);
    const e = nbdHandshake(s.transport, 'disk.vhdx', 'test');
    const reader = new NbdReader(s.transport, e, '/disk.vhdx');
    const got = openImage('/disk.vhdx', { openFile: (p) => { if (p !== '/disk.vhdx') throw new Error(`unexpected ${p}`); return reader; } });
    expect(got.map.extents).toEqual(want.map.extents);
    expect(got.map.size).toBe(64 * 1024 * 1024);
    local.close();
    rmSync(vhdx);
  });
});

/** A transport that replays the bytes a hostile server would send. */
function scripted(reply: Uint8Array): NbdTransport & { sent: number } {
  let at = 0;
  return {
    sent: 0,
    write(b) { this.sent += b.length; },
    read(n) {
      if (at + n > reply.length) throw new Error(`the server closed the connection after ${reply.length - at} of ${n} bytes`);
      const out = reply.slice(at, at + n);
      at += n;
      return out;
    },
  };
}

function hex(s: string): Uint8Array {
  return Uint8Array.from(Buffer.from(s.replace(/\s+/g, ''), 'hex'));
}
const GREETING = '4e42444d41474943 49484156454f5054 0003';
const OPT_REPLY = (option: number, type: number, len: number) => `0003e889045565a9 ${option.toString(16).padStart(8, '0')} ${(type >>> 0).toString(16).padStart(8, '0')} ${len.toString(16).padStart(8, '0')}`;

describe('NBD handshake against hostile or foreign servers', () => {
  it('something that is not an NBD server', () => {
    expect(() => nbdHandshake(scripted(new TextEncoder().encode('HTTP/1.1 400 Bad Request\r\n\r\n')), 'x', 'nbd://h/x')).toThrow(/did not greet with NBD's magic.*10809/);
  });
  it('an old-style server', () => {
    expect(() => nbdHandshake(scripted(hex('4e42444d41474943 0000420281861253')), 'x', 'nbd://h/x')).toThrow(/old-style handshake/);
  });
  it('an option reply that claims 16 MiB is refused before reading it', () => {
    expect(() => nbdHandshake(scripted(hex(GREETING + OPT_REPLY(7, 3, 16 << 20))), 'x', 'nbd://h/x')).toThrow(/16777216 bytes long, more than vdboot accepts/);
  });
  it('an export size beyond 2^53 is refused', () => {
    expect(() => nbdHandshake(scripted(hex(GREETING + OPT_REPLY(7, 3, 12) + '0000 ffffffffffffffff 0001' + OPT_REPLY(7, 1, 0))), 'x', 'nbd://h/x')).toThrow(/more than vdboot can address/);
  });
  it('block sizes that break the rules are refused', () => {
    expect(() => nbdHandshake(scripted(hex(GREETING + OPT_REPLY(7, 3, 14) + '0003 00000300 00001000 00100000')), 'x', 'nbd://h/x')).toThrow(/break NBD's rules/);
  });
  it('an ACK without NBD_INFO_EXPORT is refused', () => {
    expect(() => nbdHandshake(scripted(hex(GREETING + OPT_REPLY(7, 1, 0))), 'x', 'nbd://h/x')).toThrow(/without saying its size/);
  });
  it('a read reply with another cookie is refused', () => {
    const t = scripted(hex(GREETING + OPT_REPLY(7, 3, 12) + '0000 0000000000100000 0003' + OPT_REPLY(7, 1, 0) + '67446698 00000000 0000000000000007'));
    const e = nbdHandshake(t, 'x', 'nbd://h/x');
    expect(e).toMatchObject({ size: 1 << 20, readOnly: true });
    expect(() => new NbdReader(t, e, 'x').read(0, 512)).toThrow(/answered request 7 when request 1/);
  });
  it('a server that closes during a read', () => {
    const t = scripted(hex(GREETING + OPT_REPLY(7, 3, 12) + '0000 0000000000100000 0003' + OPT_REPLY(7, 1, 0) + '67446698 00000000 0000000000000001 0000'));
    const r = new NbdReader(t, nbdHandshake(t, 'x', 'nbd://h/x'), 'x');
    expect(() => r.read(0, 512)).toThrow(/closed the connection/);
    expect(() => r.read(0, 512)).toThrow(/unusable after an earlier failure/);
  });
});

describe('nbd:// URLs', () => {
  it('server, port and export', () => {
    expect(parseNbdUrl('nbd://10.0.2.100/disk.vhdx')).toEqual({ server: '10.0.2.100', port: 10809, export: 'disk.vhdx' });
    expect(parseNbdUrl('nbd://srv:1234/a/b%20c.vhdx')).toEqual({ server: 'srv', port: 1234, export: 'a/b c.vhdx' });
    expect(parseNbdUrl('nbd://[fd00::1]:10810/x')).toEqual({ server: 'fd00::1', port: 10810, export: 'x' });
    expect(parseNbdUrl('nbd://srv')).toEqual({ server: 'srv', port: 10809, export: '' });
    expect(formatNbdUrl({ server: 'fd00::1', port: 10810, export: 'x' })).toBe('nbd://[fd00::1]:10810/x');
  });
  it('malformed ones get a message', () => {
    expect(parseNbdUrl('nbd:/srv/x')).toMatch(/is not nbd:\/\/SERVER/);
    expect(parseNbdUrl('nbd://srv:70000/x')).toMatch(/port 70000/);
    expect(parseNbdUrl('nbd://srv/%zz')).toMatch(/malformed %XX/);
  });
});

describe('NBD replies mutated at random', () => {
  it('every mutation ends in a FormatError or a closed connection, never another exception', () => {
    const good = hex(GREETING + OPT_REPLY(7, 3, 14) + '0003 00000200 00001000 00100000' + OPT_REPLY(7, 3, 12) + '0000 0000000000100000 0003' +
      OPT_REPLY(7, 1, 0) + '67446698 00000000 0000000000000001' + 'ab'.repeat(4096));
    let seed = 12345;
    const rand = (n: number): number => {
      seed = (seed * 1103515245 + 12345) >>> 0;
      return seed % n;
    };
    const outcomes = new Map<string, number>();
    for (let i = 0; i < 3000; i++) {
      const bytes = good.slice(0, rand(4) === 0 ? rand(good.length) : good.length);
      for (let k = 1 + rand(4); k > 0; k--) bytes[rand(Math.min(bytes.length, 140)) || 0] = rand(256);
      try {
        const t = scripted(bytes);
        const e = nbdHandshake(t, 'x', 'nbd://h/x');
        const r = new NbdReader(t, e, 'x');
        if (e.size >= 4096) r.read(0, 4096);
        outcomes.set('ok', (outcomes.get('ok') ?? 0) + 1);
      } catch (e) {
        const err = e as Error;
        const kind = err.name === 'FormatError' ? 'FormatError' : /closed the connection/.test(err.message) ? 'closed' : `${err.name}: ${err.message}`;
        outcomes.set(kind, (outcomes.get(kind) ?? 0) + 1);
      }
    }
    expect([...outcomes.keys()].filter((k) => k !== 'ok' && k !== 'FormatError' && k !== 'closed')).toEqual([]);
    expect(outcomes.get('FormatError')).toBeGreaterThan(100);
  });
});
