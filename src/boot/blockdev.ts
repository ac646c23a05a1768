/** Block devices and files at boot as BlockReaders, over the Sys port's pread. */
import type { BlockReader } from '../formats/block-reader.ts';
import { FormatError } from '../formats/block-reader.ts';
import { O, type Sys } from '../sys/sys.ts';

export interface OpenedReader extends BlockReader {
  close(): void;
}

/** Opens `path` read-only as a BlockReader of `size` bytes (from sysfs or the caller). */
export function openBlockReader(sys: Sys, path: string, size: number): OpenedReader {
  const fd = sys.open(path, O.RDONLY | O.CLOEXEC);
  let open = true;
  return {
    name: path,
    size,
    read: (offset: number, length: number): Uint8Array =>
      preadExact(sys, fd, path, size, offset, length, (at) => `short read at ${at} (device ended early?)`),
    prefetch(offset: number, length: number): void {
      if (open) willNeed(sys, fd, offset, Math.min(length, size - offset));
    },
    close(): void {
      if (open) {
        open = false;
        sys.close(fd);
      }
    },
  };
}

const FADV_WILLNEED = 3;
/** The kernel starts at most its readahead size (128 KiB by default) per WILLNEED call. */
const WILL_NEED_STEP = 128 << 10;
/** A hint is bounded: a caller cannot make the kernel read more than this ahead at once. */
const WILL_NEED_MAX = 16 << 20;

/** posix_fadvise(WILLNEED) over a range, where the native host has it; best effort. */
function willNeed(sys: Sys, fd: number, offset: number, length: number): void {
  const fadvise = (sys as { fadvise?: (fd: number, offset: number, length: number, advice: number) => void }).fadvise;
  if (typeof fadvise !== 'function' || !(length > 0) || !(offset >= 0)) return;
  try {
    const end = offset + Math.min(length, WILL_NEED_MAX);
    for (let o = offset; o < end; o += WILL_NEED_STEP) fadvise.call(sys, fd, o, Math.min(WILL_NEED_STEP, end - o), FADV_WILLNEED);
  } catch { /* only a hint */ }
}

/**
 * Exactly `length` bytes at `offset` of `fd` (a device or file of `size` bytes named `path`):
 * the range is checked against `size` first, and a read that comes back short before the end
 * is a FormatError saying `ended(at)`.
 */
export function preadExact(sys: Sys, fd: number, path: string, size: number, offset: number, length: number, ended: (at: number) => string): Uint8Array {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > size) {
    throw new FormatError(`${path}: read of ${length} bytes at ${offset} is past the end (${size} bytes)`, 'offset', offset);
  }
  const buf = new Uint8Array(length);
  let done = 0;
  while (done < length) {
    const n = sys.pread(fd, done === 0 ? buf : buf.subarray(done), offset + done);
    if (n <= 0) throw new FormatError(`${path}: ${ended(offset + done)}`, 'offset', offset + done);
    done += n;
  }
  return buf;
}

/**
 * Writes `writes` to `path` (a device or file) in order, each synced before the next, as
 * boot writes metadata (a VHDX's headers, an overlay's record, a resume record): a short
 * write is an error naming how much arrived. The caller says what failed for the console.
 */
export function writeSynced(sys: Sys, path: string, writes: readonly { offset: number; bytes: Uint8Array }[]): void {
  const fd = sys.open(path, O.RDWR | O.CLOEXEC);
  try {
    for (const w of writes) {
      const n = sys.pwrite(fd, w.bytes, w.offset);
      if (n !== w.bytes.length) throw new Error(`${n} of ${w.bytes.length} bytes written at ${w.offset}`);
      sys.fsync(fd);
    }
  } finally {
    sys.close(fd);
  }
}
