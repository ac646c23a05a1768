/**
 * `*.vdisk.json`: a disk assembled from partition images, with a partition table vdboot
 * writes itself, so a set of partition images (of any format vdboot reads: raw, qcow2,
 * VHDX, …, with their parent chains) boots like one partitioned disk.
 *
 * ## The file
 *
 *   {
 *     "vdisk": 1,                        // schema version (required)
 *     "table": "gpt",                    // "gpt" or "mbr" (required)
 *     "sectorSize": 512,                 // 512 (default) or 4096: the sector size the table is written for (*)
 *     "alignment": 1048576,              // partition starts are multiples of this many bytes (default 1 MiB)
 *     "diskGuid": "…",                   // GPT only; default: derived from the file's name
 *     "diskSignature": "1234abcd",       // MBR only, 8 hex digits; default: derived from the file's name
 *     "tableFile": "NAME.vdisk.table",   // default: this file's name with ".json" replaced by ".table"
 *     "partitions": [                    // in disk order; partition N is entry N (MBR: see below)
 *       { "image": "esp.img",  "type": "esp",  "name": "EFI system" },
 *       { "image": "root.qcow2", "type": "linux-root-x86-64", "name": "root",
 *         "uuid": "…",                   // GPT: the partition's unique GUID (PARTUUID); default: derived
 *         "attributes": ["LegacyBIOSBootable"],   // GPT only, sfdisk's names
 *         "bootable": true }             // MBR: the boot flag; GPT: the LegacyBIOSBootable attribute
 *     ]
 *   }
 *
 * `image` paths are relative to the JSON file's directory. `type` is a GPT type GUID or
 * one of the names in guid.ts (esp, linux, linux-root-x86-64, swap, lvm, msdata, …); for
 * MBR also a type byte in hex ("83", "0x0c"). Default: a Linux filesystem. An MBR table
 * with more than four partitions gets three primaries and an extended partition holding
 * the rest as logical partitions (Linux numbers them 5, 6, …). Each partition is as large
 * as its image's virtual size, rounded up to a whole sector.
 *
 * (*) The kernel reads a partition table in the sector size of the device it is on, and a
 * device-mapper device has the logical sector size of the host disk below it. So use 4096
 * only when the assembled disk will sit on a host disk (or loop device) with 4096-byte
 * logical sectors; 512 suits every other case.
 *
 * ## The table file: why there is one
 *
 * At boot, device-mapper maps every byte of the assembled disk onto bytes of real files
 * on the host partition; it cannot map bytes that exist only in vdboot's memory, and vdboot
 * never writes to the host disk while booting. So the partition table, and every byte of
 * the disk that is not in a partition image (the alignment gaps, the GPT backup at the
 * end), lives in one small file next to the JSON: `NAME.vdisk.table` holds those bytes
 * concatenated in disk order (about 1–3 MiB). `vdboot vdisk-table NAME.vdisk.json` writes
 * it once on the host. Because it is a real file, a guest's writes there (GRUB's core image
 * in the gap after the MBR, a changed partition name) persist like on a real disk.
 *
 * Opening checks that the table in the file describes the partitions the JSON describes
 * (table kind, starts and sizes): a mismatch (the JSON was edited, an image grew) is an
 * error, since the guest would see partitions at other places than the images they map
 * to. Without the file, the disk is still readable on the host (`vdboot inspect/cat`):
 * those ranges are `unmappable` with a reason that names the command to run, and read as
 * the table vdboot would write.
 */
import { FormatError, type BlockReader } from './block-reader.ts';
import { normalizePath } from './paths.ts';
import { crc32 } from './crc.ts';
import type { Extent, LayerExtent } from './extent-map.ts';
import { mergeExtents } from './extent-ops.ts';
import { gptTypeByGuid, gptTypeFromText, GPT_TYPES, normalizeGuid } from './guid.ts';
import type { FormatReader, ImageLayer, OpenContext, OpenedImage } from './image.ts';
import { parsePartitionTable, writeGpt, writeMbr, type PartitionTable, type SectorSize, type TableRegion } from './partitions.ts';
import { utf8Decode, utf8Encode } from './text.ts';

/** The largest JSON file vdboot reads as a disk definition. */
const MAX_JSON_BYTES = 1 << 20;
const MAX_PARTITIONS = 128;
const GPT_ENTRIES = 128;

export interface VdiskPartitionSpec {
  image: string;
  /** GPT: type GUID; MBR: type byte */
  type: string | number;
  name?: string;
  uuid?: string;
  bootable?: boolean;
  attributes?: string[];
}

export interface VdiskSpec {
  version: 1;
  table: 'gpt' | 'mbr';
  sectorSize: SectorSize;
  alignment: number;
  diskGuid: string;
  /** 8 hex digits */
  diskSignature: string;
  tableFile: string;
  partitions: VdiskPartitionSpec[];
}

export interface VdiskPartitionLayout {
  /** the Linux partition number (MBR logical partitions from 5) */
  number: number;
  start: number;
  /** the partition's size: the image's size rounded up to a sector */
  size: number;
  /** the image's virtual size; [start+imageSize, start+size) is padding from the table file */
  imageSize: number;
  logical: boolean;
}

export interface VdiskLayout {
  spec: VdiskSpec;
  diskSize: number;
  partitions: VdiskPartitionLayout[];
  /** the disk ranges the table file holds, in disk order, with their offset in that file */
  glue: { start: number; length: number; fileOffset: number }[];
  /** the table file's size: the sum of the glue ranges */
  tableFileSize: number;
}

function fail(path: string, message: string, field: string, value?: string | number): never {
  throw new FormatError(`${path}: ${message}`, field, value);
}

function baseName(path: string): string {
  const i = path.lastIndexOf('/');
  return i < 0 ? path : path.slice(i + 1);
}

/** The default table file name: `NAME.vdisk.json` → `NAME.vdisk.table`. */
export function defaultTableFile(jsonPath: string): string {
  const b = baseName(jsonPath);
  return b.toLowerCase().endsWith('.json') ? `${b.slice(0, -5)}.table` : `${b}.table`;
}

/** A GUID derived from text: stable across runs and hosts, so default PARTUUIDs do not change. */
function derivedGuid(text: string): string {
  const bytes = utf8Encode(text);
  const words = [0x9e3779b9, 0x85ebca6b, 0xc2b2ae35, 0x27d4eb2f].map((seed) => crc32(bytes, seed));
  const h = words.map((w) => w.toString(16).padStart(8, '0')).join('').split('');
  h[12] = '4'; // version 4 layout, as random GUIDs have
  h[16] = ((parseInt(h[16]!, 16) & 0x3) | 0x8).toString(16);
  const s = h.join('');
  return `${s.slice(0, 8)}-${s.slice(8, 12)}-${s.slice(12, 16)}-${s.slice(16, 20)}-${s.slice(20)}`;
}

function mbrTypeFromText(path: string, i: number, t: unknown): number {
  if (t === undefined) return 0x83;
  if (typeof t === 'number' && Number.isInteger(t) && t > 0 && t < 256) return t;
  if (typeof t === 'string') {
    if (/^(0x)?[0-9a-fA-F]{1,2}$/.test(t)) {
      const n = parseInt(t.replace(/^0x/, ''), 16);
      if (n > 0) return n;
    }
    const byAlias = GPT_TYPES.find((x) => x.aliases.includes(t.toLowerCase()));
    if (byAlias?.mbrType !== undefined) return byAlias.mbrType;
  }
  fail(path, `partition ${i + 1}: "${String(t)}" is not an MBR partition type: give a type byte in hex ("83", "0c", "ef") or linux, esp, swap, lvm, msdata`, 'type', String(t));
}

/** Parses and checks the JSON text of a disk definition; `path` is the JSON file's path, for messages and defaults. */
export function parseVdiskSpec(text: string, path: string): VdiskSpec {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (e) {
    fail(path, `is not valid JSON (${(e as Error).message})`, 'json');
  }
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) fail(path, 'is not a JSON object', 'json');
  const o = raw as Record<string, unknown>;
  const known = ['vdisk', 'table', 'sectorSize', 'alignment', 'diskGuid', 'diskSignature', 'tableFile', 'partitions'];
  const unknown = Object.keys(o).filter((k) => !known.includes(k));
  if (unknown.length) fail(path, `unknown key${unknown.length > 1 ? 's' : ''} ${unknown.join(', ')} (known: ${known.join(', ')})`, 'key', unknown[0]);
  if (o.vdisk !== 1) fail(path, `"vdisk" must be 1 (the schema version this vdboot reads), not ${JSON.stringify(o.vdisk)}`, 'vdisk', String(o.vdisk));
  if (o.table !== 'gpt' && o.table !== 'mbr') fail(path, `"table" must be "gpt" or "mbr", not ${JSON.stringify(o.table)}`, 'table', String(o.table));
  const table = o.table;
  const sectorSize = o.sectorSize ?? 512;
  if (sectorSize !== 512 && sectorSize !== 4096) fail(path, `"sectorSize" must be 512 or 4096, not ${JSON.stringify(sectorSize)}`, 'sectorSize', String(sectorSize));
  const alignment = o.alignment ?? 1 << 20;
  if (typeof alignment !== 'number' || !Number.isSafeInteger(alignment) || alignment < sectorSize || alignment % sectorSize !== 0 || alignment > 1 << 30) {
    fail(path, `"alignment" must be a multiple of the ${sectorSize}-byte sector size up to 1 GiB, not ${JSON.stringify(alignment)}`, 'alignment', String(alignment));
  }
  const name = baseName(path);
  let diskGuid = derivedGuid(`vdisk disk\0${name}`);
  if (o.diskGuid !== undefined) {
    if (table !== 'gpt') fail(path, '"diskGuid" is for GPT tables; an MBR table has "diskSignature"', 'diskGuid');
    if (typeof o.diskGuid !== 'string') fail(path, '"diskGuid" must be a GUID string', 'diskGuid');
    diskGuid = normalizeGuid(o.diskGuid);
  }
  let diskSignature = (crc32(utf8Encode(`vdisk signature\0${name}`)) || 1).toString(16).padStart(8, '0');
  if (o.diskSignature !== undefined) {
    if (table !== 'mbr') fail(path, '"diskSignature" is for MBR tables; a GPT table has "diskGuid"', 'diskSignature');
    const s = typeof o.diskSignature === 'string' ? o.diskSignature.replace(/^0x/i, '') : '';
    if (!/^[0-9a-fA-F]{8}$/.test(s)) fail(path, `"diskSignature" must be 8 hexadecimal digits, e.g. "1234abcd", not ${JSON.stringify(o.diskSignature)}`, 'diskSignature');
    diskSignature = s.toLowerCase();
  }
  const tableFile = o.tableFile ?? defaultTableFile(path);
  if (typeof tableFile !== 'string' || tableFile === '') fail(path, '"tableFile" must be a file name', 'tableFile');
  if (!Array.isArray(o.partitions) || o.partitions.length === 0) fail(path, '"partitions" must be a non-empty list of {"image": …}', 'partitions');
  const maxParts = table === 'gpt' ? MAX_PARTITIONS : 60;
  if (o.partitions.length > maxParts) fail(path, `${o.partitions.length} partitions are more than vdboot writes in one ${table.toUpperCase()} table (${maxParts})`, 'partitions', o.partitions.length);
  const images = new Map<string, number>();
  const partitions = o.partitions.map((p: unknown, i: number): VdiskPartitionSpec => {
    if (typeof p !== 'object' || p === null || Array.isArray(p)) fail(path, `partition ${i + 1} must be an object like {"image": "root.img"}`, 'partitions', i + 1);
    const q = p as Record<string, unknown>;
    const keys = ['image', 'type', 'name', 'label', 'uuid', 'bootable', 'attributes'];
    const bad = Object.keys(q).filter((k) => !keys.includes(k));
    if (bad.length) fail(path, `partition ${i + 1}: unknown key ${bad.join(', ')} (known: ${keys.join(', ')})`, 'key', bad[0]);
    if (typeof q.image !== 'string' || q.image === '') fail(path, `partition ${i + 1}: "image" must be the path of a partition image`, 'image');
    const norm = normalizePath(q.image);
    const before = images.get(norm);
    if (before !== undefined) fail(path, `partitions ${before} and ${i + 1} both use ${q.image}: each partition needs its own image`, 'image', q.image);
    images.set(norm, i + 1);
    const name = q.name ?? q.label;
    if (name !== undefined && typeof name !== 'string') fail(path, `partition ${i + 1}: "name" must be a string`, 'name');
    if (q.bootable !== undefined && typeof q.bootable !== 'boolean') fail(path, `partition ${i + 1}: "bootable" must be true or false`, 'bootable');
    const spec: VdiskPartitionSpec = { image: q.image, type: 0 };
    if (table === 'gpt') {
      if (q.type !== undefined && typeof q.type !== 'string') fail(path, `partition ${i + 1}: "type" must be a GPT type GUID or name`, 'type');
      try {
        spec.type = gptTypeFromText(q.type ?? 'linux');
      } catch (e) {
        fail(path, `partition ${i + 1}: ${(e as Error).message}`, 'type', String(q.type));
      }
      spec.uuid = q.uuid === undefined ? derivedGuid(`vdisk partition\0${baseName(path)}\0${i}\0${norm}`) : guidField(path, i, q.uuid);
      if (name !== undefined) {
        if (name.length > 36) fail(path, `partition ${i + 1}: GPT names hold 36 characters; "${name}" is longer`, 'name', name);
        spec.name = name;
      }
      if (q.attributes !== undefined) {
        if (!Array.isArray(q.attributes) || !q.attributes.every((a) => typeof a === 'string')) fail(path, `partition ${i + 1}: "attributes" must be a list of names`, 'attributes');
        spec.attributes = q.attributes as string[];
      }
      if (q.bootable) spec.attributes = [...new Set([...(spec.attributes ?? []), 'LegacyBIOSBootable'])];
    } else {
      spec.type = mbrTypeFromText(path, i, q.type);
      if (name !== undefined) fail(path, `partition ${i + 1}: MBR partitions have no names; use "table": "gpt" for PARTLABEL`, 'name', name);
      if (q.uuid !== undefined) fail(path, `partition ${i + 1}: an MBR partition's PARTUUID is the disk signature and its number; set "diskSignature" instead of "uuid"`, 'uuid');
      if (q.attributes !== undefined) fail(path, `partition ${i + 1}: "attributes" are GPT attributes; an MBR table has only "bootable"`, 'attributes');
      if (q.bootable) spec.bootable = true;
    }
    return spec;
  });
  return { version: 1, table, sectorSize, alignment, diskGuid, diskSignature, tableFile, partitions };
}

function guidField(path: string, i: number, v: unknown): string {
  if (typeof v !== 'string') fail(path, `partition ${i + 1}: "uuid" must be a GUID string`, 'uuid');
  try {
    return normalizeGuid(v);
  } catch (e) {
    fail(path, `partition ${i + 1}: ${(e as Error).message}`, 'uuid', v);
  }
}

function roundUp(n: number, to: number): number {
  return Math.ceil(n / to) * to;
}

/** Places the partitions (images of `imageSizes` bytes) on the disk and lists the table file's ranges. */
export function layoutVdisk(spec: VdiskSpec, imageSizes: number[]): VdiskLayout {
  const ss = spec.sectorSize;
  const align = spec.alignment;
  const gptArray = roundUp(GPT_ENTRIES * 128, ss);
  const headEnd = spec.table === 'gpt' ? 2 * ss + gptArray : ss;
  const logicalFrom = spec.table === 'mbr' && spec.partitions.length > 4 ? 3 : Infinity;
  const partitions: VdiskPartitionLayout[] = [];
  let cursor = headEnd;
  imageSizes.forEach((imageSize, i) => {
    if (!Number.isSafeInteger(imageSize) || imageSize <= 0) {
      throw new FormatError(`partition ${i + 1}: the image ${spec.partitions[i]!.image} is empty`, 'image', spec.partitions[i]!.image);
    }
    const logical = i >= logicalFrom;
    // A logical partition needs the sector before it for its extended boot record.
    const start = roundUp(logical ? cursor + ss : cursor, align);
    const size = roundUp(imageSize, ss);
    partitions.push({ number: logical ? 5 + (i - logicalFrom) : i + 1, start, size, imageSize, logical });
    cursor = start + size;
  });
  const tailBytes = spec.table === 'gpt' ? gptArray + ss : 0;
  const diskSize = roundUp(cursor + tailBytes, align);
  if (spec.table === 'mbr' && diskSize / ss > 0xffffffff) {
    throw new FormatError(`the partitions need ${diskSize} bytes, more than an MBR table can address with ${ss}-byte sectors; use "table": "gpt"`, 'table', 'mbr');
  }
  if (!Number.isSafeInteger(diskSize)) throw new FormatError(`the assembled disk would be ${diskSize} bytes: too large`, 'size', diskSize);
  const glue: VdiskLayout['glue'] = [];
  let pos = 0;
  let fileOffset = 0;
  const addGlue = (end: number) => {
    if (end > pos) {
      glue.push({ start: pos, length: end - pos, fileOffset });
      fileOffset += end - pos;
    }
  };
  for (const p of partitions) {
    addGlue(p.start);
    pos = p.start + p.imageSize;
  }
  addGlue(diskSize);
  return { spec, diskSize, partitions, glue, tableFileSize: fileOffset };
}

/** The table structures vdboot writes for a layout, as disk regions. */
export function vdiskTableRegions(layout: VdiskLayout): TableRegion[] {
  const { spec } = layout;
  if (spec.table === 'gpt') {
    return writeGpt({
      diskSize: layout.diskSize,
      sectorSize: spec.sectorSize,
      diskGuid: spec.diskGuid,
      entryCount: GPT_ENTRIES,
      partitions: layout.partitions.map((p, i) => {
        const s = spec.partitions[i]!;
        return { start: p.start, size: p.size, type: String(s.type), uuid: s.uuid!, name: s.name, attributes: s.attributes };
      }),
    }).regions;
  }
  return writeMbr({
    diskSize: layout.diskSize,
    sectorSize: spec.sectorSize,
    diskSignature: parseInt(spec.diskSignature, 16),
    partitions: layout.partitions.map((p, i) => {
      const s = spec.partitions[i]!;
      return { start: p.start, size: p.size, type: Number(s.type), bootable: s.bootable, logical: p.logical };
    }),
  }).regions;
}

/** The bytes of the table file for a layout: every glue range, zeros except the table structures. */
export function buildVdiskTableFile(layout: VdiskLayout): Uint8Array {
  const out = new Uint8Array(layout.tableFileSize);
  for (const r of vdiskTableRegions(layout)) {
    for (const g of layout.glue) {
      const a = Math.max(g.start, r.offset);
      const b = Math.min(g.start + g.length, r.offset + r.bytes.length);
      if (a < b) out.set(r.bytes.subarray(a - r.offset, b - r.offset), g.fileOffset + (a - g.start));
    }
  }
  return out;
}

/** The assembled disk's table area as a BlockReader: glue ranges from `glueBytes(fileOffset, length)`, partition ranges as zeros. */
function glueDiskReader(layout: VdiskLayout, name: string, glueBytes: (fileOffset: number, length: number) => Uint8Array): BlockReader {
  return {
    name,
    size: layout.diskSize,
    read(offset: number, length: number): Uint8Array {
      if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > layout.diskSize) {
        throw new FormatError(`${name}: read of ${length} bytes at ${offset} is outside the ${layout.diskSize}-byte disk`, 'offset', offset);
      }
      const out = new Uint8Array(length);
      for (const g of layout.glue) {
        const a = Math.max(g.start, offset);
        const b = Math.min(g.start + g.length, offset + length);
        if (a < b) out.set(glueBytes(g.fileOffset + (a - g.start), b - a), a - offset);
      }
      return out;
    },
  };
}

/**
 * Checks that the table held in a table file describes the layout: same kind, the same
 * partitions at the same places. Returns warnings for harmless differences (names, GUIDs
 * changed by the guest); throws FormatError for the dangerous ones.
 */
export function checkVdiskTable(layout: VdiskLayout, table: PartitionTable, jsonPath: string, tableFile: string): string[] {
  const { spec } = layout;
  const fix = `rewrite it with "vdboot vdisk-table ${jsonPath} --force" on the host (the guest then sees the table the JSON describes)`;
  const kind = spec.table === 'gpt' ? 'gpt' : 'mbr';
  if (table.kind !== kind) {
    throw new FormatError(`${tableFile} holds ${table.kind === 'none' ? 'no partition table' : `a ${table.kind.toUpperCase()} table`}, but ${jsonPath} asks for ${kind.toUpperCase()}${table.warnings.length ? ` (${table.warnings.join('; ')})` : ''}: ${fix}`, 'table', table.kind);
  }
  const listed = table.partitions.filter((p) => !p.extended);
  const warnings: string[] = [...table.warnings];
  for (const p of layout.partitions) {
    const got = listed.find((q) => q.number === p.number);
    if (!got || got.start !== p.start || got.size !== p.size) {
      throw new FormatError(
        `${tableFile} does not match ${jsonPath}: partition ${p.number} should be ${p.size} bytes at byte ${p.start} (its image is ${p.imageSize} bytes) but the table ${got ? `says ${got.size} bytes at byte ${got.start}` : 'has no such partition'}. The JSON or an image changed since the table was written; ${fix}`,
        'partition', p.number,
      );
    }
    const s = spec.partitions[layout.partitions.indexOf(p)]!;
    const want = kind === 'gpt' ? String(s.type) : Number(s.type).toString(16);
    if (got.type !== want) warnings.push(`partition ${p.number}: the table says type ${got.type}, the JSON ${want}`);
    if (kind === 'gpt' && s.uuid && got.partuuid !== s.uuid) warnings.push(`partition ${p.number}: the table's PARTUUID is ${got.partuuid}, the JSON's ${s.uuid}`);
  }
  const extra = listed.filter((q) => !layout.partitions.some((p) => p.number === q.number));
  if (extra.length) {
    throw new FormatError(`${tableFile} has partition${extra.length > 1 ? 's' : ''} ${extra.map((q) => q.number).join(', ')} that ${jsonPath} does not describe: ${fix}`, 'partition', extra[0]!.number);
  }
  return warnings;
}

/**
 * Checks a table file against a layout: its size, then the partition table it holds.
 * Returns warnings for harmless differences; throws FormatError when it does not match.
 */
export function verifyVdiskTableFile(layout: VdiskLayout, tableFile: BlockReader, jsonPath: string): string[] {
  const name = layout.spec.tableFile;
  if (tableFile.size !== layout.tableFileSize) {
    throw new FormatError(
      `${name} has ${tableFile.size} bytes, but ${jsonPath} now needs ${layout.tableFileSize} bytes of table and gaps: the JSON or a partition image changed size since it was written. Rewrite it with "vdboot vdisk-table ${jsonPath} --force" on the host`,
      'tableFile', tableFile.size,
    );
  }
  const table = parsePartitionTable(glueDiskReader(layout, jsonPath, (o, l) => tableFile.read(o, l)), { sectorSize: layout.spec.sectorSize });
  return checkVdiskTable(layout, table, jsonPath, name);
}

/** What the vdisk reader needs from the chain resolver: opening a partition image with its parents. */
export type OpenPartitionImage = (path: string) => OpenedImage;

/** Opens a partition image (relative to the JSON's directory) with its parent chain, through the chain resolver. */
function partitionOpener(ctx: OpenContext): OpenPartitionImage {
  const open = ctx.openImage;
  if (!open) throw new FormatError(`${ctx.path}: a disk definition can only be opened through the image chain resolver (openImage)`, 'context');
  return (p) => open.call(ctx, p);
}

function readJson(file: BlockReader): string {
  if (file.size > MAX_JSON_BYTES) {
    throw new FormatError(`${file.name}: ${file.size} bytes is too large for a disk definition (at most ${MAX_JSON_BYTES})`, 'size', file.size);
  }
  return utf8Decode(file.read(0, file.size));
}

export const vdiskJsonFormat: FormatReader = {
  format: 'vdisk-json',
  probe(head: Uint8Array, file: BlockReader): boolean {
    if (file.size > MAX_JSON_BYTES) return false;
    let i = 0;
    if (head[0] === 0xef && head[1] === 0xbb && head[2] === 0xbf) i = 3;
    while (i < head.length && (head[i] === 0x20 || head[i] === 0x0a || head[i] === 0x0d || head[i] === 0x09)) i++;
    if (head[i] !== 0x7b) return false;
    // A small file that starts like a JSON object: look for the schema key in all of it.
    const text = file.size <= head.length ? utf8Decode(head) : utf8Decode(file.read(0, file.size));
    return /"vdisk"\s*:/.test(text);
  },
  open(file: BlockReader, ctx: OpenContext): ImageLayer {
    const spec = parseVdiskSpec(readJson(file).replace(/^\ufeff/, ''), ctx.path);
    const open = partitionOpener(ctx);
    const images = spec.partitions.map((p, i) => {
      try {
        return open(p.image);
      } catch (e) {
        throw new FormatError(`${ctx.path}: partition ${i + 1}: ${(e as Error).message}`, 'image', p.image);
      }
    });
    const layout = layoutVdisk(spec, images.map((img) => img.map.size));

    let tableReader: BlockReader | undefined;
    let missingWhy = '';
    try {
      tableReader = ctx.openFile(spec.tableFile);
    } catch (e) {
      missingWhy = (e as Error).message;
    }
    const details: ImageLayer['details'] = {
      table: spec.table,
      sectorSize: spec.sectorSize,
      alignment: spec.alignment,
      partitions: spec.partitions.length,
      tableFile: spec.tableFile,
    };
    let synthesized: Uint8Array | undefined;
    const synth = () => (synthesized ??= buildVdiskTableFile(layout));
    const jsonName = ctx.path;
    if (tableReader) {
      const warnings = verifyVdiskTableFile(layout, tableReader, jsonName);
      details.tableFileState = 'present';
      warnings.forEach((w, i) => { details[`warning${i + 1}`] = w; });
    } else {
      details.tableFileState = `missing (${missingWhy})`;
    }

    // Files of the layer: [0] the JSON, [1] the table file when it exists, then every file
    // of every partition image. (The chain resolver opens every file listed.)
    const files: string[] = tableReader ? [baseName(ctx.path), spec.tableFile] : [baseName(ctx.path)];
    const fileIndex = new Map<string, number>();
    const indexOf = (name: string): number => {
      let k = fileIndex.get(name);
      if (k === undefined) {
        k = files.length;
        files.push(name);
        fileIndex.set(name, k);
      }
      return k;
    };
    const missingReason = `the partition table file ${spec.tableFile} does not exist yet: run "vdboot vdisk-table ${jsonName}" on the host to write it`;

    const extents: LayerExtent[] = [];
    for (const g of layout.glue) {
      extents.push(tableReader
        ? { kind: 'data', start: g.start, length: g.length, file: 1, offset: g.fileOffset }
        : { kind: 'unmappable', start: g.start, length: g.length, reason: missingReason });
    }
    layout.partitions.forEach((p, i) => {
      const img = images[i]!;
      for (const e of img.map.extents) {
        const start = p.start + e.start;
        if (e.kind === 'data') {
          // Partition images were opened relative to the JSON's directory, so their file
          // names already are what this layer's files[] must hold.
          extents.push({ ...e, start, file: indexOf(img.map.files[e.file]!) });
        } else extents.push({ ...e, start } as Extent);
      }
    });
    extents.sort((a, b) => a.start - b.start);

    return {
      format: 'vdisk-json',
      subformat: spec.table,
      size: layout.diskSize,
      files,
      extents: mergeExtents(extents),
      details,
      readUnmappable(start: number, length: number): Uint8Array {
        const out = new Uint8Array(length);
        const end = start + length;
        for (const g of layout.glue) {
          const a = Math.max(g.start, start);
          const b = Math.min(g.start + g.length, end);
          if (a < b) {
            const src = tableReader ? tableReader.read(g.fileOffset + (a - g.start), b - a) : synth().subarray(g.fileOffset + (a - g.start), g.fileOffset + (b - g.start));
            out.set(src, a - start);
          }
        }
        layout.partitions.forEach((p, i) => {
          const a = Math.max(p.start, start);
          const b = Math.min(p.start + p.imageSize, end);
          if (a < b) out.set(images[i]!.readUnmappable(a - p.start, b - a), a - start);
        });
        return out;
      },
    };
  },
};

/** Reads a disk definition and the sizes of its partition images on the host: what `vdboot vdisk-table` writes. */
export function planVdiskTable(jsonText: string, jsonPath: string, open: OpenPartitionImage): { layout: VdiskLayout; bytes: Uint8Array } {
  const spec = parseVdiskSpec(jsonText, jsonPath);
  const sizes = spec.partitions.map((p, i) => {
    try {
      return open(p.image).map.size;
    } catch (e) {
      throw new FormatError(`${jsonPath}: partition ${i + 1}: ${(e as Error).message}`, 'image', p.image);
    }
  });
  const layout = layoutVdisk(spec, sizes);
  return { layout, bytes: buildVdiskTableFile(layout) };
}

/** For messages: a GPT type's name or the MBR type byte. */
export function vdiskTypeName(spec: VdiskSpec, p: VdiskPartitionSpec): string {
  return spec.table === 'gpt' ? gptTypeByGuid(String(p.type))?.name ?? String(p.type) : `0x${Number(p.type).toString(16)}`;
}

