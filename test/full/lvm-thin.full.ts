/**
 * npm run test:full — a root on a thin LV, which vdboot does not map itself: a builder VM
 * (test/kit/lvm-builder.ts) makes VG "thinvg" with a thin pool and the thin LV "root" holding
 * an ext4 root, with lvm2's own tools. Then:
 *  1. an initramfs built --with lvm boots root=/dev/thinvg/root rw: vdboot runs `lvm lvchange
 *     -ay thinvg/root`, the guest's init starts on /dev/mapper/thinvg-root, the kernel's
 *     device-mapper holds the pool (thinvg-pool-tpool) under it, and the guest writes its
 *     boot count;
 *  2. the same image boots the same disk again and reads the count the first boot wrote
 *     (the rw path proven by reading back);
 *  3. the default initramfs (no lvm program) refuses the root, naming the LV and its type.
 * Then a cached LV (VG "cachevg": a linear LV converted to a cache with an 8 MiB cache pool on
 * the same PV) and a raid1 LV (VG "raidvg", one leg on each of two disks) are built the same
 * way and booted rw twice through lvm as roots: the second boot reads the count the first
 * wrote, and the guest sees the LV's sub-devices (cache origin and pool, raid images and
 * metadata) under its root.
 * Measured under TCG on two busy cores (builder VM and boots): thin 267 s, cache 228 s, raid1 217 s.
 */
import fs from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { writeInitramfs } from '../../mkinitramfs/build.ts';
import { makeExt4 } from '../../qemu/disks.ts';
import { buildGuestRoot, guestFact, GUEST_MARKER, parseGuestFacts } from '../../qemu/guest.ts';
import { bootVm, defaultKernel, type Vm } from '../../qemu/harness.ts';
import { buildLvmRoot, buildThinRoot } from '../kit/lvm-builder.ts';
import { COUNTER_COMMANDS } from '../kit/rw-check.ts';

/** guest shell: $rootdev = MAJ:MIN of the root filesystem's device, from stat's st_dev (the kernel's new_encode_dev) */
const ROOT_DEV_NUMBERS = 'd=$(stat -c %d /); rootdev=$(( (d >> 8) & 0xfff )):$(( (d & 0xff) | ((d >> 12) & 0xfff00) ))';
const can = ['/usr/sbin/lvm', '/usr/sbin/pdata_tools'].every((p) => fs.existsSync(p));
const dir = fs.mkdtempSync(join(tmpdir(), 'vdboot-full-lvm-thin-'));
const vms: Vm[] = [];
afterAll(async () => {
  for (const vm of vms) if (!vm.exited) await vm.kill();
  if (!process.env.VDBOOT_KEEP) fs.rmSync(dir, { recursive: true, force: true });
});

describe.skipIf(!can)('a root on a thin LV (lvm in the initramfs)', { timeout: 1_200_000 }, () => {
  it('built in a builder VM; booted rw twice through lvm lvchange (the count read back); refused by name without lvm', async () => {
    const kernel = defaultKernel();
    const withLvm = join(dir, 'initrd-lvm.img');
    const r = writeInitramfs(withLvm, { kernel, tools: ['lvm'] });
    expect(r.manifest.tools.lvm).toBe('/usr/sbin/lvm');
    // lvm, thin_check and their libraries in a squashfs image; wrappers at the programs' paths
    expect(r.parts.map((p) => p.path)).toEqual(expect.arrayContaining(['usr/lib/vdboot/lvm.sqfs', 'usr/sbin/lvm', 'usr/sbin/thin_check']));
    const rootDir = join(dir, 'root');
    buildGuestRoot(rootDir, {
      commands: [
        ...COUNTER_COMMANDS,
        guestFact('dmnames', '$(cat /sys/block/dm-*/dm/name | sort | tr "\\n" " ")'),
        // the root filesystem's device by its numbers (/proc/mounts names it /dev/mapper/NAME)
        ROOT_DEV_NUMBERS,
        guestFact('rootdev', '$(cat /sys/dev/block/$rootdev/dm/name)'),
        guestFact('rootuuid', '$(cat /sys/dev/block/$rootdev/dm/uuid)'),
      ],
    });
    const rootFs = join(dir, 'root.ext4');
    makeExt4(rootFs, { sizeMiB: 24, label: 'thinroot', fromDir: rootDir });
    const thin = await buildThinRoot(dir, { initrd: withLvm, kernel, fsImage: rootFs, vg: 'thinvg', lv: 'root', sizeMiB: 64, lvMiB: 24 });

    const boot = async (name: string, initrd: string): Promise<Vm> => {
      const vm = await bootVm({ name, kernel, initrd, append: 'root=/dev/thinvg/root rw', disks: [{ file: thin.disk }] });
      vms.push(vm);
      return vm;
    };
    for (const [run, count] of [[1, '0'], [2, '1']] as const) {
      const vm = await boot(`lvm-thin-${run}`, withLvm);
      await vm.waitFor(GUEST_MARKER, 400_000);
      const t = vm.transcript();
      const facts = parseGuestFacts(t);
      await vm.waitExit(60_000);
      expect(t).toMatch(/LVM: activated thinvg\/root as \/dev\/mapper\/thinvg-root with lvm \(thin, 24\.0 MiB/);
      expect(facts.root).toMatchObject({ fstype: 'ext4', mode: 'rw' });
      // the root is mounted by the LV's mapping name, as /proc/mounts shows it
      expect(facts.root.device).toBe('/dev/mapper/thinvg-root');
      expect(facts.facts.rootdev).toBe('thinvg-root');
      expect(facts.facts.dmnames).toMatch(/thinvg-pool-tpool/);
      expect(facts.facts.dmnames).toMatch(/thinvg-root/);
      expect(facts.facts.rootuuid).toMatch(/^LVM-[A-Za-z0-9]{64}$/);
      expect(facts.facts.count).toBe(count);
    }

    const plain = join(dir, 'initrd.img');
    writeInitramfs(plain, { kernel });
    const vm = await boot('lvm-thin-refused', plain);
    await vm.waitFor('vdboot# ', 400_000);
    const t = vm.transcript();
    await vm.kill();
    expect(t).toMatch(/LV thinvg\/root is a thin volume: vdboot activates linear and striped LVs itself, and this initramfs has no lvm program for thin volumes\. Build the initramfs with "vdboot mkinitramfs --with lvm"/);
  });
});

describe.skipIf(!can)('roots on cache and raid1 LVs (lvm in the initramfs)', { timeout: 1_200_000 }, () => {
  const cases = [
    { kind: 'cache' as const, vg: 'cachevg', subs: [/cachevg-root_corig/, /cachevg-cpool_cpool_cdata|cachevg-cpool_cdata/, /cachevg-cpool_cpool_cmeta|cachevg-cpool_cmeta/], type: 'cache' },
    { kind: 'raid1' as const, vg: 'raidvg', subs: [/raidvg-root_rimage_0/, /raidvg-root_rimage_1/, /raidvg-root_rmeta_0/, /raidvg-root_rmeta_1/], type: 'raid1' },
  ];
  for (const c of cases) {
    it(`${c.kind}: built in a builder VM; booted rw twice through lvm lvchange, the count read back`, async () => {
      const kernel = defaultKernel();
      const withLvm = join(dir, `initrd-lvm-${c.kind}.img`);
      writeInitramfs(withLvm, { kernel, tools: ['lvm'] });
      const rootDir = join(dir, `root-${c.kind}`);
      buildGuestRoot(rootDir, {
        commands: [
          ...COUNTER_COMMANDS,
          guestFact('dmnames', '$(cat /sys/block/dm-*/dm/name | sort | tr "\\n" " ")'),
          ROOT_DEV_NUMBERS,
          guestFact('rootdev', '$(cat /sys/dev/block/$rootdev/dm/name)'),
        ],
      });
      const rootFs = join(dir, `root-${c.kind}.ext4`);
      makeExt4(rootFs, { sizeMiB: 24, label: `${c.kind}root`, fromDir: rootDir });
      const built = await buildLvmRoot(dir, { kind: c.kind, initrd: withLvm, kernel, fsImage: rootFs, vg: c.vg, lv: 'root', sizeMiB: 64, lvMiB: 24 });
      fs.rmSync(rootFs);
      for (const [run, count] of [[1, '0'], [2, '1']] as const) {
        const vm = await bootVm({ name: `lvm-${c.kind}-${run}`, kernel, initrd: withLvm, append: `root=/dev/${c.vg}/root rw`, disks: built.disks.map((file) => ({ file })) });
        vms.push(vm);
        await vm.waitFor(GUEST_MARKER, 400_000);
        const t = vm.transcript();
        const facts = parseGuestFacts(t);
        await vm.waitExit(60_000);
        expect(t).toMatch(new RegExp(`LVM: activated ${c.vg}/root as /dev/mapper/${c.vg}-root with lvm \\(${c.type}, 24\\.0 MiB`));
        expect(facts.root).toMatchObject({ device: `/dev/mapper/${c.vg}-root`, fstype: 'ext4', mode: 'rw' });
        expect(facts.facts.rootdev).toBe(`${c.vg}-root`);
        for (const sub of c.subs) expect(facts.facts.dmnames).toMatch(sub);
        expect(facts.facts.count).toBe(count);
      }
    });
  }
});
