/**
 * A server that goes away, beyond the one case of npm test (test/e2e/nbd-root.test.ts),
 * booted on the 6.12 kernel (npm test's case boots 6.1):
 *  - the server comes back serving another image under the export's name (another size):
 *    the reconnect daemon refuses it with both sizes on the console and keeps trying; once
 *    the original is served again it reconnects, and the guest's read completes with the
 *    checksum of the file the host put there;
 *  - the server never comes back (rd.vdisk.nbd.timeout=20): the daemon gives up when the
 *    kernel's dead-connection timeout is over and says so, the guest's read fails with an
 *    I/O error instead of hanging, and the shutdown hand-off (which lives in RAM) still
 *    powers the machine off.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeInitramfs } from '../../mkinitramfs/build.ts';
import { convertImage } from '../../qemu/disks.ts';
import { guestFact, parseGuestFacts, GUEST_MARKER } from '../../qemu/guest.ts';
import { bootVm, cachedKernel, type Vm } from '../../qemu/harness.ts';
import { makeGuestDisk } from '../kit/guest-disk.ts';
import { killableNbdServer } from '../kit/nbd-server.ts';

const kernel = cachedKernel('6.12');
let dir: string;
let served: string;
let other: string;
let initrd: string;
const vms: Vm[] = [];
const big = randomBytes(16 << 20);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

beforeAll(() => {
  if (!kernel) throw new Error('no 6.12 kernel in .cache/kernels (bash scripts/ensure-deps.sh fetches it)');
  dir = mkdtempSync(join(tmpdir(), 'vdboot-full-reconnect-'));
  initrd = join(dir, 'initrd.img');
  writeInitramfs(initrd, { kernel, without: ['ntfs-3g'] });
  const { raw } = makeGuestDisk(dir, {
    files: { '/big': big },
    commands: [
      'echo VDTEST-READING',
      // 1 MiB at a time past the page cache, a second apart; a failed read is said on the console
      'sum=$(for i in $(seq 0 15); do dd if=/big bs=1M skip=$i count=1 iflag=direct status=none || echo "VDTEST-READ-FAILED at $i" >&2; sleep 1; done | sha256sum | cut -d" " -f1)',
      guestFact('bigsum', '$sum'),
    ],
    then: { exec: '/run/initramfs/shutdown poweroff' },
  }, { sizeMiB: 48 });
  served = join(dir, 'served');
  other = join(dir, 'other');
  mkdirSync(served);
  mkdirSync(other);
  convertImage(raw, join(served, 'disk.vhdx'), 'vhdx', ['subformat=dynamic']);
  // another image under the same name: another size
  convertImage(raw, join(other, 'disk.vhdx'), 'vhdx', ['subformat=fixed']);
}, 300_000);

afterAll(async () => {
  for (const vm of vms) if (!vm.exited) await vm.kill();
  if (dir && !process.env.VDBOOT_KEEP) rmSync(dir, { recursive: true, force: true });
});

async function boot(name: string, append: string, netArgs: string[]): Promise<Vm> {
  const vm = await bootVm({ kernel, initrd, append: `root=vdisk:nbd://10.0.2.100/disk.vhdx ip=dhcp rw ${append}`.trim(), extraArgs: netArgs, name });
  vms.push(vm);
  return vm;
}

describe('a server that goes away (6.12)', () => {
  it('comes back with another image: refused with both sizes; the original again: reconnected, the read completes', async () => {
    const server = killableNbdServer(join(dir, 'swap'), served);
    const vm = await boot('reconnect-swap', '', server.netArgs);
    await vm.waitFor('VDTEST-READING', 480_000);
    await sleep(2000);
    expect(server.kill().length).toBeGreaterThan(0);
    await vm.waitFor(/WARNING: nbd: lost the connection to nbd:\/\/10\.0\.2\.100\/disk\.vhdx \(\/dev\/nbd0\)/, 120_000);
    server.restart(other);
    await vm.waitFor(/ERROR: nbd: \/dev\/nbd0: nbd:\/\/10\.0\.2\.100\/disk\.vhdx: the export is now \d+ bytes; it was \d+ bytes when \/dev\/nbd0 was connected/, 120_000);
    await sleep(3000);
    server.restart(served);
    await vm.waitFor(/nbd: reconnected \/dev\/nbd0/, 120_000);
    await vm.waitFor(GUEST_MARKER, 240_000);
    const facts = parseGuestFacts(vm.transcript());
    await vm.waitExit(180_000);
    const t = vm.transcript().replace(/\r/g, '');
    const sizes = /the export is now (\d+) bytes; it was (\d+) bytes/.exec(t)!;
    const { statSync } = await import('node:fs');
    expect(Number(sizes[1])).toBe(statSync(join(other, 'disk.vhdx')).size);
    expect(Number(sizes[2])).toBe(statSync(join(served, 'disk.vhdx')).size);
    expect(facts.facts.bigsum).toBe(createHash('sha256').update(big).digest('hex'));
    expect(t).not.toMatch(/VDTEST-READ-FAILED/);
    expect(t.search(/disconnected \/dev\/nbd0/)).toBeGreaterThan(t.search(/stopping the NBD reconnect daemon/));
    expect(t).toMatch(/reboot: Power down/);
  }, 900_000);

  it('never comes back: the daemon gives up at rd.vdisk.nbd.timeout and says so, the read fails, the machine still powers off', async () => {
    const server = killableNbdServer(join(dir, 'gone'), served);
    const vm = await boot('reconnect-gone', 'rd.vdisk.nbd.timeout=20', server.netArgs);
    await vm.waitFor('VDTEST-READING', 480_000);
    await sleep(2000);
    expect(server.kill().length).toBeGreaterThan(0);
    await vm.waitFor(/ERROR: nbd: gave up reconnecting \/dev\/nbd0 to nbd:\/\/10\.0\.2\.100\/disk\.vhdx after 2\d\.\d s and \d+ attempts \(last: nbd:\/\/10\.0\.2\.100\/disk\.vhdx: the server closed the connection \(0 of 16 bytes arrived\)\)\. The kernel's dead-connection timeout \(20 s, rd\.vdisk\.nbd\.timeout=\) is over: I\/O on \/dev\/nbd0 fails from now on/, 240_000);
    await vm.waitFor(/VDTEST-READ-FAILED/, 240_000);
    await vm.waitExit(300_000);
    const t = vm.transcript().replace(/\r/g, '');
    // the kernel failed the reads (EIO) once the timeout was over, it did not hang
    expect(t).toMatch(/dd: \/big: Input\/output error/);
    expect(t).toMatch(/disconnected \/dev\/nbd0/);
    expect(t).toMatch(/nbd: watching \/dev\/nbd0: if the server goes away, I\/O waits up to 20 s while vdboot reconnects/);
    expect(t).toMatch(/reboot: Power down/);
  }, 900_000);
});
