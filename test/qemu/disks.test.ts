import { execFileSync, spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  clusterOwners, convertImage, fatRead, makeExfat, makeExt4, makeFat, makeNtfs, makePartitionedDisk, ntfsAdd, ntfsAddFragmented, ntfsRead, ntfsReserve,
  ntfsSetVolumeFlags, ntfsVolumeFlags, NTFS_VOLUME_FLAGS, readPartitions,
} from '../../qemu/disks.ts';
import { diskArgs } from '../../qemu/harness.ts';
import { guestInitScript, moduleClosure, parseGuestFacts } from '../../qemu/guest.ts';
import { defaultKernel, kernelVersion } from '../../qemu/harness.ts';

let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-'));
});
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

const sh = (cmd: string, args: string[]): string =>
  execFileSync(cmd, args, { encoding: 'utf8', env: { ...process.env, LC_ALL: 'C.UTF-8' }, stdio: ['ignore', 'pipe', 'pipe'] });
/** blkid's low-level probe of a filesystem at a byte offset of a file. */
function blkid(file: string, offset = 0): Record<string, string> {
  const out = sh('blkid', ['-p', '-o', 'export', '-O', String(offset), file]);
  return Object.fromEntries(out.trim().split('\n').map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));
}
const random = (n: number): Buffer => crypto.randomBytes(n);

describe('filesystem images built without mounting', () => {
  it('ext4 from a directory and a file list carries its label, UUID and files', () => {
    const src = path.join(dir, 'src');
    fs.mkdirSync(path.join(src, 'etc'), { recursive: true });
    fs.writeFileSync(path.join(src, 'etc', 'hostname'), 'guest\n');
    const img = path.join(dir, 'root.ext4');
    const uuid = crypto.randomUUID();
    makeExt4(img, { sizeMiB: 16, fromDir: src, label: 'vdroot', uuid, files: { '/a dir/ü file.txt': 'ünïcode' } });
    expect(blkid(img)).toMatchObject({ TYPE: 'ext4', LABEL: 'vdroot', UUID: uuid });
    expect(sh('debugfs', ['-R', 'cat /etc/hostname', img])).toBe('guest\n');
    expect(sh('debugfs', ['-R', 'cat "/a dir/ü file.txt"', img])).toBe('ünïcode');
  });

  it('NTFS holds files in nested directories with spaces and non-ASCII names', () => {
    const img = path.join(dir, 'host.ntfs');
    const vhd = random(300_000);
    makeNtfs(img, {
      sizeMiB: 32, label: 'Windows', uuid: '0123456789ABCDEF',
      files: { '/Users/Jörg/VMs/My Linux.vhdx': vhd, '/top.txt': 'top' },
      dirs: ['/Empty Dir/ß'],
    });
    ntfsAdd(img, { '/Users/Jörg/VMs/second.img': 'added later' });
    expect(blkid(img)).toMatchObject({ TYPE: 'ntfs', LABEL: 'Windows', UUID: '0123456789ABCDEF' });
    expect(ntfsRead(img, '/Users/Jörg/VMs/My Linux.vhdx').equals(vhd)).toBe(true);
    expect(ntfsRead(img, '/Users/Jörg/VMs/second.img').toString()).toBe('added later');
    const ls = (p: string): string[] => sh('ntfsls', ['-p', p, img]).split('\n').filter((n) => n && n !== '.' && n !== '..').sort();
    expect(ls('/Users/Jörg/VMs')).toEqual(['My Linux.vhdx', 'second.img']);
    expect(ls('/Empty Dir')).toEqual(['ß']);
    // ntfsfix -n only reports: a volume the tools left inconsistent would say so.
    expect(sh('ntfsfix', ['-n', img])).toMatch(/processed successfully/);
  });

  it('NTFS: a file written in hundreds of fragments keeps its bytes and spills its runlist into an attribute list', () => {
    const img = path.join(dir, 'frag.ntfs');
    makeNtfs(img, { sizeMiB: 32, label: 'Frag' });
    const data = random(2_000_000);
    ntfsAddFragmented(img, '/VMs/Frag mentiert.img', data, { chunkBytes: 8192 });
    expect(ntfsRead(img, '/VMs/Frag mentiert.img').equals(data)).toBe(true);
    const info = sh('ntfsinfo', ['-v', '-F', '/VMs/Frag mentiert.img', img]);
    const runs = Number(/Total runs: (\d+)/.exec(info)![1]);
    expect(runs).toBeGreaterThanOrEqual(Math.floor(data.length / 8192));
    expect(info).toMatch(/\$ATTRIBUTE_LIST/);
    expect(sh('ntfsfix', ['-n', img])).toMatch(/processed successfully/);
  });

  it('NTFS: reserved clusters are held by hidden system files only, the rest is free again, and a file added later keeps off them', () => {
    const img = path.join(dir, 'reserve.ntfs');
    makeNtfs(img, { sizeMiB: 32, label: 'Reserve', clusterSize: 4096 });
    const free = (): number => Number(/Free Clusters:\s*(\d+)/.exec(sh('ntfsinfo', ['-m', img]))![1]);
    const before = free();
    // one range across two 64 KiB fillers, one of a single cluster, one near the end
    const ranges = [{ first: 2053, count: 18 }, { first: 6000, count: 1 }, { first: 8000, count: 16 }];
    ntfsReserve(img, '/$FVE-reserved', ranges);
    const held = ranges.map((r) => clusterOwners(img, r.first, r.count));
    for (const owners of held) {
      expect(owners.length).toBeGreaterThan(0);
      for (const o of owners) expect(o).toMatch(/^\/\$FVE-reserved\/reserved-\d+$/);
    }
    const kept = sh('ntfsls', ['-a', '-p', '/$FVE-reserved', img]).split('\n').filter((n) => n.startsWith('reserved-'));
    expect(kept.sort()).toEqual([...new Set(held.flat())].map((o) => o.slice('/$FVE-reserved/'.length)).sort());
    expect(sh('ntfsinfo', ['-F', `/$FVE-reserved/${kept[0]}`, img])).toMatch(/File attributes:\s*HIDDEN SYSTEM/);
    // the fillers holding nothing were deleted with their scratch folder: at most 16 clusters
    // kept per range cluster touched, and some more for the MFT records the fill used
    expect(sh('ntfsls', ['-a', img])).not.toMatch(/RESERVE-FILL/);
    expect(before - free()).toBeLessThanOrEqual(kept.length * 16 + 512);
    const data = random(20 << 20);
    ntfsAdd(img, { '/VMs/big.img': data });
    expect(ntfsRead(img, '/VMs/big.img').equals(data)).toBe(true);
    expect(ranges.map((r) => clusterOwners(img, r.first, r.count))).toEqual(held);
    expect(sh('ntfsfix', ['-n', img])).toMatch(/processed successfully/);
    // a cluster the volume's own metadata holds ($Boot at 0) cannot be reserved
    const taken = path.join(dir, 'reserve-taken.ntfs');
    makeNtfs(taken, { sizeMiB: 8, label: 'Taken', clusterSize: 4096 });
    expect(() => ntfsReserve(taken, '/$FVE-reserved', [{ first: 0, count: 2 }])).toThrow(/clusters of the ranges that belong to something else \(see ntfscluster -c\): 0 1/);
  });

  it('NTFS: the dirty volume flag is set and cleared', () => {
    const img = path.join(dir, 'dirty.ntfs');
    makeNtfs(img, { sizeMiB: 8, label: 'Dirty' });
    const state = (): string => {
      const r = spawnSync('ntfsinfo', ['-m', img], { encoding: 'utf8' });
      return r.stdout + r.stderr;
    };
    expect(state()).not.toMatch(/scheduled for check/);
    expect(ntfsVolumeFlags(img)).toBe(0);
    ntfsSetVolumeFlags(img, NTFS_VOLUME_FLAGS.dirty);
    expect(state()).toMatch(/Volume is scheduled for check/);
    expect(ntfsVolumeFlags(img)).toBe(NTFS_VOLUME_FLAGS.dirty);
    ntfsSetVolumeFlags(img, 0);
    expect(state()).not.toMatch(/scheduled for check/);
    expect(ntfsVolumeFlags(img)).toBe(0);
  });

  it('FAT32 holds files in directories with long and non-ASCII names', () => {
    const img = path.join(dir, 'stick.fat');
    const data = random(200_000);
    makeFat(img, { sizeMiB: 40, label: 'STICK', uuid: 'ABCD1234', files: { '/VMs/My Linux.img': data, '/Grüße.txt': 'hallo' } });
    expect(blkid(img)).toMatchObject({ TYPE: 'vfat', LABEL: 'STICK', UUID: 'ABCD-1234', VERSION: 'FAT32' });
    expect(fatRead(img, '/VMs/My Linux.img').equals(data)).toBe(true);
    expect(fatRead(img, '/Grüße.txt').toString()).toBe('hallo');
  });

  it('exFAT written by the harness passes fsck.exfat with many entries and nested directories', () => {
    const img = path.join(dir, 'stick.exfat');
    const files: Record<string, string | Uint8Array> = { '/VMs/My Dir/Jörg ü.vhdx': random(300_000), '/empty.txt': '' };
    // enough entries to grow the root directory past its first cluster
    for (let i = 0; i < 150; i++) files[`/root file number ${i} with a long name.txt`] = `file ${i}`;
    // fsck counts the root too: root, VMs, My Dir, a, b, c
    makeExfat(img, { sizeMiB: 64, label: 'EXSTICK', uuid: '1234ABCD', clusterSize: 4096, files, dirs: ['/a/b/c'] });
    expect(blkid(img)).toMatchObject({ TYPE: 'exfat', LABEL: 'EXSTICK', UUID: '1234-ABCD' });
    const fsck = sh('fsck.exfat', ['-n', img]);
    expect(fsck).toMatch(/clean\. directories 6, files 152/);
  });
});

describe('partitioned disks', () => {
  it('GPT: partitions land at the offsets sfdisk reports, with their type, name and UUID', () => {
    const ext = path.join(dir, 'p2.ext4');
    makeExt4(ext, { sizeMiB: 8, label: 'gptroot', uuid: '11111111-2222-3333-4444-555555555555' });
    const ntfs = path.join(dir, 'p1.ntfs');
    makeNtfs(ntfs, { sizeMiB: 8, label: 'Data' });
    const disk = path.join(dir, 'gpt.img');
    const basicData = 'EBD0A0A2-B9E5-4433-87C0-68B6B72699C7';
    const layout = makePartitionedDisk(disk, {
      table: 'gpt', diskId: '01234567-89AB-CDEF-0123-456789ABCDEF',
      partitions: [
        { image: ntfs, type: basicData, name: 'Basic data partition', uuid: 'AAAAAAAA-0000-0000-0000-000000000001' },
        { sizeMiB: 3 },
        { image: ext, name: 'my root', uuid: 'AAAAAAAA-0000-0000-0000-000000000003' },
      ],
    });
    expect(layout).toEqual(readPartitions(disk));
    expect(layout.map((p) => [p.number, p.type, p.name, p.uuid])).toEqual([
      [1, basicData, 'Basic data partition', 'AAAAAAAA-0000-0000-0000-000000000001'],
      [2, '0FC63DAF-8483-4772-8E79-3D69D8477DE4', undefined, expect.any(String)],
      [3, '0FC63DAF-8483-4772-8E79-3D69D8477DE4', 'my root', 'AAAAAAAA-0000-0000-0000-000000000003'],
    ]);
    expect(layout[0]!.offset).toBe(1 << 20);
    expect(layout[2]!.size).toBe(8 << 20);
    expect(blkid(disk, layout[0]!.offset)).toMatchObject({ TYPE: 'ntfs', LABEL: 'Data' });
    expect(blkid(disk, layout[2]!.offset)).toMatchObject({ TYPE: 'ext4', LABEL: 'gptroot' });
    const json = JSON.parse(sh('sfdisk', ['--json', disk])).partitiontable;
    expect(json.label).toBe('gpt');
    expect(json.id).toBe('01234567-89AB-CDEF-0123-456789ABCDEF');
  });

  it('MBR: type ids, boot flag and disk id are as asked', () => {
    const fat = path.join(dir, 'p1.fat');
    makeFat(fat, { sizeMiB: 34, label: 'BOOT' });
    const disk = path.join(dir, 'mbr.img');
    const layout = makePartitionedDisk(disk, {
      table: 'dos', diskId: '0x1234abcd',
      partitions: [{ image: fat, type: 'c', bootable: true }, { sizeMiB: 4, type: '83' }],
    });
    const json = JSON.parse(sh('sfdisk', ['--json', disk])).partitiontable;
    expect(json.label).toBe('dos');
    expect(json.id).toBe('0x1234abcd');
    expect(json.partitions[0].bootable).toBe(true);
    expect(layout.map((p) => p.type)).toEqual(['c', '83']);
    expect(blkid(disk, layout[0]!.offset)).toMatchObject({ TYPE: 'vfat', LABEL: 'BOOT' });
  });

  it('conversion to VHDX, VHD, VMDK and QCOW2 keeps the same guest-visible bytes', () => {
    const raw = path.join(dir, 'conv.raw');
    makeExt4(raw, { sizeMiB: 8, files: { '/data.bin': random(100_000) } });
    for (const [format, options] of [['vhdx', []], ['vpc', ['subformat=fixed']], ['vmdk', []], ['qcow2', []]] as const) {
      const out = path.join(dir, `conv.${format}`);
      convertImage(raw, out, format, [...options]);
      const info = JSON.parse(sh('qemu-img', ['info', '-f', format, '--output=json', out]));
      expect(info['virtual-size']).toBeGreaterThanOrEqual(8 << 20);
      // qemu-img compare exits non-zero when the guest-visible contents differ
      sh('qemu-img', ['compare', '-f', 'raw', '-F', format, raw, out]);
    }
  });
});

describe('qemu command line and guest modules', () => {
  it('each disk interface becomes its controller and device, with serials and flags', () => {
    const args = diskArgs([
      { file: '/a.img', serial: 'ROOT1' },
      { file: '/b.qcow2', format: 'qcow2', interface: 'virtio-scsi', readonly: true },
      { file: '/c.img', interface: 'ahci', snapshot: true },
      { file: '/d.img', interface: 'nvme' },
      { file: '/e.img', interface: 'usb-storage', serial: 'USB1' },
      { file: '/f.img', interface: 'ide' },
    ]).join(' ');
    expect(args).toContain('-device virtio-scsi-pci,id=scsi0');
    expect(args).toContain('-device ahci,id=ahci0');
    expect(args).toContain('-device qemu-xhci,id=xhci0');
    expect(args).toContain('-drive file=/a.img,format=raw,if=none,id=disk0 -device virtio-blk-pci,drive=disk0,serial=ROOT1');
    expect(args).toContain('-drive file=/b.qcow2,format=qcow2,if=none,id=disk1,readonly=on -device scsi-hd,drive=disk1,bus=scsi0.0');
    expect(args).toContain('id=disk2,snapshot=on -device ide-hd,drive=disk2,bus=ahci0.0');
    expect(args).toContain('-device nvme,drive=disk3,serial=vdboot3');
    expect(args).toContain('-device usb-storage,drive=disk4,bus=xhci0.0,serial=USB1');
    expect(args).toContain('-device ide-hd,drive=disk5,bus=ide.0,unit=0');
    expect(diskArgs([{ file: '/a dir/x,y.img' }])[1]).toBe('file=/a dir/x,,y.img,format=raw,if=none,id=disk0');
  });

  it('module closure lists dependencies before the module, from modules.dep of the installed kernel', () => {
    const version = kernelVersion(defaultKernel());
    const closure = moduleClosure(version, ['virtio_pci', 'virtio_blk', 'ext4']);
    const deps = fs.readFileSync(`/lib/modules/${version}/modules.dep`, 'utf8');
    const ext4Line = deps.split('\n').find((l) => /\/ext4\.ko(\.\w+)?:/.test(l))!;
    const [ext4File, rest] = ext4Line.split(':') as [string, string];
    for (const dep of rest.trim().split(/\s+/).filter(Boolean)) {
      expect(closure.indexOf(dep)).toBeGreaterThanOrEqual(0);
      expect(closure.indexOf(dep)).toBeLessThan(closure.indexOf(ext4File));
    }
    expect(new Set(closure).size).toBe(closure.length);
    expect(() => moduleClosure(version, ['no_such_module_here'])).toThrow(/no module "no_such_module_here"/);
  });

  it('guest facts come from the last boot, across kernel lines printed between them', () => {
    const boot = (uptime: string, args: string[], root: string): string[] => [
      `[    1.000000] Run /init as init process`,
      `VDBOOT-GUEST uptime=${uptime}`,
      'VDBOOT-GUEST pid=1',
      '[    2.000000] random: crng init done',
      'VDBOOT-GUEST argv0=/sbin/init',
      `VDBOOT-GUEST argc=${args.length}`,
      ...args.map((a, i) => `VDBOOT-GUEST arg${i + 1}=${a}`),
      `VDBOOT-GUEST root=${root}`,
      'VDBOOT-GUEST cmdline=root=/dev/vda -- a',
      'VDBOOT-GUEST custom=42',
      'VDBOOT-GUEST-OK',
    ];
    const transcript = [...boot('9.99', ['old'], '/dev/vdb / ext4 rw 0 0'), ...boot('3.25', ['x', 'y z'], '/dev/vda / ext4 ro,relatime 0 0')].join('\n');
    const facts = parseGuestFacts(transcript);
    expect(facts).toMatchObject({ uptime: 3.25, pid: 1, argv0: '/sbin/init', args: ['x', 'y z'], cmdline: 'root=/dev/vda -- a' });
    expect(facts.root).toEqual({ device: '/dev/vda', fstype: 'ext4', options: ['ro', 'relatime'], mode: 'ro' });
    expect(facts.facts.custom).toBe('42');
    expect(() => parseGuestFacts(transcript.replace(/VDBOOT-GUEST-OK/g, ''))).toThrow(/marker/);
    expect(() => parseGuestFacts(transcript.replace(/VDBOOT-GUEST argc=2\n/, ''))).toThrow(/"argc"/);
  });

  it('the guest init script writes the file content literally and ends with the asked action', () => {
    const target = path.join(dir, "it's here");
    const content = "a 'quoted' $HOME `x` \\n \"q\"";
    const script = guestInitScript({ writeFile: { path: target, content }, then: 'shell' });
    const writeLine = script.split('\n').find((l) => l.startsWith("printf '%s'"))!;
    execFileSync('sh', ['-c', writeLine.replace(/ && sync && .*$/, '')]);
    expect(fs.readFileSync(target, 'utf8')).toBe(content);
    expect(script.trimEnd().split('\n').at(-1)).toBe('exec sh </dev/console >/dev/console 2>&1');
    expect(guestInitScript({ then: { exec: '/run/initramfs/shutdown poweroff' } }).trimEnd().split('\n').at(-1)).toBe(
      'exec /run/initramfs/shutdown poweroff',
    );
  });
});
