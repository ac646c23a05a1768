/**
 * How format code reads bytes: a synchronous, engine-neutral interface. On the host it
 * wraps a Node file descriptor; at boot it wraps `Sys.pread` on a block device or on a
 * file's extents read straight from a host partition; in tests it wraps a Uint8Array.
 */
export interface BlockReader {
  /** A name for messages: the image path, "/dev/vda2", … */
  readonly name: string;
  /** Size in bytes. */
  readonly size: number;
  /**
   * Reads exactly `length` bytes at `offset`. Reading past `size` is an error
   * (FormatError "truncated"), never a short read.
   */
  read(offset: number, length: number): Uint8Array;
  /**
   * Optional: reads exactly `into.length` bytes at `offset` straight into `into`, saving the
   * copy `read` would need (streaming a whole disk). Same bounds rules as `read`.
   */
  readInto?(offset: number, into: Uint8Array): void;
  /**
   * Optional, a hint: the bytes [offset, offset + length) will be read next, so the disk may
   * start on them while the caller works on what it has (the NTFS ownership pass). Never an
   * error, never waits.
   */
  prefetch?(offset: number, length: number): void;
}

/** Something a format can also write through (image expansion, mkdisk). */
export interface BlockWriter extends BlockReader {
  write(offset: number, bytes: Uint8Array): void;
}

/**
 * A typed error for untrusted input. `field` names the structure and field,
 * `value` the value that made it fail; the message is written for the person at the
 * console: what failed, the value, what to try.
 */
export class FormatError extends Error {
  constructor(
    message: string,
    readonly field?: string,
    readonly value?: string | number | bigint,
  ) {
    super(message);
    this.name = 'FormatError';
  }
}

export function isFormatError(e: unknown): e is FormatError {
  return typeof e === 'object' && e !== null && (e as { name?: unknown }).name === 'FormatError';
}

export function bytesReader(name: string, bytes: Uint8Array): BlockReader {
  return {
    name,
    size: bytes.length,
    read(offset: number, length: number): Uint8Array {
      if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > bytes.length) {
        throw new FormatError(`${name}: read of ${length} bytes at offset ${offset} is past the end (${bytes.length} bytes): the file is truncated`, 'offset', offset);
      }
      return bytes.subarray(offset, offset + length);
    },
  };
}
