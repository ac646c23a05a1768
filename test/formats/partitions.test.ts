import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { countingFileReader } from '../kit/format.ts';
import { type BlockReader, FormatError } from '../../src/formats/block-reader.ts';
import { crc32 } from '../../src/formats/crc.ts';
import { GPT_TYPE } from '../../src/formats/guid.ts';
import { type PartitionTable, parsePartitionTable, sliceReader, writeGpt, writeMbr } from '../../src/formats/partitions.ts';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-'));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

const fileReader = countingFileReader;

function disk(name: string, size: string): string {
  const f = path.join(dir, name);
  fs.rmSync(f, { force: true });
  execFileSync('truncate', ['-s', size, f]);
  return f;
}

function sfdisk(file: string, script: string): void {
  execFileSync('sfdisk', ['-q', '--no-reread', '--no-tell-kernel', file], { input: script, stdio: ['pipe', 'pipe', 'pipe'] });
}

interface SfdiskJson {
  partitiontable: {
    label: string; id: string; sectorsize: number;
    partitions: { node: string; start: number; size: number; type: string; uuid?: string; name?: string; attrs?: string; bootable?: boolean }[];
  };
}

function sfdiskJson(file: string): SfdiskJson['partitiontable'] {
  return (JSON.parse(execFileSync('sfdisk', ['--json', file], { encoding: 'utf8' })) as SfdiskJson).partitiontable;
}

/** libblkid's view of the partitions (partx uses the same probing as blkid): number, start, PARTUUID, type, name. */
function partx(file: string): Record<string, string>[] {
  const out = execFileSync('partx', ['-P', '-o', 'NR,START,SECTORS,UUID,TYPE,NAME,FLAGS', file], { encoding: 'utf8' });
  return out.trim().split('\n').map((line) => {
    const rec: Record<string, string> = {};
    for (const m of line.matchAll(/(\w+)="([^"]*)"/g)) rec[m[1]!] = m[2]!;
    return rec;
  });
}

function blkidDisk(file: string): Record<string, string> {
  const out = execFileSync('blkid', ['-p', '-o', 'export', file], { encoding: 'utf8' });
  return Object.fromEntries(out.trim().split('\n').map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));
}

/** Compares a parsed table with sfdisk's JSON for the same file, field by field. */
function expectSameAsSfdisk(t: PartitionTable, file: string): void {
  const s = sfdiskJson(file);
  expect(t.kind).toBe(s.label === 'dos' ? 'mbr' : s.label);
  const ss = s.sectorsize;
  const mine = t.partitions.map((p) => {
    const o: Record<string, unknown> = { node: `${file}${p.number}`, start: p.start / ss, size: p.size / ss, type: p.type };
    if (t.kind === 'gpt') {
      o.uuid = p.partuuid;
      if (p.name) o.name = p.name;
      if (p.attributes) o.attrs = p.attributes.join(' ');
    } else if (p.bootable) o.bootable = true;
    return o;
  });
  const theirs = s.partitions.map((p) => {
    const o: Record<string, unknown> = { ...p, type: p.type.toLowerCase() };
    if (p.uuid) o.uuid = p.uuid.toLowerCase();
    return o;
  });
  const byNode = (a: Record<string, unknown>, b: Record<string, unknown>) => String(a.node).localeCompare(String(b.node), 'en', { numeric: true });
  expect(mine.sort(byNode)).toEqual(theirs.sort(byNode));
  if (t.kind === 'gpt') expect(t.diskGuid).toBe(s.id.toLowerCase());
  else expect(`0x${t.diskSignature}`).toBe(s.id);
}

/** PARTUUIDs and numbers as libblkid computes them. */
function expectSameAsBlkid(t: PartitionTable, file: string): void {
  const px = partx(file);
  expect(t.partitions.map((p) => [String(p.number), p.partuuid]).sort()).toEqual(px.map((r) => [r.NR!, r.UUID!]).sort());
  const b = blkidDisk(file);
  expect(t.kind === 'gpt' ? 'gpt' : 'dos').toBe(b.PTTYPE);
  expect(t.kind === 'gpt' ? t.diskGuid : t.diskSignature).toBe(b.PTUUID);
}

function writeRegions(file: string, size: number, regions: { offset: number; bytes: Uint8Array }[]): void {
  fs.rmSync(file, { force: true });
  execFileSync('truncate', ['-s', String(size), file]);
  const fd = fs.openSync(file, 'r+');
  for (const r of regions) fs.writeSync(fd, r.bytes, 0, r.bytes.length, r.offset);
  fs.closeSync(fd);
}

function corrupt(file: string, offset: number): void {
  const fd = fs.openSync(file, 'r+');
  const b = new Uint8Array(1);
  fs.readSync(fd, b, 0, 1, offset);
  b[0] = b[0]! ^ 0xff;
  fs.writeSync(fd, b, 0, 1, offset);
  fs.closeSync(fd);
}

const GPT_SCRIPT = `label: gpt
label-id: 01234567-89AB-CDEF-0123-456789ABCDEF
start=2048, size=8192, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="EFI System", attrs="RequiredPartition,LegacyBIOSBootable"
size=16384, type=4f68bce3-e8cd-4db1-96e7-fbcaf984b709, name="root ü ✓", uuid=11111111-2222-3333-4444-555555555555, attrs="GUID:60,63"
size=8192, type=0657fd6d-a4ab-43c4-84e5-0933c84b4f4f
size=4096, type=e6d6d379-f507-44c2-a23c-238f2a3df928, name="a name of exactly thirty-six letters"
`;

describe('GPT', () => {
  it('512-byte sectors: partitions, names, types, attributes and PARTUUIDs equal sfdisk --json and libblkid', () => {
    const f = disk('gpt512.img', '64M');
    sfdisk(f, GPT_SCRIPT);
    const r = fileReader(f);
    const t = parsePartitionTable(r);
    expect(t.warnings).toEqual([]);
    expect(t.sectorSize).toBe(512);
    expect(t.partitions).toHaveLength(4);
    expectSameAsSfdisk(t, f);
    expectSameAsBlkid(t, f);
    expect(t.partitions[0]!.bootable).toBe(true);
    expect(t.partitions[1]!.type).toBe(GPT_TYPE.linuxRootX86_64);
    // Only the table sectors were read: MBR, both headers, both entry arrays.
    expect(r.bytesRead).toBeLessThan(64 * 1024);
  });

  it('slot numbering: an empty entry keeps its slot, as Linux numbers partitions', () => {
    const f = disk('gpt-gap.img', '32M');
    sfdisk(f, 'label: gpt\nf1: start=2048, size=2048, type=linux\nf3: start=8192, size=2048, type=swap\n'.replaceAll('f1', `${f}1`).replaceAll('f3', `${f}3`));
    const t = parsePartitionTable(fileReader(f));
    expect(t.partitions.map((p) => p.number)).toEqual([1, 3]);
    expectSameAsSfdisk(t, f);
    expectSameAsBlkid(t, f);
  });

  it('a 4 TiB sparse disk: 64-bit LBAs beyond 2^32 sectors, reading only the table sectors', () => {
    const f = disk('gpt-4t.img', '4T');
    sfdisk(f, 'label: gpt\nsize=1G, type=linux\nstart=3T, size=100G, type=linux, name=far\n');
    const r = fileReader(f);
    const t = parsePartitionTable(r);
    expect(t.partitions[1]!.start).toBe(3 * 2 ** 40);
    expectSameAsSfdisk(t, f);
    expect(r.bytesRead).toBeLessThan(64 * 1024);
  });

  it('4096-byte sectors (made by fdisk -b 4096): sector size detected, offsets equal fdisk -l', () => {
    const f = disk('gpt4k.img', '64M');
    const script = path.join(dir, 'gpt4k.sfdisk');
    fs.writeFileSync(script, `label: gpt
label-id: 89ABCDEF-0123-4567-89AB-0123456789AB
first-lba: 256
start=256, size=1024, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="EFI", attrs="RequiredPartition"
size=2048, type=4f68bce3-e8cd-4db1-96e7-fbcaf984b709, name="root", uuid=11111111-2222-3333-4444-555555555555, attrs="GUID:60"
size=512, type=0657fd6d-a4ab-43c4-84e5-0933c84b4f4f
`);
    execFileSync('fdisk', ['-b', '4096', f], { input: `I\n${script}\nw\n`, stdio: ['pipe', 'pipe', 'pipe'] });
    const t = parsePartitionTable(fileReader(f));
    expect(t.sectorSize).toBe(4096);
    expect(t.warnings).toEqual([]);
    const out = execFileSync('fdisk', ['-b', '4096', '-l', '-o', 'Device,Start,Sectors,Type-UUID,UUID,Name,Attrs', f], { encoding: 'utf8' });
    const rows = out.split('\n').filter((l) => l.startsWith(f)).map((l) => l.split(/\s+/));
    expect(rows).toHaveLength(3);
    expect(t.partitions.map((p) => [`${f}${p.number}`, String(p.start / 4096), String(p.size / 4096), p.type.toUpperCase(), p.partuuid.toUpperCase(), p.name ?? '', (p.attributes ?? []).join(' ')].filter((x) => x !== '')))
      .toEqual(rows.map((r) => r.filter((x) => x !== '')));
    expect(t.diskGuid).toBe(/Disk identifier: (\S+)/.exec(out)![1]!.toLowerCase());
    // Told the wrong sector size, it finds no GPT and says so instead of inventing partitions.
    const wrong = parsePartitionTable(fileReader(f), { sectorSize: 512 });
    expect(wrong.kind).not.toBe('gpt');
  });

  it('damaged primary header: the backup header is used, with a warning naming the damage', () => {
    const f = disk('gpt-bad-primary.img', '64M');
    sfdisk(f, GPT_SCRIPT);
    const before = parsePartitionTable(fileReader(f));
    corrupt(f, 512 + 60); // inside the disk GUID of the primary header: its CRC no longer matches
    const t = parsePartitionTable(fileReader(f));
    expect(t.kind).toBe('gpt');
    expect(t.warnings.join('\n')).toMatch(/primary GPT is damaged \(header CRC32.*backup GPT header at LBA 131071/);
    expect(t.partitions).toEqual(before.partitions);
    expect(t.diskGuid).toBe(before.diskGuid);
    expectSameAsSfdisk(t, f); // libfdisk also falls back to the backup
  });

  it('damaged primary entry array: the backup table is used', () => {
    const f = disk('gpt-bad-entries.img', '64M');
    sfdisk(f, GPT_SCRIPT);
    const before = parsePartitionTable(fileReader(f));
    corrupt(f, 1024 + 128 + 40); // partition 2's last LBA in the primary array
    const t = parsePartitionTable(fileReader(f));
    expect(t.warnings.join('\n')).toMatch(/entry array CRC32/);
    expect(t.partitions).toEqual(before.partitions);
  });

  it('damaged backup header: the primary is used and the damage reported', () => {
    const f = disk('gpt-bad-backup.img', '64M');
    sfdisk(f, GPT_SCRIPT);
    corrupt(f, 64 * 2 ** 20 - 512 + 60);
    const t = parsePartitionTable(fileReader(f));
    expect(t.warnings.join('\n')).toMatch(/backup GPT header is damaged/);
    expectSameAsSfdisk(t, f);
  });

  it('both headers damaged: no partitions, and warnings say why', () => {
    const f = disk('gpt-bad-both.img', '64M');
    sfdisk(f, GPT_SCRIPT);
    corrupt(f, 512 + 60);
    corrupt(f, 64 * 2 ** 20 - 512 + 60);
    const t = parsePartitionTable(fileReader(f));
    expect(t.kind).toBe('none');
    expect(t.warnings.join('\n')).toMatch(/no valid GPT: primary \(header CRC32.*backup \(header CRC32/);
  });
});

describe('MBR', () => {
  it('primary, extended and logical partitions: numbers from 5, types, boot flag and PARTUUIDs equal sfdisk and libblkid', () => {
    const f = disk('mbr.img', '64M');
    sfdisk(f, `label: dos
label-id: 0xdeadbeef
${f}1: start=2048, size=8192, type=ef, bootable
${f}2: size=8192, type=83
${f}3: size=40000, type=5
${f}5: size=4096, type=83
${f}6: size=4096, type=82
${f}7: size=4096, type=7
${f}8: size=2048, type=8e
${f}4: size=4096, type=c
`);
    const t = parsePartitionTable(fileReader(f));
    expect(t.warnings).toEqual([]);
    expect(t.partitions.map((p) => p.number)).toEqual([1, 2, 3, 4, 5, 6, 7, 8]);
    expect(t.partitions.find((p) => p.number === 3)!.extended).toBe(true);
    expect(t.partitions.find((p) => p.number === 7)!.partuuid).toBe('deadbeef-07');
    expectSameAsSfdisk(t, f);
    expectSameAsBlkid(t, f);
  });

  it('a FAT filesystem without a partition table is not mistaken for an MBR', () => {
    const f = disk('whole-vfat.img', '16M');
    execFileSync('mkfs.vfat', ['-F', '16', f], { stdio: 'pipe' });
    expect(blkidDisk(f).PTTYPE).toBeUndefined();
    expect(parsePartitionTable(fileReader(f)).kind).toBe('none');
  });

  it('a logical-partition chain that loops ends with a warning', () => {
    const f = disk('mbr-loop.img', '32M');
    sfdisk(f, `label: dos\n${f}1: start=2048, size=20000, type=5\n${f}5: size=2048, type=83\n${f}6: size=2048, type=83\n`);
    // Point the second EBR's link back to the first EBR (relative start 0).
    const second = parsePartitionTable(fileReader(f)).partitions.find((p) => p.number === 6)!;
    const ebrOffset = second.start - 2048 * 512; // sfdisk leaves 1 MiB before each logical
    const linkEntry = 446 + 16;
    const fd = fs.openSync(f, 'r+');
    fs.writeSync(fd, new Uint8Array([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), 0, 16, ebrOffset + linkEntry);
    fs.writeSync(fd, new Uint8Array([5]), 0, 1, ebrOffset + linkEntry + 4);
    fs.writeSync(fd, new Uint8Array([0, 0, 0, 0, 0x10, 0, 0, 0]), 0, 8, ebrOffset + linkEntry + 8);
    fs.closeSync(fd);
    const t = parsePartitionTable(fileReader(f));
    expect(t.warnings.join('\n')).toMatch(/loops back/);
    expect(t.partitions.filter((p) => p.number >= 5).length).toBeLessThanOrEqual(3);
  });
});

describe('writers', () => {
  it('writeGpt (512-byte sectors): sfdisk --json reads back exactly what was asked', () => {
    const f = path.join(dir, 'written-gpt.img');
    const size = 48 * 2 ** 20;
    const spec = {
      diskSize: size, sectorSize: 512 as const, diskGuid: 'a1b2c3d4-e5f6-4711-8899-aabbccddeeff',
      partitions: [
        { start: 2 ** 20, size: 8 * 2 ** 20, type: GPT_TYPE.efiSystem, uuid: '01020304-0506-0708-090a-0b0c0d0e0f10', name: 'ESP', attributes: ['RequiredPartition'] },
        { start: 9 * 2 ** 20, size: 30 * 2 ** 20, type: GPT_TYPE.linuxRootX86_64, uuid: 'f0e0d0c0-b0a0-9080-7060-504030201000', name: 'root ü', attributes: ['LegacyBIOSBootable', 'GUID:59,63'] },
        { start: 40 * 2 ** 20, size: 4 * 2 ** 20, type: GPT_TYPE.linuxSwap, uuid: '99999999-8888-7777-6666-555555555555' },
      ],
    };
    const out = writeGpt(spec);
    expect(out.head.length).toBe(34 * 512);
    expect(out.tailOffset + out.tail.length).toBe(size);
    writeRegions(f, size, out.regions);
    const s = sfdiskJson(f);
    expect(s.label).toBe('gpt');
    expect(s.id.toLowerCase()).toBe(spec.diskGuid);
    expect(s.partitions.map((p) => ({ start: p.start * 512, size: p.size * 512, type: p.type.toLowerCase(), uuid: p.uuid!.toLowerCase(), name: p.name, attrs: p.attrs })))
      .toEqual(spec.partitions.map((p) => ({ start: p.start, size: p.size, type: p.type, uuid: p.uuid, name: p.name, attrs: p.attributes?.join(' ') })));
    execFileSync('sfdisk', ['--verify', f], { stdio: 'pipe' });
    // And vdboot's own parser agrees, with no warnings about either header.
    const t = parsePartitionTable(fileReader(f));
    expect(t.warnings).toEqual([]);
    expectSameAsSfdisk(t, f);
  });

  it('writeGpt (4096-byte sectors): fdisk -b 4096 reads back what was asked', () => {
    const f = path.join(dir, 'written-gpt4k.img');
    const size = 64 * 2 ** 20;
    const out = writeGpt({
      diskSize: size, sectorSize: 4096, diskGuid: '12345678-1234-1234-1234-123456789abc',
      partitions: [{ start: 2 ** 20, size: 16 * 2 ** 20, type: GPT_TYPE.linuxFilesystem, uuid: 'abcdefab-cdef-abcd-efab-cdefabcdefab', name: 'data' }],
    });
    expect(out.head.length).toBe(6 * 4096);
    writeRegions(f, size, out.regions);
    const lst = execFileSync('fdisk', ['-b', '4096', '-l', '-o', 'Device,Start,Sectors,Type-UUID,UUID,Name', f], { encoding: 'utf8' });
    expect(lst).not.toMatch(/corrupt|mismatch/i);
    const row = lst.split('\n').find((l) => l.startsWith(f))!.split(/\s+/);
    expect(row).toEqual([`${f}1`, '256', '4096', GPT_TYPE.linuxFilesystem.toUpperCase(), 'ABCDEFAB-CDEF-ABCD-EFAB-CDEFABCDEFAB', 'data']);
    const t = parsePartitionTable(fileReader(f));
    expect(t.sectorSize).toBe(4096);
    expect(t.warnings).toEqual([]);
  });

  it('writeMbr with logical partitions: sfdisk --json and libblkid read back the layout, numbered 1, 2, 5, 6, 7', () => {
    const f = path.join(dir, 'written-mbr.img');
    const size = 64 * 2 ** 20;
    const M = 2 ** 20;
    const out = writeMbr({
      diskSize: size, sectorSize: 512, diskSignature: 0x1234abcd,
      partitions: [
        { start: 1 * M, size: 8 * M, type: 0xef, bootable: true },
        { start: 9 * M, size: 8 * M, type: 0x83 },
        { start: 18 * M, size: 4 * M, type: 0x83, logical: true },
        { start: 23 * M, size: 4 * M, type: 0x82, logical: true },
        { start: 28 * M + 512, size: 4 * M, type: 0x07, logical: true },
      ],
    });
    writeRegions(f, size, out.regions);
    const s = sfdiskJson(f);
    expect(s.id).toBe('0x1234abcd');
    const rows = s.partitions.map((p) => [p.node.slice(f.length), p.start * 512, p.size * 512, p.type, !!p.bootable]);
    expect(rows).toEqual([
      ['1', 1 * M, 8 * M, 'ef', true],
      ['2', 9 * M, 8 * M, '83', false],
      ['3', 18 * M - 512, 28 * M + 512 + 4 * M - (18 * M - 512), '5', false],
      ['5', 18 * M, 4 * M, '83', false],
      ['6', 23 * M, 4 * M, '82', false],
      ['7', 28 * M + 512, 4 * M, '7', false],
    ]);
    const t = parsePartitionTable(fileReader(f));
    expect(t.warnings).toEqual([]);
    expectSameAsSfdisk(t, f);
    expectSameAsBlkid(t, f);
  });

  it('writers refuse overlapping partitions and partitions outside the usable area', () => {
    const base = { diskSize: 16 * 2 ** 20, sectorSize: 512 as const, diskGuid: '12345678-1234-1234-1234-123456789abc' };
    const p = (start: number, size: number) => ({ start, size, type: GPT_TYPE.linuxFilesystem, uuid: '12345678-1234-1234-1234-123456789abd' });
    expect(() => writeGpt({ ...base, partitions: [p(512, 2 ** 20)] })).toThrow(/usable area/);
    expect(() => writeGpt({ ...base, partitions: [p(2 ** 20, 2 ** 20), p(2 ** 20 + 512, 2 ** 20)] })).toThrow(/overlap/);
    expect(() => writeGpt({ ...base, partitions: [p(2 ** 20, 16 * 2 ** 20)] })).toThrow(/usable area/);
    expect(() => writeMbr({ diskSize: base.diskSize, sectorSize: 512, diskSignature: 1, partitions: [{ start: 2 ** 20, size: 2 ** 20, type: 0x83 }, { start: 2 ** 20 + 512, size: 512, type: 0x83, logical: true }] })).toThrow(/overlaps/);
  });
});

describe('sliceReader', () => {
  it('reads a partition\'s bytes and refuses reads past its end', () => {
    const bytes = new Uint8Array(4096).map((_, i) => i & 0xff);
    const r = sliceReader({ name: 'disk', size: 4096, read: (o, l) => bytes.subarray(o, o + l) }, 1024, 512, 'disk1');
    expect(Array.from(r.read(0, 4))).toEqual([0, 1, 2, 3]);
    expect(r.size).toBe(512);
    expect(() => r.read(510, 4)).toThrow(FormatError);
    expect(() => sliceReader(r, 256, 512, 'x')).toThrow(/past the end/);
  });
});

describe('GPT sanity warnings', () => {
  it('overlapping partitions are reported, as sfdisk --verify reports them', () => {
    const f = path.join(dir, 'overlap.img');
    const size = 16 * 2 ** 20;
    const g = writeGpt({
      diskSize: size, sectorSize: 512, diskGuid: '12345678-1234-1234-1234-123456789abc',
      partitions: [
        { start: 2 ** 20, size: 4 * 2 ** 20, type: GPT_TYPE.linuxFilesystem, uuid: '12345678-1234-1234-1234-000000000001' },
        { start: 6 * 2 ** 20, size: 4 * 2 ** 20, type: GPT_TYPE.linuxFilesystem, uuid: '12345678-1234-1234-1234-000000000002' },
      ],
    });
    // Move partition 2's first LBA into partition 1 in both entry arrays, and fix every CRC.
    const patch = (bytes: Uint8Array, entries: number, header: number) => {
      const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
      dv.setUint32(entries + 128 + 32, 4096, true);
      dv.setUint32(header + 88, crc32(bytes.subarray(entries, entries + 128 * 128)), true);
      dv.setUint32(header + 16, 0, true);
      dv.setUint32(header + 16, crc32(bytes.subarray(header, header + 92)), true);
    };
    patch(g.head, 1024, 512);
    patch(g.tail, 0, g.tail.length - 512);
    writeRegions(f, size, g.regions);
    const verify = spawnSync('sfdisk', ['--verify', f], { encoding: 'utf8' });
    expect(verify.stdout + verify.stderr).toMatch(/overlap/i);
    const t = parsePartitionTable(fileReader(f));
    expect(t.warnings.join('\n')).toMatch(/partitions 1 and 2 overlap/);
    expectSameAsSfdisk(t, f);
  });
});

/** Cases per table kind: 1500 in npm test, FUZZ_CASES under npm run fuzz. */
const PER_TABLE = Number(process.env['FUZZ_CASES'] ?? 1500);

describe('malformed tables', () => {
  it('seeded random corruption of GPT and MBR/EBR sectors ends in a table or warnings, never an exception or a runaway', () => {
    const gpt = disk('fuzz-gpt.img', '64M');
    sfdisk(gpt, GPT_SCRIPT);
    const mbr = disk('fuzz-mbr.img', '64M');
    sfdisk(mbr, `label: dos\n${mbr}1: start=2048, size=8192, type=83\n${mbr}2: size=60000, type=5\n${mbr}5: size=4096, type=83\n${mbr}6: size=4096, type=82\n${mbr}7: size=4096, type=7\n`);
    let seed = 4242;
    const rand = () => { seed = (seed * 1103515245 + 12345) & 0x7fffffff; return seed; };
    let cases = 0;
    for (const f of [gpt, mbr]) {
      const base = fileReader(f);
      const hot = f === gpt
        ? [[0, 34 * 512], [base.size - 33 * 512, 33 * 512]]
        : [[0, 512], ...parsePartitionTable(base).partitions.filter((p) => p.number >= 5).map((p) => [p.start - 2048 * 512, 512])];
      for (let i = 0; i < PER_TABLE; i++) {
        const patch = new Map<number, number>();
        for (let k = 0; k < 1 + (rand() % 6); k++) {
          const [at, len] = hot[rand() % hot.length]!;
          // Bias toward the fields that matter: header fields, the first entries, MBR entries.
          const off = at! + (rand() % 2 ? rand() % Math.min(len!, 1024) : rand() % len!);
          patch.set(off, rand() & 0xff);
        }
        let reads = 0;
        const r: BlockReader = {
          name: 'fuzz', size: base.size,
          read(offset, length) {
            reads += length;
            const b = base.read(offset, length);
            for (const [o, v] of patch) if (o >= offset && o < offset + length) b[o - offset] = v;
            return b;
          },
        };
        const t = parsePartitionTable(r);
        expect(['gpt', 'mbr', 'none']).toContain(t.kind);
        expect(t.partitions.length).toBeLessThanOrEqual(1024);
        expect(reads).toBeLessThan(4 * 2 ** 20);
        cases++;
      }
    }
    expect(cases).toBe(2 * PER_TABLE);
  });
});
