/**
 * npm run test:full — power cuts during a read-write path that writes through the host's
 * driver: a dynamic VHDX (1 MiB blocks) on NTFS is booted rw, and QEMU is killed with
 * SIGKILL as soon as vdboot starts expanding it in place (ntfs-3g on 6.1, ntfs3 on 6.12).
 * The next boot must come up read-write (it expands again), the guest run, and after its
 * clean shutdown the host's own checker, `qemu-img check` and `e2fsck -fn` must pass. The
 * NTFS volume flags the cut left are printed (measured: 0x0 with both drivers, i.e. not
 * dirty; a dirty flag with an empty journal would still allow the direct path, README).
 * Then cuts during the shutdown hand-off, on the direct and the loop path. The direct-path case (a cut during the
 * guest's fsync'd writes) is in npm test: test/e2e/power-cut.test.ts. Last, a cut while the
 * guest writes without pause through the loop path (the host mounted read-write by ntfs-3g
 * or ntfs3): the flags it leaves are printed (measured 0x0 with both drivers: neither marks
 * the volume dirty for writes inside a file's clusters); the next boot on the direct path
 * comes up read-write with the guest's synced writes; were the volume dirty, the README's
 * rule is checked too (the driver path refused by `vdboot plan`, the boot warning).
 */
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { writeInitramfs } from '../../mkinitramfs/build.ts';
import { convertImage, ntfsVolumeFlags } from '../../qemu/disks.ts';
import { GUEST_MARKER, guestFact, parseGuestFacts } from '../../qemu/guest.ts';
import { bootVm, cachedKernel, defaultKernel, kernelVersion, type Vm } from '../../qemu/harness.ts';
import { extractRange } from '../kit/host-disk.ts';
import { planAgainstDevices } from '../../src/cli/plan.ts';
import { devicesOf } from '../vdisk/helpers.ts';
import { makeGuestDisk } from '../kit/guest-disk.ts';
import { COUNTER_COMMANDS, expectGuestKept, expectHostFsClean, imageHostDisk, readImageBack, RW_HOST_LABEL, type ImageHostDisk } from '../kit/rw-check.ts';

const IMAGE = '/VMs/linux.vhdx';
const dir = mkdtempSync(join(tmpdir(), 'vdboot-power-cut-full-'));
const vms: Vm[] = [];
afterAll(async () => {
  for (const vm of vms) if (!vm.exited) await vm.kill();
  if (!process.env.VDBOOT_KEEP) rmSync(dir, { recursive: true, force: true });
});

const kernels = [defaultKernel(), cachedKernel('6.12')].filter((k): k is string => k !== undefined);

/** The host partition's NTFS volume flags after a cut (reported: what a real cut leaves). */
function flagsAfterCut(sub: string, host: ImageHostDisk, what: string): number {
  const part = extractRange(host.disk, host.offset, host.size, join(sub, 'after-cut.ntfs'));
  const flags = ntfsVolumeFlags(part);
  rmSync(part);
  process.stderr.write(`power cut ${what}: NTFS volume flags afterwards 0x${flags.toString(16)}\n`);
  return flags;
}

/** The boot after the cut: it comes up rw on the image's root with the synced `count`, and powers down; its transcript. */
async function bootAfterCut(opts: { kernel: string; initrd: string; append: string; host: ImageHostDisk; name: string; count: string }): Promise<string> {
  const vm = await bootVm({ kernel: opts.kernel, initrd: opts.initrd, append: opts.append, disks: [{ file: opts.host.disk }], name: opts.name, memoryMiB: 768 });
  vms.push(vm);
  await vm.waitFor(GUEST_MARKER, 400_000);
  await vm.waitExit(120_000);
  const t = vm.transcript();
  const facts = parseGuestFacts(t);
  expect(facts.root, t.slice(-3000)).toMatchObject({ device: '/dev/mapper/vdisk0p2', mode: 'rw' });
  expect(facts.facts.count).toBe(opts.count);
  expect(t).toMatch(/reboot: Power down/);
  return t;
}

for (const kernel of kernels) {
  const v = kernelVersion(kernel);
  describe(`power cut during expansion on ${v}`, { timeout: 900_000 }, () => {
    it('SIGKILL as the expansion starts: the next boot expands again and comes up rw; every checker clean afterwards', async () => {
      const sub = join(dir, v);
      mkdirSync(join(sub, 'guest'), { recursive: true });
      const raw = makeGuestDisk(join(sub, 'guest'), { commands: COUNTER_COMMANDS, then: { exec: '/run/initramfs/shutdown poweroff' } }).raw;
      const vhdx = join(sub, 'guest.vhdx');
      convertImage(raw, vhdx, 'vhdx', ['subformat=dynamic', 'block_size=1M']);
      const host = imageHostDisk(sub, 'host', 'ntfs', IMAGE, vhdx, false);
      const initrd = join(sub, 'initrd.img');
      writeInitramfs(initrd, { kernel });
      const append = `root="vdisk:LABEL=${RW_HOST_LABEL.ntfs}:${IMAGE}" rw`;

      const first = await bootVm({ kernel, initrd, append, disks: [{ file: host.disk }], name: `cut-expand-${v}-1`, memoryMiB: 768 });
      vms.push(first);
      await first.waitFor(/expanding \S+ in place|expanding .*: \d+/, 300_000);
      await first.kill();
      // what the cut left: the host's dirty flag (reported, the rule below must hold either way)
      flagsAfterCut(sub, host, `during expansion on ${v}`);

      await bootAfterCut({ kernel, initrd, append, host, name: `cut-expand-${v}-2`, count: '0' });
      expectHostFsClean(sub, host);
      expectGuestKept(sub, readImageBack(sub, host, IMAGE, join(sub, 'after.vhdx')), 'vhdx', 1);
    });
  });
}

// The shutdown hand-off: the guest has synced its counter and handed over to
// /run/initramfs/shutdown, which is killed as it starts taking the devices down. Direct
// (host mounted read-only) and rd.vdisk.map=loop (host mounted read-write by ntfs-3g or ntfs3).
for (const kernel of kernels) {
  const v = kernelVersion(kernel);
  for (const map of ['direct', 'loop'] as const) {
    describe(`power cut during the shutdown hand-off on ${v}, ${map}`, { timeout: 900_000 }, () => {
      it('SIGKILL as the hand-off starts: the next boot comes up rw with the synced counter; every checker clean afterwards', async () => {
        const sub = join(dir, `${v}-handoff-${map}`);
        mkdirSync(join(sub, 'guest'), { recursive: true });
        const raw = makeGuestDisk(join(sub, 'guest'), { commands: COUNTER_COMMANDS, then: { exec: '/run/initramfs/shutdown poweroff' } }).raw;
        const vhdx = join(sub, 'guest.vhdx');
        convertImage(raw, vhdx, 'vhdx', ['subformat=fixed']);
        const host = imageHostDisk(sub, 'host', 'ntfs', IMAGE, vhdx, false);
        const initrd = join(sub, 'initrd.img');
        writeInitramfs(initrd, { kernel });
        const append = `root="vdisk:LABEL=${RW_HOST_LABEL.ntfs}:${IMAGE}" rw${map === 'loop' ? ' rd.vdisk.map=loop' : ''}`;

        const first = await bootVm({ kernel, initrd, append, disks: [{ file: host.disk }], name: `cut-handoff-${v}-${map}-1`, memoryMiB: 768 });
        vms.push(first);
        await first.waitFor(/entered \/run\/initramfs/, 300_000);
        await first.kill();
        flagsAfterCut(sub, host, `during the shutdown hand-off on ${v} (${map})`);

        await bootAfterCut({ kernel, initrd, append, host, name: `cut-handoff-${v}-${map}-2`, count: '1' });
        expectHostFsClean(sub, host);
        expectGuestKept(sub, readImageBack(sub, host, IMAGE, join(sub, 'after.vhdx')), 'vhdx', 2);
      });
    });
  }
}


// A cut while a Linux driver has the volume marked dirty: the guest's first boot (count 0)
// writes and syncs in a loop through rd.vdisk.map=loop, and QEMU is killed in the middle.
const WRITER_COMMANDS = [
  ...COUNTER_COMMANDS,
  `if [ "$n" = 0 ]; then ${guestFact('writing', '1')}; while :; do dd if=/dev/urandom of=/junk bs=64k count=32 2>/dev/null; sync; done; fi`,
];
for (const kernel of kernels) {
  const v = kernelVersion(kernel);
  describe(`power cut during writes through the host driver on ${v}`, { timeout: 900_000 }, () => {
    it('SIGKILL while the loop path writes: the next boot (direct) comes up rw with the synced count; a dirty volume refuses the driver path and warns', async () => {
      const sub = join(dir, `${v}-dirty`);
      mkdirSync(join(sub, 'guest'), { recursive: true });
      const raw = makeGuestDisk(join(sub, 'guest'), { commands: WRITER_COMMANDS, then: { exec: '/run/initramfs/shutdown poweroff' } }).raw;
      const vhdx = join(sub, 'guest.vhdx');
      convertImage(raw, vhdx, 'vhdx', ['subformat=fixed']);
      const host = imageHostDisk(sub, 'host', 'ntfs', IMAGE, vhdx, false);
      const initrd = join(sub, 'initrd.img');
      writeInitramfs(initrd, { kernel });
      const spec = `root="vdisk:LABEL=${RW_HOST_LABEL.ntfs}:${IMAGE}" rw`;

      const first = await bootVm({ kernel, initrd, append: `${spec} rd.vdisk.map=loop`, disks: [{ file: host.disk }], name: `cut-dirty-${v}-1`, memoryMiB: 768 });
      vms.push(first);
      await first.waitFor(/VDBOOT-GUEST writing=1/, 400_000);
      await new Promise((r) => setTimeout(r, 3000));
      await first.kill();
      const flags = flagsAfterCut(sub, host, `during writes through the driver on ${v}`);
      // Measured (6.1 ntfs-3g and 6.12 ntfs3): 0x0. Neither driver sets the dirty flag for
      // writes inside an existing file's clusters, and cuts 0.3 s and 1.5 s into an
      // expansion left 0x0 too. When a cut does leave it dirty (the flag, an empty $LogFile),
      // writing through the driver again must be refused, naming the remedy.
      const dirty = (flags & 1) === 1;
      if (dirty) {
        const d = devicesOf([host.disk]);
        let refusal = '';
        try {
          planAgainstDevices(`${spec} rd.vdisk.map=loop`, d.devices);
        } catch (e) {
          refusal = (e as Error).message;
        } finally {
          d.close();
        }
        expect(refusal).toMatch(/marked dirty by a Linux NTFS driver/);
        expect(refusal).toMatch(/chkdsk \/f|ntfsfix -d/);
      }

      const t = await bootAfterCut({ kernel, initrd, append: spec, host, name: `cut-dirty-${v}-2`, count: '1' });
      // the direct path boots either way; on a dirty volume with the warning, else without
      if (dirty) expect(t).toMatch(/marked dirty by a Linux NTFS driver that did not unmount it/);
      else expect(t).not.toMatch(/marked dirty/);
      if (!dirty) expectHostFsClean(sub, host);
      expectGuestKept(sub, readImageBack(sub, host, IMAGE, join(sub, 'after.vhdx')), 'vhdx', 2);
    });
  });
}
