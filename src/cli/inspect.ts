/**
 * `vdboot inspect IMAGE [--json]`: format, virtual size, the chain of parents, each
 * layer's facts (block size, allocation), the partitions with their filesystems (type,
 * LABEL, UUID as blkid reports them), and whether the image can be
 * mapped with device-mapper for read-only and read-write boots, and why not.
 */
import type { Command, CliIO } from './main.ts';
import { dmTable, summarizeMap } from '../formats/extent-ops.ts';
import { mappedReader } from '../formats/read-map.ts';
import { parsePartitionTable, sliceReader, type PartitionTable } from '../formats/partitions.ts';
import { probeFilesystem, type ProbeResult } from '../formats/probe.ts';
import { describeLayers, type LayerSource } from '../boot/layers.ts';
import { gptTypeName } from '../formats/guid.ts';
import { parseImageArgs } from './map.ts';
import { openHostImage } from '../sys/host-image.ts';
import type { OpenedImage } from '../formats/image.ts';
import { readBitLocker, type BitLockerVolume } from '../formats/bitlocker.ts';
import { bitLockerBootLines } from '../boot/bitlocker.ts';

export interface Mappability {
  ok: boolean;
  reason: string;
}

/** Whether the map can become a dm table for reading / for writing, and why not. */
export function mappability(img: OpenedImage): { readOnly: Mappability; readWrite: Mappability } {
  const check = (writable: boolean): Mappability => {
    try {
      if (writable && img.layers.length > 1) {
        const own = new Set(img.layers[0]!.fileIndex);
        const inParent = img.map.extents.find((e) => e.kind === 'data' && !own.has(e.file));
        if (inParent && inParent.kind === 'data') {
          return { ok: false, reason: `virtual bytes ${inParent.start}.. lie in the parent image ${img.map.files[inParent.file]}: writes there would change the parent. Use rd.vdisk.mode=snapshot or merge the chain` };
        }
      }
      dmTable(img.map, { writable });
      return { ok: true, reason: writable ? 'every range is data in an image file' : 'every range is data or zeros' };
    } catch (e) {
      return { ok: false, reason: (e as Error).message };
    }
  };
  return { readOnly: check(false), readWrite: check(true) };
}

function human(n: number): string {
  const units = ['bytes', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) { v /= 1024; u++; }
  return u === 0 ? `${n} bytes` : `${n} bytes (${v.toFixed(v < 10 ? 2 : 1)} ${units[u]})`;
}

export const command: Command = {
  summary: 'describe a disk image: format, size, parents, partitions, how it can be mapped',
  usage: 'vdboot inspect IMAGE [--json] [--allow-outside]\n  --allow-outside  let the image name files outside its folder (extents, backing files)',
  async run(args: string[], io: CliIO): Promise<number> {
    const a = parseImageArgs(args, this.usage, ['--json', '--allow-outside']);
    const img = openHostImage(a.image, { allowOutside: a.flags.has('--allow-outside') });
    try {
      const top = img.layers[0]!.layer;
      const summary = summarizeMap(img.map);
      const disk = mappedReader(img, a.image);
      let partitions: PartitionTable | { error: string };
      const filesystems: Record<string, ProbeResult | { error: string } | null> = {};
      // BitLocker volumes: their metadata (protectors, cipher) read without a key.
      const bitlocker: Record<string, BitLockerVolume | { error: string }> = {};
      const probe = (key: string, r: () => ReturnType<typeof mappedReader>) => {
        try {
          const reader = r();
          filesystems[key] = probeFilesystem(reader);
          if (filesystems[key]?.type === 'BitLocker') {
            try {
              bitlocker[key] = readBitLocker(reader);
            } catch (e) {
              bitlocker[key] = { error: (e as Error).message };
            }
          }
        } catch (e) {
          filesystems[key] = { error: (e as Error).message };
        }
      };
      try {
        partitions = parsePartitionTable(disk);
        for (const p of partitions.partitions) {
          if (!p.extended) probe(String(p.number), () => sliceReader(disk, p.start, Math.min(p.size, disk.size - p.start), `${a.image} partition ${p.number}`));
        }
        if (partitions.kind === 'none') probe('disk', () => disk);
      } catch (e) {
        partitions = { error: (e as Error).message };
      }
      const fsText = (key: string): string => {
        const f = filesystems[key];
        if (f === undefined) return '';
        if (f === null) return ', no filesystem recognized';
        if ('error' in f) return `, filesystem unreadable: ${f.error}`;
        const b = bitlocker[key];
        const bitlk = b === undefined ? '' : 'error' in b ? `\n      BitLocker metadata unreadable: ${b.error}` : `\n${bitLockerBootLines(b, key === 'disk' ? 'the disk' : `partition ${key}`, undefined).map((l) => `      ${l}`).join('\n')}`;
        return `, ${f.type}${f.label ? ` LABEL="${f.label}"` : ''}${f.uuid ? ` UUID=${f.uuid}` : ''}${bitlk}`;
      };
      // LUKS volumes and LVM PVs among the partitions (or the whole disk), seen without a key
      const layerSources: LayerSource[] = 'error' in partitions ? [] : partitions.kind === 'none'
        ? [{ name: 'whole disk', reader: disk }]
        : partitions.partitions.filter((p) => !p.extended).map((p) => ({ name: `partition ${p.number}`, reader: sliceReader(disk, p.start, Math.min(p.size, disk.size - p.start), `${a.image} partition ${p.number}`) }));
      const layers = describeLayers(layerSources);
      const mapping = mappability(img);
      const chain = img.layers.map((l) => ({
        path: l.path,
        format: l.layer.format,
        subformat: l.layer.subformat,
        size: l.layer.size,
        ...(l.layer.id ? { id: l.layer.id } : {}),
        files: l.layer.files,
        details: l.layer.details,
      }));
      if (a.flags.has('--json')) {
        io.stdout(`${JSON.stringify({ image: a.image, format: top.format, subformat: top.subformat, size: img.map.size, chain, map: summary, partitions, filesystems, layers, ...(Object.keys(bitlocker).length ? { bitlocker } : {}), mapping }, null, 1)}\n`);
        return 0;
      }
      const out: string[] = [];
      out.push(`image:        ${a.image}`);
      out.push(`format:       ${top.format} (${top.subformat})`);
      out.push(`virtual size: ${human(img.map.size)}`);
      if (img.layers.length > 1) out.push(`chain:        ${img.layers.map((l) => `${l.path} [${l.layer.format} ${l.layer.subformat}]`).join(' -> ')}`);
      for (const [i, l] of chain.entries()) {
        out.push(`layer ${i}: ${l.path} — ${l.format} ${l.subformat}, ${human(l.size)}${l.id ? `, id ${l.id}` : ''}`);
        if (l.files.length > 1) out.push(`  files: ${l.files.join(', ')}`);
        for (const [k, v] of Object.entries(l.details)) out.push(`  ${k}: ${v}`);
      }
      const why = Object.entries(summary.zeroBytesByWhy).map(([k, v]) => `${k} ${v}`).join(', ');
      out.push(`map:          ${summary.extents} extents; data ${human(summary.dataBytes)}; zero ${summary.zeroBytes}${why ? ` (${why})` : ''}; unmappable ${summary.unmappableBytes}`);
      if ('error' in partitions) out.push(`partitions:   cannot read them: ${partitions.error}`);
      else if (partitions.kind === 'none') out.push(`partitions:   no partition table${fsText('disk')}`);
      else {
        out.push(`partitions:   ${partitions.kind.toUpperCase()}, ${partitions.sectorSize}-byte sectors${partitions.diskGuid ? `, disk GUID ${partitions.diskGuid}` : ''}${partitions.diskSignature ? `, disk signature ${partitions.diskSignature}` : ''}`);
        for (const p of partitions.partitions) {
          const type = partitions.kind === 'gpt' ? gptTypeName(p.type) : `type 0x${p.type}`;
          out.push(`  ${String(p.number).padStart(2)}: start ${p.start}, ${human(p.size)}, ${type}${p.name ? `, name "${p.name}"` : ''}, PARTUUID ${p.partuuid}${p.bootable ? ', bootable' : ''}${p.extended ? ', extended' : ''}${fsText(String(p.number))}`);
        }
        for (const w of partitions.warnings) out.push(`  warning: ${w}`);
      }
      if (layers.length) out.push('layers:', ...layers.map((l) => `  ${l}`));
      out.push(`read-only boot (direct dm):  ${mapping.readOnly.ok ? 'yes' : 'no'} — ${mapping.readOnly.reason}`);
      out.push(`read-write boot (direct dm): ${mapping.readWrite.ok ? 'yes' : 'no'} — ${mapping.readWrite.reason}`);
      io.stdout(`${out.join('\n')}\n`);
      return 0;
    } finally {
      img.close();
    }
  },
};
