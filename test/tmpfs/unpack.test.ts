/**
 * vdboot's unpacker (the code that runs at boot) on the build machine, as root, on both
 * engines (unpackers.ts): Node through a Sys over Node's fs, and QuickJS against the fake
 * kernel: the unpacked tree equals the source tree entry by entry (type, mode bits,
 * owners, times, bodies, link targets, device numbers, hard links, the file capability),
 * and hostile or odd archives end as they should.
 */
import { execFileSync, execSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { bytesSource, StreamCursor } from '../../src/formats/archive-stream.ts';
import { openArchive } from '../../src/formats/archive.ts';
import { unpackArchive, UnpackError } from '../../src/boot/unpack.ts';
import { explainUnpackFailure } from '../../src/boot/tmpfs-root.ts';
import { spawnSync } from 'node:child_process';
import { buildTree, describeTree } from './helpers.ts';
import { type RunOptions, UNPACKERS } from './unpackers.ts';
import { nodeUnpackSys } from './node-sys.ts';

let dir: string;
let tree: string;

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-unpack-'));
  tree = path.join(dir, 'root');
  buildTree(tree, { capability: true });
});
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

function cap(p: string): string {
  return execFileSync('getfattr', ['--absolute-names', '-n', 'security.capability', '-e', 'hex', p], { encoding: 'utf8' }).split('\n').find((l) => l.startsWith('security'))!;
}

function expectSameTree(a: string, b: string): void {
  const want = describeTree(a);
  const got = describeTree(b);
  expect([...got.keys()].sort()).toEqual([...want.keys()].sort());
  const inoA = new Map<number, string>();
  const inoB = new Map<number, string>();
  for (const [p, w] of want) {
    const g = got.get(p)!;
    const { ino: wi, ...wRest } = w;
    const { ino: gi, ...gRest } = g;
    expect(gRest, p).toEqual(wRest);
    // Hard links: the same names share an inode on both sides.
    if (w.type === 'file') {
      expect(inoB.get(gi) === undefined ? undefined : inoA.get(wi), `${p} link group`).toBe(inoB.get(gi));
      inoA.set(wi, p);
      inoB.set(gi, p);
    }
  }
}

describe.each(UNPACKERS)('unpacking with vdboot ($name)', (u) => {
  /** Unpacks into a new directory named after the case and the engine. */
  async function unpack(bytes: Uint8Array, name: string, opts: RunOptions = {}) {
    const out = path.join(dir, `${name}-${u.name.replace(/\W+/g, '-')}`);
    fs.mkdirSync(out);
    const run = await u.run(bytes, out, opts);
    if (run.error) throw new Error(`unpack failed: ${JSON.stringify(run.error)}`);
    return { out, stats: run.stats!, mirrorChanges: run.mirrorChanges };
  }

  it('GNU tar pax --xattrs: the tree comes back identical, with the file capability, and the root directory gets the archive\'s mode', async () => {
    fs.chmodSync(tree, 0o755);
    const bytes = new Uint8Array(execSync("tar --format=pax --xattrs --xattrs-include='*' -C root -cf - .", { cwd: dir, maxBuffer: 64 << 20 }));
    const { out, stats } = await unpack(bytes, 'pax');
    expectSameTree(tree, out);
    expect(cap(path.join(out, 'bin/ping'))).toBe(cap(path.join(tree, 'bin/ping')));
    expect(stats.xattrs).toBeGreaterThanOrEqual(1);
    expect(stats.warnings).toEqual([]);
    expect((fs.statSync(out).mode & 0o7777).toString(8)).toBe('755');
  });

  it('with umask(0) available (entries created with their final mode, chmod and chown only where needed): identical tree', async () => {
    const bytes = new Uint8Array(execSync("tar --format=pax --xattrs --xattrs-include='*' -C root -cf - .", { cwd: dir, maxBuffer: 64 << 20 }));
    const before = process.umask();
    const { out } = await unpack(bytes, 'pax-umask', { umask: true });
    expect(process.umask()).toBe(before);
    expectSameTree(tree, out);
    expect(cap(path.join(out, 'bin/ping'))).toBe(cap(path.join(tree, 'bin/ping')));
  });

  it('GNU cpio newc (data on the last name of a hard-link group): identical tree', async () => {
    const bytes = new Uint8Array(execSync('find . | cpio --quiet -o -H newc', { cwd: tree, maxBuffer: 64 << 20 }));
    const { out } = await unpack(bytes, 'newc', { umask: true });
    // cpio keeps no xattrs: compare everything else.
    expectSameTree(tree, out);
  });

  it('a later member with the same name replaces the earlier one, as tar does (a file by a link, an empty directory by a file)', async () => {
    const src = path.join(dir, `dup-${u.name.replace(/\W+/g, '-')}`);
    fs.mkdirSync(src);
    fs.writeFileSync(path.join(src, 'f'), 'first');
    fs.mkdirSync(path.join(src, 'd'));
    const a = execSync('tar -cf - f d', { cwd: src });
    fs.rmSync(path.join(src, 'f'));
    fs.symlinkSync('elsewhere', path.join(src, 'f'));
    fs.rmdirSync(path.join(src, 'd'));
    fs.writeFileSync(path.join(src, 'd'), 'now a file');
    const b = execSync('tar -cf - f d', { cwd: src });
    // Concatenate the members (drop the first archive's end blocks: f's header and body, d's header).
    const joined = Buffer.concat([a.subarray(0, 1536), b]);
    const { out } = await unpack(new Uint8Array(joined), 'dup-out');
    expect(fs.readlinkSync(path.join(out, 'f'))).toBe('elsewhere');
    expect(fs.readFileSync(path.join(out, 'd'), 'utf8')).toBe('now a file');
  });

  it('an entry under a symbolic link the archive made is refused (counted, the rest unpacked), and nothing is written outside the root', async () => {
    const src = path.join(dir, `evil-${u.name.replace(/\W+/g, '-')}`);
    const victim = path.join(dir, `victim-${u.name.replace(/\W+/g, '-')}`);
    fs.mkdirSync(src);
    fs.mkdirSync(victim);
    fs.writeFileSync(path.join(victim, 'keep'), 'mine');
    fs.symlinkSync(victim, path.join(src, 'escape'));
    const a = execSync('tar -cf - escape', { cwd: src });
    fs.rmSync(path.join(src, 'escape'));
    fs.mkdirSync(path.join(src, 'escape'));
    fs.writeFileSync(path.join(src, 'escape', 'pwned'), 'x');
    const b = execSync('tar -cf - escape/pwned', { cwd: src });
    const joined = new Uint8Array(Buffer.concat([a.subarray(0, 512), b]));
    const { stats, mirrorChanges } = await unpack(joined, 'evil-out', { mirror: [victim] });
    expect(stats.refused.byReason.symlink).toBe(1);
    expect(stats.refused.examples[0]).toMatch(/"escape\/pwned" \(file, header at byte \d+\): it lies under "escape", which the archive made a symbolic link/);
    expect(fs.readdirSync(victim)).toEqual(['keep']);
    expect(mirrorChanges).toEqual([]);
  });

  it('members without their parent directories get them created', async () => {
    const bytes = new Uint8Array(execSync('tar -cf - usr/lib/big.bin etc/hostname', { cwd: tree, maxBuffer: 64 << 20 }));
    const { out, stats } = await unpack(bytes, 'noparents');
    expect(fs.readFileSync(path.join(out, 'etc/hostname'), 'utf8')).toBe('tmpfs-guest\n');
    expect(execFileSync('sha256sum', [path.join(out, 'usr/lib/big.bin')], { encoding: 'utf8' }).slice(0, 64)).toBe(execFileSync('sha256sum', [path.join(tree, 'usr/lib/big.bin')], { encoding: 'utf8' }).slice(0, 64));
    expect(stats.files).toBe(2);
    expect(stats.bytes).toBe(300_000 + 12);
  });

  it('an extended attribute the filesystem refuses is a warning, not a failure', async () => {
    const bytes = new Uint8Array(execSync("tar --format=pax --xattrs --xattrs-include='*' -C root -cf - bin/ping", { cwd: dir, maxBuffer: 64 << 20 }));
    const { stats } = await unpack(bytes, 'refused', { fail: { call: 'lsetxattr', code: 'EOPNOTSUPP' } });
    expect(stats.files).toBe(1);
    expect(stats.warnings.join('\n')).toMatch(/refused extended attribute security\.capability on "bin\/ping" \(EOPNOTSUPP\)/);
  });
});

describe('unpacking with vdboot on a real tmpfs (Node)', () => {
  it('a full tmpfs (ENOSPC) stops at the entry being written and the message names rd.tmpfs.size', () => {
    const small = path.join(dir, 'small');
    fs.mkdirSync(small);
    if (spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=128k', 'tmpfs', small]).status !== 0) return; // not allowed here
    try {
      const bytes = new Uint8Array(execSync('tar -cf - etc usr/lib/big.bin', { cwd: tree, maxBuffer: 64 << 20 }));
      const reader = openArchive(new StreamCursor(bytesSource(bytes, 10_000)), 'root.tar');
      let error: unknown;
      try {
        unpackArchive(nodeUnpackSys({ umask: true }), reader, small);
      } catch (e) {
        error = e;
      }
      expect(error).toBeInstanceOf(UnpackError);
      expect((error as UnpackError).entry?.path).toBe('usr/lib/big.bin');
      const told = explainUnpackFailure(error, '/root.tar on /dev/sda1', 128 << 10, '128k', '/root') as Error;
      expect(told.message).toMatch(/tmpfs root is full \(128 KiB, rd\.tmpfs\.size=128k\).*"usr\/lib\/big\.bin".*Allow more with rd\.tmpfs\.size=.*left in \/root/s);
    } finally {
      spawnSync('umount', [small]);
    }
  });

});
