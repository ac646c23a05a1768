/**
 * Hostile root archives through vdboot's unpacker (the code that runs at boot) on the build
 * machine, as root, on both engines (unpackers.ts: Node over Node's fs, QuickJS against the
 * fake kernel holding a copy of the victim and the source tree): GNU tar and GNU cpio archives holding a symbolic link
 * to a directory outside the root followed by a file through it, ".." names, absolute
 * names, hard links out of the root and device nodes. Nothing outside the root changes
 * (the victim files keep their bytes and inodes), every refused entry is counted by
 * reason, and the rest of the archive is unpacked.
 */
import { execFileSync, execSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { bytesSource, StreamCursor } from '../../src/formats/archive-stream.ts';
import { openArchive } from '../../src/formats/archive.ts';
import { refusalSummary } from '../../src/boot/unpack.ts';
import { type UnpackRun, UNPACKERS } from './unpackers.ts';

let dir: string;
/** A directory outside every root, standing in for /dev: the archive's symlink points here. */
let victim: string;
/** Every file outside the roots, with its bytes and inode before the unpacks. */
let before: Map<string, string>;

/** Every name outside the roots that an escape could reach (the victim and the source tree): type, mode, inode, links, bytes. */
function snapshot(): Map<string, string> {
  const out = new Map<string, string>();
  for (const p of execFileSync('find', [victim, path.join(dir, 'src')], { encoding: 'utf8' }).split('\n').filter(Boolean)) {
    const st = fs.lstatSync(p);
    const body = st.isFile() ? createHash('sha256').update(fs.readFileSync(p)).digest('hex') : st.isSymbolicLink() ? fs.readlinkSync(p) : '';
    out.set(p, `${st.mode.toString(8)} ${st.ino} ${st.nlink} ${body}`);
  }
  return out;
}

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-hostile-'));
  victim = path.join(dir, 'fake-dev');
  fs.mkdirSync(victim);
  fs.writeFileSync(path.join(victim, 'vda'), 'THE HOST DISK\n');
  // The source tree: "data/dv" is a symlink to the victim directory, so "data/dv/vda" is
  // archived (tar and cpio lstat the name and follow its parent link) as a regular file
  // that comes after the link.
  const src = path.join(dir, 'src');
  fs.mkdirSync(path.join(src, 'data'), { recursive: true });
  fs.symlinkSync(victim, path.join(src, 'data/dv'));
  fs.writeFileSync(path.join(src, 'data/ok.txt'), 'kept\n');
  fs.writeFileSync(path.join(src, 'escape'), 'ESCAPED\n');
  fs.writeFileSync(path.join(src, 'abs'), 'absolute\n');
  fs.writeFileSync(path.join(src, 'h1'), 'linked\n');
  fs.linkSync(path.join(src, 'h1'), path.join(src, 'h2'));
  fs.writeFileSync(path.join(src, 'rootfile'), 'not a directory\n');
  execFileSync('mknod', [path.join(src, 'data/sda'), 'b', '8', '0']);
  execFileSync('mknod', [path.join(src, 'data/console'), 'c', '5', '1']);
  before = snapshot();
}, 60_000);
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

/** What an unpack must leave: the victim untouched, the good entries there, the bad ones nowhere. */
function expectContained(out: string, run: UnpackRun): void {
  expect(snapshot()).toEqual(before);
  expect(run.mirrorChanges).toEqual([]);
  expect(fs.readFileSync(path.join(out, 'data/ok.txt'), 'utf8')).toBe('kept\n');
  expect(fs.readlinkSync(path.join(out, 'data/dv'))).toBe(victim); // the link itself is kept: it is only a name in the root
  // device nodes are created as the archive says (a name inside the root, never written through)
  const sda = fs.lstatSync(path.join(out, 'data/sda'));
  expect([sda.isBlockDevice(), sda.rdev]).toEqual([true, 8 * 256]);
  expect(fs.lstatSync(path.join(out, 'data/console')).isCharacterDevice()).toBe(true);
  for (const bad of ['escape', 'h-out', 'h2']) {
    expect(fs.existsSync(path.join(dir, bad)), bad).toBe(false);
    expect(fs.existsSync(path.join(path.dirname(dir), bad)), bad).toBe(false);
  }
}

describe.each(UNPACKERS)('hostile archives ($name): nothing is written outside the root, and what was refused is counted', (u) => {
  /** Unpacks into a new directory; the QuickJS run's fake kernel holds the victim and the sources, and must not gain the escapes' names. */
  async function unpack(bytes: Uint8Array, name: string) {
    const out = path.join(dir, `out-${name}-${u.name.replace(/\W+/g, '-')}`);
    fs.mkdirSync(out);
    const escapes = ['escape', 'h-out', 'h2'].flatMap((bad) => [path.join(dir, bad), path.join(path.dirname(dir), bad)]);
    const run = await u.run(bytes, out, { umask: true, mirror: [victim, path.join(dir, 'src')], absent: escapes });
    return { out, run, stats: run.stats! };
  }

  it('GNU tar: symlink then a file through it, "..", an absolute name, hard links out, the root as a file, device nodes', async () => {
    const abs = path.join(dir, 'absolute-target');
    // --transform renames members (and hard-link targets) as they are stored; -P keeps "/" and "..".
    const bytes = new Uint8Array(execSync(
      'tar -P -cf - --transform="s,^escape$,../escape," --transform="s,^h1$,../../h-out," ' +
        `--transform="s,^abs$,${abs}," --transform="s,^rootfile$,.," data/ok.txt data/dv data/dv/vda data/sda data/console escape abs h1 h2 rootfile`,
      { cwd: path.join(dir, 'src'), maxBuffer: 16 << 20 },
    ));
    // The archive holds what this test is about (read back with GNU tar itself).
    const listing = execFileSync('tar', ['-tvPf', '-'], { input: bytes, encoding: 'utf8' });
    expect(listing).toMatch(/^l.* data\/dv -> /m);
    expect(listing).toMatch(/^-.* data\/dv\/vda$/m);
    expect(listing).toMatch(/ \.\.\/escape$/m);
    expect(listing).toMatch(/ h2 link to \.\.\/\.\.\/h-out$/m);
    expect(listing).toContain(` ${abs}\n`);
    const { out, run, stats } = await unpack(bytes, 'tar');
    expectContained(out, run);
    expect(stats.refused.byReason).toEqual({ outside: 3, symlink: 1, hardlink: 0, root: 1 });
    expect(refusalSummary(stats.refused)).toBe('5 entries refused (3 outside the root, 1 through a symbolic link, 1 replacing the root itself)');
    expect(stats.refused.examples.join('\n')).toMatch(/"data\/dv\/vda" \(file, header at byte \d+\): it lies under "data\/dv", which the archive made a symbolic link/);
    expect(stats.refused.examples.join('\n')).toMatch(/"h2" \(hardlink, header at byte \d+\): it is a hard link to "\.\.\/\.\.\/h-out"/);
    // the absolute name landed inside the root, as GNU tar extracts it
    expect(fs.readFileSync(path.join(out, abs), 'utf8')).toBe('absolute\n');
    expect(fs.statSync(out).isDirectory()).toBe(true);
  });

  it('GNU cpio newc: the same, with names given to cpio -o ("../", absolute, a hard-link pair whose first name leaves the root)', async () => {
    const src = path.join(dir, 'src');
    // cpio stores the names exactly as listed; "../src/…" leaves the root, "/…" is absolute.
    const names = ['data', 'data/ok.txt', 'data/dv', 'data/dv/vda', 'data/sda', 'data/console', '../src/escape', path.join(src, 'abs'), '../src/h1', 'h2'];
    const bytes = new Uint8Array(execSync('cpio --quiet -o -H newc', { cwd: src, input: names.join('\n') + '\n', maxBuffer: 16 << 20 }));
    const listing = execFileSync('cpio', ['--quiet', '-itv'], { input: bytes, encoding: 'utf8' });
    expect(listing).toMatch(/^l.* data\/dv -> /m);
    expect(listing).toMatch(/^-.* data\/dv\/vda$/m);
    expect(listing).toMatch(/ \.\.\/src\/h1$/m);
    const { out, run, stats } = await unpack(bytes, 'cpio');
    expectContained(out, run);
    // "../src/escape" and "../src/h1" leave the root; "h2" shares h1's inode (it carries the data), so it is a hard link to "../src/h1"
    expect(stats.refused.byReason).toEqual({ outside: 3, symlink: 1, hardlink: 0, root: 0 });
    expect(refusalSummary(stats.refused)).toBe('4 entries refused (3 outside the root, 1 through a symbolic link)');
    expect(fs.readFileSync(path.join(out, src, 'abs'), 'utf8')).toBe('absolute\n');
    expect(fs.existsSync(path.join(out, 'h2'))).toBe(false);
  });

  it('data on a hard link to a symbolic link the archive made is refused, and the link\'s target keeps its bytes', async () => {
    // tar cannot be made to write this: Python's tarfile crafts the archive.
    const tarFile = path.join(dir, 'out-hardlink-data.tar');
    execFileSync('python3', ['-c', `
import io, tarfile, sys
with tarfile.open(sys.argv[1], 'w', format=tarfile.GNU_FORMAT) as t:
    s = tarfile.TarInfo('disk'); s.type = tarfile.SYMTYPE; s.linkname = sys.argv[2]; t.addfile(s)
    h = tarfile.TarInfo('copy'); h.type = tarfile.LNKTYPE; h.linkname = 'disk'; data = b'PWNED'; h.size = len(data)
    t.addfile(h, io.BytesIO(data))
    d = tarfile.TarInfo('dirlink'); d.type = tarfile.LNKTYPE; d.linkname = 'nothing-before'; t.addfile(d)
    f = tarfile.TarInfo('after'); data = b'still unpacked'; f.size = len(data); t.addfile(f, io.BytesIO(data))
`, tarFile, path.join(victim, 'vda')]);
    const { out, run, stats } = await unpack(new Uint8Array(fs.readFileSync(tarFile)), 'hardlink-data');
    expect(run.mirrorChanges).toEqual([]);
    expect(snapshot()).toEqual(before);
    expect(stats.refused.byReason).toEqual({ outside: 0, symlink: 1, hardlink: 1, root: 0 });
    expect(stats.refused.examples.join('\n')).toMatch(/"copy" .*carries 5 bytes of data for a hard link to "disk", a symbolic link/);
    expect(stats.refused.examples.join('\n')).toMatch(/"dirlink" .*"nothing-before", which the archive did not hold before it/);
    expect(fs.readFileSync(path.join(out, 'after'), 'utf8')).toBe('still unpacked');
  });

  it('an archive with nothing hostile refuses nothing', async () => {
    const bytes = new Uint8Array(execSync('tar -cf - data/ok.txt h1 h2', { cwd: path.join(dir, 'src') }));
    const { out, stats } = await unpack(bytes, 'clean');
    expect(stats.refused.total).toBe(0);
    expect(refusalSummary(stats.refused)).toBe('');
    expect(fs.statSync(path.join(out, 'h1')).ino).toBe(fs.statSync(path.join(out, 'h2')).ino);
  });

  it('a symbolic link in the root that the archive did not make is not followed either: the kernel refuses the way through it', async () => {
    // data/ok.txt under "pre/", a link to the victim already in the root (so the unpacker's own list does not know it)
    const renamed = new Uint8Array(execSync('tar -cf - --transform="s,^data/ok.txt$,pre/ok.txt," data/ok.txt h1', { cwd: path.join(dir, 'src') }));
    const out = path.join(dir, `out-prelink-${u.name.replace(/\W+/g, '-')}`);
    fs.mkdirSync(out);
    fs.symlinkSync(victim, path.join(out, 'pre'));
    const run = await u.run(renamed, out, { umask: true, mirror: [victim, out] });
    expect(run.error).toBeUndefined();
    expect(run.stats!.refused.byReason).toEqual({ outside: 0, symlink: 1, hardlink: 0, root: 0 });
    expect(run.stats!.refused.examples[0]).toMatch(/"pre\/ok\.txt" \(file, header at byte 0\): the way to "pre" passes a symbolic link/);
    expect(snapshot()).toEqual(before);
    expect(run.mirrorChanges).toEqual([]);
    expect(fs.readFileSync(path.join(out, 'h1'), 'utf8')).toBe('linked\n');
  });

  it('an unpack error is still an UnpackError naming the entry (a refusal never hides a real failure)', async () => {
    const bytes = new Uint8Array(execSync('tar -cf - data/ok.txt', { cwd: path.join(dir, 'src') }));
    const out = path.join(dir, `out-readonly-${u.name.replace(/\W+/g, '-')}`);
    fs.mkdirSync(out);
    const run = await u.run(bytes, out, { fail: { call: 'openat', code: 'EROFS' } });
    expect(run.error).toMatchObject({ name: 'UnpackError', entry: 'data/ok.txt', code: 'EROFS' });
    expect(run.error!.message).toMatch(/could not create "data\/ok\.txt" \(file, header at byte \d+ of the archive\)/);
  });
});
