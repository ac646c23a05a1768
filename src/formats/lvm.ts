/**
 * LVM2, read without the `lvm` binary: the PV label (LABELONE in one of sectors 0–3), the
 * PV header with its data and metadata areas, each metadata area's header (checksummed
 * with LVM's CRC), the text metadata it points at, and the linear and striped segments of
 * each LV turned into device-mapper tables over the PV devices.
 *
 * Layouts follow LVM2's lib/format_text/layout.h and lib/label/label.h. Every offset and
 * size read from a disk is bounds-checked against the device and its area before use; a
 * damaged copy of the metadata is reported and another copy used, never trusted.
 *
 * Nothing here writes: activating an LV is creating a dm device from `lvTable`'s targets.
 */
import { type BlockReader, FormatError } from './block-reader.ts';
import { lvmCrc } from './crc.ts';
import { utf8Decode } from './text.ts';

const SECTOR = 512;
const LABEL_SCAN_SECTORS = 4;
const MDA_HEADER_SIZE = 512;
const MDA_MAGIC = ' LVM2 x[5A%r0N*>';
/** raw_locn.flags: this PV's metadata is not in use (pvchange --metadataignore) */
const RAW_LOCN_IGNORED = 1;
/** Above this, a metadata text is not believed (LVM's own default area is 1 MiB). */
const MAX_METADATA_TEXT = 64 * 1024 * 1024;

export interface DiskArea {
  /** bytes from the start of the PV */
  offset: number;
  /** bytes; 0 for a data area means "to the end of the device" */
  size: number;
}

export interface PvLabel {
  /** the sector (0–3) the label was found in */
  sector: number;
  /** the PV's UUID as LVM prints it (6-4-4-4-4-4-6 with dashes) */
  pvUuid: string;
  deviceSize: number;
  dataAreas: DiskArea[];
  metadataAreas: DiskArea[];
}

/** LVM's 32-character ids are printed in groups of 6-4-4-4-4-4-6, joined by dashes. */
export function formatLvmId(raw: string): string {
  const groups = [6, 4, 4, 4, 4, 4, 6];
  const out: string[] = [];
  let o = 0;
  for (const n of groups) { out.push(raw.slice(o, o + n)); o += n; }
  return out.join('-');
}

export function lvmIdRaw(id: string): string {
  return id.replace(/-/g, '');
}

function ascii(b: Uint8Array, off: number, len: number): string {
  let s = '';
  for (let i = 0; i < len; i++) s += String.fromCharCode(b[off + i]!);
  return s;
}

function u64(v: DataView, off: number, what: string, name: string): number {
  const x = v.getBigUint64(off, true);
  if (x > BigInt(Number.MAX_SAFE_INTEGER)) throw new FormatError(`${name}: LVM ${what} ${x} is out of range`, what, x);
  return Number(x);
}

/**
 * Finds and parses the PV label in the first four sectors (`head`: at least 2048 bytes).
 * Returns null when no sector holds LABELONE; throws FormatError for a label that is there
 * but damaged (checksum, offsets), naming the sector.
 */
export function parsePvLabel(head: Uint8Array, name: string, deviceSize: number): PvLabel | null {
  for (let s = 0; s < LABEL_SCAN_SECTORS; s++) {
    const o = s * SECTOR;
    if (o + SECTOR > head.length) break;
    if (ascii(head, o, 8) !== 'LABELONE') continue;
    const sec = head.subarray(o, o + SECTOR);
    const v = new DataView(sec.buffer, sec.byteOffset, SECTOR);
    const type = ascii(sec, 24, 8);
    if (type !== 'LVM2 001') throw new FormatError(`${name}: LVM label in sector ${s} has type "${type.trim()}", not "LVM2 001": this LVM version is not supported`, 'label_header.type', type);
    const sectorXl = u64(v, 8, 'label_header.sector_xl', name);
    if (sectorXl !== s) throw new FormatError(`${name}: LVM label in sector ${s} says it is in sector ${sectorXl}: damaged label`, 'label_header.sector_xl', sectorXl);
    const crc = v.getUint32(16, true);
    const actual = lvmCrc(sec.subarray(20));
    if (crc !== actual) throw new FormatError(`${name}: LVM label in sector ${s} fails its checksum (stored 0x${crc.toString(16)}, computed 0x${actual.toString(16)}): damaged label; pvck can examine it`, 'label_header.crc_xl', crc);
    const off = v.getUint32(20, true);
    if (off < 32 || off + 40 > SECTOR) throw new FormatError(`${name}: LVM label's PV header offset ${off} is outside its sector`, 'label_header.offset_xl', off);
    const pvUuid = ascii(sec, off, 32);
    if (!/^[0-9A-Za-z!#+.\-/:=@_^~]{32}$/.test(pvUuid) || pvUuid.includes('-')) {
      throw new FormatError(`${name}: LVM PV header has a malformed UUID`, 'pv_header.pv_uuid', pvUuid);
    }
    const devSize = u64(v, off + 32, 'pv_header.device_size_xl', name);
    let p = off + 40;
    const lists: DiskArea[][] = [[], []];
    for (const list of lists) {
      for (;;) {
        if (p + 16 > SECTOR) throw new FormatError(`${name}: LVM PV header's area list runs past its sector`, 'pv_header.disk_areas', p);
        const aOff = u64(v, p, 'disk_locn.offset', name);
        const aSize = u64(v, p + 8, 'disk_locn.size', name);
        p += 16;
        if (aOff === 0) break;
        const limit = Math.max(deviceSize, 0);
        if (aOff >= limit || aOff + aSize > limit) {
          throw new FormatError(`${name}: LVM area at byte ${aOff} (${aSize} bytes) lies outside the device (${deviceSize} bytes): the PV is truncated or its header damaged`, 'disk_locn', aOff);
        }
        list.push({ offset: aOff, size: aSize });
      }
    }
    return { sector: s, pvUuid: formatLvmId(pvUuid), deviceSize: devSize, dataAreas: lists[0]!, metadataAreas: lists[1]! };
  }
  return null;
}

export interface RawLocation {
  /** bytes from the start of the metadata area */
  offset: number;
  size: number;
  checksum: number;
  ignored: boolean;
}

export interface MdaHeader {
  start: number;
  size: number;
  locations: RawLocation[];
}

/** One metadata area header (512 bytes at `area.offset`), checksum and bounds checked. */
export function parseMdaHeader(bytes: Uint8Array, area: DiskArea, name: string): MdaHeader {
  const where = `${name}: LVM metadata area at byte ${area.offset}`;
  if (bytes.length < MDA_HEADER_SIZE) throw new FormatError(`${where}: header truncated`, 'mda_header', bytes.length);
  const v = new DataView(bytes.buffer, bytes.byteOffset, MDA_HEADER_SIZE);
  const crc = v.getUint32(0, true);
  const actual = lvmCrc(bytes.subarray(4, MDA_HEADER_SIZE));
  if (crc !== actual) throw new FormatError(`${where}: header fails its checksum (stored 0x${crc.toString(16)}, computed 0x${actual.toString(16)})`, 'mda_header.checksum_xl', crc);
  if (ascii(bytes, 4, 16) !== MDA_MAGIC) throw new FormatError(`${where}: header has no LVM2 magic`, 'mda_header.magic');
  const version = v.getUint32(20, true);
  if (version !== 1) throw new FormatError(`${where}: header version ${version} is not 1`, 'mda_header.version', version);
  const start = u64(v, 24, 'mda_header.start', name);
  const size = u64(v, 32, 'mda_header.size', name);
  if (start !== area.offset) throw new FormatError(`${where}: header says it starts at byte ${start}`, 'mda_header.start', start);
  if (size < MDA_HEADER_SIZE || size > area.size) throw new FormatError(`${where}: header says the area is ${size} bytes, the PV header ${area.size}`, 'mda_header.size', size);
  const locations: RawLocation[] = [];
  for (let p = 40; p + 24 <= MDA_HEADER_SIZE; p += 24) {
    const offset = u64(v, p, 'raw_locn.offset', name);
    if (offset === 0) break;
    const len = u64(v, p + 8, 'raw_locn.size', name);
    if (offset < MDA_HEADER_SIZE || offset >= size || len === 0 || len > size - MDA_HEADER_SIZE || len > MAX_METADATA_TEXT) {
      throw new FormatError(`${where}: metadata text at offset ${offset} (${len} bytes) lies outside the ${size}-byte area`, 'raw_locn', offset);
    }
    locations.push({ offset, size: len, checksum: v.getUint32(p + 16, true), ignored: (v.getUint32(p + 20, true) & RAW_LOCN_IGNORED) !== 0 });
  }
  return { start, size, locations };
}

/**
 * Reads the text a raw location points at. The text may wrap: past the area's end it
 * continues right after the header (LVM's circular buffer).
 */
export function readMetadataText(reader: BlockReader, mda: MdaHeader, loc: RawLocation): string {
  const first = Math.min(loc.size, mda.size - loc.offset);
  const a = reader.read(mda.start + loc.offset, first);
  const b = first < loc.size ? reader.read(mda.start + MDA_HEADER_SIZE, loc.size - first) : new Uint8Array(0);
  let crc = lvmCrc(a);
  if (b.length) crc = lvmCrc(b, crc);
  if (crc !== loc.checksum) {
    throw new FormatError(`${reader.name}: LVM metadata text at byte ${mda.start + loc.offset} (${loc.size} bytes) fails its checksum (stored 0x${loc.checksum.toString(16)}, computed 0x${crc.toString(16)})`, 'raw_locn.checksum', loc.checksum);
  }
  const all = new Uint8Array(loc.size);
  all.set(a, 0);
  all.set(b, a.length);
  let end = all.indexOf(0);
  if (end < 0) end = all.length;
  return utf8Decode(all.subarray(0, end));
}

/** One metadata copy found on a PV, or why a copy could not be used. */
export interface MetadataCopy {
  /** the device the copy was read from */
  device: string;
  /** byte offset of the metadata area */
  areaOffset: number;
  text?: string;
  vg?: VolumeGroup;
  error?: string;
}

export interface PvScan {
  device: string;
  label: PvLabel;
  copies: MetadataCopy[];
}

/**
 * Scans a device for an LVM PV: null when it has no label. Each metadata area is read;
 * a damaged one becomes a copy with `error` set (its neighbours still count).
 */
export function scanPv(reader: BlockReader): PvScan | null {
  if (reader.size < LABEL_SCAN_SECTORS * SECTOR) return null;
  const label = parsePvLabel(reader.read(0, LABEL_SCAN_SECTORS * SECTOR), reader.name, reader.size);
  if (!label) return null;
  const copies: MetadataCopy[] = [];
  for (const area of label.metadataAreas) {
    const copy: MetadataCopy = { device: reader.name, areaOffset: area.offset };
    copies.push(copy);
    try {
      if (area.size < MDA_HEADER_SIZE) throw new FormatError(`${reader.name}: LVM metadata area at byte ${area.offset} is only ${area.size} bytes`, 'disk_locn.size', area.size);
      const mda = parseMdaHeader(reader.read(area.offset, MDA_HEADER_SIZE), area, reader.name);
      const loc = mda.locations[0];
      if (!loc) { copy.error = `${reader.name}: LVM metadata area at byte ${area.offset} holds no metadata`; continue; }
      if (loc.ignored) { copy.error = `${reader.name}: LVM metadata area at byte ${area.offset} is marked ignored`; continue; }
      copy.text = readMetadataText(reader, mda, loc);
      copy.vg = parseVgMetadata(copy.text, `${reader.name} (metadata area at byte ${area.offset})`);
    } catch (e) {
      copy.error = e instanceof Error ? e.message : String(e);
      delete copy.text;
      delete copy.vg;
    }
  }
  return { device: reader.name, label, copies };
}

// ---------------------------------------------------------------------------------------
// The text format: sections `name { … }` and assignments `key = value`, values being
// strings, integers or arrays of them; `#` starts a comment outside strings.

export type MetaValue = string | number | MetaValue[];
export interface MetaSection { [key: string]: MetaValue | MetaSection }

/** Parses LVM's text metadata into nested plain objects. Errors name the line. */
export function parseMetadataTree(text: string, name: string): MetaSection {
  let i = 0;
  let line = 1;
  const fail = (what: string): never => { throw new FormatError(`${name}: LVM metadata line ${line}: ${what}`, 'metadata', line); };
  const skip = (): void => {
    for (;;) {
      const c = text[i];
      if (c === '\n') { line++; i++; } else if (c === ' ' || c === '\t' || c === '\r') i++;
      else if (c === '#') { while (i < text.length && text[i] !== '\n') i++; } else return;
    }
  };
  const ident = (): string => {
    const m = /^[A-Za-z0-9_+.\-]+/.exec(text.slice(i, i + 256));
    if (!m) return fail(`expected a name, found "${text.slice(i, i + 10)}"`);
    i += m[0].length;
    return m[0];
  };
  const value = (depth: number): MetaValue => {
    skip();
    const c = text[i];
    if (c === '"') {
      i++;
      let s = '';
      for (;;) {
        if (i >= text.length) return fail('unterminated string');
        const d = text[i++]!;
        if (d === '"') break;
        if (d === '\\') { if (i >= text.length) return fail('unterminated string'); s += text[i++]; continue; }
        if (d === '\n') line++;
        s += d;
      }
      return s;
    }
    if (c === '[') {
      if (depth > 4) return fail('arrays nested too deeply');
      i++;
      const arr: MetaValue[] = [];
      for (;;) {
        skip();
        if (text[i] === ']') { i++; return arr; }
        arr.push(value(depth + 1));
        skip();
        if (text[i] === ',') i++;
        else if (text[i] !== ']') return fail(`expected "," or "]" in an array`);
      }
    }
    const m = /^-?[0-9]+(\.[0-9]+)?/.exec(text.slice(i, i + 40));
    if (!m) return fail(`expected a value, found "${text.slice(i, i + 10)}"`);
    i += m[0].length;
    const n = Number(m[0]);
    if (!Number.isSafeInteger(n) && !m[1]) return fail(`number ${m[0]} is out of range`);
    return n;
  };
  const section = (depth: number, top: boolean): MetaSection => {
    if (depth > 16) return fail('sections nested too deeply');
    const out: MetaSection = Object.create(null) as MetaSection;
    for (;;) {
      skip();
      if (i >= text.length) { if (top) return out; return fail('a section is not closed by "}"'); }
      if (text[i] === '}') { if (top) return fail('unexpected "}"'); i++; return out; }
      const key = ident();
      skip();
      if (text[i] === '{') { i++; out[key] = section(depth + 1, false); } else if (text[i] === '=') { i++; out[key] = value(0); } else fail(`expected "=" or "{" after "${key}"`);
    }
  };
  return section(0, true);
}

export interface Segment {
  startExtent: number;
  extentCount: number;
  type: string;
  /** striped: sectors per stripe chunk (0 for one stripe) */
  stripeSize: number;
  /** striped: (PV name in the metadata, first extent on it) */
  stripes: { pv: string; extent: number }[];
}

export interface LogicalVolume {
  name: string;
  uuid: string;
  status: string[];
  visible: boolean;
  segments: Segment[];
  /** in 512-byte sectors */
  sectors: number;
}

export interface PhysicalVolumeRef {
  /** the name in the metadata: pv0, pv1, … */
  key: string;
  uuid: string;
  /** "hint only" */
  deviceHint: string;
  /** sectors from the start of the PV to its first extent */
  peStart: number;
  peCount: number;
  missing: boolean;
}

export interface VolumeGroup {
  name: string;
  uuid: string;
  seqno: number;
  /** sectors */
  extentSize: number;
  pvs: PhysicalVolumeRef[];
  lvs: LogicalVolume[];
}

function str(sec: MetaSection, key: string, where: string, name: string): string {
  const v = sec[key];
  if (typeof v !== 'string') throw new FormatError(`${name}: LVM metadata ${where}: "${key}" is missing or not a string`, key);
  return v;
}
function int(sec: MetaSection, key: string, where: string, name: string, min = 0): number {
  const v = sec[key];
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min) throw new FormatError(`${name}: LVM metadata ${where}: "${key}" is missing or not a whole number ≥ ${min}`, key);
  return v;
}
function strings(sec: MetaSection, key: string): string[] {
  const v = sec[key];
  return Array.isArray(v) ? v.filter((x): x is string => typeof x === 'string') : [];
}
function isSection(v: unknown): v is MetaSection {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** The VG a metadata text describes: its PVs, LVs and segments, every number checked. */
export function parseVgMetadata(text: string, name: string): VolumeGroup {
  const tree = parseMetadataTree(text, name);
  const vgNames = Object.keys(tree).filter((k) => isSection(tree[k]));
  if (vgNames.length !== 1) throw new FormatError(`${name}: LVM metadata holds ${vgNames.length} volume groups, expected one`, 'metadata', vgNames.length);
  const vgName = vgNames[0]!;
  const vg = tree[vgName] as MetaSection;
  const w = `of VG ${vgName}`;
  const extentSize = int(vg, 'extent_size', w, name, 1);
  const pvSec = vg.physical_volumes;
  const pvs: PhysicalVolumeRef[] = [];
  if (isSection(pvSec)) {
    for (const key of Object.keys(pvSec)) {
      const p = pvSec[key];
      if (!isSection(p)) continue;
      const pw = `${w}, PV ${key}`;
      const flags = strings(p, 'flags');
      pvs.push({
        key,
        uuid: str(p, 'id', pw, name),
        deviceHint: typeof p.device === 'string' ? p.device : '',
        peStart: int(p, 'pe_start', pw, name),
        peCount: int(p, 'pe_count', pw, name),
        missing: flags.includes('MISSING'),
      });
    }
  }
  const lvSec = vg.logical_volumes;
  const lvs: LogicalVolume[] = [];
  if (isSection(lvSec)) {
    for (const lvName of Object.keys(lvSec)) {
      const l = lvSec[lvName];
      if (!isSection(l)) continue;
      const lw = `${w}, LV ${lvName}`;
      const status = strings(l, 'status');
      const count = int(l, 'segment_count', lw, name, 1);
      if (count > 100000) throw new FormatError(`${name}: LVM metadata ${lw}: ${count} segments is not believable`, 'segment_count', count);
      const segments: Segment[] = [];
      for (let n = 1; n <= count; n++) {
        const s = l[`segment${n}`];
        if (!isSection(s)) throw new FormatError(`${name}: LVM metadata ${lw}: segment${n} is missing (segment_count ${count})`, 'segment', n);
        const sw = `${lw}, segment${n}`;
        const type = str(s, 'type', sw, name);
        const seg: Segment = { startExtent: int(s, 'start_extent', sw, name), extentCount: int(s, 'extent_count', sw, name, 1), type, stripeSize: 0, stripes: [] };
        if (type === 'striped') {
          const sc = int(s, 'stripe_count', sw, name, 1);
          const arr = s.stripes;
          if (!Array.isArray(arr) || arr.length !== sc * 2) throw new FormatError(`${name}: LVM metadata ${sw}: "stripes" does not list ${sc} (PV, extent) pairs`, 'stripes');
          for (let k = 0; k < sc; k++) {
            const pv = arr[2 * k];
            const ext = arr[2 * k + 1];
            if (typeof pv !== 'string' || typeof ext !== 'number' || !Number.isSafeInteger(ext) || ext < 0) throw new FormatError(`${name}: LVM metadata ${sw}: stripe ${k} is not a (PV, extent) pair`, 'stripes');
            seg.stripes.push({ pv, extent: ext });
          }
          if (sc > 1) {
            seg.stripeSize = int(s, 'stripe_size', sw, name, 1);
            if (seg.extentCount % sc !== 0) throw new FormatError(`${name}: LVM metadata ${sw}: ${seg.extentCount} extents do not divide into ${sc} stripes`, 'extent_count', seg.extentCount);
          }
        }
        segments.push(seg);
      }
      segments.sort((a, b) => a.startExtent - b.startExtent);
      let next = 0;
      for (const seg of segments) {
        if (seg.startExtent !== next) throw new FormatError(`${name}: LVM metadata ${lw}: segments leave a gap or overlap at extent ${next}`, 'start_extent', seg.startExtent);
        next += seg.extentCount;
      }
      const sectors = next * extentSize;
      if (!Number.isSafeInteger(sectors)) throw new FormatError(`${name}: LVM metadata ${lw}: size out of range`, 'extent_count', next);
      lvs.push({ name: lvName, uuid: str(l, 'id', lw, name), status, visible: status.includes('VISIBLE'), segments, sectors });
    }
  }
  return { name: vgName, uuid: str(vg, 'id', w, name), seqno: int(vg, 'seqno', w, name), extentSize, pvs, lvs };
}

// ---------------------------------------------------------------------------------------
// Assembling VGs from what the PVs hold, and LVs into device-mapper tables.

export interface AssembledVg {
  vg: VolumeGroup;
  /** the copy used: newest seqno, first found among equals */
  source: MetadataCopy;
  /** copies of this VG that were damaged or older, with why, for the console */
  notes: string[];
  /** PV uuid → the device it was found on */
  devices: Map<string, string>;
  /** PVs the metadata names that no scanned device holds */
  missing: PhysicalVolumeRef[];
}

/**
 * Groups the scanned PVs' metadata copies by VG uuid; for each VG the copy with the
 * highest seqno wins. Damaged copies are listed in `notes` with the copy used instead.
 */
export function assembleVgs(scans: PvScan[]): AssembledVg[] {
  const byVg = new Map<string, AssembledVg>();
  const damaged: MetadataCopy[] = [];
  for (const scan of scans) {
    for (const copy of scan.copies) {
      if (!copy.vg) { if (copy.error) damaged.push(copy); continue; }
      const cur = byVg.get(copy.vg.uuid);
      if (!cur) byVg.set(copy.vg.uuid, { vg: copy.vg, source: copy, notes: [], devices: new Map(), missing: [] });
      else if (copy.vg.seqno > cur.vg.seqno) {
        cur.notes.push(`${cur.source.device}: metadata of VG ${cur.vg.name} at byte ${cur.source.areaOffset} is older (seqno ${cur.vg.seqno}) than ${copy.device}'s (seqno ${copy.vg.seqno}), which is used`);
        cur.vg = copy.vg;
        cur.source = copy;
      } else if (copy.vg.seqno < cur.vg.seqno) {
        cur.notes.push(`${copy.device}: metadata of VG ${cur.vg.name} at byte ${copy.areaOffset} is older (seqno ${copy.vg.seqno}) than ${cur.source.device}'s (seqno ${cur.vg.seqno}), which is used`);
      }
    }
  }
  const pvDevice = new Map<string, string>();
  for (const scan of scans) if (!pvDevice.has(scan.label.pvUuid)) pvDevice.set(scan.label.pvUuid, scan.device);
  const out = [...byVg.values()];
  for (const a of out) {
    for (const pv of a.vg.pvs) {
      const dev = pvDevice.get(pv.uuid);
      if (dev) a.devices.set(pv.uuid, dev);
      else a.missing.push(pv);
    }
    for (const d of damaged) {
      const mine = scans.find((s) => s.device === d.device && a.devices.get(s.label.pvUuid) === s.device);
      if (mine) a.notes.push(`${d.error}; the copy from ${a.source.device} (metadata area at byte ${a.source.areaOffset}, seqno ${a.vg.seqno}) was used instead`);
    }
  }
  return out;
}

/** Device-mapper name LVM gives an LV: VG-LV with dashes inside either name doubled. */
export function lvDmName(vg: string, lv: string): string {
  return `${vg.replace(/-/g, '--')}-${lv.replace(/-/g, '--')}`;
}

/** Device-mapper uuid LVM gives an LV: LVM-<vg uuid><lv uuid>, both without dashes. */
export function lvDmUuid(vgUuid: string, lvUuid: string): string {
  return `LVM-${lvmIdRaw(vgUuid)}${lvmIdRaw(lvUuid)}`;
}

export interface LvTarget {
  start: number;
  length: number;
  type: 'linear' | 'striped' | 'zero' | 'error';
  params: string;
}

/** Segment types vdboot maps itself. */
/**
 * The kernel modules LVM's own program needs for the LVs vdboot does not map itself (thin,
 * cache, raid, mirror, snapshot); mkinitramfs includes them with it, the init loads them
 * only before running it.
 */
export const LVM_MODULE_NAMES: readonly string[] = ['dm_thin_pool', 'dm_cache', 'dm_cache_smq', 'dm_raid', 'dm_mirror', 'dm_snapshot', 'raid1', 'raid10', 'raid456'];

const OWN_TYPES = new Set(['striped', 'zero', 'error']);

/** What kind of LV needs the `lvm` binary: the first segment type vdboot does not map. */
export function unsupportedSegmentType(lv: LogicalVolume): string | null {
  for (const s of lv.segments) if (!OWN_TYPES.has(s.type)) return s.type;
  return null;
}

/**
 * The device-mapper table of one LV: linear for one stripe, striped for more, over the PV
 * devices `deviceOf` names (a path or MAJ:MIN). Every extent is checked to lie within its
 * PV's extents. Refuses thin, cache, raid, mirror and snapshot segments by type.
 */
export function lvTable(a: AssembledVg, lv: LogicalVolume, deviceOf: (pvUuid: string) => string | undefined): LvTarget[] {
  const vg = a.vg;
  const other = unsupportedSegmentType(lv);
  if (other) throw new FormatError(`LV ${vg.name}/${lv.name} is a ${other} volume: vdboot maps linear and striped LVs itself, and ${other} needs the lvm program, which this initramfs does not have`, 'segment.type', other);
  const pvByKey = new Map(vg.pvs.map((p) => [p.key, p]));
  const out: LvTarget[] = [];
  for (const seg of lv.segments) {
    const start = seg.startExtent * vg.extentSize;
    const length = seg.extentCount * vg.extentSize;
    if (seg.type === 'zero' || seg.type === 'error') { out.push({ start, length, type: seg.type, params: '' }); continue; }
    const per = seg.extentCount / seg.stripes.length;
    const parts = seg.stripes.map((st) => {
      const pv = pvByKey.get(st.pv);
      if (!pv) throw new FormatError(`LV ${vg.name}/${lv.name}: a segment names PV "${st.pv}", which VG ${vg.name}'s metadata does not list`, 'stripes', st.pv);
      if (st.extent + per > pv.peCount) throw new FormatError(`LV ${vg.name}/${lv.name}: extents ${st.extent}–${st.extent + per - 1} lie past the end of PV ${pv.uuid} (${pv.peCount} extents)`, 'stripes', st.extent);
      const dev = deviceOf(pv.uuid);
      if (!dev) throw new FormatError(`VG ${vg.name} is missing PV ${pv.uuid} (last seen as ${pv.deviceHint || 'an unknown device'}), which LV ${lv.name} uses: attach the disk that holds it, or activate only the complete VGs with rd.lvm.vg=`, 'pv', pv.uuid);
      return `${dev} ${pv.peStart + st.extent * vg.extentSize}`;
    });
    if (parts.length === 1) out.push({ start, length, type: 'linear', params: parts[0]! });
    else out.push({ start, length, type: 'striped', params: `${parts.length} ${seg.stripeSize} ${parts.join(' ')}` });
  }
  return out;
}
