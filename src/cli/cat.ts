/** `vdboot cat IMAGE [--partition N]`: the virtual disk (or one partition) as raw bytes on stdout. */
import type { Command, CliIO } from './main.ts';
import { streamMapped, mappedReader } from '../formats/read-map.ts';
import { parsePartitionTable } from '../formats/partitions.ts';
import { parseImageArgs, UsageError } from './map.ts';
import { openHostImage } from '../sys/host-image.ts';

export const command: Command = {
  summary: 'write the virtual disk (or one of its partitions) as raw bytes to stdout',
  usage: 'vdboot cat IMAGE [--partition N] [--allow-outside]\n  holes read as zeros; N numbers partitions as Linux does (sda1 = 1)\n  --allow-outside  let the image name files outside its folder (extents, backing files)',
  async run(args: string[], io: CliIO): Promise<number> {
    const a = parseImageArgs(args, this.usage, ['--allow-outside'], ['--partition']);
    const img = openHostImage(a.image, { allowOutside: a.flags.has('--allow-outside') });
    try {
      let start = 0;
      let length = img.map.size;
      const part = a.options.get('--partition');
      if (part !== undefined) {
        const n = Number(part);
        if (!Number.isInteger(n) || n < 1) throw new UsageError(`--partition needs a partition number (1, 2, …), not "${part}"`);
        const table = parsePartitionTable(mappedReader(img, a.image));
        const p = table.partitions.find((x) => x.number === n);
        if (!p) {
          const have = table.partitions.map((x) => x.number).join(', ') || 'none';
          throw new UsageError(`${a.image} has no partition ${n} (partition table: ${table.kind}; partitions: ${have})`);
        }
        if (p.extended) throw new UsageError(`partition ${n} of ${a.image} is the extended partition that holds the logical ones`);
        start = p.start;
        length = Math.min(p.size, img.map.size - p.start);
      }
      for (const chunk of streamMapped(img, start, length)) await io.stdoutBytes(chunk);
      return 0;
    } finally {
      img.close();
    }
  },
};
