/**
 * End to end: Ubuntu's encrypted layout — a /boot partition, then LUKS2 → LVM PV → VG
 * "ubuntu-vg" → root LV (ext4) + swap LV — booted by vdboot under QEMU.
 *  1. plain root, root=/dev/ubuntu-vg/root rw, the key file on the /boot partition
 *     (rd.luks.key=/keys/root.key:LABEL=boot): the guest counts its boot in /count;
 *  2. the same disk again with the passphrase typed on the serial console: the guest reads
 *     the count the first boot wrote (the rw path proven by reading back);
 *  3. the same layout inside a dynamic VHDX on NTFS (root=vdisk:…, snapshot), the
 *     passphrase typed on the console, the root found by rd.vdisk.root=/dev/mapper/ubuntu--vg-root.
 * The disks are built without device-mapper (test/kit/stack-disk.ts); the oracle is the
 * guest's own view (/proc/mounts, its init running, the count it read back) and, after the
 * rw boots, e2fsck -fn and debugfs on the root LV's bytes decrypted with the volume key.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeInitramfs } from '../../mkinitramfs/build.ts';
import { convertImage, makeExt4, makeNtfs, makePartitionedDisk, ntfsAdd } from '../../qemu/disks.ts';
import { buildGuestRoot, GUEST_MARKER, parseGuestFacts } from '../../qemu/guest.ts';
import { bootVm, defaultKernel, type Vm } from '../../qemu/harness.ts';
import { lvmAvailable } from '../kit/lvm.ts';
import { COUNTER_COMMANDS } from '../kit/rw-check.ts';
import { decryptRange, makeLuks2, makeLvmPv, type LuksImage, type LvmLayout } from '../kit/stack-disk.ts';

const LUKS_UUID = '5a1c0de1-7b2e-4c3d-9e8f-0123456789ab';
const PASSPHRASE = 'correct horse battery';
const can = lvmAvailable() && fs.existsSync('/usr/sbin/cryptsetup');

let dir: string;
let initrd: string;
let disk: string;
let hostDisk: string;
let luks: LuksImage;
let lvm: LvmLayout;
let luksPartOffset: number;
const vms: Vm[] = [];

beforeAll(() => {
  if (!can) return;
  dir = fs.mkdtempSync(join(tmpdir(), 'vdboot-luks-lvm-'));
  initrd = join(dir, 'initrd.img');
  writeInitramfs(initrd, { kernel: defaultKernel() });
  const rootDir = join(dir, 'root');
  // An image boot ends through vdboot's shutdown hand-off, which must close the LV and the
  // LUKS volume before the image's partitions; a plain root powers off as usual.
  buildGuestRoot(rootDir, { commands: [...COUNTER_COMMANDS, `if [ -x /run/initramfs/shutdown ]; then echo ${GUEST_MARKER}; sync; exec /run/initramfs/shutdown poweroff; fi`] });
  const rootFs = join(dir, 'root.ext4');
  makeExt4(rootFs, { sizeMiB: 24, label: 'ubuntu root', fromDir: rootDir });
  const swap = join(dir, 'swap.img');
  fs.writeFileSync(swap, '');
  fs.truncateSync(swap, 4 << 20);
  execFileSync('mkswap', ['-q', swap]);
  lvm = makeLvmPv(dir, 32, 'ubuntu-vg', [{ name: 'root', sizeMiB: 24, image: rootFs }, { name: 'swap_1', sizeMiB: 4, image: swap }]);
  const keyFile = join(dir, 'root.key');
  fs.writeFileSync(keyFile, Buffer.from('a key file of 64 bytes, not a passphrase: it may hold newlines\n\n'));
  luks = makeLuks2(dir, lvm.pv, keyFile, PASSPHRASE, LUKS_UUID);
  const boot = join(dir, 'boot.ext4');
  makeExt4(boot, { sizeMiB: 8, label: 'boot', files: { 'keys/root.key': fs.readFileSync(keyFile) } });
  disk = join(dir, 'disk.img');
  luksPartOffset = makePartitionedDisk(disk, { table: 'gpt', partitions: [{ sizeMiB: 2, type: 'uefi', name: 'esp' }, { image: boot, name: 'boot' }, { image: luks.file, name: 'cryptroot' }] })[2]!.offset;
  // The same layout as the disk of a VM: a dynamic VHDX on an NTFS partition.
  const vhdx = join(dir, 'ubuntu.vhdx');
  convertImage(disk, vhdx, 'vhdx', ['subformat=dynamic']);
  const ntfs = join(dir, 'host.ntfs');
  makeNtfs(ntfs, { sizeMiB: 96, label: 'Windows' });
  ntfsAdd(ntfs, { 'VMs/Ubuntu/ubuntu.vhdx': { hostFile: vhdx } });
  hostDisk = join(dir, 'host.img');
  makePartitionedDisk(hostDisk, { table: 'gpt', partitions: [{ image: ntfs, type: 'EBD0A0A2-B9E5-4433-87C0-68B6B72699C7', name: 'Windows' }] });
  for (const f of [rootFs, swap, lvm.pv, luks.file, boot, vhdx, ntfs]) fs.rmSync(f);
}, 300_000);

afterAll(async () => {
  for (const vm of vms) if (!vm.exited) await vm.kill();
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

async function boot(name: string, append: string, file: string, snapshot: boolean): Promise<Vm> {
  const vm = await bootVm({ initrd, append, disks: [{ file, interface: 'virtio-blk', snapshot }], name });
  vms.push(vm);
  return vm;
}

describe.skipIf(!can)('end to end: LUKS2 → LVM → ext4 (Ubuntu\'s encrypted layout)', { timeout: 400_000 }, () => {
  it('plain root: root=/dev/ubuntu-vg/root rw with the key file on /boot; the guest writes its count', async () => {
    const vm = await boot('luks-keyfile', 'root=/dev/ubuntu-vg/root rw rd.luks.key=/keys/root.key:LABEL=boot', disk, false);
    await vm.waitFor(GUEST_MARKER, 240_000);
    const t = vm.transcript();
    const facts = parseGuestFacts(t);
    await vm.waitExit(60_000);
    expect(t).toMatch(new RegExp(`/dev/vda3 is encrypted \\(LUKS2 aes-xts-plain64 512-bit, data at byte \\d+, key slots 0 \\(pbkdf2\\), 1 \\(pbkdf2\\)\\): unlocking as /dev/mapper/luks-${LUKS_UUID}`));
    expect(t).toMatch(new RegExp(`unlocked /dev/vda3 with the key file /keys/root.key on LABEL=boot: /dev/mapper/luks-${LUKS_UUID}`));
    expect(t).toMatch(/LVM: activated ubuntu-vg\/root as \/dev\/mapper\/ubuntu--vg-root \(linear, 24\.0 MiB/);
    expect(t).not.toMatch(/Passphrase for/);
    // mounted by the LV's mapping name, not dm-N: what dracut and initramfs-tools leave in /proc/mounts
    expect(facts.root).toMatchObject({ device: '/dev/mapper/ubuntu--vg-root', fstype: 'ext4', mode: 'rw' });
    expect(facts.facts.count).toBe("0");
  });

  it('plain root again, the passphrase typed on the serial console: the guest reads the count the first boot wrote', async () => {
    const vm = await boot('luks-passphrase', 'root=/dev/mapper/ubuntu--vg-root rw', disk, false);
    await vm.waitFor(`Passphrase for /dev/vda3 (luks-${LUKS_UUID}): `, 240_000);
    vm.send(`${PASSPHRASE}\n`);
    await vm.waitFor(GUEST_MARKER, 240_000);
    const t = vm.transcript();
    const facts = parseGuestFacts(t);
    await vm.waitExit(60_000);
    expect(t).not.toContain(PASSPHRASE); // echo off
    expect(t).toMatch(new RegExp(`unlocked /dev/vda3: /dev/mapper/luks-${LUKS_UUID}`));
    expect(facts.facts.count).toBe('1');
    expect(facts.root.mode).toBe('rw');
    // the root LV's bytes, decrypted with the volume key: a clean ext4 holding count 2
    const rootLv = decryptRange(disk, luksPartOffset, luks, lvm.lvs.root!.offset, lvm.lvs.root!.size, join(dir, 'root-after.ext4'));
    execFileSync('e2fsck', ['-fn', rootLv]);
    expect(execFileSync('debugfs', ['-R', 'cat /count', rootLv], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim()).toBe('2');
  });

  it('inside a dynamic VHDX on NTFS: root=vdisk:… rd.vdisk.root=/dev/mapper/ubuntu--vg-root, the passphrase typed on the console', async () => {
    const vm = await boot('luks-vhdx', 'root=vdisk:LABEL=Windows:/VMs/Ubuntu/ubuntu.vhdx rd.vdisk.mode=snapshot rd.vdisk.root=/dev/mapper/ubuntu--vg-root', hostDisk, true);
    await vm.waitFor(/Passphrase for \/dev\/dm-\d+ /, 240_000);
    vm.send(`${PASSPHRASE}\n`);
    await vm.waitFor(GUEST_MARKER, 240_000);
    const t = vm.transcript();
    const facts = parseGuestFacts(t);
    expect(t).toMatch(/the root is found after unlocking and activation: rd\.vdisk\.root=\/dev\/mapper\/ubuntu--vg-root, looked for behind partition 3 \(LUKS\)/);
    expect(t).toMatch(/LVM: activated ubuntu-vg\/root as \/dev\/mapper\/ubuntu--vg-root/);
    expect(facts.facts.count).toBe('0'); // the image was made from the disk before the plain-root boots
    expect(facts.root.device).toBe('/dev/mapper/ubuntu--vg-root');
    await vm.waitExit(60_000);
    const end = vm.transcript().slice(t.length);
    const order = ['ubuntu--vg-root', `luks-${LUKS_UUID}`, 'vdisk0p3'].map((n) => end.indexOf(`removed /dev/mapper/${n}`));
    expect(order.every((i) => i >= 0), end).toBe(true);
    expect(order).toEqual([...order].sort((a, b) => a - b));
    expect(end).not.toMatch(/could not remove/);
  });
});
