/**
 * A BlockReader over a host file, for the CLI and tests (Node only).
 *
 *   openFileReader(path: string): FileReader       read-only; reads are exact (no short reads)
 *   nodeChainHost(opts?): ChainHost & { close(): void }  opens files for openImage and closes them all;
 *       opts.allowOutside lets an image name files outside its folder (--allow-outside)
 */
import * as fs from 'node:fs';
import { FormatError, type BlockReader } from '../formats/block-reader.ts';
import type { ChainHost } from '../formats/chain.ts';

export interface FileReader extends BlockReader {
  readonly fd: number;
  close(): void;
}

export function openFileReader(path: string): FileReader {
  const fd = fs.openSync(path, 'r');
  let size: number;
  try {
    const st = fs.fstatSync(fd);
    if (st.isDirectory()) throw new FormatError(`${path} is a directory, not an image file`, 'path', path);
    size = st.isBlockDevice() ? blockDeviceSize(fd) : st.size;
  } catch (e) {
    fs.closeSync(fd);
    throw e;
  }
  const readInto = (offset: number, out: Uint8Array): void => {
    const length = out.length;
    if (!Number.isSafeInteger(offset) || offset < 0 || offset + length > size) {
      throw new FormatError(`${path}: read of ${length} bytes at offset ${offset} is past the end (${size} bytes): the file is truncated`, 'offset', offset);
    }
    let done = 0;
    while (done < length) {
      const n = fs.readSync(fd, out, done, length - done, offset + done);
      if (n <= 0) throw new FormatError(`${path}: the file ended at ${offset + done} while reading (it shrank?)`, 'offset', offset + done);
      done += n;
    }
  };
  return {
    name: path,
    size,
    fd,
    read(offset: number, length: number): Uint8Array {
      const out = new Uint8Array(length);
      readInto(offset, out);
      return out;
    },
    readInto,
    close() {
      fs.closeSync(fd);
    },
  };
}

function blockDeviceSize(fd: number): number {
  // Seek-free size of a block device: the position reads report at the end.
  let lo = 0;
  let hi = 1;
  const b = new Uint8Array(1);
  while (fs.readSync(fd, b, 0, 1, hi * 512 - 1) === 1) { lo = hi; hi *= 2; }
  while (hi - lo > 1) {
    const mid = Math.floor((lo + hi) / 2);
    if (fs.readSync(fd, b, 0, 1, mid * 512 - 1) === 1) lo = mid; else hi = mid;
  }
  return lo * 512;
}

export function nodeChainHost(opts: { allowOutside?: boolean } = {}): ChainHost & { close(): void } {
  const opened: FileReader[] = [];
  return {
    ...(opts.allowOutside ? { allowOutside: true } : {}),
    openFile(path: string) {
      const r = openFileReader(path);
      opened.push(r);
      return r;
    },
    listDir(dir: string) {
      return fs.readdirSync(dir);
    },
    fileId(path: string) {
      const st = fs.statSync(path);
      return `${st.dev}:${st.ino}`;
    },
    fileKind(path: string) {
      const st = fs.statSync(path);
      return st.isFile() ? 'file' : st.isBlockDevice() || st.isCharacterDevice() ? 'device' : 'other';
    },
    realPath(path: string) {
      return fs.realpathSync(path);
    },
    close() {
      for (const r of opened.splice(0)) {
        try { r.close(); } catch { /* already closed */ }
      }
    },
  };
}
