/**
 * The static host run directly on the build machine, as an ordinary process: argument
 * checks, buffers, errno names and how a script's end becomes an exit status. Also the
 * QuickJS source fetcher's checksum verification. (QEMU boots: host.test.ts.)
 */
import { build } from 'esbuild';
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';

const root = fileURLToPath(new URL('../..', import.meta.url));
let tmp = '';
let init = '';

beforeAll(async () => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-'));
  const js = path.join(tmp, 'native.js');
  await build({
    entryPoints: [path.join(root, 'test/host/native-entry.ts')], outfile: js, bundle: true, platform: 'neutral',
    format: 'esm', target: 'es2022', external: ['sys'], minifySyntax: true, legalComments: 'none', logLevel: 'warning',
  });
  init = path.join(tmp, 'native.init');
  execFileSync('make', ['-s', '-j2', '-C', path.join(root, 'init'), 'deps'], { stdio: ['ignore', 'pipe', 'inherit'] });
  execFileSync('make', ['-s', '-j2', '-C', path.join(root, 'init'), `ENTRY=${js}`, `OUT=${init}`], { stdio: ['ignore', 'pipe', 'inherit'] });
});
afterAll(() => {
  if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
});

function run(...args: string[]) {
  const r = spawnSync(init, args, { encoding: 'utf8', env: { VDBOOT_TEST: 'yes', PATH: '/usr/bin:/bin' }, timeout: 20_000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

describe('static host as an ordinary process', () => {
  test('arguments are checked, views are read in place, failures carry errno names', () => {
    const r = run('checks', 'with space');
    const line = /NATIVE-RESULT (.*)/.exec(r.stdout);
    expect(line, r.stdout + r.stderr).not.toBeNull();
    const v = JSON.parse(line![1]);
    expect(v.argv).toEqual([init, 'checks', 'with space']);
    expect(v.env).toEqual(['VDBOOT_TEST=yes']);
    expect([v.intoView, v.intoBuffer]).toEqual([3, 2]);
    expect(v.bytes).toEqual([7, 8, 0, 0, 0, 0, 0, 0, 2, 3, 4, 0, 0, 0, 0, 0]);
    expect(v.pathNotString).toBe('TypeError: sys.open: argument 1 must be a string');
    expect(v.pathWithNul).toBe('TypeError: sys.open: argument 1 contains a NUL character');
    expect(v.flagsNotNumber).toBe('TypeError: sys.open: argument 2 must be a number');
    expect(v.negativeOffset).toBe('RangeError: sys.pread: negative offset -1');
    expect(v.notBytes).toMatch(/^TypeError: sys.read: argument 2 must be an ArrayBuffer/);
    expect(v.badStdio).toBe('TypeError: sys.spawn: stdio must be an array of 3 fds');
    expect(v.argvNotStrings).toMatch(/^TypeError: sys.spawn: argument 2\[1\] must be a string/);
    expect(v.badPoll).toMatch(/^TypeError: sys.poll: entry 0 must be/);
    expect(v.utf8).toEqual(['hé\uFFFD!😀', '', 'bc']);
    expect(v.kexecCmdlineNotString).toBe('TypeError: sys.kexecFileLoad: argument 3 must be a string');
    // EBADF as root; EPERM without CAP_SYS_BOOT; ENOSYS under a seccomp filter
    expect(v.kexecBadFd).toMatch(/^SysError (EBADF 9|EPERM 1|ENOSYS 38) kexec_file_load fd 9999$/);
    expect(v.enotdir).toBe('SysError ENOTDIR 20 readdir /etc/passwd');
    expect(v.ebadf).toBe('SysError EBADF 9 close fd 9999');
    expect(v.closedPipeRead).toBe(0);
    expect(v.umask).toEqual([process.umask(), 0o077]);
    expect(r.status).toBe(0);
  });

  test('exit(3) outside PID 1 exits with status 3', () => {
    expect(run('exit3').status).toBe(3);
  });

  test('an uncaught exception outside PID 1 prints error and stack and exits 1, without a rescue shell', () => {
    const r = run('throw');
    expect(r.status).toBe(1);
    expect(r.stderr).toContain('vdboot: the init script failed: TypeError: thrown by the native test');
    expect(r.stderr).toMatch(/at nested \(init\.js:\d+/);
    expect(r.stderr).not.toContain('rescue');
  });

  test('a script waiting on a promise nothing can settle is reported instead of hanging', () => {
    const r = run('hang');
    expect(r.status).toBe(1);
    expect(r.stderr).toContain('waits on a promise that nothing can settle');
  });

  test('a script that returns outside PID 1 exits 0; a rejection handled a tick later is not reported', () => {
    const r = run('return');
    expect([r.status, r.stdout.trim(), r.stderr]).toEqual([0, 'returned normally after handled later', '']);
  });
});

describe('fetch-quickjs.sh', () => {
  const cache = path.join(root, '.cache/quickjs/download');

  test('refuses an orig tarball whose SHA-256 differs from the .dsc, and unpacks a good one', () => {
    const files = fs.readdirSync(cache).filter((f) => /^quickjs_.*\.(dsc|orig\.tar\.\w+)$/.test(f));
    expect(files.length, 'run init/fetch-quickjs.sh first').toBe(2);
    for (const variant of ['good', 'bad']) {
      const dir = path.join(tmp, `cache-${variant}`);
      fs.mkdirSync(path.join(dir, 'download'), { recursive: true });
      for (const f of files) fs.copyFileSync(path.join(cache, f), path.join(dir, 'download', f));
      if (variant === 'bad') {
        const orig = path.join(dir, 'download', files.find((f) => f.includes('.orig.'))!);
        const bytes = fs.readFileSync(orig);
        bytes[bytes.length >> 1] ^= 1;
        fs.writeFileSync(orig, bytes);
      }
      const r = spawnSync('bash', [path.join(root, 'init/fetch-quickjs.sh')], { encoding: 'utf8', env: { ...process.env, QUICKJS_CACHE: dir } });
      if (variant === 'good') {
        expect(r.status, r.stderr).toBe(0);
        expect(fs.existsSync(path.join(dir, 'src/quickjs.c'))).toBe(true);
        // Idempotent: a second run does nothing.
        const again = spawnSync('bash', [path.join(root, 'init/fetch-quickjs.sh')], { encoding: 'utf8', env: { ...process.env, QUICKJS_CACHE: dir } });
        expect([again.status, again.stdout, again.stderr]).toEqual([0, '', '']);
      } else {
        expect(r.status).not.toBe(0);
        expect(r.stderr).toMatch(/SHA-256 mismatch/);
        expect(fs.existsSync(path.join(dir, 'src'))).toBe(false);
      }
    }
  });
});
