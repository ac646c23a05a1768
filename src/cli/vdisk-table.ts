/**
 * `vdboot vdisk-table NAME.vdisk.json [--force] [--allow-outside]`: writes the partition table file of a
 * disk definition (see src/formats/vdisk-json.ts), once, on the host. vdboot never writes
 * it at boot: device-mapper can only map bytes that are in a file.
 */
import * as fs from 'node:fs';
import { dirName, joinPath, openDefinitionPartition } from '../formats/chain.ts';
import { gptTypeName } from '../formats/guid.ts';
import { planVdiskTable, verifyVdiskTableFile } from '../formats/vdisk-json.ts';
import { nodeChainHost, openFileReader } from '../sys/node-reader.ts';
import type { CliIO, Command } from './main.ts';

export const command: Command = {
  summary: 'write the partition table file of a disk assembled from partition images (*.vdisk.json)',
  usage: [
    'vdboot vdisk-table NAME.vdisk.json [--force] [--allow-outside]',
    '  Writes NAME.vdisk.table next to the JSON: the partition table and the gaps between the',
    '  partition images, which the assembled disk maps like any other file.',
    '  An existing table file that matches the JSON is left as it is (a guest may have written',
    '  its boot loader into the gaps); --force rewrites it from the JSON.',
    '  --allow-outside lets the partition images (and the files they name) lie outside the',
    '  JSON\'s folder; boot such a disk with rd.vdisk.allow-outside=1.',
  ].join('\n'),
  async run(args: string[], io: CliIO): Promise<number> {
    const force = args.includes('--force');
    const allowOutside = args.includes('--allow-outside');
    const rest = args.filter((a) => a !== '--force' && a !== '--allow-outside');
    if (rest.length !== 1 || rest[0]!.startsWith('-')) {
      io.stderr(`${this.usage}\n`);
      return 2;
    }
    const jsonPath = rest[0]!;
    const host = nodeChainHost({ allowOutside });
    try {
      const dir = dirName(jsonPath);
      const { layout, bytes } = planVdiskTable(fs.readFileSync(jsonPath, 'utf8').replace(/^\ufeff/, ''), jsonPath, (p) => openDefinitionPartition(jsonPath, p, host));
      const tablePath = joinPath(dir, layout.spec.tableFile);
      if (fs.existsSync(tablePath) && !force) {
        const r = openFileReader(tablePath);
        try {
          const warnings = verifyVdiskTableFile(layout, r, jsonPath);
          io.stdout(`${tablePath} is up to date; nothing written.\n`);
          for (const w of warnings) io.stdout(`  note: ${w}\n`);
          return 0;
        } catch (e) {
          io.stderr(`vdboot vdisk-table: ${(e as Error).message}\n`);
          return 1;
        }
        finally {
          r.close();
        }
      }
      const tmp = `${tablePath}.tmp-${process.pid}`;
      fs.writeFileSync(tmp, bytes);
      fs.renameSync(tmp, tablePath);
      const { spec } = layout;
      io.stdout(`wrote ${tablePath} (${bytes.length} bytes): ${spec.table.toUpperCase()}, ${spec.sectorSize}-byte sectors, disk of ${layout.diskSize} bytes\n`);
      layout.partitions.forEach((p, i) => {
        const s = spec.partitions[i]!;
        const type = spec.table === 'gpt' ? gptTypeName(String(s.type)) : `type 0x${Number(s.type).toString(16)}`;
        const partuuid = spec.table === 'gpt' ? s.uuid! : `${spec.diskSignature}-${p.number.toString(16).padStart(2, '0')}`;
        io.stdout(`  ${String(p.number).padStart(3)}  start ${String(p.start).padStart(14)}  size ${String(p.size).padStart(14)}  ${type}  PARTUUID=${partuuid}${s.name ? `  PARTLABEL=${s.name}` : ''}  ${s.image}\n`);
      });
      return 0;
    } catch (e) {
      io.stderr(`vdboot vdisk-table: ${(e as Error).message}\n`);
      return 1;
    } finally {
      host.close();
    }
  },
};
