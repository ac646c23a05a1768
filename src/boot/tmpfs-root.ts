/**
 * root=tmpfs:HOST:PATH — unpack a root archive into a tmpfs and boot it.
 *
 *  1. Find HOST (any device spec; rd.vdisk.attach images are attached before) and the
 *     archive on it: NTFS, exFAT and FAT are read by vdboot itself from the partition's
 *     sectors; other filesystems are mounted read-only by the kernel. The host is never
 *     written.
 *  2. Size the tmpfs: rd.tmpfs.size=, or the unpacked size plus 50%, capped at half of
 *     RAM. An archive whose container declares more than fits is refused before anything
 *     is unpacked. (Without rd.tmpfs.size the tmpfs is mounted at the cap and shrunk to
 *     the unpacked size plus 50% afterwards, since only unpacking tells the real size.)
 *  3. Unpack (unpack.ts) with a progress line when it takes more than a second.
 *  4. Release the host (close, or unmount) before switch_root.
 *
 * A failure leaves the partial root mounted at /root for inspection and ends in the
 * rescue shell (init.ts).
 */
import { detectCompression, declaredStreamSize, openArchive, type Compression } from '../formats/archive.ts';
import { type ArchiveReader, type ByteSource, formatBytes, StreamCursor } from '../formats/archive-stream.ts';
import { isFormatError, type BlockReader } from '../formats/block-reader.ts';
import { hostFileReader } from '../formats/host-volume.ts';
import { isSysError, MS, O, type Sys } from '../sys/sys.ts';
import { openBlockReader } from './blockdev.ts';
import { readyBtrfsHost } from './btrfs.ts';
import { exists, mkdirs, readTextOr, writeText } from './fsutil.ts';
import { describeHost, HOST_FS_TYPES, openHostDevice } from './hostdev.ts';
import { BootFailure, type InitContext } from './context.ts';
import { waitForDevice } from './devwait.ts';
import { mountDevice } from './mount-device.ts';
import { type ArchiveStream, openArchiveStream } from './unpack-source.ts';
import { refusalSummary, unpackArchive, UnpackError, type UnpackSys } from './unpack.ts';
import type { DeviceSpec } from './devspec.ts';

/** Where a kernel-mounted host of the archive is mounted (read-only) while unpacking. */
export const ARCHIVE_HOST_MOUNT = '/run/vdboot/archive-host';
const STATE_DIR = '/run/vdboot';
const STATE_PATH = '/run/vdboot/state.json';

export interface TmpfsRootRequest {
  host: DeviceSpec;
  path: string;
  /** rd.tmpfs.size= as written */
  size?: string;
}

/** MemTotal from /proc/meminfo, in bytes. */
export function memTotalBytes(sys: Sys): number {
  const m = /MemTotal:\s*(\d+)\s*kB/.exec(readTextOr(sys, '/proc/meminfo') ?? '');
  if (!m) throw new BootFailure('Cannot read MemTotal from /proc/meminfo to size the tmpfs root; give the size with rd.tmpfs.size= (e.g. rd.tmpfs.size=2G).');
  return Number(m[1]) * 1024;
}

/**
 * rd.tmpfs.size: bytes, with k/m/g/t suffixes (powers of 1024, as tmpfs reads them), or
 * a percentage of RAM ("50%"). Throws a message naming the value when it is none.
 */
export function parseTmpfsSize(text: string, memTotal: number): number {
  const m = /^(\d+(?:\.\d+)?)\s*([kKmMgGtT%]?)[iI]?[bB]?$/.exec(text.trim());
  if (!m) throw new BootFailure(`rd.tmpfs.size=${text} is not a size: write e.g. rd.tmpfs.size=2G, 512M or 75% (of RAM).`);
  const v = Number(m[1]);
  const unit = m[2]!.toLowerCase();
  const bytes = unit === '%' ? (memTotal * v) / 100 : v * ({ '': 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 } as Record<string, number>)[unit]!;
  const rounded = Math.ceil(bytes / 4096) * 4096;
  if (!Number.isSafeInteger(rounded) || rounded < 1 << 20) throw new BootFailure(`rd.tmpfs.size=${text} is ${rounded} bytes; a root needs at least 1 MiB.`);
  // A tmpfs larger than the memory lets a large archive exhaust RAM, and PID 1 cannot be
  // killed for memory: that would end in a kernel panic. Leave a tenth for the system.
  const most = Math.ceil((memTotal * 0.9) / 4096) * 4096;
  if (rounded > most) {
    throw new BootFailure(`rd.tmpfs.size=${text} is ${rounded} bytes, more than the ${most} bytes (90% of the ${memTotal} bytes of RAM) a tmpfs root may take here; give a smaller size, e.g. rd.tmpfs.size=75%.`);
  }
  return rounded;
}

const BLKROSET = 0x125d;
const BLKROGET = 0x125e;

/**
 * Sets a block device's read-only flag; returns what it was (undefined when the device
 * would not say, and then nothing is changed back later).
 */
function setDeviceReadOnly(sys: InitContext['sys'], path: string, readOnly: boolean): boolean | undefined {
  let fd = -1;
  try {
    fd = sys.open(path, O.RDONLY | O.CLOEXEC);
    const was = new Int32Array(1);
    sys.ioctl(fd, BLKROGET, was.buffer);
    const want = new Int32Array([readOnly ? 1 : 0]);
    sys.ioctl(fd, BLKROSET, want.buffer);
    return was[0] !== 0;
  } catch {
    return undefined;
  } finally {
    if (fd >= 0) sys.close(fd);
  }
}

interface OpenedArchive {
  reader: BlockReader;
  /** the archive's path for a decoder to open itself (kernel-mounted host) */
  filePath?: string;
  where: string;
  release(): void;
}

/** Finds the archive on its host, read-only. */
function openArchiveFile(ctx: InitContext, req: TmpfsRootRequest): OpenedArchive {
  const { sys } = ctx;
  const dev = waitForDevice(ctx, req.host, 'host partition of the root archive');
  // resume= (the tmpfs system's swap, often on the disk beside the archive): after unlocking
  // and activation, before the host is read or mounted
  ctx.stack?.resume();
  if (dev.fsType && HOST_FS_TYPES.has(dev.fsType)) {
    const host = openHostDevice({ info: dev, open: () => openBlockReader(sys, dev.path, dev.size) });
    try {
      const file = host.fs.lookup(req.path);
      return { reader: hostFileReader(host.fs, file), where: `${file.path} on ${describeHost(dev)}`, release: () => host.close() };
    } catch (e) {
      host.close();
      throw e;
    }
  }
  mkdirs(sys, ARCHIVE_HOST_MOUNT);
  // Read-only is not enough to leave a journaling filesystem untouched: a dirty journal is
  // replayed even then. These options skip the replay, and the device itself is made
  // read-only (BLKROSET) while it is mounted, so the kernel refuses any write to the host
  // whatever the filesystem does (f2fs roll-forward, ext4 orphan cleanup, …).
  const noReplay: Record<string, string> = { ext3: 'noload', ext4: 'noload', xfs: 'norecovery', btrfs: 'nologreplay' };
  // a btrfs over several disks mounts only once all its members are registered
  readyBtrfsHost(ctx, dev, 'filesystem holding the root archive');
  const wasReadOnly = setDeviceReadOnly(sys, dev.path, true);
  try {
    mountDevice(ctx, dev, ARCHIVE_HOST_MOUNT, undefined, true, noReplay[dev.fsType ?? ''] ?? '');
  } catch (e) {
    if (wasReadOnly === false) setDeviceReadOnly(sys, dev.path, false);
    throw e;
  }
  const release = (): void => {
    try {
      sys.umount2(ARCHIVE_HOST_MOUNT, 0);
      // The booted system gets the partition back as it was: writable, if it was.
      if (wasReadOnly === false) setDeviceReadOnly(sys, dev.path, false);
    } catch (e) {
      ctx.log.warn(`could not unmount the archive's host at ${ARCHIVE_HOST_MOUNT} (${(e as Error).message}); it stays read-only`);
    }
  };
  try {
    const full = `${ARCHIVE_HOST_MOUNT}${req.path}`;
    let size: number;
    try {
      const st = sys.stat(full);
      if ((st.mode & 0o170000) !== 0o100000) throw new BootFailure(`${req.path} on ${describeHost(dev)} is not a regular file.`);
      size = st.size;
    } catch (e) {
      if (isSysError(e, 'ENOENT') || isSysError(e, 'ENOTDIR')) {
        let listing = '';
        try { listing = ctx.sys.readdir(full.slice(0, full.lastIndexOf('/')) || '/').slice(0, 12).join(', '); } catch { /* no parent either */ }
        throw new BootFailure(`Could not find the root archive ${req.path} on ${describeHost(dev)}.${listing ? ` Its folder holds: ${listing}.` : ''} Check the path on the kernel command line (root=tmpfs:HOST:PATH).`);
      }
      throw e;
    }
    const reader = openBlockReader(sys, full, size);
    return { reader, filePath: full, where: `${req.path} on ${describeHost(dev)}`, release: () => { reader.close(); release(); } };
  } catch (e) {
    release();
    throw e;
  }
}

/** Unpacks the archive of `req` into a new tmpfs at `target`. */
export function unpackTmpfsRoot(ctx: InitContext, req: TmpfsRootRequest, target: string): void {
  const { sys, log } = ctx;
  const mem = memTotalBytes(sys);
  const cap = Math.floor(mem / 2 / 4096) * 4096;
  const asked = req.size !== undefined ? parseTmpfsSize(req.size, mem) : undefined;
  const limit = asked ?? cap;
  const archive = openArchiveFile(ctx, req);
  let stream: ArchiveStream | undefined;
  let mounted = false;
  try {
    const head = archive.reader.read(0, Math.min(16, archive.reader.size));
    const compression: Compression = detectCompression(head);
    const declared = declaredStreamSize(archive.reader, compression);
    const sizeWord = compression === 'none' ? 'holds' : compression === 'bzip2' ? 'holds' : 'unpacks to at least';
    if (declared !== undefined && declared > limit) {
      throw new BootFailure(
        `The root archive ${archive.where} (${formatBytes(archive.reader.size)}, ${compression}) ${sizeWord} ${formatBytes(declared)}, ` +
          `more than the tmpfs may hold: ${formatBytes(limit)} (${asked !== undefined ? `rd.tmpfs.size=${req.size}` : `half of the ${formatBytes(mem)} of RAM`}). ` +
          `${asked !== undefined ? 'Raise rd.tmpfs.size, or use a smaller archive.' : 'Give the machine more RAM, allow more with rd.tmpfs.size= (e.g. 75%), or use a smaller archive.'} Nothing was unpacked.`,
      );
    }
    mkdirs(sys, target);
    sys.mount('tmpfs', target, 'tmpfs', 0, `size=${limit},mode=0755`);
    mounted = true;
    stream = openArchiveStream(sys, archive.reader, archive.filePath, compression, ctx.manifest.tools.busybox);
    log.info(`unpacking ${archive.where} (${formatBytes(archive.reader.size)}, ${compression}${declared !== undefined && compression !== 'none' ? `, ${formatBytes(declared)} inside` : ''}; ${stream.how}) into a tmpfs of up to ${formatBytes(limit)}`);
    // With rd.vdboot.debug: where the time goes (waiting for the decoder, parsing, creating files).
    const timing = { pullMs: 0, parseMs: 0 };
    const source = ctx.plan.debug ? timedSource(sys, stream.source, timing) : stream.source;
    // The unpacker keeps no entry past the next one: the reader may refill one object.
    // Header checksums are summed and names decoded natively when the host can (QuickjsSys).
    const { byteSum, utf8Decode } = sys as { byteSum?: (b: Uint8Array) => number; utf8Decode?: (b: Uint8Array) => string };
    const archiveReader = openArchive(new StreamCursor(source), archive.where, { reuseEntry: true, byteSum, utf8Decode });
    const reader = ctx.plan.debug ? timedReader(sys, archiveReader, timing) : archiveReader;
    const total = archive.reader.size;
    const t0 = sys.monotonicMs();
    let nextReport = t0 + 1000;
    const s = stream;
    const onProgress = (): void => {
      const now = sys.monotonicMs();
      if (now < nextReport) return;
      nextReport = now + 1000;
      // Position in the decompressed stream against its declared size is the steadiest
      // measure; else how far the reader of the compressed file got.
      const done = declared !== undefined && declared > 0 ? Math.round((Math.min(reader.offset, declared) / declared) * total) : s.consumed();
      const secs = (now - t0) / 1000;
      if (done === undefined || done <= 0) {
        log.info(`unpacking: ${formatBytes(reader.offset)} of archive content so far, ${(secs).toFixed(0)} s`);
        return;
      }
      const rate = done / secs;
      const left = Math.max(0, (total - done) / rate);
      log.info(`unpacking: ${formatBytes(Math.min(done, total))} of ${formatBytes(total)} read, ${formatBytes(Math.round(rate))}/s, ${left.toFixed(0)} s left`);
    };
    const stats = unpackArchive(sys as UnpackSys, reader, target, { onProgress });
    stream.finish();
    for (const w of stats.warnings) log.warn(w);
    const refused = refusalSummary(stats.refused);
    if (refused) {
      // The boot goes on: what was left out could only have landed outside the new root.
      log.warn(`unpack: ${refused}; nothing was written outside the new root. The archive may be malicious or damaged; the first ${stats.refused.examples.length === 1 ? 'one' : stats.refused.examples.length}:`);
      for (const x of stats.refused.examples) log.warn(`  refused ${x}`);
    }
    const secs = (sys.monotonicMs() - t0) / 1000;
    log.debug(`unpack time: ${(timing.pullMs / 1000).toFixed(2)} s waiting for ${stream.how}, ${((timing.parseMs - timing.pullMs) / 1000).toFixed(2)} s reading the archive, ${(secs - timing.parseMs / 1000).toFixed(2)} s creating files`);
    const used = usedBytes(sys, target);
    let size = limit;
    if (asked === undefined) {
      size = Math.min(cap, Math.ceil((used * 1.5) / 4096) * 4096);
      if (size > used) {
        try {
          sys.mount('tmpfs', target, 'tmpfs', MS.REMOUNT, `size=${size}`);
        } catch (e) {
          log.warn(`could not shrink the tmpfs root to ${formatBytes(size)} (${(e as Error).message}); it stays at ${formatBytes(limit)}`);
          size = limit;
        }
      } else size = limit;
    }
    log.info(
      `unpacked ${stats.entries} entries (${stats.files} files, ${formatBytes(stats.bytes)}) in ${secs.toFixed(2)} s` +
        ` (${formatBytes(Math.round(archive.reader.size / Math.max(secs, 0.001)))}/s of archive); / is a tmpfs of ${formatBytes(size)} with ${formatBytes(used)} used`,
    );
  } catch (e) {
    stream?.abort();
    throw explainUnpackFailure(e, archive.where, limit, asked !== undefined ? req.size! : undefined, mounted ? target : undefined);
  } finally {
    archive.release();
  }
  recordForShutdown(sys);
}

function usedBytes(sys: Sys, path: string): number {
  const st = sys.statfs(path);
  return (st.blocks - st.blocksFree) * st.blockSize;
}

function sentence(text: string): string {
  return /[.!?]$/.test(text) ? text : `${text}.`;
}

export function explainUnpackFailure(e: unknown, where: string, limit: number, sizeText: string | undefined, partial: string | undefined): unknown {
  const left = partial ? ` What was unpacked so far is left in ${partial} for inspection.` : '';
  if (e instanceof UnpackError) {
    if (isSysError(e.reason, 'ENOSPC')) {
      return new BootFailure(
        `The tmpfs root is full (${formatBytes(limit)}${sizeText ? `, rd.tmpfs.size=${sizeText}` : ', half of RAM'}) while unpacking ${where}: ${e.message}. ` +
          `Allow more with rd.tmpfs.size= (e.g. rd.tmpfs.size=75% or 4G), or use a smaller archive.${left}`,
      );
    }
    return new BootFailure(`Unpacking ${where} failed: ${sentence(e.message)}${left}`);
  }
  if (isFormatError(e)) return new BootFailure(`Unpacking ${where} failed: ${sentence((e as Error).message)}${left}`);
  if (isSysError(e, 'ENOSPC')) return new BootFailure(`The tmpfs root is full (${formatBytes(limit)}) while unpacking ${where}. Allow more with rd.tmpfs.size=.${left}`);
  return e;
}

/** The shutdown hand-off (shutdown.ts) runs when vdboot left a record; a tmpfs root has nothing to take down but gets the same hand-off. */
function recordForShutdown(sys: Sys): void {
  if (exists(sys, STATE_PATH)) return;
  mkdirs(sys, STATE_DIR);
  writeText(sys, STATE_PATH, JSON.stringify({ dm: [], loops: [], daemons: [] }));
}

function timedSource(sys: Sys, source: ByteSource, timing: { pullMs: number }): ByteSource {
  return {
    pull(): Uint8Array | null {
      const t = sys.monotonicMs();
      const r = source.pull();
      timing.pullMs += sys.monotonicMs() - t;
      return r;
    },
  };
}

function timedReader(sys: Sys, reader: ArchiveReader, timing: { parseMs: number }): ArchiveReader {
  return {
    format: reader.format,
    get offset() {
      return reader.offset;
    },
    next() {
      const t = sys.monotonicMs();
      const r = reader.next();
      timing.parseMs += sys.monotonicMs() - t;
      return r;
    },
    body(max: number) {
      const t = sys.monotonicMs();
      const r = reader.body(max);
      timing.parseMs += sys.monotonicMs() - t;
      return r;
    },
    ...(reader.bodyTo ? { bodyTo: (fd: number, max: number) => reader.bodyTo!(fd, max) } : {}),
  };
}
