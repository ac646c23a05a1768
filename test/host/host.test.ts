/**
 * The static /init host booted for real: Debian's kernel under QEMU (TCG) runs a
 * self-test bundle as PID 1 (syscalls against the real kernel, compared here with
 * oracles computed on the host), and a bundle that throws, which must end in a rescue
 * shell answering commands typed on the serial console.
 */
import { build } from 'esbuild';
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, test } from 'vitest';

const root = fileURLToPath(new URL('../..', import.meta.url));
const here = path.join(root, 'test/host');
let tmp = '';

const vmlinuz = fs.readdirSync('/boot').filter((f) => /^vmlinuz-.*-amd64$/.test(f)).sort().pop();
if (!vmlinuz) throw new Error('no /boot/vmlinuz-*-amd64: install linux-image-amd64');
const kernelVersion = vmlinuz.slice('vmlinuz-'.length);
const kernel = path.join('/boot', vmlinuz);

/** Bundles an entry the way scripts/build.mjs bundles src/boot/main.ts. */
async function bundle(entry: string, out: string): Promise<void> {
  await build({
    entryPoints: [entry], outfile: out, bundle: true, platform: 'neutral', format: 'esm',
    target: 'es2022', external: ['sys'], minifySyntax: true, legalComments: 'none', logLevel: 'warning',
  });
}

/** Compiles a bundle into a static /init with init/Makefile; returns its path. */
async function makeInit(entry: string, name: string): Promise<string> {
  const js = path.join(tmp, `${name}.js`);
  const out = path.join(tmp, `${name}.init`);
  await bundle(entry, js);
  execFileSync('make', ['-s', '-j2', '-C', path.join(root, 'init'), `ENTRY=${js}`, `OUT=${out}`], { stdio: ['ignore', 'pipe', 'inherit'] });
  return out;
}

/** A newc initramfs: the init, busybox as /bin/sh, the given kernel modules in /modules. */
function makeInitramfs(name: string, init: string, opts: { modules?: string[]; console?: boolean | 'directory' }): string {
  const dir = path.join(tmp, `${name}.root`);
  for (const d of ['bin', 'dev', 'proc', 'sys', 'modules']) fs.mkdirSync(path.join(dir, d), { recursive: true });
  fs.copyFileSync(init, path.join(dir, 'init'));
  fs.chmodSync(path.join(dir, 'init'), 0o755);
  fs.copyFileSync('/bin/busybox', path.join(dir, 'bin/busybox'));
  fs.chmodSync(path.join(dir, 'bin/busybox'), 0o755);
  fs.symlinkSync('busybox', path.join(dir, 'bin/sh'));
  for (const m of opts.modules ?? []) {
    fs.copyFileSync(path.join(`/lib/modules/${kernelVersion}`, m), path.join(dir, 'modules', path.basename(m)));
  }
  if (opts.console === 'directory') fs.mkdirSync(path.join(dir, 'dev/console'));
  else if (opts.console) execFileSync('mknod', ['-m', '600', path.join(dir, 'dev/console'), 'c', '5', '1']);
  const out = path.join(tmp, `${name}.cpio`);
  execFileSync('sh', ['-c', `cd "${dir}" && find . | sort | cpio -o -H newc -R 0:0 --quiet > "${out}"`]);
  return out;
}

interface Boot {
  output: string;
  exitCode: number | null;
  timedOut: boolean;
}

/**
 * Boots kernel + initramfs; `script` gets each new chunk of console output and may type
 * on the serial console. Resolves when QEMU exits (power-off) or after timeoutMs.
 */
function boot(initrd: string, opts: { drive?: string; timeoutMs: number; script?: (output: string, type: (s: string) => void) => void }): Promise<Boot> {
  const args = ['-accel', 'tcg', '-m', '512', '-nographic', '-no-reboot', '-nic', 'none', '-kernel', kernel, '-initrd', initrd,
    '-append', 'console=ttyS0 panic=-1 quiet no_timer_check'];
  if (opts.drive) args.push('-drive', `file=${opts.drive},format=raw,if=virtio,readonly=on`);
  const qemu = spawn('qemu-system-x86_64', args, { stdio: ['pipe', 'pipe', 'pipe'] });
  let output = '';
  let timedOut = false;
  const timer = setTimeout(() => { timedOut = true; qemu.kill('SIGKILL'); }, opts.timeoutMs);
  const onData = (d: Buffer) => {
    output += d.toString('latin1');
    opts.script?.(output, (s) => qemu.stdin.write(s));
  };
  qemu.stdout.on('data', onData);
  qemu.stderr.on('data', onData);
  return new Promise((resolve, reject) => {
    qemu.on('error', reject);
    qemu.on('close', (code) => { clearTimeout(timer); resolve({ output, exitCode: code, timedOut }); });
  });
}

beforeAll(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-'));
  // QuickJS itself (minutes on a cold, busy machine) is built here, under the hook timeout.
  execFileSync('make', ['-s', '-j2', '-C', path.join(root, 'init'), 'deps'], { stdio: ['ignore', 'pipe', 'inherit'] });
});
afterAll(() => {
  if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
});

// The three boots run side by side: each is mostly waiting on its own QEMU.
describe.concurrent('static /init host under QEMU', () => {
  test('self-test bundle: syscalls, errno names, spawn, fork, uevents and a virtio disk behave as on Linux', async ({ expect }) => {
    const init = await makeInit(path.join(here, 'selftest-entry.ts'), 'selftest');
    // Static and stripped: no program interpreter, no dynamic section, no symbol table.
    const elf = execFileSync('readelf', ['--program-headers', '--section-headers', '--wide', init], { encoding: 'utf8' });
    expect(elf).toMatch(/\bLOAD\b/);
    expect(elf).not.toMatch(/\bINTERP\b|\bDYNAMIC\b|\.symtab/);

    const virtio = ['virtio_ring', 'virtio', 'virtio_pci_legacy_dev', 'virtio_pci_modern_dev', 'virtio_pci']
      .map((m) => `kernel/drivers/virtio/${m}.ko`).concat('kernel/drivers/block/virtio_blk.ko');
    // /dev/console is a directory here (it replaces the node of the kernel's built-in
    // initramfs), so the kernel starts init without fds 0-2: the host must still get its
    // output onto the console (it opens it through a devtmpfs it mounts and detaches).
    const initrd = makeInitramfs('selftest', init, { modules: virtio, console: 'directory' });

    // A sparse disk larger than 4 GiB with a marker beyond 4 GiB: 64-bit offsets and sizes.
    const disk = path.join(tmp, 'disk.raw');
    const marker = 'vdboot marker at 4.5 GiB';
    fs.writeFileSync(disk, '');
    fs.truncateSync(disk, 5 * 2 ** 30 + 7 * 512);
    const fd = fs.openSync(disk, 'r+');
    fs.writeSync(fd, Buffer.from(marker), 0, marker.length, 4.5 * 2 ** 30);
    fs.closeSync(fd);

    const run = await boot(initrd, { drive: disk, timeoutMs: 100_000 });
    const line = /SELFTEST-RESULT (\{.*\})\r?\n/.exec(run.output);
    expect(line, `no result line; console:\n${run.output}`).not.toBeNull();
    expect(run.timedOut, 'QEMU should power off by itself').toBe(false);
    const r = JSON.parse(line![1]);
    expect(run.output).toContain('unable to open an initial console');

    expect(r.pid).toBe(1);
    expect(r.argv[0]).toBe('/init');
    expect(r.stdioOpen).toHaveLength(3);
    for (const p of r.stdioOpen) expect(p).toMatch(/console/);
    expect(r.mounts).toBe('ok');
    expect(r.exe).toBe('/init');
    expect(r.uname).toBe(kernelVersion);
    expect(r.procStatfsType).toBe(0x9fa0);
    expect(r.rootEntries).toEqual(expect.arrayContaining(['bin', 'dev', 'init', 'modules', 'proc', 'sys']));
    expect(r.devNull).toEqual({ isChr: true, major: 1, minor: 3 });
    expect(r.binShIsLink).toBe('busybox');
    expect(r.enoent).toEqual({ isSysError: true, name: 'SysError', code: 'ENOENT', errno: 2, call: 'open /no/such/file' });
    expect(r.eexist).toMatchObject({ isSysError: true, code: 'EEXIST', errno: 17 });
    expect(r.typeError).toBe('TypeError');
    expect(r.tmpFile).toEqual({
      n: 4, back: [3, 4, 5, 6], size: 50, mode: 0o600, nlink: 2, link: [12, 34], zero: [0, 0], entries: ['f', 'h2', 'zero'],
    });
    expect(r.spawnEcho).toEqual({ out: 'hello from busybox\n', exitCode: 0, samePid: true });
    expect(r.memfd).toMatchObject({ exitCode: 0, out: 'into a memfd\n', link: '/memfd:selftest (deleted)', badName: { isSysError: false, name: 'TypeError' } });
    expect(r.spawnExit7).toBe(7);
    // The child sees its environment and only fds 0-2 (3 is ls's own directory fd).
    expect(r.spawnEnv).toEqual(['42', '0', '1', '2', '3']);
    expect(r.spawnMissing).toEqual({ isSysError: true, name: 'SysError', code: 'ENOENT', errno: 2, call: 'spawn /no/such/program' });
    expect(r.killed).toEqual({ runningPid: 0, signal: 9, exitCode: -1 });
    expect(r.fork).toBe(42);
    expect(r.echild).toMatchObject({ code: 'ECHILD', errno: 10 });
    expect(r.pollPipe).toEqual({ empty: 0, ready: 1 });
    expect(r.clocks).toEqual({ advanced: true, slept: true, uptimePositive: true });

    const size = String(fs.statSync(disk).size);
    expect(r.virtioDisk).toMatchObject({
      reload: { code: 'EEXIST' }, drained: 'EAGAIN', rc: 0, size, viaView: size, flush: 0, got: 32, marker,
    });
    expect(r.virtioDisk.uevent).toMatch(/^add@\/devices\/.*\/block\/vda$/);
    // socket/connect: lo is down in a fresh init, so 127.0.0.1 is unreachable (or refused once up); nlctrl is always family 0x10
    expect(['ENETUNREACH', 'ECONNREFUSED']).toContain(r.sockets.connect.code);
    expect(r.sockets.connect.call).toMatch(/^connect fd \d+$/);
    expect(r.sockets).toMatchObject({ ready: 1, family: 0x10 });
    // setsockopt: nlctrl's multicast group "notify" (GENL_ID_CTRL, 0x10) found in the reply and joined; a closed fd is EBADF
    expect(r.sockets).toMatchObject({ notifyGroup: 0x10, joined: 'no exception', badFd: { code: 'EBADF' } });
  });

  test('a throwing init prints the error with its stack, then a rescue shell answers typed commands and restarts', async ({ expect }) => {
    const init = await makeInit(path.join(here, 'throwing-entry.ts'), 'throwing');
    const initrd = makeInitramfs('throwing', init, { console: true });
    const prompt = 'vdboot-rescue# ';
    let step = 0;
    const run = await boot(initrd, {
      timeoutMs: 100_000,
      script: (out, type) => {
        const prompts = out.split(prompt).length - 1;
        if (step === 0 && prompts >= 1) { step = 1; type('echo answer-$((6*7))\n'); }
        else if (step === 1 && out.includes('answer-42')) { step = 2; type('exit\n'); }
        else if (step === 2 && prompts >= 3) { step = 3; type('busybox poweroff -f\n'); }
      },
    });
    const out = run.output;
    if (process.env.VDBOOT_TEST_VERBOSE) console.log(out);
    expect(out).toContain('THROWING-ENTRY started as pid 1');
    expect(out).toContain('vdboot: the init script failed: Error: deliberate failure while testing the rescue shell');
    expect(out).toMatch(/at failDeliberately \(init\.js:\d+/);
    expect(out).toContain('starting a rescue shell');
    expect(out, out).toContain('answer-42');
    expect(step, `rescue shell did not restart after exit; console:\n${out}`).toBe(3);
    expect(out).not.toContain('Kernel panic');
    expect(run.timedOut, 'poweroff -f in the rescue shell should end QEMU').toBe(false);
  });

  test('a script that leaves an unhandled rejection and returns gets the rescue shell; a failing forked child just exits 1', async ({ expect }) => {
    const init = await makeInit(path.join(here, 'returning-entry.ts'), 'returning');
    const initrd = makeInitramfs('returning', init, { console: true });
    let typed = false;
    const run = await boot(initrd, {
      timeoutMs: 100_000,
      script: (out, type) => {
        if (!typed && out.includes('vdboot-rescue# ')) { typed = true; type('busybox poweroff -f\n'); }
      },
    });
    const out = run.output;
    expect(out).toContain('failure inside a forked child');
    expect(out).toContain('FORKED-CHILD exit code 1');
    expect(out).toContain('RETURNING-ENTRY returns');
    expect(out).toContain('vdboot: unhandled promise rejection: Error: a rejection nobody handles');
    expect(out.split('starting a rescue shell').length - 1, out).toBe(1);
    expect(out).not.toContain('Kernel panic');
    expect(run.timedOut, `the rescue shell should have powered off; console:\n${out}`).toBe(false);
  });
});
