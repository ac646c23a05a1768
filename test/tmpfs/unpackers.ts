/**
 * The two engines the unpacker's tests run on, behind one call: Node, with a Sys over the
 * build machine's filesystem (node-sys.ts), and QuickJS (quickjs-emscripten) running the
 * unpacker bundled as the init bundles it, against the fake kernel (src/sys/fake.ts). The
 * QuickJS run's result, the fake tree it made, is copied out into a real directory (types,
 * bytes, owners, modes, times, device numbers, hard links, extended attributes), so every
 * test checks both with the same oracle.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';
import { bytesSource, StreamCursor } from '../../src/formats/archive-stream.ts';
import { openArchive } from '../../src/formats/archive.ts';
import { unpackArchive, type UnpackStats } from '../../src/boot/unpack.ts';
import { FakeKernel, type FakeTree } from '../../src/sys/fake.ts';
import { O, S, SysError } from '../../src/sys/sys.ts';
import { runBundleInQuickJS } from '../boot/sim-harness.ts';
import { nodeUnpackSys } from './node-sys.ts';

export interface RunOptions {
  /** the Sys has umask (entries created with their final modes) */
  umask?: boolean;
  /** this call fails with this errno name */
  fail?: { call: string; code: string };
  /** real directories the fake kernel holds too (QuickJS): any change to them there (but in the unpack's own directory) is reported */
  mirror?: string[];
  /** names that must not exist after the unpack (QuickJS: reported when the fake kernel has them) */
  absent?: string[];
}

export interface UnpackRun {
  stats?: UnpackStats;
  /** what the unpacker threw */
  error?: { name?: string; message?: string; entry?: string; code?: string };
  /** mirrored names the unpack changed in the fake kernel (QuickJS); always empty on Node, whose changes the tests see themselves */
  mirrorChanges: string[];
}

export interface Unpacker {
  name: string;
  /** Unpacks the archive into the existing directory `out`. */
  run(bytes: Uint8Array, out: string, opts?: RunOptions): Promise<UnpackRun>;
}

const nodeUnpacker: Unpacker = {
  name: 'Node',
  run(bytes, out, opts = {}) {
    const base = nodeUnpackSys({ umask: opts.umask });
    const fail = opts.fail;
    const sys = fail ? new Proxy(base, { get: (t, k: string) => (k === fail.call ? () => { throw new SysError(fail.code, 0, fail.call); } : (t as unknown as Record<string, unknown>)[k]) }) : base;
    try {
      return Promise.resolve({ stats: unpackArchive(sys, openArchive(new StreamCursor(bytesSource(bytes, 4096)), 'archive'), out), mirrorChanges: [] });
    } catch (e) {
      const err = e as { name?: string; message?: string; entry?: { path: string }; reason?: { code?: string } };
      return Promise.resolve({ error: { name: err.name, message: err.message, entry: err.entry?.path, code: err.reason?.code }, mirrorChanges: [] });
    }
  },
};

let bundle: Promise<string> | undefined;

/** The QuickJS entry bundled once per test file, as the init is (ESM, `sys` external). */
function quickjsBundle(): Promise<string> {
  bundle ??= (async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-tmpfs-qjs-'));
    const file = path.join(dir, 'entry.js');
    await build({
      entryPoints: [fileURLToPath(new URL('./quickjs-entry.ts', import.meta.url))], outfile: file, bundle: true, platform: 'neutral',
      format: 'esm', target: 'es2022', external: ['sys'], minifySyntax: true, legalComments: 'none', logLevel: 'warning',
    });
    process.once('exit', () => fs.rmSync(dir, { recursive: true, force: true }));
    return file;
  })();
  return bundle;
}

/** A real directory as fake-tree entries at the same absolute path (files, links, directories; not device nodes or FIFOs). */
function mirrorTree(dir: string, into: FakeTree): void {
  const st = fs.lstatSync(dir);
  const key = dir.slice(1);
  if (st.isSymbolicLink()) into[key] = { symlink: fs.readlinkSync(dir) };
  else if (st.isFile()) into[key] = { bytes: new Uint8Array(fs.readFileSync(dir)) };
  else if (st.isDirectory()) {
    if (!(key in into)) into[key] = { dir: true };
    for (const n of fs.readdirSync(dir)) mirrorTree(path.join(dir, n), into);
  }
}

function readFake(kernel: FakeKernel, p: string, size: number): Uint8Array {
  const out = new Uint8Array(size);
  const fd = kernel.open(p, O.RDONLY);
  try {
    for (let at = 0; at < size;) {
      const n = kernel.pread(fd, out.subarray(at), at);
      if (n <= 0) break;
      at += n;
    }
  } finally {
    kernel.close(fd);
  }
  return out;
}

/** What differs between a real directory and the fake kernel's copy of it, `skip` left out. */
function mirrorChanges(kernel: FakeKernel, dir: string, skip: string): string[] {
  const changes: string[] = [];
  const walk = (p: string): void => {
    if (p === skip) return;
    const real = fs.lstatSync(p);
    if (!real.isSymbolicLink() && !real.isFile() && !real.isDirectory()) return; // not mirrored (device nodes, FIFOs)
    let fake;
    try {
      fake = kernel.lstat(p);
    } catch {
      changes.push(`${p}: gone`);
      return;
    }
    const type = fake.mode & S.IFMT;
    if (real.isSymbolicLink()) {
      if (type !== S.IFLNK || kernel.readlink(p) !== fs.readlinkSync(p)) changes.push(`${p}: the link changed`);
    } else if (real.isFile()) {
      if (type !== S.IFREG || !Buffer.from(readFake(kernel, p, fake.size)).equals(fs.readFileSync(p)) || fake.size !== real.size) changes.push(`${p}: its bytes changed`);
    } else if (real.isDirectory()) {
      if (type !== S.IFDIR) changes.push(`${p}: no longer a directory`);
      else {
        const names = new Set(fs.readdirSync(p));
        for (const n of kernel.readdir(p)) if (!names.has(n)) changes.push(`${p}/${n}: new`);
        for (const n of names) walk(path.join(p, n));
      }
    }
  };
  walk(dir);
  return changes;
}

/** Copies the fake tree at `from` into the real, existing directory `to`, with every attribute the tests compare. */
function materialize(kernel: FakeKernel, from: string, to: string): void {
  const inodes = new Map<number, string>();
  const walk = (fake: string, real: string, top: boolean): void => {
    const st = kernel.lstat(fake);
    const type = st.mode & S.IFMT;
    if (!top) {
      const first = type === S.IFDIR ? undefined : inodes.get(st.ino);
      if (first !== undefined) {
        fs.linkSync(first, real); // another name of an inode already made
        return;
      }
      if (type === S.IFDIR) fs.mkdirSync(real);
      else if (type === S.IFREG) fs.writeFileSync(real, readFake(kernel, fake, st.size));
      else if (type === S.IFLNK) fs.symlinkSync(kernel.readlink(fake), real);
      else {
        const kind = type === S.IFCHR ? 'c' : type === S.IFBLK ? 'b' : 'p';
        execFileSync('mknod', [real, kind, ...(kind === 'p' ? [] : [String(st.rdevMajor), String(st.rdevMinor)])]);
      }
      inodes.set(st.ino, real);
    }
    fs.lchownSync(real, st.uid, st.gid);
    if (type !== S.IFLNK) fs.chmodSync(real, st.mode & 0o7777);
    for (const [name, value] of kernel.xattrsOf(fake)) execFileSync('setfattr', ['-h', '-n', name, '-v', `0x${Buffer.from(value).toString('hex')}`, real]);
    if (type === S.IFDIR) for (const n of kernel.readdir(fake)) walk(`${fake}/${n}`, path.join(real, n), false);
    const t = kernel.mtimeOf(fake);
    fs.lutimesSync(real, t.sec + t.nsec / 1e9, t.sec + t.nsec / 1e9);
  };
  walk(from, to, true);
}

const quickjsUnpacker: Unpacker = {
  name: 'QuickJS, fake kernel',
  async run(bytes, out, opts = {}) {
    const archive = '/archive.tar';
    const initramfs: FakeTree = {};
    for (const d of opts.mirror ?? []) mirrorTree(d, initramfs);
    initramfs[archive.slice(1)] = { bytes };
    initramfs[out.slice(1)] = { dir: true };
    const json = JSON.stringify({ umask: opts.umask, fail: opts.fail });
    const sim = await runBundleInQuickJS({ cmdline: '', argv: ['/init', archive, out, json], disks: [], initramfs }, await quickjsBundle());
    if (sim.escaped) throw new Error(`the QuickJS run failed: ${sim.escaped}`);
    const line = /TMPFS-QJS (.*)/.exec(sim.kernel.consoleText);
    if (!line) throw new Error(`the QuickJS run printed no result: ${sim.kernel.consoleText}`);
    const result = JSON.parse(line[1]!) as UnpackRun;
    // The fake tree is what the run left: it replaces whatever the real directory held (what was mirrored into it).
    for (const n of fs.readdirSync(out)) fs.rmSync(path.join(out, n), { recursive: true, force: true });
    materialize(sim.kernel, out, out);
    const present = (opts.absent ?? []).filter((p) => {
      try {
        sim.kernel.lstat(p);
        return true;
      } catch {
        return false;
      }
    });
    return { ...result, mirrorChanges: [...(opts.mirror ?? []).flatMap((d) => mirrorChanges(sim.kernel, d, out)), ...present.map((p) => `${p}: made`)] };
  },
};

export const UNPACKERS: Unpacker[] = [nodeUnpacker, quickjsUnpacker];
