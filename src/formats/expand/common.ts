/**
 * Expanding a dynamic image in place (DESIGN §3): every block the image leaves
 * unallocated is allocated and zero-filled, and the format's tables are updated, so
 * that a read-write direct mapping never lands on a range that reads as zeros without
 * being stored. What the virtual disk reads is the same before and after.
 *
 * The expanders are pure: they read and write an ExpandFile (a file opened read-write
 * through the host filesystem's own driver at boot, a plain file in tests). Writes are
 * ordered for crash safety: zero-filled data first (appended where nothing points yet),
 * sync, then the metadata that points at it, sync. A crash at any point leaves an image
 * that reads the same as before.
 */
import { FormatError, type BlockReader, type BlockWriter } from '../block-reader.ts';

/** A file the expander may grow. `size` is the current size (it changes as data is appended). */
export interface ExpandFile extends BlockWriter {
  readonly size: number;
  /** fsync(2): everything written so far is on the disk */
  sync(): void;
  /** ftruncate(2) */
  truncate(size: number): void;
}

export interface ExpandOptions {
  /** called as zero-filled data is written: bytes done of the plan's `writeBytes` */
  progress?(done: number, total: number): void;
  /** stop after this phase, exactly as a crash there would (tests of crash safety) */
  stopAfter?: 'header' | 'data';
  /** `n` random bytes for new identifiers (VHDX FileWriteGuid); default Math.random */
  random?(n: number): Uint8Array;
  /** the virtual disk's data is about to change (a read-write boot follows): VHDX renews its DataWriteGuid */
  dataWillChange?: boolean;
}

export interface ExpansionPlan {
  format: 'vhd' | 'vdi' | 'vhdx' | 'vmdk';
  subformat: string;
  /** the file's name for messages */
  name: string;
  virtualSize: number;
  blockSize: number;
  /** absent blocks to allocate */
  blocks: number;
  /** allocated blocks with absent sectors (VHD sector bitmaps), zero-filled in place */
  partialBlocks: number;
  /** the file's size now and after expansion */
  fileSize: number;
  newFileSize: number;
  /** bytes of zero-filled data the expansion writes (the progress total) */
  writeBytes: number;
}

export interface ExpansionResult extends ExpansionPlan {
  /** the phase the expansion stopped after (stopAfter), or 'done' */
  reached: 'header' | 'data' | 'done';
}

/** A prepared expansion: the plan, and how to carry it out on the same file. */
export interface PreparedExpansion {
  plan: ExpansionPlan;
  run(file: ExpandFile, opts: ExpandOptions): ExpansionResult['reached'];
}

export const KiB = 1024;
export const MiB = 1024 * KiB;

/** What to do instead, for every refusal. */
export const EXPAND_REMEDIES =
  'boot with rd.vdisk.mode=snapshot (writes go to RAM and are lost at power-off) or rd.vdisk.mode=ro; ' +
  'or rd.vdisk.map=nbd with qemu-nbd in the initramfs ("vdboot mkinitramfs --with qemu-nbd --with ntfs-3g"), which allocates blocks through the format as they are written; ' +
  'or preallocate the image on another machine ("qemu-img convert -O vpc -o subformat=fixed", "qemu-img convert -O vhdx -o subformat=fixed", ' +
  '"qemu-img convert -O qcow2 -o preallocation=metadata", or raw)';

export function refuse(name: string, what: string, field: string, value?: string | number): never {
  throw new FormatError(`${name} cannot be expanded in place: ${what}. Instead: ${EXPAND_REMEDIES}.`, field, value);
}

/**
 * The data phase failed (no room, the file too large for the host, an I/O error): the
 * file was truncated back to its size before the expansion (and what the data phase
 * overwrote at the old end was put back), or that failed too (`rollbackError`). The data
 * phase writes only where the image's tables point nowhere yet, so either way the image
 * reads as before.
 */
export class DataPhaseFailed extends Error {
  constructor(
    /** what failed: the write's or the sync's error */
    readonly failure: unknown,
    /** the file's size before the expansion, which it was truncated back to */
    readonly fileSize: number,
    /** why the rollback failed, when it did */
    readonly rollbackError?: unknown,
  ) {
    super(`${failure instanceof Error ? failure.message : String(failure)}${rollbackError === undefined ? `; rolled back: the file was truncated to its former ${fileSize} bytes` : `; rolling it back to ${fileSize} bytes failed too (${rollbackError instanceof Error ? rollbackError.message : String(rollbackError)})`}`);
    this.name = 'DataPhaseFailed';
  }
}

export function isDataPhaseFailed(e: unknown): e is DataPhaseFailed {
  return e instanceof Error && e.name === 'DataPhaseFailed';
}

/**
 * Runs the data phase `write` and syncs it; if anything in it fails, truncates the file
 * back to `fileSize`, lets `restore` put back what the phase overwrote below that size
 * (VHD: its footer), syncs, and throws DataPhaseFailed. Only for phases that write where
 * nothing points yet.
 */
export function dataPhase(out: ExpandFile, fileSize: number, write: () => void, restore?: () => void): void {
  try {
    write();
    out.sync();
  } catch (e) {
    let rollbackError: unknown;
    try {
      out.truncate(fileSize);
      restore?.();
      out.sync();
    } catch (r) {
      rollbackError = r;
    }
    throw new DataPhaseFailed(e, fileSize, rollbackError);
  }
}

const ZEROS = new Uint8Array(MiB);

/** Counts written bytes for the progress callback. */
export class Progress {
  done = 0;
  constructor(private readonly total: number, private readonly cb: ExpandOptions['progress']) {}
  add(n: number): void {
    this.done += n;
    this.cb?.(this.done, this.total);
  }
}

/** Writes `length` zero bytes at `offset`, a MiB at a time. */
export function writeZeros(file: ExpandFile, offset: number, length: number, progress: Progress): void {
  let done = 0;
  while (done < length) {
    const n = Math.min(ZEROS.length, length - done);
    file.write(offset + done, n === ZEROS.length ? ZEROS : ZEROS.subarray(0, n));
    done += n;
    progress.add(n);
  }
}

export function randomBytes(n: number, opts: ExpandOptions): Uint8Array {
  if (opts.random) return opts.random(n);
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = Math.floor(Math.random() * 256);
  return b;
}

export function alignUp(v: number, to: number): number {
  return Math.ceil(v / to) * to;
}

/** Reads a table of `bytes` in slices so a large one never needs one big read from a slow host. */
export function readTable(file: BlockReader, offset: number, bytes: number): Uint8Array {
  const out = new Uint8Array(bytes);
  const slice = 4 * MiB;
  for (let at = 0; at < bytes; at += slice) out.set(file.read(offset + at, Math.min(slice, bytes - at)), at);
  return out;
}

/** Writes `table` back, only the 64 KiB pieces that differ from `old`. */
export function writeChanged(file: ExpandFile, offset: number, table: Uint8Array, old: Uint8Array): void {
  const piece = 64 * KiB;
  for (let at = 0; at < table.length; at += piece) {
    const end = Math.min(table.length, at + piece);
    let same = true;
    for (let i = at; i < end; i++) if (table[i] !== old[i]) { same = false; break; }
    if (!same) file.write(offset + at, table.subarray(at, end));
  }
}
