/**
 * A persistent overlay (rd.vdisk.overlay=): one client's writes to a shared, read-only image,
 * kept on a local disk across reboots. Its layout on the overlay device (a partition, a
 * whole disk, or a preallocated file mapped through its extents):
 *
 *   [0, 4 KiB)          vdboot's record: magic, version, where the store starts, the chunk
 *                       size, and the identity of the image the writes were made over
 *                       (JSON), protected by a CRC-32
 *   [1 MiB, end)        device-mapper's persistent snapshot exception store (dm-snapshot
 *                       "P"): a header chunk ("SnAp"), exception areas and data chunks,
 *                       written by the kernel
 *
 * The record is what makes the overlay safe: exceptions name chunks of one base image, and
 * the same chunks of another image hold other data. Before the store is used, the base's
 * identity now is compared with the one recorded; any difference refuses the overlay.
 *
 *   parseOverlayRecord(bytes): OverlayRecord | null       null: no record (not vdboot's)
 *   encodeOverlayRecord(record): Uint8Array               the 4 KiB record
 *   parseStoreHeader(bytes): StoreHeader                   dm-snapshot's header chunk
 *   storeUsage(reader, chunkSectors): StoreUsage           its exceptions, and how full it is
 *   baseIdentity(input): BaseIdentity                      what identifies an image
 *   identityDifferences(recorded, now): string[]           empty when it is the same image
 *   classifyOverlay(reader): OverlayContent                vdboot's overlay, blank, damaged, or something else
 */
import { FormatError, type BlockReader } from './block-reader.ts';
import { crc32 } from './crc.ts';
import { detectFormat } from './detect.ts';
import type { ExtentMap } from './extent-map.ts';
import { parsePartitionTable } from './partitions.ts';
import { probeFilesystem } from './probe.ts';
import { sha256 } from './sha256.ts';
import { utf8Decode, utf8Encode } from './text.ts';

export const OVERLAY_MAGIC = 'VDBOOT-OVERLAY\0\0';
export const OVERLAY_RECORD_SIZE = 4096;
/** The exception store starts 1 MiB in (sector 2048): aligned for any disk, far from the record. */
export const OVERLAY_STORE_OFFSET = 1024 * 1024;
/** Below this, the store has no room for its header and a few areas: refused. */
export const OVERLAY_MIN_SIZE = 4 * 1024 * 1024;
const RECORD_VERSION = 1;
/** the store's first chunk at most (2048 sectors would be 1 MiB; vdboot makes 4 or 64 KiB chunks): zeroed when an overlay is made */
const STORE_HEAD_BYTES = 64 * 1024;
/** offsets in the record */
const OFF = { magic: 0, version: 16, storeSectors: 20, chunkSectors: 24, jsonLength: 28, jsonCrc: 32, json: 64 } as const;

/** dm-snapshot's persistent store header (drivers/md/dm-snap-persistent.c, struct disk_header). */
export const SNAP_MAGIC = 0x70416e53; // "SnAp" little-endian

/** What identifies the image an overlay was made over. */
export interface BaseIdentity {
  /** where it came from (the export or the image's path, as the host spells it): another name is another image */
  source: string;
  /** virtual size in bytes */
  size: number;
  /** each layer of the chain, top first: its format and the identifiers the format keeps */
  layers: LayerIdentity[];
  /** SHA-256 (hex, first 16 bytes) of the image's map: which virtual ranges lie where in which file */
  tables: string;
  /** SHA-256 (hex, first 16 bytes) of sampled virtual-disk bytes: the partition table and each partition's superblock area */
  content: string;
}

export interface LayerIdentity {
  format: string;
  subformat: string;
  size: number;
  /** the format's own identity (VHD/VHDX/VDI UUID, VMDK CID) */
  id?: string;
  /** a value the format changes on every write session (VHDX DataWriteGuid, VMDK CID) */
  writeId?: string;
}

export interface OverlayRecord {
  version: number;
  /** where the exception store starts, in bytes */
  storeOffset: number;
  /** the store's chunk size in 512-byte sectors */
  chunkSectors: number;
  base: BaseIdentity;
}

export interface StoreHeader {
  /** 0: never written (the kernel makes a new store); SNAP_MAGIC: a store */
  magic: number;
  /** 0: the kernel invalidated the snapshot (it overflowed) */
  valid: number;
  version: number;
  chunkSectors: number;
}

/** The 4 KiB record at the start of an overlay. */
export function encodeOverlayRecord(r: OverlayRecord): Uint8Array {
  const json = utf8Encode(JSON.stringify({ base: r.base }));
  if (OFF.json + json.length > OVERLAY_RECORD_SIZE) throw new FormatError(`the overlay record would take ${OFF.json + json.length} bytes, more than ${OVERLAY_RECORD_SIZE}`, 'record', json.length);
  const out = new Uint8Array(OVERLAY_RECORD_SIZE);
  const v = new DataView(out.buffer);
  out.set(utf8Encode(OVERLAY_MAGIC), OFF.magic);
  v.setUint32(OFF.version, r.version, true);
  v.setUint32(OFF.storeSectors, r.storeOffset / 512, true);
  v.setUint32(OFF.chunkSectors, r.chunkSectors, true);
  v.setUint32(OFF.jsonLength, json.length, true);
  v.setUint32(OFF.jsonCrc, crc32(json) >>> 0, true);
  out.set(json, OFF.json);
  return out;
}

function hasMagic(bytes: Uint8Array): boolean {
  const m = utf8Encode(OVERLAY_MAGIC);
  return bytes.length >= m.length && m.every((b, i) => bytes[i] === b);
}

/**
 * The record at the start of `bytes` (at least 4 KiB); null when there is none (the magic
 * is absent). A record that is there but damaged throws FormatError saying what.
 */
export function parseOverlayRecord(bytes: Uint8Array): OverlayRecord | null {
  if (!hasMagic(bytes)) return null;
  if (bytes.length < OVERLAY_RECORD_SIZE) throw new FormatError(`the overlay record is truncated (${bytes.length} of ${OVERLAY_RECORD_SIZE} bytes)`, 'record', bytes.length);
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const version = v.getUint32(OFF.version, true);
  if (version !== RECORD_VERSION) throw new FormatError(`the overlay record has version ${version}; this vdboot reads version ${RECORD_VERSION}`, 'version', version);
  const storeSectors = v.getUint32(OFF.storeSectors, true);
  if (storeSectors * 512 !== OVERLAY_STORE_OFFSET) throw new FormatError(`the overlay record puts the store at sector ${storeSectors}, not ${OVERLAY_STORE_OFFSET / 512}`, 'store', storeSectors);
  const chunkSectors = v.getUint32(OFF.chunkSectors, true);
  if (chunkSectors < 8 || chunkSectors > 2048 || (chunkSectors & (chunkSectors - 1)) !== 0) throw new FormatError(`the overlay record's chunk size ${chunkSectors} sectors is not a power of two from 8 to 2048`, 'chunk', chunkSectors);
  const length = v.getUint32(OFF.jsonLength, true);
  if (length === 0 || OFF.json + length > OVERLAY_RECORD_SIZE) throw new FormatError(`the overlay record's identity length ${length} does not fit in ${OVERLAY_RECORD_SIZE} bytes`, 'length', length);
  const json = bytes.subarray(OFF.json, OFF.json + length);
  const crc = v.getUint32(OFF.jsonCrc, true);
  if ((crc32(json) >>> 0) !== crc) throw new FormatError(`the overlay record's checksum does not match (stored ${crc.toString(16)}, computed ${(crc32(json) >>> 0).toString(16)})`, 'crc', crc);
  let parsed: unknown;
  try {
    parsed = JSON.parse(utf8Decode(json));
  } catch (e) {
    throw new FormatError(`the overlay record's identity is not readable (${(e as Error).message})`, 'json');
  }
  const base = (parsed as { base?: unknown }).base;
  if (!isBaseIdentity(base)) throw new FormatError('the overlay record names no base image identity', 'base');
  return { version, storeOffset: storeSectors * 512, chunkSectors, base };
}

function isBaseIdentity(x: unknown): x is BaseIdentity {
  if (typeof x !== 'object' || x === null) return false;
  const b = x as Record<string, unknown>;
  return typeof b.source === 'string' && typeof b.size === 'number' && typeof b.tables === 'string' && typeof b.content === 'string' && Array.isArray(b.layers) &&
    b.layers.every((l) => typeof l === 'object' && l !== null && typeof (l as LayerIdentity).format === 'string' && typeof (l as LayerIdentity).size === 'number');
}

/** dm-snapshot's header chunk (16 bytes used): magic, valid, version, chunk size. */
export function parseStoreHeader(bytes: Uint8Array): StoreHeader {
  if (bytes.length < 16) throw new FormatError(`the snapshot store header is truncated (${bytes.length} bytes)`, 'store', bytes.length);
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  return { magic: v.getUint32(0, true), valid: v.getUint32(4, true), version: v.getUint32(8, true), chunkSectors: v.getUint32(12, true) };
}

/** What a persistent store holds: its exceptions (chunks written), and how full it is. */
export interface StoreUsage {
  exceptions: number;
  /** chunks in use: the header, the exception areas begun, the data chunks */
  usedChunks: number;
  /** chunks the store has room for */
  totalChunks: number;
  chunkBytes: number;
}

/**
 * Counts a persistent store's exceptions (dm-snap-persistent.c's layout: after the header
 * chunk, areas of one chunk of {old_chunk, new_chunk} pairs, 64-bit little-endian, each
 * followed by as many data chunks; the first pair with new_chunk 0 ends the list). `reader`
 * is the store itself (from its header on). A pair naming a chunk outside the store throws.
 */
export function storeUsage(reader: BlockReader, chunkSectors: number): StoreUsage {
  if (chunkSectors < 8 || chunkSectors > 2048 || (chunkSectors & (chunkSectors - 1)) !== 0) throw new FormatError(`the snapshot store's chunk size ${chunkSectors} sectors is not a power of two from 8 to 2048`, 'chunk', chunkSectors);
  const chunkBytes = chunkSectors * 512;
  const totalChunks = Math.floor(reader.size / chunkBytes);
  const perArea = chunkBytes / 16;
  let exceptions = 0;
  for (let area = 0; ; area++) {
    const at = 1 + area * (perArea + 1);
    if (at >= totalChunks) return { exceptions, usedChunks: 1 + area + exceptions, totalChunks, chunkBytes };
    const bytes = reader.read(at * chunkBytes, chunkBytes);
    const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    for (let i = 0; i < perArea; i++) {
      const newChunk = v.getBigUint64(i * 16 + 8, true);
      if (newChunk === 0n) return { exceptions, usedChunks: 1 + area + 1 + exceptions, totalChunks, chunkBytes };
      if (newChunk >= BigInt(totalChunks)) throw new FormatError(`the snapshot store's exception ${exceptions} names chunk ${newChunk}, past its ${totalChunks} chunks`, 'new_chunk', newChunk);
      exceptions++;
    }
  }
}

const hex = (b: Uint8Array): string => Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');

/** Details keys whose value a format changes when the image is written (vhdx.ts, vmdk.ts). */
const WRITE_IDS = ['data write guid', 'cid'];

/** A layer's write id (VHDX DataWriteGuid, VMDK CID) from its details; undefined for formats without one. */
export function layerWriteId(details: Record<string, string | number | boolean>): string | undefined {
  const w = WRITE_IDS.map((k) => details[k]).find((x) => x !== undefined);
  return w === undefined ? undefined : String(w);
}

/** The extents a map's tables are made from: where each lies in the virtual disk and in its file (or device). */
export interface MapLike {
  size: number;
  extents: readonly { kind: string; start: number; length: number; file?: number; offset?: number }[];
}

/** SHA-256 (hex, 32 digits) of a map: a new allocation or a moved extent anywhere changes it. */
export function mapHash(map: MapLike): string {
  const text = map.extents.map((e) => (e.kind === 'data' ? `${e.start}+${e.length}@${e.file}:${e.offset}` : `${e.start}+${e.length}:${e.kind}`)).join(',');
  return hex(sha256(utf8Encode(`${map.size};${text}`)).subarray(0, 16));
}

export interface IdentityInput {
  source: string;
  layers: { format: string; subformat: string; size: number; id?: string; details: Record<string, string | number | boolean> }[];
  map: ExtentMap;
  /** the virtual disk as the guest sees it */
  disk: BlockReader;
  /** byte offsets of the partitions inside the virtual disk */
  partitionStarts: readonly number[];
}

/** Bytes of the virtual disk sampled for the content hash: each place starts 64 KiB. */
const SAMPLE = 64 * 1024;

/**
 * What identifies an image: its layers' formats and identifiers, a hash of its map (a new
 * allocation anywhere changes it) and a hash of sampled bytes (the partition table and the
 * first 64 KiB of each partition, where filesystems keep their superblocks with mount
 * counts and write times). A raw image rewritten in place without mounting its filesystems
 * read-write keeps its identity: that is this check's limit.
 */
export function baseIdentity(input: IdentityInput): BaseIdentity {
  const layers = input.layers.map((l): LayerIdentity => {
    const out: LayerIdentity = { format: l.format, subformat: l.subformat, size: l.size };
    if (l.id !== undefined) out.id = l.id;
    const w = layerWriteId(l.details);
    if (w !== undefined) out.writeId = w;
    return out;
  });
  const tables = mapHash(input.map);
  const places = [0, ...input.partitionStarts].filter((s, i, a) => s < input.disk.size && a.indexOf(s) === i);
  const parts: Uint8Array[] = [];
  for (const start of places) parts.push(input.disk.read(start, Math.min(SAMPLE, input.disk.size - start)));
  const all = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { all.set(p, at); at += p.length; }
  const content = hex(sha256(all).subarray(0, 16));
  return { source: input.source, size: input.map.size, layers, tables, content };
}

/** How `now` differs from `recorded`, one phrase per difference; empty when it is the same image. */
export function identityDifferences(recorded: BaseIdentity, now: BaseIdentity): string[] {
  const out: string[] = [];
  if (recorded.size !== now.size) out.push(`its size is ${now.size} bytes, was ${recorded.size}`);
  const chain = (b: BaseIdentity) => b.layers.map((l) => `${l.format} ${l.subformat}`).join(' → ');
  if (chain(recorded) !== chain(now)) out.push(`it is ${chain(now)}, was ${chain(recorded)}`);
  else {
    recorded.layers.forEach((r, i) => {
      const n = now.layers[i]!;
      // (a VHDX's id is its DataWriteGuid: one change, said once)
      if (r.writeId !== n.writeId) out.push(`layer ${i + 1} was written since (${n.format === 'vhdx' ? 'DataWriteGuid' : 'write id'} ${n.writeId ?? 'none'}, was ${r.writeId ?? 'none'})`);
      else if (r.id !== n.id) out.push(`layer ${i + 1}'s id is ${n.id ?? 'none'}, was ${r.id ?? 'none'}`);
      if (r.size !== n.size) out.push(`layer ${i + 1}'s size is ${n.size}, was ${r.size}`);
    });
  }
  if (recorded.tables !== now.tables) out.push('its allocation tables changed');
  if (recorded.content !== now.content) out.push('its partition table or a filesystem superblock changed');
  if (recorded.source !== now.source) out.push(`it is ${now.source}, was ${recorded.source}`);
  return out;
}

/** What an overlay device holds before vdboot uses it. */
export type OverlayContent =
  | { kind: 'overlay'; record: OverlayRecord; store: StoreHeader }
  /** no record, no signature vdboot recognises */
  | { kind: 'blank' }
  /** something that must not be overwritten: `what` says what it is */
  | { kind: 'foreign'; what: string }
  /** vdboot's magic with a record that does not parse: `why` */
  | { kind: 'damaged'; why: string };

const isZeros = (b: Uint8Array): boolean => b.every((x) => x === 0);

/**
 * Reads the start of an overlay device: vdboot's record (with its store's header), a
 * device with a filesystem, a partition table, an image or another signature, or non-zero
 * bytes where an overlay is made (foreign), or zeros there (blank), or vdboot's magic over a record that does not parse (damaged).
 */
export function classifyOverlay(reader: BlockReader): OverlayContent {
  if (reader.size < OVERLAY_MIN_SIZE) throw new FormatError(`${reader.name} is ${reader.size} bytes; an overlay needs at least ${OVERLAY_MIN_SIZE / 1024 / 1024} MiB`, 'size', reader.size);
  const head = reader.read(0, OVERLAY_RECORD_SIZE);
  let record: OverlayRecord | null;
  try {
    record = parseOverlayRecord(head);
  } catch (e) {
    return { kind: 'damaged', why: (e as Error).message };
  }
  if (record) return { kind: 'overlay', record, store: parseStoreHeader(reader.read(record.storeOffset, 512)) };
  let fs: ReturnType<typeof probeFilesystem> = null;
  try { fs = probeFilesystem(reader); } catch { /* a damaged superblock still counts below */ }
  if (fs) return { kind: 'foreign', what: `a ${fs.usage === 'filesystem' ? 'filesystem' : 'signature'} of type ${fs.type}${fs.label ? `, LABEL=${fs.label}` : ''}${fs.uuid ? `, UUID=${fs.uuid}` : ''}` };
  try {
    const table = parsePartitionTable(reader);
    if (table.kind !== 'none') return { kind: 'foreign', what: `a${table.kind === 'mbr' ? 'n' : ''} ${table.kind.toUpperCase()} partition table with ${table.partitions.length} partition${table.partitions.length === 1 ? '' : 's'}` };
  } catch { /* not a partition table */ }
  if (parseStoreHeader(head).magic === SNAP_MAGIC) return { kind: 'foreign', what: 'a device-mapper snapshot store vdboot did not make' };
  const image = detectFormat(reader);
  if (image.format !== 'raw') return { kind: 'foreign', what: `a ${image.format.toUpperCase()} image` };
  const storeHead = reader.read(OVERLAY_STORE_OFFSET, STORE_HEAD_BYTES);
  if (parseStoreHeader(storeHead).magic === SNAP_MAGIC) return { kind: 'foreign', what: 'a device-mapper snapshot store without vdboot\'s record (its record was erased)' };
  // Where making an overlay writes (the record, the store's first chunk) must hold nothing:
  // data without a signature is still someone's data.
  if (!isZeros(head) || !isZeros(storeHead)) {
    return { kind: 'foreign', what: `data with no signature vdboot recognises (the bytes an overlay is made in, its first 4 KiB and the ${STORE_HEAD_BYTES / 1024} KiB at 1 MiB, are not all zeros)` };
  }
  return { kind: 'blank' };
}
