import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { bytesReader, FormatError } from '../../src/formats/block-reader.ts';
import { lvmCrc } from '../../src/formats/crc.ts';
import {
  assembleVgs, lvDmName, lvDmUuid, lvTable, parsePvLabel, parseVgMetadata, scanPv, type PvScan,
} from '../../src/formats/lvm.ts';
import { LvmLab, lvmAvailable } from '../kit/lvm.ts';

const can = lvmAvailable();
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-lvm-'));
const lab = new LvmLab(dir);
const files = { a: path.join(dir, 'pv-a.img'), b: path.join(dir, 'pv-b.img'), c: path.join(dir, 'pv-c.img') };
let oldA: Uint8Array<ArrayBuffer>; // pv-a as it was before the last change to the VG
let backup = '';

function scanFile(file: string, bytes = new Uint8Array(fs.readFileSync(file))): PvScan {
  const s = scanPv(bytesReader(file, bytes));
  if (!s) throw new Error(`${file}: no PV label`);
  return s;
}

beforeAll(() => {
  if (!can) return;
  const a = lab.attach(files.a, 24);
  const b = lab.attach(files.b, 24);
  const c = lab.attach(files.c, 16);
  // Two metadata copies on each PV of vg-data (one at the start, one at the end).
  lab.lvm('pvcreate', '-q', '--pvmetadatacopies', '2', a, b);
  lab.lvm('vgcreate', '-q', '-s', '1m', 'vg-data', a, b);
  lab.lvm('lvcreate', '-q', '-an', '-Zn', '-n', 'root', '-L', '6m', 'vg-data', a);
  lab.lvm('lvcreate', '-q', '-an', '-Zn', '-n', 'swap-1', '-L', '2m', 'vg-data', b);
  lab.lvm('lvcreate', '-q', '-an', '-Zn', '-n', 'wide', '-i', '2', '-I', '64k', '-L', '4m', 'vg-data');
  oldA = new Uint8Array(fs.readFileSync(files.a));
  lab.lvm('lvextend', '-q', '-L', '+3m', 'vg-data/root', b); // a second segment, on the other PV
  lab.lvm('pvcreate', '-q', c);
  lab.lvm('vgcreate', '-q', 'solo', c);
  lab.lvm('lvcreate', '-q', '-an', '-Zn', '-n', 'home', '-l', '100%FREE', 'solo');
  lab.lvm('vgcfgbackup', '-q', '-f', path.join(dir, 'backup-%s'));
  backup = fs.readFileSync(path.join(dir, 'backup-vg-data'), 'utf8');
}, 60_000);

afterAll(() => {
  lab.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

describe.skipIf(!can)('LVM2 metadata read by vdboot vs lvm2 on real PVs', () => {
  it('PV labels: uuid, device size and the first extent as pvs reports them', () => {
    const rows = lab.report('pvs', 'pv_name,pv_uuid,dev_size,pe_start,pv_mda_count');
    expect(rows.length).toBe(3);
    for (const [file, dev] of lab.loops) {
      const row = rows.find((r) => r.pv_name === dev)!;
      const s = scanFile(file);
      expect(s.label.pvUuid).toBe(row.pv_uuid);
      expect(s.label.deviceSize).toBe(Number(row.dev_size) * 512);
      expect(s.label.metadataAreas.length).toBe(Number(row.pv_mda_count));
      expect(s.label.dataAreas[0]!.offset).toBe(Number(row.pe_start) * 512);
      expect(s.copies.every((c) => c.vg && !c.error)).toBe(true);
    }
  });

  it('VGs: name, uuid, seqno and extent size as vgs reports them; LVs and segments as lvs does', () => {
    const scans = Object.values(files).map((f) => scanFile(f));
    const vgs = assembleVgs(scans);
    const vgRows = lab.report('vgs', 'vg_name,vg_uuid,vg_seqno,vg_extent_size,pv_count,lv_count');
    expect(vgs.map((a) => a.vg.name).sort()).toEqual(vgRows.map((r) => r.vg_name).sort());
    for (const row of vgRows) {
      const a = vgs.find((x) => x.vg.name === row.vg_name)!;
      expect(a.vg.uuid).toBe(row.vg_uuid);
      expect(a.vg.seqno).toBe(Number(row.vg_seqno));
      expect(a.vg.extentSize).toBe(Number(row.vg_extent_size));
      expect(a.vg.pvs.length).toBe(Number(row.pv_count));
      expect(a.vg.lvs.length).toBe(Number(row.lv_count));
      expect(a.missing).toEqual([]);
      expect(a.notes).toEqual([]);
    }
    const segRows = lab.report<Record<string, string>>('lvs', 'vg_name,lv_name,lv_uuid,lv_size,seg_start_pe,seg_size_pe,stripes,stripe_size,seg_pe_ranges,segtype');
    for (const row of segRows) {
      const a = vgs.find((x) => x.vg.name === row.vg_name)!;
      const lv = a.vg.lvs.find((l) => l.name === row.lv_name)!;
      expect(lv.uuid).toBe(row.lv_uuid);
      expect(lv.sectors).toBe(Number(row.lv_size));
      const seg = lv.segments.find((s) => s.startExtent === Number(row.seg_start_pe))!;
      expect(seg.extentCount).toBe(Number(row.seg_size_pe));
      expect(seg.stripes.length).toBe(Number(row.stripes));
      expect(seg.stripeSize).toBe(Number(row.stripes) > 1 ? Number(row.stripe_size) : 0);
      // seg_pe_ranges: "/dev/loop3:0-5 /dev/loop4:0-5", one range per stripe
      const ranges = row.seg_pe_ranges!.split(' ').map((r) => /^(.*):(\d+)-(\d+)$/.exec(r)!);
      expect(ranges.length).toBe(seg.stripes.length);
      ranges.forEach((m, k) => {
        const pv = a.vg.pvs.find((p) => p.key === seg.stripes[k]!.pv)!;
        const file = [...lab.loops].find(([, d]) => d === m[1])![0];
        expect(pv.uuid).toBe(scanFile(file).label.pvUuid);
        expect(seg.stripes[k]!.extent).toBe(Number(m[2]));
        expect(Number(m[3]) - Number(m[2]) + 1).toBe(seg.extentCount / seg.stripes.length);
      });
    }
  });

  it('the on-disk metadata is what vgcfgbackup writes out', () => {
    const fromBackup = parseVgMetadata(backup, 'backup-vg-data');
    const fromDisk = assembleVgs([scanFile(files.a), scanFile(files.b)])[0]!.vg;
    expect(fromDisk).toEqual(fromBackup);
  });

  it('device-mapper tables: linear and striped targets where lvs and pvs put the extents', () => {
    const scans = [scanFile(files.a), scanFile(files.b)];
    const a = assembleVgs(scans)[0]!;
    const majMin = new Map(scans.map((s, k) => [s.label.pvUuid, `7:${10 + k}`]));
    const pvRows = lab.report('pvs', 'pv_name,pv_uuid,pe_start');
    const segRows = lab.report('lvs', 'vg_name,lv_name,seg_start_pe,seg_size_pe,stripes,stripe_size,seg_pe_ranges', 'vg-data');
    const ext = a.vg.extentSize;
    for (const lv of a.vg.lvs) {
      const expected = segRows.filter((r) => r.lv_name === lv.name).map((r) => {
        const parts = r.seg_pe_ranges!.split(' ').map((range) => {
          const m = /^(.*):(\d+)-(\d+)$/.exec(range)!;
          const pv = pvRows.find((p) => p.pv_name === m[1])!;
          return `${majMin.get(pv.pv_uuid!)} ${Number(pv.pe_start) + Number(m[2]) * ext}`;
        });
        const start = Number(r.seg_start_pe) * ext;
        const length = Number(r.seg_size_pe) * ext;
        return parts.length === 1
          ? { start, length, type: 'linear', params: parts[0] }
          : { start, length, type: 'striped', params: `${parts.length} ${r.stripe_size} ${parts.join(' ')}` };
      });
      expect(expected.length).toBeGreaterThan(0);
      expect(lvTable(a, lv, (u) => majMin.get(u))).toEqual(expected);
    }
    expect(lvTable(a, a.vg.lvs.find((l) => l.name === 'root')!, (u) => majMin.get(u)).length).toBe(2);
    expect(lvTable(a, a.vg.lvs.find((l) => l.name === 'wide')!, (u) => majMin.get(u))[0]!.type).toBe('striped');
    const wide = a.vg.lvs.find((l) => l.name === 'wide')!;
    expect(lvDmName('vg-data', 'swap-1')).toBe('vg--data-swap--1');
    expect(lvDmUuid(a.vg.uuid, wide.uuid)).toBe(`LVM-${a.vg.uuid.replace(/-/g, '')}${wide.uuid.replace(/-/g, '')}`);
    expect(lvDmUuid(a.vg.uuid, wide.uuid)).toMatch(/^LVM-[0-9A-Za-z]{64}$/);
  });

  it('the newest seqno wins; an older copy on another PV is named', () => {
    const a = assembleVgs([scanFile(files.a, oldA), scanFile(files.b)])[0]!;
    expect(a.vg.lvs.find((l) => l.name === 'root')!.segments.length).toBe(2);
    expect(a.source.device).toBe(files.b);
    expect(a.notes.join('\n')).toMatch(/older \(seqno \d+\)/);
  });

  it('a damaged metadata copy is named with the area, and the other copy is used', () => {
    const bytes = new Uint8Array(fs.readFileSync(files.a));
    const s0 = scanFile(files.a, bytes);
    const first = s0.label.metadataAreas[0]!;
    // Flip one byte of the first copy's text: its checksum no longer matches.
    const textAt = first.offset + Number(new DataView(bytes.buffer, bytes.byteOffset + first.offset + 40, 8).getBigUint64(0, true));
    bytes[textAt + 10] ^= 0x20;
    const s = scanFile(files.a, bytes);
    expect(s.copies[0]!.error).toMatch(new RegExp(`metadata text at byte ${textAt} .*fails its checksum`));
    expect(s.copies[1]!.vg).toBeDefined();
    const a = assembleVgs([s, scanFile(files.b)])[0]!;
    expect(a.notes.join('\n')).toMatch(/fails its checksum .*; the copy from .* was used instead/);
    expect(a.vg.seqno).toBe(s0.copies[0]!.vg!.seqno);
  });

  it('bounds: a metadata location outside its area is refused even with a valid header checksum', () => {
    const bytes = new Uint8Array(fs.readFileSync(files.c));
    const s0 = scanFile(files.c, bytes);
    const area = s0.label.metadataAreas[0]!;
    const hdr = bytes.subarray(area.offset, area.offset + 512);
    const v = new DataView(hdr.buffer, hdr.byteOffset, 512);
    v.setBigUint64(40, BigInt(area.size + 4096), true);
    v.setUint32(0, lvmCrc(hdr.subarray(4)), true);
    const s = scanFile(files.c, bytes);
    expect(s.copies[0]!.error).toMatch(/lies outside the \d+-byte area/);
    expect(assembleVgs([s])).toEqual([]);
  });

  it('a damaged label is refused by its checksum; a device without one is not a PV', () => {
    const bytes = new Uint8Array(fs.readFileSync(files.c).subarray(0, 1 << 20));
    const s = scanFile(files.c, new Uint8Array(fs.readFileSync(files.c)));
    const at = s.label.sector * 512;
    bytes[at + 40] ^= 1;
    expect(() => parsePvLabel(bytes, 'pv-c', fs.statSync(files.c).size)).toThrow(/fails its checksum/);
    expect(scanPv(bytesReader('zeros', new Uint8Array(1 << 16)))).toBeNull();
  });

  it('a truncated PV: areas past the device end are refused', () => {
    const bytes = new Uint8Array(fs.readFileSync(files.a));
    expect(() => scanPv(bytesReader('short', bytes.subarray(0, 4 << 20)))).toThrow(/lies outside the device/);
  });

  it('a VG with a missing PV names the PV and rd.lvm.vg', () => {
    const a = assembleVgs([scanFile(files.a)])[0]!;
    expect(a.missing.map((p) => p.uuid)).toEqual([scanFile(files.b).label.pvUuid]);
    const dev = (u: string) => a.devices.get(u);
    expect(() => lvTable(a, a.vg.lvs.find((l) => l.name === 'root')!, dev)).toThrow(new RegExp(`VG vg-data is missing PV ${scanFile(files.b).label.pvUuid}.*rd\\.lvm\\.vg=`));
  });

  it('thin, cache, raid and snapshot LVs are refused with their type named', () => {
    for (const type of ['thin', 'thin-pool', 'cache', 'raid1', 'snapshot']) {
      const text = backup.replace(/(wide \{[\s\S]*?type = )"striped"/, `$1"${type}"`);
      const vg = parseVgMetadata(text, 'edited');
      const a = { vg, source: { device: 'x', areaOffset: 0 }, notes: [], devices: new Map(), missing: [] };
      expect(() => lvTable(a, vg.lvs.find((l) => l.name === 'wide')!, () => '7:0')).toThrow(new RegExp(`LV vg-data/wide is a ${type} volume`));
    }
  });

  it('malformed text is refused with its line, never a crash', () => {
    expect(() => parseVgMetadata('vg {\nid = "x"\nseqno = \n}', 't')).toThrow(FormatError);
    expect(() => parseVgMetadata('vg {\n extent_size = 8\n', 't')).toThrow(/not closed/);
    expect(() => parseVgMetadata(backup.replace(/segment_count = 1/, 'segment_count = 2'), 't')).toThrow(/segment2 is missing/);
    for (let cut = 0; cut < backup.length; cut += 97) {
      try { parseVgMetadata(backup.slice(0, cut), 't'); } catch (e) { expect(e).toBeInstanceOf(FormatError); }
    }
  });
});
