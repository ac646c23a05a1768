/**
 * End to end: vdiskload in a booted guest (Linux 6.1, QEMU). The guest boots from a raw
 * image on NTFS through the loop path (rw, so vdboot mounts the host read-write with
 * ntfs-3g at /run/vdboot/host); its init then runs /run/initramfs/vdiskload (the same
 * binary as /init, chosen by its name) on two dynamic VHDX images: one on that ntfs-3g
 * mount, one on an ext4 partition the guest mounts itself. Each is attached read-write
 * (expanded in place through the mounted filesystem, then the loop path on ntfs-3g, the
 * direct path on ext4 with the file held immutable), a file inside is read and one
 * written, and it is detached. A second rw attach of the same image and --map direct on
 * the read-write ntfs-3g mount are refused; -l lists the boot's root image and the
 * attached one. On the host afterwards: both images pass qemu-img check and hold the
 * guest's file, NTFS is clean, ext4 passes e2fsck.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeInitramfs } from '../../mkinitramfs/build.ts';
import { convertImage, makeExt4, makeNtfs, makePartitionedDisk, ntfsRead } from '../../qemu/disks.ts';
import { guestFact, parseGuestFacts, GUEST_MARKER } from '../../qemu/guest.ts';
import { makeGuestDisk } from '../kit/guest-disk.ts';
import { BASIC_DATA, expectNtfsClean, fileInImage } from '../kit/host-disk.ts';
import { bootVm, defaultKernel, kernelVersion, type Vm } from '../../qemu/harness.ts';

const HELLO = 'hello from inside the image';
const V = '/run/initramfs/vdiskload';
const NT_IMAGE = '/run/vdboot/host/VMs/data.vhdx';
const EX_IMAGE = '/mnt/e/img/data2.vhdx';
const HELD_IMAGE = '/run/vdboot/host/img/data3.vhdx';
const JSON_DEF = '/run/vdboot/host/img/json/disk.vdisk.json';

let dir: string;
let initrd: string;
const vms: Vm[] = [];

/** Runs `cmd`, then a fact "key=rc:output" (newlines as "|"). */
function runRc(key: string, cmd: string): string[] {
  return [`out=$(${cmd} 2>&1); rc=$?`, guestFact(key, '$rc:$(echo "$out" | tr \'\\n\' \'|\')')];
}

/** Attaches `image` as `name`, reads /hello.txt in its partition 2, writes /guest.txt with `note`, detaches by `detachBy`. */
function roundTrip(key: string, name: string, image: string, note: string, detachBy = name): string[] {
  return [
    ...runRc(`attach${key}`, `${V} --name ${name} ${image}`),
    `mount -t ext4 /dev/mapper/${name}p2 /mnt/a && ${guestFact(`read${key}`, '$(cat /mnt/a/hello.txt)')} && echo "${note}" > /mnt/a/guest.txt && umount /mnt/a && ${guestFact(`wrote${key}`, 'ok')}`,
    ...runRc(`list${key}`, `${V} -l --json`),
    ...runRc(`detach${key}`, `${V} -d ${detachBy}`),
  ];
}

const NOTE_NT = 'written through vdiskload on ntfs-3g';
const NOTE_EXT = 'written through vdiskload on a mounted ext4 partition';
const NOTE_HELD = 'written through vdiskload, direct under vdhost';

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'vdboot-e2e-vdiskload-'));
  initrd = join(dir, 'initrd.img');
  writeInitramfs(initrd, { kernel: defaultKernel(), tools: ['ntfs-3g'] });
}, 300_000);

afterAll(async () => {
  for (const vm of vms) if (!vm.exited) await vm.kill();
  if (dir && !process.env.VDBOOT_KEEP) rmSync(dir, { recursive: true, force: true });
});

/** A dynamic VHDX in `dir`: a 2 MiB ESP, then an ext4 partition holding /hello.txt (fileInImage reads it there). */
function dataImage(name: string): string {
  const fsImg = join(dir, `${name}.ext4`);
  makeExt4(fsImg, { sizeMiB: 12, label: name, files: { '/hello.txt': HELLO } });
  const raw = join(dir, `${name}.raw`);
  makePartitionedDisk(raw, { table: 'gpt', partitions: [{ sizeMiB: 2, type: 'uefi', name: 'esp' }, { image: fsImg, name: 'data' }] });
  const out = join(dir, `${name}.vhdx`);
  convertImage(raw, out, 'vhdx', ['block_size=1M']);
  return out;
}

/** The guest root as a raw image, running `commands` and then the shutdown hand-off. */
function guestImage(name: string, commands: string[], snapshot = false): string {
  const sub = join(dir, name);
  mkdirSync(sub);
  // the booted root has no modprobe: the snapshot target is loaded by the guest's init
  const modules = snapshot ? { modules: { kernelVersion: kernelVersion(defaultKernel()), names: ['dm-snapshot'] } } : {};
  return makeGuestDisk(sub, { ...modules, commands: ['mkdir -p /mnt/a /mnt/e', ...commands, 'sync'], then: { exec: '/run/initramfs/shutdown poweroff' } }).raw;
}

function qemuCheck(file: string): void {
  const r = spawnSync('qemu-img', ['check', '-f', 'vhdx', file], { encoding: 'utf8' });
  expect(r.status, `${file}: ${r.stdout}${r.stderr}`).toBe(0);
}

/** Boots the guest on `disk` and returns its facts and console. */
async function bootGuest(name: string, append: string, disk: string): Promise<{ facts: Record<string, string>; t: string }> {
  const vm = await bootVm({ initrd, append, disks: [{ file: disk, interface: 'virtio-blk' }], name });
  vms.push(vm);
  await vm.waitFor(GUEST_MARKER, 600_000);
  const facts = parseGuestFacts(vm.transcript()).facts;
  await vm.waitExit(120_000);
  const t = vm.transcript();
  expect(t).toMatch(/reboot: Power down/);
  return { facts, t };
}

function extPartition(disk: string, layout: { offset: number; size: number }, out: string): string {
  writeFileSync(out, readFileSync(disk).subarray(layout.offset, layout.offset + layout.size));
  execFileSync('e2fsck', ['-fn', out], { stdio: 'ignore' });
  return out;
}

function dumpExt(part: string, path: string, out: string): string {
  execFileSync('debugfs', ['-R', `dump ${path} ${out}`, part], { stdio: 'ignore' });
  return out;
}

function listed(fact: string | undefined): string[][] {
  return (JSON.parse(fact!.replace(/^0:/, '').replace(/\|/g, '\n')) as { name: string; path: string; mode: string; by: string }[]).map((e) => [e.name, e.path, e.mode, e.by]);
}

describe('end to end: vdiskload in a booted guest', { timeout: 900_000 }, () => {
  it('NTFS through ntfs-3g and an ext4 partition the guest mounted: dynamic VHDX images expanded, attached through loop devices, read and written, refused twice rw and with --map direct, listed, detached; the images pass qemu-img check and hold the guest\'s files', async () => {
    const root = guestImage('guest1', [
      ...runRc('list0', `${V} -l`),
      ...runRc('attachNt', `${V} --name nt ${NT_IMAGE}`),
      ...runRc('againNt', `${V} --ro ${NT_IMAGE}`),
      ...runRc('listNt', `${V} -l`),
      `mount -t ext4 /dev/mapper/ntp2 /mnt/a && ${guestFact('readNt', '$(cat /mnt/a/hello.txt)')} && echo "${NOTE_NT}" > /mnt/a/guest.txt && umount /mnt/a && ${guestFact('wroteNt', 'ok')}`,
      ...runRc('detachNt', `${V} -d nt`),
      ...runRc('directNt', `${V} --ro --map direct --name nd ${NT_IMAGE}`),
      'mount -t ext4 /dev/vda2 /mnt/e',
      ...runRc('directEx', `${V} --map direct --name xd ${EX_IMAGE}`),
      ...roundTrip('Ex', 'ex', EX_IMAGE, NOTE_EXT, EX_IMAGE),
      'umount /mnt/e',
      ...runRc('listEnd', `${V} -l`),
    ]);
    const ntfs = join(dir, 'host1.ntfs');
    makeNtfs(ntfs, { sizeMiB: 120, label: 'Windows', files: { '/VMs/linux.img': { hostFile: root }, '/VMs/data.vhdx': { hostFile: dataImage('data') } } });
    const ext = join(dir, 'host1.ext4');
    makeExt4(ext, { sizeMiB: 64, label: 'linuxhost', files: { '/img/data2.vhdx': { hostFile: dataImage('data2') } } });
    const disk = join(dir, 'host1.img');
    const [ntLayout, exLayout] = makePartitionedDisk(disk, { table: 'gpt', partitions: [{ image: ntfs, type: BASIC_DATA, name: 'Basic data partition' }, { image: ext, name: 'linuxhost' }] });

    const { facts, t } = await bootGuest('vdiskload-ntfs', 'root=vdisk:LABEL=Windows:/VMs/linux.img rd.vdisk.map=loop rw', disk);
    // -l before anything is attached: the boot's root image, from the boot's record
    expect(facts.list0, t).toMatch(/^0:NAME +IMAGE .*\|vdisk0 +\/VMs\/linux\.img +raw .* rw +loop .* boot +vdisk0p1,vdisk0p2\|$/);
    // ntfs-3g: expanded through the mount, then loop (FIEMAP does not reach a FUSE filesystem)
    expect(facts.attachNt, t).toMatch(/^0:vdiskload: expanding \/run\/vdboot\/host\/VMs\/data\.vhdx in place: \d+ absent blocks of 1\.0 MiB allocated.*\|nt: \/run\/vdboot\/host\/VMs\/data\.vhdx \(vhdx dynamic, 16 MiB, rw\) on \/dev\/vda1 through \/dev\/mapper\/vdhost \(fuseblk, mounted at \/run\/vdboot\/host\)\|  data path: loop: .*\|  \/dev\/mapper\/nt\|  \/dev\/mapper\/ntp1\|  \/dev\/mapper\/ntp2 ext4 LABEL="data" UUID=/);
    expect(facts.againNt).toMatch(/^1:vdiskload: \/run\/vdboot\/host\/VMs\/data\.vhdx is attached as \/dev\/mapper\/nt \(rw\); it is not attached twice when either would write it/);
    expect(facts.listNt).toMatch(/\|vdisk0 .* boot .*\|nt +\/run\/vdboot\/host\/VMs\/data\.vhdx +vhdx dynamic +16 MiB +rw +loop .* vdiskload +ntp1,ntp2\|$/);
    expect(facts.readNt).toBe(HELLO);
    expect(facts.wroteNt).toBe('ok');
    expect(facts.detachNt).toBe('0:nt: detached /run/vdboot/host/VMs/data.vhdx|');
    expect(facts.directNt).toMatch(/^1:vdiskload: --map direct: \/run\/vdboot\/host\/VMs\/data\.vhdx cannot be mapped directly: vdboot maps files of fuseblk through the mounted filesystem/);
    // an ext4 partition mounted by the guest: loop, and direct refused naming the mount
    // refused before anything is written (the image is not expanded for it)
    expect(facts.directEx).toMatch(/^1:vdiskload: --map direct: \/mnt\/e\/img\/data2\.vhdx cannot be mapped directly: \/dev\/vda2 is mounted at \/mnt\/e, and a mounted partition is held by its filesystem alone/);
    expect(facts.attachEx).toMatch(/^0:vdiskload: expanding \/mnt\/e\/img\/data2\.vhdx in place/);
    expect(facts.attachEx, t).toMatch(/\|ex: \/mnt\/e\/img\/data2\.vhdx \(vhdx dynamic, 16 MiB, rw\) on \/dev\/vda2 \(ext4, mounted at \/mnt\/e\)\|  data path: loop: /);
    expect(facts.readEx).toBe(HELLO);
    expect(facts.wroteEx).toBe('ok');
    expect(listed(facts.listEx)).toEqual([['vdisk0', 'loop', 'rw', 'boot'], ['ex', 'loop', 'rw', 'vdiskload']]);
    expect(facts.detachEx).toBe('0:ex: detached /mnt/e/img/data2.vhdx|');
    expect(facts.listEnd).toMatch(/^0:NAME [^|]*\|vdisk0 [^|]*\|$/);

    const ntPart = join(dir, 'after1.ntfs');
    writeFileSync(ntPart, readFileSync(disk).subarray(ntLayout!.offset, ntLayout!.offset + ntLayout!.size));
    const ntAfter = join(dir, 'data-after.vhdx');
    writeFileSync(ntAfter, ntfsRead(ntPart, '/VMs/data.vhdx'));
    qemuCheck(ntAfter);
    expect(fileInImage(dir, ntAfter, 'vhdx', '/guest.txt')).toBe(`${NOTE_NT}\n`);
    expectNtfsClean(disk, ntLayout!.offset, ntLayout!.size);
    const exPart = extPartition(disk, exLayout!, join(dir, 'after1.ext4'));
    const exAfter = dumpExt(exPart, '/img/data2.vhdx', join(dir, 'data2-after.vhdx'));
    qemuCheck(exAfter);
    expect(fileInImage(dir, exAfter, 'vhdx', '/guest.txt')).toBe(`${NOTE_EXT}\n`);
  });

  it('ext4 host mounted by vdboot through vdhost: a dynamic VHDX expanded, then mapped direct onto the partition with the file immutable while attached; read, written, detached by its path; the image passes qemu-img check and holds the guest\'s file, the flag is gone', async () => {
    const root = guestImage('guest2', [
      ...roundTrip('Held', 'held', HELD_IMAGE, NOTE_HELD, HELD_IMAGE).flatMap((l) => (l.includes(' -l --json') ? [...runRc('touchHeld', `touch ${HELD_IMAGE}`), l] : [l])),
      ...runRc('touchAfter', `touch ${HELD_IMAGE}`),
      // a disk definition (JSON + table file + a raw ext4 partition image), as a snapshot
      ...runRc('attachJson', `${V} --snapshot --name js ${JSON_DEF}`),
      `mount -t ext4 /dev/mapper/jsp1 /mnt/a && ${guestFact('readJson', '$(cat /mnt/a/hello.txt)')} && echo dropped > /mnt/a/snap.txt && umount /mnt/a && ${guestFact('wroteJson', 'ok')}`,
      ...runRc('detachJson', `${V} -d js`),
      // left attached at power-off: the shutdown hand-off takes it down and clears the flag
      ...runRc('left', `${V} --ro --name left ${HELD_IMAGE}`),
    ], true);
    const jsonDir = join(dir, 'json');
    mkdirSync(jsonDir);
    const partImg = join(jsonDir, 'part.img');
    makeExt4(partImg, { sizeMiB: 8, label: 'jsonpart', files: { '/hello.txt': HELLO } });
    const partBefore = readFileSync(partImg);
    writeFileSync(join(jsonDir, 'disk.vdisk.json'), JSON.stringify({ vdisk: 1, table: 'gpt', partitions: [{ image: 'part.img', name: 'data' }] }));
    execFileSync('node', [join(process.cwd(), 'bin/vdboot.mjs'), 'vdisk-table', join(jsonDir, 'disk.vdisk.json')]);
    const ext = join(dir, 'host2.ext4');
    makeExt4(ext, {
      sizeMiB: 112, label: 'linuxhost',
      files: {
        '/img/linux.img': { hostFile: root }, '/img/data3.vhdx': { hostFile: dataImage('data3') },
        '/img/json/disk.vdisk.json': { hostFile: join(jsonDir, 'disk.vdisk.json') }, '/img/json/disk.vdisk.table': { hostFile: join(jsonDir, 'disk.vdisk.table') }, '/img/json/part.img': { hostFile: partImg },
      },
    });
    const disk = join(dir, 'host2.img');
    const [layout] = makePartitionedDisk(disk, { table: 'gpt', partitions: [{ image: ext, name: 'linuxhost' }] });

    const { facts, t } = await bootGuest('vdiskload-ext4', 'root=vdisk:LABEL=linuxhost:/img/linux.img rd.vdisk.map=loop rw', disk);
    expect(facts.attachHeld, t).toMatch(/\|held: \/run\/vdboot\/host\/img\/data3\.vhdx \(vhdx dynamic, 16 MiB, rw\) on \/dev\/vda1 through \/dev\/mapper\/vdhost \(ext4, mounted at \/run\/vdboot\/host\)\|  data path: direct: .*\|  held still: \/run\/vdboot\/host\/img\/data3\.vhdx immutable until "vdiskload -d held"/);
    expect(facts.touchHeld).toMatch(/^1:.*(Operation not permitted|Permission denied)/);
    expect(facts.readHeld).toBe(HELLO);
    expect(facts.wroteHeld).toBe('ok');
    expect(listed(facts.listHeld)).toEqual([['vdisk0', 'loop', 'rw', 'boot'], ['held', 'direct', 'rw', 'vdiskload']]);
    expect(facts.detachHeld).toBe('0:held: detached /run/vdboot/host/img/data3.vhdx|');
    expect(facts.touchAfter).toBe('0:|');

    // the definition: direct, every file it maps held immutable; the snapshot's write dropped
    expect(facts.attachJson, t).toMatch(/^0:js: \/run\/vdboot\/host\/img\/json\/disk\.vdisk\.json \(vdisk-json.*, snapshot\) on .*\|  data path: direct: .*\|  held still: [^|]*\/img\/json\/part\.img[^|]* immutable until "vdiskload -d js"\|  \/dev\/mapper\/js\|  \/dev\/mapper\/jsp1 ext4 LABEL="jsonpart"/);
    expect(facts.readJson).toBe(HELLO);
    expect(facts.wroteJson).toBe('ok');
    expect(facts.detachJson).toBe('0:js: detached /run/vdboot/host/img/json/disk.vdisk.json (its snapshot\'s writes are dropped)|');

    expect(facts.left).toMatch(/^0:left: .*\|  data path: direct: .*\|  held still: \/run\/vdboot\/host\/img\/data3\.vhdx immutable/);
    expect(t).toMatch(/removed \/dev\/mapper\/leftp2[\s\S]*removed \/dev\/mapper\/left\b[\s\S]*cleared the immutable flag vdiskload set on \/run\/vdboot\/host\/img\/data3\.vhdx[\s\S]*unmounted \/host/);

    const part = extPartition(disk, layout!, join(dir, 'after2.ext4'));
    expect(readFileSync(dumpExt(part, '/img/json/part.img', join(dir, 'part-after.img'))).equals(partBefore), 'the snapshot wrote nothing to the partition image').toBe(true);
    const after = dumpExt(part, '/img/data3.vhdx', join(dir, 'data3-after.vhdx'));
    qemuCheck(after);
    expect(fileInImage(dir, after, 'vhdx', '/guest.txt')).toBe(`${NOTE_HELD}\n`);
    const stat = execFileSync('debugfs', ['-R', 'stat /img/data3.vhdx', part], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
    expect(stat).toMatch(/Flags: 0x80000\b/); // extents only: the immutable flag (0x10) is gone again (the shutdown cleared the last one)
  });
});
