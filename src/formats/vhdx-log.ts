/**
 * The VHDX log (MS-VHDX §2.3): a circular buffer of 4 KiB sectors in which Hyper-V writes
 * metadata updates (BAT, metadata region, sector bitmaps) before it writes them in place.
 * A header whose LogGuid is not zero says the log may hold updates that never reached their
 * places (the host crashed, or the VM was cut off): they must be replayed before the BAT and
 * the metadata can be trusted, even to read.
 *
 * Log entry (little-endian, 4 KiB aligned in the log):
 *   header  0 "loge", 4 checksum (CRC-32C of the whole entry, this field zero), 8 entry length,
 *           12 tail (log offset of the oldest entry still needed), 16 sequence number (u64),
 *           24 descriptor count, 32 log GUID, 48 flushed file offset, 56 last file offset
 *   descriptors, 32 bytes each from byte 64 of the entry (126 in the first sector, 128 in each
 *           further one): "desc" (4 trailing bytes, 8 leading bytes, file offset, sequence) or
 *           "zero" (length, file offset, sequence)
 *   data sectors, one per "desc" in order: "data", sequence high, 4084 bytes, sequence low;
 *           the 4 KiB written = leading 8 bytes + the 4084 + trailing 4 bytes
 *
 * The active sequence ends at the valid entry with the highest sequence number (the head)
 * and starts at the entry its tail names; every entry from tail to head must be valid, with
 * sequence numbers one apart. Replaying it writes every descriptor, in order, at its file
 * offset; then the headers' LogGuid becomes zero.
 */
import { FormatError, type BlockReader } from './block-reader.ts';
import { crc32c } from './crc.ts';

const KiB = 1024;
const MiB = 1024 * KiB;
const SECTOR = 4 * KiB;
/** The replay is kept in memory (and written at boot): bounded, far above what Hyper-V logs. */
const MAX_REPLAY_BYTES = 256 * MiB;
/** Hyper-V and qemu make 1 MiB logs; a larger one is read whole into memory, so it is bounded. */
export const MAX_LOG_BYTES = 32 * MiB;
/** Entries are checksummed at most this many times the log's size in all (a crafted log cannot make the search quadratic). */
const CHECKSUM_BUDGET = 4;

export interface LogWrite {
  /** file offset */
  offset: number;
  /** 4 KiB of data, or zeros of `length` */
  bytes?: Uint8Array;
  length: number;
}

export interface VhdxLogReplay {
  /** entries in the active sequence; 0 when the log holds none (nothing to replay) */
  entries: number;
  /** sequence numbers of the first and last entry replayed */
  first?: bigint;
  last?: bigint;
  /** the writes, in the order they must reach the file */
  writes: LogWrite[];
}

interface Entry {
  at: number;
  length: number;
  tail: number;
  sequence: bigint;
  flushedFileOffset: number;
  lastFileOffset: number;
  writes: LogWrite[];
}

function u64(dv: DataView, at: number): bigint {
  return dv.getBigUint64(at, true);
}

function safeNumber(v: bigint, name: string, field: string): number {
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new FormatError(`${name}: VHDX log ${field} ${v} is too large`, `log.${field}`, v.toString());
  return Number(v);
}

function sig(b: Uint8Array, at: number): string {
  return String.fromCharCode(b[at]!, b[at + 1]!, b[at + 2]!, b[at + 3]!);
}

/**
 * Reads the log region [logOffset, logOffset + logLength) of `file` and returns the writes
 * of its active sequence. `logGuid` is the current header's raw 16 bytes: entries of another
 * log are not this one's. Throws FormatError when the log is damaged in a way a replay
 * cannot be trusted through (a broken sequence, writes outside the file or into its headers).
 */
export function readVhdxLog(file: BlockReader, logOffset: number, logLength: number, logGuid: Uint8Array, name: string): VhdxLogReplay {
  if (logLength === 0) return { entries: 0, writes: [] }; // no log to hold entries (qemu reads it so too)
  if (logLength > MAX_LOG_BYTES) {
    throw new FormatError(
      `${name}: its VHDX log is ${logLength} bytes, more than the ${MAX_LOG_BYTES / MiB} MiB vdboot replays (Hyper-V makes 1 MiB logs); open it once in Hyper-V, or run "qemu-img check -r all" on a copy`,
      'header.log_length', logLength,
    );
  }
  if (logOffset < MiB || logOffset % MiB !== 0 || logLength === 0 || logLength % MiB !== 0 || logOffset + logLength > file.size) {
    throw new FormatError(`${name}: the VHDX log (${logLength} bytes at ${logOffset}) is misaligned or outside the ${file.size}-byte file`, 'header.log_offset', logOffset);
  }
  const log = file.read(logOffset, logLength);
  const sectorAt = (off: number): Uint8Array => {
    const o = off % logLength;
    return log.subarray(o, o + SECTOR);
  };
  const guidMatches = (s: Uint8Array): boolean => {
    for (let i = 0; i < 16; i++) if (s[32 + i] !== logGuid[i]) return false;
    return true;
  };

  let checksummed = 0;
  const seen = new Map<number, Entry | undefined>();
  /** The entry at log offset `at`, fully checked, or undefined when none is there (each place looked at once). */
  const entryAt = (at: number): Entry | undefined => {
    if (!seen.has(at)) seen.set(at, readEntry(at));
    return seen.get(at);
  };
  const readEntry = (at: number): Entry | undefined => {
    const h = sectorAt(at);
    if (sig(h, 0) !== 'loge' || !guidMatches(h)) return undefined;
    const dv = new DataView(h.buffer, h.byteOffset, SECTOR);
    const length = dv.getUint32(8, true);
    const tail = dv.getUint32(12, true);
    const sequence = u64(dv, 16);
    const count = dv.getUint32(24, true);
    if (length === 0 || length % SECTOR !== 0 || length > logLength || tail % SECTOR !== 0 || tail >= logLength || sequence === 0n) return undefined;
    const descSectors = Math.ceil((count + 2) / 128);
    if (descSectors * SECTOR > length) return undefined;
    let dataCount = 0;
    for (let i = 0; i < count; i++) {
      const d = 64 + i * 32;
      if (sig(sectorAt(at + Math.floor(d / SECTOR) * SECTOR), d % SECTOR) === 'desc') dataCount++;
    }
    if ((descSectors + dataCount) * SECTOR > length) return undefined;
    // every data sector says so, with the entry's sequence number, before anything is checksummed
    // (the descriptors below take them in this order)
    for (let k = 0; k < dataCount; k++) {
      const ds = sectorAt(at + (descSectors + k) * SECTOR);
      const dsv = new DataView(ds.buffer, ds.byteOffset, SECTOR);
      if (sig(ds, 0) !== 'data' || ((BigInt(dsv.getUint32(4, true)) << 32n) | BigInt(dsv.getUint32(4092, true))) !== sequence) return undefined;
    }
    checksummed += length;
    if (checksummed > CHECKSUM_BUDGET * logLength) {
      throw new FormatError(`${name}: the VHDX log holds more overlapping would-be entries than a log can; it is damaged. Open the image once in Hyper-V, or run "qemu-img check -r all" on a copy`, 'log', checksummed);
    }
    // the checksum covers the whole entry, its own field taken as zero
    const whole = new Uint8Array(length);
    for (let s = 0; s < length; s += SECTOR) whole.set(sectorAt(at + s), s);
    const stored = dv.getUint32(4, true);
    whole.fill(0, 4, 8);
    if (crc32c(whole) !== stored) return undefined;
    const wv = new DataView(whole.buffer);
    const writes: LogWrite[] = [];
    let data = descSectors;
    for (let i = 0; i < count; i++) {
      const d = 64 + i * 32;
      const kind = sig(whole, d);
      const offset = safeNumber(u64(wv, d + 16), name, 'descriptor.file_offset');
      if (u64(wv, d + 24) !== sequence || offset % SECTOR !== 0) return undefined;
      if (kind === 'zero') {
        const zl = safeNumber(u64(wv, d + 8), name, 'descriptor.zero_length');
        if (zl % SECTOR !== 0) return undefined;
        writes.push({ offset, length: zl });
      } else if (kind === 'desc') {
        const ds = whole.subarray(data * SECTOR, (data + 1) * SECTOR);
        const bytes = new Uint8Array(SECTOR);
        bytes.set(whole.subarray(d + 8, d + 16), 0);
        bytes.set(ds.subarray(8, 4092), 8);
        bytes.set(whole.subarray(d + 4, d + 8), 4092);
        writes.push({ offset, bytes, length: SECTOR });
        data++;
      } else {
        return undefined;
      }
    }
    return {
      at, length, tail, sequence, writes,
      flushedFileOffset: safeNumber(u64(dv, 48), name, 'flushed_file_offset'),
      lastFileOffset: safeNumber(u64(dv, 56), name, 'last_file_offset'),
    };
  };

  // The head: the valid entry with the highest sequence number anywhere in the log.
  let head: Entry | undefined;
  for (let at = 0; at < logLength; at += SECTOR) {
    if (sig(log, at) !== 'loge') continue;
    const e = entryAt(at);
    if (e && (!head || e.sequence > head.sequence)) head = e;
  }
  if (!head) return { entries: 0, writes: [] };

  // From the head's tail to the head, every entry valid and one sequence number apart.
  const sequence: Entry[] = [];
  let at = head.tail;
  for (let guard = 0; ; guard++) {
    const e = entryAt(at);
    const expected = sequence.length ? sequence[sequence.length - 1]!.sequence + 1n : undefined;
    if (!e || (expected !== undefined && e.sequence !== expected) || guard > logLength / SECTOR) {
      throw new FormatError(
        `${name}: the VHDX log's active sequence is broken (entry ${head.sequence} names its tail at log offset ${head.tail}, but the entry at ${at} ${e ? `has sequence number ${e.sequence}` : 'is not a valid log entry'}); ` +
          'vdboot will not guess which updates to replay. Open the image once in Hyper-V (or mount it in Windows), or run "qemu-img check -r all" on a copy',
        'log.tail', head.tail,
      );
    }
    sequence.push(e);
    if (e.at === head.at) break;
    at = (e.at + e.length) % logLength;
  }

  const writes: LogWrite[] = [];
  let total = 0;
  for (const e of sequence) {
    if (e.flushedFileOffset > file.size) {
      throw new FormatError(`${name}: the VHDX log says the file was at least ${e.flushedFileOffset} bytes long, but it is ${file.size}: it was truncated or damaged`, 'log.flushed_file_offset', e.flushedFileOffset);
    }
    if (e.lastFileOffset > file.size) {
      throw new FormatError(
        `${name}: the VHDX log's last entry expects the file to be ${e.lastFileOffset} bytes long, but it is ${file.size} (its growth was lost); ` +
          'open the image once in Hyper-V or run "qemu-img check -r all" on a copy',
        'log.last_file_offset', e.lastFileOffset,
      );
    }
    for (const w of e.writes) {
      const end = w.offset + w.length;
      // Never into the headers (64–192 KiB: the log does not update them) or the log itself, never past the file.
      const intoHeaders = w.offset < 192 * KiB && end > 64 * KiB;
      const intoLog = w.offset < logOffset + logLength && end > logOffset;
      if (w.offset < 64 * KiB || intoHeaders || intoLog || end > file.size) {
        throw new FormatError(
          `${name}: the VHDX log (entry ${e.sequence}) writes ${w.length} bytes at file offset ${w.offset}, ${end > file.size ? `past the end of the ${file.size}-byte file` : intoLog ? 'into the log itself' : 'into the file headers'}; the log is damaged`,
          'log.descriptor.file_offset', w.offset,
        );
      }
      total += w.length;
      if (total > MAX_REPLAY_BYTES) throw new FormatError(`${name}: the VHDX log would replay more than ${MAX_REPLAY_BYTES / MiB} MiB; vdboot does not replay logs that large`, 'log', total);
      writes.push(w);
    }
  }
  return { entries: sequence.length, first: sequence[0]!.sequence, last: head.sequence, writes };
}

/** `file` as it reads after the replay: the log's writes laid over it, later ones over earlier. */
export function replayedReader(file: BlockReader, writes: readonly LogWrite[]): BlockReader {
  if (!writes.length) return file;
  return {
    name: file.name,
    size: file.size,
    read(offset: number, length: number): Uint8Array {
      const out = file.read(offset, length).slice();
      const end = offset + length;
      for (const w of writes) {
        const a = Math.max(offset, w.offset);
        const z = Math.min(end, w.offset + w.length);
        if (a >= z) continue;
        if (w.bytes) out.set(w.bytes.subarray(a - w.offset, z - w.offset), a - offset);
        else out.fill(0, a - offset, z - offset);
      }
      return out;
    },
  };
}

/** The writes as bytes (zero ranges filled), for writing them to a device or file. */
export function logWriteBytes(w: LogWrite): Uint8Array {
  return w.bytes ?? new Uint8Array(w.length);
}
