/**
 * The production bundle on QuickJS against the fake kernel, for btrfs spanning two disks:
 * the members' superblocks are real (mkfs.btrfs -m raid1 -d single over two files; the first
 * MiB of each, which holds the primary superblock at 64 KiB, is a partition of its own disk).
 * The fake kernel has /dev/btrfs-control and, like the real one, refuses to mount a btrfs
 * while any member is unregistered (unless mounted degraded), so a boot that does not
 * register the second member ends in the rescue shell. Covered:
 *  - the root's wait for a member that appears later, and its message while waiting;
 *  - the failure after rd.timeout= naming the members found; rootflags=degraded;
 *  - a btrfs that holds the image (root=vdisk:UUID=…:/VMs/x.vhd) or the root archive
 *    (root=tmpfs:UUID=…:/images/rootfs.tar) gets its members registered before the kernel
 *    mounts it;
 *  - inside an image, the auto root behind LVM takes the only btrfs when rootflags= names a
 *    subvolume (an ext4 LV beside it).
 */
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FakeKernel, type FakeDisk, type FakeMachine, type FakeTree } from '../../src/sys/fake.ts';
import { MS } from '../../src/sys/sys.ts';
import { lvmAvailable } from '../kit/lvm.ts';
import { makeLvmPv } from '../kit/stack-disk.ts';
import { convert, makeGuestDisk } from '../vdisk/helpers.ts';
import { runBundleInQuickJS } from './sim-harness.ts';
import { GUEST_TREE, simInitramfs, simManifest } from './sim-machine.ts';

const can = spawnSync('mkfs.btrfs', ['--version'], { stdio: 'ignore' }).status === 0;
const MiB = 1024 * 1024;
let dir: string;
let fsid: string;
/** a GPT disk whose one partition (1 MiB at 1 MiB) holds the start of member 1, and of member 2 */
let diskA: Uint8Array;
let diskB: Uint8Array;
let vhd: Uint8Array;
let rootArchive: Uint8Array;
/** a raw image: GPT, partition 1 an LVM PV with LVs root (btrfs) and home (ext4) */
let lvmImage: Uint8Array | undefined;
const PART = { name: '', number: 1, start: MiB, size: MiB };

/** A 4 MiB GPT disk with `bytes` (1 MiB) as its first partition. */
function diskWith(bytes: Buffer, name: string): Uint8Array {
  const file = path.join(dir, `${name}.img`);
  fs.writeFileSync(file, '');
  fs.truncateSync(file, 4 * MiB);
  execFileSync('sfdisk', ['-q', file], { input: 'label: gpt\nstart=2048, size=2048, name=btrfs\n' });
  const fd = fs.openSync(file, 'r+');
  fs.writeSync(fd, bytes, 0, MiB, MiB);
  fs.closeSync(fd);
  return new Uint8Array(fs.readFileSync(file));
}

/** The first MiB of each btrfs member made by mkfs.btrfs over `count` files of 128 MiB. */
function btrfsMembers(name: string, count: number, label: string): { starts: Buffer[]; uuid: string } {
  const files = Array.from({ length: count }, (_, i) => path.join(dir, `${name}-${i + 1}.btrfs`));
  for (const f of files) {
    fs.writeFileSync(f, '');
    fs.truncateSync(f, 128 * MiB);
  }
  execFileSync('mkfs.btrfs', ['-q', '-f', '-L', label, ...(count > 1 ? ['-m', 'raid1', '-d', 'single'] : []), ...files], { stdio: ['ignore', 'ignore', 'pipe'] });
  const uuid = execFileSync('blkid', ['-p', '-o', 'value', '-s', 'UUID', files[0]!], { encoding: 'utf8' }).trim();
  const starts = files.map((f) => {
    const fd = fs.openSync(f, 'r');
    const b = Buffer.alloc(MiB);
    fs.readSync(fd, b, 0, MiB, 0);
    fs.closeSync(fd);
    fs.rmSync(f);
    return b;
  });
  return { starts, uuid };
}

beforeAll(() => {
  if (!can) return;
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-btrfs-sim-'));
  const two = btrfsMembers('pair', 2, 'sim-btrfs');
  fsid = two.uuid;
  diskA = diskWith(two.starts[0]!, 'a');
  diskB = diskWith(two.starts[1]!, 'b');
  vhd = new Uint8Array(fs.readFileSync(convert(makeGuestDisk(dir), path.join(dir, 'linux.vhd'), 'vpc', ['subformat=fixed'])));
  const tree = path.join(dir, 'tree');
  fs.mkdirSync(path.join(tree, 'sbin'), { recursive: true });
  fs.writeFileSync(path.join(tree, 'sbin', 'init'), '#!/bin/sh\necho from the archive\n', { mode: 0o755 });
  execFileSync('tar', ['-cf', path.join(dir, 'rootfs.tar'), '-C', tree, '.']);
  rootArchive = new Uint8Array(fs.readFileSync(path.join(dir, 'rootfs.tar')));
  if (lvmAvailable()) {
    const one = btrfsMembers('single', 1, 'lv root');
    const btrfsLv = path.join(dir, 'root.btrfs-start');
    fs.writeFileSync(btrfsLv, one.starts[0]!);
    const home = path.join(dir, 'home.ext4');
    execFileSync('mke2fs', ['-q', '-F', '-t', 'ext4', '-L', 'home', home, '2M']);
    const pv = makeLvmPv(dir, 12, 'simvg', [{ name: 'root', sizeMiB: 4, image: btrfsLv }, { name: 'home', sizeMiB: 4, image: home }]).pv;
    const raw = path.join(dir, 'lvm.raw');
    fs.writeFileSync(raw, '');
    fs.truncateSync(raw, 16 * MiB);
    execFileSync('sfdisk', ['-q', raw], { input: 'label: gpt\nstart=2048, size=24576, type=E6D6D379-F507-44C2-A23C-238F2A3DF928, name=pv\n' });
    execFileSync('dd', [`if=${pv}`, `of=${raw}`, 'bs=512', 'seek=2048', 'conv=notrunc', 'status=none']);
    lvmImage = new Uint8Array(fs.readFileSync(raw));
  }
}, 120_000);

afterAll(() => { if (dir) fs.rmSync(dir, { recursive: true, force: true }); });

/** vda always; vdb (member 2) `secondAfterMs` after its driver loaded, or never (undefined). */
function machine(cmdline: string, secondAfterMs: number | undefined, over: Partial<FakeMachine> & { vda1?: FakeTree } = {}): FakeMachine {
  const disks: FakeDisk[] = [
    { name: 'vda', bytes: diskA, major: 254, minor: 0, partitions: [{ ...PART, name: 'vda1' }], needsModule: 'virtio_blk', trees: { vda1: over.vda1 ?? GUEST_TREE } },
  ];
  if (secondAfterMs !== undefined) {
    disks.push({ name: 'vdb', bytes: diskB, major: 254, minor: 16, partitions: [{ ...PART, name: 'vdb1' }], needsModule: 'virtio_blk', appearsAfterMs: secondAfterMs, trees: { vdb1: over.vda1 ?? GUEST_TREE } });
  }
  return {
    cmdline,
    disks,
    pciDevices: { '0000:00:04.0': 'pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00', virtio1: 'virtio:d00000002v00001AF4' },
    initramfs: simInitramfs(simManifest()),
    ...over,
  };
}

async function boot(m: FakeMachine) {
  const r = await runBundleInQuickJS(m);
  if (r.escaped) throw new Error(`an exception escaped the init:\n${r.escaped}\nconsole:\n${r.kernel.consoleText}`);
  return r;
}

describe.skipIf(!can)('simulation: a btrfs over two disks', () => {
  it('the fake kernel, like the real one, refuses to mount a member while the other is unregistered, and mounts it once both are', () => {
    const kernel = new FakeKernel(machine('root=/dev/vda1', 0));
    kernel.mkdir('/dev', 0o755);
    kernel.mkdir('/mnt', 0o755);
    kernel.mount('devtmpfs', '/dev', 'devtmpfs', 0, '');
    kernel.finitModule(kernel.open('/lib/modules/sim/virtio_blk.ko', 0), '', 0);
    expect(() => kernel.mount('/dev/vda1', '/mnt', 'btrfs', 0, '')).toThrow(/EINVAL/);
    kernel.mount('/dev/vdb1', '/mnt', 'btrfs', 0, ''); // registers vdb1; vda1 was registered by the failed mount
  });

  it('root=UUID= on a plain root: the second member appears 3 s later; vdboot says it waits, registers both, and the root mounts', async () => {
    const r = await boot(machine(`root=UUID=${fsid} rootflags=subvol=root rw`, 3000));
    const t = r.kernel.consoleText;
    expect(r.end?.reason, t).toBe('exec');
    expect(t).toContain(`btrfs UUID=${fsid} ("sim-btrfs") has 1 of its 2 devices: /dev/vda1 (devid 1); waiting for the others`);
    expect(t).toContain(`btrfs UUID=${fsid} ("sim-btrfs"): all 2 devices registered with the kernel (/dev/vda1 (devid 1), /dev/vdb1 (devid 2))`);
    const ready = r.kernel.events.btrfsReady;
    expect(ready[0]).toEqual({ path: '/dev/vda1', ready: false });
    expect(ready.at(-1)).toEqual({ path: '/dev/vdb1', ready: true });
    expect(r.kernel.events.mounts.find((m) => m.target === '/root')).toMatchObject({ source: '/dev/vda1', fstype: 'btrfs', data: 'subvol=root' });
    // the wait took the simulated time until vdb appeared, not rd.timeout's 30 s
    expect(r.kernel.monotonicMs()).toBeGreaterThanOrEqual(3000);
    expect(r.kernel.monotonicMs()).toBeLessThan(30_000);
  });

  it('the second member never appears: after rd.timeout= the rescue shell names the member found and the remedies, and nothing is mounted', async () => {
    const r = await boot(machine(`root=UUID=${fsid} rd.timeout=2`, undefined));
    const t = r.kernel.consoleText;
    expect(r.end?.reason, t).toBe('shell');
    expect(t).toContain(`The root btrfs UUID=${fsid} ("sim-btrfs") spans 2 devices, and after 2 s vdboot has found 1 of its 2 devices: /dev/vda1 (devid 1).`);
    expect(t).toMatch(/rootflags=degraded/);
    expect(r.kernel.events.mounts.find((m) => m.target === '/root')).toBeUndefined();
  });

  it('rootflags=degraded: mounted with the member that is there, and the console says so', async () => {
    const r = await boot(machine(`root=UUID=${fsid} rootflags=degraded rd.timeout=2`, undefined));
    const t = r.kernel.consoleText;
    expect(r.end?.reason, t).toBe('exec');
    expect(t).toContain('has 1 of its 2 devices: /dev/vda1 (devid 1); mounting degraded, as rootflags=degraded asks');
    expect(r.kernel.events.mounts.find((m) => m.target === '/root')).toMatchObject({ source: '/dev/vda1', data: 'degraded' });
  });

  it('the btrfs holds the image (root=vdisk:UUID=…:/VMs/linux.vhd): both members are registered before the kernel mounts it through vdhost', async () => {
    const r = await boot(machine(`root=vdisk:UUID=${fsid}:/VMs/linux.vhd rd.vdisk.mode=ro`, 1000, {
      deviceTrees: { vdhost: { 'VMs/linux.vhd': { bytes: vhd } }, vdisk0p2: GUEST_TREE },
    }));
    const t = r.kernel.consoleText;
    expect(r.end?.reason, t).toBe('exec');
    expect(t).toContain(`btrfs UUID=${fsid} ("sim-btrfs"): all 2 devices registered with the kernel (/dev/vda1 (devid 1), /dev/vdb1 (devid 2))`);
    const host = r.kernel.events.mounts.find((m) => m.target === '/run/vdboot/host');
    expect(host).toMatchObject({ source: '/dev/mapper/vdhost', fstype: 'btrfs' });
    expect(host!.flags & MS.RDONLY).toBe(MS.RDONLY);
    expect(t.indexOf('all 2 devices registered')).toBeLessThan(t.indexOf('on /run/vdboot/host'));
    expect(r.kernel.events.exec).toMatchObject({ path: '/sbin/init', rootDevice: '/dev/mapper/vdisk0p2' });
  });

  it('the btrfs holds the root archive (root=tmpfs:UUID=…:/images/rootfs.tar): both members are registered before the host is mounted', async () => {
    const r = await boot(machine(`root=tmpfs:UUID=${fsid}:/images/rootfs.tar rd.tmpfs.size=8M`, 1000, { vda1: { 'images/rootfs.tar': { bytes: rootArchive } } }));
    const t = r.kernel.consoleText;
    expect(r.end?.reason, t).toBe('exec');
    expect(t).toContain('all 2 devices registered with the kernel');
    expect(r.kernel.events.mounts.find((m) => m.target === '/run/vdboot/archive-host')).toMatchObject({ source: '/dev/vda1', fstype: 'btrfs' });
    expect(r.kernel.events.mounts.find((m) => m.target === '/root')).toMatchObject({ fstype: 'tmpfs' });
  });
});

describe.skipIf(!can || !lvmAvailable())('simulation: the auto root behind LVM inside an image', () => {
  const lvmMachine = (cmdline: string) => machine(cmdline, 0, { deviceTrees: { vdhost: { 'VMs/lvm.img': { bytes: lvmImage! } }, 'simvg-root': GUEST_TREE, 'simvg-home': { 'which': 'home\n' } } });

  it('a btrfs LV and an ext4 LV: rootflags=subvol=@ picks the only btrfs, as it does for plain partitions', async () => {
    const r = await boot(lvmMachine(`root=vdisk:UUID=${fsid}:/VMs/lvm.img rd.vdisk.mode=ro rootflags=subvol=@`));
    const t = r.kernel.consoleText;
    expect(r.end?.reason, t).toBe('exec');
    expect(t).toContain('the root is found after unlocking and activation: the only Linux filesystem behind partition 1 (LVM PV) (among several, the only btrfs: rootflags=subvol=@ names a btrfs subvolume)');
    expect(t).toContain('the root is /dev/simvg/root (btrfs): the only btrfs among the 2 Linux filesystems behind the image\'s LUKS/LVM layers, as rootflags=subvol=@ names a btrfs subvolume');
    expect(r.kernel.events.mounts.find((m) => m.target === '/root')).toMatchObject({ source: '/dev/mapper/simvg-root', fstype: 'btrfs', data: 'subvol=@' });
  });

  it('without rootflags=subvol= the two Linux filesystems are ambiguous: the rescue shell lists them', async () => {
    const r = await boot(lvmMachine(`root=vdisk:UUID=${fsid}:/VMs/lvm.img rd.vdisk.mode=ro`));
    const t = r.kernel.consoleText;
    expect(r.end?.reason, t).toBe('shell');
    expect(t).toMatch(/2 Linux filesystems appeared behind the image's LUKS\/LVM layers, so vdboot cannot tell which one is root\./);
    expect(t).toMatch(/btrfs .*LABEL="lv root"/);
    expect(t).toMatch(/ext4 .*LABEL="home"/);
  });
});
