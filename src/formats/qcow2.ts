/**
 * QCOW2 (qemu copy-on-write v2 and v3) as LayerExtents.
 *
 * The active L1 table is the disk; internal snapshots are ignored except that their
 * tables count as metadata no data extent may point into. Unallocated clusters are
 * `parent` extents when the image names a backing file, else `zero` (unallocated).
 * Compressed clusters (zlib or zstd) are `unmappable`, readable with readUnmappable.
 * Refcounts are not needed to read the disk and are not read, but the layer reports
 * its metadata (header, L1/L2 tables, refcount table and blocks, snapshot table and
 * snapshot L1 tables) so the chain resolver refuses data extents that point into it.
 */
import { FormatError, type BlockReader } from './block-reader.ts';
import type { LayerMetadata, MetadataRange } from './extent-ops.ts';
import type { FormatReader, ImageFormat, ImageLayer, OpenContext, ParentRef } from './image.ts';
import type { LayerExtent } from './extent-map.ts';
import { inflateRaw, unzstd } from './inflate.ts';
import { utf8Decode } from './text.ts';

const MAGIC = 0x514649fb; // "QFI\xfb"

const INCOMPAT_DIRTY = 1;
const INCOMPAT_CORRUPT = 2;
const INCOMPAT_DATA_FILE = 4;
const INCOMPAT_COMPRESSION = 8;
const INCOMPAT_EXTL2 = 16;
const INCOMPAT_KNOWN = 31;
const AUTOCLEAR_DATA_FILE_RAW = 2;

const EXT_END = 0;
const EXT_BACKING_FORMAT = 0xe2792aca;
const EXT_FEATURE_TABLE = 0x6803f857;
const EXT_DATA_FILE = 0x44415441;
const EXT_CRYPTO = 0x0537be77;
const EXT_BITMAPS = 0x23852875;
const AUTOCLEAR_BITMAPS = 1;

/** Tables are read in pieces of at most this many bytes. */
const CHUNK = 1 << 20;

export interface Qcow2Header {
  version: number;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
}

export interface Qcow2Extensions {
  backingFormat?: string;
  dataFile?: string;
  featureNames: Map<string, string>;
  crypto: boolean;
  /** persistent dirty bitmaps: count and directory */
  bitmaps?: { count: number; directorySize: number; directoryOffset: number };
}

function fail(file: BlockReader, msg: string, field: string, value: string | number | bigint): never {
  throw new FormatError(`${file.name}: qcow2 ${msg}`, field, value);
}

function u64(dv: DataView, at: number, file: BlockReader, field: string): number {
  const v = dv.getBigUint64(at);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) fail(file, `header field ${field} = ${v} is too large`, field, v);
  return Number(v);
}

/** Parses the header at offset 0 (`bytes` holds at least the first 104 bytes, or 72 for v2). */
export function parseQcow2Header(bytes: Uint8Array, file: BlockReader): Qcow2Header {
  if (bytes.length < 72) fail(file, `header truncated (${bytes.length} bytes)`, 'header', bytes.length);
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (dv.getUint32(0) !== MAGIC) fail(file, 'magic is wrong: this is not a qcow2 image', 'magic', dv.getUint32(0));
  const version = dv.getUint32(4);
  if (version !== 2 && version !== 3) {
    fail(file, `version ${version} is not supported (vdboot reads qcow2 versions 2 and 3, and qcow version 1 as the format "qcow")`, 'version', version);
  }
  const h: Qcow2Header = {
    version,
    backingFileOffset: u64(dv, 8, file, 'backing_file_offset'),
    backingFileSize: dv.getUint32(16),
    clusterBits: dv.getUint32(20),
    size: u64(dv, 24, file, 'size'),
    cryptMethod: dv.getUint32(32),
    l1Size: dv.getUint32(36),
    l1TableOffset: u64(dv, 40, file, 'l1_table_offset'),
    refcountTableOffset: u64(dv, 48, file, 'refcount_table_offset'),
    refcountTableClusters: dv.getUint32(56),
    nbSnapshots: dv.getUint32(60),
    snapshotsOffset: u64(dv, 64, file, 'snapshots_offset'),
    incompatibleFeatures: 0n,
    compatibleFeatures: 0n,
    autoclearFeatures: 0n,
    refcountOrder: 4,
    headerLength: 72,
    compressionType: 0,
  };
  if (version === 3) {
    if (bytes.length < 104) fail(file, `v3 header truncated (${bytes.length} bytes)`, 'header', bytes.length);
    h.incompatibleFeatures = dv.getBigUint64(72);
    h.compatibleFeatures = dv.getBigUint64(80);
    h.autoclearFeatures = dv.getBigUint64(88);
    h.refcountOrder = dv.getUint32(96);
    h.headerLength = dv.getUint32(100);
    if (h.headerLength < 104 || h.headerLength % 8 !== 0) fail(file, `header_length ${h.headerLength} is invalid (must be a multiple of 8, at least 104)`, 'header_length', h.headerLength);
    if (h.headerLength > 104 && bytes.length > 104) h.compressionType = bytes[104]!;
  }
  if (h.clusterBits < 9 || h.clusterBits > 21) fail(file, `cluster_bits ${h.clusterBits} is out of range (9..21: 512 bytes to 2 MiB)`, 'cluster_bits', h.clusterBits);
  return h;
}

function parseExtensions(head: Uint8Array, h: Qcow2Header, clusterSize: number, file: BlockReader): Qcow2Extensions {
  const ext: Qcow2Extensions = { featureNames: new Map(), crypto: false };
  const end = Math.min(clusterSize, head.length);
  const dv = new DataView(head.buffer, head.byteOffset, head.byteLength);
  let p = h.headerLength;
  const seen = new Set<number>();
  while (p + 8 <= end) {
    const type = dv.getUint32(p);
    const len = dv.getUint32(p + 4);
    if (type === EXT_END) break;
    const data = p + 8;
    if (len > end - data) fail(file, `header extension 0x${type.toString(16)} at offset ${p} has length ${len}, past the first cluster`, 'header_extension.length', len);
    const body = head.subarray(data, data + len);
    if (seen.has(type) && type !== EXT_FEATURE_TABLE) fail(file, `header extension 0x${type.toString(16)} appears twice`, 'header_extension.type', type);
    seen.add(type);
    if (type === EXT_BACKING_FORMAT) ext.backingFormat = utf8Decode(body);
    else if (type === EXT_DATA_FILE) ext.dataFile = utf8Decode(body);
    else if (type === EXT_CRYPTO) ext.crypto = true;
    else if (type === EXT_BITMAPS && len >= 24) {
      const bv = new DataView(body.buffer, body.byteOffset, body.byteLength);
      const dirSize = bv.getBigUint64(8);
      const dirOffset = bv.getBigUint64(16);
      if (dirSize <= BigInt(Number.MAX_SAFE_INTEGER) && dirOffset <= BigInt(Number.MAX_SAFE_INTEGER)) {
        ext.bitmaps = { count: bv.getUint32(0), directorySize: Number(dirSize), directoryOffset: Number(dirOffset) };
      }
    }
    else if (type === EXT_FEATURE_TABLE) {
      for (let q = 0; q + 48 <= len; q += 48) {
        const kind = body[q]!;
        const bit = body[q + 1]!;
        let n = 2;
        while (n < 48 && body[q + n] !== 0) n++;
        ext.featureNames.set(`${kind}:${bit}`, utf8Decode(body.subarray(q + 2, q + n)));
      }
    }
    p = data + ((len + 7) & ~7);
  }
  return ext;
}

const BACKING_FORMATS: Record<string, ImageFormat> = {
  qcow: 'qcow', qcow2: 'qcow2', raw: 'raw', vmdk: 'vmdk', vdi: 'vdi', vpc: 'vhd', vhd: 'vhd', vhdx: 'vhdx',
};

const RUN_DATA = 1;
const RUN_ZEROED = 2;
const RUN_UNALLOCATED = 3;
const RUN_PARENT = 4;
const RUN_UNMAPPABLE = 5;

/**
 * Builds the extent list cluster by cluster, extending the pending run in place so a
 * million contiguous clusters cost no allocation each (this loop is the hot path on
 * QuickJS at boot).
 */
class ExtentRuns {
  readonly out: LayerExtent[] = [];
  private kind = 0;
  private start = 0;
  private length = 0;
  private offset = 0;

  constructor(private readonly file: number, private readonly reason: string) {}

  add(kind: number, start: number, length: number, offset = 0): void {
    if (kind === this.kind && start === this.start + this.length && (kind !== RUN_DATA || offset === this.offset + this.length)) {
      this.length += length;
      return;
    }
    this.flush();
    this.kind = kind;
    this.start = start;
    this.length = length;
    this.offset = offset;
  }

  finish(): LayerExtent[] {
    this.flush();
    this.kind = 0;
    return this.out;
  }

  private flush(): void {
    const { start, length } = this;
    switch (this.kind) {
      case RUN_DATA: this.out.push({ kind: 'data', start, length, file: this.file, offset: this.offset }); break;
      case RUN_ZEROED: this.out.push({ kind: 'zero', start, length, why: 'zeroed' }); break;
      case RUN_UNALLOCATED: this.out.push({ kind: 'zero', start, length, why: 'unallocated' }); break;
      case RUN_PARENT: this.out.push({ kind: 'parent', start, length }); break;
      case RUN_UNMAPPABLE: this.out.push({ kind: 'unmappable', start, length, reason: this.reason }); break;
    }
  }
}

interface CompressedCluster {
  /** host byte offset of the compressed data */
  offset: number;
  /** compressed byte length (whole sectors as the descriptor says; clipped to the file) */
  length: number;
}

export function probeQcow2(head: Uint8Array): boolean {
  return head.length >= 8 && head[0] === 0x51 && head[1] === 0x46 && head[2] === 0x49 && head[3] === 0xfb;
}

export function openQcow2(file: BlockReader, ctx: OpenContext): ImageLayer & LayerMetadata {
  const headLen = Math.min(file.size, 4096);
  if (headLen < 72) fail(file, `file is too small (${file.size} bytes) to hold a header`, 'file.size', file.size);
  let head = file.read(0, headLen);
  const h = parseQcow2Header(head, file);
  const cs = 2 ** h.clusterBits;
  if (cs > head.length && file.size > head.length) head = file.read(0, Math.min(cs, file.size));

  if (h.cryptMethod !== 0) {
    const how = h.cryptMethod === 1 ? 'AES-CBC (legacy qcow2 encryption)' : h.cryptMethod === 2 ? 'LUKS' : `method ${h.cryptMethod}`;
    fail(file, `image is encrypted (crypt_method ${h.cryptMethod}: ${how}); vdboot cannot map encrypted images: decrypt it first (qemu-img convert --object secret,... -O qcow2)`, 'crypt_method', h.cryptMethod);
  }
  const ext = parseExtensions(head, h, cs, file);
  if (ext.crypto) fail(file, 'image has a full-disk-encryption header extension; vdboot cannot map encrypted images', 'header_extension', EXT_CRYPTO);

  const incompat = h.incompatibleFeatures;
  const unknown = incompat & ~BigInt(INCOMPAT_KNOWN);
  if (unknown !== 0n) {
    const names: string[] = [];
    for (let bit = 0; bit < 64; bit++) {
      if ((unknown >> BigInt(bit)) & 1n) {
        const n = ext.featureNames.get(`0:${bit}`);
        names.push(n ? `bit ${bit} "${n}"` : `bit ${bit}`);
      }
    }
    fail(file, `image uses incompatible features vdboot does not know: ${names.join(', ')} (incompatible_features 0x${incompat.toString(16)}); convert it with qemu-img convert -O qcow2 -o compat=1.1`, 'incompatible_features', incompat);
  }
  if (incompat & BigInt(INCOMPAT_CORRUPT)) {
    fail(file, 'image is marked corrupt (incompatible feature bit 1): run "qemu-img check -r all" on it before booting', 'incompatible_features', incompat);
  }
  const dirty = (incompat & BigInt(INCOMPAT_DIRTY)) !== 0n;
  const extL2 = (incompat & BigInt(INCOMPAT_EXTL2)) !== 0n;
  const hasDataFile = (incompat & BigInt(INCOMPAT_DATA_FILE)) !== 0n;
  const dataFileRaw = hasDataFile && (h.autoclearFeatures & BigInt(AUTOCLEAR_DATA_FILE_RAW)) !== 0n;
  if ((incompat & BigInt(INCOMPAT_COMPRESSION)) === 0n && h.compressionType !== 0) {
    fail(file, `compression_type ${h.compressionType} is set without the compression-type feature bit`, 'compression_type', h.compressionType);
  }
  if (h.compressionType > 1) fail(file, `compression_type ${h.compressionType} is unknown (0 zlib, 1 zstd)`, 'compression_type', h.compressionType);
  if (h.version === 3 && (h.refcountOrder > 6)) fail(file, `refcount_order ${h.refcountOrder} is out of range (0..6)`, 'refcount_order', h.refcountOrder);
  if (h.version === 2 && h.headerLength > head.length) fail(file, 'header truncated', 'header', head.length);

  const metadata: MetadataRange[] = [];
  const meta = { add: (offset: number, length: number, what: string) => { if (length > 0) metadata.push({ file: 0, offset, length, what }); } };
  meta.add(0, cs, 'header cluster');

  // Backing file.
  let parent: ParentRef | undefined;
  let backingName: string | undefined;
  if (h.backingFileOffset !== 0) {
    if (h.backingFileSize === 0 || h.backingFileSize > 1023) fail(file, `backing_file_size ${h.backingFileSize} is out of range (1..1023)`, 'backing_file_size', h.backingFileSize);
    if (h.backingFileOffset + h.backingFileSize > file.size) fail(file, `backing file name at offset ${h.backingFileOffset} is past the end of the file (${file.size} bytes)`, 'backing_file_offset', h.backingFileOffset);
    backingName = utf8Decode(file.read(h.backingFileOffset, h.backingFileSize));
    meta.add(h.backingFileOffset, h.backingFileSize, 'backing file name');
    parent = { paths: parentCandidates(backingName) };
    if (ext.backingFormat !== undefined) {
      const f = BACKING_FORMATS[ext.backingFormat];
      if (!f) fail(file, `backing file "${backingName}" has format "${ext.backingFormat}", which vdboot cannot read`, 'backing_format', ext.backingFormat);
      parent.format = f;
    }
  }

  // External data file.
  let dataFile: BlockReader | undefined;
  const files = [ctx.path];
  if (hasDataFile) {
    if (ext.dataFile === undefined || ext.dataFile === '') {
      fail(file, 'image has an external data file (incompatible feature bit 2) but does not name it (no data file header extension)', 'header_extension', EXT_DATA_FILE);
    }
    dataFile = ctx.openFile(ext.dataFile);
    files.push(ext.dataFile);
  }

  const size = h.size;
  const entryBytes = extL2 ? 16 : 8;
  const l2Entries = cs / entryBytes;
  const l1Span = l2Entries * cs;
  const l1Needed = Math.ceil(size / l1Span);
  if (h.l1Size < l1Needed) fail(file, `L1 table has ${h.l1Size} entries, too few for a ${size}-byte disk (needs ${l1Needed})`, 'l1_size', h.l1Size);
  if (h.l1TableOffset % cs !== 0) fail(file, `l1_table_offset ${h.l1TableOffset} is not aligned to the cluster size ${cs}`, 'l1_table_offset', h.l1TableOffset);
  if (h.l1TableOffset + h.l1Size * 8 > file.size) {
    fail(file, `L1 table (${h.l1Size} entries at offset ${h.l1TableOffset}) is past the end of the file (${file.size} bytes)`, 'l1_size', h.l1Size);
  }
  meta.add(h.l1TableOffset, h.l1Size * 8, 'L1 table');

  // Refcount table and blocks (metadata only: their contents are not needed).
  if (h.refcountTableOffset % cs !== 0) fail(file, `refcount_table_offset ${h.refcountTableOffset} is not aligned to the cluster size`, 'refcount_table_offset', h.refcountTableOffset);
  const rtBytes = h.refcountTableClusters * cs;
  if (h.refcountTableOffset + rtBytes > file.size) {
    fail(file, `refcount table (${h.refcountTableClusters} clusters at offset ${h.refcountTableOffset}) is past the end of the file (${file.size} bytes)`, 'refcount_table_clusters', h.refcountTableClusters);
  }
  meta.add(h.refcountTableOffset, rtBytes, 'refcount table');
  forEachEntry(file, h.refcountTableOffset, rtBytes / 8, (hi, lo) => {
    const off = (hi & 0x00ffffff) * 2 ** 32 + ((lo & ~0x1ff) >>> 0);
    if (off !== 0) meta.add(off, cs, 'refcount block');
  });

  // Persistent dirty bitmaps: their directory, tables and data clusters.
  if (ext.bitmaps && (h.autoclearFeatures & BigInt(AUTOCLEAR_BITMAPS)) !== 0n) {
    addBitmapMetadata(file, ext.bitmaps, cs, meta.add);
  }

  // Snapshot table and snapshot L1 tables.
  if (h.nbSnapshots > 65536) fail(file, `nb_snapshots ${h.nbSnapshots} is more than qemu allows (65536)`, 'nb_snapshots', h.nbSnapshots);
  if (h.nbSnapshots > 0) {
    let p = h.snapshotsOffset;
    for (let i = 0; i < h.nbSnapshots; i++) {
      if (p + 40 > file.size) fail(file, `snapshot table entry ${i} at offset ${p} is past the end of the file`, 'snapshots_offset', h.snapshotsOffset);
      const e = file.read(p, 40);
      const dv = new DataView(e.buffer, e.byteOffset, 40);
      const l1Off = u64(dv, 0, file, `snapshot ${i} l1_table_offset`);
      const l1Size = dv.getUint32(8);
      const idLen = dv.getUint16(12);
      const nameLen = dv.getUint16(14);
      const extraLen = dv.getUint32(36);
      if (l1Off + l1Size * 8 > file.size) fail(file, `snapshot ${i} L1 table is past the end of the file`, 'snapshot.l1_size', l1Size);
      meta.add(l1Off, l1Size * 8, `snapshot ${i} L1 table`);
      const entryLen = 40 + extraLen + idLen + nameLen;
      const next = p + Math.ceil(entryLen / 8) * 8;
      meta.add(p, next - p, 'snapshot table');
      p = next;
    }
  }

  // The active L1/L2 tables.
  const walk = walkTables(file, dataFile, h, size, {
    extL2,
    unallocated: parent ? RUN_PARENT : RUN_UNALLOCATED,
    reason: h.compressionType === 1 ? 'zstd-compressed qcow2 cluster' : 'zlib-compressed qcow2 cluster',
  });
  for (const off of walk.l2Offsets) meta.add(off, cs, 'L2 table');
  const { extents, compressed, allocatedClusters, zeroClusters } = walk;
  const l2Tables = walk.l2Offsets.length;

  // A raw external data file holds every cluster at its guest offset.
  if (dataFileRaw) {
    for (const e of extents) {
      if (e.kind === 'data' && e.offset !== e.start) {
        fail(file, `guest offset ${e.start} maps to data file offset ${e.offset}, but the data file is marked raw (data_file_raw), where they must be equal`, 'l2_entry', e.offset);
      }
    }
  }

  const subformat = `v${h.version}`;
  const layer: ImageLayer & LayerMetadata = {
    format: 'qcow2',
    subformat,
    size,
    files,
    extents,
    metadata,
    details: {
      version: h.version,
      compat: h.version === 2 ? '0.10' : '1.1',
      clusterSize: cs,
      extendedL2: extL2,
      allocatedClusters,
      zeroClusters,
      compressedClusters: compressed.size,
      l2Tables,
      snapshots: h.nbSnapshots,
      dirty,
      compressionType: h.compressionType === 1 ? 'zstd' : 'zlib',
      ...(backingName !== undefined ? { backingFile: backingName } : {}),
      ...(ext.backingFormat !== undefined ? { backingFormat: ext.backingFormat } : {}),
      ...(dataFile ? { dataFile: ext.dataFile!, dataFileRaw } : {}),
    },
  };
  if (parent) layer.parent = parent;
  if (compressed.size > 0) layer.readUnmappable = compressedClusterReader(file, size, cs, compressed, (input, what) => (h.compressionType === 1 ? unzstd(input, cs, what) : inflateRaw(input, cs, what)));
  return layer;
}

interface TableWalk {
  extents: LayerExtent[];
  compressed: Map<number, CompressedCluster>;
  l2Offsets: number[];
  allocatedClusters: number;
  zeroClusters: number;
}

/**
 * Walks the active L1 table and its L2 tables into extents. The per-cluster path for
 * a run of data clusters allocates nothing (a million-cluster image maps in well under
 * a second on Node).
 */
function walkTables(
  file: BlockReader,
  dataFile: BlockReader | undefined,
  h: Qcow2Header,
  size: number,
  opts: { extL2: boolean; unallocated: number; reason: string },
): TableWalk {
  const cs = 2 ** h.clusterBits;
  const { extL2 } = opts;
  const entryBytes = extL2 ? 16 : 8;
  const l2Entries = cs / entryBytes;
  const l1Span = l2Entries * cs;
  const l1Needed = Math.ceil(size / l1Span);
  const host = dataFile ?? file;
  const hostSize = host.size;
  const hostIndex = dataFile ? 1 : 0;
  const hasDataFile = dataFile !== undefined;
  const sub = cs / 32;
  const alignMask = (cs - 1) & ~0x1ff;
  const csizeShift = 62 - (h.clusterBits - 8);
  const csizeMask = 2 ** (h.clusterBits - 8) - 1;
  const UNALLOCATED = opts.unallocated;
  const runs = new ExtentRuns(hostIndex, opts.reason);
  const compressed = new Map<number, CompressedCluster>();
  const l2Offsets: number[] = [];
  const seenL2 = new Set<number>();
  let allocatedClusters = 0;
  let zeroClusters = 0;
  // The pending run of whole data clusters, counted in clusters: a byte length past
  // 2^31 in a loop variable would be boxed on every iteration.
  let runStart = 0, runCount = 0, runOff = 0;

  const per = CHUNK / 8;
  for (let first = 0; first < l1Needed; first += per) {
    const count = Math.min(per, l1Needed - first);
    const l1 = file.read(h.l1TableOffset + first * 8, count * 8);
    const l1v = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
    for (let k = 0; k < count; k++) {
      const l1i = first + k;
      const base = l1i * l1Span;
      const span = Math.min(l1Span, size - base);
      const l2Off = (l1v.getUint32(k * 8) & 0x00ffffff) * 2 ** 32 + ((l1v.getUint32(k * 8 + 4) & ~0x1ff) >>> 0);
      if (l2Off === 0) {
        if (runCount > 0) { runs.add(RUN_DATA, runStart, runCount * cs, runOff); runCount = 0; }
        runs.add(UNALLOCATED, base, span);
        continue;
      }
      if ((l1v.getUint32(k * 8 + 4) & (cs - 1) & ~0x1ff) !== 0) fail(file, `L1 entry ${l1i} points to offset ${l2Off}, not aligned to the cluster size ${cs}`, 'l1_entry', l2Off);
      if (l2Off + cs > file.size) fail(file, `L1 entry ${l1i} points to an L2 table at offset ${l2Off}, past the end of the file (${file.size} bytes)`, 'l1_entry', l2Off);
      // A table used twice would let a small file describe an enormous disk (and is
      // corruption anyway): refuse it, which also bounds the work by the file size.
      if (seenL2.has(l2Off)) fail(file, `L1 entry ${l1i} points to the L2 table at offset ${l2Off}, which an earlier L1 entry already uses`, 'l1_entry', l2Off);
      seenL2.add(l2Off);
      l2Offsets.push(l2Off);
      const l2 = file.read(l2Off, cs);
      const dv = new DataView(l2.buffer, l2.byteOffset, l2.byteLength);
      const n = Math.ceil(span / cs);
      for (let j = 0; j < n; j++) {
        const start = base + j * cs;
        const len = Math.min(cs, size - start);
        const hi = dv.getUint32(j * entryBytes);
        const lo = dv.getUint32(j * entryBytes + 4);
        const off = (hi & 0x00ffffff) * 2 ** 32 + ((lo & ~0x1ff) >>> 0);
        if (!extL2 && (hi & 0x40000000) === 0 && (lo & 1) === 0 && (off !== 0 || (hasDataFile && hi & 0x80000000))) {
          // the common case: a normal data cluster
          // (alignment from the low word: `%` on offsets past 2^32 is slow)
          if ((lo & alignMask) !== 0) fail(file, `L2 entry for guest offset ${start} points to offset ${off}, not aligned to the cluster size ${cs}`, 'l2_entry', off);
          if (off + len > hostSize) fail(file, `guest offset ${start} maps to ${hasDataFile ? 'data file ' : ''}offset ${off}, past the end of ${host.name} (${hostSize} bytes)`, 'l2_entry', off);
          allocatedClusters++;
          if (runCount > 0 && start === runStart + runCount * cs && off === runOff + runCount * cs && len === cs) { runCount++; continue; }
          if (runCount > 0) { runs.add(RUN_DATA, runStart, runCount * cs, runOff); runCount = 0; }
          if (len === cs) { runStart = start; runCount = 1; runOff = off; } else runs.add(RUN_DATA, start, len, off);
          continue;
        }
        if (runCount > 0) { runs.add(RUN_DATA, runStart, runCount * cs, runOff); runCount = 0; }
        if (hi & 0x40000000) {
          if (hasDataFile) fail(file, `guest offset ${start} is a compressed cluster, which an image with an external data file cannot have`, 'l2_entry', start);
          const entry = (BigInt(hi) << 32n) | BigInt(lo);
          const coff = Number(entry & ((1n << BigInt(csizeShift)) - 1n));
          const sectors = Number((entry >> BigInt(csizeShift)) & BigInt(csizeMask)) + 1;
          const clen = sectors * 512 - (coff % 512);
          if (coff >= file.size) fail(file, `compressed cluster for guest offset ${start} is at offset ${coff}, past the end of the file (${file.size} bytes)`, 'l2_entry', coff);
          compressed.set(start / cs, { offset: coff, length: Math.min(clen, file.size - coff) });
          allocatedClusters++;
          runs.add(RUN_UNMAPPABLE, start, len);
          continue;
        }
        if (!extL2) {
          if (lo & 1) { zeroClusters++; runs.add(RUN_ZEROED, start, len); continue; }
          runs.add(UNALLOCATED, start, len);
          continue;
        }
        const zeroBits = dv.getUint32(j * entryBytes + 8);
        const allocBits = dv.getUint32(j * entryBytes + 12);
        if (zeroBits & allocBits) fail(file, `L2 entry for guest offset ${start} marks subclusters both allocated and zero (bitmap 0x${zeroBits.toString(16)}${allocBits.toString(16).padStart(8, '0')})`, 'l2_bitmap', zeroBits & allocBits);
        if (off === 0 && allocBits !== 0 && !(hasDataFile && hi & 0x80000000)) fail(file, `L2 entry for guest offset ${start} has allocated subclusters but no host cluster`, 'l2_bitmap', allocBits);
        if ((lo & alignMask) !== 0) fail(file, `L2 entry for guest offset ${start} points to offset ${off}, not aligned to the cluster size ${cs}`, 'l2_entry', off);
        if (allocBits !== 0) allocatedClusters++;
        for (let s = 0; s < 32; s++) {
          const sstart = start + s * sub;
          if (sstart >= size) break;
          const slen = Math.min(sub, size - sstart);
          if ((allocBits >>> s) & 1) {
            if (off + s * sub + slen > hostSize) fail(file, `guest offset ${sstart} maps to ${hasDataFile ? 'data file ' : ''}offset ${off + s * sub}, past the end of ${host.name} (${hostSize} bytes)`, 'l2_entry', off);
            runs.add(RUN_DATA, sstart, slen, off + s * sub);
          } else if ((zeroBits >>> s) & 1) runs.add(RUN_ZEROED, sstart, slen);
          else runs.add(UNALLOCATED, sstart, slen);
        }
      }
    }
  }
  if (runCount > 0) { runs.add(RUN_DATA, runStart, runCount * cs, runOff); runCount = 0; }
  return { extents: runs.finish(), compressed, l2Offsets, allocatedClusters, zeroClusters };
}

/** Adds the persistent bitmaps' directory, tables and data clusters to the metadata ranges. */
function addBitmapMetadata(
  file: BlockReader,
  b: { count: number; directorySize: number; directoryOffset: number },
  cs: number,
  add: (offset: number, length: number, what: string) => void,
): void {
  if (b.count > 65535 || b.directorySize > 64 * 1024 * 1024 || b.directoryOffset + b.directorySize > file.size) {
    fail(file, `bitmap directory (${b.count} bitmaps, ${b.directorySize} bytes at offset ${b.directoryOffset}) is invalid or past the end of the file`, 'bitmap_directory_offset', b.directoryOffset);
  }
  add(b.directoryOffset, b.directorySize, 'bitmap directory');
  const dir = file.read(b.directoryOffset, b.directorySize);
  const dv = new DataView(dir.buffer, dir.byteOffset, dir.byteLength);
  let p = 0;
  for (let i = 0; i < b.count; i++) {
    if (p + 24 > dir.length) fail(file, `bitmap directory entry ${i} is past the directory's ${dir.length} bytes`, 'bitmap_directory_size', b.directorySize);
    const tableOffset = u64(dv, p, file, `bitmap ${i} table offset`);
    const tableSize = dv.getUint32(p + 8);
    const nameSize = dv.getUint16(p + 18);
    const extraSize = dv.getUint32(p + 20);
    if (tableOffset + tableSize * 8 > file.size) fail(file, `bitmap ${i} table (${tableSize} entries at offset ${tableOffset}) is past the end of the file`, 'bitmap_table_offset', tableOffset);
    add(tableOffset, tableSize * 8, `bitmap ${i} table`);
    forEachEntry(file, tableOffset, tableSize, (hi, lo) => {
      const off = (hi & 0x00ffffff) * 2 ** 32 + ((lo & ~0x1ff) >>> 0);
      if (off !== 0) add(off, cs, `bitmap ${i} data`);
    });
    p += Math.ceil((24 + extraSize + nameSize) / 8) * 8;
  }
}

/** Calls fn(hi, lo, index) for `count` big-endian 64-bit entries at `offset`, reading in bounded chunks. */
function forEachEntry(file: BlockReader, offset: number, count: number, fn: (hi: number, lo: number, index: number) => void): void {
  const per = CHUNK / 8;
  for (let first = 0; first < count; first += per) {
    const n = Math.min(per, count - first);
    const bytes = file.read(offset + first * 8, n * 8);
    const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    for (let i = 0; i < n; i++) fn(dv.getUint32(i * 8), dv.getUint32(i * 8 + 4), first + i);
  }
}


/**
 * Where to look for a parent the image names: the name as written, then (for a path
 * written on another machine, e.g. `C:\\VMs\\base.vmdk` or `/var/lib/libvirt/images/base.qcow2`)
 * its last component next to the child.
 */
export function parentCandidates(name: string): string[] {
  const base = name.slice(Math.max(name.lastIndexOf('/'), name.lastIndexOf('\\')) + 1);
  const asWritten = /^[A-Za-z]:[\\/]/.test(name) || name.includes('\\') ? [] : [name];
  return base !== '' && base !== name ? [...asWritten, base] : [name];
}

export const qcow2Format: FormatReader = {
  format: 'qcow2',
  probe: (head) => probeQcow2(head),
  open: openQcow2,
};

/**
 * Reads of a layer's compressed clusters (qcow2 and qcow version 1): each cluster decoded
 * by `inflate` and padded to the cluster size, the last one decoded kept for the next read.
 */
export function compressedClusterReader(
  file: { name: string; read(offset: number, length: number): Uint8Array },
  size: number,
  cs: number,
  compressed: Map<number, { offset: number; length: number }>,
  inflate: (input: Uint8Array, what: string) => Uint8Array,
): (start: number, length: number) => Uint8Array {
  let cachedIndex = -1;
  let cached: Uint8Array | undefined;
  const decode = (index: number): Uint8Array => {
    if (index === cachedIndex && cached) return cached;
    const c = compressed.get(index);
    if (!c) throw new FormatError(`${file.name}: guest offset ${index * cs} is not a compressed cluster`, 'offset', index * cs);
    const what = `${file.name}: compressed cluster at guest offset ${index * cs}`;
    let out = inflate(file.read(c.offset, c.length), what);
    if (out.length < cs) { const full = new Uint8Array(cs); full.set(out); out = full; }
    cachedIndex = index;
    cached = out;
    return out;
  };
  return (start: number, length: number): Uint8Array => {
    if (!Number.isSafeInteger(start) || !Number.isSafeInteger(length) || start < 0 || length < 0 || start + length > size) {
      throw new FormatError(`${file.name}: read of ${length} bytes at ${start} is outside the ${size}-byte disk`, 'offset', start);
    }
    const out = new Uint8Array(length);
    let p = start;
    while (p < start + length) {
      const index = Math.floor(p / cs);
      const within = p - index * cs;
      const n = Math.min(cs - within, start + length - p);
      out.set(decode(index).subarray(within, within + n), p - start);
      p += n;
    }
    return out;
  };
}
