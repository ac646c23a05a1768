/**
 * Test trees and archives for root=tmpfs: a small root with every kind of entry vdboot
 * must carry (owners, setuid/setgid/sticky, hard links, symlinks, devices, a FIFO, a file
 * capability, long names), archived by real tools.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { type ArchiveEntry, type ArchiveReader, bytesSource, type ReaderOptions, StreamCursor } from '../../src/formats/archive-stream.ts';
import { openArchive } from '../../src/formats/archive.ts';

export const LONG_DIR = `deep/${'a'.repeat(60)}/${'b'.repeat(50)}`;
export const LONG_FILE = `${LONG_DIR}/${'c'.repeat(120)}.txt`;
export const LONG_TARGET = `../${'t'.repeat(70)}/${'u'.repeat(60)}`;
export const MTIME = 1_600_000_000;

export function have(tool: string): boolean {
  try {
    execFileSync('sh', ['-c', `command -v ${tool}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/** Root-owned test tree (the tests run as root, like vdboot's build machine); returns its file list. */
export function buildTree(dir: string, opts: { capability?: boolean; bigBytes?: number } = {}): void {
  const p = (x: string): string => path.join(dir, x);
  for (const d of ['etc', 'bin', 'usr/bin', 'usr/lib', 'dev', 'run', 'tmp', 'home/user', LONG_DIR]) fs.mkdirSync(p(d), { recursive: true });
  fs.writeFileSync(p('etc/hostname'), 'tmpfs-guest\n');
  fs.writeFileSync(p('etc/empty'), '');
  fs.writeFileSync(p('home/user/notes'), 'mine\n');
  fs.chownSync(p('home/user'), 1000, 1000);
  fs.chownSync(p('home/user/notes'), 1000, 100);
  fs.chmodSync(p('home/user'), 0o700);
  fs.chmodSync(p('home/user/notes'), 0o640);
  const big = new Uint8Array(opts.bigBytes ?? 300_000);
  let x = 12345;
  for (let i = 0; i < big.length; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    big[i] = x >>> 24;
  }
  fs.writeFileSync(p('usr/lib/big.bin'), big);
  fs.writeFileSync(p('bin/prog'), '#!/bin/sh\necho prog\n');
  fs.chmodSync(p('bin/prog'), 0o4755);
  fs.linkSync(p('bin/prog'), p('bin/prog-link'));
  fs.writeFileSync(p('usr/bin/sgid'), 'sgid\n');
  fs.chmodSync(p('usr/bin/sgid'), 0o2755);
  fs.chownSync(p('usr/bin/sgid'), 0, 42);
  fs.chmodSync(p('usr/bin/sgid'), 0o2755);
  fs.chmodSync(p('tmp'), 0o1777);
  fs.symlinkSync('usr/lib', p('lib'));
  fs.symlinkSync(LONG_TARGET, p('usr/bin/longlink'));
  execFileSync('mknod', [p('dev/null'), 'c', '1', '3']);
  execFileSync('mknod', [p('dev/sda'), 'b', '8', '0']);
  execFileSync('mkfifo', [p('run/fifo')]);
  fs.writeFileSync(p(LONG_FILE), 'long name\n');
  fs.writeFileSync(p('etc/Grüße.txt'), 'unicode\n');
  fs.writeFileSync(p('bin/ping'), 'not really ping\n');
  fs.chmodSync(p('bin/ping'), 0o755);
  if (opts.capability) execFileSync('setcap', ['cap_net_raw+ep', p('bin/ping')]);
  // Times last, children before parents.
  const all = execFileSync('find', [dir, '-depth'], { encoding: 'utf8' }).split('\n').filter(Boolean);
  for (const f of all) execFileSync('touch', ['-h', '-d', `@${MTIME}`, f]);
}

export interface TreeEntry {
  type: ArchiveEntry['type'];
  perm: number;
  uid: number;
  gid: number;
  mtime: number;
  size: number;
  sha?: string;
  target?: string;
  rdev?: [number, number];
  ino: number;
}

/** The oracle: the tree as lstat sees it, keyed by relative path. */
export function describeTree(dir: string): Map<string, TreeEntry> {
  const out = new Map<string, TreeEntry>();
  const walk = (rel: string): void => {
    const full = path.join(dir, rel);
    const st = fs.lstatSync(full);
    const kind = st.isDirectory() ? 'dir' : st.isSymbolicLink() ? 'symlink' : st.isFile() ? 'file' : st.isCharacterDevice() ? 'char' : st.isBlockDevice() ? 'block' : 'fifo';
    const e: TreeEntry = { type: kind, perm: st.mode & 0o7777, uid: st.uid, gid: st.gid, mtime: Math.floor(st.mtimeMs / 1000), size: kind === 'file' ? st.size : 0, ino: st.ino };
    if (kind === 'file') e.sha = createHash('sha256').update(fs.readFileSync(full)).digest('hex');
    if (kind === 'symlink') e.target = fs.readlinkSync(full);
    if (kind === 'char' || kind === 'block') e.rdev = [Math.floor(st.rdev / 256), st.rdev % 256];
    if (rel) out.set(rel, e);
    if (kind === 'dir') for (const n of fs.readdirSync(full)) walk(rel ? `${rel}/${n}` : n);
  };
  walk('');
  return out;
}

export interface ReadBack {
  entries: ArchiveEntry[];
  bodies: Map<string, string>;
  format: 'tar' | 'cpio';
}

/** Reads a whole archive through the streaming reader in chunks of `chunk` bytes. */
export function readArchiveBytes(bytes: Uint8Array, chunk = 777, opts: ReaderOptions = {}): ReadBack {
  const reader: ArchiveReader = openArchive(new StreamCursor(bytesSource(bytes, chunk)), 'test archive', opts);
  const entries: ArchiveEntry[] = [];
  const bodies = new Map<string, string>();
  for (let e = reader.next(); e; e = reader.next()) {
    entries.push(e);
    if (e.size > 0) {
      const h = createHash('sha256');
      for (let b = reader.body(4096); b.length; b = reader.body(4096)) h.update(b);
      bodies.set(e.path, h.digest('hex'));
    }
  }
  return { entries, bodies, format: reader.format };
}
