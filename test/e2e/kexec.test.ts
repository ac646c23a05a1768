/**
 * End to end: the root's own kernel. vdboot's initramfs for Debian's 6.1 kernel boots a
 * plain root that holds Debian 12's 6.12 kernel in /boot and its modules in /lib/modules
 * (and none for 6.1): vdboot starts 6.12 with kexec_file_load and an initramfs assembled
 * at boot, and the guest's init runs on 6.12; with rd.vdboot.kexec=0 it stays on 6.1 and
 * the console says what is missing. The same root as a fixed VHDX on NTFS
 * (root=vdisk:): the image's devices are taken down before the jump and made again by
 * the second vdboot.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeInitramfs } from '../../mkinitramfs/build.ts';
import { convertImage } from '../../qemu/disks.ts';
import { GUEST_MARKER, guestFact, parseGuestFacts } from '../../qemu/guest.ts';
import { bootVm, cachedKernel, defaultKernel, kernelVersion, type Vm } from '../../qemu/harness.ts';
import { makeKexecGuestDisk } from '../kit/guest-disk.ts';
import { expectHostClean, hostDisk, type HostDisk } from '../kit/host-disk.ts';

const newKernel = cachedKernel('6.12');
const oldKernel = defaultKernel();
const ROOT_LABEL = 'kexec root';
let dir: string;
let initrd: string;
let disk: string;
const vms: Vm[] = [];
const re = (s: string) => s.replace(/[.+()]/g, '\\$&');

beforeAll(() => {
  if (!newKernel) return;
  dir = mkdtempSync(join(tmpdir(), 'vdboot-e2e-kexec-'));
  initrd = join(dir, 'initrd.img');
  const built = writeInitramfs(initrd, { kernel: oldKernel });
  disk = makeKexecGuestDisk(dir, newKernel, built.manifest, { commands: [guestFact('kernel', '$(uname -r)')] }, ROOT_LABEL);
}, 300_000);

afterAll(async () => {
  for (const vm of vms) if (!vm.exited) await vm.kill();
  if (dir && !process.env.VDBOOT_KEEP) rmSync(dir, { recursive: true, force: true });
});

async function boot(append: string, name: string, root = `"root=LABEL=${ROOT_LABEL}"`, file = disk, snapshot = true) {
  const vm = await bootVm({ initrd, append: `${root} ${append}`.trim(), disks: [{ file, interface: 'virtio-blk', snapshot }], memoryMiB: 1024, name });
  vms.push(vm);
  await vm.waitFor(GUEST_MARKER, 400_000);
  await vm.waitExit(60_000);
  const t = vm.transcript();
  return { t, facts: parseGuestFacts(t) };
}

describe.skipIf(!newKernel)('end to end: the root\'s own kernel started with kexec', { timeout: 600_000 }, () => {
  it('a plain root with 6.12 in /boot and no modules for 6.1: the guest runs on 6.12', async () => {
    const { t, facts } = await boot('', 'kexec-612');
    const release = kernelVersion(newKernel!);
    expect(t).toMatch(new RegExp(`kexec: starting the root's kernel ${re(release)} \\(/boot/vmlinuz-\\S+\\) instead of the running ${re(kernelVersion(oldKernel))}: it is newer`));
    expect(t).toMatch(/assembled an initramfs for 6\.12\.\S+: \d+ modules/);
    expect(t).toMatch(/kexec: jumping to 6\.12/);
    expect(facts.facts.kernel).toBe(release);
    expect(facts.cmdline).toContain('rd.vdboot.kexeced=1');
    expect(facts.root).toMatchObject({ device: '/dev/vda1', fstype: 'ext4', mode: 'ro' });
    // the second vdboot (on 6.12, its modules compressed in the initramfs) found the root
    // and did not jump again
    expect(t.split('vdboot started at').length - 1).toBe(2);
  });

  it('rd.vdboot.kexec=0: stays on 6.1 and says what is missing', async () => {
    const { t, facts } = await boot('rd.vdboot.kexec=0', 'kexec-off');
    expect(facts.facts.kernel).toBe(kernelVersion(oldKernel));
    expect(t).toMatch(new RegExp(`staying on kernel ${re(kernelVersion(oldKernel))} \\(rd.vdboot.kexec=0\\): the root has no modules for the running kernel`));
    expect(t).not.toMatch(/kexec: jumping/);
  });

  it('root=vdisk: a fixed VHDX on NTFS: the image\'s devices come down before the jump, the guest runs on 6.12, NTFS stays clean', async () => {
    const image = join(dir, 'linux.vhdx');
    convertImage(disk, image, 'vhdx', ['subformat=fixed']);
    const host: HostDisk = hostDisk(dir, 'ntfs-kexec', 'ntfs', { '/VMs/linux.vhdx': { hostFile: image } }, { sizeMiB: 320 });
    rmSync(image);
    const { t, facts } = await boot('', 'kexec-vdisk', 'root=vdisk:LABEL=Windows:/VMs/linux.vhdx', host.disk, false);
    const before = t.slice(0, t.indexOf('kexec: jumping'));
    expect(before).toMatch(/kexec: starting the root's kernel 6\.12/);
    expect(before).toMatch(/unmounted \/root/);
    expect(before).toMatch(/removed \/dev\/mapper\/vdisk0/);
    expect(facts.facts.kernel).toBe(kernelVersion(newKernel!));
    expect(facts.root).toMatchObject({ device: '/dev/mapper/vdisk0p1', fstype: 'ext4' });
    expectHostClean(dir, host);
  });
});
