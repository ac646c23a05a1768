/**
 * End to end: a power cut during direct writes. A fixed VHDX on an NTFS host is booted
 * read-write (direct path: dm-linear onto the host's sectors, the host filesystem itself
 * mounted read-only); the guest writes a file, syncs it, says so, and goes on writing
 * with fsync in a loop — and QEMU is killed with SIGKILL right then. The next boot must
 * come up read-write (vdboot left the host clean: nothing but the image's own clusters was
 * written), with the synced file there; after its clean shutdown NTFS is clean
 * (`ntfsfix -n` and vdboot's reader), `qemu-img check` passes and the guest's ext4 passes
 * `e2fsck -fn`. Cuts during expansion are in test/full/power-cut.full.ts.
 */
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { writeInitramfs } from '../../mkinitramfs/build.ts';
import { convertImage } from '../../qemu/disks.ts';
import { guestFact, GUEST_MARKER, parseGuestFacts } from '../../qemu/guest.ts';
import { bootVm, defaultKernel, type Vm } from '../../qemu/harness.ts';
import { makeGuestDisk } from '../kit/guest-disk.ts';
import { expectGuestKept, expectHostFsClean, imageHostDisk, readImageBack, RW_HOST_LABEL } from '../kit/rw-check.ts';

const IMAGE = '/VMs/linux.vhdx';
const CUT = 'POWER-CUT-NOW';
const dir = mkdtempSync(join(tmpdir(), 'vdboot-power-cut-'));
const vms: Vm[] = [];
afterAll(async () => {
  for (const vm of vms) if (!vm.exited) await vm.kill();
  rmSync(dir, { recursive: true, force: true });
});

/** First boot: sync a file, announce the cut, then write and fsync until killed. Later boots: report and shut down. */
const COMMANDS = [
  'n=$(cat /count 2>/dev/null || echo 0)',
  guestFact('count', '$n'),
  'echo $((n+1)) > /count',
  'sync',
  `if [ "$n" = 0 ]; then echo "written before the cut" > /synced; sync; echo ${CUT}; i=0; while true; do i=$((i+1)); dd if=/dev/urandom of=/churn.$((i % 4)) bs=64k count=8 conv=fsync 2>/dev/null; done; fi`,
  guestFact('synced', '$(cat /synced)'),
];

describe('end to end: a power cut during direct writes', { timeout: 600_000 }, () => {
  it('SIGKILL of the VM while the guest fsyncs: the next boot is read-write with the synced file, and every checker is clean after it', async () => {
    mkdirSync(join(dir, 'guest'));
    const raw = makeGuestDisk(join(dir, 'guest'), { commands: COMMANDS, then: { exec: '/run/initramfs/shutdown poweroff' } }).raw;
    const vhdx = join(dir, 'guest.vhdx');
    convertImage(raw, vhdx, 'vhdx', ['subformat=fixed']);
    const host = imageHostDisk(dir, 'host', 'ntfs', IMAGE, vhdx, false);
    const initrd = join(dir, 'initrd.img');
    writeInitramfs(initrd, { kernel: defaultKernel() });
    const append = `root="vdisk:LABEL=${RW_HOST_LABEL.ntfs}:${IMAGE}" rw`;

    const first = await bootVm({ initrd, append, disks: [{ file: host.disk }], name: 'power-cut-1', memoryMiB: 512 });
    vms.push(first);
    await first.waitFor(CUT, 300_000);
    const before = first.transcript();
    expect(before).toMatch(/vhdx fixed, direct: the image is fully mappable/);
    await first.kill(); // SIGKILL: no shutdown, no unmount, no flush beyond what the guest synced
    expect(first.transcript()).not.toMatch(/reboot: Power down/);

    const second = await bootVm({ initrd, append, disks: [{ file: host.disk }], name: 'power-cut-2', memoryMiB: 512 });
    vms.push(second);
    await second.waitFor(GUEST_MARKER, 300_000);
    await second.waitExit(120_000);
    const t = second.transcript();
    const facts = parseGuestFacts(t);
    expect(facts.root, t.slice(-3000)).toMatchObject({ device: '/dev/mapper/vdisk0p2', mode: 'rw' });
    expect(facts.facts.count).toBe('1');
    expect(facts.facts.synced).toBe('written before the cut');
    expect(t).toMatch(/reboot: Power down/);

    expectHostFsClean(dir, host);
    expectGuestKept(dir, readImageBack(dir, host, IMAGE, join(dir, 'after.vhdx')), 'vhdx', 2);
  });
});
