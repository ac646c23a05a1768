/**
 * The static host's utimensat and lsetxattr (what a tmpfs root needs to keep times and
 * file capabilities), run directly on the build machine as an ordinary process.
 */
import { build } from 'esbuild';
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, expect, test } from 'vitest';

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

test('utimensat sets a file\'s time to the nanosecond and a symlink\'s own time; lsetxattr sets binary values and security.capability', () => {
  const file = path.join(tmp, 'file');
  const link = path.join(tmp, 'link');
  fs.writeFileSync(file, 'x');
  fs.symlinkSync('file', link);
  const r = spawnSync(init, [file, link], { encoding: 'utf8', timeout: 20_000 });
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
});
