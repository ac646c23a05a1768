/**
 * The decompressed byte stream of a root archive at boot.
 *
 * Which decoder: gzip, xz, bzip2 and lzma go through busybox's applets (C, in the
 * initramfs anyway); zstd and lz4 through the `zstd`/`lz4` programs when the initramfs
 * has them, else through decoders written in TypeScript (lz4 is fast enough that way;
 * zstd in QuickJS is several times slower than the C program). An uncompressed archive
 * is read straight.
 *
 * How an external decoder gets its input: a file on a host the kernel mounted is its
 * stdin directly; a file vdboot reads from the partition's sectors itself (NTFS, exFAT,
 * FAT) is pumped into a pipe by a forked copy of vdboot. Output comes back through a pipe.
 * Nothing here writes to the host.
 */
import { type ByteSource } from '../formats/archive-stream.ts';
import { type Compression, jsDecoderSource } from '../formats/archive.ts';
import { FormatError, type BlockReader } from '../formats/block-reader.ts';
import { isSysError, O, type Sys } from '../sys/sys.ts';
import { exists, readTextOr } from './fsutil.ts';
import { INIT_ENV } from './switchroot.ts';

/** The static host's process and transfer calls beyond the Sys port (QuickjsSys has them). */
interface ProcessSys extends Sys {
  fork?(): number;
  _exit?(code: number): never;
  pipe?(): [number, number];
  sendfile?(outFd: number, inFd: number, offset: number, count: number): number;
  splice?(inFd: number, inOffset: number, outFd: number, outOffset: number, count: number, flags?: number): number;
  fcntl?(fd: number, cmd: number, arg: number): number;
  fadvise?(fd: number, offset: number, length: number, advice: number): void;
}

export interface ArchiveStream {
  source: ByteSource;
  /** how it is decoded, for the console: "busybox gunzip", "zstd (in vdboot)" … */
  how: string;
  /** Bytes of the (compressed) archive file consumed so far, when known. */
  consumed(): number | undefined;
  /** After the archive's end: drains the stream, reaps helpers; throws if a decoder failed. */
  finish(): void;
  /** On failure: stops and reaps helpers (best effort). */
  abort(): void;
}

const READ_CHUNK = 1 << 20;
/** fcntl's F_SETPIPE_SZ, and the decoder pipe's size (the kernel's default limit for it). */
const F_SETPIPE_SZ = 1031;
/**
 * How far ahead of the reader the archive file is asked into the page cache
 * (POSIX_FADV_WILLNEED): the disk works while vdboot creates files, instead of each read
 * waiting for it. A window, not the whole file: an archive larger than RAM must not
 * evict its own next pages. The kernel reads at most its readahead size per call (128 KiB
 * by default), so the window is asked for in steps of that size.
 */
const READ_AHEAD = 8 << 20;
const READ_AHEAD_STEP = 128 << 10;
const FADV_WILLNEED = 3;

/** Asks the kernel to read [offset, offset + READ_AHEAD) of `fd` ahead, without waiting (best effort). */
function readAhead(sys: ProcessSys, fd: number, offset: number): void {
  if (typeof sys.fadvise !== 'function') return;
  try {
    for (let o = offset; o < offset + READ_AHEAD; o += READ_AHEAD_STEP) sys.fadvise(fd, o, READ_AHEAD_STEP, FADV_WILLNEED);
  } catch { /* only a hint */ }
}
const PIPE_SIZE = 1 << 20;

/** Reads a BlockReader sequentially in chunks. */
function readerSource(reader: BlockReader, counter: { at: number }): ByteSource {
  return {
    pull(): Uint8Array | null {
      if (counter.at >= reader.size) return null;
      const n = Math.min(READ_CHUNK, reader.size - counter.at);
      const b = reader.read(counter.at, n);
      counter.at += n;
      return b;
    },
  };
}

/**
 * How much of an uncompressed archive file is read into memory at a time. Headers and
 * the bodies of small files come through this buffer; what is left of a larger body
 * after it goes from the archive file into the new file with sendfile, copied once
 * inside the kernel instead of read into memory and written out again.
 */
const FILE_WINDOW = 64 << 10;

/**
 * Reads an open file sequentially into one reused buffer (a chunk is valid until the next
 * pull); with `direct`, what the reader wants without reading goes by sendfile. Each read lands at the buffer offset that matches its file offset modulo 512,
 * so tar headers always start on a word boundary whatever sendfile skipped.
 */
function fileSource(sys: ProcessSys, fd: number, counter: { at: number }, window: number, direct: boolean): ByteSource {
  const buf = new Uint8Array(window + 512);
  let at = 0;
  // The next offset to ask ahead from, kept half a window ahead of the reader.
  let ahead = 0;
  const source: ByteSource = {
    pull(): Uint8Array | null {
      if (at + READ_AHEAD / 2 >= ahead) {
        readAhead(sys, fd, ahead);
        ahead += READ_AHEAD;
      }
      const skew = at % 512;
      const n = sys.pread(fd, buf.subarray(skew, skew + window), at);
      if (n <= 0) return null;
      at += n;
      counter.at = at;
      return buf.subarray(skew, skew + n);
    },
  };
  if (direct && typeof sys.sendfile === 'function') {
    let works = true;
    source.sendTo = (out: number, max: number): number => {
      if (!works) return 0;
      if (at + READ_AHEAD / 2 >= ahead) {
        readAhead(sys, fd, ahead);
        ahead += READ_AHEAD;
      }
      let k: number;
      try {
        k = sys.sendfile!(out, fd, at, max);
      } catch (e) {
        // A file sendfile cannot write (EINVAL): the bytes are read instead from now on.
        if (!isSysError(e, 'EINVAL')) throw e;
        works = false;
        return 0;
      }
      at += k;
      counter.at = at;
      return k;
    };
  }
  return source;
}

interface Decoder {
  path: string;
  argv: string[];
  name: string;
}

/** The external program for `compression`, or undefined to decode inside vdboot. */
function externalDecoder(sys: Sys, compression: Compression, busybox: string | undefined): Decoder | undefined {
  const applet: Partial<Record<Compression, string>> = { gzip: 'gunzip', xz: 'unxz', bzip2: 'bunzip2', lzma: 'unlzma' };
  const a = applet[compression];
  if (a) {
    if (!busybox || !exists(sys, busybox)) throw new FormatError(`the archive is ${compression}-compressed and this initramfs has no busybox to decompress it; rebuild it with "vdboot mkinitramfs"`, 'compression', compression);
    return { path: busybox, argv: [a, '-c'], name: `busybox ${a}` };
  }
  const tool: Partial<Record<Compression, string>> = { zstd: 'zstd', lz4: 'lz4' };
  const t = tool[compression];
  if (t) {
    for (const dir of ['/usr/bin', '/bin', '/usr/sbin', '/sbin']) {
      if (exists(sys, `${dir}/${t}`)) return { path: `${dir}/${t}`, argv: [t, '-d', '-c', '-q'], name: `${dir}/${t}` };
    }
  }
  return undefined;
}

/**
 * Opens the decompressed stream of the archive in `reader`. `filePath`: the archive's
 * path in a kernel-mounted host, when it is one (the decoder then reads it directly).
 */
export function openArchiveStream(sys: Sys, reader: BlockReader, filePath: string | undefined, compression: Compression, busybox: string | undefined): ArchiveStream {
  const counter = { at: 0 };
  const ext = externalDecoder(sys, compression, busybox);
  const ps = sys as ProcessSys;
  if (!ext || typeof ps.pipe !== 'function') {
    let fd = -1;
    if (filePath) fd = sys.open(filePath, O.RDONLY | O.CLOEXEC);
    const raw = fd >= 0 ? (compression === 'none' ? fileSource(ps, fd, counter, FILE_WINDOW, true) : fileSource(ps, fd, counter, READ_CHUNK, false)) : readerSource(reader, counter);
    const js = jsDecoderSource(compression, raw, reader.name);
    const close = (): void => {
      if (fd >= 0) try { sys.close(fd); } catch { /* closed */ }
      fd = -1;
    };
    if (!js) throw new FormatError(`${reader.name}: ${compression} archives need an external decompressor, which this vdboot host cannot start`, 'compression', compression);
    return {
      source: js,
      how: compression === 'none' ? 'uncompressed' : `${compression} (decoded inside vdboot)`,
      consumed: () => counter.at,
      finish: close,
      abort: close,
    };
  }
  return externalStream(ps, reader, filePath, ext);
}

function externalStream(sys: ProcessSys, reader: BlockReader, filePath: string | undefined, dec: Decoder): ArchiveStream {
  const [outR, outW] = sys.pipe!();
  // A larger pipe lets the decoder run longer before it waits for vdboot (fewer switches
  // between the two on a single CPU). Best effort: the kernel may cap it.
  try { sys.fcntl?.(outW, F_SETPIPE_SZ, PIPE_SIZE); } catch { /* the default size works too */ }
  let inFd = -1;
  let decoderIn = -1;
  let feedW = -1;
  let feeder = 0;
  let decoder = 0;
  const closeQuietly = (fd: number): void => {
    if (fd >= 0) try { sys.close(fd); } catch { /* already closed */ }
  };
  try {
    if (filePath) {
      inFd = sys.open(filePath, O.RDONLY | O.CLOEXEC);
      readAhead(sys, inFd, 0);
    } else {
      if (typeof sys.fork !== 'function') throw new Error('no fork');
      const [r, w] = sys.pipe!();
      inFd = r;
      feedW = w;
    }
    decoder = sys.spawn(dec.path, dec.argv, INIT_ENV, { stdio: [inFd, outW, 2] });
    // The archive file stays open here too, to keep asking it ahead of the decoder.
    if (filePath) decoderIn = inFd;
    else closeQuietly(inFd);
    closeQuietly(outW);
    inFd = -1;
    if (feedW >= 0) {
      feeder = sys.fork!();
      if (feeder === 0) feed(sys, reader, feedW, outR);
      closeQuietly(feedW);
      feedW = -1;
    }
  } catch (e) {
    closeQuietly(inFd);
    closeQuietly(decoderIn);
    closeQuietly(outW);
    closeQuietly(feedW);
    closeQuietly(outR);
    if (decoder > 0) reap(sys, decoder, true);
    throw e;
  }
  // Reads land at the buffer offset that matches their stream offset modulo 512, so tar
  // headers start on a word boundary however the pipe splits the stream.
  const buf = new Uint8Array(READ_CHUNK + 512);
  let open = true;
  let streamAt = 0;
  let nextAhead = READ_AHEAD / 2;
  const reader_ = feeder || decoder;
  const source: ByteSource = {
    pull(): Uint8Array | null {
      if (!open) return null;
      const skew = streamAt % 512;
      for (;;) {
        let n: number;
        try {
          n = sys.read(outR, buf.subarray(skew, skew + READ_CHUNK));
        } catch (e) {
          if (isSysError(e, 'EINTR')) continue;
          throw e;
        }
        if (n <= 0) {
          open = false;
          return null;
        }
        streamAt += n;
        // Keep the decoder's input read ahead too: where it is comes from /proc, now and then.
        if (filePath && streamAt >= nextAhead) {
          nextAhead = streamAt + READ_AHEAD;
          const pos = bytesRead(sys, decoder, true);
          if (pos !== undefined && decoderIn >= 0) readAhead(sys, decoderIn, pos);
        }
        return buf.subarray(skew, skew + n);
      }
    },
  };
  let spliceWorks = true;
  if (typeof sys.splice === 'function') {
    // What a file's body has beyond the bytes already read goes from the pipe into the file
    // inside the kernel: one copy instead of two.
    source.sendTo = (fd: number, max: number): number => {
      if (!open || !spliceWorks) return 0;
      let k: number;
      try {
        k = sys.splice!(outR, -1, fd, -1, max, 0);
      } catch (e) {
        // A file that cannot take spliced data (EINVAL): read the bytes instead from now on.
        if (!isSysError(e, 'EINVAL')) throw e;
        spliceWorks = false;
        return 0;
      }
      if (k === 0) open = false;
      streamAt += k;
      return k;
    };
  }
  let done = false;
  const stop = (kill: boolean): { decoder?: number; feeder?: number } => {
    if (done) return {};
    done = true;
    closeQuietly(outR);
    closeQuietly(decoderIn);
    open = false;
    return { decoder: reap(sys, decoder, kill), ...(feeder ? { feeder: reap(sys, feeder, kill) } : {}) };
  };
  return {
    source,
    how: filePath ? dec.name : `${dec.name}, fed by vdboot`,
    consumed: () => bytesRead(sys, reader_, filePath !== undefined),
    finish(): void {
      // Whatever follows the archive's end (tar's record padding) is read and dropped, so the decoder exits normally.
      while (source.pull()) { /* drain */ }
      const r = stop(false);
      if (r.decoder !== undefined && r.decoder !== 0) {
        throw new FormatError(`${dec.name} failed on ${reader.name} (exit status ${r.decoder}): the archive is corrupt or truncated; its own message is above`, 'decoder', r.decoder);
      }
      if (r.feeder !== undefined && r.feeder !== 0) {
        throw new FormatError(`reading ${reader.name} from its partition failed (the feeding process ended with status ${r.feeder})`, 'feeder', r.feeder);
      }
    },
    abort(): void {
      stop(true);
    },
  };
}

/** The forked feeder: pumps the archive's bytes into the decoder's stdin, then exits. */
function feed(sys: ProcessSys, reader: BlockReader, fd: number, unrelated: number): never {
  let code = 0;
  try {
    try { sys.close(unrelated); } catch { /* fine */ }
    for (let at = 0; at < reader.size;) {
      const n = Math.min(READ_CHUNK, reader.size - at);
      const b = reader.read(at, n);
      let off = 0;
      while (off < n) off += sys.write(fd, off === 0 ? b : b.subarray(off));
      at += n;
    }
  } catch {
    code = 1; // EPIPE when the decoder stopped early; the parent reports the decoder's failure
  }
  return sys._exit!(code);
}

/** Waits for `pid`; returns its exit status (128+signal when killed), -1 if it could not be reaped. */
function reap(sys: Sys, pid: number, kill: boolean): number {
  if (kill) try { sys.kill(pid, 9); } catch { /* already gone */ }
  try {
    const r = sys.waitpid(pid, 0);
    return r.exitCode >= 0 ? r.exitCode : 128 + r.termSignal;
  } catch {
    return -1;
  }
}

/**
 * How far the process reading the archive got: the decoder's file position when it reads
 * the file itself, else the feeder's read count (/proc/PID/io rchar).
 */
function bytesRead(sys: Sys, pid: number, fromFile: boolean): number | undefined {
  if (fromFile) {
    const m = /pos:\s*(\d+)/.exec(readTextOr(sys, `/proc/${pid}/fdinfo/0`) ?? '');
    return m ? Number(m[1]) : undefined;
  }
  const m = /rchar:\s*(\d+)/.exec(readTextOr(sys, `/proc/${pid}/io`) ?? '');
  return m ? Number(m[1]) : undefined;
}
