/**
 * An arm64 boot: Debian's arm64 kernel (linux-image-arm64) and its
 * modules, with the initramfs `vdboot mkinitramfs --kernel IMAGE --busybox ARM64-BUSYBOX`
 * builds (build/init-aarch64 picked by the Image's architecture; Debian's arm64 busybox
 * from scripts/fetch-arm64-boot.sh), booted by qemu-system-aarch64
 * (-M virt, cortex-a57, TCG) into a plain ext4 root read-write. The guest's own init
 * (arm64 busybox) prints its facts and writes a file; the oracle is the console (machine
 * aarch64, the root rw, the running release) and the file read back from the disk image with
 * debugfs, with e2fsck -fn clean.
 */
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { chmodSync, copyFileSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { afterAll, expect, it } from 'vitest';
import { GUEST_MARKER, guestInitScript, parseGuestFacts } from '../../qemu/guest.ts';

const repo = new URL('../..', import.meta.url).pathname;
const dir = mkdtempSync(join(tmpdir(), 'vdboot-aarch64-boot-'));
afterAll(() => {
  if (!process.env.VDBOOT_KEEP) rmSync(dir, { recursive: true, force: true });
});

function bootArm64(kernel: string, initrd: string, disk: string, append: string, timeoutMs: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const args = ['-M', 'virt', '-cpu', 'cortex-a57', '-accel', 'tcg', '-m', '1024', '-smp', '1', '-display', 'none', '-no-reboot', '-serial', 'stdio', '-monitor', 'none',
      '-kernel', kernel, '-initrd', initrd, '-append', append, '-drive', `file=${disk},format=raw,if=none,id=d0`, '-device', 'virtio-blk-pci,drive=d0'];
    const vm = spawn('qemu-system-aarch64', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    vm.stdout.on('data', (d: Buffer) => { out += d.toString('utf8'); });
    vm.stderr.on('data', (d: Buffer) => { out += d.toString('utf8'); });
    const timer = setTimeout(() => { vm.kill('SIGKILL'); reject(new Error(`the arm64 guest did not finish within ${timeoutMs / 1000} s:\n${out}`)); }, timeoutMs);
    vm.on('error', (e) => { clearTimeout(timer); reject(e); });
    vm.on('exit', () => { clearTimeout(timer); resolve(out); });
  });
}

it('Debian\'s arm64 kernel boots a plain ext4 root rw with vdboot\'s aarch64 /init; the guest\'s write is on the disk', async () => {
  const fetched = execFileSync('bash', [join(repo, 'scripts/fetch-arm64-boot.sh')], { encoding: 'utf8' });
  const vmlinuz = /^vmlinuz (.+)$/m.exec(fetched)![1]!;
  const busybox = /^busybox (.+)$/m.exec(fetched)![1]!;
  const release = basename(vmlinuz).replace(/^vmlinuz-/, '');

  // The arm64 Image picks build/init-aarch64, its release and the modules beside it; the
  // build machine's busybox and ntfs-3g are x86-64 and do not go in.
  const vdboot = (...args: string[]) => spawnSync('node', [join(repo, 'bin/vdboot.mjs'), 'mkinitramfs', ...args], { encoding: 'utf8' });
  const refused = vdboot('--kernel', vmlinuz, '-o', join(dir, 'refused.img'));
  expect(refused.status).not.toBe(0);
  expect(refused.stderr).toContain('/bin/busybox is not an aarch64 program, and the initramfs is for aarch64: give --busybox a static aarch64 busybox');
  const wrongInit = vdboot('--kernel', vmlinuz, '--busybox', busybox, '--init', join(repo, 'build/init'), '-o', join(dir, 'refused.img'));
  expect(wrongInit.stderr).toMatch(/build\/init is not an aarch64 program, .* give --init the aarch64 one \(build\/init-aarch64\)/);
  const initrd = join(dir, 'initrd.img');
  const made = vdboot('--kernel', vmlinuz, '--busybox', busybox, '-o', initrd);
  expect(made.status, made.stderr).toBe(0);
  expect(made.stdout).toMatch(new RegExp(`modules for kernel ${release.replace(/[.+]/g, '\\$&')}`));
  expect(made.stderr).toContain('the initramfs is for aarch64 and this machine is not: no programs from it (ntfs-3g) go in');
  const listing = execFileSync('sh', ['-c', 'zstd -dc "$1" | cpio -it --quiet', 'sh', initrd], { encoding: 'utf8', maxBuffer: 64 << 20 }).split('\n');
  expect(listing.some((f) => f.startsWith('usr/bin/ntfs-3g') || f === 'bin/ntfs-3g')).toBe(false);
  expect(listing).toContain(`lib/modules/${release}/kernel/drivers/block/virtio_blk.ko`);

  const root = join(dir, 'root');
  for (const d of ['bin', 'sbin', 'proc', 'sys', 'dev', 'run', 'tmp', 'etc']) mkdirSync(join(root, d), { recursive: true });
  copyFileSync(busybox, join(root, 'bin/busybox'));
  chmodSync(join(root, 'bin/busybox'), 0o755);
  writeFileSync(join(root, 'sbin/init'), guestInitScript({ writeFile: { path: '/arm64-probe', content: 'written by the arm64 guest' }, commands: ['echo "VDBOOT-GUEST machine=$(uname -m) release=$(uname -r)"'] }), { mode: 0o755 });
  const disk = join(dir, 'root.ext4');
  execFileSync('mke2fs', ['-q', '-t', 'ext4', '-L', 'armroot', '-d', root, disk, '64M']);

  const console = (await bootArm64(vmlinuz, initrd, disk, 'console=ttyAMA0 panic=-1 root=LABEL=armroot rw', 600_000)).replace(/\r/g, '');
  expect(console, console).toContain(GUEST_MARKER);
  if (process.env.VDBOOT_DEBUG) process.stdout.write(console);
  const facts = parseGuestFacts(console, GUEST_MARKER);
  expect(console).toMatch(/vdboot: \[\s*[\d.]+\] mounted \/dev\/vda \(ext4, rw\) on \/root/);
  expect(facts.facts.machine).toBe(`aarch64 release=${release}`);
  expect(facts.root).toMatchObject({ device: '/dev/vda', fstype: 'ext4', mode: 'rw' });
  expect(facts.wrote).toBe('/arm64-probe');

  expect(execFileSync('debugfs', ['-R', 'cat /arm64-probe', disk], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim()).toBe('written by the arm64 guest');
  execFileSync('e2fsck', ['-fn', disk], { stdio: 'pipe' });
}, 900_000);
