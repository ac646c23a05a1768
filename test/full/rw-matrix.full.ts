/**
 * npm run test:full — every read-write path × host driver × kernel × sparse or whole copy:
 * a dynamic VHDX (1 MiB blocks, so it has absent blocks) booted rw twice with the initramfs
 * `vdboot mkinitramfs` builds with no flags; the second boot must read what the first
 * wrote, and afterwards the host's own fsck, `qemu-img check` and `e2fsck -fn` on the
 * guest's root pass (test/kit/rw-check.ts).
 *
 * Drivers: NTFS through ntfs-3g (6.1, no ntfs3) and ntfs3 (6.12; sparse files go through
 * ntfs-3g there), FAT32 through vfat, exFAT through exfat, ext4 through the kernel-mounted
 * host. Paths: auto (holes filled, image expanded, then direct) and rd.vdisk.map=loop
 * (expanded, then through the host's driver).
 */
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { writeInitramfs } from '../../mkinitramfs/build.ts';
import { convertImage, sparseCopySupported } from '../../qemu/disks.ts';
import { GUEST_MARKER, parseGuestFacts } from '../../qemu/guest.ts';
import { bootVm, cachedKernel, defaultKernel, kernelVersion, type Vm } from '../../qemu/harness.ts';
import { makeGuestDisk } from '../kit/guest-disk.ts';
import { COUNTER_COMMANDS, expectGuestKept, expectHostFsClean, imageHostDisk, readImageBack, RW_HOST_LABEL, type RwHostFs } from '../kit/rw-check.ts';

const IMAGE = '/VMs/My Linux.vhdx';
const dir = mkdtempSync(join(tmpdir(), 'vdboot-rw-matrix-'));
const vms: Vm[] = [];
afterAll(async () => {
  for (const vm of vms) if (!vm.exited) await vm.kill();
  if (!process.env.VDBOOT_KEEP) rmSync(dir, { recursive: true, force: true });
});

const kernels = [defaultKernel(), cachedKernel('6.12')].filter((k): k is string => k !== undefined);
let guestVhdx: string | undefined;
function guestImage(): string {
  if (!guestVhdx) {
    mkdirSync(join(dir, 'guest'), { recursive: true });
    const raw = makeGuestDisk(join(dir, 'guest'), { commands: COUNTER_COMMANDS, then: { exec: '/run/initramfs/shutdown poweroff' } }).raw;
    guestVhdx = join(dir, 'guest.vhdx');
    convertImage(raw, guestVhdx, 'vhdx', ['subformat=dynamic', 'block_size=1M']);
  }
  return guestVhdx;
}
const initrds = new Map<string, string>();
function initrdFor(kernel: string): string {
  let out = initrds.get(kernel);
  if (!out) {
    out = join(dir, `initrd-${kernelVersion(kernel)}.img`);
    writeInitramfs(out, { kernel });
    initrds.set(kernel, out);
  }
  return out;
}

const cases: { fs: RwHostFs; sparse: boolean }[] = [
  { fs: 'ntfs', sparse: false }, { fs: 'ntfs', sparse: true }, { fs: 'vfat', sparse: false }, { fs: 'exfat', sparse: false }, { fs: 'ext4', sparse: false }, { fs: 'ext4', sparse: true },
];

for (const kernel of kernels) {
  describe(`rw matrix on ${kernelVersion(kernel)}`, () => {
    for (const c of cases) {
      for (const map of ['auto', 'loop'] as const) {
        const name = `${kernelVersion(kernel).split('-')[0]}-${c.fs}-${c.sparse ? 'sparse' : 'whole'}-${map}`;
        // sparse NTFS copies and reading exFAT back need FUSE (root, /dev/fuse; exFAT a loop device too)
        const skip = (c.sparse && c.fs === 'ntfs' && !sparseCopySupported()) || (c.fs === 'exfat' && !sparseCopySupported());
        it.skipIf(skip)(`${c.fs}, ${c.sparse ? 'sparse' : 'whole'} copy, rd.vdisk.map=${map}: written, shut down, booted again, the writes there, every checker clean`, async () => {
          const host = imageHostDisk(dir, name, c.fs, IMAGE, guestImage(), c.sparse);
          const append = `root="vdisk:LABEL=${RW_HOST_LABEL[c.fs]}:${IMAGE}" rw${map === 'loop' ? ' rd.vdisk.map=loop' : ''}`;
          for (let i = 0; i < 2; i++) {
            const vm = await bootVm({ kernel, initrd: initrdFor(kernel), append, disks: [{ file: host.disk }], name: `${name}-${i + 1}`, memoryMiB: 768 });
            vms.push(vm);
            await vm.waitFor(GUEST_MARKER, 300_000);
            await vm.waitExit(120_000);
            const t = vm.transcript();
            const facts = parseGuestFacts(t);
            expect(facts.root, t.slice(-3000)).toMatchObject({ device: '/dev/mapper/vdisk0p2', mode: 'rw' });
            expect(facts.facts.count).toBe(String(i));
            expect(t).toMatch(map === 'loop' ? /vhdx dynamic, loop \(asked for\)/ : /vhdx dynamic, direct: the image is fully mappable/);
            expect(t).toMatch(/reboot: Power down/);
          }
          expectHostFsClean(dir, host);
          expectGuestKept(dir, readImageBack(dir, host, IMAGE, join(dir, `${name}-after.vhdx`)), 'vhdx', 2);
          rmSync(host.disk);
        });
      }
    }
  });
}

