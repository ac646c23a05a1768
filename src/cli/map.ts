/**
 * `vdboot map IMAGE [--json] [--dm]`: the image's ExtentMap (the whole chain composed).
 * Also home of the argument parsing the image commands share; they open images with
 * src/sys/host-image.ts.
 */
import type { Command, CliIO } from './main.ts';
import type { OpenedImage } from '../formats/image.ts';
import { dmTable, summarizeMap } from '../formats/extent-ops.ts';
import { openHostImage } from '../sys/host-image.ts';

export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'UsageError';
  }
}

export interface ImageArgs {
  image: string;
  flags: Set<string>;
  options: Map<string, string>;
}

/** IMAGE plus --flags (no value) and --options VALUE, as the command allows them. */
export function parseImageArgs(args: string[], usage: string, flags: string[], options: string[] = []): ImageArgs {
  const out: ImageArgs = { image: '', flags: new Set(), options: new Map() };
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (flags.includes(a)) out.flags.add(a);
    else if (options.includes(a)) {
      const v = args[++i];
      if (v === undefined) throw new UsageError(`${a} needs a value\n${usage}`);
      out.options.set(a, v);
    } else if (a.startsWith('--') && options.includes(a.split('=')[0]!)) {
      out.options.set(a.split('=')[0]!, a.slice(a.indexOf('=') + 1));
    } else if (a.startsWith('-') && a !== '-') throw new UsageError(`unknown option ${a}\n${usage}`);
    else if (out.image) throw new UsageError(`one image only (got "${out.image}" and "${a}")\n${usage}`);
    else out.image = a;
  }
  if (!out.image) throw new UsageError(`no image given\n${usage}`);
  return out;
}

function extentLine(e: OpenedImage['map']['extents'][number], files: string[]): string {
  const range = `${String(e.start).padStart(14)} ${String(e.length).padStart(14)}`;
  if (e.kind === 'data') return `${range}  data        ${files[e.file]} @ ${e.offset}`;
  if (e.kind === 'zero') return `${range}  zero        (${e.why})`;
  return `${range}  unmappable  (${e.reason})`;
}

export const command: Command = {
  summary: 'print the extent map of a disk image (where each range of the virtual disk lies)',
  usage: 'vdboot map IMAGE [--json] [--dm] [--allow-outside]\n  --json  the ExtentMap as JSON\n  --dm    the device-mapper table it gives (512-byte sectors)\n  --allow-outside  let the image name files outside its folder (extents, backing files)',
  async run(args: string[], io: CliIO): Promise<number> {
    const a = parseImageArgs(args, this.usage, ['--json', '--dm', '--allow-outside']);
    const img = openHostImage(a.image, { allowOutside: a.flags.has('--allow-outside') });
    try {
      const { map } = img;
      if (a.flags.has('--json')) {
        io.stdout(`${JSON.stringify(map, null, 1)}\n`);
      } else if (a.flags.has('--dm')) {
        for (const line of dmTable(map)) io.stdout(`${line}\n`);
      } else {
        const s = summarizeMap(map);
        io.stdout(`# ${a.image}: ${map.size} bytes, ${s.extents} extents (data ${s.dataBytes}, zero ${s.zeroBytes}, unmappable ${s.unmappableBytes})\n`);
        io.stdout(`# ${'start'.padStart(12)} ${'length'.padStart(14)}  kind\n`);
        let chunk: string[] = [];
        for (const e of map.extents) {
          chunk.push(extentLine(e, map.files));
          if (chunk.length === 4096) { io.stdout(`${chunk.join('\n')}\n`); chunk = []; }
        }
        if (chunk.length) io.stdout(`${chunk.join('\n')}\n`);
      }
      return 0;
    } finally {
      img.close();
    }
  },
};
