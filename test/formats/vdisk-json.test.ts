import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isFormatError } from '../../src/formats/block-reader.ts';
import { openImage } from '../../src/formats/chain.ts';
import type { OpenedImage } from '../../src/formats/image.ts';
import { FORMAT_READERS } from '../../src/formats/detect.ts';
import { dmTable } from '../../src/formats/extent-ops.ts';
import { parsePartitionTable } from '../../src/formats/partitions.ts';
import { mappedReader, streamMapped } from '../../src/formats/read-map.ts';
import { parseVdiskSpec, vdiskJsonFormat } from '../../src/formats/vdisk-json.ts';
import { nodeChainHost } from '../../src/sys/node-reader.ts';
import { command as vdiskTable } from '../../src/cli/vdisk-table.ts';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-'));
const hosts: { close(): void }[] = [];
afterAll(() => {
  for (const h of hosts) h.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

const M = 2 ** 20;

/** Opens an image the way vdboot will once vdisk-json is in the format registry. */
function open(p: string): OpenedImage {
  const host = nodeChainHost();
  hosts.push(host);
  return openImage(p, { ...host, readers: [vdiskJsonFormat, ...FORMAT_READERS] });
}

/** The assembled disk written to a file through the extent map (the same path `vdboot cat` takes). */
function catTo(img: OpenedImage, out: string): void {
  const fd = fs.openSync(out, 'w');
  let pos = 0;
  for (const chunk of streamMapped(img, 0, img.map.size, 4 * M)) {
    fs.writeSync(fd, chunk, 0, chunk.length, pos);
    pos += chunk.length;
  }
  fs.closeSync(fd);
}

async function runVdiskTable(args: string[]): Promise<{ code: number; out: string; err: string }> {
  let out = '';
  let err = '';
  const code = await vdiskTable.run(args, { stdout: (t) => { out += t; }, stderr: (t) => { err += t; }, stdoutBytes: async () => {} });
  return { code, out, err };
}

function blkid(file: string, offset?: number): Record<string, string> {
  const args = ['-p', '-o', 'export', ...(offset !== undefined ? ['-O', String(offset)] : []), file];
  const text = execFileSync('blkid', args, { encoding: 'utf8' });
  const o: Record<string, string> = {};
  for (const l of text.trim().split('\n')) {
    const k = l.slice(0, l.indexOf('='));
    if (k !== 'DEVNAME' && !k.startsWith('PT')) o[k] = l.slice(l.indexOf('=') + 1);
  }
  return o;
}

function sfdiskJson(file: string) {
  return (JSON.parse(execFileSync('sfdisk', ['--json', file], { encoding: 'utf8' })) as {
    partitiontable: { label: string; id: string; partitions: { node: string; start: number; size: number; type: string; uuid?: string; name?: string; attrs?: string; bootable?: boolean }[] };
  }).partitiontable;
}

function partx(file: string): Record<string, string>[] {
  return execFileSync('partx', ['-P', '-o', 'NR,START,UUID', file], { encoding: 'utf8' }).trim().split('\n').map((line) => {
    const rec: Record<string, string> = {};
    for (const m of line.matchAll(/(\w+)="([^"]*)"/g)) rec[m[1]!] = m[2]!;
    return rec;
  });
}

function bytesOf(file: string, offset: number, length: number): Buffer {
  const fd = fs.openSync(file, 'r');
  const b = Buffer.alloc(length);
  fs.readSync(fd, b, 0, length, offset);
  fs.closeSync(fd);
  return b;
}

// Partition images, made once: ext4 with files in it, FAT32, swap, and the ext4 one again as qcow2.
const img = (n: string) => path.join(dir, n);
beforeAll(() => {
  const content = img('rootfs');
  fs.mkdirSync(path.join(content, 'etc'), { recursive: true });
  fs.writeFileSync(path.join(content, 'etc', 'hostname'), 'vdisk-test\n');
  execFileSync('truncate', ['-s', '24M', img('root.img')]);
  execFileSync('mke2fs', ['-q', '-F', '-t', 'ext4', '-L', 'root', '-d', content, img('root.img')]);
  execFileSync('truncate', ['-s', '33M', img('esp.img')]);
  execFileSync('mkfs.vfat', ['-F', '32', '-n', 'ESP', img('esp.img')], { stdio: 'pipe' });
  // A size that is not a multiple of the alignment nor of 4096: padding comes from the table file.
  execFileSync('truncate', ['-s', String(5 * M + 512), img('swap.img')]);
  execFileSync('mkswap', ['-L', 'swp', img('swap.img')], { stdio: 'pipe' });
  execFileSync('truncate', ['-s', '12M', img('data.img')]);
  execFileSync('mke2fs', ['-q', '-F', '-t', 'ext2', '-L', 'data', img('data.img')]);
  execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', img('data.img'), img('data.qcow2')]);
});

describe('*.vdisk.json disks', () => {
  it('GPT from raw and qcow2 partition images: sfdisk, libblkid and blkid -p see the table and each filesystem the JSON describes', async () => {
    const json = img('gpt.vdisk.json');
    fs.writeFileSync(json, JSON.stringify({
      vdisk: 1, table: 'gpt', diskGuid: '11112222-3333-4444-5555-666677778888',
      partitions: [
        { image: 'esp.img', type: 'esp', name: 'EFI system' },
        { image: 'root.img', type: 'linux-root-x86-64', name: 'root', uuid: 'aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee', attributes: ['GUID:59'] },
        { image: 'swap.img', type: 'swap', bootable: true },
        { image: 'data.qcow2', name: 'data' },
      ],
    }, null, 2));
    const w = await runVdiskTable([json]);
    expect(w.err).toBe('');
    expect(w.code).toBe(0);
    expect(fs.existsSync(img('gpt.vdisk.table'))).toBe(true);

    const disk = open(json);
    expect(disk.layers[0]!.layer.format).toBe('vdisk-json');
    // Every byte is in a file: the table file or a partition image (qcow2 holes read as zero).
    expect(disk.map.extents.every((e) => e.kind === 'data' || (e.kind === 'zero' && e.why === 'unallocated'))).toBe(true);
    expect(disk.map.files.map((f) => path.basename(f)).sort()).toEqual(['data.qcow2', 'esp.img', 'gpt.vdisk.json', 'gpt.vdisk.table', 'root.img', 'swap.img']);
    const out = img('gpt-assembled.raw');
    catTo(disk, out);

    const s = sfdiskJson(out);
    expect(s.label).toBe('gpt');
    expect(s.id.toLowerCase()).toBe('11112222-3333-4444-5555-666677778888');
    expect(s.partitions.map((p) => [p.type.toLowerCase(), p.name ?? '', p.attrs ?? '', p.start * 512 % M])).toEqual([
      ['c12a7328-f81f-11d2-ba4b-00a0c93ec93b', 'EFI system', '', 0],
      ['4f68bce3-e8cd-4db1-96e7-fbcaf984b709', 'root', 'GUID:59', 0],
      ['0657fd6d-a4ab-43c4-84e5-0933c84b4f4f', '', 'LegacyBIOSBootable', 0],
      ['0fc63daf-8483-4772-8e79-3d69d8477de4', 'data', '', 0],
    ]);
    expect(s.partitions[1]!.uuid!.toLowerCase()).toBe('aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee');
    execFileSync('sfdisk', ['--verify', out], { stdio: 'pipe' });

    const sources = ['esp.img', 'root.img', 'swap.img', 'data.img'];
    const px = partx(out);
    s.partitions.forEach((p, i) => {
      // The filesystem in each partition is the image's, byte for byte and as blkid reports it.
      expect(blkid(out, p.start * 512)).toEqual(blkid(img(sources[i]!)));
      const size = fs.statSync(img(sources[i]!)).size;
      expect(bytesOf(out, p.start * 512, Math.min(size, 2 * M)).equals(bytesOf(img(sources[i]!), 0, Math.min(size, 2 * M)))).toBe(true);
      expect(p.size * 512).toBe(Math.ceil(size / 512) * 512);
      expect(px[i]!.UUID).toBe(p.uuid!.toLowerCase());
    });
    // The same layer's table through vdboot's own parser, with no warnings.
    const t = parsePartitionTable(mappedReader(disk));
    expect(t.warnings).toEqual([]);
    expect(t.partitions.map((p) => p.partuuid)).toEqual(s.partitions.map((p) => p.uuid!.toLowerCase()));
  });

  it('a compressed qcow2 partition image: its clusters are unmappable for dm, and read through the image on the host', async () => {
    const packed = img('data-compressed.qcow2');
    execFileSync('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', img('data.img'), packed]);
    const json = img('packed.vdisk.json');
    fs.writeFileSync(json, JSON.stringify({ vdisk: 1, table: 'gpt', partitions: [{ image: 'data-compressed.qcow2', name: 'data' }] }));
    expect((await runVdiskTable([json])).code).toBe(0);
    const disk = open(json);
    const start = parsePartitionTable(mappedReader(disk)).partitions[0]!.start;
    const inPartition = disk.map.extents.filter((e) => e.start >= start && e.start < start + 12 * M);
    expect(inPartition.some((e) => e.kind === 'unmappable')).toBe(true);
    const out = img('packed-assembled.raw');
    catTo(disk, out);
    expect(bytesOf(out, start, 12 * M).equals(fs.readFileSync(img('data.img')))).toBe(true);
  });

  it('default PARTUUIDs and disk GUID are derived, so they stay the same across runs', () => {
    const text = JSON.stringify({ vdisk: 1, table: 'gpt', partitions: [{ image: 'a.img' }, { image: 'b.img' }] });
    const a = parseVdiskSpec(text, '/x/one.vdisk.json');
    const b = parseVdiskSpec(text, '/elsewhere/one.vdisk.json');
    const c = parseVdiskSpec(text, '/x/two.vdisk.json');
    expect(a.partitions.map((p) => p.uuid)).toEqual(b.partitions.map((p) => p.uuid));
    expect(a.diskGuid).toBe(b.diskGuid);
    expect(c.diskGuid).not.toBe(a.diskGuid);
    expect(new Set([...a.partitions, ...c.partitions].map((p) => p.uuid)).size).toBe(4);
  });

  it('MBR with more than four partitions: an extended partition with logical ones numbered 5…, PARTUUIDs SSSSSSSS-NN as libblkid computes them', async () => {
    const json = img('mbr.vdisk.json');
    const parts = ['esp.img', 'root.img', 'swap.img', 'data.img', 'data.qcow2'];
    fs.writeFileSync(json, JSON.stringify({
      vdisk: 1, table: 'mbr', diskSignature: 'cafe0042',
      partitions: parts.map((image, i) => ({ image, type: ['ef', 'linux', 'swap', '0x83', 'lvm'][i], bootable: i === 1 })),
    }));
    expect((await runVdiskTable([json])).code).toBe(0);
    const out = img('mbr-assembled.raw');
    catTo(open(json), out);
    const s = sfdiskJson(out);
    expect(s.id).toBe('0xcafe0042');
    expect(s.partitions.map((p) => [p.node.slice(out.length), p.type, !!p.bootable])).toEqual([
      ['1', 'ef', false], ['2', '83', true], ['3', '82', false], ['4', '5', false], ['5', '83', false], ['6', '8e', false],
    ]);
    const px = partx(out);
    expect(px.map((r) => [r.NR, r.UUID])).toEqual(['1', '2', '3', '4', '5', '6'].map((n) => [n, `cafe0042-0${n}`]));
    const sources = ['esp.img', 'root.img', 'swap.img', null, 'data.img', 'data.img'];
    s.partitions.forEach((p, i) => {
      const src = sources[i];
      if (src) expect(blkid(out, p.start * 512)).toEqual(blkid(img(src)));
    });
  });

  it('4096-byte sectors: a GPT that fdisk -b 4096 reads, with each filesystem in place', async () => {
    const json = img('gpt4k.vdisk.json');
    fs.writeFileSync(json, JSON.stringify({ vdisk: 1, table: 'gpt', sectorSize: 4096, partitions: [{ image: 'root.img', name: 'root' }, { image: 'swap.img', type: 'swap' }] }));
    expect((await runVdiskTable([json])).code).toBe(0);
    const out = img('gpt4k-assembled.raw');
    const disk = open(json);
    catTo(disk, out);
    const lst = execFileSync('fdisk', ['-b', '4096', '-l', '-o', 'Device,Start,Sectors,Name', out], { encoding: 'utf8' });
    expect(lst).not.toMatch(/corrupt|mismatch/i);
    const rows = lst.split('\n').filter((l) => l.startsWith(out)).map((l) => l.split(/\s+/));
    expect(rows.map((r) => r[0]!.slice(out.length))).toEqual(['1', '2']);
    expect(rows[1]![2]).toBe(String(Math.ceil((5 * M + 512) / 4096)));
    expect(blkid(out, Number(rows[0]![1]) * 4096)).toEqual(blkid(img('root.img')));
    expect(blkid(out, Number(rows[1]![1]) * 4096)).toEqual(blkid(img('swap.img')));
    expect(parsePartitionTable(mappedReader(disk)).sectorSize).toBe(4096);
  });

  it('without its table file the disk still reads on the host, and the table ranges are unmappable with the command to run', async () => {
    const json = img('notable.vdisk.json');
    fs.writeFileSync(json, JSON.stringify({ vdisk: 1, table: 'gpt', partitions: [{ image: 'esp.img' }, { image: 'root.img' }] }));
    const before = open(json);
    const unmappable = before.map.extents.filter((e) => e.kind === 'unmappable');
    expect(unmappable.length).toBeGreaterThan(0);
    expect(unmappable[0]!.kind === 'unmappable' && unmappable[0]!.reason).toMatch(/vdboot vdisk-table .*notable\.vdisk\.json/);
    expect(() => dmTable(before.map, { writable: false })).toThrow(/vdisk-table/);
    const synthesized = img('notable-before.raw');
    catTo(before, synthesized);
    expect((await runVdiskTable([json])).code).toBe(0);
    const after = open(json);
    expect(after.map.extents.some((e) => e.kind === 'unmappable')).toBe(false);
    expect(() => dmTable(after.map, { writable: true })).not.toThrow();
    const written = img('notable-after.raw');
    catTo(after, written);
    expect(fs.readFileSync(synthesized).equals(fs.readFileSync(written))).toBe(true);
  });

  it('vdisk-table keeps a matching table file (with what a guest wrote into the gaps) and refuses a stale one unless --force', async () => {
    const json = img('keep.vdisk.json');
    const part = img('keep-part.img');
    fs.copyFileSync(img('swap.img'), part);
    fs.writeFileSync(json, JSON.stringify({ vdisk: 1, table: 'mbr', partitions: [{ image: 'keep-part.img', type: 'swap' }] }));
    expect((await runVdiskTable([json])).code).toBe(0);
    const table = img('keep.vdisk.table');
    // A boot loader written by the guest into the gap after the MBR.
    const fd = fs.openSync(table, 'r+');
    fs.writeSync(fd, Buffer.from('GRUB core image'), 0, 15, 512 * 3);
    fs.closeSync(fd);
    const kept = await runVdiskTable([json]);
    expect(kept.out).toMatch(/up to date/);
    expect(bytesOf(table, 512 * 3, 15).toString()).toBe('GRUB core image');

    // The image grows: the table no longer describes it. Opening refuses, vdisk-table refuses without --force.
    execFileSync('truncate', ['-s', String(9 * M), part]);
    let err: unknown;
    try { open(json); } catch (e) { err = e; }
    expect(isFormatError(err)).toBe(true);
    expect((err as Error).message).toMatch(/keep\.vdisk\.table .*--force/);
    const refused = await runVdiskTable([json]);
    expect(refused.code).toBe(1);
    expect(refused.err).toMatch(/--force/);
    expect((await runVdiskTable([json, '--force'])).code).toBe(0);
    const t = parsePartitionTable(mappedReader(open(json)));
    expect(t.partitions[0]!.size).toBe(9 * M);
  });

  it('a table file whose partitions moved (same size, edited table) is refused when opened', async () => {
    const json = img('moved.vdisk.json');
    fs.writeFileSync(json, JSON.stringify({ vdisk: 1, table: 'gpt', partitions: [{ image: 'esp.img' }, { image: 'root.img' }] }));
    expect((await runVdiskTable([json])).code).toBe(0);
    // Swap the order in the JSON: same total sizes, different places.
    fs.writeFileSync(json, JSON.stringify({ vdisk: 1, table: 'gpt', partitions: [{ image: 'root.img' }, { image: 'esp.img' }] }));
    expect(() => open(json)).toThrow(/does not match .*partition 1 should be/);
  });

  it.each([
    [{ vdisk: 2, table: 'gpt', partitions: [{ image: 'a' }] }, /"vdisk" must be 1/],
    [{ vdisk: 1, table: 'apm', partitions: [{ image: 'a' }] }, /"table" must be "gpt" or "mbr"/],
    [{ vdisk: 1, table: 'gpt', partitions: [] }, /non-empty list/],
    [{ vdisk: 1, table: 'gpt', partitions: [{ image: 'a' }], size: 5 }, /unknown key size/],
    [{ vdisk: 1, table: 'gpt', partitions: [{ image: 'a', type: 'windows95' }] }, /unknown GPT partition type "windows95"/],
    [{ vdisk: 1, table: 'gpt', partitions: [{ image: 'a' }, { image: './a' }] }, /partitions 1 and 2 both use/],
    [{ vdisk: 1, table: 'mbr', partitions: [{ image: 'a', name: 'x' }] }, /MBR partitions have no names/],
    [{ vdisk: 1, table: 'mbr', partitions: [{ image: 'a', type: 'zz' }] }, /not an MBR partition type/],
    [{ vdisk: 1, table: 'gpt', alignment: 1000, partitions: [{ image: 'a' }] }, /"alignment" must be a multiple/],
    [{ vdisk: 1, table: 'gpt', partitions: [{ image: 'a', uuid: 'nope' }] }, /not a GUID/],
  ])('a bad definition is refused with a message naming the field: %j', (def, message) => {
    expect(() => parseVdiskSpec(JSON.stringify(def), 'bad.vdisk.json')).toThrow(message);
  });

  it('a missing partition image names the partition and the file', () => {
    const json = img('missing.vdisk.json');
    fs.writeFileSync(json, JSON.stringify({ vdisk: 1, table: 'gpt', partitions: [{ image: 'esp.img' }, { image: 'nowhere.img' }] }));
    expect(() => open(json)).toThrow(/partition 2: .*nowhere\.img/);
  });

  it('probe: a JSON disk definition is recognized by content; other JSON and raw disks are not', () => {
    const enc = (t: string) => new TextEncoder().encode(t);
    const r = (b: Uint8Array) => ({ name: 'x', size: b.length, read: (o: number, l: number) => b.subarray(o, o + l) });
    const yes = enc('\n  {"vdisk": 1, "table": "gpt", "partitions": []}');
    expect(vdiskJsonFormat.probe(yes, r(yes))).toBe(true);
    const other = enc('{"name": "vdisk"}');
    expect(vdiskJsonFormat.probe(other, r(other))).toBe(false);
    const raw = fs.readFileSync(img('esp.img')).subarray(0, 4096);
    expect(vdiskJsonFormat.probe(raw, { name: 'esp', size: 33 * M, read: () => raw })).toBe(false);
  });
});
