/**
 * rd.vdisk.overlay=SPEC at boot: a shared image's snapshot keeps its writes in a persistent
 * exception store on a local disk instead of RAM, so a client's changes survive reboots
 * while the image (an NBD export, a file other machines boot too) is never written.
 *
 * The overlay is a whole device (a partition) or a preallocated file on an NTFS, exFAT or
 * FAT partition, mapped through its own extents like an image file (never through a
 * filesystem driver). Its layout and the record that ties it to one image: formats/overlay.ts.
 *
 * What never happens: the exceptions of an overlay are applied to an image other than the
 * one they were made over (the identities are compared first); a device holding a
 * filesystem, a partition table, an image, any other signature or non-zero bytes where the
 * record and the store's header go is written; a blank device is written without
 * rd.vdisk.overlay.init=1.
 */
import { FormatError, isFormatError, type BlockReader } from '../formats/block-reader.ts';
import { composeMap, dmTable } from '../formats/extent-ops.ts';
import type { ExtentMap } from '../formats/extent-map.ts';
import { hostFileReader } from '../formats/host-volume.ts';
import {
  classifyOverlay, encodeOverlayRecord, identityDifferences, OVERLAY_MIN_SIZE, OVERLAY_STORE_OFFSET, SNAP_MAGIC, storeUsage,
  type BaseIdentity, type OverlayContent, type OverlayRecord, type StoreUsage,
} from '../formats/overlay.ts';
import type { Sys } from '../sys/sys.ts';
import { openBlockReader, writeSynced } from './blockdev.ts';
import { BootFailure, type InitContext } from './context.ts';
import { humanSize } from './devices.ts';
import type { BlockDeviceInfo } from './devspec.ts';
import { waitForDevice } from './devwait.ts';
import type { DeviceMapper, DmTarget } from './dm.ts';
import { describeHost, findImage, hostFileLayout, isKernelHost } from './hostdev.ts';
import type { OverlayOption } from './plan.ts';
import { DM_UUID_PREFIX, parseTableLine, type VdiskPlan } from './vdisk.ts';

export interface OverlayPlan {
  option: OverlayOption;
  /** "/dev/vdb" or "/vdboot/client.cow on /dev/sdb1 (vfat, LABEL=USB)", for the console */
  description: string;
  /** usable bytes (whole sectors) */
  size: number;
  /** NAME-overlay's table: the whole device, or the file's extents on its partition */
  targets: DmTarget[];
  /** use: the overlay holds writes over this very image; create: a blank device gets its record; replace: rd.vdisk.overlay.init=reset over another image */
  action: 'use' | 'create' | 'replace';
  /** the record to write (create, replace) or the one found (use) */
  record: OverlayRecord;
  /** what changed, when replacing */
  replaced?: string[];
  /** a kept overlay: what its store holds */
  usage?: StoreUsage;
}

/** Past this share of its store, the console warns that the overlay is about to fill up. */
const NEARLY_FULL = 0.9;

const MiB = 1024 * 1024;

/**
 * Finds the overlay, reads its start and decides what to do with it (reads only). Refuses,
 * with the remedy, a device that is not blank and not vdboot's overlay, a blank one without
 * rd.vdisk.overlay.init, and an overlay made over another image (unless init=reset).
 */
export function planOverlay(ctx: InitContext, option: OverlayOption, vp: VdiskPlan, chunkSectors: number): OverlayPlan {
  const { sys } = ctx;
  const identity = vp.baseIdentity;
  if (!identity) throw new Error('internal: an image planned for a persistent overlay has no identity');
  const dev = waitForDevice(ctx, option.device, `overlay device (rd.vdisk.overlay=${option.text})`);
  const located = option.path === undefined ? wholeDevice(sys, dev) : fileOnDevice(ctx, option, dev);
  let content: OverlayContent;
  let usage: StoreUsage | undefined;
  try {
    content = classifyOverlay(located.reader);
    if (content.kind === 'overlay' && content.store.magic === SNAP_MAGIC && content.store.valid === 1) {
      const r = located.reader;
      const from = content.record.storeOffset;
      try {
        usage = storeUsage({ name: r.name, size: r.size - from, read: (o, l) => r.read(from + o, l) }, content.store.chunkSectors);
      } catch (e) {
        if (!isFormatError(e)) throw e;
        content = { kind: 'damaged', why: `its snapshot store is damaged: ${(e as Error).message}` };
      }
    }
  } catch (e) {
    if (isFormatError(e)) throw new BootFailure(`rd.vdisk.overlay=${option.text}: ${located.description}: ${(e as Error).message}. Give the overlay a partition or file of its own of at least ${OVERLAY_MIN_SIZE / MiB} MiB.`);
    throw e;
  } finally {
    located.reader.close?.();
  }
  const where = `rd.vdisk.overlay=${option.text} (${located.description})`;
  const fresh = (): OverlayRecord => ({ version: 1, storeOffset: OVERLAY_STORE_OFFSET, chunkSectors, base: identity });
  const base = { option, description: located.description, size: located.size, targets: located.targets };
  switch (content.kind) {
    case 'foreign':
      throw new BootFailure(
        `${where} holds ${content.what}; vdboot never writes over that. Name an empty partition or file for the overlay, or, if its content is really not needed, ` +
          `erase its start from another system first (dd if=/dev/zero of=THE-PARTITION-OR-FILE bs=1M count=2 conv=notrunc), then boot once with rd.vdisk.overlay.init=1.`,
      );
    case 'blank':
      if (option.init === 'no') {
        throw new BootFailure(
          `${where} is not an overlay yet (it holds zeros where the overlay's record goes, and no signature). To make one there, boot once with rd.vdisk.overlay.init=1 ` +
            `(it writes vdboot's record to its first 4 KiB and a new snapshot store from 1 MiB on). Without that, vdboot writes nothing to it and stops here.`,
        );
      }
      return { ...base, action: 'create', record: fresh() };
    case 'damaged':
      if (option.init === 'reset') return { ...base, action: 'replace', record: fresh(), replaced: [`its record was damaged (${content.why})`] };
      throw new BootFailure(
        `${where}: vdboot's overlay record there is damaged (${content.why}), so it cannot tell which image the writes kept there belong to, and stops. ` +
          `To start the overlay over (its writes are dropped), boot once with rd.vdisk.overlay.init=reset.`,
      );
    case 'overlay': {
      const diffs = identityDifferences(content.record.base, identity);
      if (diffs.length) {
        if (option.init === 'reset') return { ...base, action: 'replace', record: fresh(), replaced: diffs };
        throw new BootFailure(
          `${where} holds writes made over ${describeIdentity(content.record.base)}, but the image booted now is not that image: ${diffs.join('; ')}. ` +
            `Its writes name blocks of the old image; applied to this one they would corrupt it, so the boot stops and nothing was written. ` +
            `Boot the image the overlay was made over, or start the overlay over on this image with rd.vdisk.overlay.init=reset (the writes kept on it are dropped), ` +
            `or boot without rd.vdisk.overlay (writes stay in RAM).`,
        );
      }
      const store = content.store;
      if (store.magic === SNAP_MAGIC && store.valid === 0) {
        if (option.init === 'reset') return { ...base, action: 'replace', record: fresh(), replaced: ['the kernel had marked its store invalid'] };
        throw new BootFailure(
          `${where}: the kernel marked its snapshot store invalid at an earlier boot (the overlay was full, ${humanSize(located.size)}, or a write to it failed); the writes kept there are lost. ` +
            `Start it over with rd.vdisk.overlay.init=reset, on a larger partition or file if it was full.`,
        );
      }
      if (store.magic !== SNAP_MAGIC && store.magic !== 0) {
        if (option.init === 'reset') return { ...base, action: 'replace', record: fresh(), replaced: ['its snapshot store header was damaged'] };
        throw new BootFailure(`${where}: its snapshot store (at 1 MiB) has no valid header (magic ${store.magic.toString(16)}); start it over with rd.vdisk.overlay.init=reset (the writes kept there are dropped).`);
      }
      return { ...base, action: 'use', record: content.record, ...(usage ? { usage } : {}) };
    }
  }
}

function describeIdentity(b: BaseIdentity): string {
  return `${b.source} (${b.layers.map((l) => `${l.format} ${l.subformat}`).join(' → ')}, ${humanSize(b.size)})`;
}

interface LocatedOverlay {
  description: string;
  size: number;
  targets: DmTarget[];
  reader: BlockReader & { close?(): void };
}

/** A partition or disk given to the overlay whole. */
function wholeDevice(sys: Sys, dev: BlockDeviceInfo): LocatedOverlay {
  const size = Math.floor(dev.size / 512) * 512;
  return {
    description: dev.path,
    size,
    targets: [{ start: 0, length: size / 512, type: 'linear', params: `${dev.path} 0` }],
    reader: openBlockReader(sys, dev.path, size),
  };
}

/**
 * A file on a partition vdboot reads itself: mapped through its own extents, which must
 * all be allocated and initialized (a hole or an NTFS range past the initialized size would
 * take writes the filesystem never shows), and owned by this file alone.
 */
function fileOnDevice(ctx: InitContext, option: OverlayOption, dev: BlockDeviceInfo): LocatedOverlay {
  const { sys } = ctx;
  const path = option.path!;
  if (isKernelHost(dev)) {
    throw new BootFailure(
      `rd.vdisk.overlay=${option.text}: ${describeHost(dev)} is a filesystem vdboot does not read itself, so it cannot map a file there without mounting it read-write. ` +
        `Give the overlay a partition of its own (rd.vdisk.overlay=PARTLABEL=…), or put the file on an NTFS, exFAT or FAT partition.`,
    );
  }
  let found;
  try {
    found = findImage([{ info: dev, open: () => openBlockReader(sys, dev.path, dev.size) }], option.device, path);
  } catch (e) {
    if (isFormatError(e)) throw new BootFailure(`rd.vdisk.overlay=${option.text}: ${(e as Error).message}\nCreate the file first, preallocated (not sparse): on Linux "dd if=/dev/zero of=FILE bs=1M count=4096", on Windows "fsutil file createnew FILE SIZE" followed by "fsutil file setvaliddata FILE SIZE".`);
    throw e;
  }
  const description = `${found.file.path} on ${describeHost(dev)}`;
  try {
    const size = Math.floor(found.file.size / 512) * 512;
    if (size < OVERLAY_MIN_SIZE) throw new BootFailure(`rd.vdisk.overlay=${option.text}: ${description} is ${found.file.size} bytes; an overlay needs at least ${OVERLAY_MIN_SIZE / MiB} MiB (a few GiB for a client that installs software).`);
    const layout = hostFileLayout(found.host, found.file);
    const fileMap: ExtentMap = { size, files: [found.file.path], extents: [{ kind: 'data', start: 0, length: size, file: 0, offset: 0 }] };
    const onDevice = composeMap(fileMap, [layout]);
    const notData = onDevice.extents.filter((e) => e.kind !== 'data');
    if (notData.length) {
      const bytes = notData.reduce((n, e) => n + e.length, 0);
      throw new BootFailure(
        `rd.vdisk.overlay=${option.text}: ${description} has ${humanSize(bytes)} in ${notData.length} range${notData.length === 1 ? '' : 's'} that are holes or not initialized (a sparse file, or NTFS's valid data length short of its size); ` +
          `writes there would vanish from the file, so vdboot will not map it. Fill it with zeros from another system (Linux: dd if=/dev/zero of=FILE bs=1M count=N conv=notrunc; Windows: fsutil file setvaliddata FILE SIZE).`,
      );
    }
    try {
      found.host.fs.proveOwnership?.([found.file]);
    } catch (e) {
      if (isFormatError(e)) throw new BootFailure(`rd.vdisk.overlay=${option.text}: ${(e as Error).message}; vdboot will not write clusters another file claims. Check the filesystem (Windows: chkdsk /f).`);
      throw e;
    }
    const targets = dmTable(onDevice, { writable: true }).map(parseTableLine);
    const inner = hostFileReader(found.host.fs, found.file);
    const reader: LocatedOverlay['reader'] = {
      name: description,
      size,
      read: (offset, length) => {
        if (offset < 0 || length < 0 || offset + length > size) throw new FormatError(`${description}: read of ${length} bytes at ${offset} is outside its ${size} bytes`, 'offset', offset);
        return inner.read(offset, length);
      },
      close: () => found.host.close(),
    };
    return { description, size, targets, reader };
  } catch (e) {
    found.host.close();
    throw e;
  }
}

/**
 * Puts the overlay on the kernel: NAME-overlay (the device or the file's extents), the
 * record written when the overlay is new or replaced, and NAME-cow (the store, from 1 MiB
 * on) for the snapshot's $COW. `created` records each dm device for the undo and shutdown.
 *
 * Order of writes for a new or replaced overlay, each synced before the next: first the
 * store's header chunk is zeroed (the kernel then makes a new, empty store: old exceptions
 * are gone), then the record with this image's identity. Cut off after the first, the
 * device holds either no record (blank again: init=1 makes it anew) or the old record over
 * an empty store (refused as before, or reset again); never old exceptions under a new record.
 */
export function createOverlay(sys: Sys, dm: DeviceMapper, name: string, op: OverlayPlan, created: (dmName: string) => void): string {
  const whole = `${name}-overlay`;
  const made = dm.create(whole, `${DM_UUID_PREFIX}${whole}`, op.targets, false);
  created(whole);
  if (op.action !== 'use') {
    try {
      writeSynced(sys, made.path, [
        { offset: op.record.storeOffset, bytes: new Uint8Array(Math.max(op.record.chunkSectors * 512, 4096)) },
        { offset: 0, bytes: encodeOverlayRecord(op.record) },
      ]);
    } catch (e) {
      throw new BootFailure(`Writing the overlay's record to ${op.description} failed (${(e as Error).message}); the boot stops. Check that disk, or boot without rd.vdisk.overlay.`);
    }
  }
  const cow = `${name}-cow`;
  const storeSectors = op.record.storeOffset / 512;
  const made2 = dm.create(cow, `${DM_UUID_PREFIX}${cow}`, [{ start: 0, length: op.size / 512 - storeSectors, type: 'linear', params: `${made.path} ${storeSectors}` }], false);
  created(cow);
  return made2.path;
}

/** One line for the console: where the writes go, and what was done to the overlay. */
export function describeOverlay(name: string, op: OverlayPlan): string {
  const u = op.usage;
  const kept = u ? `, ${humanSize(u.exceptions * u.chunkBytes)} written at earlier boots (${Math.round((100 * u.usedChunks) / u.totalChunks)}% of its store)` : '';
  const what = op.action === 'use' ? `kept from earlier boots${kept}` : op.action === 'create' ? 'new (rd.vdisk.overlay.init)' : `started over (rd.vdisk.overlay.init=reset: ${op.replaced?.join('; ')})`;
  return `${name}: writes go to the persistent overlay ${op.description} (${humanSize(op.size)}), ${what}`;
}

/** A kept overlay nearly full: what happens when it fills, and what to do; null otherwise. */
export function overlayFullWarning(op: OverlayPlan): string | null {
  const u = op.usage;
  if (!u || u.usedChunks < NEARLY_FULL * u.totalChunks) return null;
  return `the persistent overlay ${op.description} is ${Math.round((100 * u.usedChunks) / u.totalChunks)}% full (${humanSize(u.usedChunks * u.chunkBytes)} of ${humanSize(u.totalChunks * u.chunkBytes)}): ` +
    'when it fills, the kernel invalidates it and the system sees I/O errors on its disk. Start it over with rd.vdisk.overlay.init=reset (its writes are dropped), or move it to a larger partition or file.';
}
