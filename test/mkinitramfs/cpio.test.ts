import { describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { comparePaths, cpioLayout, readCpio, writeCpio, S_IFMT, S_IFCHR, S_IFBLK, type CpioInput } from '../../src/formats/cpio.ts';

function tmpdir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-cpio-'));
}

const bytes = (s: string) => new TextEncoder().encode(s);

/** A varied tree, deliberately given out of order and without some parent directories. */
function sampleInputs(): CpioInput[] {
  const big = new Uint8Array(70_001);
  for (let i = 0; i < big.length; i++) big[i] = (i * 2654435761) >>> 24;
  return [
    { type: 'file', path: 'usr/lib/big.bin', data: big, mode: 0o600 },
    { type: 'symlink', path: 'bin/sh', target: 'busybox' },
    { type: 'file', path: '/bin/busybox', data: bytes('#!fake busybox\n'), mode: 0o755 },
    { type: 'dir', path: 'tmp', mode: 0o1777 },
    { type: 'char', path: 'dev/console', major: 5, minor: 1, mode: 0o600 },
    { type: 'block', path: 'dev/loop7', major: 7, minor: 7, mode: 0o660 },
    { type: 'fifo', path: 'run/fifo', mode: 0o644 },
    { type: 'file', path: 'etc/a-b', data: bytes('dash name sorts after dir "etc/a"\n') },
    { type: 'file', path: 'etc/a/inner', data: bytes('x') },
    { type: 'file', path: 'etc/empty', data: new Uint8Array(0) },
    { type: 'file', path: 'etc/odd', data: bytes('123') },
    { type: 'hardlink', path: 'etc/odd-link', target: 'etc/odd' },
    { type: 'symlink', path: 'lib', target: 'usr/lib' },
    { type: 'file', path: 'etc/ünïcode', data: bytes('names are UTF-8') },
  ];
}

function cpioList(archive: string, verbose = false): string[] {
  return execFileSync('cpio', [verbose ? '-itv' : '-it', '--quiet', `--file=${archive}`], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }).split('\n').filter(Boolean);
}

describe('newc cpio writer', () => {
  it('GNU cpio lists every entry, parents before children, missing parents added', () => {
    const dir = tmpdir();
    const archive = path.join(dir, 'a.cpio');
    fs.writeFileSync(archive, writeCpio(sampleInputs()));
    const names = cpioList(archive);
    for (const p of ['usr', 'usr/lib', 'usr/lib/big.bin', 'bin', 'bin/sh', 'bin/busybox', 'tmp', 'dev', 'dev/console', 'dev/loop7', 'run/fifo', 'etc', 'etc/a', 'etc/a/inner', 'etc/a-b', 'etc/odd', 'etc/odd-link', 'lib', 'etc/ünïcode']) {
      expect(names, p).toContain(p);
    }
    expect(new Set(names).size).toBe(names.length);
    for (const [i, n] of names.entries()) {
      const parent = n.includes('/') ? n.slice(0, n.lastIndexOf('/')) : '';
      if (parent) expect(names.indexOf(parent), `${parent} before ${n}`).toBeGreaterThanOrEqual(0);
      if (parent) expect(names.indexOf(parent)).toBeLessThan(i);
    }
    expect([...names].sort(comparePaths)).toEqual(names);
  });

  it('extraction by GNU cpio reproduces contents, modes, symlinks, hard links and the given mtime', () => {
    const dir = tmpdir();
    const archive = path.join(dir, 'a.cpio');
    const epoch = 1_700_000_000;
    fs.writeFileSync(archive, writeCpio(sampleInputs(), { mtime: epoch }));
    const out = path.join(dir, 'out');
    fs.mkdirSync(out);
    // device nodes and fifos are checked from the listing below, not created here
    execFileSync('cpio', ['-i', '-d', '-m', '--quiet', '--no-absolute-filenames', '--nonmatching', `--file=${archive}`, 'dev/*', 'run/fifo'], { cwd: out, stdio: ['ignore', 'pipe', 'pipe'] });
    for (const input of sampleInputs()) {
      const p = path.join(out, input.path);
      if (input.type === 'file') {
        expect(new Uint8Array(fs.readFileSync(p)), input.path).toEqual(input.data);
        expect(fs.statSync(p).mode & 0o7777, input.path).toBe(input.mode ?? 0o644);
        expect(fs.statSync(p).mtimeMs / 1000, input.path).toBe(epoch);
      } else if (input.type === 'symlink') {
        expect(fs.readlinkSync(p)).toBe(input.target);
      } else if (input.type === 'hardlink') {
        const a = fs.statSync(p);
        const b = fs.statSync(path.join(out, input.target));
        expect(a.ino).toBe(b.ino);
        expect(a.nlink).toBe(2);
        expect(fs.readFileSync(p, 'utf8')).toBe('123');
      } else if (input.type === 'dir') {
        expect(fs.statSync(p).isDirectory()).toBe(true);
        expect(fs.statSync(p).mode & 0o7777).toBe(input.mode);
      }
    }
    const verbose = cpioList(archive, true);
    const line = (name: string) => verbose.find((l) => l.endsWith(` ${name}`)) ?? '';
    expect(line('dev/console')).toMatch(/^crw------- +1 root +root +5, +1 /);
    expect(line('dev/loop7')).toMatch(/^brw-rw---- +1 root +root +7, +7 /);
    expect(line('run/fifo')).toMatch(/^prw-r--r-- /);
  });

  it('the same entries in any order give byte-identical archives', () => {
    const a = writeCpio(sampleInputs(), { mtime: 42 });
    const b = writeCpio([...sampleInputs()].reverse(), { mtime: 42 });
    expect(Buffer.from(b).equals(Buffer.from(a))).toBe(true);
    const c = writeCpio(sampleInputs(), { mtime: 43 });
    expect(Buffer.from(c).equals(Buffer.from(a))).toBe(false);
  });

  it('inode numbers count up in output order and hard links share one', () => {
    const entries = readCpio(writeCpio(sampleInputs()));
    const inos = entries.map((e) => e.ino);
    const odd = entries.find((e) => e.name === 'etc/odd')!;
    const link = entries.find((e) => e.name === 'etc/odd-link')!;
    expect(link.ino).toBe(odd.ino);
    expect(odd.nlink).toBe(2);
    // only the last name of a link group carries the data
    expect(odd.data.length + link.data.length).toBe(3);
    const distinct = [...new Set(inos)];
    expect(distinct).toEqual(Array.from({ length: distinct.length }, (_, i) => i + 1));
  });

  it('the reader parses an archive made by GNU cpio', () => {
    const dir = tmpdir();
    const src = path.join(dir, 'src');
    fs.mkdirSync(path.join(src, 'd/e'), { recursive: true });
    fs.writeFileSync(path.join(src, 'd/e/f.txt'), 'hello from GNU cpio\n');
    fs.writeFileSync(path.join(src, 'three'), 'abc');
    fs.symlinkSync('three', path.join(src, 'link'));
    const archive = execFileSync('cpio', ['-o', '-H', 'newc', '--quiet'], { cwd: src, input: 'd\nd/e\nd/e/f.txt\nthree\nlink\n' });
    const entries = readCpio(new Uint8Array(archive));
    expect(entries.map((e) => e.name)).toEqual(['d', 'd/e', 'd/e/f.txt', 'three', 'link']);
    expect(new TextDecoder().decode(entries[2].data)).toBe('hello from GNU cpio\n');
    expect(new TextDecoder().decode(entries[4].data)).toBe('three');
    expect(entries[4].mode & S_IFMT).toBe(0o120000);
    expect(entries[2].mtime).toBe(Math.floor(fs.statSync(path.join(src, 'd/e/f.txt')).mtimeMs / 1000));
  });

  it('the reader reads device numbers and concatenated archives', () => {
    const first = writeCpio([{ type: 'char', path: 'dev/null', major: 1, minor: 3, mode: 0o666 }]);
    const second = writeCpio([{ type: 'block', path: 'dev/sda', major: 8, minor: 0 }]);
    const joined = new Uint8Array(first.length + 512 + second.length);
    joined.set(first);
    joined.set(second, first.length + 512);
    const entries = readCpio(joined);
    expect(entries.map((e) => [e.name, e.mode & S_IFMT, e.rdevMajor, e.rdevMinor])).toEqual([
      ['dev', 0o040000, 0, 0],
      ['dev/null', S_IFCHR, 1, 3],
      ['dev', 0o040000, 0, 0],
      ['dev/sda', S_IFBLK, 8, 0],
    ]);
  });

  it('a truncated or foreign archive gives a message naming the problem', () => {
    const a = writeCpio(sampleInputs());
    expect(() => readCpio(a.subarray(0, 1000))).toThrow(/past the end|truncated/);
    const gz = execFileSync('gzip', ['-c'], { input: a });
    expect(() => readCpio(new Uint8Array(gz))).toThrow(/not the newc "070701"/);
    expect(() => writeCpio([{ type: 'file', path: '../escape', data: new Uint8Array(1) }])).toThrow(/"\.\."/);
    expect(() => writeCpio([{ type: 'file', path: 'a', data: new Uint8Array(1) }, { type: 'file', path: 'a/b', data: new Uint8Array(1) }])).toThrow(/not a directory/);
    expect(() => writeCpio([{ type: 'hardlink', path: 'x', target: 'nothing' }])).toThrow(/not a regular file/);
  });

  it('cpioLayout with external bodies: filled in by the caller, the same bytes as writeCpio, and GNU cpio extracts them', () => {
    // Every regular file's body left to the caller (sizes 0..70001, odd and even, one in a
    // hard-link group); the bodies come from a map keyed by the source name.
    const bodies = new Map<string, Uint8Array>();
    const inputs: CpioInput[] = sampleInputs().map((i) => {
      if (i.type !== 'file') return i;
      bodies.set(`src:${i.path}`, i.data);
      return { type: 'external', path: i.path, source: `src:${i.path}`, size: i.data.length, ...(i.mode === undefined ? {} : { mode: i.mode }) };
    });
    inputs.push({ type: 'file', path: 'etc/in-memory', data: bytes('kept in memory between two external bodies') });
    const pieces = cpioLayout(inputs, { mtime: 1_700_000_000 });
    const external = pieces.filter((p) => !(p instanceof Uint8Array));
    // the hard-linked file's body once, like writeCpio
    expect(external.map((p) => (p as { source: string }).source).sort()).toEqual([...bodies.keys()].sort());
    const parts = pieces.map((p) => (p instanceof Uint8Array ? p : bodies.get(p.source)!));
    const joined = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of parts) { joined.set(p, at); at += p.length; }
    const inMemory = sampleInputs();
    inMemory.push({ type: 'file', path: 'etc/in-memory', data: bytes('kept in memory between two external bodies') });
    expect(Buffer.from(joined).equals(Buffer.from(writeCpio(inMemory, { mtime: 1_700_000_000 })))).toBe(true);

    const dir = tmpdir();
    try {
      fs.writeFileSync(path.join(dir, 'a.cpio'), joined);
      fs.mkdirSync(path.join(dir, 'x'));
      execFileSync('cpio', ['-idm', '--quiet', '--no-absolute-filenames', `--file=${path.join(dir, 'a.cpio')}`], { cwd: path.join(dir, 'x'), stdio: 'pipe' });
      for (const [source, data] of bodies) expect(Buffer.from(fs.readFileSync(path.join(dir, 'x', source.slice(4).replace(/^\//, '')))).equals(Buffer.from(data)), source).toBe(true);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
    // header fields up to 2^32-1 (past int32) written digit by digit
    expect(readCpio(writeCpio([{ type: 'file', path: 'a', data: bytes('x') }], { mtime: 0xfffffffe }))[0]!.mtime).toBe(0xfffffffe);
    expect(() => writeCpio([{ type: 'external', path: 'a', source: 'a', size: 1 }])).toThrow(/external body/);
    expect(() => cpioLayout([{ type: 'external', path: 'a', source: 'a', size: -1 }])).toThrow(/-1 bytes/);
  });
});
