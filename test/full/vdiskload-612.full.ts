/**
 * npm run test:full — vdiskload on Linux 6.12, whose NTFS host vdboot mounts with the
 * kernel's ntfs3 (test/e2e/vdiskload.test.ts covers ntfs-3g on 6.1 and ext4): the guest
 * boots rw through the loop path from an image on NTFS, then attaches a dynamic VHDX lying
 * on that ntfs3 mount (expanded in place through ntfs3, then the loop path: vdboot maps
 * ntfs3 files through the mounted filesystem), reads and writes a file inside, refuses
 * --map direct, detaches. On the host: qemu-img check, the guest's file, NTFS clean.
 */
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { writeInitramfs } from '../../mkinitramfs/build.ts';
import { convertImage, makeExt4, makeNtfs, makePartitionedDisk, ntfsRead } from '../../qemu/disks.ts';
import { guestFact, parseGuestFacts, GUEST_MARKER } from '../../qemu/guest.ts';
import { bootVm, cachedKernel, type Vm } from '../../qemu/harness.ts';
import { makeGuestDisk } from '../kit/guest-disk.ts';
import { BASIC_DATA, expectNtfsClean, fileInImage } from '../kit/host-disk.ts';

const kernel = cachedKernel('6.12');
const HELLO = 'hello from inside the image';
const NOTE = 'written through vdiskload on ntfs3';
const V = '/run/initramfs/vdiskload';
const IMAGE = '/run/vdboot/host/VMs/data.vhdx';
const dir = mkdtempSync(join(tmpdir(), 'vdboot-full-vdiskload-'));
const vms: Vm[] = [];
afterAll(async () => {
  for (const vm of vms) if (!vm.exited) await vm.kill();
  if (!process.env.VDBOOT_KEEP) rmSync(dir, { recursive: true, force: true });
});

function runRc(key: string, cmd: string): string[] {
  return [`out=$(${cmd} 2>&1); rc=$?`, guestFact(key, '$rc:$(echo "$out" | tr \'\\n\' \'|\')')];
}

describe.skipIf(!kernel)('vdiskload on 6.12 (ntfs3 host)', () => {
  it('a dynamic VHDX on the ntfs3 mount: expanded, loop, read and written, --map direct refused, detached; qemu-img check passes and the file is in the image, NTFS clean', async () => {
    const initrd = join(dir, 'initrd.img');
    writeInitramfs(initrd, { kernel: kernel! });
    mkdirSync(join(dir, 'guest'));
    const root = makeGuestDisk(join(dir, 'guest'), {
      commands: [
        'mkdir -p /mnt/a',
        guestFact('hostfs', '$(awk \'$2 == "/run/vdboot/host" { print $3 }\' /proc/mounts)'),
        ...runRc('direct', `${V} --ro --map direct ${IMAGE}`),
        ...runRc('attach', `${V} --name nt ${IMAGE}`),
        `mount -t ext4 /dev/mapper/ntp2 /mnt/a && ${guestFact('read', '$(cat /mnt/a/hello.txt)')} && echo "${NOTE}" > /mnt/a/guest.txt && umount /mnt/a && ${guestFact('wrote', 'ok')}`,
        ...runRc('detach', `${V} -d nt`),
        'sync',
      ],
      then: { exec: '/run/initramfs/shutdown poweroff' },
    }).raw;
    const fsImg = join(dir, 'data.ext4');
    makeExt4(fsImg, { sizeMiB: 12, label: 'data', files: { '/hello.txt': HELLO } });
    const raw = join(dir, 'data.raw');
    makePartitionedDisk(raw, { table: 'gpt', partitions: [{ sizeMiB: 2, type: 'uefi', name: 'esp' }, { image: fsImg, name: 'data' }] });
    const vhdx = join(dir, 'data.vhdx');
    convertImage(raw, vhdx, 'vhdx', ['block_size=1M']);
    const ntfs = join(dir, 'host.ntfs');
    makeNtfs(ntfs, { sizeMiB: 100, label: 'Windows', files: { '/VMs/linux.img': { hostFile: root }, '/VMs/data.vhdx': { hostFile: vhdx } } });
    const disk = join(dir, 'host.img');
    const [layout] = makePartitionedDisk(disk, { table: 'gpt', partitions: [{ image: ntfs, type: BASIC_DATA, name: 'Basic data partition' }] });

    const vm = await bootVm({ kernel: kernel!, initrd, append: 'root=vdisk:LABEL=Windows:/VMs/linux.img rd.vdisk.map=loop rw', disks: [{ file: disk, interface: 'virtio-blk' }], name: 'vdiskload-612' });
    vms.push(vm);
    await vm.waitFor(GUEST_MARKER, 600_000);
    const facts = parseGuestFacts(vm.transcript()).facts;
    await vm.waitExit(120_000);
    const t = vm.transcript();
    expect(facts.hostfs, t).toBe('ntfs3');
    expect(facts.direct).toMatch(/^1:vdiskload: --map direct: \/run\/vdboot\/host\/VMs\/data\.vhdx cannot be mapped directly: vdboot maps files of ntfs3 through the mounted filesystem/);
    expect(facts.attach, t).toMatch(/^0:vdiskload: expanding .*\|nt: \/run\/vdboot\/host\/VMs\/data\.vhdx \(vhdx dynamic, 16 MiB, rw\) on \/dev\/vda1 through \/dev\/mapper\/vdhost \(ntfs3, mounted at \/run\/vdboot\/host\)\|  data path: loop: /);
    expect(facts.read).toBe(HELLO);
    expect(facts.wrote).toBe('ok');
    expect(facts.detach).toBe('0:nt: detached /run/vdboot/host/VMs/data.vhdx|');
    expect(t).toMatch(/reboot: Power down/);

    const part = join(dir, 'after.ntfs');
    writeFileSync(part, readFileSync(disk).subarray(layout!.offset, layout!.offset + layout!.size));
    const after = join(dir, 'data-after.vhdx');
    writeFileSync(after, ntfsRead(part, '/VMs/data.vhdx'));
    const check = spawnSync('qemu-img', ['check', '-f', 'vhdx', after], { encoding: 'utf8' });
    expect(check.status, `${check.stdout}${check.stderr}`).toBe(0);
    expect(fileInImage(dir, after, 'vhdx', '/guest.txt')).toBe(`${NOTE}\n`);
    expectNtfsClean(disk, layout!.offset, layout!.size);
  });
});
