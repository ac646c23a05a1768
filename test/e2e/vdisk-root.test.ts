/**
 * End to end: root=vdisk: under QEMU. A guest disk (GPT, root partition of type
 * "Linux root (x86-64)" with ext4) is converted by qemu-img and copied onto an NTFS or
 * FAT32 partition; vdboot's initramfs maps it with device-mapper (straight onto the host
 * partition's sectors, or through a loop device of the file), the guest writes a file and
 * hands over to /run/initramfs/shutdown (as a guest without systemd does), and on the host
 * the image passes `qemu-img check`, holds the file, and the host filesystem is clean.
 */
import { createHash } from 'node:crypto';
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeInitramfs } from '../../mkinitramfs/build.ts';
import { convertImage, ntfsAddFragmented, type FileTree } from '../../qemu/disks.ts';
import { guestFact, parseGuestFacts, GUEST_MARKER } from '../../qemu/guest.ts';
import { makeGuestDisk } from '../kit/guest-disk.ts';
import { expectHostClean, fileInImage, hostDisk, readHostFile, type HostDisk } from '../kit/host-disk.ts';
import { bootVm, defaultKernel, type Vm } from '../../qemu/harness.ts';
import { openHostFs } from '../../src/formats/hostfs.ts';
import { parseVhdxHeader } from '../../src/formats/vhdx.ts';
import { vhdxLayout, writeLogEntry } from '../formats/vhdx-patch.ts';
import { openFileReader } from '../../src/sys/node-reader.ts';

const NOTE = 'written by the guest on a vdisk root';
const ROOT_UUID = '6c0f5b8e-2d4a-4e1b-9f3c-7a8b9c0d1e2f';

let dir: string;
let initrd: string;
let guestRaw: string;
/** the guest's root filesystem alone (a Wubi root.disk) */
let guestFs: string;
const vms: Vm[] = [];

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'vdboot-e2e-vdisk-'));
  initrd = join(dir, 'initrd.img');
  // without ntfs-3g (included by default on kernels without ntfs3): NTFS hosts through vdboot's direct path alone
  writeInitramfs(initrd, { kernel: defaultKernel(), without: ['ntfs-3g'] });
  ({ raw: guestRaw, fs: guestFs } = makeGuestDisk(dir, {
    writeFile: { path: '/home/note.txt', content: NOTE },
    commands: [
      // a boot counter: the second boot sees what the first one wrote
      'n=$(cat /home/count 2>/dev/null || echo 0); n=$((n+1)); echo $n > /home/count; sync',
      guestFact('count', '$n'),
      guestFact('host', "$(ls /run/vdboot/host 2>/dev/null | tr '\\n' ,)"),
      guestFact('mapper', "$(ls /dev/mapper | tr '\\n' ,)"),
    ],
    then: { exec: '/run/initramfs/shutdown poweroff' },
  }, { uuid: ROOT_UUID }));
}, 300_000);

afterAll(async () => {
  for (const vm of vms) if (!vm.exited) await vm.kill();
  if (dir && !process.env.VDBOOT_KEEP) rmSync(dir, { recursive: true, force: true });
});

async function bootGuest(host: HostDisk, append: string, name: string, withInitrd = initrd) {
  const vm = await bootVm({ initrd: withInitrd, append, disks: [{ file: host.disk, interface: 'virtio-blk' }], name });
  vms.push(vm);
  await vm.waitFor(GUEST_MARKER, 240_000);
  const facts = parseGuestFacts(vm.transcript());
  await vm.waitExit(120_000);
  return { vm, facts, transcript: vm.transcript() };
}

function expectHandOff(t: string): void {
  expect(t).toMatch(/shutdown hand-off \(poweroff\)/);
  expect(t).toMatch(/removed \/dev\/mapper\/vdisk0\r?\n/);
  expect(t).toMatch(/reboot: Power down/);
}

interface FormatCase {
  name: string;
  /** qemu-img's format name */
  format: string;
  options: string[];
  /** the image's path on the host; extra files (a flat VMDK's extent) go next to it */
  file: string;
  /** changes the converted image before it goes on the host */
  patch?: (image: string) => void;
}

/**
 * A VHDX as an unclean shutdown leaves it: the BAT sector's update only in the log (in the
 * file, block 0 still reads as absent). vdboot must replay the log before the guest writes.
 */
function leaveLogToReplay(image: string): void {
  const b = readFileSync(image);
  const { batOffset } = vhdxLayout(b);
  const bat = Buffer.from(b.subarray(batOffset, batOffset + 4096));
  b.writeUInt32LE(b.readUInt32LE(batOffset) & ~7, batOffset); // block 0: NOT_PRESENT in the file
  writeLogEntry(b, Buffer.alloc(16, 0x6c), { at: 0, tail: 0, sequence: 1n, writes: [{ offset: batOffset, data: bat }] });
  writeFileSync(image, b);
}

const FORMATS: FormatCase[] = [
  { name: 'qcow2 (preallocated metadata)', format: 'qcow2', options: ['preallocation=metadata'], file: '/VMs/My Linux ü.qcow2' },
  { name: 'VHDX fixed', format: 'vhdx', options: ['subformat=fixed'], file: '/VMs/linux.vhdx' },
  { name: 'VHDX fixed, with a log left to replay', format: 'vhdx', options: ['subformat=fixed'], file: '/VMs/crashed.vhdx', patch: leaveLogToReplay },
  { name: 'VHD fixed', format: 'vpc', options: ['subformat=fixed'], file: '/VMs/linux.vhd' },
  { name: 'VDI static', format: 'vdi', options: ['static=on'], file: '/VMs/linux.vdi' },
  { name: 'VMDK monolithicFlat (descriptor + extent file)', format: 'vmdk', options: ['subformat=monolithicFlat'], file: '/VMs/linux.vmdk' },
  { name: 'raw', format: 'raw', options: [], file: '/linux.img' },
];

describe('end to end: root=vdisk: on NTFS, direct path, rw', { timeout: 420_000 }, () => {
  for (const c of FORMATS) {
    it(`${c.name}: the guest's file is in the image after the shutdown hand-off; qemu-img check passes; NTFS stays clean`, async () => {
      const image = join(dir, `image-${c.format}-${basename(c.file)}`);
      convertImage(guestRaw, image, c.format, c.options);
      c.patch?.(image);
      const files: FileTree = { [c.file]: { hostFile: image } };
      if (c.format === 'vmdk') {
        // the descriptor names its extent by file name: copy it under that name, next to the descriptor
        const extent = /"([^"]+-flat\.vmdk)"/.exec(readFileSync(image, 'latin1'))![1]!;
        files[`${c.file.slice(0, c.file.lastIndexOf('/'))}/${extent}`] = { hostFile: join(dir, extent) };
      }
      const host = hostDisk(dir, `ntfs-${c.format}-${basename(c.file)}`, 'ntfs', files);
      const { facts, transcript } = await bootGuest(host, `"root=vdisk:LABEL=Windows:${c.file}" rw`, `vdisk-${c.format}`);
      expect(facts.root).toMatchObject({ device: '/dev/mapper/vdisk0p2', fstype: 'ext4', mode: 'rw' });
      expect(facts.wrote).toBe('/home/note.txt');
      expect(facts.facts.mapper).toMatch(/vdisk0,vdisk0p1,vdisk0p2,/);
      expect(transcript).toMatch(/vdisk0: .* direct: the image is fully mappable/);
      expectHandOff(transcript);
      const after = join(dir, `after-${basename(c.file)}`);
      writeFileSync(after, readHostFile(dir, host, c.file));
      if (c.format === 'vmdk') {
        const extent = /"([^"]+-flat\.vmdk)"/.exec(readFileSync(after, 'latin1'))![1]!;
        writeFileSync(join(dir, extent), readHostFile(dir, host, `${c.file.slice(0, c.file.lastIndexOf('/'))}/${extent}`));
      }
      if (c.format !== 'raw') {
        const check = spawnSync('qemu-img', ['check', '-f', c.format, after], { encoding: 'utf8' });
        // qemu-img has no check for VHD (vpc): the content check below is all there is
        if (!/does not support checks/.test(check.stderr)) expect(check.status, `${check.stdout}${check.stderr}`).toBe(0);
      }
      expect(fileInImage(dir, after, c.format, '/home/note.txt')).toBe(NOTE);
      if (c.format === 'vhdx') {
        // the boot gave the VHDX a new DataWriteGuid before the guest's first write, in both headers
        const guids = (f: string) => [64 * 1024, 128 * 1024].map((o) => parseVhdxHeader(readFileSync(f).subarray(o, o + 4096), o, f)!.dataWriteGuid);
        const [was] = guids(image);
        const now = guids(after);
        expect(now[0]).toBe(now[1]);
        expect(now[0]).not.toBe(was);
        expect(transcript).toMatch(c.patch ? /vdisk0: wrote the 1 update in \/VMs\/crashed\.vhdx's log .*then a new FileWriteGuid and DataWriteGuid/ : /vdisk0: wrote a new FileWriteGuid and DataWriteGuid/);
        // no log left: qemu opens it read-only
        expect(spawnSync('qemu-img', ['info', '-f', 'vhdx', after]).status).toBe(0);
      }
      expectHostClean(dir, host);
    });
  }

  it('a second boot sees what the first one wrote', async () => {
    const image = join(dir, 'twice.qcow2');
    convertImage(guestRaw, image, 'qcow2', ['preallocation=metadata']);
    const host = hostDisk(dir, 'twice', 'ntfs', { '/VMs/twice.qcow2': { hostFile: image } });
    const first = await bootGuest(host, 'root=vdisk:LABEL=Windows:/VMs/twice.qcow2 rw', 'vdisk-twice-1');
    expect(first.facts.facts.count).toBe('1');
    const second = await bootGuest(host, 'root=vdisk:LABEL=Windows:/VMs/twice.qcow2 rw', 'vdisk-twice-2');
    expect(second.facts.facts.count).toBe('2');
    expectHostClean(dir, host);
  });
});

describe('end to end: root=vdisk: other paths and modes', { timeout: 420_000 }, () => {
  it('FAT32 host, direct path: the host is reachable at /run/vdboot/host (through vdhost) while the image holds its partition', async () => {
    const host = hostDisk(dir, 'fat-direct', 'vfat', { '/linux.img': { hostFile: guestRaw }, '/readme.txt': 'on the host\n' });
    const { facts, transcript } = await bootGuest(host, 'root=vdisk:LABEL=USB:/linux.img rw', 'vdisk-fat-direct');
    expect(facts.root).toMatchObject({ device: '/dev/mapper/vdisk0p2', mode: 'rw' });
    expect(facts.facts.host).toMatch(/linux\.img/);
    expect(facts.facts.host).toMatch(/readme\.txt/);
    expect(transcript).toMatch(/mounted \/dev\/mapper\/vdhost \(vfat, ro\) on \/run\/vdboot\/host/);
    expectHandOff(transcript);
    expect(transcript).toMatch(/unmounted \/host/);
    const after = join(dir, 'after-fat-direct.img');
    writeFileSync(after, readHostFile(dir, host, '/linux.img'));
    expect(fileInImage(dir, after, 'raw', '/home/note.txt')).toBe(NOTE);
    expectHostClean(dir, host);
  });

  it('exFAT host (a USB stick), direct path: rw, the file is in the image afterwards', async () => {
    const host = hostDisk(dir, 'exfat', 'exfat', { '/images/linux.img': { hostFile: guestRaw } });
    const { facts, transcript } = await bootGuest(host, 'root=vdisk:LABEL=STICK:/images/linux.img rw', 'vdisk-exfat');
    expect(facts.root).toMatchObject({ device: '/dev/mapper/vdisk0p2', mode: 'rw' });
    expect(transcript).toMatch(/vdisk0: .*\(exfat, LABEL="STICK"\).* direct: the image is fully mappable/);
    expectHandOff(transcript);
    const part = join(dir, 'after-exfat.part');
    writeFileSync(part, readFileSync(host.disk).subarray(host.offset, host.offset + host.size));
    // vdboot's own exFAT reader gets the file back (exfatprogs has no tool that reads files)
    const r = openFileReader(part);
    try {
      const xfs = openHostFs(r)!;
      const f = xfs.lookup('/images/linux.img');
      const after = join(dir, 'after-exfat.img');
      writeFileSync(after, xfs.readFile(f, 0, f.size));
      expect(fileInImage(dir, after, 'raw', '/home/note.txt')).toBe(NOTE);
      const fsck = spawnSync('fsck.exfat', ['-n', part], { encoding: 'utf8' });
      expect(fsck.status, `${fsck.stdout}${fsck.stderr}`).toBe(0);
    } finally {
      r.close();
      rmSync(part);
    }
  });

  it('an image in hundreds of NTFS fragments: one device-mapper target per run of the file, rw', async () => {
    let runs = 0;
    const host = hostDisk(dir, 'fragmented', 'ntfs', {}, {
      extra: (img) => {
        ntfsAddFragmented(img, '/VMs/fragmented.img', { hostFile: guestRaw }, { chunkBytes: 32 * 1024 });
        runs = Number(/Total runs:\s*(\d+)/.exec(execFileSync('ntfsinfo', ['-F', '/VMs/fragmented.img', '-v', img], { encoding: 'utf8' }))?.[1]);
      },
    });
    expect(runs).toBeGreaterThan(100);
    const { facts, transcript } = await bootGuest(host, 'root=vdisk:LABEL=Windows:/VMs/fragmented.img rw', 'vdisk-fragmented');
    expect(facts.root).toMatchObject({ device: '/dev/mapper/vdisk0p2', mode: 'rw' });
    // one extent per run of the file (ntfsinfo's count), each a linear target on the partition
    const extents = Number(/direct: the image is fully mappable: (\d+) extents/.exec(transcript)?.[1]);
    expect(extents).toBe(runs);
    expectHandOff(transcript);
    const after = join(dir, 'after-fragmented.img');
    writeFileSync(after, readHostFile(dir, host, '/VMs/fragmented.img'));
    expect(fileInImage(dir, after, 'raw', '/home/note.txt')).toBe(NOTE);
    expectHostClean(dir, host);
  });

  it('FAT32 host, rd.vdisk.map=loop: the image through a loop device of the file on the host mounted read-write', async () => {
    const host = hostDisk(dir, 'fat-loop', 'vfat', { '/linux.img': { hostFile: guestRaw } });
    const { facts, transcript } = await bootGuest(host, 'root=vdisk:LABEL=USB:/linux.img rw rd.vdisk.map=loop', 'vdisk-fat-loop');
    expect(facts.root).toMatchObject({ device: '/dev/mapper/vdisk0p2', mode: 'rw' });
    expect(transcript).toMatch(/loop \(asked for\)/);
    expect(transcript).toMatch(/mounted \/dev\/mapper\/vdhost \(vfat, rw\) on \/run\/vdboot\/host/);
    expectHandOff(transcript);
    expect(transcript).toMatch(/detached \/dev\/loop0/);
    expect(transcript).toMatch(/unmounted \/host/);
    const after = join(dir, 'after-fat-loop.img');
    writeFileSync(after, readHostFile(dir, host, '/linux.img'));
    expect(fileInImage(dir, after, 'raw', '/home/note.txt')).toBe(NOTE);
    expectHostClean(dir, host);
  });

  it('snapshot mode: a dynamic qcow2 boots, the guest writes, and the image on NTFS is byte-identical afterwards', async () => {
    const image = join(dir, 'dynamic.qcow2');
    convertImage(guestRaw, image, 'qcow2');
    const before = createHash('sha256').update(readFileSync(image)).digest('hex');
    const host = hostDisk(dir, 'snapshot', 'ntfs', { '/VMs/dynamic.qcow2': { hostFile: image } });
    const { facts, transcript } = await bootGuest(host, 'root=vdisk:LABEL=Windows:/VMs/dynamic.qcow2 rd.vdisk.mode=snapshot rw', 'vdisk-snapshot');
    expect(facts.root).toMatchObject({ device: '/dev/mapper/vdisk0p2', mode: 'rw' });
    expect(facts.wrote).toBe('/home/note.txt');
    expect(facts.facts.mapper).toMatch(/vdisk0-base/);
    expectHandOff(transcript);
    expect(createHash('sha256').update(readHostFile(dir, host, '/VMs/dynamic.qcow2')).digest('hex')).toBe(before);
    expectHostClean(dir, host);
  });

  it('a hibernated Windows volume is refused for writing: the console says why and what to do, then the rescue shell', async () => {
    const hib = join(dir, 'hiberfil.sys');
    writeFileSync(hib, Buffer.concat([Buffer.from('hibr'), Buffer.alloc(65532)]));
    // ntfs-3g refuses to write to a hibernated volume: the image goes in first
    const image = join(dir, 'hib.qcow2');
    convertImage(guestRaw, image, 'qcow2', ['preallocation=metadata']);
    const host = hostDisk(dir, 'hibernated', 'ntfs', { '/VMs/linux.qcow2': { hostFile: image }, '/hiberfil.sys': { hostFile: hib } });
    const vm = await bootVm({ initrd, append: 'root=vdisk:LABEL=Windows:/VMs/linux.qcow2 rw', disks: [{ file: host.disk, interface: 'virtio-blk' }], name: 'vdisk-hibernated' });
    vms.push(vm);
    try {
      await vm.waitFor('starting the rescue shell', 180_000);
      const t = vm.transcript();
      expect(t).toMatch(/which vdboot will not write to/);
      expect(t).toMatch(/hiberfil\.sys starts with "hibr"/);
      expect(t).toMatch(/rd\.vdisk\.mode=snapshot/);
      expect(t).not.toMatch(/created \/dev\/mapper/);
    } finally {
      await vm.kill();
    }
  });
});

describe('end to end: compatibility syntaxes and chains', { timeout: 420_000 }, () => {
  let host: HostDisk;
  beforeAll(() => {
    const vdi = join(dir, 'compat.vdi');
    convertImage(guestRaw, vdi, 'vdi', ['static=on']);
    const base = join(dir, 'base.qcow2');
    convertImage(guestRaw, base, 'qcow2', ['preallocation=metadata']);
    const overlay = join(dir, 'overlay.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', 'base.qcow2', overlay]);
    host = hostDisk(dir, 'compat', 'ntfs', {
      '/VMs/linux.vdi': { hostFile: vdi },
      '/ubuntu/disks/root.disk': { hostFile: guestFs },
      '/VMs/chain/base.qcow2': { hostFile: base },
      '/VMs/chain/overlay.qcow2': { hostFile: overlay },
    });
  }, 120_000);

  it('dracut-vdfuseloop: rd.hostdev= rd.vdisk= rd.vdloop=/dev/vdhost/Partition2', async () => {
    const { facts, transcript } = await bootGuest(host, 'rd.hostdev=LABEL=Windows rd.vdisk=/VMs/linux.vdi rd.vdloop=/dev/vdhost/Partition2 rw', 'vdisk-compat-vdfuseloop');
    expect(facts.root).toMatchObject({ device: '/dev/mapper/vdisk0p2', mode: 'rw' });
    expect(transcript).toMatch(/rd\.vdisk\.root=2/);
    expectHandOff(transcript);
  });

  it('dracut-ntfsloop: rd.ntfsloop=HOST:PATH attaches the image, root=UUID= finds the root in it', async () => {
    const { facts, transcript } = await bootGuest(host, `root=UUID=${ROOT_UUID} rd.ntfsloop=LABEL=Windows:/VMs/linux.vdi rw`, 'vdisk-compat-ntfsloop');
    // found as dm-N, mounted by its mapping's name: the booted system's /proc/mounts shows that
    expect(facts.root.device).toBe('/dev/mapper/vdisk0p2');
    expect(transcript).toMatch(new RegExp(`found root device UUID=${ROOT_UUID} at /dev/dm-\\d+`));
    expectHandOff(transcript);
  });

  it('Wubi: root=HOST loop=/ubuntu/disks/root.disk boots a bare filesystem image', async () => {
    const { facts, transcript } = await bootGuest(host, 'root=LABEL=Windows loop=/ubuntu/disks/root.disk rw', 'vdisk-compat-wubi');
    expect(facts.root).toMatchObject({ device: '/dev/mapper/vdisk0', mode: 'rw' });
    expect(transcript).toMatch(/unpartitioned disk holds ext4/);
    expectHandOff(transcript);
    const after = join(dir, 'after-root.disk');
    writeFileSync(after, readHostFile(dir, host, '/ubuntu/disks/root.disk'));
    expect(execFileSync('debugfs', ['-R', 'cat /home/note.txt', after], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] })).toBe(NOTE);
    expectHostClean(dir, host);
  });

  it('a qcow2 overlay on its backing file, both on NTFS, in snapshot mode: both files unchanged', async () => {
    const sum = (p: string) => createHash('sha256').update(readHostFile(dir, host, p)).digest('hex');
    const before = [sum('/VMs/chain/overlay.qcow2'), sum('/VMs/chain/base.qcow2')];
    const { facts, transcript } = await bootGuest(host, 'root=vdisk:LABEL=Windows:/VMs/chain/overlay.qcow2 rd.vdisk.mode=snapshot rw', 'vdisk-chain');
    expect(facts.root).toMatchObject({ device: '/dev/mapper/vdisk0p2', mode: 'rw' });
    expect(facts.wrote).toBe('/home/note.txt');
    expect(transcript).toMatch(/qcow2 v3 → qcow2 v3/);
    expectHandOff(transcript);
    expect([sum('/VMs/chain/overlay.qcow2'), sum('/VMs/chain/base.qcow2')]).toEqual(before);
  });

  it('the overlay\'s backing file booted rw is refused while the overlay is beside it: the console names the overlay; the host disk is byte-identical', async () => {
    const diskSum = () => createHash('sha256').update(readFileSync(host.disk)).digest('hex');
    const before = diskSum();
    const vm = await bootVm({ initrd, append: 'root=vdisk:LABEL=Windows:/VMs/chain/base.qcow2 rw', disks: [{ file: host.disk, interface: 'virtio-blk' }], name: 'vdisk-parent-rw' });
    vms.push(vm);
    try {
      await vm.waitFor('starting the rescue shell', 180_000);
      const t = vm.transcript();
      expect(t).toMatch(/\/VMs\/chain\/base\.qcow2 is the parent of \/VMs\/chain\/overlay\.qcow2/);
      expect(t).toMatch(/rd\.vdisk\.mode=snapshot/);
      expect(t).not.toMatch(/created \/dev\/mapper/);
    } finally {
      await vm.kill();
    }
    expect(diskSum()).toBe(before);
  });
});

describe('end to end: NTFS through ntfs-3g (vdboot mkinitramfs --with ntfs-3g)', { timeout: 420_000 }, () => {
  let initrdNtfs3g: string;
  beforeAll(() => {
    initrdNtfs3g = join(dir, 'initrd-ntfs3g.img');
    writeInitramfs(initrdNtfs3g, { kernel: defaultKernel(), tools: ['ntfs-3g'] });
  }, 120_000);

  it('direct path: the NTFS host is reachable at /run/vdboot/host through ntfs-3g (read-only) and left clean', async () => {
    const image = join(dir, 'n3g.qcow2');
    convertImage(guestRaw, image, 'qcow2', ['preallocation=metadata']);
    const host = hostDisk(dir, 'ntfs3g-direct', 'ntfs', { '/VMs/linux.qcow2': { hostFile: image }, '/Users/readme.txt': 'on the host\n' });
    const { facts, transcript } = await bootGuest(host, 'root=vdisk:LABEL=Windows:/VMs/linux.qcow2 rw', 'vdisk-ntfs3g-direct', initrdNtfs3g);
    expect(facts.root).toMatchObject({ device: '/dev/mapper/vdisk0p2', mode: 'rw' });
    expect(facts.facts.host).toMatch(/Users/);
    expect(facts.facts.host).toMatch(/VMs/);
    expect(transcript).toMatch(/with ntfs-3g on \/run\/vdboot\/host/);
    expectHandOff(transcript);
    expectHostClean(dir, host);
  });

  it('loop path on NTFS, rw: the image through ntfs-3g and a loop device; the shutdown unmounts ntfs-3g cleanly', async () => {
    const image = join(dir, 'n3g-loop.qcow2');
    convertImage(guestRaw, image, 'qcow2', ['preallocation=metadata']);
    const host = hostDisk(dir, 'ntfs3g-loop', 'ntfs', { '/VMs/linux.qcow2': { hostFile: image } });
    const { facts, transcript } = await bootGuest(host, 'root=vdisk:LABEL=Windows:/VMs/linux.qcow2 rw rd.vdisk.map=loop', 'vdisk-ntfs3g-loop', initrdNtfs3g);
    expect(facts.root).toMatchObject({ device: '/dev/mapper/vdisk0p2', mode: 'rw' });
    expect(transcript).toMatch(/loop \(asked for\)/);
    expectHandOff(transcript);
    expect(transcript).toMatch(/detached \/dev\/loop0/);
    expect(transcript).toMatch(/unmounted \/host/);
    const after = join(dir, 'after-n3g-loop.qcow2');
    writeFileSync(after, readHostFile(dir, host, '/VMs/linux.qcow2'));
    const check = spawnSync('qemu-img', ['check', '-f', 'qcow2', after], { encoding: 'utf8' });
    expect(check.status, `${check.stdout}${check.stderr}`).toBe(0);
    expect(fileInImage(dir, after, 'qcow2', '/home/note.txt')).toBe(NOTE);
    // ntfs-3g marks the volume dirty while mounted read-write and clean when unmounted cleanly
    expectHostClean(dir, host);
  });
});

describe('end to end: the nbd path (vdboot mkinitramfs --with qemu-nbd --with ntfs-3g)', { timeout: 420_000 }, () => {
  let initrdNbd: string;
  beforeAll(() => {
    initrdNbd = join(dir, 'initrd-nbd.img');
    writeInitramfs(initrdNbd, { kernel: defaultKernel(), tools: ['ntfs-3g', 'qemu-nbd'] });
  }, 120_000);

  it('a dynamic VHDX rw with rd.vdisk.expand=0: auto picks nbd, qemu-nbd allocates the guest\'s writes; qemu-img check passes and the file is in the image', async () => {
    const image = join(dir, 'nbd-dynamic.vhdx');
    convertImage(guestRaw, image, 'vhdx', ['block_size=1M']);
    const host = hostDisk(dir, 'nbd', 'ntfs', { '/VMs/dynamic.vhdx': { hostFile: image } });
    const { facts, transcript } = await bootGuest(host, 'root=vdisk:LABEL=Windows:/VMs/dynamic.vhdx rw rd.vdisk.expand=0', 'vdisk-nbd', initrdNbd);
    expect(facts.root).toMatchObject({ device: '/dev/mapper/vdisk0p2', mode: 'rw' });
    expect(facts.wrote).toBe('/home/note.txt');
    expect(transcript).toMatch(/vdisk0: .*nbd: .* not allocated, so writes must go through the image format \(rd\.vdisk\.expand=0 forbids expanding it in place\)/);
    expect(transcript).toMatch(/qemu-nbd serves \/VMs\/dynamic\.vhdx \(vhdx\) on \/dev\/nbd0/);
    expectHandOff(transcript);
    expect(transcript).toMatch(/disconnected \/dev\/nbd0/);
    expect(transcript).toMatch(/unmounted \/host/);
    const after = join(dir, 'after-nbd.vhdx');
    writeFileSync(after, readHostFile(dir, host, '/VMs/dynamic.vhdx'));
    const check = spawnSync('qemu-img', ['check', '-f', 'vhdx', after], { encoding: 'utf8' });
    expect(check.status, `${check.stdout}${check.stderr}`).toBe(0);
    expect(fileInImage(dir, after, 'vhdx', '/home/note.txt')).toBe(NOTE);
    expectHostClean(dir, host);
  });
});
