/**
 * The aarch64 static host (build/init-aarch64: Debian's cross compiler against musl for
 * arm64, init/Makefile ARCH=aarch64), run on this machine by qemu-aarch64-static: the same
 * checks as native.test.ts's, built for both architectures from one bundle, must print the
 * same results (the x86-64 build is the oracle); the production binary is a static arm64
 * ELF whose bundle runs as far as its refusal to start outside process 1.
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
const bin = { x86_64: '', aarch64: '' };

beforeAll(async () => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-aarch64-'));
  const js = path.join(tmp, 'native.js');
  await build({
    entryPoints: [path.join(root, 'test/host/native-entry.ts')], outfile: js, bundle: true, platform: 'neutral',
    format: 'esm', target: 'es2022', external: ['sys'], minifySyntax: true, legalComments: 'none', logLevel: 'warning',
  });
  for (const arch of ['x86_64', 'aarch64'] as const) {
    bin[arch] = path.join(tmp, `native-${arch}`);
    execFileSync('make', ['-s', '-j2', '-C', path.join(root, 'init'), `ARCH=${arch}`, `ENTRY=${js}`, `OUT=${bin[arch]}`], { stdio: ['ignore', 'pipe', 'inherit'] });
  }
}, 600_000);
afterAll(() => {
  if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
});

function run(arch: 'x86_64' | 'aarch64', file: string, ...args: string[]) {
  const [cmd, argv] = arch === 'aarch64' ? ['qemu-aarch64-static', [file, ...args]] : [file, args];
  const r = spawnSync(cmd, argv, { encoding: 'utf8', env: { VDBOOT_TEST: 'yes', PATH: '/usr/bin:/bin' }, timeout: 60_000 });
  if (r.error) throw r.error;
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** ELF header: class, data, machine, and whether it has a PT_INTERP (a dynamic loader). */
function elfFacts(file: string): { class64: boolean; littleEndian: boolean; machine: number; interp: boolean } {
  const b = fs.readFileSync(file);
  expect(b.subarray(0, 4).toString('latin1')).toBe('\x7fELF');
  const phoff = Number(b.readBigUInt64LE(0x20));
  const phentsize = b.readUInt16LE(0x36);
  let interp = false;
  for (let i = 0; i < b.readUInt16LE(0x38); i++) if (b.readUInt32LE(phoff + i * phentsize) === 3) interp = true;
  return { class64: b[4] === 2, littleEndian: b[5] === 1, machine: b.readUInt16LE(0x12), interp };
}

describe('aarch64 static host under qemu-aarch64-static', () => {
  test('the same checks print the same results on aarch64 as on x86-64', () => {
    expect(elfFacts(bin.aarch64)).toEqual({ class64: true, littleEndian: true, machine: 183 /* EM_AARCH64 */, interp: false });
    const results = (['x86_64', 'aarch64'] as const).map((arch) => {
      const r = run(arch, bin[arch], 'checks', 'with space');
      const line = /NATIVE-RESULT (.*)/.exec(r.stdout);
      expect(line, `${arch}: ${r.stdout}${r.stderr}`).not.toBeNull();
      expect(r.status).toBe(0);
      return JSON.parse(line![1]!) as Record<string, unknown>;
    });
    const [x86, arm] = results as [Record<string, unknown>, Record<string, unknown>];
    expect(arm.argv).toEqual([bin.aarch64, 'checks', 'with space']);
    // kexec_file_load on a closed fd: EBADF from a kernel, ENOSYS from qemu-user (no such call)
    expect(arm.kexecBadFd).toMatch(/^SysError (EBADF 9|EPERM 1|ENOSYS 38) kexec_file_load fd 9999$/);
    for (const v of [x86, arm]) {
      delete v.argv;
      delete v.kexecBadFd;
    }
    expect(Object.keys(arm).length).toBeGreaterThan(15);
    expect(arm).toEqual(x86);
  });

  test('exit status and an uncaught exception with its stack, as on x86-64', () => {
    expect(run('aarch64', bin.aarch64, 'exit3').status).toBe(3);
    const r = run('aarch64', bin.aarch64, 'throw');
    expect(r.status).toBe(1);
    expect(r.stderr).toContain('vdboot: the init script failed: TypeError: thrown by the native test');
    expect(r.stderr).toMatch(/at nested \(init\.js:\d+/);
  });

  test('build/init-aarch64 (the shipped one) is a static arm64 ELF whose bundle runs and refuses to start outside PID 1', () => {
    const shipped = path.join(root, 'build', 'init-aarch64');
    expect(fs.existsSync(shipped), 'build/init-aarch64 is missing: npm run build makes it (gcc-aarch64-linux-gnu, scripts/fetch-musl-arm64.sh)').toBe(true);
    expect(elfFacts(shipped)).toEqual({ class64: true, littleEndian: true, machine: 183, interp: false });
    const r = run('aarch64', shipped);
    expect(r.stderr).toContain('vdboot: this program is the init of an initramfs and runs only as process 1; it did nothing.');
    expect(r.status).toBe(2);
  });
});
