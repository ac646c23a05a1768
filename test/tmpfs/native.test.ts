/**
 * The static host's utimensat and lsetxattr (what a tmpfs root needs to keep times and
 * file capabilities), and the *at calls root archives are unpacked with (openat2 refusing
 * a symbolic link and "..", entries made from a directory descriptor), run directly on the
 * build machine as an ordinary process.
 */
import { build } from 'esbuild';
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, expect, test } from 'vitest';
import { buildTree, describeTree } from './helpers.ts';

const root = fileURLToPath(new URL('../..', import.meta.url));
let tmp = '';
let init = '';

beforeAll(async () => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-tmpfs-native-'));
  const js = path.join(tmp, 'entry.js');
  await build({
    entryPoints: [path.join(root, 'test/tmpfs/native-entry.ts')], outfile: js, bundle: true, platform: 'neutral',
    format: 'esm', target: 'es2022', external: ['sys'], minifySyntax: true, legalComments: 'none', logLevel: 'warning',
  });
  init = path.join(tmp, 'native.init');
  execFileSync('make', ['-s', '-j2', '-C', path.join(root, 'init'), 'deps'], { stdio: ['ignore', 'pipe', 'inherit'] });
  execFileSync('make', ['-s', '-j2', '-C', path.join(root, 'init'), `ENTRY=${js}`, `OUT=${init}`], { stdio: ['ignore', 'pipe', 'inherit'] });
}, 300_000);
afterAll(() => {
  if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
});

test('utimensat sets a file\'s time to the nanosecond and a symlink\'s own time; lsetxattr sets binary values and security.capability; openat2 refuses a link and "..", the *at calls make every kind of entry from a directory descriptor', () => {
  const file = path.join(tmp, 'file');
  const link = path.join(tmp, 'link');
  fs.writeFileSync(file, 'x');
  fs.symlinkSync('file', link);
  const dir = path.join(tmp, 'at');
  const outside = path.join(tmp, 'outside');
  fs.mkdirSync(path.join(dir, 'sub'), { recursive: true });
  fs.mkdirSync(outside);
  fs.symlinkSync(outside, path.join(dir, 'out'));
  const r = spawnSync(init, [file, link, dir], { encoding: 'utf8', timeout: 20_000 });
  const m = /TMPFS-NATIVE (.*)/.exec(r.stdout);
  expect(m, r.stdout + r.stderr).not.toBeNull();
  const v = JSON.parse(m![1]!);
  expect(v).toMatchObject({ fileTime: 'ok', linkTime: 'ok', xattr: 'ok', capability: 'ok', missing: 'SysError ENOENT' });
  expect(v.badNsec).toMatch(/^RangeError/);
  const st = fs.lstatSync(file, { bigint: true });
  expect(st.mtimeNs).toBe(1_600_000_000_123_456_789n);
  expect(fs.lstatSync(link).mtimeMs).toBe(1_500_000_000_000);
  expect(fs.statSync(link, { bigint: true }).mtimeNs).toBe(1_600_000_000_123_456_789n); // the target kept its own time
  const attrs = execFileSync('getfattr', ['--absolute-names', '-d', '-m', '-', '-e', 'hex', file], { encoding: 'utf8' });
  expect(attrs).toContain('user.vdboot=0x686900ff');
  expect(execFileSync('getcap', [file], { encoding: 'utf8' })).toMatch(/cap_net_raw[=+]ep/);
  // the *at calls: openat2 follows no link and no ".."; entries made by name from a directory descriptor
  expect(v.throughLink).toBe('SysError ELOOP');
  expect(v.dotDot).toBe('SysError EXDEV');
  expect(v.exclusive).toBe('SysError EEXIST');
  expect(v.directoryOnFile).toBe('SysError ENOTDIR');
  expect(v.noFollow).toBe('SysError ELOOP');
  expect(v.make).toMatchObject({ nlink: 2, uid: 1000, linkType: 0o120000 });
  const sub = path.join(dir, 'sub');
  expect(fs.readdirSync(sub).sort()).toEqual(['d', 'f', 'h', 'l', 'p']);
  expect(fs.readdirSync(outside)).toEqual([]);
  const f = fs.lstatSync(path.join(sub, 'f'), { bigint: true });
  expect([Number(f.mode & 0o7777n), f.uid, f.gid, f.mtimeNs, f.nlink]).toEqual([0o4750, 1000n, 100n, 1_600_000_000_000_000_007n, 2n]);
  expect(fs.readFileSync(path.join(sub, 'h'), 'utf8')).toBe('ab');
  const l = fs.lstatSync(path.join(sub, 'l'), { bigint: true });
  expect([fs.readlinkSync(path.join(sub, 'l')), l.uid, l.gid, l.mtimeNs]).toEqual(['f', 1001n, 101n, 1_500_000_000_000_000_005n]);
  expect(fs.lstatSync(path.join(sub, 'p')).isFIFO()).toBe(true);
  // byteSum (tar header checksums): the bytes of the view only, as unsigned numbers
  const block = Array.from({ length: 600 }, (_, i) => (i * 7 + 3) & 255);
  expect(v.byteSum).toEqual([block.reduce((a, b) => a + b, 0), block.slice(88).reduce((a, b) => a + b, 0), 512 * 255]);
  expect(fs.lstatSync(path.join(sub, 'd')).mode & 0o777).toBe(0o750 & ~process.umask());
});

const qemuUser = '/usr/bin/qemu-aarch64-static';

test.skipIf(!fs.existsSync(qemuUser))('the arm64 host (qemu-aarch64-static, which has no openat2: the unpacker walks each directory itself) unpacks a GNU tar archive into the tree GNU tar made it from', async () => {
  // the unpacker's QuickJS test entry, built into the arm64 host
  const js = path.join(tmp, 'unpack-entry.js');
  await build({
    entryPoints: [path.join(root, 'test/tmpfs/quickjs-entry.ts')], outfile: js, bundle: true, platform: 'neutral',
    format: 'esm', target: 'es2022', external: ['sys'], minifySyntax: true, legalComments: 'none', logLevel: 'warning',
  });
  const arm = path.join(tmp, 'unpack-arm64.init');
  execFileSync('make', ['-s', '-j2', '-C', path.join(root, 'init'), 'ARCH=aarch64', `ENTRY=${js}`, `OUT=${arm}`], { stdio: ['ignore', 'pipe', 'inherit'] });
  // the open flags whose numbers differ on arm64 (sys.ts's O has x86-64's): O_DIRECTORY refuses a file, O_NOFOLLOW a link
  const calls = path.join(tmp, 'native-arm64.init');
  execFileSync('make', ['-s', '-j2', '-C', path.join(root, 'init'), 'ARCH=aarch64', `ENTRY=${path.join(tmp, 'entry.js')}`, `OUT=${calls}`], { stdio: ['ignore', 'pipe', 'inherit'] });
  const at = path.join(tmp, 'at-arm64');
  fs.mkdirSync(path.join(at, 'sub'), { recursive: true });
  fs.writeFileSync(path.join(tmp, 'arm-file'), 'x');
  fs.symlinkSync('arm-file', path.join(tmp, 'arm-link'));
  const c = spawnSync(qemuUser, [calls, path.join(tmp, 'arm-file'), path.join(tmp, 'arm-link'), at], { encoding: 'utf8', timeout: 60_000 });
  const flags = JSON.parse(/TMPFS-NATIVE (.*)/.exec(c.stdout)?.[1] ?? '{}');
  expect([flags.directoryOnFile, flags.noFollow], c.stdout + c.stderr).toEqual(['SysError ENOTDIR', 'SysError ELOOP']);
  const tree = path.join(tmp, 'tree');
  buildTree(tree);
  // a link the archive makes, then a member through it: refused on this path too
  fs.symlinkSync(tmp, path.join(tree, 'escape'));
  const archive = path.join(tmp, 'root.tar');
  execFileSync('tar', ['--format=pax', '-C', tree, '-cf', archive, '.']);
  const through = path.join(tmp, 'through.tar');
  fs.mkdirSync(path.join(tmp, 'bad'));
  fs.writeFileSync(path.join(tmp, 'bad/victim.txt'), 'PWNED');
  fs.writeFileSync(path.join(tmp, 'victim.txt'), 'mine');
  execFileSync('tar', ['-C', path.join(tmp, 'bad'), '-cf', through, '--transform=s,^,escape/,', 'victim.txt']);
  // append the member under the link to the archive
  const joined = path.join(tmp, 'joined.tar');
  const a = fs.readFileSync(archive);
  let end = a.length;
  while (end >= 512 && a.subarray(end - 512, end).every((x) => x === 0)) end -= 512;
  fs.writeFileSync(joined, Buffer.concat([a.subarray(0, end), fs.readFileSync(through)]));
  const out = path.join(tmp, 'out-arm64');
  fs.mkdirSync(out);
  const r = spawnSync(qemuUser, [arm, joined, out, JSON.stringify({ umask: true })], { encoding: 'utf8', timeout: 120_000 });
  const m = /TMPFS-QJS (.*)/.exec(r.stdout);
  expect(m, r.stdout + r.stderr).not.toBeNull();
  const result = JSON.parse(m![1]!);
  expect(result.error).toBeUndefined();
  expect(result.stats.refused.byReason).toEqual({ outside: 0, symlink: 1, hardlink: 0, root: 0 });
  expect(fs.readFileSync(path.join(tmp, 'victim.txt'), 'utf8')).toBe('mine');
  const want = describeTree(tree);
  const got = describeTree(out);
  expect([...got.keys()].sort()).toEqual([...want.keys()].sort());
  for (const [p, w] of want) {
    const { ino: _a, ...wRest } = w;
    const { ino: _b, ...gRest } = got.get(p)!;
    expect(gRest, p).toEqual(wRest);
  }
}, 300_000);
