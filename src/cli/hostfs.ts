/**
 * `vdboot hostfs DISK [--partition N] [PATH] [--cat]`: what vdboot itself sees on an
 * NTFS, exFAT or FAT partition: a directory listing, or a file's extents on the
 * partition (the ones a direct mapping would use), or the file's bytes.
 */
import type { Command, CliIO } from './main.ts';
import { hostFileReader, type FileExtent, type HostFs } from '../formats/host-volume.ts';
import { openHostFs } from '../formats/hostfs.ts';
import { parsePartitionTable, sliceReader } from '../formats/partitions.ts';
import { FormatError, type BlockReader } from '../formats/block-reader.ts';
import { openFileReader } from '../sys/node-reader.ts';
import { UsageError } from './map.ts';

const USAGE = `vdboot hostfs DISK [--partition N] [PATH] [--cat]
  DISK: a raw disk or partition (image file or block device) holding NTFS, exFAT or FAT
  PATH a directory: its entries; PATH a file: its size and extents on the partition
  --cat: the file's bytes on stdout (holes and uninitialized ranges as zeros)
  N numbers partitions as Linux does (sda1 = 1)`;

export const command: Command = {
  summary: 'list a directory or show a file\'s extents on an NTFS/exFAT/FAT partition, as vdboot reads it',
  usage: USAGE,
  async run(args: string[], io: CliIO): Promise<number> {
    let disk: string | undefined;
    let target = '/';
    let partition: number | undefined;
    let cat = false;
    const rest: string[] = [];
    for (let i = 0; i < args.length; i++) {
      const a = args[i]!;
      if (a === '--partition') {
        const v = args[++i];
        partition = Number(v);
        if (!Number.isInteger(partition) || partition < 1) throw new UsageError(`--partition needs a partition number (1, 2, …), not "${v ?? ''}"\n${USAGE}`);
      } else if (a === '--cat') cat = true;
      else if (a.startsWith('--')) throw new UsageError(`unknown option ${a}\n${USAGE}`);
      else rest.push(a);
    }
    if (rest.length < 1 || rest.length > 2) throw new UsageError(`give a DISK and at most one PATH\n${USAGE}`);
    disk = rest[0]!;
    if (rest[1] !== undefined) target = rest[1];
    const reader = openFileReader(disk);
    try {
      let part: BlockReader = reader;
      if (partition !== undefined) {
        const table = parsePartitionTable(reader);
        const p = table.partitions.find((x) => x.number === partition);
        if (!p || p.extended) {
          const have = table.partitions.filter((x) => !x.extended).map((x) => x.number).join(', ') || 'none';
          throw new UsageError(`${disk} has no partition ${partition} with a filesystem (partition table: ${table.kind}; partitions: ${have})`);
        }
        part = sliceReader(reader, p.start, Math.min(p.size, reader.size - p.start), `${disk} partition ${partition}`);
      }
      const fsys = openHostFs(part);
      if (!fsys) throw new FormatError(`${part.name} holds no NTFS, exFAT or FAT filesystem${partition === undefined ? ' (is it a whole disk? add --partition N)' : ''}`, 'disk', disk);
      if (cat) {
        const file = fsys.lookup(target);
        const r = hostFileReader(fsys, file);
        for (let o = 0; o < r.size; o += 1 << 20) await io.stdoutBytes(r.read(o, Math.min(1 << 20, r.size - o)));
        return 0;
      }
      io.stdout(describe(fsys));
      let isDir = true;
      try {
        const entries = fsys.readdir(target);
        for (const e of entries) io.stdout(`${e.isDir ? 'dir ' : 'file'} ${String(e.isDir ? '' : e.size).padStart(14)}  ${e.name}${e.isDir ? '/' : ''}\n`);
      } catch (e) {
        if (!(e instanceof Error) || !/is a file, not a directory/.test(e.message)) throw e;
        isDir = false;
      }
      if (!isDir) {
        const f = fsys.lookup(target);
        io.stdout(`${f.path}: ${f.size} bytes\n`);
        if (f.resident) io.stdout('  stored inside its MFT record (resident): no clusters of its own, cannot be mapped\n');
        for (const e of f.extents) io.stdout(`  ${extentLine(e)}\n`);
        const sum = (k: FileExtent['kind']) => f.extents.filter((e) => e.kind === k).reduce((n, e) => n + e.length, 0);
        io.stdout(`  ${f.extents.length} extents: ${sum('data')} bytes data, ${sum('hole')} in holes, ${sum('uninitialized')} uninitialized\n`);
      }
      return 0;
    } finally {
      reader.close();
    }
  },
};

function describe(fsys: HostFs): string {
  const blocker = fsys.writeBlocker();
  return `${fsys.type}${fsys.label ? ` "${fsys.label}"` : ''}, ${fsys.clusterSize}-byte clusters; ` +
    `${blocker ? `NOT writable: ${blocker}` : 'clean (vdboot may write through it)'}\n`;
}

function extentLine(e: FileExtent): string {
  const range = `file ${e.fileOffset}..${e.fileOffset + e.length - 1}`;
  if (e.kind === 'hole') return `${range}  hole`;
  const dev = e.deviceOffset === undefined ? '' : `  at partition byte ${e.deviceOffset}`;
  return `${range}  ${e.kind}${dev}`;
}
