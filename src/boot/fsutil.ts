/** Small file helpers over the Sys port. */
import { utf8Decode, utf8Encode } from '../formats/text.ts';
import { isSysError, O, S, type Sys } from '../sys/sys.ts';

/** Reads a whole file (sysfs and procfs files report no size: read until end of file). */
export function readFileBytes(sys: Sys, path: string, limit = 64 << 20): Uint8Array {
  const fd = sys.open(path, O.RDONLY | O.CLOEXEC);
  try {
    const chunks: Uint8Array[] = [];
    let total = 0;
    for (;;) {
      const buf = new Uint8Array(65536);
      const n = sys.read(fd, buf);
      if (n <= 0) break;
      chunks.push(buf.subarray(0, n));
      total += n;
      if (total > limit) throw new Error(`${path} is larger than ${limit} bytes`);
    }
    const out = new Uint8Array(total);
    let off = 0;
    for (const c of chunks) { out.set(c, off); off += c.length; }
    return out;
  } finally {
    sys.close(fd);
  }
}

/** A Sys that decodes text in native code (the static host); others decode in JavaScript. */
interface DecodingSys extends Sys {
  utf8Decode(bytes: Uint8Array): string;
}

export function readText(sys: Sys, path: string): string {
  const bytes = readFileBytes(sys, path);
  return typeof (sys as Partial<DecodingSys>).utf8Decode === 'function' ? (sys as DecodingSys).utf8Decode(bytes) : utf8Decode(bytes);
}

/** The file's text trimmed, or undefined when it does not exist or cannot be read. */
export function readTextOr(sys: Sys, path: string): string | undefined {
  try {
    return readText(sys, path).trim();
  } catch {
    return undefined;
  }
}

export function writeText(sys: Sys, path: string, text: string, mode = 0o644): void {
  const fd = sys.open(path, O.WRONLY | O.CREAT | O.TRUNC | O.CLOEXEC, mode);
  try {
    const bytes = utf8Encode(text);
    let off = 0;
    while (off < bytes.length) off += sys.write(fd, bytes.subarray(off));
  } finally {
    sys.close(fd);
  }
}

export function exists(sys: Sys, path: string): boolean {
  try {
    sys.stat(path);
    return true;
  } catch {
    return false;
  }
}

export function isDirectory(sys: Sys, path: string): boolean {
  try {
    return (sys.stat(path).mode & S.IFMT) === S.IFDIR;
  } catch {
    return false;
  }
}

/** mkdir -p; existing directories are fine. */
export function mkdirs(sys: Sys, path: string, mode = 0o755): void {
  let cur = '';
  for (const part of path.split('/').filter(Boolean)) {
    cur += `/${part}`;
    try {
      sys.mkdir(cur, mode);
    } catch (e) {
      if (!isSysError(e, 'EEXIST')) throw e;
    }
  }
}

export function dirname(path: string): string {
  const i = path.lastIndexOf('/');
  return i <= 0 ? '/' : path.slice(0, i);
}

export function basename(path: string): string {
  return path.slice(path.lastIndexOf('/') + 1);
}
