/**
 * root=vdisk: in the production init bundle, run by QuickJS against the fake kernel: a
 * virtio disk whose first partition is NTFS (mkntfs + ntfscp) holding images made by
 * qemu-img. The fake kernel takes device-mapper and loop ioctls, serves /dev/mapper/*
 * through the loaded tables and refuses a mount whose device holds no superblock, so a
 * wrong table ends the boot in the rescue shell instead of at the guest's init.
 */
import { existsSync, rmSync } from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MS, REBOOT } from '../../src/sys/sys.ts';
import type { FakeDmEvent, FakeMachine } from '../../src/sys/fake.ts';
import { runBundleInQuickJS } from '../boot/sim-harness.ts';
import { GUEST_TREE, simInitramfs, simManifest } from '../boot/sim-machine.ts';
import { BASIC_DATA, convert, fakeDiskOf, loadNtfsMkdir, makeGuestDisk, makeHostDisk, makeNtfs, qemuRaw, tmpDir } from './helpers.ts';
import { readFileSync } from 'node:fs';

let dir: string;
let hostDisk: Uint8Array;
let partitions: { name: string; number: number; start: number; size: number }[];
let fixedVhd: string;
let guestUuid: string;

beforeAll(async () => {
  if (!existsSync('build/init.js')) throw new Error('build/init.js is missing: run "npm run build" first');
  await loadNtfsMkdir();
  dir = tmpDir();
  const raw = makeGuestDisk(dir);
  fixedVhd = convert(raw, path.join(dir, 'linux.vhd'), 'vpc', ['subformat=fixed']);
  const dynamic = convert(raw, path.join(dir, 'dynamic.vhdx'), 'vhdx', ['block_size=1M']);
  const ntfs = makeNtfs(dir, 'win', 60, 'Windows', { '/VMs/linux.vhd': fixedVhd, '/VMs/dynamic.vhdx': dynamic }, ['/VMs']);
  const file = makeHostDisk(dir, 'host', [{ image: ntfs, type: BASIC_DATA }]);
  ({ bytes: hostDisk, partitions } = fakeDiskOf(file));
  const { probeFilesystem } = await import('../../src/formats/probe.ts');
  const guest = new Uint8Array(readFileSync(raw));
  vhdBytes = new Uint8Array(readFileSync(fixedVhd));
  guestUuid = probeFilesystem({ name: 'root', size: 12 << 20, read: (o, l) => guest.subarray((3 << 20) + o, (3 << 20) + o + l) })!.uuid!;
}, 60_000);

afterAll(() => {
  if (dir) rmSync(dir, { recursive: true, force: true });
});

let vhdBytes: Uint8Array;

function machine(cmdline: string): FakeMachine {
  return {
    cmdline,
    disks: [{ name: 'vda', bytes: hostDisk, major: 254, minor: 0, partitions, needsModule: 'virtio_blk' }],
    pciDevices: { '0000:00:04.0': 'pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00', virtio1: 'virtio:d00000002v00001AF4' },
    initramfs: simInitramfs(simManifest()),
    deviceTrees: { vdisk0p2: GUEST_TREE, vdhost: { 'VMs/linux.vhd': { bytes: vhdBytes } } },
  };
}

async function boot(cmdline: string) {
  const r = await runBundleInQuickJS(machine(cmdline));
  if (r.escaped) throw new Error(`an exception escaped the init:\n${r.escaped}\nconsole:\n${r.kernel.consoleText}`);
  return r;
}

function created(events: FakeDmEvent[]) {
  return events.filter((e) => e.op === 'create').map((e) => [e.name, (e as { uuid: string }).uuid]);
}

describe('simulation: root=vdisk: boots through device-mapper', () => {
  it('a fixed VHD on NTFS: vdisk0 and its partitions on the host partition, root mounted from vdisk0p2, host at /run/vdboot/host', async () => {
    const r = await boot('root=vdisk:LABEL=Windows:/VMs/linux.vhd rw');
    const text = r.kernel.consoleText;
    if (process.env.VDBOOT_SHOW) process.stdout.write(text);
    expect(r.end?.reason, text).toBe('exec');
    expect(r.kernel.events.exec).toMatchObject({ path: '/sbin/init', rootDevice: '/dev/mapper/vdisk0p2' });
    expect(created(r.kernel.events.dm)).toEqual([
      ['vdisk0', 'VDBOOT-vdisk0'], ['vdisk0p1', 'VDBOOT-vdisk0-part1'], ['vdisk0p2', 'VDBOOT-vdisk0-part2'], ['vdhost', 'VDBOOT-vdhost'],
    ]);
    const load = r.kernel.events.dm.find((e) => e.op === 'load' && e.name === 'vdisk0') as Extract<FakeDmEvent, { op: 'load' }>;
    expect(load.readOnly).toBe(false);
    expect(load.targets.every((t) => t.type === 'linear' && t.params.startsWith('/dev/vda1 '))).toBe(true);
    const root = r.kernel.events.mounts.find((m) => m.target === '/root')!;
    expect(root).toMatchObject({ source: '/dev/mapper/vdisk0p2', fstype: 'ext4' });
    expect(root.flags & MS.RDONLY).toBe(0);
    const host = r.kernel.events.mounts.find((m) => m.target === '/run/vdboot/host')!;
    expect(host).toMatchObject({ source: '/dev/mapper/vdhost', fstype: 'ntfs3' });
    expect(host.flags & MS.RDONLY).toBe(MS.RDONLY);
    expect(text).toMatch(/vdisk0: \/VMs\/linux\.vhd on \/dev\/vda1 \(ntfs, LABEL="Windows"\): vhd fixed, direct: the image is fully mappable/);
    // The whole virtual disk as the kernel now serves it is what qemu-img reads from the image.
    const fd = r.kernel.open('/dev/mapper/vdisk0', 0);
    const oracle = qemuRaw(fixedVhd, dir);
    const buf = new Uint8Array(oracle.length);
    expect(r.kernel.pread(fd, buf, 0)).toBe(oracle.length);
    expect(Buffer.from(buf).equals(oracle)).toBe(true);
    // The root partition lies straight on the host partition (one remap), and reads its part of the disk.
    const p2 = r.kernel.events.dm.find((e) => e.op === 'load' && e.name === 'vdisk0p2') as Extract<FakeDmEvent, { op: 'load' }>;
    expect(p2.targets.every((t) => t.type === 'linear' && t.params.startsWith('/dev/vda1 '))).toBe(true);
    const pfd = r.kernel.open('/dev/mapper/vdisk0p2', 0);
    const part = new Uint8Array(12 << 20);
    expect(r.kernel.pread(pfd, part, 0)).toBe(part.length);
    expect(Buffer.from(part).equals(oracle.subarray(3 << 20, 15 << 20))).toBe(true);
    // The shutdown hand-off finds what to take down.
    const state = JSON.parse(new TextDecoder().decode(readAll(r.kernel, '/run/vdboot/state.json')));
    expect(state).toMatchObject({ dm: ['vdisk0', 'vdisk0p1', 'vdisk0p2', 'vdhost'], loops: [], hostMount: '/run/vdboot/host' });
  });

  it('snapshot mode: a read-only base, a RAM store on a loop device, and the snapshot as vdisk0', async () => {
    const r = await boot('root=vdisk:LABEL=Windows:/VMs/dynamic.vhdx rd.vdisk.mode=snapshot');
    expect(r.end?.reason, r.kernel.consoleText).toBe('exec');
    expect(created(r.kernel.events.dm).map((c) => c[0])).toEqual(['vdisk0-base', 'vdisk0', 'vdisk0p1', 'vdisk0p2', 'vdhost']);
    const loads = r.kernel.events.dm.filter((e): e is Extract<FakeDmEvent, { op: 'load' }> => e.op === 'load');
    expect(loads.find((l) => l.name === 'vdisk0-base')!.readOnly).toBe(true);
    expect(loads.find((l) => l.name === 'vdisk0-base')!.targets.some((t) => t.type === 'zero')).toBe(true);
    const attach = r.kernel.events.loops.find((e) => e.op === 'attach')!;
    expect(attach).toMatchObject({ device: '/dev/loop0', file: '/run/vdboot/vdisk0.cow', readOnly: false });
    expect(loads.find((l) => l.name === 'vdisk0')!.targets).toEqual([{ start: 0, length: 32768, type: 'snapshot', params: '/dev/mapper/vdisk0-base /dev/loop0 N 8' }]);
    // Over a snapshot the partitions must go through it, or their writes would reach the image.
    expect(loads.find((l) => l.name === 'vdisk0p2')!.targets).toEqual([{ start: 0, length: 24576, type: 'linear', params: '/dev/mapper/vdisk0 6144' }]);
    expect(r.kernel.events.exec).toMatchObject({ rootDevice: '/dev/mapper/vdisk0p2' });
  });

  it('without a host spec every partition is searched', async () => {
    const r = await boot('root=vdisk:/VMs/linux.vhd');
    expect(r.end?.reason, r.kernel.consoleText).toBe('exec');
    expect(r.kernel.consoleText).toMatch(/found \/VMs\/linux\.vhd on \/dev\/vda1/);
  });

  it('rd.vdisk.attach: root=UUID= finds the root on the attached image\'s partition', async () => {
    const r = await boot(`root=UUID=${guestUuid} rd.vdisk.attach=LABEL=Windows:/VMs/linux.vhd`);
    expect(r.end?.reason, r.kernel.consoleText).toBe('exec');
    const root = r.kernel.events.mounts.find((m) => m.target === '/root')!;
    // found as dm-2, mounted by its mapping's name (what the booted system's /proc/mounts shows)
    expect(r.kernel.consoleText).toMatch(new RegExp(`found root device UUID=${guestUuid} at /dev/dm-2`));
    expect(root.source).toBe('/dev/mapper/vdisk0p2');
    expect(r.kernel.stat('/dev/mapper/vdisk0p2')).toMatchObject({ rdevMajor: 253, rdevMinor: 2 });
  });

  it('rd.vdisk.attach: resume= naming a partition of the attached image is refused with the reason, and the boot goes on', async () => {
    const r = await boot(`root=UUID=${guestUuid} rd.vdisk.attach=LABEL=Windows:/VMs/linux.vhd resume=/dev/mapper/vdisk0p1`);
    const t = r.kernel.consoleText;
    expect(r.end?.reason, t).toBe('exec');
    expect(t).toMatch(/resume=\/dev\/mapper\/vdisk0p1 is ignored: \/dev\/mapper\/vdisk0p1 lies on an image attached by rd\.vdisk\.attach=, and vdboot resumes only a system whose root is the image/);
    expect(r.kernel.sysPowerResume).toBeUndefined();
  });

  it('root=vdisk: resume= naming a partition that is no swap: read through the image\'s mapping on QuickJS, refused with the reason, nothing written, the boot goes on', async () => {
    const r = await boot(`root=vdisk:LABEL=Windows:/VMs/linux.vhd rw resume=/dev/mapper/vdisk0p1`);
    const t = r.kernel.consoleText;
    expect(r.end?.reason, t).toBe('exec');
    expect(t).toMatch(/resume=\/dev\/mapper\/vdisk0p1 is ignored: \/dev\/mapper\/vdisk0p1 is not a swap area \(no swap signature at the end of its first 4 KiB\)/);
    expect(t).not.toMatch(/recorded .* tables/);
    expect(r.kernel.sysPowerResume).toBeUndefined();
  });

  it('rd.vdisk.attach with rd.vdisk.mode=ro and rw: the image is read-only, so the root on it is mounted read-only, and the console says why', async () => {
    const r = await boot(`root=UUID=${guestUuid} rd.vdisk.attach=LABEL=Windows:/VMs/linux.vhd rd.vdisk.mode=ro rw`);
    const t = r.kernel.consoleText;
    expect(r.end?.reason, t).toBe('exec');
    const loads = r.kernel.events.dm.filter((e): e is Extract<FakeDmEvent, { op: 'load' }> => e.op === 'load' && e.name.startsWith('vdisk0'));
    expect(loads.length).toBeGreaterThan(0);
    expect(loads.every((l) => l.readOnly)).toBe(true);
    const root = r.kernel.events.mounts.find((m) => m.target === '/root')!;
    expect(root.flags & MS.RDONLY).toBe(MS.RDONLY);
    expect(t).toContain('the root /dev/dm-2 is on a read-only device: rd.vdisk.mode=ro makes the attached images read-only; it is mounted read-only despite rw');
    expect(t).not.toMatch(/despite rw[\s\S]*despite rw/);
  });
});

describe('simulation: the loop path and the shutdown hand-off', () => {
  it('rd.shell=0 after the image devices were made: the root, the devices and the host come down before the halt', async () => {
    const r = await boot('root=vdisk:LABEL=Windows:/VMs/linux.vhd init=/sbin/nothing rd.shell=0');
    expect(r.end?.reason, r.kernel.consoleText).toBe('reboot');
    expect(r.kernel.consoleText).toMatch(/no init to start/);
    const made = r.kernel.events.dm.filter((e) => e.op === 'create').map((e) => e.name);
    const removed = r.kernel.events.dm.filter((e) => e.op === 'remove').map((e) => e.name);
    expect(made.length).toBeGreaterThan(0);
    expect([...removed].sort()).toEqual([...made].sort());
    expect(removed.at(-1)).toBe('vdhost');
    expect(r.kernel.events.umounts).toContain('/root');
  });

  it('an image found on two partitions without a host named is refused, naming both, before anything is made', async () => {
    const m = machine('root=vdisk:/VMs/linux.vhd');
    m.disks.push({ ...m.disks[0]!, name: 'vdb', minor: 16, partitions: partitions.map((p) => ({ ...p, name: p.name.replace('vda', 'vdb') })) });
    const r = await runBundleInQuickJS(m);
    expect(r.end?.reason).toBe('shell');
    expect(r.kernel.consoleText).toMatch(/\/VMs\/linux\.vhd is on more than one partition: \/dev\/vda1.* and \/dev\/vdb1.*root="vdisk:UUID=[0-9A-F]+:\/VMs\/linux\.vhd"/s);
    expect(r.kernel.events.dm).toEqual([]);
  });

  it('images that read through the host filesystem but lie on two hosts are refused before anything is made', async () => {
    const m = machine('root=vdisk:/dev/vda1:/VMs/linux.vhd rd.vdisk.attach=/dev/vdb1:/VMs/linux.vhd rd.vdisk.map=loop rw');
    const second = { ...m.disks[0]!, name: 'vdb', minor: 16, partitions: partitions.map((p) => ({ ...p, name: p.name.replace('vda', 'vdb') })) };
    m.disks.push(second);
    const r = await runBundleInQuickJS(m);
    expect(r.end?.reason).toBe('shell');
    expect(r.kernel.consoleText).toMatch(/vdisk1 \(.*on \/dev\/vdb1\) takes the loop path.*vdboot mounts one host filesystem at a time/s);
    expect(r.kernel.events.dm).toEqual([]);
    expect(r.kernel.events.loops).toEqual([]);
  });

  it('rd.vdisk.map=loop: the host mounted read-write through vdhost, the image on a loop device, vdisk0 over it', async () => {
    const r = await boot('root=vdisk:LABEL=Windows:/VMs/linux.vhd rd.vdisk.map=loop rw');
    expect(r.end?.reason, r.kernel.consoleText).toBe('exec');
    expect(r.kernel.consoleText).toMatch(/loop \(asked for\): through the host filesystem's kernel driver/);
    expect(created(r.kernel.events.dm).map((c) => c[0])).toEqual(['vdhost', 'vdisk0', 'vdisk0p1', 'vdisk0p2']);
    const host = r.kernel.events.mounts.find((m) => m.target === '/run/vdboot/host')!;
    expect(host.flags & MS.RDONLY).toBe(0);
    expect(r.kernel.events.loops[0]).toMatchObject({ op: 'attach', device: '/dev/loop0', file: '/run/vdboot/host/VMs/linux.vhd', readOnly: false });
    const load = r.kernel.events.dm.find((e) => e.op === 'load' && e.name === 'vdisk0') as Extract<FakeDmEvent, { op: 'load' }>;
    expect(load.targets).toEqual([{ start: 0, length: 32776, type: 'linear', params: '/dev/loop0 0' }]);
    expect(r.kernel.events.exec).toMatchObject({ rootDevice: '/dev/mapper/vdisk0p2' });
  });

  it('systemd\'s hand-off: /run/initramfs/shutdown unmounts the root, removes the image\'s dm devices newest first, then unmounts the host and removes vdhost, powers off', async () => {
    const r = await boot('root=vdisk:LABEL=Windows:/VMs/linux.vhd rw');
    expect(r.end?.reason, r.kernel.consoleText).toBe('exec');
    const k = r.kernel;
    expect(k.consoleText).toMatch(/shutdown hand-off ready in \/run\/initramfs/);
    // What systemd-shutdown does last: pivot into /run/initramfs, the old root at /oldroot, exec /shutdown VERB.
    k.pivotRoot('/run/initramfs', '/run/initramfs/oldroot');
    expect(k.stat('/shutdown').mode & 0o111).not.toBe(0);
    expect(k.stat('/bin/busybox').mode & 0o111).not.toBe(0);
    k.machine.argv = ['/shutdown', 'poweroff'];
    const before = k.events.dm.length;
    const s = await runBundleInQuickJS(k.machine, 'build/init.js', k);
    if (s.escaped) throw new Error(`${s.escaped}\n${k.consoleText}`);
    if (process.env.VDBOOT_SHOW) process.stdout.write(k.consoleText);
    expect(s.end?.reason, k.consoleText).toBe('reboot');
    expect(k.events.rebooted).toBe(REBOOT.POWER_OFF);
    const umounts = k.events.umounts;
    // The host's mount was moved out of the old root, and goes after the root.
    expect(k.events.mounts.some((m) => m.fstype === 'move' && m.source === '/oldroot/run/vdboot/host' && m.target === '/host')).toBe(true);
    expect(umounts.indexOf('/oldroot')).toBeGreaterThanOrEqual(0);
    expect(umounts.indexOf('/host')).toBeGreaterThan(umounts.indexOf('/oldroot'));
    expect(k.events.dm.slice(before).filter((e) => e.op === 'remove').map((e) => e.name)).toEqual(['vdisk0p2', 'vdisk0p1', 'vdisk0', 'vdhost']);
    expect(k.consoleText).toMatch(/removed \/dev\/mapper\/vdisk0\n/);
    expect(k.consoleText).toMatch(/powering off/);
  });

  it('without its record (state.json lost), the hand-off finds vdboot\'s devices by their dm uuid and loop backing files and takes them down in the same order', async () => {
    const r = await boot('root=vdisk:LABEL=Windows:/VMs/dynamic.vhdx rd.vdisk.mode=snapshot');
    expect(r.end?.reason, r.kernel.consoleText).toBe('exec');
    const k = r.kernel;
    k.pivotRoot('/run/initramfs', '/run/initramfs/oldroot');
    for (const p of ['/etc/vdboot/state.json', '/oldroot/run/vdboot/state.json']) k.unlink(p);
    k.machine.argv = ['/shutdown', 'poweroff'];
    const s = await runBundleInQuickJS(k.machine, 'build/init.js', k);
    expect(s.end?.reason, k.consoleText).toBe('reboot');
    expect(k.consoleText).toMatch(/no record of the devices vdboot created; found by their names instead: vdhost, vdisk0-base, vdisk0, vdisk0p1, vdisk0p2, \/dev\/loop0/);
    expect(k.events.dm.filter((e) => e.op === 'remove').map((e) => e.name)).toEqual(['vdisk0p2', 'vdisk0p1', 'vdisk0', 'vdisk0-base', 'vdhost']);
    expect(k.events.loops.filter((e) => e.op === 'detach')).toEqual([{ op: 'detach', device: '/dev/loop0' }]);
  });

  it('snapshot mode: the shutdown also detaches the RAM store\'s loop device', async () => {
    const r = await boot('root=vdisk:LABEL=Windows:/VMs/dynamic.vhdx rd.vdisk.mode=snapshot');
    const k = r.kernel;
    k.pivotRoot('/run/initramfs', '/run/initramfs/oldroot');
    k.machine.argv = ['/shutdown', 'reboot'];
    const s = await runBundleInQuickJS(k.machine, 'build/init.js', k);
    expect(s.end?.reason, k.consoleText).toBe('reboot');
    expect(k.events.rebooted).toBe(REBOOT.RESTART);
    expect(k.events.dm.filter((e) => e.op === 'remove').map((e) => e.name)).toEqual(['vdisk0p2', 'vdisk0p1', 'vdisk0', 'vdisk0-base', 'vdhost']);
    expect(k.events.loops.filter((e) => e.op === 'detach')).toEqual([{ op: 'detach', device: '/dev/loop0' }]);
  });
});

describe('simulation: root=vdisk: failures create nothing and explain', () => {
  it('a dynamic image in rw: the rescue shell with the remedies, and no device-mapper device was made', async () => {
    const r = await boot('root=vdisk:LABEL=Windows:/VMs/dynamic.vhdx rw');
    expect(r.end?.reason).toBe('shell');
    expect(r.kernel.consoleText).toMatch(/cannot be mapped read-write/);
    expect(r.kernel.consoleText).toMatch(/rd\.vdisk\.mode=snapshot/);
    expect(r.kernel.events.dm).toEqual([]);
  });

  it('the loop path without a host filesystem driver: the devices made so far are removed again, and the message names the alternatives', async () => {
    const m = machine('root=vdisk:LABEL=Windows:/VMs/linux.vhd rd.vdisk.map=loop rw');
    delete m.deviceTrees!.vdhost;
    const r = await runBundleInQuickJS(m);
    expect(r.end?.reason).toBe('shell');
    expect(r.kernel.consoleText).toMatch(/The loop path reads the image through the host filesystem/);
    expect(r.kernel.consoleText).toMatch(/rd\.vdisk\.mode=snapshot or ro/);
    const ops = r.kernel.events.dm.map((e) => `${e.op} ${e.name}`);
    expect(ops[0]).toBe('create vdhost');
    expect(ops.at(-1)).toBe('remove vdhost');
    expect(r.kernel.events.dm.filter((e) => e.op === 'create').length).toBe(r.kernel.events.dm.filter((e) => e.op === 'remove').length);
  });

  it('a missing image: the partitions searched, after rd.timeout', async () => {
    const r = await boot('root=vdisk:/VMs/nothere.vhd rd.timeout=2');
    expect(r.end?.reason).toBe('shell');
    expect(r.kernel.consoleText).toMatch(/Could not find \/VMs\/nothere\.vhd on any partition\. Searched 1 partition:\n +\/dev\/vda1 \(ntfs, LABEL="Windows"\)/);
    expect(r.kernel.consoleText).toMatch(/Waited 2 s for devices/);
    expect(r.kernel.events.dm).toEqual([]);
  });
});

function readAll(k: { open(p: string, f: number): number; pread(fd: number, b: Uint8Array, o: number): number; close(fd: number): void }, p: string): Uint8Array {
  const fd = k.open(p, 0);
  const buf = new Uint8Array(1 << 16);
  const n = k.pread(fd, buf, 0);
  k.close(fd);
  return buf.subarray(0, n);
}
