/**
 * End to end: the tmpfs-root system's own LVM command line,
 *   root=tmpfs:/dev/mapper/vg1-data rd.tmpfs.imgfile=images/rootfs.tar.gz rd.tmpfs.size=… rd.lvm.lv=vg1/data
 * where vg1 is a striped VG over two disks, one of its PVs inside LUKS2: a wrong passphrase
 * typed on the serial console is counted (try 1 of 3), the right one opens it, the striped LV
 * is activated (and only the LVs rd.lvm.lv names), the archive on its ext4 is unpacked into
 * the tmpfs root. The tmpfs system's swap is an LV of the same VG (resume=/dev/vg1/swap
 * rd.lvm.lv=vg1/swap): the guest reads the kernel's resume device back from /sys/power/resume. The LV's ext4 is written stripe by stripe where lvm2's own report places them
 * (test/kit/lvm-vg.ts), so a wrong stripe order or size in vdboot's table fails the mount or
 * the archive's checksum. The guest prints /which from the archive and the dm devices it sees.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeInitramfs } from '../../mkinitramfs/build.ts';
import { makeExt4, makePartitionedDisk } from '../../qemu/disks.ts';
import { buildGuestRoot, GUEST_MARKER, guestFact, parseGuestFacts } from '../../qemu/guest.ts';
import { bootVm, defaultKernel, type Vm } from '../../qemu/harness.ts';
import { lvmAvailable } from '../kit/lvm.ts';
import { makeLvmVg } from '../kit/lvm-vg.ts';
import { makeLuks2 } from '../kit/stack-disk.ts';

const LUKS_UUID = '7e3f10aa-2b4c-4d5e-8f60-112233445566';
const PASSPHRASE = 'tmpfs on stripes';
const can = lvmAvailable() && fs.existsSync('/usr/sbin/cryptsetup');

let dir: string;
let initrd: string;
let disks: [string, string];
const vms: Vm[] = [];

beforeAll(() => {
  if (!can) return;
  dir = fs.mkdtempSync(join(tmpdir(), 'vdboot-lvm-tmpfs-'));
  initrd = join(dir, 'initrd.img');
  writeInitramfs(initrd, { kernel: defaultKernel() });
  const root = join(dir, 'root');
  buildGuestRoot(root, {
    files: { which: 'the archive on the striped LV\n' },
    commands: [
      guestFact('which', '$(cat /which)'),
      guestFact('resume', '$(cat /sys/power/resume)'),
      'for d in /sys/block/dm-*; do [ -e "$d/dm/name" ] && echo "VDBOOT-GUEST dm.$(cat $d/dm/name)=$(cat $d/dev)"; done',
    ],
  });
  const archive = join(dir, 'rootfs.tar.gz');
  execFileSync('tar', ['-czf', archive, '-C', root, '.']);
  const dataFs = join(dir, 'data.ext4');
  makeExt4(dataFs, { sizeMiB: 16, label: 'tmpfs-images', files: { 'images/rootfs.tar.gz': fs.readFileSync(archive) } });
  const swap = join(dir, 'swap.img');
  fs.writeFileSync(swap, '');
  fs.truncateSync(swap, 4 << 20);
  execFileSync('mkswap', ['-q', swap]);
  const vg = makeLvmVg(dir, 'vg1', [{ name: 'a.pv', sizeMiB: 14 }, { name: 'b.pv', sizeMiB: 14 }], [
    { name: 'data', sizeMiB: 16, stripes: 2, stripeKiB: 64, image: dataFs },
    { name: 'other', sizeMiB: 4 },
    { name: 'swap', sizeMiB: 4, image: swap },
  ]);
  const keyFile = join(dir, 'unused.key');
  fs.writeFileSync(keyFile, 'a key file this boot is not given\n');
  const luks = makeLuks2(dir, vg.pvs[0]!, keyFile, PASSPHRASE, LUKS_UUID);
  disks = [join(dir, 'disk-a.img'), join(dir, 'disk-b.img')];
  makePartitionedDisk(disks[0], { table: 'gpt', partitions: [{ image: luks.file, name: 'cryptpv' }] });
  makePartitionedDisk(disks[1], { table: 'gpt', partitions: [{ image: vg.pvs[1]!, name: 'pv', type: 'E6D6D379-F507-44C2-A23C-238F2A3DF928' }] });
  for (const f of [archive, dataFs, swap, ...vg.pvs, luks.file]) fs.rmSync(f);
}, 300_000);

afterAll(async () => {
  for (const vm of vms) if (!vm.exited) await vm.kill();
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

describe.skipIf(!can)('end to end: root=tmpfs: from a striped LV behind LUKS (the tmpfs-root system\'s LVM command line)', { timeout: 400_000 }, () => {
  it('a wrong passphrase is counted, the right one opens the PV; rd.lvm.lv activates the striped LV and the swap only; resume= hands the swap to the kernel; the archive boots', async () => {
    const vm = await bootVm({
      initrd, name: 'lvm-tmpfs-striped',
      append: 'root=tmpfs:/dev/mapper/vg1-data rd.tmpfs.imgfile=images/rootfs.tar.gz rd.tmpfs.size=48M rd.lvm.lv=vg1/data rd.lvm.lv=vg1/swap resume=/dev/vg1/swap',
      disks: disks.map((file) => ({ file, interface: 'virtio-blk' as const, snapshot: true })),
    });
    vms.push(vm);
    const prompt = `Passphrase for /dev/vda1 (luks-${LUKS_UUID}): `;
    await vm.waitFor(prompt, 240_000);
    vm.send('not the passphrase\n');
    await vm.waitFor('No key available with this passphrase (try 1 of 3)', 120_000);
    await vm.waitFor(prompt, 60_000); // the second try, after the warning line
    vm.send(`${PASSPHRASE}\n`);
    await vm.waitFor(GUEST_MARKER, 240_000);
    const t = vm.transcript();
    const facts = parseGuestFacts(t);
    await vm.waitExit(60_000);
    expect(t).not.toContain(PASSPHRASE);
    expect(t).toMatch(new RegExp(`unlocked /dev/vda1: /dev/mapper/luks-${LUKS_UUID}`));
    expect(t).toMatch(/LVM: activated vg1\/data as \/dev\/mapper\/vg1-data \(striped, 16\.0 MiB/);
    expect(t).not.toMatch(/activated vg1\/other/);
    expect(facts.root.fstype).toBe('tmpfs');
    expect(facts.facts.which).toBe('the archive on the striped LV');
    expect(facts.facts['dm.vg1-data']).toMatch(/^\d+:\d+$/);
    expect(facts.facts['dm.vg1-other']).toBeUndefined();
    // resume=: the swap LV vdboot activated is the kernel's resume device, set before the archive's host was mounted
    expect(facts.facts['dm.vg1-swap']).toMatch(/^\d+:\d+$/);
    expect(facts.facts.resume).toBe(facts.facts['dm.vg1-swap']);
    expect(t).toMatch(/resume=\/dev\/vg1\/swap: no hibernation image on \/dev\/mapper\/vg1-swap; booting normally/);
    expect(t.indexOf('resume=/dev/vg1/swap: no hibernation image')).toBeLessThan(t.indexOf('mounted /dev/mapper/vg1-data (ext4, ro'));
  });
});
