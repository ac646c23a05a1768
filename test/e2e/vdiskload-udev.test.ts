/**
 * End to end, one boot (Linux 6.1, QEMU): vdiskload under udev, over nbd, failing half-way,
 * and detaching a boot device that has no record.
 *
 * The guest is the busybox test guest on a plain ext4 root, with systemd-udevd (udevadm),
 * dmsetup and the device-mapper rules Debian ships (55-dm, 60-persistent-storage-dm,
 * 95-dm-notify), util-linux's mount, qemu-nbd, and vdboot's static binary as
 * /usr/sbin/vdiskload, all copied from this machine with their shared libraries. vdboot
 * attaches an image at boot (rd.vdisk.attach, loop path) from a second disk. In the guest:
 * - udevd runs; vdiskload attaches a dynamic VHDX; after `udevadm settle`,
 *   /dev/disk/by-label/… and /dev/disk/by-uuid/… point at its partition's dm device and
 *   `mount LABEL=…` (util-linux, which asks udev's links) reads a file; after -d the links
 *   are gone; attached --ro, the link points at the read-only partition device;
 * - `--map nbd` serves a VHDX through qemu-nbd, a file is written and read back on the host;
 *   a compressed qcow2 goes through nbd by itself (auto);
 * - a partition's name taken is refused before anything is made; a partition's dm uuid
 *   taken by another device makes device-mapper refuse it after the loop and the first dm
 *   devices are made: all of them are taken down again (-l, /sys/block and the loops' backing
 *   files show nothing left);
 * - the boot's record is removed; `-d` of the boot-attached image finds its dm devices by
 *   uuid and the loops under them in sysfs, and takes both down.
 */
import { execFileSync } from 'node:child_process';
import { chmodSync, copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { sharedLibraries, writeInitramfs } from '../../mkinitramfs/build.ts';
import { convertImage, makeExt4, makePartitionedDisk } from '../../qemu/disks.ts';
import { buildGuestRoot, guestFact, parseGuestFacts, GUEST_MARKER } from '../../qemu/guest.ts';
import { bootVm, defaultKernel, kernelVersion, type Vm } from '../../qemu/harness.ts';
import { ROOT_TYPE } from '../kit/guest-disk.ts';
import { fileInImage } from '../kit/host-disk.ts';

const HELLO = 'hello from a partition udev named';
const UDEV_UUID = '6a0c9f1e-2b3d-4c5e-8f70-9a1b2c3d4e5f';
const V = '/usr/sbin/vdiskload';
const NOTE_NBD = 'written through vdiskload --map nbd';
const RULES = ['55-dm.rules', '60-persistent-storage-dm.rules', '95-dm-notify.rules'];

let dir: string;
let initrd: string;
const vms: Vm[] = [];

function runRc(key: string, cmd: string): string[] {
  return [`out=$(${cmd} 2>&1); rc=$?`, guestFact(key, '$rc:$(echo "$out" | tr \'\\n\' \'|\')')];
}

/** Copies a program of this machine into the guest tree at `at` (default: its own path), with its shared libraries. */
function copyProgram(root: string, program: string, at = program): void {
  for (const f of [program, ...sharedLibraries(program)]) {
    const dest = join(root, f === program ? at : f);
    mkdirSync(dirname(dest), { recursive: true });
    copyFileSync(f, dest);
    chmodSync(dest, 0o755);
  }
}

/** A GPT disk image: a 2 MiB ESP, then ext4 labelled `label` holding /hello.txt. */
function dataDisk(name: string, label: string, uuid?: string): string {
  const fsImg = join(dir, `${name}.ext4`);
  makeExt4(fsImg, { sizeMiB: 12, label, ...(uuid ? { uuid } : {}), files: { '/hello.txt': HELLO } });
  const raw = join(dir, `${name}.raw`);
  makePartitionedDisk(raw, { table: 'gpt', partitions: [{ sizeMiB: 2, type: 'uefi', name: 'esp' }, { image: fsImg, name: 'data' }] });
  return raw;
}

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'vdboot-e2e-vdiskload-udev-'));
  initrd = join(dir, 'initrd.img');
  writeInitramfs(initrd, { kernel: defaultKernel() });
}, 300_000);

afterAll(async () => {
  for (const vm of vms) if (!vm.exited) await vm.kill();
  if (dir && !process.env.VDBOOT_KEEP) rmSync(dir, { recursive: true, force: true });
});

describe('end to end: vdiskload with udev, nbd, a half-way failure, and a boot device without a record', { timeout: 900_000 }, () => {
  it('udev makes by-label and by-uuid links for the partitions (mount LABEL= works); nbd serves and writes; a refused device leaves nothing; -d takes a boot device and its loop down', async () => {
    const loops = 'for l in /sys/block/loop*; do [ -r $l/loop/backing_file ] && echo "$(basename $l)=$(cat $l/loop/backing_file)"; done';
    const dms = 'for d in /sys/block/dm-*; do [ -r $d/dm/name ] && echo "$(cat $d/dm/name)"; done';
    const commands = [
      'mount -o remount,rw / && mkdir -p /mnt/a',
      // udev: the daemon, the rules' programs, a cold plug for what is there already
      '/lib/systemd/systemd-udevd --daemon 2>/dev/null',
      'udevadm trigger --action=add --subsystem-match=block; udevadm settle --timeout=60',
      ...runRc('udevAttach', `${V} --name ud /img/udev.vhdx`),
      'udevadm settle --timeout=60',
      guestFact('byLabel', '$(readlink -f /dev/disk/by-label/udevdata)'),
      guestFact('byUuid', `$(readlink -f /dev/disk/by-uuid/${UDEV_UUID})`),
      guestFact('mapperP2', '$(readlink -f /dev/mapper/udp2)'),
      guestFact('p2Dm', '$(cat /sys/block/$(basename $(readlink -f /dev/mapper/udp2))/dm/name)'),
      ...runRc('mountLabel', '/usr/local/sbin/mount LABEL=udevdata /mnt/a && cat /mnt/a/hello.txt && umount /mnt/a'),
      ...runRc('udevDetach', `${V} -d ud`),
      'udevadm settle --timeout=60',
      guestFact('labelAfter', '$([ -e /dev/disk/by-label/udevdata ] && echo stays || echo gone)'),
      // read-only: device-mapper marks the disk ro (a DISK_RO change event) before the resume's event
      ...runRc('roAttach', `${V} --ro --name ur /img/udev.vhdx`),
      'udevadm settle --timeout=60',
      guestFact('roByLabel', '$(readlink -f /dev/disk/by-label/udevdata)'),
      guestFact('roMapperP2', '$(readlink -f /dev/mapper/urp2)'),
      ...runRc('roDetach', `${V} -d ur`),
      'udevadm settle --timeout=60',
      // nbd: asked for, and chosen for a compressed image
      ...runRc('nbdAttach', `${V} --map nbd --name nb /img/nbd.vhdx`),
      `mount -t ext4 /dev/mapper/nbp2 /mnt/a && ${guestFact('nbdRead', '$(cat /mnt/a/hello.txt)')} && echo "${NOTE_NBD}" > /mnt/a/guest.txt && umount /mnt/a`,
      ...runRc('nbdList', `${V} -l`),
      ...runRc('nbdDetach', `${V} -d nb`),
      guestFact('nbdPidAfter', '$(cat /sys/block/nbd0/pid 2>/dev/null || echo none)'),
      ...runRc('zAttach', `${V} --ro --name cz /img/compressed.qcow2`),
      `mount -t ext4 -o ro /dev/mapper/czp2 /mnt/a && ${guestFact('zRead', '$(cat /mnt/a/hello.txt)')} && umount /mnt/a`,
      ...runRc('zDetach', `${V} -d cz`),
      // a partition's name taken: refused before anything is made
      'dmsetup create rnp2 --table "0 8 zero"',
      ...runRc('nameTaken', `${V} --ro --name rn /img/udev.vhdx`),
      guestFact('nameTakenLoops', `$(${loops} | tr '\\n' ' ')`),
      'dmsetup remove rnp2',
      // a partition's dm uuid held by another device: refused by device-mapper after the loop and "rb", "rbp1" were made
      'dmsetup create blocker --uuid VDBOOT-rb-part2 --table "0 8 zero"',
      ...runRc('refused', `${V} --ro --name rb /img/udev.vhdx`),
      guestFact('refusedDm', `$(${dms} | tr '\\n' ' ')`),
      guestFact('refusedLoops', `$(${loops} | tr '\\n' ' ')`),
      'dmsetup remove blocker',
      ...runRc('refusedList', `${V} -l`),
      // the boot-attached image without its record
      ...runRc('bootList', `${V} -l`),
      guestFact('bootLoops', `$(${loops} | tr '\\n' ' ')`),
      'rm -f /run/vdboot/state.json',
      ...runRc('bootDetach', `${V} -d vdisk0`),
      guestFact('bootDmAfter', `$(${dms} | tr '\\n' ' ')`),
      guestFact('bootLoopsAfter', `$(${loops} | tr '\\n' ' ')`),
      'sync',
    ];
    const rootDir = join(dir, 'root');
    buildGuestRoot(rootDir, { commands, modules: { kernelVersion: kernelVersion(defaultKernel()), names: ['nbd'] } });
    copyProgram(rootDir, '/bin/udevadm');
    mkdirSync(join(rootDir, 'lib/systemd'), { recursive: true });
    symlinkSync('/bin/udevadm', join(rootDir, 'lib/systemd/systemd-udevd'));
    copyProgram(rootDir, '/sbin/dmsetup');
    copyProgram(rootDir, '/bin/mount', '/usr/local/sbin/mount');
    copyProgram(rootDir, '/usr/bin/qemu-nbd');
    mkdirSync(join(rootDir, 'lib/udev/rules.d'), { recursive: true });
    for (const r of RULES) copyFileSync(`/lib/udev/rules.d/${r}`, join(rootDir, 'lib/udev/rules.d', r));
    mkdirSync(join(rootDir, 'usr/sbin'), { recursive: true });
    copyFileSync(join(process.cwd(), 'build/init'), join(rootDir, 'usr/sbin/vdiskload'));
    chmodSync(join(rootDir, 'usr/sbin/vdiskload'), 0o755);
    mkdirSync(join(rootDir, 'img'));
    convertImage(dataDisk('udev', 'udevdata', UDEV_UUID), join(rootDir, 'img/udev.vhdx'), 'vhdx', ['block_size=1M']);
    convertImage(dataDisk('nbd', 'nbddata'), join(rootDir, 'img/nbd.vhdx'), 'vhdx', ['block_size=1M']);
    execFileSync('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', dataDisk('z', 'zdata'), join(rootDir, 'img/compressed.qcow2')]);
    const rootFs = join(dir, 'root.ext4');
    makeExt4(rootFs, { sizeMiB: 128, label: 'guestroot', fromDir: rootDir });
    const rootDisk = join(dir, 'root.img');
    const [rootLayout] = makePartitionedDisk(rootDisk, { table: 'gpt', partitions: [{ image: rootFs, type: ROOT_TYPE, name: 'linux' }] });
    const attFs = join(dir, 'att.ext4');
    makeExt4(attFs, { sizeMiB: 24, label: 'atthost', files: { '/att.img': { hostFile: dataDisk('att', 'attdata') } } });
    const attDisk = join(dir, 'att-host.img');
    makePartitionedDisk(attDisk, { table: 'gpt', partitions: [{ image: attFs, name: 'atthost' }] });

    const vm = await bootVm({
      initrd, name: 'vdiskload-udev',
      append: 'root=/dev/vda1 rw rd.vdisk.attach=LABEL=atthost:/att.img rd.vdisk.map=loop',
      disks: [{ file: rootDisk, interface: 'virtio-blk' }, { file: attDisk, interface: 'virtio-blk', snapshot: true }],
    });
    vms.push(vm);
    await vm.waitFor(GUEST_MARKER, 600_000);
    const t = vm.transcript();
    const f = parseGuestFacts(t).facts;
    await vm.waitExit(120_000);

    // udev
    expect(f.udevAttach, t).toMatch(/^0:.*\|ud: \/img\/udev\.vhdx \(vhdx dynamic, 16 MiB, rw\)/);
    expect(f.mapperP2, t).toMatch(/^\/dev\/dm-\d+$/);
    expect(f.p2Dm).toBe('udp2');
    expect(f.byLabel).toBe(f.mapperP2);
    expect(f.byUuid).toBe(f.mapperP2);
    expect(f.mountLabel, t).toBe(`0:${HELLO}|`);
    expect(f.udevDetach).toBe('0:ud: detached /img/udev.vhdx|');
    expect(f.labelAfter).toBe('gone');
    expect(f.roAttach, t).toMatch(/^0:ur: \/img\/udev\.vhdx \(vhdx dynamic, 16 MiB, ro\)/);
    expect(f.roMapperP2).toMatch(/^\/dev\/dm-\d+$/);
    expect(f.roByLabel).toBe(f.roMapperP2);
    expect(f.roDetach).toBe('0:ur: detached /img/udev.vhdx|');
    // nbd
    expect(f.nbdAttach, t).toMatch(/^0:.*nb: \/img\/nbd\.vhdx \(vhdx dynamic, 16 MiB, rw\) .*\|  data path: nbd/);
    expect(f.nbdRead).toBe(HELLO);
    expect(f.nbdList).toMatch(/\|nb +\/img\/nbd\.vhdx +vhdx dynamic +16 MiB +rw +nbd /);
    expect(f.nbdDetach).toBe('0:nb: detached /img/nbd.vhdx|');
    expect(f.nbdPidAfter).toBe('none');
    expect(f.zAttach, t).toMatch(/^0:cz: \/img\/compressed\.qcow2 \(qcow2.*ro\) .*\|  data path: nbd.*compress/);
    expect(f.zRead).toBe(HELLO);
    expect(f.zDetach).toBe('0:cz: detached /img/compressed.qcow2|');
    // refusals and the rollback
    expect(f.nameTaken, t).toMatch(/^1:vdiskload: the name rnp2 \(for a device of this image\) is taken: \/dev\/mapper\/rnp2 exists/);
    expect(f.nameTakenLoops).not.toContain('udev.vhdx');
    expect(f.refused, t).toMatch(/^1:vdiskload: device-mapper refused \/dev\/mapper\/rbp2: a device with its name or its uuid VDBOOT-rb-part2 exists .*taken down\|$/);
    expect(f.refusedDm!.split(' ')).not.toContain('rb');
    expect(f.refusedDm!.split(' ')).not.toContain('rbp1');
    expect(f.refusedDm!.split(' ')).toContain('blocker');
    expect(f.refusedLoops).not.toContain('udev.vhdx');
    expect(f.refusedList).not.toMatch(/\|rb /);
    // the boot device without a record
    expect(f.bootList, t).toMatch(/\|vdisk0 +\/att\.img +raw .* loop .* boot /);
    expect(f.bootLoops).toMatch(/loop\d+=\/run\/vdboot\/host\/att\.img/);
    expect(f.bootDetach, t).toMatch(/^0:vdisk0: removed \/dev\/mapper\/vdisk0p1, \/dev\/mapper\/vdisk0p2, \/dev\/mapper\/vdisk0, \/dev\/loop\d+ \(\/run\/vdboot\/host\/att\.img\) \(made at boot, no record/);
    expect(f.bootDmAfter).not.toMatch(/vdisk0/);
    expect(f.bootLoopsAfter).not.toContain('att.img');

    // on the host: the image written through nbd holds the guest's file and passes qemu-img check
    const part = join(dir, 'root-after.ext4');
    writeFileSync(part, readFileSync(rootDisk).subarray(rootLayout!.offset, rootLayout!.offset + rootLayout!.size));
    execFileSync('e2fsck', ['-fn', part], { stdio: 'ignore' });
    const nbdAfter = join(dir, 'nbd-after.vhdx');
    execFileSync('debugfs', ['-R', `dump /img/nbd.vhdx ${nbdAfter}`, part], { stdio: 'ignore' });
    execFileSync('qemu-img', ['check', '-f', 'vhdx', nbdAfter]);
    expect(fileInImage(dir, nbdAfter, 'vhdx', '/guest.txt')).toBe(`${NOTE_NBD}\n`);
  });
});
