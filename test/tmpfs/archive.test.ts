/**
 * The streaming tar and newc readers against archives written by GNU tar (gnu, pax with
 * xattrs, ustar, docker-export style), bsdtar (pax, newc), GNU cpio and busybox tar/cpio:
 * every entry of the source tree comes back with its type, mode bits, owners, time, body,
 * link target and device numbers. Corrupt and truncated archives name the entry and byte.
 */
import { execFileSync, execSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { bytesSource, StreamCursor } from '../../src/formats/archive-stream.ts';
import { declaredStreamSize, detectCompression, jsDecoderSource, openArchive, type Compression } from '../../src/formats/archive.ts';
import { bytesReader } from '../../src/formats/block-reader.ts';
import { buildTree, describeTree, have, LONG_FILE, LONG_TARGET, MTIME, readArchiveBytes, type ReadBack } from './helpers.ts';

let dir: string;
let tree: string;
let oracle: ReturnType<typeof describeTree>;
let capHex: string;

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-tar-'));
  tree = path.join(dir, 'root');
  buildTree(tree, { capability: true });
  oracle = describeTree(tree);
  const dump = execFileSync('getfattr', ['-n', 'security.capability', '-e', 'hex', path.join(tree, 'bin/ping')], { encoding: 'utf8' });
  capHex = /security\.capability=(0x[0-9a-f]+)/.exec(dump)![1]!;
});
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

function sh(cmd: string): Uint8Array {
  return new Uint8Array(execSync(cmd, { cwd: tree, maxBuffer: 256 << 20, shell: '/bin/sh' }));
}

/** Every tree entry (or those under `only`) is in the archive, as lstat sees it. */
function expectMatches(got: ReadBack, opts: { only?: string[]; times?: boolean } = {}): void {
  const byPath = new Map(got.entries.map((e) => [e.path, e]));
  const inodes = new Map<number, string[]>();
  for (const [p, t] of oracle) if (t.type === 'file') inodes.set(t.ino, [...(inodes.get(t.ino) ?? []), p]);
  let checked = 0;
  for (const [p, want] of oracle) {
    if (opts.only && !opts.only.some((o) => p === o || p.startsWith(`${o}/`))) continue;
    const e = byPath.get(p);
    expect(e, `${p} in the archive`).toBeDefined();
    const group = want.type === 'file' ? inodes.get(want.ino)! : [p];
    if (e!.type === 'hardlink') {
      expect(group).toContain(e!.linkTarget);
    } else {
      expect(e!.type, p).toBe(want.type);
    }
    expect(e!.perm.toString(8), `${p} mode`).toBe(want.perm.toString(8));
    expect([e!.uid, e!.gid], `${p} owners`).toEqual([want.uid, want.gid]);
    if (opts.times !== false) expect(e!.mtimeSec, `${p} mtime`).toBe(want.mtime);
    if (want.type === 'file') {
      const carried = group.map((g) => got.bodies.get(g)).filter((x) => x !== undefined);
      if (want.size > 0) expect(carried, `${p} body`).toContain(want.sha);
    }
    if (want.type === 'symlink') expect(e!.linkTarget, `${p} target`).toBe(want.target);
    if (want.rdev) expect([e!.devMajor, e!.devMinor], `${p} device`).toEqual(want.rdev);
    checked++;
  }
  expect(checked).toBeGreaterThan(opts.only ? 5 : 25);
}

function capabilityOf(got: ReadBack): string | undefined {
  const x = got.entries.find((e) => e.path === 'bin/ping')?.xattrs.find((a) => a.name === 'security.capability');
  return x ? `0x${Buffer.from(x.value).toString('hex')}` : undefined;
}

describe('tar reader', () => {
  it('GNU tar, gnu format: long names and long link targets (L/K), hard links, devices, FIFO, setuid/setgid/sticky', () => {
    const got = readArchiveBytes(sh('tar --format=gnu -cf - .'));
    expect(got.format).toBe('tar');
    expectMatches(got);
    expect(got.entries.find((e) => e.path === LONG_FILE)).toBeDefined();
    expect(got.entries.find((e) => e.path === 'usr/bin/longlink')!.linkTarget).toBe(LONG_TARGET);
  });

  it('GNU tar, pax format with --xattrs: the file capability comes back as security.capability', () => {
    const got = readArchiveBytes(sh("tar --format=pax --xattrs --xattrs-include='*' -cf - ."), 4096);
    expectMatches(got);
    expect(capabilityOf(got)).toBe(capHex);
  });

  it('GNU tar, ustar format: names split into prefix and name', () => {
    const got = readArchiveBytes(sh('tar --format=ustar -cf - etc bin dev run tmp home usr/bin/sgid'), 512);
    expectMatches(got, { only: ['etc', 'bin', 'dev', 'run', 'tmp', 'home'] });
  });

  it('docker-export style: member names without "./", numeric owners, read in one-byte chunks', () => {
    const names = fs.readdirSync(tree).join(' ');
    const bytes = sh(`tar --numeric-owner --format=gnu -cf - ${names}`);
    expectMatches(readArchiveBytes(bytes, 65536));
    // Byte-at-a-time on a small part exercises every header and body boundary.
    expectMatches(readArchiveBytes(sh('tar --numeric-owner -cf - etc bin'), 1), { only: ['etc', 'bin'] });
  });

  it.skipIf(!have('bsdtar'))('bsdtar, pax with --xattrs (SCHILY and LIBARCHIVE xattr records)', () => {
    const got = readArchiveBytes(sh('bsdtar --format=pax --xattrs -cf - .'));
    expectMatches(got);
    expect(capabilityOf(got)).toBe(capHex);
  });

  it('busybox tar', () => {
    const got = readArchiveBytes(sh('busybox tar -cf - .'));
    expectMatches(got);
  });
});

/** Rewrites the numeric fields of every tar header in another spelling POSIX or GNU tar allows, checksum recomputed. */
function respell(src: Uint8Array): Uint8Array {
  const b = src.slice();
  const ascii = (off: number, text: string): void => {
    for (let i = 0; i < text.length; i++) b[off + i] = text.charCodeAt(i);
  };
  const octal = (off: number, len: number): number => parseInt(Buffer.from(b.subarray(off, off + len)).toString('latin1').replace(/[\0 ]+$/, '').trim() || '0', 8);
  for (let at = 0, n = 0; at + 512 <= b.length; n++) {
    if (b.subarray(at, at + 512).every((x) => x === 0)) break;
    const size = octal(at + 124, 12);
    const style = n % 3;
    for (const [off, len] of [[100, 8], [108, 8], [116, 8], [124, 12], [136, 12]] as const) {
      const v = octal(at + off, len).toString(8);
      if (style === 0) ascii(at + off, `${v.padStart(len - 2, ' ')} \0`); // leading spaces, space and NUL
      else if (style === 1) ascii(at + off, `${v.padStart(len - 1, '0')} `); // ended by a space only
      else if (off === 108 || off === 116) {
        // base-256 (GNU): 0x80, then the number big-endian
        b.fill(0, at + off, at + off + len);
        b[at + off] = 0x80;
        let x = parseInt(v, 8);
        for (let i = len - 1; i > 0 && x > 0; i--, x = Math.floor(x / 256)) b[at + off + i] = x % 256;
      }
    }
    b.fill(0x20, at + 148, at + 156);
    let sum = 0;
    for (let i = 0; i < 512; i++) sum += b[at + i]!;
    ascii(at + 148, n % 2 ? `${sum.toString(8).padStart(7, '0')}\0` : `${sum.toString(8).padStart(6, '0')}\0 `);
    at += 512 + Math.ceil(size / 512) * 512;
  }
  return b;
}

describe('tar headers read a word at a time', () => {
  it('numbers in other spellings (leading spaces, space-ended, base-256 owners, both checksum forms) read as GNU tar reads them', () => {
    const original = sh('tar --format=gnu --numeric-owner -cf - etc bin usr/bin dev');
    const rewritten = respell(original);
    expect(Buffer.compare(Buffer.from(rewritten), Buffer.from(original))).not.toBe(0);
    // The oracle: GNU tar lists both the same way.
    const list = (bytes: Uint8Array): string => execFileSync('tar', ['--numeric-owner', '--full-time', '-tvf', '-'], { input: bytes, encoding: 'utf8' });
    expect(list(rewritten)).toBe(list(original));
    const want = readArchiveBytes(original, 1 << 20);
    expect(readArchiveBytes(rewritten, 1 << 20)).toEqual(want);
    expect(readArchiveBytes(rewritten, 777)).toEqual(want);
    expectMatches(want, { only: ['etc', 'bin', 'usr/bin', 'dev'] });
  });

  it('aligned and unaligned chunks read the same entries from GNU, pax, ustar and busybox archives', () => {
    for (const cmd of ['tar --format=gnu -cf - .', "tar --format=pax --xattrs --xattrs-include='*' -cf - .", 'tar --format=ustar -cf - etc bin dev', 'busybox tar -cf - .']) {
      const bytes = sh(cmd);
      expect(readArchiveBytes(bytes, 1 << 20), cmd).toEqual(readArchiveBytes(bytes, 777));
    }
  });

  it('any header byte changed, in its high bit or its low bit, is a damaged header', () => {
    const bytes = sh('tar -cf - etc/hostname etc/empty');
    for (const flip of [0x80, 0x01]) {
      for (let i = 0; i < 512; i++) {
        const b = bytes.slice();
        b[1024 + i] ^= flip;
        expect(() => readArchiveBytes(b, 1 << 20), `byte ${i} ^ 0x${flip.toString(16)}`).toThrow(/tar header at byte 1024 is damaged/);
      }
    }
  });

  it('byteSum and utf8Decode (the header sum and the name from the host\'s native code): the same entries, and any changed header byte is still a damaged header', () => {
    const decoded: string[] = [];
    const utf8Decode = (b: Uint8Array): string => {
      const s = Buffer.from(b).toString('utf8');
      decoded.push(s);
      return s;
    };
    let calls = 0;
    const byteSum = (b: Uint8Array): number => {
      calls += 1;
      let sum = 0;
      for (const x of b) sum += x;
      return sum;
    };
    for (const cmd of ['tar --format=gnu -cf - .', "tar --format=pax --xattrs --xattrs-include='*' -cf - .", 'busybox tar -cf - .']) {
      const bytes = sh(cmd);
      expect(readArchiveBytes(bytes, 777, { byteSum }), cmd).toEqual(readArchiveBytes(bytes, 777));
      expect(readArchiveBytes(bytes, 777, { byteSum, utf8Decode }), cmd).toEqual(readArchiveBytes(bytes, 777));
    }
    expect(calls).toBeGreaterThan(40);
    expect(decoded.some((n) => n.includes('Grüße'))).toBe(true);
    const bytes = sh('tar -cf - etc/hostname etc/empty');
    for (let i = 0; i < 512; i++) {
      const b = bytes.slice();
      b[1024 + i] ^= 0x01;
      expect(() => readArchiveBytes(b, 1 << 20, { byteSum }), `byte ${i}`).toThrow(/tar header at byte 1024 is damaged/);
    }
  });

  it('reuseEntry: one object refilled by each next() carries the same entries, bodies included', () => {
    const bytes = sh("tar --format=pax --xattrs --xattrs-include='*' -cf - .");
    const read = (reuse: boolean): { entries: object[]; objects: Set<object> } => {
      const reader = openArchive(new StreamCursor(bytesSource(bytes, 1 << 20)), 'test archive', { reuseEntry: reuse });
      const entries: object[] = [];
      const objects = new Set<object>();
      for (let e = reader.next(); e; e = reader.next()) {
        objects.add(e);
        let body = 0;
        for (let b = reader.body(4096); b.length; b = reader.body(4096)) body += b.length;
        entries.push({ ...e, body });
      }
      return { entries, objects };
    };
    const fresh = read(false);
    const reused = read(true);
    expect(reused.entries).toEqual(fresh.entries);
    expect(fresh.objects.size).toBe(fresh.entries.length);
    expect(reused.objects.size).toBe(1);
  });

  it('UTF-8 names come back decoded, ASCII names as they are', () => {
    const utf = path.join(dir, 'utf8');
    fs.mkdirSync(path.join(utf, 'café'), { recursive: true });
    fs.writeFileSync(path.join(utf, 'café', 'naïve-ünïcödé.txt'), 'x');
    fs.writeFileSync(path.join(utf, 'café', 'plain.txt'), 'y');
    const got = readArchiveBytes(new Uint8Array(execFileSync('tar', ['--format=gnu', '-C', utf, '-cf', '-', '.'])), 1 << 20);
    expect(got.entries.map((e) => e.path).sort()).toEqual(['', 'café', 'café/naïve-ünïcödé.txt', 'café/plain.txt']);
  });
});

describe('newc cpio reader', () => {
  it('GNU cpio -H newc: hard links rebuilt from shared inodes', () => {
    const got = readArchiveBytes(sh('find . | cpio --quiet -o -H newc'));
    expect(got.format).toBe('cpio');
    expectMatches(got);
    expect(got.entries.filter((e) => e.type === 'hardlink')).toHaveLength(1);
  });

  it.skipIf(!have('bsdtar'))('bsdtar --format=newc', () => {
    expectMatches(readArchiveBytes(sh('bsdtar --format=newc -cf - .'), 1000));
  });

  it('busybox cpio -H newc', () => {
    expectMatches(readArchiveBytes(sh('find . | busybox cpio -o -H newc 2>/dev/null')));
  });
});

describe('damaged archives', () => {
  it('a truncated tar names the entry and the byte where its data stops', () => {
    const bytes = sh('tar -cf - usr/lib/big.bin etc');
    expect(() => readArchiveBytes(bytes.subarray(0, 100_000))).toThrow(/truncated: entry "usr\/lib\/big.bin" \(header at byte 0\) ends early: \d+ of its bytes are missing after byte 100000/);
  });

  it('a damaged tar header names its byte and the last good entry', () => {
    const bytes = sh('tar -cf - etc/hostname etc/empty').slice();
    bytes[1024 + 10] ^= 0x55; // the second header
    expect(() => readArchiveBytes(bytes)).toThrow(/tar header at byte 1024 is damaged .*last good entry was "etc\/hostname"/);
  });

  it('a truncated cpio names the entry', () => {
    const bytes = sh('find usr/lib | cpio --quiet -o -H newc');
    expect(() => readArchiveBytes(bytes.subarray(0, 50_000))).toThrow(/truncated: entry "usr\/lib\/big.bin"/);
  });

  it('".." in a member path is passed on as written (the unpacker refuses and counts it), an absolute name is made relative', () => {
    const bytes = sh('tar -cf - -P --transform="s,^etc,../evil," --transform="s,^usr,/abs/usr," etc/hostname usr/lib/big.bin');
    expect(readArchiveBytes(bytes).entries.map((e) => e.path)).toEqual(['../evil/hostname', 'abs/usr/lib/big.bin']);
  });

  it('GNU sparse members are refused with what to do', () => {
    const f = path.join(dir, 'sparse.img');
    execFileSync('truncate', ['-s', '8M', f]);
    execSync(`printf x | dd of=${f} bs=1 seek=4000000 conv=notrunc status=none`);
    const bytes = new Uint8Array(execFileSync('tar', ['--sparse', '-C', dir, '-cf', '-', 'sparse.img'], { maxBuffer: 64 << 20 }));
    expect(() => readArchiveBytes(bytes)).toThrow(/sparse file.*without --sparse/);
  });

  it('something that is no archive is named by its first bytes', () => {
    expect(() => readArchiveBytes(new TextEncoder().encode('hello, this is not an archive'.repeat(40)))).toThrow(/not a tar or newc cpio archive \(first bytes 68 65/);
  });
});

describe('compression by content', () => {
  const cases: [Compression, string][] = [
    ['gzip', 'gzip -c'], ['xz', 'xz -c -T1'], ['zstd', 'zstd -q -c'], ['bzip2', 'bzip2 -c'], ['lz4', 'lz4 -q -c'], ['lzma', 'xz --format=lzma -c'],
  ];
  for (const [kind, cmd] of cases) {
    it(`${kind}: recognised from its magic; the declared size is the tar's size or a lower bound`, () => {
      const tarBytes = sh('tar -cf - etc usr');
      // From a file, as archives are made: zstd then records the content size.
      const tarFile = path.join(dir, `c-${kind}.tar`);
      fs.writeFileSync(tarFile, tarBytes);
      const packed = new Uint8Array(execSync(`${cmd} ${tarFile}`, { maxBuffer: 64 << 20 }));
      expect(detectCompression(packed.subarray(0, 16))).toBe(kind);
      const declared = declaredStreamSize(bytesReader('x', packed), kind);
      if (kind === 'bzip2' || kind === 'lz4') expect(declared).toBeUndefined();
      else if (kind === 'lzma') expect([undefined, tarBytes.length]).toContain(declared);
      else expect(declared).toBe(tarBytes.length);
    });
  }

  it('an uncompressed tar is "none"', () => {
    expect(detectCompression(sh('tar -cf - etc').subarray(0, 16))).toBe('none');
  });
});

describe('decoders inside vdboot', () => {
  const tarBytes = (): Uint8Array => sh('tar -cf - usr etc bin');
  const decode = (kind: Compression, packed: Uint8Array, chunk: number): Uint8Array => {
    const src = jsDecoderSource(kind, bytesSource(packed, chunk), 'test')!;
    const parts: Buffer[] = [];
    for (let c = src.pull(); c; c = src.pull()) parts.push(Buffer.from(c));
    return new Uint8Array(Buffer.concat(parts));
  };
  for (const [name, cmd] of [
    ['lz4 frame, independent blocks, with content size and checksums', 'lz4 -q -c -BI --content-size -BX'],
    ['lz4 frame, linked 64 KiB blocks', 'lz4 -q -c -BD -B4'],
    ['lz4 legacy format (the kernel initramfs flavour)', 'lz4 -q -c -l'],
    ['lz4 two concatenated frames', 'sh -c "lz4 -q -c; printf \'\'"'],
  ] as const) {
    it(`${name} decodes to the same bytes as lz4 -d`, () => {
      const t = tarBytes();
      const packed = new Uint8Array(execSync(cmd, { input: t, maxBuffer: 64 << 20 }));
      expect(Buffer.from(decode('lz4', packed, 5000)).equals(Buffer.from(t))).toBe(true);
    });
  }

  it('zstd (two frames, streaming) decodes to the same bytes', () => {
    const t = tarBytes();
    const half = t.length >> 1;
    const a = execSync('zstd -q -c', { input: t.subarray(0, half) });
    const b = execSync('zstd -q -c', { input: t.subarray(half) });
    const packed = new Uint8Array(Buffer.concat([a, b]));
    expect(Buffer.from(decode('zstd', packed, 3000)).equals(Buffer.from(t))).toBe(true);
  });

  it('a corrupt lz4 block is an error naming the byte', () => {
    const packed = new Uint8Array(execSync('lz4 -q -c -BI', { input: tarBytes() })).slice();
    for (let i = 40; i < 200; i++) packed[i] = 0xff;
    expect(() => decode('lz4', packed, 1 << 20)).toThrow(/corrupt LZ4 block|LZ4 block at byte/);
  });
});
