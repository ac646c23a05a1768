/**
 * Planning image boots against real disks: guest disks made with sfdisk + mke2fs,
 * converted by qemu-img, stored on NTFS with mkntfs + ntfscp. The planned device-mapper
 * tables are read back sector by sector and compared with `qemu-img convert -O raw`.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { planAgainstDevices, formatReport, command as planCommand } from '../../src/cli/plan.ts';
import { planVdisk, sliceTargets, type VdiskPlan } from '../../src/boot/vdisk.ts';
import { parsePartitionTable } from '../../src/formats/partitions.ts';
import { bytesReader } from '../../src/formats/block-reader.ts';
import { openNtfs } from '../../src/formats/ntfs.ts';
import { parseVhdxHeader } from '../../src/formats/vhdx.ts';
import { openFileReader } from '../../src/sys/node-reader.ts';
import { vhdxLayout, writeLogEntry } from '../formats/vhdx-patch.ts';
import { findImage, imageHostFor } from '../../src/boot/hostdev.ts';
import {
  BASIC_DATA, convert, devicesOf, GUEST_LABEL, loadNtfsMkdir, makeGuestDisk, makeGuestFs, makeHostDisk, makeNtfs, qemuRaw, readPlanned, sh, tmpDir,
} from './helpers.ts';

let dir: string;
let hostDisk: string;
let secondDisk: string;
let hibernated: string;
let dirty: string;
let windowsDirty: string;
let fragments = 0;
let fragDisk: string;
let guestRaw: string;
const images: Record<string, string> = {};

beforeAll(async () => {
  const disks = await loadNtfsMkdir();
  dir = tmpDir();
  guestRaw = makeGuestDisk(dir);
  images.qcow2 = convert(guestRaw, path.join(dir, 'prealloc.qcow2'), 'qcow2', ['preallocation=metadata']);
  images.vhdFixed = convert(guestRaw, path.join(dir, 'fixed.vhd'), 'vpc', ['subformat=fixed']);
  images.vhdDynamic = convert(guestRaw, path.join(dir, 'dynamic.vhd'), 'vpc', ['subformat=dynamic']);
  images.vhdx = convert(guestRaw, path.join(dir, 'dynamic.vhdx'), 'vhdx', ['block_size=1M']);
  images.vhdxFixed = convert(guestRaw, path.join(dir, 'fixed.vhdx'), 'vhdx', ['subformat=fixed']);
  // A VHDX as a crash leaves it: every block written, but the BAT update of the last one only in the log.
  images.crashed = path.join(dir, 'crashed.vhdx');
  sh('qemu-img', ['create', '-q', '-f', 'vhdx', '-o', 'block_size=1M', images.crashed, String(16 << 20)]);
  sh('qemu-io', ['-f', 'vhdx', '-c', 'write -P 0x31 0 5M', '-c', 'write -P 0x32 6M 10M', images.crashed]);
  const { batOffset } = vhdxLayout(fs.readFileSync(images.crashed));
  const batBefore = fs.readFileSync(images.crashed).subarray(batOffset, batOffset + 4096);
  sh('qemu-io', ['-f', 'vhdx', '-c', 'write -P 0x33 5M 1M', images.crashed]);
  const crashedBytes = fs.readFileSync(images.crashed);
  const batAfter = Buffer.from(crashedBytes.subarray(batOffset, batOffset + 4096));
  batBefore.copy(crashedBytes, batOffset);
  writeLogEntry(crashedBytes, Buffer.alloc(16, 0x4c), { at: 0, tail: 0, sequence: 1n, writes: [{ offset: batOffset, data: batAfter }] });
  fs.writeFileSync(images.crashed, crashedBytes);
  // A monolithicFlat VMDK: a descriptor small enough to live inside its NTFS record, and its extent file.
  images.vmdk = convert(guestRaw, path.join(dir, 'flat.vmdk'), 'vmdk', ['subformat=monolithicFlat']);
  images.compressed = path.join(dir, 'compressed.qcow2');
  sh('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', guestRaw, images.compressed]);
  // A differencing chain: overlay on the fixed VHD's raw twin, with one write of its own.
  images.base = convert(guestRaw, path.join(dir, 'base.qcow2'), 'qcow2', ['preallocation=metadata']);
  images.overlay = path.join(dir, 'overlay.qcow2');
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', 'base.qcow2', images.overlay]);
  sh('qemu-io', ['-c', 'write -P 0x5a 1M 64k', images.overlay]);
  // A qcow2 with an internal snapshot: its clusters are shared with the snapshot.
  images.withSnapshot = convert(guestRaw, path.join(dir, 'snap.qcow2'), 'qcow2', ['preallocation=metadata']);
  sh('qemu-img', ['snapshot', '-c', 'before-update', images.withSnapshot]);
  // A Wubi-style root.disk: a bare ext4 filesystem, no partition table.
  images.wubi = makeGuestFs(dir, 'wubi', 8, 'wubiroot');

  const ntfs = makeNtfs(dir, 'host', 200, 'Windows', {
    '/VMs/My Linux ü.qcow2': images.qcow2,
    '/VMs/fixed.vhd': images.vhdFixed,
    '/VMs/dynamic.vhd': images.vhdDynamic,
    '/VMs/dynamic.vhdx': images.vhdx,
    '/VMs/fixed.vhdx': images.vhdxFixed,
    '/VMs/crashed.vhdx': images.crashed,
    '/VMs/compressed.qcow2': images.compressed,
    '/VMs/base.qcow2': images.base,
    '/VMs/overlay.qcow2': images.overlay,
    '/ubuntu/disks/root.disk': images.wubi,
    '/VMs/snap.qcow2': images.withSnapshot,
    '/VMs/flat.vmdk': images.vmdk,
    '/VMs/flat-flat.vmdk': path.join(dir, 'flat-flat.vmdk'),
  }, ['/VMs', '/ubuntu', '/ubuntu/disks']);
  // An image in hundreds of fragments (its runlist spills into an $ATTRIBUTE_LIST).
  // (on a fresh volume of its own: there the helper's allocation pattern holds)
  const fragNtfs = makeNtfs(dir, 'frag', 40, 'Fragments', {});
  disks.ntfsAddFragmented(fragNtfs, '/VMs/fragmented.vhd', { hostFile: images.vhdFixed }, { chunkBytes: 64 * 1024 });
  fragments = Number(/Total runs:\s*(\d+)/i.exec(sh('ntfsinfo', ['-F', '/VMs/fragmented.vhd', '-v', fragNtfs]))?.[1] ?? 0);
  fragDisk = makeHostDisk(dir, 'frag', [{ image: fragNtfs, type: BASIC_DATA }]);
  // A raw image whose last 4 MiB lie past NTFS's initialized size (ntfstruncate grows the data size only).
  fs.copyFileSync(guestRaw, path.join(dir, 'grown.raw'));
  sh('ntfscp', ['-q', ntfs, path.join(dir, 'grown.raw'), '/VMs/grown.raw']);
  const inode = /Dumping Inode (\d+)/.exec(sh('ntfsinfo', ['-F', '/VMs/grown.raw', ntfs]))![1]!;
  sh('ntfstruncate', [ntfs, inode, String(20 << 20)]);
  hostDisk = makeHostDisk(dir, 'host', [{ sizeMiB: 4, type: 'uefi' }, { image: ntfs, type: BASIC_DATA, label: 'Basic data partition' }]);

  // A second disk: an empty FAT partition, then NTFS with the raw image (found by searching).
  const fat = path.join(dir, 'usb.vfat');
  sh('truncate', ['-s', '34M', fat]);
  sh('mkfs.vfat', ['-F', '32', '-n', 'USB', fat]);
  const ntfs2 = makeNtfs(dir, 'data', 40, 'Data', { '/linux.raw': guestRaw });
  secondDisk = makeHostDisk(dir, 'second', [{ image: fat, type: BASIC_DATA }, { image: ntfs2, type: BASIC_DATA }]);

  // A hibernated Windows volume: hiberfil.sys begins with "hibr".
  const hib = path.join(dir, 'hiberfil.sys');
  fs.writeFileSync(hib, Buffer.concat([Buffer.from('hibr'), Buffer.alloc(8188)]));
  const ntfs3 = makeNtfs(dir, 'hib', 40, 'Hibernated', { '/linux.qcow2': images.qcow2!, '/hiberfil.sys': hib });
  hibernated = makeHostDisk(dir, 'hib', [{ image: ntfs3, type: BASIC_DATA }]);

  // The $Volume dirty flag with the empty journal (every byte of $LogFile 0xFF) ntfs3 and
  // ntfs-3g leave when the power goes while they write (and mkntfs and ntfsfix leave too);
  // and the same flag with a Windows restart area ("RSTR") in the journal: Windows did not
  // close the volume, or asks for chkdsk.
  const ntfs4 = makeNtfs(dir, 'dirty', 96, 'Dirty', { '/linux.qcow2': images.qcow2!, '/dyn.vhdx': convert(guestRaw, path.join(dir, 'dyn.vhdx'), 'vhdx', ['subformat=dynamic', 'block_size=1M']) });
  disks.ntfsSetVolumeFlags(ntfs4, disks.NTFS_VOLUME_FLAGS.dirty);
  dirty = makeHostDisk(dir, 'dirty', [{ image: ntfs4, type: BASIC_DATA }]);
  const ntfs5 = makeNtfs(dir, 'windirty', 40, 'Dirty', { '/linux.qcow2': images.qcow2! });
  disks.ntfsSetVolumeFlags(ntfs5, disks.NTFS_VOLUME_FLAGS.dirty);
  const img5 = fs.readFileSync(ntfs5);
  const log = openNtfs(bytesReader(ntfs5, img5)).lookup('/$LogFile').extents[0] as { deviceOffset: number };
  Buffer.from('RSTR').copy(img5, log.deviceOffset);
  fs.writeFileSync(ntfs5, img5);
  windowsDirty = makeHostDisk(dir, 'windirty', [{ image: ntfs5, type: BASIC_DATA }]);
}, 120_000);

afterAll(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

function plan(cmdline: string, disks = [hostDisk]) {
  const d = devicesOf(disks);
  try {
    return { report: planAgainstDevices(cmdline, d.devices), devices: d };
  } catch (e) {
    d.close();
    throw e;
  }
}

function planError(cmdline: string, disks = [hostDisk]): string {
  const d = devicesOf(disks);
  try {
    planAgainstDevices(cmdline, d.devices);
  } catch (e) {
    return (e as Error).message;
  } finally {
    d.close();
  }
  throw new Error(`${cmdline}: planned without error`);
}

/** The whole virtual disk and each partition device, read through the planned tables, against qemu-img. */
function expectTablesMatch(vp: VdiskPlan, devices: ReturnType<typeof devicesOf>, image: string) {
  const oracle = qemuRaw(image, dir);
  expect(vp.size).toBe(oracle.length);
  const whole = readPlanned(vp.devices, devices.devices, vp.name, 0, vp.size);
  expect(Buffer.from(whole).equals(oracle)).toBe(true);
  for (const p of vp.partitions) {
    // Partitions lie straight on the host (one remap per I/O), except over a snapshot.
    const targets = vp.devices.find((d) => d.name === p.name)!.targets;
    if (vp.mode === 'snapshot') expect(targets).toEqual([{ start: 0, length: p.size / 512, type: 'linear', params: `/dev/mapper/${vp.name} ${p.start / 512}` }]);
    else expect(targets.some((t) => t.params.startsWith('/dev/mapper/')), p.name).toBe(false);
    const bytes = readPlanned(vp.devices, devices.devices, p.name, 0, p.size);
    expect(Buffer.from(bytes).equals(oracle.subarray(p.start, p.start + p.size)), p.name).toBe(true);
  }
}

describe('vdisk plan: direct mappings read what qemu-img reads', () => {
  it('qcow2 (preallocated) on NTFS, a path with spaces and non-ASCII: rw direct, root by the GPT root type', () => {
    const { report, devices } = plan('root="vdisk:LABEL=Windows:/VMs/My Linux ü.qcow2" rw');
    try {
      const vp = report.vdisks[0]!;
      expect(vp.path).toBe('direct');
      expect(vp.why).toMatch(/^direct: the image is fully mappable/);
      expect(vp.devices.map((d) => [d.name, d.uuid, d.readOnly])).toEqual([
        ['vdisk0', 'VDBOOT-vdisk0', false], ['vdisk0p1', 'VDBOOT-vdisk0-part1', false], ['vdisk0p2', 'VDBOOT-vdisk0-part2', false],
      ]);
      expect(vp.devices[0]!.targets.every((t) => t.type === 'linear' && t.params.startsWith('/dev/sda2 '))).toBe(true);
      expect(vp.root?.partition.name).toBe('vdisk0p2');
      expect(vp.root?.why).toMatch(/Linux root \(x86-64\)/);
      expect(vp.root?.device).toMatchObject({ path: '/dev/mapper/vdisk0p2', fsType: 'ext4', label: GUEST_LABEL });
      expect(report.mounts[0]).toMatchObject({ source: '/dev/mapper/vdisk0p2', target: '/root', fstype: 'ext4', readOnly: false });
      expect(report.vdhost?.targets[0]?.params).toBe('/dev/sda2 0');
      expectTablesMatch(vp, devices, images.qcow2!);
    } finally {
      devices.close();
    }
  });

  it('fixed VHD: rw direct, the footer is not part of the disk', () => {
    const { report, devices } = plan('root=vdisk:LABEL=Windows:/VMs/fixed.vhd rw');
    try {
      const vp = report.vdisks[0]!;
      expect(vp.chain[0]).toMatchObject({ format: 'vhd', subformat: 'fixed' });
      expect(vp.path).toBe('direct');
      expectTablesMatch(vp, devices, images.vhdFixed!);
    } finally {
      devices.close();
    }
  });

  it('dynamic VHDX in snapshot mode: absent blocks become dm-zero under a snapshot over a read-only base', () => {
    const { report, devices } = plan('root=vdisk:LABEL=Windows:/VMs/dynamic.vhdx rd.vdisk.mode=snapshot');
    try {
      const vp = report.vdisks[0]!;
      expect(vp.devices.map((d) => d.name)).toEqual(['vdisk0-base', 'vdisk0', 'vdisk0p1', 'vdisk0p2']);
      expect(vp.devices[0]!.readOnly).toBe(true);
      expect(vp.devices[0]!.targets.some((t) => t.type === 'zero')).toBe(true);
      expect(vp.devices[1]!.targets).toEqual([{ start: 0, length: vp.size / 512, type: 'snapshot', params: '/dev/mapper/vdisk0-base $COW N 8' }]);
      expect(vp.cowBytes).toBe(vp.size);
      expectTablesMatch(vp, devices, images.vhdx!);
    } finally {
      devices.close();
    }
  });

  it('a monolithicFlat VMDK: the resident descriptor needs no clusters, the extent file is mapped directly', () => {
    const { report, devices } = plan('root=vdisk:LABEL=Windows:/VMs/flat.vmdk rw');
    try {
      const vp = report.vdisks[0]!;
      expect(vp.chain[0]).toMatchObject({ format: 'vmdk', subformat: 'monolithicFlat' });
      expect(vp.path).toBe('direct');
      expectTablesMatch(vp, devices, images.vmdk!);
    } finally {
      devices.close();
    }
  });

  it('a differencing qcow2 chain resolves its parent on the same NTFS volume', () => {
    const { report, devices } = plan('root=vdisk:LABEL=Windows:/VMs/overlay.qcow2 rd.vdisk.mode=ro');
    try {
      const vp = report.vdisks[0]!;
      expect(vp.chain.map((l) => l.path)).toEqual(['/VMs/overlay.qcow2', '/VMs/base.qcow2']);
      expect(vp.devices.every((d) => d.readOnly)).toBe(true);
      expect(report.plan.readOnly).toBe(true);
      expectTablesMatch(vp, devices, images.overlay!);
    } finally {
      devices.close();
    }
  });

  it('an image in hundreds of NTFS fragments: one linear target per fragment, reading what qemu-img reads', () => {
    expect(fragments).toBeGreaterThan(200);
    const { report, devices } = plan('root=vdisk:LABEL=Fragments:/VMs/fragmented.vhd rw', [fragDisk]);
    try {
      const vp = report.vdisks[0]!;
      expect(vp.path).toBe('direct');
      expect(vp.devices[0]!.targets.length).toBeGreaterThan(200);
      // The root partition's own table is cut from the fragments it spans, mid-fragment at both ends.
      expect(vp.devices.find((d) => d.name === 'vdisk0p2')!.targets.length).toBeGreaterThan(100);
      expectTablesMatch(vp, devices, images.vhdFixed!);
    } finally {
      devices.close();
    }
  });

  it('without a host spec every partition is searched: found on the second disk\'s NTFS', () => {
    const { report, devices } = plan('root=vdisk:/linux.raw rd.vdisk.root=2 rd.vdisk.mode=ro', [hostDisk, secondDisk]);
    try {
      const vp = report.vdisks[0]!;
      expect(vp.hostDevice).toBe('/dev/sdb2');
      expect(vp.root?.why).toBe('rd.vdisk.root=2');
      expectTablesMatch(vp, devices, guestRaw);
    } finally {
      devices.close();
    }
  });
});

function withReader<T>(file: string, f: (r: ReturnType<typeof openFileReader>) => T): T {
  const r = openFileReader(file);
  try {
    return f(r);
  } finally {
    r.close();
  }
}

describe('vdisk plan: a VHDX booted rw gets new write GUIDs before its first write', () => {
  /** The host disk after the plan's header writes, and the image file read back from its NTFS. */
  function applyAndRead(vp: VdiskPlan, file: string): { after: string; disk: string } {
    const disk = path.join(dir, `applied-${Date.now()}.img`);
    fs.copyFileSync(hostDisk, disk);
    const part = withReader(disk, (r) => parsePartitionTable(r)).partitions.find((p) => p.number === 2)!;
    const hu = vp.headerUpdate!;
    const fd = fs.openSync(disk, 'r+');
    for (const w of hu.writes) {
      expect(w.offset + w.bytes.length).toBeLessThanOrEqual(part.size);
      fs.writeSync(fd, w.bytes, 0, w.bytes.length, part.start + w.offset);
    }
    fs.closeSync(fd);
    const ntfs = path.join(dir, `applied-${Date.now()}.ntfs`);
    fs.writeFileSync(ntfs, fs.readFileSync(disk).subarray(part.start, part.start + part.size));
    const after = path.join(dir, `after-${Date.now()}.vhdx`);
    fs.writeFileSync(after, execFileSync('ntfscat', ['-f', ntfs, file], { maxBuffer: 1 << 30 }));
    return { after, disk };
  }

  function headersOf(f: string) {
    const b = fs.readFileSync(f);
    return [64 * 1024, 128 * 1024].map((o) => parseVhdxHeader(b.subarray(o, o + 4096), o, f));
  }

  it('direct: two 4 KiB writes on the host partition inside the file\'s clusters; qemu-img check passes, the disk reads the same, both headers current with new GUIDs', () => {
    const { report, devices } = plan('root=vdisk:LABEL=Windows:/VMs/fixed.vhdx rw');
    devices.close();
    const vp = report.vdisks[0]!;
    expect(vp.path).toBe('direct');
    expect(vp.headerUpdate).toMatchObject({ on: 'device', path: '/dev/sda2' });
    expect(vp.headerUpdate!.writes.reduce((n, w) => n + w.bytes.length, 0)).toBe(8192);
    const { after } = applyAndRead(vp, '/VMs/fixed.vhdx');
    const check = spawnSync('qemu-img', ['check', '-f', 'vhdx', after], { encoding: 'utf8' });
    expect(check.status, `${check.stdout}${check.stderr}`).toBe(0);
    expect(qemuRaw(after, dir).equals(qemuRaw(images.vhdxFixed!, dir))).toBe(true);
    // only the two header slots changed in the file
    const a = fs.readFileSync(images.vhdxFixed!);
    const b = fs.readFileSync(after);
    expect(b.length).toBe(a.length);
    for (let i = 0; i < a.length; i += 4096) {
      const inHeader = (i >= 64 * 1024 && i < 68 * 1024) || (i >= 128 * 1024 && i < 132 * 1024);
      if (!inHeader) expect(a.subarray(i, i + 4096).equals(b.subarray(i, i + 4096)), `4 KiB at ${i}`).toBe(true);
    }
    const before = headersOf(images.vhdxFixed!).filter((h) => h).reduce((x, y) => (y!.sequence > x!.sequence ? y : x))!;
    const now = headersOf(after);
    expect(now.every((h) => h !== undefined)).toBe(true);
    expect(now.map((h) => h!.sequence).sort()).toEqual([before.sequence + 1n, before.sequence + 2n]);
    for (const h of now) {
      expect(h!.dataWriteGuid).not.toBe(before.dataWriteGuid);
      expect(h!.fileWriteGuid).not.toBe(before.fileWriteGuid);
      expect(h!.dataWriteGuid).toBe(now[0]!.dataWriteGuid);
    }
  });

  it('a VHDX with a log to replay: ro reads through the log and writes nothing; rw writes the log\'s update, then headers naming no log', () => {
    const ro = plan('root=/dev/sda1 rd.vdisk.attach=LABEL=Windows:/VMs/crashed.vhdx rd.vdisk.mode=ro');
    ro.devices.close();
    const rovp = ro.report.vdisks[0]!;
    expect(rovp.headerUpdate).toBeUndefined();
    expect(rovp.map.extents.every((e) => e.kind === 'data')).toBe(true); // block 5 is there, as the log says
    const { report, devices } = plan('root=/dev/sda1 rd.vdisk.attach=LABEL=Windows:/VMs/crashed.vhdx rw');
    devices.close();
    const vp = report.vdisks[0]!;
    expect(vp.path).toBe('direct');
    expect(vp.headerUpdate!.writes.reduce((n, w) => n + w.bytes.length, 0)).toBe(3 * 4096);
    const { after } = applyAndRead(vp, '/VMs/crashed.vhdx');
    expect(spawnSync('qemu-img', ['info', '-f', 'vhdx', after]).status).toBe(0); // no log left to replay
    const check = spawnSync('qemu-img', ['check', '-f', 'vhdx', after], { encoding: 'utf8' });
    expect(check.status, `${check.stdout}${check.stderr}`).toBe(0);
    const raw = qemuRaw(after, dir);
    for (const [at, b] of [[0, 0x31], [5 << 20, 0x33], [6 << 20, 0x32]] as const) expect(raw.subarray(at, at + (1 << 20)).every((x) => x === b), `at ${at}`).toBe(true);
  });

  it('loop: the same two writes into the file through the mounted host; ro, snapshot and other formats write no header', () => {
    const loop = plan('root=vdisk:LABEL=Windows:/VMs/fixed.vhdx rw rd.vdisk.map=loop');
    loop.devices.close();
    const hu = loop.report.vdisks[0]!.headerUpdate!;
    expect(hu).toMatchObject({ on: 'file', path: '/VMs/fixed.vhdx' });
    expect(hu.writes.map((w) => [w.offset, w.bytes.length]).sort((x, y) => x[0]! - y[0]!)).toEqual([[64 * 1024, 4096], [128 * 1024, 4096]]);
    for (const cmdline of ['root=vdisk:LABEL=Windows:/VMs/fixed.vhdx rd.vdisk.mode=ro', 'root=vdisk:LABEL=Windows:/VMs/fixed.vhdx rd.vdisk.mode=snapshot', 'root=vdisk:LABEL=Windows:/VMs/fixed.vhd rw']) {
      const r = plan(cmdline);
      r.devices.close();
      expect(r.report.vdisks[0]!.headerUpdate, cmdline).toBeUndefined();
    }
  });
});

describe('vdisk plan: an image with children is not written', () => {
  it('the backing file of a qcow2 overlay beside it is refused rw, naming the overlay and the ways out; snapshot still boots it', () => {
    const msg = planError('root=vdisk:LABEL=Windows:/VMs/base.qcow2 rw');
    expect(msg).toMatch(/\/VMs\/base\.qcow2 is the parent of \/VMs\/overlay\.qcow2: a differencing image/);
    expect(msg).toMatch(/rd\.vdisk\.mode=snapshot/);
    expect(msg).toMatch(/qemu-img commit/);
    const { report, devices } = plan('root=vdisk:LABEL=Windows:/VMs/base.qcow2 rd.vdisk.mode=snapshot');
    devices.close();
    expect(report.vdisks[0]!.mode).toBe('snapshot');
  });
});

describe('vdisk plan: root partition choice', () => {
  it('rd.vdisk.root by number, PARTLABEL and UUID', () => {
    for (const [opt, want] of [['1', 'vdisk0p1'], ['PARTLABEL=esp', 'vdisk0p1'], [`LABEL=${GUEST_LABEL}`, 'vdisk0p2']] as const) {
      const { report, devices } = plan(`root=vdisk:LABEL=Windows:/VMs/fixed.vhd rd.vdisk.root=${opt}`);
      devices.close();
      expect(report.vdisks[0]!.root?.partition.name, opt).toBe(want);
    }
  });

  it('a partition that does not exist lists the ones that do', () => {
    const msg = planError('root=vdisk:LABEL=Windows:/VMs/fixed.vhd rd.vdisk.root=7');
    expect(msg).toMatch(/has no partition 7/);
    expect(msg).toMatch(/partition 2: 12 MiB ext4 LABEL="guestroot"/);
  });

  it('Wubi syntax: root=HOST loop=PATH boots an unpartitioned filesystem image as the whole disk', () => {
    const { report, devices } = plan('root=LABEL=Windows loop=/ubuntu/disks/root.disk ro');
    try {
      const vp = report.vdisks[0]!;
      expect(report.plan.vdisk.compat).toBe('loop=');
      expect(vp.partitionTable).toBe('none');
      expect(vp.devices.map((d) => d.name)).toEqual(['vdisk0']);
      expect(vp.root?.partition.name).toBe('vdisk0');
      expect(vp.root?.why).toMatch(/unpartitioned disk holds ext4/);
      expectTablesMatch(vp, devices, images.wubi!);
    } finally {
      devices.close();
    }
  });

  it('dracut-vdfuseloop syntax: rd.hostdev + rd.vdisk + rd.vdloop pick the host, image and partition', () => {
    const { report, devices } = plan('rd.hostdev=LABEL=Windows rd.vdisk=/VMs/fixed.vhd rd.vdloop=/dev/vdhost/Partition2 root=/dev/loop0');
    devices.close();
    expect(report.plan.root).toMatchObject({ kind: 'vdisk', path: '/VMs/fixed.vhd' });
    expect(report.vdisks[0]!.root?.partition.name).toBe('vdisk0p2');
  });

  it('rd.vdisk.attach and rd.ntfsloop attach images; root=UUID= then finds root among their partitions', () => {
    const { report: probe, devices: d0 } = plan('root=vdisk:LABEL=Windows:/VMs/fixed.vhd');
    d0.close();
    const uuid = probe.vdisks[0]!.root!.partition.uuid!;
    const { report, devices } = plan(`root=UUID=${uuid} rd.ntfsloop=LABEL=Windows:/VMs/fixed.vhd rd.vdisk.attach=/VMs/dynamic.vhdx rd.vdisk.mode=ro`);
    devices.close();
    expect(report.vdisks.map((v) => [v.name, v.imagePath, v.root])).toEqual([['vdisk0', '/VMs/fixed.vhd', undefined], ['vdisk1', '/VMs/dynamic.vhdx', undefined]]);
    expect(report.mounts[0]).toMatchObject({ source: '/dev/mapper/vdisk0p2', fstype: 'ext4' });
  });
});

describe('vdisk plan: what rw refuses, and why', () => {
  it('a dynamic VHD with absent blocks is refused rw, naming the sizes and the remedies', () => {
    const msg = planError('root=vdisk:LABEL=Windows:/VMs/dynamic.vhd rw');
    expect(msg).toMatch(/cannot be mapped read-write: \d[\d.]* MiB \(\d+ bytes\) of it are not allocated in the image/);
    expect(msg).toMatch(/rd\.vdisk\.mode=snapshot/);
    expect(msg).toMatch(/subformat=fixed/);
    expect(msg).toMatch(/At boot, vdboot first expands it in place \(\d+ blocks? of 2.0 MiB allocated and zero-filled; the file grows from/);
    expect(planError('root=vdisk:LABEL=Windows:/VMs/dynamic.vhd rd.vdisk.expand=0')).toMatch(/rd\.vdisk\.expand=0 forbids expanding/);
  });

  it('with qemu-nbd in the initramfs, auto serves what device-mapper cannot write or read through nbd', () => {
    const d = devicesOf([hostDisk]);
    try {
      // expansion in place comes first; nbd serves the image where vdboot does not expand it
      expect(() => planAgainstDevices('root=vdisk:LABEL=Windows:/VMs/dynamic.vhd rw', d.devices, { nbd: true })).toThrow(/expands it in place/);
      const dyn = planAgainstDevices('root=vdisk:LABEL=Windows:/VMs/dynamic.vhd rw rd.vdisk.expand=0', d.devices, { nbd: true }).vdisks[0]!;
      expect(dyn.path).toBe('nbd');
      expect(dyn.why).toMatch(/^nbd: .* not allocated, so writes must go through the image format \(rd\.vdisk\.expand=0 forbids expanding it in place\): qemu-nbd allocates them/);
      expect(dyn.nbd).toEqual({ file: '/VMs/dynamic.vhd', format: 'vpc', readOnly: false });
      expect(dyn.devices[0]!.targets).toEqual([{ start: 0, length: dyn.size / 512, type: 'linear', params: '$NBD 0' }]);
      const compressed = planAgainstDevices('root=vdisk:LABEL=Windows:/VMs/compressed.qcow2 rd.vdisk.mode=ro', d.devices, { nbd: true }).vdisks[0]!;
      expect(compressed.path).toBe('nbd');
      expect(compressed.nbd).toMatchObject({ format: 'qcow2', readOnly: true });
      // a fully mappable image still takes the direct path
      expect(planAgainstDevices('root=vdisk:LABEL=Windows:/VMs/fixed.vhd rw', d.devices, { nbd: true }).vdisks[0]!.path).toBe('direct');
    } finally {
      d.close();
    }
    expect(planError('root=vdisk:LABEL=Windows:/VMs/fixed.vhd rd.vdisk.map=nbd')).toMatch(/this initramfs has no qemu-nbd/);
  });

  it('a differencing chain is refused rw: writes would change the parent', () => {
    expect(planError('root=vdisk:LABEL=Windows:/VMs/overlay.qcow2 rw')).toMatch(/held by the parent image \/VMs\/base\.qcow2/);
  });

  it('a hibernated NTFS volume is never written: rw refused with the write blocker\'s advice, snapshot allowed', () => {
    const msg = planError('root=vdisk:LABEL=Hibernated:/linux.qcow2 rw', [hibernated]);
    expect(msg).toMatch(/which vdboot will not write to/);
    expect(msg).toMatch(/hiberfil\.sys starts with "hibr"/);
    expect(msg).toMatch(/powercfg \/h off/);
    expect(msg).toMatch(/rd\.vdisk\.mode=snapshot/);
    const { report, devices } = plan('root=vdisk:LABEL=Hibernated:/linux.qcow2 rd.vdisk.mode=snapshot', [hibernated]);
    devices.close();
    expect(report.vdisks[0]!.mode).toBe('snapshot');
  });

  it('bytes past NTFS\'s initialized size: rw fills them through the driver first (the dry run stops there, naming it); with rd.vdisk.expand=0 rw goes through the loop path (auto) and direct is refused; ro maps them as zeros', () => {
    expect(planError('root=vdisk:LABEL=Windows:/VMs/grown.raw rw rd.vdisk.root=2')).toMatch(
      /\/VMs\/grown\.raw cannot be mapped read-write as it is: 4\.0 MiB \(4194304 bytes\) of the file lie in holes or past its initialized size .* At boot, vdboot first fills \/VMs\/grown\.raw's 4\.0 MiB \(4194304 bytes\) of holes and uninitialized ranges .* through the host's driver \(4\.0 MiB \(4194304 bytes\) rewritten in whole units of 64 KiB\).*then plans again and maps it directly/,
    );
    const { report, devices } = plan('root=vdisk:LABEL=Windows:/VMs/grown.raw rw rd.vdisk.root=2 rd.vdisk.expand=0');
    devices.close();
    const vp = report.vdisks[0]!;
    expect(vp.path).toBe('loop');
    expect(vp.why).toMatch(/^loop: the direct path is not safe here \(4\.0 MiB \(4194304 bytes\) of the host file lie past its initialized size or in holes/);
    expect(vp.loops).toEqual([{ index: 0, file: '/VMs/grown.raw', readOnly: false }]);
    expect(vp.devices[0]!.targets).toEqual([{ start: 0, length: 40960, type: 'linear', params: '$LOOP0 0' }]);
    expect(report.mounts.find((m) => m.target === '/run/vdboot/host')).toMatchObject({ readOnly: false });
    expect(vp.sparseHostFiles).toEqual(['/VMs/grown.raw']);
    expect(planError('root=vdisk:LABEL=Windows:/VMs/grown.raw rw rd.vdisk.root=2 rd.vdisk.map=direct rd.vdisk.expand=0')).toMatch(/rd\.vdisk\.map=direct: .*past its initialized size/);
    const ro = plan('root=vdisk:LABEL=Windows:/VMs/grown.raw rd.vdisk.mode=ro rd.vdisk.root=2');
    try {
      const v = ro.report.vdisks[0]!;
      expect(v.path).toBe('direct');
      expect(v.devices[0]!.targets.at(-1)).toEqual({ start: 32768, length: 8192, type: 'zero', params: '' });
      const oracle = fs.readFileSync(guestRaw);
      const bytes = readPlanned(v.devices, ro.devices.devices, 'vdisk0', 0, 20 << 20);
      expect(Buffer.from(bytes.subarray(0, oracle.length)).equals(oracle)).toBe(true);
      expect(bytes.subarray(oracle.length).every((b) => b === 0)).toBe(true);
    } finally {
      ro.devices.close();
    }
  });

  it('a host with 4096-byte logical sectors: auto takes the loop path, since a dm view would change the sector size', () => {
    const d = devicesOf([hostDisk]);
    try {
      const found = findImage(d.devices, { by: 'label', value: 'Windows' }, '/VMs/fixed.vhd');
      try {
        const vp = planVdisk({ index: 0, path: found.file.path, mode: 'ro', map: 'auto', expand: true }, { ...imageHostFor(found.host, [found.file]), logicalBlockSize: 4096 });
        expect(vp.path).toBe('loop');
        expect(vp.why).toMatch(/4096-byte logical sectors/);
        const same = planVdisk({ index: 0, path: found.file.path, mode: 'ro', map: 'auto', expand: true }, { ...imageHostFor(found.host, [found.file]), logicalBlockSize: 512 });
        expect(same.path).toBe('direct');
      } finally {
        found.host.close();
      }
    } finally {
      d.close();
    }
  });

  it('a volume Windows left dirty (its journal holds a restart area) is not written: rw refused, naming chkdsk', () => {
    const msg = planError('root=vdisk:LABEL=Dirty:/linux.qcow2 rw', [windowsDirty]);
    expect(msg).toMatch(/is marked dirty/);
    expect(msg).toMatch(/chkdsk \/f/);
  });

  it('a volume a Linux driver left dirty (empty journal, e.g. a power cut during expansion): rw direct boots, with a warning; writes through a driver are refused', () => {
    const { report, devices } = plan('root=vdisk:LABEL=Dirty:/linux.qcow2 rw', [dirty]);
    devices.close();
    const vp = report.vdisks[0]!;
    expect(vp.path).toBe('direct');
    expect(vp.warnings.join('\n')).toMatch(/marked dirty by a Linux NTFS driver .*writes only inside the image \(the direct path\).*chkdsk \/f/);
    // expanding a dynamic image would write through the host's driver
    expect(planError('root=vdisk:LABEL=Dirty:/dyn.vhdx rw', [dirty])).toMatch(/would first expand the image or fill its holes through the host's filesystem driver.*marked dirty by a Linux NTFS driver/s);
    expect(planError('root=vdisk:LABEL=Dirty:/linux.qcow2 rw rd.vdisk.map=loop', [dirty])).toMatch(/write the image through the host's filesystem driver \(loop\)/);
  });

  it('a qcow2 with internal snapshots is refused rw: its clusters are shared', () => {
    expect(planError('root=vdisk:LABEL=Windows:/VMs/snap.qcow2 rw')).toMatch(/has 1 internal snapshot, which share clusters/);
  });

  it('compressed clusters cannot be mapped: the message says how to convert', () => {
    const msg = planError('root=vdisk:LABEL=Windows:/VMs/compressed.qcow2 rd.vdisk.mode=ro');
    expect(msg).toMatch(/cannot be handed to device-mapper \(.*compress/);
    expect(msg).toMatch(/qemu-img convert/);
  });

  it('a missing file names every partition searched and what each holds', () => {
    const msg = planError('root=vdisk:/VMs/missing.vhdx', [hostDisk, secondDisk]);
    expect(msg).toMatch(/Could not find \/VMs\/missing\.vhdx on any partition\. Searched 3 partitions/);
    expect(msg).toMatch(/\/dev\/sda2 \(ntfs, LABEL="Windows"\): .*\/VMs has no "missing\.vhdx"/);
    expect(msg).toMatch(/\/dev\/sdb1 \(vfat, LABEL="USB"\)/);
    expect(msg).toMatch(/Not searched .*\/dev\/sda1 \(no filesystem\)/);
  });
});

describe('vdboot plan command', () => {
  it('prints devices, the chain, the path and why, every dm table and the mounts', async () => {
    let out = '';
    let err = '';
    const io = { stdout: (t: string) => { out += t; }, stderr: (t: string) => { err += t; }, stdoutBytes: async () => {} };
    const rc = await planCommand.run(['--cmdline', 'root=vdisk:LABEL=Windows:/VMs/fixed.vhd rw', '--disk', hostDisk], io);
    expect(err).toBe('');
    expect(rc).toBe(0);
    expect(out).toMatch(/\/dev\/sda2 +\d+ MiB ntfs LABEL="Windows"/);
    expect(out).toMatch(/image +\/VMs\/fixed\.vhd: vhd fixed, 16 MiB/);
    expect(out).toMatch(/path: direct: the image is fully mappable/);
    // The partition (6144 sectors into the disk) is laid on the host where vdisk0's sector 6144 lies.
    const at = Number(/dm vdisk0 \(uuid VDBOOT-vdisk0\): 1 target\n +0 32776 linear \/dev\/sda2 (\d+)/.exec(out)?.[1]);
    expect(at).toBeGreaterThan(0);
    expect(out).toContain(`dm vdisk0p2 (uuid VDBOOT-vdisk0-part2): 1 target\n    0 24576 linear /dev/sda2 ${at + 6144}\n`);
    expect(out).toMatch(/\/dev\/mapper\/vdisk0p2 on \/root \(ext4, rw\)/);
    expect(out).toMatch(/\/dev\/mapper\/vdhost on \/run\/vdboot\/host \(ntfs, ro\)/);
    const bad = await planCommand.run(['--cmdline', 'root=vdisk:LABEL=Windows:/VMs/dynamic.vhd rw rd.vdisk.expand=0', '--disk', hostDisk], io);
    expect(bad).toBe(1);
    expect(err).toMatch(/the boot would fail here:\n.*not allocated in the image/);
    out = '';
    expect(await planCommand.run(['--cmdline', 'root=vdisk:LABEL=Windows:/VMs/fixed.vhd rw', '--disk', hostDisk, '--json'], io)).toBe(0);
    const json = JSON.parse(out) as { vdisks: { name: string; path: string; devices: { name: string; uuid: string; targets: { type: string }[] }[]; root: { device: { path: string } } }[]; mounts: { target: string }[] };
    expect(json.vdisks[0]).toMatchObject({ name: 'vdisk0', path: 'direct', root: { device: { path: '/dev/mapper/vdisk0p2' } } });
    expect(json.vdisks[0]!.devices.map((d) => d.uuid)).toEqual(['VDBOOT-vdisk0', 'VDBOOT-vdisk0-part1', 'VDBOOT-vdisk0-part2']);
    expect(json.mounts.map((m) => m.target)).toEqual(['/root', '/run/vdboot/host']);
    void formatReport;
  });
});

describe('sliceTargets: a partition cut from the whole disk\'s table', () => {
  const table = [
    { start: 0, length: 100, type: 'linear', params: '/dev/sda2 5000' },
    { start: 100, length: 50, type: 'zero', params: '' },
    { start: 150, length: 200, type: 'linear', params: '$LOOP1 8' },
  ];

  it('cuts linear targets mid-way (offset moved by the cut), zero targets to size, and keeps placeholders', () => {
    expect(sliceTargets(table, 60, 200)).toEqual([
      { start: 0, length: 40, type: 'linear', params: '/dev/sda2 5060' },
      { start: 40, length: 50, type: 'zero', params: '' },
      { start: 90, length: 110, type: 'linear', params: '$LOOP1 8' },
    ]);
    expect(sliceTargets(table, 170, 30)).toEqual([{ start: 0, length: 30, type: 'linear', params: '$LOOP1 28' }]);
    expect(sliceTargets([{ start: 0, length: 64, type: 'linear', params: '$NBD 0' }], 16, 32)).toEqual([{ start: 0, length: 32, type: 'linear', params: '$NBD 16' }]);
  });

  it('every sector of the slice reads the sector the whole disk maps there', () => {
    const where = (ts: typeof table, sector: number) => {
      const t = ts.find((x) => sector >= x.start && sector < x.start + x.length)!;
      if (t.type === 'zero') return 'zero';
      const [dev, off] = t.params.split(' ');
      return `${dev}@${Number(off) + sector - t.start}`;
    };
    for (const [start, length] of [[0, 350], [99, 2], [100, 50], [149, 201], [349, 1]] as const) {
      const cut = sliceTargets(table, start, length)!;
      expect(cut.reduce((n, t) => n + t.length, 0)).toBe(length);
      for (let i = 0; i < length; i++) expect(where(cut, i), `${start}+${i}`).toBe(where(table, start + i));
    }
  });

  it('a snapshot (or any target addressed only through its device) cannot be cut: null, so the caller stacks', () => {
    expect(sliceTargets([{ start: 0, length: 64, type: 'snapshot', params: '/dev/mapper/vdisk0-base $COW N 8' }], 8, 8)).toBeNull();
  });

  it('a slice past the table\'s end or across a gap is an internal error, never a short device', () => {
    expect(() => sliceTargets(table, 300, 100)).toThrow(/ends at sector 350, before 400/);
    expect(() => sliceTargets([table[0]!, table[2]!], 90, 100)).toThrow(/gap at sector 100/);
  });
});
