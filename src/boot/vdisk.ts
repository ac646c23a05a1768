/**
 * Planning an image boot (DESIGN §3), as a pure function: open the image chain through
 * the host filesystem, compose its map with the host file's extents, choose the data
 * path for the mode, and write down every device-mapper device to create (`vdisk0`,
 * `vdisk0p1`…, and for snapshots `vdisk0-base`) and the root partition. Nothing is
 * written here: the boot (vdisk-exec.ts) executes the plan only once it is complete,
 * and `vdboot plan` prints the same plan on the host.
 *
 * Device references that exist only at execution are tokens in target params:
 * `$LOOP<i>` (a loop device of map file i), `$NBD` (the nbd device qemu-nbd serves the
 * image on) and `$COW` (the snapshot's store: RAM, or the persistent overlay of rd.vdisk.overlay).
 */
import { FormatError, type BlockReader } from '../formats/block-reader.ts';
import { openImage } from '../formats/chain.ts';
import type { OpenedImage } from '../formats/image.ts';
import type { ExtentMap } from '../formats/extent-map.ts';
import { composeMap, dmTable, summarizeMap, validateComposed, type FileLayout, type LayerMetadata, type MapSummary } from '../formats/extent-ops.ts';
import { GPT_TYPE } from '../formats/guid.ts';
import { parsePartitionTable, sliceReader, type PartitionTable } from '../formats/partitions.ts';
import { probeFilesystem } from '../formats/probe.ts';
import { mappedReader } from '../formats/read-map.ts';
import { baseIdentity, layerWriteId, type BaseIdentity } from '../formats/overlay.ts';
import type { DmTarget } from './dm.ts';
import { findChildImages, MAX_NEIGHBOURS } from './children.ts';
import { checkFills, expansionFor, ExpansionNeeded, planFills } from './expand-plan.ts';
import { vhdxHeaderRenewal } from '../formats/expand/vhdx.ts';
import { msGuid } from '../formats/vhdx.ts';
import { humanSize } from './devices.ts';
import { deviceMatches, formatDeviceSpec, type BlockDeviceInfo, type DeviceSpec } from './devspec.ts';
import type { ImageHost, ImageRequest } from './image-host.ts';
import type { VdiskMode, VdiskRootChoice } from './plan.ts';

export interface DmDevicePlan {
  name: string;
  uuid: string;
  readOnly: boolean;
  targets: DmTarget[];
}

export interface VirtualPartition {
  /** 1-based, or 0 for the whole unpartitioned disk */
  number: number;
  /** dm name: vdisk0p1 (vdisk0 for the whole disk) */
  name: string;
  start: number;
  size: number;
  /** GPT type GUID or MBR type byte */
  type?: string;
  fsType?: string;
  uuid?: string;
  label?: string;
  partuuid?: string;
  partlabel?: string;
}

export interface LoopPlan {
  /** the map file index: the tables name this loop device $LOOP<index> */
  index: number;
  /** host path of the file */
  file: string;
  readOnly: boolean;
}

export interface VdiskPlan {
  name: string;
  imagePath: string;
  host: string;
  hostDevice: string;
  chain: { path: string; format: string; subformat: string; size: number }[];
  size: number;
  mode: VdiskMode;
  path: 'direct' | 'loop' | 'nbd';
  /** nbd path: the image qemu-nbd serves (through the mounted host filesystem) */
  nbd?: { file: string; format: string; readOnly: boolean };
  /** one line for the console: the path and why */
  why: string;
  /** the map the tables come from (on the host device for direct, on the files for loop) */
  map: ExtentMap;
  summary: MapSummary;
  partitionTable: PartitionTable['kind'];
  partitions: VirtualPartition[];
  /** in creation order; removed in reverse */
  devices: DmDevicePlan[];
  /** loop devices the tables name as $LOOP<i> */
  loops: LoopPlan[];
  /** snapshot mode: the size of the RAM store the COW device is made from */
  cowBytes?: number;
  /** a snapshot onto a persistent overlay (rd.vdisk.overlay): what identifies the image, to check the overlay's record against */
  baseIdentity?: BaseIdentity;
  /** the root partition and why it was chosen */
  root?: { partition: VirtualPartition; device: BlockDeviceInfo; why: string };
  /**
   * The root lies behind LUKS or LVM inside the image: it is found among the devices made
   * after unlocking and activation — by `spec` (rd.vdisk.root=UUID=…, /dev/mapper/VG-LV), or
   * without one as the only Linux filesystem there. `layers`: the partitions that hold them.
   */
  rootDeferred?: { spec?: DeviceSpec; why: string; layers: VirtualPartition[] };
  /**
   * Written before anything is written through the devices, in order, each synced before the
   * next: a VHDX's headers get a new FileWriteGuid and DataWriteGuid, as MS-VHDX asks of a
   * writer before its first write (backup tools and Hyper-V's checkpoints tell changed disks
   * by them). On the host device for the direct path, through the mounted host file for loop;
   * qemu-nbd does it itself.
   */
  headerUpdate?: HeaderUpdate;
  /** the host filesystem must be mounted read-write by the kernel (loop path in rw mode) */
  hostMountWritable: boolean;
  /** each layer's write id (VHDX DataWriteGuid, VMDK CID; '' for none) as found, and as this boot leaves it (resume=) */
  writeIds: { found: string[]; after: string[] };
  /**
   * The image's own files have holes or uninitialized ranges on the host (rw only; the
   * fill did not run: rd.vdisk.expand=0). The loop and nbd paths then write them through
   * the host's driver, which must be one that allocates holes safely (not ntfs3).
   */
  sparseHostFiles?: string[];
  warnings: string[];
}

export interface HeaderUpdate {
  /** for the console */
  what: string;
  /** 'device': offsets on the host device `path`; 'file': offsets in the host file `path` (under the host mount) */
  on: 'device' | 'file';
  path: string;
  writes: { offset: number; bytes: Uint8Array }[];
  /** the DataWriteGuid the headers get */
  dataWriteGuid: string;
}

export const DM_UUID_PREFIX = 'VDBOOT-';
const SECTOR = 512;

/** Filesystems a Linux root lives on; `auto` looks for exactly one of them. */
export const LINUX_FS: ReadonlySet<string> = new Set(['ext2', 'ext3', 'ext4', 'xfs', 'btrfs', 'f2fs', 'jfs', 'reiserfs', 'nilfs2', 'bcachefs']);

function bytes(n: number): string {
  return `${humanSize(n)}${n >= 1024 ? ` (${n} bytes)` : ''}`;
}

/**
 * The same host with each file's layout asked for once: the direct composition, the hole
 * fills and the VHDX header placement all need it, and on a kernel-mounted host each ask
 * is a FIEMAP (and on btrfs a chunk-tree walk). A failure is remembered and thrown again.
 */
function cachingLayouts(host: ImageHost): ImageHost {
  const seen = new Map<string, { layout: FileLayout | null } | { error: unknown }>();
  return {
    ...host,
    layout(path: string): FileLayout | null {
      let r = seen.get(path);
      if (!r) {
        try {
          r = { layout: host.layout(path) };
        } catch (error) {
          r = { error };
        }
        seen.set(path, r);
      }
      if ('error' in r) throw r.error;
      return r.layout;
    },
  };
}

/**
 * On a host whose only flaw is the dirty flag a Linux NTFS driver leaves behind (see
 * ImageHost.driverWriteBlocker), a rw boot may take the direct path, which writes only
 * inside the image's own clusters; a path that writes through a host driver (expansion,
 * hole filling, a rw loop or nbd) is refused with the blocker's message.
 */
function choosePathOnDirtyHost(req: ImageRequest, host: ImageHost, choose: () => ReturnType<typeof choosePath>): ReturnType<typeof choosePath> {
  const blocker = req.mode === 'rw' ? host.driverWriteBlocker : undefined;
  if (!blocker) return choose();
  const refuse = (what: string): never => {
    throw new FormatError(
      `${req.path} is on ${host.description}, and this boot would ${what}, which vdboot does not do there: ${blocker}\n` +
        `To boot without that, add rd.vdisk.mode=snapshot (changes are kept in RAM and lost at power-off) or rd.vdisk.mode=ro.`,
      'host', host.device,
    );
  };
  let chosen: ReturnType<typeof choosePath>;
  try {
    chosen = choose();
  } catch (e) {
    if (e instanceof ExpansionNeeded) refuse('first expand the image or fill its holes through the host\'s filesystem driver');
    throw e;
  }
  if (chosen.path !== 'direct') refuse(`write the image through the host's filesystem driver (${chosen.path})`);
  return chosen;
}

/**
 * No file of the image may have clusters where the host device reads zeros and drops writes
 * (an unlocked BitLocker volume's metadata areas): its bytes there read back wrong and a write
 * vanishes, on every path (the driver would write the same clusters).
 */
function refuseDeadRanges(host: ImageHost, files: readonly string[], dead: ReadonlyArray<{ offset: number; length: number }>): void {
  for (const f of files) {
    let layout: FileLayout | null;
    try {
      layout = host.layout(f);
    } catch (e) {
      if ((e as Error).name === 'FormatError') continue; // no clusters (resident): nothing on the device
      throw e;
    }
    if (!layout) continue;
    for (const x of layout.extents) {
      if (x.kind !== 'data') continue;
      for (const d of dead) {
        const from = Math.max(x.deviceOffset, d.offset);
        const to = Math.min(x.deviceOffset + x.length, d.offset + d.length);
        if (from >= to) continue;
        const fileAt = x.fileOffset + (from - x.deviceOffset);
        throw new FormatError(
          `${f} on ${host.description}: ${to - from} bytes of it (file bytes ${fileAt}–${fileAt + (to - from) - 1}, device bytes ${from}–${to - 1}) lie in a BitLocker metadata area, ` +
            'which the unlocked volume reads as zeros and where writes are dropped. Windows never puts a file there, so this NTFS was written by another tool or is damaged: ' +
            'run "chkdsk /f" on it in Windows, then copy the image onto it again with Windows.',
          'path', f,
        );
      }
    }
  }
}

export function planVdisk(req: ImageRequest, imageHost: ImageHost): VdiskPlan {
  const host = cachingLayouts(imageHost);
  const name = req.name ?? `vdisk${req.index}`;
  const warnings: string[] = [];
  if (req.mode === 'rw' && host.writeBlocker) {
    throw new FormatError(
      `${req.path} is on ${host.description}, which vdboot will not write to: ${host.writeBlocker}\n` +
        `To boot without writing to it now, add rd.vdisk.mode=snapshot (changes are kept in RAM and lost at power-off) or rd.vdisk.mode=ro.`,
      'host', host.device,
    );
  }
  const image = openImage(req.path, req.allowOutside ? { ...host.chain, allowOutside: true } : host.chain);
  const { map } = image;
  if (map.size % SECTOR !== 0) {
    throw new FormatError(`${req.path}: its virtual size ${map.size} is not a whole number of 512-byte sectors, so device-mapper cannot present it`, 'size', map.size);
  }
  const chain = image.layers.map((l) => ({ path: l.path, format: l.layer.format, subformat: l.layer.subformat, size: l.layer.size }));

  // Cross-links: a file whose clusters another file also claims is not mapped by any path
  // (direct would write the other file's bytes; loop would too, through the driver).
  {
    const used = new Set<number>();
    for (const e of map.extents) if (e.kind === 'data') used.add(e.file);
    host.checkOwnership?.(map.files.filter((_, i) => used.has(i)));
    if (host.deadRanges?.length) refuseDeadRanges(host, map.files.filter((_, i) => used.has(i)), host.deadRanges);
  }

  // Direct: the image map composed with every chain file's extents on the host device.
  let direct: ExtentMap | undefined;
  let directProblem: string | undefined;
  let directLayouts: (FileLayout | null)[] | undefined;
  try {
    // Only files that hold data need a place on the device: a VMDK descriptor holds none
    // (and is often small enough to live inside its NTFS record).
    const used = new Set<number>();
    for (const e of map.extents) if (e.kind === 'data') used.add(e.file);
    const layouts = map.files.map((f, i) => (used.has(i) ? host.layout(f) : null));
    const missing = layouts.findIndex((l, i) => used.has(i) && l === null);
    if (missing >= 0) directProblem = `vdboot cannot see where ${map.files[missing]} lies on ${host.description}`;
    else {
      direct = composeMap(map, layouts);
      directLayouts = layouts;
    }
  } catch (e) {
    if ((e as Error).name !== 'FormatError') throw e;
    directProblem = (e as Error).message;
  }

  // Once more on the device: no two virtual ranges on the same sectors, none on a layer's
  // tables, whatever the host's files are called (a refusal, not a reason to take the loop
  // path: the driver would write the same clusters).
  if (direct && directLayouts) {
    const metadata = image.layers.flatMap((l) => ((l.layer as LayerMetadata).metadata ?? []).map((m) => ({ ...m, file: l.fileIndex[m.file] ?? -1 })));
    validateComposed(`${req.path} on ${host.description}`, direct, directLayouts, metadata);
  }

  if (req.mode === 'rw') refuseWithChildren(req, image, host, warnings);
  const chosen = choosePathOnDirtyHost(req, host, () => choosePath(req, image, direct, directProblem, host));
  if (req.mode === 'rw' && host.writeWarning) warnings.push(host.writeWarning);
  const headerUpdate = req.mode === 'rw' && chosen.path !== 'nbd' && image.layers[0]!.layer.format === 'vhdx' ? vhdxRenewal(image, host, chosen.path) : undefined;
  const found = image.layers.map((l) => layerWriteId(l.layer.details) ?? '');
  const tableMap = chosen.path === 'direct' ? direct! : map;
  const devicesForFiles = chosen.path === 'direct' ? undefined : map.files.map((_, i) => `$LOOP${i}`);
  const dataFiles = new Set<number>();
  for (const e of map.extents) if (e.kind === 'data') dataFiles.add(e.file);
  const loops: LoopPlan[] = chosen.path === 'loop'
    ? map.files.flatMap((f, i) => (dataFiles.has(i) ? [{ index: i, file: f, readOnly: req.mode !== 'rw' || !topLayerFiles(image).has(i) }] : []))
    : [];
  const targets = chosen.path === 'nbd'
    ? [{ start: 0, length: map.size / SECTOR, type: 'linear', params: '$NBD 0' }]
    : dmTable(tableMap, { writable: req.mode === 'rw', devices: devicesForFiles }).map(parseTableLine);

  const devices: DmDevicePlan[] = [];
  const sectors = map.size / SECTOR;
  let cowBytes: number | undefined;
  if (req.mode === 'snapshot') {
    devices.push({ name: `${name}-base`, uuid: `${DM_UUID_PREFIX}${name}-base`, readOnly: true, targets });
    // Non-persistent snapshot ("N"), 4 KiB chunks: writes land in the RAM store, reads of unchanged chunks come from the image.
    // With rd.vdisk.overlay the store is persistent ("P") on a local disk (overlay.ts), and $COW names it.
    devices.push({ name, uuid: `${DM_UUID_PREFIX}${name}`, readOnly: false, targets: [{ start: 0, length: sectors, type: 'snapshot', params: `/dev/mapper/${name}-base $COW ${req.persistentOverlay ? 'P' : 'N'} 8` }] });
    if (!req.persistentOverlay) cowBytes = map.size;
  } else {
    devices.push({ name, uuid: `${DM_UUID_PREFIX}${name}`, readOnly: req.mode === 'ro', targets });
  }

  // The partitions inside the virtual disk, read through the image (as the guest will see it).
  const disk: BlockReader = mappedReader(image, req.path);
  let table: PartitionTable;
  try {
    table = parsePartitionTable(disk);
  } catch (e) {
    warnings.push(`${req.path}: its partition table could not be read (${(e as Error).message}); using the whole disk`);
    table = { kind: 'none', sectorSize: 512, partitions: [], warnings: [] };
  }
  for (const w of table.warnings) warnings.push(`${req.path}: ${w}`);
  const partitions: VirtualPartition[] = [];
  for (const p of table.partitions) {
    if (p.extended) continue;
    if (p.start % SECTOR !== 0 || p.size % SECTOR !== 0 || p.size <= 0 || p.start + p.size > map.size) {
      warnings.push(`${req.path}: partition ${p.number} (${p.start}+${p.size}) lies outside the disk or off sector boundaries; skipped`);
      continue;
    }
    const vp: VirtualPartition = { number: p.number, name: `${name}p${p.number}`, start: p.start, size: p.size, type: p.type, partuuid: p.partuuid };
    if (p.name) vp.partlabel = p.name;
    probeInto(vp, sliceReader(disk, p.start, p.size, vp.name), warnings);
    partitions.push(vp);
    // A partition is laid straight onto what the whole disk maps to, so each of its I/Os is
    // remapped once; only a snapshot's partitions must sit on the snapshot device.
    const flat = req.mode === 'snapshot' ? null : sliceTargets(targets, p.start / SECTOR, p.size / SECTOR);
    devices.push({
      name: vp.name,
      uuid: `${DM_UUID_PREFIX}${name}-part${p.number}`,
      readOnly: req.mode === 'ro',
      targets: flat ?? [{ start: 0, length: p.size / SECTOR, type: 'linear', params: `/dev/mapper/${name} ${p.start / SECTOR}` }],
    });
  }
  const whole: VirtualPartition = { number: 0, name, start: 0, size: map.size };
  if (table.kind === 'none') probeInto(whole, disk, warnings);

  const plan: VdiskPlan = {
    name,
    imagePath: req.path,
    host: host.description,
    hostDevice: host.device,
    chain,
    size: map.size,
    mode: req.mode,
    path: chosen.path,
    why: chosen.why,
    map: tableMap,
    summary: summarizeMap(tableMap),
    partitionTable: table.kind,
    partitions,
    devices,
    loops,
    ...(headerUpdate ? { headerUpdate } : {}),
    hostMountWritable: chosen.path !== 'direct' && req.mode === 'rw',
    writeIds: { found, after: found.map((w, i) => (i === 0 && headerUpdate ? headerUpdate.dataWriteGuid : w)) },
    warnings,
  };
  if (req.mode === 'rw' && chosen.path !== 'direct') {
    const sparse = planFills(image, host).map((f) => f.name);
    if (sparse.length) plan.sparseHostFiles = sparse;
  }
  if (chosen.path === 'nbd') plan.nbd = { file: image.layers[0]!.path, format: qemuFormatName(image.layers[0]!.layer.format), readOnly: req.mode !== 'rw' };
  if (cowBytes !== undefined) plan.cowBytes = cowBytes;
  if (req.persistentOverlay && req.mode === 'snapshot') {
    plan.baseIdentity = baseIdentity({
      source: req.path,
      layers: image.layers.map((l) => l.layer),
      map,
      disk,
      partitionStarts: partitions.map((p) => p.start),
    });
  }
  const stacked = (table.kind === 'none' ? [whole] : partitions).filter((p) => p.fsType === 'crypto_LUKS' || p.fsType === 'LVM2_member');
  const deferred = req.root ? deferRoot(req.root, table.kind, partitions, whole, stacked) : undefined;
  if (deferred) plan.rootDeferred = deferred;
  else if (req.root) {
    const r = chooseRoot(req, req.root, table.kind, partitions, whole);
    plan.root = {
      partition: r.partition,
      why: r.why,
      device: {
        name: r.partition.name,
        path: `/dev/mapper/${r.partition.name}`,
        major: 0,
        minor: 0,
        size: r.partition.size,
        ...(r.partition.fsType ? { fsType: r.partition.fsType } : {}),
        ...(r.partition.uuid ? { uuid: r.partition.uuid } : {}),
        ...(r.partition.label !== undefined ? { label: r.partition.label } : {}),
        ...(r.partition.partuuid ? { partuuid: r.partition.partuuid } : {}),
        ...(r.partition.partlabel ? { partlabel: r.partition.partlabel } : {}),
      },
    };
  }
  return plan;
}

function probeInto(vp: VirtualPartition, reader: BlockReader, warnings: string[]): void {
  try {
    const fs = probeFilesystem(reader);
    if (fs) {
      vp.fsType = fs.type;
      if (fs.uuid) vp.uuid = fs.uuid;
      if (fs.label !== undefined) vp.label = fs.label;
    }
  } catch (e) {
    warnings.push(`${vp.name}: probing its filesystem failed (${(e as Error).message})`);
  }
}

/**
 * A read-write boot writes the image: refused while a differencing image beside it (a
 * Hyper-V checkpoint, a VirtualBox snapshot, an overlay) reads unchanged blocks from it.
 */
function refuseWithChildren(req: ImageRequest, image: OpenedImage, host: ImageHost, warnings: string[]): void {
  const kin = findChildImages(req.path, image.layers[0]!.layer, host.chain);
  for (const s of kin.stale) warnings.push(`${s.path} names ${req.path} as its parent but no longer matches it, so it is already cut off from it (${s.why})`);
  // What vdboot cannot check could be a child: a checkpoint left dirty by the same crash, say.
  if (kin.unreadable.length || kin.skipped) {
    throw new FormatError(
      `${req.path} may be the parent of an image beside it that vdboot cannot check, so it will not boot it read-write: ` +
        (kin.unreadable.length ? `${kin.unreadable.map((u) => `${u.path} (${u.why})`).join('; ')}` : '') +
        (kin.skipped ? `${kin.unreadable.length ? '; and ' : ''}${kin.skipped} image files past the ${MAX_NEIGHBOURS} vdboot looks at` : '') +
        `.\nRemedies: ${kin.unreadable.length ? `repair or move away ${kin.unreadable.length === 1 ? 'that file' : 'those files'}, or ` : ''}keep the image in a folder of its own; or boot with rd.vdisk.mode=snapshot (writes go to RAM) or rd.vdisk.mode=ro.`,
      'mode', 'rw',
    );
  }
  if (!kin.children.length) return;
  const many = kin.children.length > 1;
  throw new FormatError(
    `${req.path} is the parent of ${kin.children.join(', ')}: ${many ? 'differencing images' : 'a differencing image'} (a Hyper-V checkpoint, a VirtualBox snapshot or an overlay) ` +
      `that read${many ? '' : 's'} every block ${many ? 'they have' : 'it has'} not changed from it. Writing ${req.path} would corrupt ${many ? 'them' : 'it'}, so vdboot will not boot it read-write.\n` +
      `Remedies: merge the checkpoints into the disk first (Hyper-V: delete the checkpoint, or Merge-VHD; VirtualBox: delete the snapshot; "qemu-img commit CHILD"); ` +
      `or boot the newest child instead (root=vdisk:HOST:CHILD with rd.vdisk.mode=snapshot, or rd.vdisk.map=nbd with qemu-nbd in the initramfs); ` +
      `or boot this image with rd.vdisk.mode=snapshot (writes go to RAM) or rd.vdisk.mode=ro.`,
    'mode', 'rw',
  );
}

/** The VHDX header writes of a rw boot (HeaderUpdate), placed on the host device for the direct path. */
function vhdxRenewal(image: OpenedImage, host: ImageHost, path: 'direct' | 'loop'): HeaderUpdate {
  const g = image.layers[0]!.fileIndex[0]!;
  const file = image.map.files[g]!;
  const logWrites = image.layers[0]!.layer.logReplay?.writes ?? [];
  const writes = vhdxHeaderRenewal(image.readers[g]!, file, logWrites);
  const logged = logWrites.length;
  // the header writes come last; the DataWriteGuid is at byte 32 of a header
  const dataWriteGuid = msGuid(writes[writes.length - 1]!.bytes, 32);
  const what = `${logged ? `the ${logged} update${logged === 1 ? '' : 's'} in ${file}'s log (it was not closed cleanly), then ` : ''}a new FileWriteGuid and DataWriteGuid in ${logged ? 'its' : `${file}'s`} headers, as VHDX asks before the first write`;
  if (path === 'loop') return { what, on: 'file', path: file, writes, dataWriteGuid };
  const layout = host.layout(file);
  if (!layout) throw new Error(`internal: the direct path was chosen for ${file} without its layout`);
  // Each write's file range composed with the file's extents, as the image map is: only where the file's bytes lie.
  const placed = writes.flatMap((w) => composeMap({ size: w.bytes.length, files: [file], extents: [{ kind: 'data', start: 0, length: w.bytes.length, file: 0, offset: w.offset }] }, [layout]).extents.map((e) => {
    if (e.kind !== 'data') {
      throw new FormatError(
        `${file}: the bytes at ${w.offset + e.start} it must write first lie in a hole of the file or past its initialized size on ${host.description}, so vdboot cannot write them in place. ` +
          `Boot with rd.vdisk.map=loop, or copy the image on another machine (a copy is stored whole).`,
        'header', w.offset,
      );
    }
    return { offset: e.offset, bytes: w.bytes.subarray(e.start, e.start + e.length) };
  }));
  return { what, on: 'device', path: layout.device, writes: placed, dataWriteGuid };
}

/**
 * Map file indexes that belong to the image itself (not a parent): the only ones rw may
 * write. The chain resolver refuses a file shared by two layers, so a file is one layer's.
 */
function topLayerFiles(image: OpenedImage): Set<number> {
  const top = new Set(image.layers[0]!.fileIndex);
  for (const l of image.layers.slice(1)) for (const g of l.fileIndex) top.delete(g);
  return top;
}

/**
 * Bytes of the disk that read from a parent layer, counted by layer (the top layer's
 * `parent` ranges that the chain resolves to data), not by file: whatever file the
 * parent's data lies in, a direct rw mapping would write it.
 */
function parentDataBytes(image: OpenedImage): number {
  const top = image.layers[0]!.layer.extents;
  const map = image.map.extents;
  let n = 0;
  let j = 0;
  for (const p of top) {
    if (p.kind !== 'parent') continue;
    const end = p.start + p.length;
    while (j < map.length && map[j]!.start + map[j]!.length <= p.start) j++;
    for (let k = j; k < map.length && map[k]!.start < end; k++) {
      const e = map[k]!;
      if (e.kind === 'data') n += Math.min(end, e.start + e.length) - Math.max(p.start, e.start);
    }
  }
  return n;
}

interface PathChoice {
  path: 'direct' | 'loop' | 'nbd';
  why: string;
}

/** qemu's name for a format (qemu-nbd -f). */
function qemuFormatName(format: string): string {
  return format === 'vhd' ? 'vpc' : format;
}

const NBD_HINT = 'or build the initramfs with "vdboot mkinitramfs --with qemu-nbd --with ntfs-3g" so that qemu-nbd serves the image (rd.vdisk.map=nbd)';

/**
 * The data path for the mode (DESIGN §3). `direct` needs every range mappable onto the
 * host device; in rw mode also no range that reads as zero (a write there would vanish or
 * stay invisible to the host filesystem) and no range that belongs to a parent image (a
 * write there would change the parent). `loop` goes through the host's own driver, which
 * fixes the host-file cases only.
 */
function choosePath(req: ImageRequest, image: OpenedImage, direct: ExtentMap | undefined, directProblem: string | undefined, host: ImageHost): PathChoice {
  const map = image.map;
  const s = summarizeMap(map);
  if (req.map === 'nbd') {
    if (!req.nbd) throw new FormatError(`rd.vdisk.map=nbd: this initramfs has no qemu-nbd. Build it with "vdboot mkinitramfs --with qemu-nbd --with ntfs-3g", or use rd.vdisk.map=auto, direct or loop.`, 'map', 'nbd');
    // qemu-nbd writes through the host's driver: the file's holes are filled first
    checkFills(req, image, host, 0);
    return { path: 'nbd', why: 'nbd (asked for): qemu-nbd serves the image through the host filesystem' };
  }
  if (s.unmappableBytes > 0) {
    const first = map.extents.find((e) => e.kind === 'unmappable');
    const reason = first && first.kind === 'unmappable' ? first.reason : 'unmappable';
    if (req.nbd && req.map === 'auto') {
      checkFills(req, image, host, 0);
      return { path: 'nbd', why: `nbd: ${bytes(s.unmappableBytes)} of the virtual disk cannot be handed to device-mapper (${reason}); qemu-nbd reads it` };
    }
    throw new FormatError(
      `${req.path}: ${bytes(s.unmappableBytes)} of the virtual disk cannot be handed to device-mapper (${reason}). Convert the image on another machine, e.g. ` +
        `"qemu-img convert -O vhdx in out.vhdx" (uncompressed), then boot that one; ${NBD_HINT}.`,
      'extent', first?.start ?? 0,
    );
  }
  if (req.mode === 'rw') {
    const topLayer = image.layers[0]!.layer;
    const snapshots = Number(topLayer.details.snapshots ?? 0);
    if (topLayer.format === 'qcow2' && snapshots > 0) {
      if (req.nbd && req.map === 'auto') return { path: 'nbd', why: `nbd: the image has internal snapshots sharing its clusters; qemu-nbd writes through the format` };
      throw new FormatError(
        `${req.path} has ${snapshots} internal snapshot${snapshots === 1 ? '' : 's'}, which share clusters with the disk: writing them in place would change the snapshots too. ` +
          `Boot with rd.vdisk.mode=snapshot or ro, or remove the snapshots on another machine ("qemu-img snapshot -l" lists them, "qemu-img snapshot -d NAME" deletes one).`,
        'mode', 'rw',
      );
    }
    const parentBytes = parentDataBytes(image);
    const unallocated = (s.zeroBytesByWhy.unallocated ?? 0) + (s.zeroBytesByWhy.zeroed ?? 0) + (s.zeroBytesByWhy.uninitialized ?? 0);
    // Expanding in place (expand-plan.ts) throws ExpansionNeeded when vdboot can: it comes
    // first (DESIGN §3, the direct path afterwards), after the file's holes on the host are
    // filled (planFills). Where it cannot — rd.vdisk.expand=0, a parent image, a format it
    // does not expand — auto hands the image to qemu-nbd if the initramfs has it.
    const expansion = parentBytes > 0 ? 'it has a parent image, whose data expanding it would need' : unallocated > 0 ? expansionFor(req, image, host, unallocated) : undefined;
    const refused = typeof expansion === 'string' && !(req.nbd && req.map === 'auto');
    // Holes are filled for whatever path follows, but not for a boot that is refused below.
    if (!refused) checkFills(req, image, host, unallocated, typeof expansion === 'string' ? undefined : expansion);
    if (expansion !== undefined && typeof expansion !== 'string') throw new ExpansionNeeded(req.path, expansion, unallocated, host.description);
    if (parentBytes > 0 || unallocated > 0) {
      const noExpansion = expansion as string;
      if (req.nbd && req.map === 'auto') {
        return { path: 'nbd', why: `nbd: ${unallocated > 0 ? `${bytes(unallocated)} of the image ${unallocated > 1 ? 'are' : 'is'} not allocated` : `${bytes(parentBytes)} lie in its parent image`}, so writes must go through the image format (${noExpansion}): qemu-nbd allocates them` };
      }
      const parts: string[] = [];
      if (unallocated > 0) parts.push(`${bytes(unallocated)} of it ${unallocated === s.zeroBytes ? 'are' : 'is'} not allocated in the image (a dynamic image's absent blocks), where writes through a direct mapping would vanish`);
      if (parentBytes > 0) parts.push(`${bytes(parentBytes)} of it ${parentBytes > 1 ? 'are' : 'is'} held by the parent image ${image.layers[1]?.path ?? ''}, which a write must not change`);
      throw new FormatError(
        `${req.path} cannot be mapped read-write: ${parts.join('; and ')}. ` +
          `${req.expand ? `vdboot cannot expand it in place: ${noExpansion}. ` : 'rd.vdisk.expand=0 forbids expanding it in place. '}` +
          `Remedies: boot with rd.vdisk.mode=snapshot (writes go to RAM and are lost at power-off), or rd.vdisk.mode=ro; ` +
          `or make the image preallocated on another machine (a fixed VHD/VHDX: "qemu-img convert -O vpc -o subformat=fixed", ` +
          `"qemu-img convert -O vhdx -o subformat=fixed"; qcow2 with "-o preallocation=metadata"; or raw)${parentBytes > 0 ? ', merging the differencing chain ("qemu-img commit")' : ''}; ${NBD_HINT}.`,
        'mode', 'rw',
      );
    }
  }
  const directIssues: string[] = [];
  if (!direct) directIssues.push(directProblem ?? 'the image could not be composed with its host file');
  else {
    const ds = summarizeMap(direct);
    const uninit = ds.zeroBytesByWhy.uninitialized ?? 0;
    if (req.mode === 'rw' && uninit > 0) directIssues.push(`${bytes(uninit)} of the host file lie past its initialized size or in holes, where a write through the raw partition would stay invisible to ${host.description}`);
    try {
      dmTable(direct, { writable: req.mode === 'rw' });
    } catch (e) {
      directIssues.push((e as Error).message);
    }
  }
  // device-mapper presents the largest logical sector size of what it maps onto: a 4Kn
  // host would change the sector size the image's partition table was written for.
  if ((host.logicalBlockSize ?? 512) > 512) {
    directIssues.push(`${host.device} has ${host.logicalBlockSize}-byte logical sectors, so a device-mapper view of it cannot present the image's 512-byte sectors`);
  }
  const hostName = host.device;
  if (req.map === 'direct') {
    if (directIssues.length) throw new FormatError(`rd.vdisk.map=direct: ${req.path} cannot be mapped directly onto ${host.description}: ${directIssues.join('; ')}. Use rd.vdisk.map=auto or loop.`, 'map', 'direct');
    return { path: 'direct', why: `direct (asked for): ${directExplain(direct!, hostName, host.layoutSource)}` };
  }
  if (req.map === 'loop') return { path: 'loop', why: `loop (asked for): through the host filesystem's kernel driver` };
  if (!directIssues.length) return { path: 'direct', why: `direct: ${directExplain(direct!, hostName, host.layoutSource)}` };
  return { path: 'loop', why: `loop: the direct path is not safe here (${directIssues.join('; ')}); the host filesystem's kernel driver carries the data` };
}

/** "vhdx dynamic", "qcow2 v3"; a format without subformats ("raw") once. */
export function formatName(l: { format: string; subformat: string }): string {
  return !l.subformat || l.subformat === l.format ? l.format : `${l.format} ${l.subformat}`;
}

function directExplain(direct: ExtentMap, hostDevice: string, source?: string): string {
  const s = summarizeMap(direct);
  const zero = s.zeroBytes ? `, ${humanSize(s.zeroBytes)} read as zeros` : '';
  return `the image is fully mappable: ${s.dataExtents} extent${s.dataExtents === 1 ? '' : 's'} on ${hostDevice}${source ? ` (from ${source})` : ''}${zero}; the host filesystem driver is not in the data path`;
}

/**
 * When the image has LUKS or LVM partitions and the choice cannot be made from its plain
 * partitions (a spec none matches, or auto without a GPT root type), the root is looked
 * for after unlocking and activation instead.
 */
function deferRoot(choice: VdiskRootChoice, kind: string, parts: VirtualPartition[], whole: VirtualPartition, stacked: VirtualPartition[]): VdiskPlan['rootDeferred'] {
  if (stacked.length === 0 || choice.by === 'number') return undefined;
  const where = stacked.map((p) => `${p.number ? `partition ${p.number}` : 'the whole disk'} (${p.fsType === 'crypto_LUKS' ? 'LUKS' : 'LVM PV'})`).join(', ');
  if (choice.by === 'spec') {
    const candidates = kind === 'none' ? [whole] : parts;
    const plain = candidates.some((x) => deviceMatches(choice.spec, { name: x.name, path: `/dev/mapper/${x.name}`, major: 0, minor: 0, size: x.size, fsType: x.fsType, uuid: x.uuid, label: x.label, partuuid: x.partuuid, partlabel: x.partlabel }));
    return plain ? undefined : { spec: choice.spec, why: `rd.vdisk.root=${formatDeviceSpec(choice.spec)}, looked for behind ${where}`, layers: stacked };
  }
  if (parts.some((p) => p.type === GPT_TYPE.linuxRootX86_64)) return undefined;
  return { why: `the only Linux filesystem behind ${where}${choice.subvol ? ` (among several, the only btrfs: rootflags=${choice.subvol} names a btrfs subvolume)` : ''}`, layers: stacked };
}

function chooseRoot(req: ImageRequest, choice: VdiskRootChoice, kind: string, parts: VirtualPartition[], whole: VirtualPartition): { partition: VirtualPartition; why: string } {
  const list = () =>
    (kind === 'none' ? [whole] : parts)
      .map((p) => `  ${p.number ? `partition ${p.number}` : 'whole disk'}: ${humanSize(p.size)} ${p.fsType ?? '(no filesystem found)'}${p.label ? ` LABEL="${p.label}"` : ''}${p.uuid ? ` UUID=${p.uuid}` : ''}${p.partuuid ? ` PARTUUID=${p.partuuid}` : ''}${p.partlabel ? ` PARTLABEL="${p.partlabel}"` : ''}`)
      .join('\n');
  if (choice.by === 'number') {
    const p = parts.find((x) => x.number === choice.number);
    if (!p) throw new FormatError(`rd.vdisk.root=${choice.number}: ${req.path} has no partition ${choice.number} (${kind === 'none' ? 'it has no partition table' : `${kind} table`}):\n${list()}`, 'root', choice.number);
    return { partition: p, why: `rd.vdisk.root=${choice.number}` };
  }
  if (choice.by === 'spec') {
    const candidates = kind === 'none' ? [whole] : parts;
    const p = candidates.find((x) => deviceMatches(choice.spec, { name: x.name, path: `/dev/mapper/${x.name}`, major: 0, minor: 0, size: x.size, fsType: x.fsType, uuid: x.uuid, label: x.label, partuuid: x.partuuid, partlabel: x.partlabel }));
    if (!p) throw new FormatError(`rd.vdisk.root=${formatDeviceSpec(choice.spec)}: no partition of ${req.path} matches:\n${list()}`, 'root', formatDeviceSpec(choice.spec));
    return { partition: p, why: `rd.vdisk.root=${formatDeviceSpec(choice.spec)}` };
  }
  const rootType = parts.filter((p) => p.type === GPT_TYPE.linuxRootX86_64);
  if (rootType.length >= 1) return { partition: rootType[0]!, why: `the GPT type "Linux root (x86-64)"${rootType.length > 1 ? ` (the first of ${rootType.length})` : ''}` };
  const linux = parts.filter((p) => p.fsType && LINUX_FS.has(p.fsType));
  if (linux.length === 1) return { partition: linux[0]!, why: `the only Linux filesystem (${linux[0]!.fsType})` };
  const btrfs = linux.filter((p) => p.fsType === 'btrfs');
  if (choice.subvol && btrfs.length === 1) return { partition: btrfs[0]!, why: `the only btrfs, as rootflags=${choice.subvol} names a btrfs subvolume` };
  if (kind === 'none' && whole.fsType) return { partition: whole, why: `the unpartitioned disk holds ${whole.fsType}` };
  throw new FormatError(
    `${req.path}: vdboot cannot tell which partition is root (${linux.length > 1 ? `${linux.length} Linux filesystems` : 'no Linux filesystem'}, no GPT "Linux root (x86-64)" partition):\n${list()}\n` +
      `Name it with rd.vdisk.root=N (the partition number), or PARTUUID=…, PARTLABEL=…, UUID=…, LABEL=….`,
    'root', 'auto',
  );
}

/**
 * The part of a device's table that covers its sectors [start, start + length), re-based to 0:
 * linear targets keep their device with the offset moved by as much as the cut, zero and error
 * targets are cut to size. Null when a target there is of another kind (a snapshot, say), whose
 * sectors cannot be addressed apart from its device; the caller then stacks on the device.
 */
export function sliceTargets(targets: DmTarget[], start: number, length: number): DmTarget[] | null {
  const end = start + length;
  const out: DmTarget[] = [];
  let covered = start;
  for (const t of targets) {
    const tEnd = t.start + t.length;
    if (tEnd <= start || t.start >= end) continue;
    if (t.start > covered) throw new Error(`internal: device-mapper table has a gap at sector ${covered}`);
    const from = Math.max(t.start, start);
    const to = Math.min(tEnd, end);
    let params = t.params;
    if (t.type === 'linear') {
      const m = /^(\S+) (\d+)$/.exec(t.params);
      if (!m) return null;
      params = `${m[1]} ${Number(m[2]) + (from - t.start)}`;
    } else if (t.type !== 'zero' && t.type !== 'error') {
      return null;
    }
    out.push({ start: from - start, length: to - from, type: t.type, params });
    covered = to;
  }
  if (covered !== end) throw new Error(`internal: device-mapper table ends at sector ${covered}, before ${end}`);
  return out;
}

/** "start length type params" (dmTable's line) as a DmTarget. */
export function parseTableLine(line: string): DmTarget {
  const m = /^(\d+) (\d+) (\S+)(?: (.*))?$/.exec(line);
  if (!m) throw new Error(`internal: bad device-mapper line "${line}"`);
  return { start: Number(m[1]), length: Number(m[2]), type: m[3]!, params: m[4] ?? '' };
}

export function formatTarget(t: DmTarget): string {
  return `${t.start} ${t.length} ${t.type}${t.params ? ` ${t.params}` : ''}`;
}

/** The plan as text for `vdboot plan` and rd.vdboot.debug: chain, path, devices with their tables, root. */
export function describeVdiskPlan(plan: VdiskPlan, maxLines = 20): string[] {
  const out: string[] = [];
  out.push(`${plan.name}: ${plan.imagePath} on ${plan.host}, ${humanSize(plan.size)}, mode ${plan.mode}`);
  for (const [i, l] of plan.chain.entries()) out.push(`  ${i === 0 ? 'image ' : 'parent'} ${l.path}: ${formatName(l)}, ${humanSize(l.size)}`);
  out.push(`  path: ${plan.why}`);
  for (const lp of plan.loops) out.push(`  $LOOP${lp.index}: loop device of ${lp.file}${lp.readOnly ? ' (read-only)' : ''}`);
  if (plan.nbd) out.push(`  $NBD: qemu-nbd -f ${plan.nbd.format}${plan.nbd.readOnly ? ' -r' : ''} on ${plan.nbd.file}`);
  if (plan.cowBytes !== undefined) out.push(`  $COW: loop device of a sparse RAM file of ${humanSize(plan.cowBytes)} in /run/vdboot`);
  if (plan.baseIdentity) out.push(`  $COW: the persistent overlay (rd.vdisk.overlay), checked against this image's identity: tables ${plan.baseIdentity.tables}, content ${plan.baseIdentity.content}`);
  const hu = plan.headerUpdate;
  if (hu) out.push(`  before the first write: ${hu.what}: ${hu.writes.length} write${hu.writes.length === 1 ? '' : 's'} ${hu.on === 'device' ? `on ${hu.path} at ${hu.writes.map((w) => `${w.offset}+${w.bytes.length}`).join(', ')}` : `into the file through the mounted host at ${hu.writes.map((w) => w.offset).join(', ')}`}`);
  out.push(`  partitions (${plan.partitionTable}):${plan.partitions.length ? '' : ' none'}`);
  for (const p of plan.partitions) {
    out.push(`    ${p.name}: ${humanSize(p.size)} at ${p.start} ${p.fsType ?? '(no filesystem found)'}${p.label ? ` LABEL="${p.label}"` : ''}${p.uuid ? ` UUID=${p.uuid}` : ''}`);
  }
  for (const d of plan.devices) {
    out.push(`  dm ${d.name} (uuid ${d.uuid}${d.readOnly ? ', read-only' : ''}): ${d.targets.length} target${d.targets.length === 1 ? '' : 's'}`);
    for (const t of d.targets.slice(0, maxLines)) out.push(`    ${formatTarget(t)}`);
    if (d.targets.length > maxLines) out.push(`    … ${d.targets.length - maxLines} more`);
  }
  if (plan.root) out.push(`  root: /dev/mapper/${plan.root.partition.name} (${plan.root.partition.fsType ?? 'no filesystem found'}), chosen by ${plan.root.why}`);
  if (plan.rootDeferred) out.push(`  root: after unlocking and activation, ${plan.rootDeferred.why}`);
  for (const w of plan.warnings) out.push(`  warning: ${w}`);
  return out;
}
