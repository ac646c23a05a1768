/**
 * Full: the real Debian guest with systemd (debootstrap --variant=minbase with systemd-sysv, udev,
 * cryptsetup and lvm2, as an encrypted install has them) in Ubuntu's encrypted layout inside
 * a dynamic VHDX on NTFS: GPT (ESP, LUKS2 → PV → VG ubuntu-vg → root LV ext4 + swap LV),
 * booted as root=vdisk:… rd.vdisk.root=/dev/mapper/ubuntu--vg-root with the key file on the
 * NTFS host beside the image. The guest's crypttab names the volume luks-<UUID>, as systemd
 * and vdboot name it, and its fstab mounts /dev/mapper/ubuntu--vg-root: systemd finds the
 * volume already open ("already active") and never asks for the passphrase, and
 * `systemctl is-system-running --wait` ends running or degraded (the guest's lvm2 activates the
 * swap LV itself, which needs udev-db.ts's entries). Measured: 568 s in all under TCG on two busy
 * cores, of which debootstrap and the disk ~6 min and the boot to power-off 195 s.
 */
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeInitramfs } from '../../mkinitramfs/build.ts';
import { convertImage, makeExt4, makeNtfs, makePartitionedDisk, ntfsAdd } from '../../qemu/disks.ts';
import { machineDebianMirror } from '../../qemu/debian-mirror.ts';
import { bootVm, defaultKernel, type Vm } from '../../qemu/harness.ts';
import { lvmAvailable } from '../kit/lvm.ts';
import { BASIC_DATA } from '../kit/host-disk.ts';
import { makeLuks2, makeLvmPv } from '../kit/stack-disk.ts';

const LUKS_UUID = '3d1e5a77-9c2b-4f80-a1b2-c3d4e5f60718';
const STATE = 'VDBOOT-SYSTEMD-STATE=';
const DONE = 'VDBOOT-SYSTEMD-DONE';
const can = lvmAvailable() && fs.existsSync('/usr/sbin/cryptsetup') && fs.existsSync('/usr/sbin/debootstrap');

let dir: string;
let initrd: string;
let hostDisk: string;
const vms: Vm[] = [];

beforeAll(async () => {
  if (!can) return;
  dir = fs.mkdtempSync(join(tmpdir(), 'vdboot-stack-systemd-'));
  initrd = join(dir, 'initrd.img');
  writeInitramfs(initrd, { kernel: defaultKernel(), without: ['ntfs-3g'] });
  const root = join(dir, 'root');
  await new Promise<void>((resolve, reject) => {
    const child = spawn('debootstrap', ['--variant=minbase', '--include=systemd-sysv,udev,cryptsetup,lvm2', 'bookworm', root, machineDebianMirror()], { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    child.stderr!.on('data', (d: Buffer) => { err += d.toString(); });
    child.on('error', reject);
    child.on('close', (code) => (code === 0 ? resolve() : reject(new Error(`debootstrap failed (exit ${code}): ${err.trim().split('\n').slice(-3).join(' | ')}`))));
  });
  fs.writeFileSync(join(root, 'etc/crypttab'), `luks-${LUKS_UUID} UUID=${LUKS_UUID} none luks,discard\n`);
  fs.writeFileSync(join(root, 'etc/fstab'), '/dev/mapper/ubuntu--vg-root / ext4 errors=remount-ro 0 1\n/dev/mapper/ubuntu--vg-swap_1 none swap sw 0 0\n');
  fs.writeFileSync(join(root, 'etc/hostname'), 'encrypted-guest\n');
  // After the boot has finished: the state, what systemd-cryptsetup said, then power off.
  fs.writeFileSync(join(root, 'etc/systemd/system/vdboot-state.service'), [
    '[Unit]',
    'Description=vdboot end-to-end: report the system state',
    '[Service]',
    'Type=simple',
    `ExecStart=/bin/sh -c 'systemctl is-system-running --wait >/dev/null; s=$(systemctl is-system-running); journalctl -b --no-pager -o cat -u "systemd-cryptsetup@*" > /dev/ttyS0; systemctl --failed --no-legend > /dev/ttyS0; swapon --show=NAME --noheadings > /dev/ttyS0; echo "${STATE}$s" > /dev/ttyS0; echo ${DONE} > /dev/ttyS0; systemctl --no-block poweroff'`,
    '[Install]',
    'WantedBy=multi-user.target',
    '',
  ].join('\n'));
  fs.mkdirSync(join(root, 'etc/systemd/system/multi-user.target.wants'), { recursive: true });
  fs.symlinkSync('/etc/systemd/system/vdboot-state.service', join(root, 'etc/systemd/system/multi-user.target.wants/vdboot-state.service'));
  const rootFs = join(dir, 'root.ext4');
  makeExt4(rootFs, { sizeMiB: 480, label: 'root', fromDir: root });
  fs.rmSync(root, { recursive: true, force: true });
  const swap = join(dir, 'swap.img');
  fs.writeFileSync(swap, '');
  fs.truncateSync(swap, 16 << 20);
  execFileSync('mkswap', ['-q', swap]);
  const lvm = makeLvmPv(dir, 500, 'ubuntu-vg', [{ name: 'root', sizeMiB: 480, image: rootFs }, { name: 'swap_1', sizeMiB: 16, image: swap }]);
  fs.rmSync(rootFs);
  const keyFile = join(dir, 'root.key');
  fs.writeFileSync(keyFile, Buffer.from('the key file beside the image on the NTFS host\n'));
  const luks = makeLuks2(dir, lvm.pv, keyFile, 'a passphrase nobody types', LUKS_UUID);
  fs.rmSync(lvm.pv);
  const disk = join(dir, 'disk.img');
  makePartitionedDisk(disk, { table: 'gpt', partitions: [{ sizeMiB: 2, type: 'uefi', name: 'esp' }, { image: luks.file, name: 'cryptroot' }] });
  fs.rmSync(luks.file);
  const vhdx = join(dir, 'ubuntu.vhdx');
  convertImage(disk, vhdx, 'vhdx', ['subformat=dynamic']);
  fs.rmSync(disk);
  // the key file beside the image on the NTFS host
  const ntfs = join(dir, 'host.ntfs');
  makeNtfs(ntfs, { sizeMiB: 700, label: 'Windows' });
  ntfsAdd(ntfs, { 'VMs/Ubuntu/ubuntu.vhdx': { hostFile: vhdx }, 'VMs/Ubuntu/root.key': { hostFile: keyFile } });
  fs.rmSync(vhdx);
  hostDisk = join(dir, 'host.img');
  makePartitionedDisk(hostDisk, { table: 'gpt', partitions: [{ image: ntfs, type: BASIC_DATA, name: 'Basic data partition' }] });
  fs.rmSync(ntfs);
}, 1_200_000);

afterAll(async () => {
  for (const vm of vms) if (!vm.exited) await vm.kill();
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

describe.skipIf(!can)('full: a Debian systemd guest from LUKS+LVM inside a dynamic VHDX on NTFS', { timeout: 1_200_000 }, () => {
  it('systemd finds luks-<UUID> already open, never asks for the passphrase, and ends running or degraded', async () => {
    const vm = await bootVm({
      initrd, name: 'stack-systemd', memoryMiB: 768,
      append: 'root=vdisk:LABEL=Windows:/VMs/Ubuntu/ubuntu.vhdx rd.vdisk.mode=snapshot rd.vdisk.root=/dev/mapper/ubuntu--vg-root rd.luks.key=/VMs/Ubuntu/root.key:LABEL=Windows systemd.show_status=1',
      disks: [{ file: hostDisk, interface: 'virtio-blk', snapshot: true }],
    });
    vms.push(vm);
    await vm.waitFor(DONE, 900_000);
    const t = vm.transcript();
    await vm.waitExit(180_000);
    expect(t).toMatch(new RegExp(`unlocked /dev/dm-\\d+ with the key file /VMs/Ubuntu/root.key on LABEL=Windows: /dev/mapper/luks-${LUKS_UUID}`));
    expect(t).not.toMatch(/Please enter passphrase|Passphrase for/);
    expect(t).toMatch(new RegExp(`Volume luks-${LUKS_UUID} already active`));
    const state = new RegExp(`${STATE}(\\S+)`).exec(t)?.[1];
    expect(['running', 'degraded'], t.slice(-4000)).toContain(state);
  });
});
