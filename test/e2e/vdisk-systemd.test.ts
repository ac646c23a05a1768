/**
 * End to end with a real Debian guest running systemd (debootstrap --variant=minbase
 * --include=systemd-sysv): the image is a raw disk on NTFS, booted by root=vdisk: through
 * the direct path. A service writes a file and runs `systemctl poweroff`; systemd's own
 * shutdown must reach vdboot's /run/initramfs/shutdown (systemd's initrd interface),
 * which takes the image's devices down. On the host the file is in the image and NTFS is
 * clean.
 */
import { execFileSync, spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeInitramfs } from '../../mkinitramfs/build.ts';
import { makeExt4, makeNtfs, makePartitionedDisk, ntfsRead } from '../../qemu/disks.ts';
import { bootVm, defaultKernel, type Vm } from '../../qemu/harness.ts';
import { machineDebianMirror } from '../../qemu/debian-mirror.ts';
import { ROOT_TYPE } from '../kit/guest-disk.ts';
import { BASIC_DATA, expectNtfsClean, extractRange } from '../kit/host-disk.ts';

const MARKER = 'VDBOOT-SYSTEMD-GUEST-UP';
const NOTE = 'written under systemd on a vdisk root';

let dir: string;
let initrd: string;
let hostDisk: string;
let ntfsOffset = 0;
let ntfsSize = 0;
const vms: Vm[] = [];

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'vdboot-e2e-systemd-'));
  initrd = join(dir, 'initrd.img');
  // without ntfs-3g (included by default on kernels without ntfs3): NTFS hosts through vdboot's direct path alone
  writeInitramfs(initrd, { kernel: defaultKernel(), without: ['ntfs-3g'] });
  const root = join(dir, 'root');
  // Asynchronous: debootstrap can take over a minute on a busy machine, longer than a test
  // worker may go without answering vitest.
  await new Promise<void>((resolve, reject) => {
    const child = spawn('debootstrap', ['--variant=minbase', '--include=systemd-sysv', 'bookworm', root, machineDebianMirror()], { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    child.stderr!.on('data', (d: Buffer) => { err += d.toString(); });
    child.on('error', reject);
    child.on('close', (code) => (code === 0 ? resolve() : reject(new Error(`debootstrap failed (exit ${code}): ${err.trim().split('\n').slice(-3).join(' | ')}`))));
  });
  // A service that proves the system is up, writes the file, and powers off the systemd way.
  writeFileSync(join(root, 'etc/systemd/system/vdboot-test.service'), [
    '[Unit]',
    'Description=vdboot end-to-end test',
    'After=multi-user.target',
    '[Service]',
    'Type=oneshot',
    `ExecStart=/bin/sh -c 'echo ${MARKER} > /dev/ttyS0; mkdir -p /home; echo -n "${NOTE}" > /home/note.txt; sync; systemctl --no-block poweroff'`,
    '[Install]',
    'WantedBy=multi-user.target',
    '',
  ].join('\n'));
  mkdirSync(join(root, 'etc/systemd/system/multi-user.target.wants'), { recursive: true });
  symlinkSync('/etc/systemd/system/vdboot-test.service', join(root, 'etc/systemd/system/multi-user.target.wants/vdboot-test.service'));
  writeFileSync(join(root, 'etc/hostname'), 'vdisk-guest\n');
  const fsImg = join(dir, 'root.ext4');
  makeExt4(fsImg, { sizeMiB: 400, label: 'debian', fromDir: root });
  rmSync(root, { recursive: true, force: true });
  const guest = join(dir, 'debian.img');
  makePartitionedDisk(guest, { table: 'gpt', partitions: [{ sizeMiB: 2, type: 'uefi', name: 'esp' }, { image: fsImg, type: ROOT_TYPE, name: 'debian' }] });
  rmSync(fsImg);
  const ntfs = join(dir, 'host.ntfs');
  makeNtfs(ntfs, { sizeMiB: 640, label: 'Windows', files: { '/VMs/Debian.img': { hostFile: guest } } });
  rmSync(guest);
  hostDisk = join(dir, 'host.img');
  const layout = makePartitionedDisk(hostDisk, { table: 'gpt', partitions: [{ image: ntfs, type: BASIC_DATA, name: 'Basic data partition' }] });
  rmSync(ntfs);
  ntfsOffset = layout[0]!.offset;
  ntfsSize = layout[0]!.size;
}, 600_000);

afterAll(async () => {
  for (const vm of vms) if (!vm.exited) await vm.kill();
  if (dir && !process.env.VDBOOT_KEEP) rmSync(dir, { recursive: true, force: true });
});

describe('end to end: a Debian guest with systemd on a vdisk root', { timeout: 600_000 }, () => {
  it('systemctl poweroff reaches vdboot\'s shutdown through systemd\'s hand-off; the file is in the image, NTFS is clean', async () => {
    const vm = await bootVm({
      initrd,
      append: 'root=vdisk:LABEL=Windows:/VMs/Debian.img rw systemd.show_status=1',
      disks: [{ file: hostDisk, interface: 'virtio-blk' }],
      memoryMiB: 768,
      name: 'vdisk-systemd',
    });
    vms.push(vm);
    await vm.waitFor(MARKER, 400_000);
    const exit = await vm.waitExit(180_000);
    expect(exit.killed).toBeFalsy();
    const t = vm.transcript();
    expect(t).toMatch(/vdisk0: \/VMs\/Debian\.img on \/dev\/vda1 .*direct: the image is fully mappable/);
    expect(t).toMatch(/shutdown hand-off \(poweroff\)/);
    expect(t).not.toMatch(/entered \/run\/initramfs/); // systemd pivoted, not vdboot
    expect(t).toMatch(/reboot: Power down/);
    // The image on the host holds what the guest wrote.
    const part = extractRange(hostDisk, ntfsOffset, ntfsSize, join(dir, 'after.ntfs'));
    const image = join(dir, 'after.img');
    writeFileSync(image, ntfsRead(part, '/VMs/Debian.img'));
    const rootPart = join(dir, 'after-root.ext4');
    execFileSync('dd', [`if=${image}`, `of=${rootPart}`, 'bs=1M', 'skip=3', 'status=none']);
    expect(execFileSync('debugfs', ['-R', 'cat /home/note.txt', rootPart], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] })).toBe(NOTE);
    // e2fsck: the guest's root was unmounted cleanly (or at least is consistent).
    execFileSync('e2fsck', ['-n', '-f', rootPart], { stdio: 'ignore' });
    expectNtfsClean(hostDisk, ntfsOffset, ntfsSize);
  });
});
