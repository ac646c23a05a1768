/**
 * Benchmark: the NTFS ownership proof (src/formats/ntfs-owners.ts) over a synthetic $MFT
 * of 1,000,000 in-use records (a 1 TB-class volume with a million files), on the native
 * QuickJS the init runs on (bench/lib/native-quickjs.ts), on quickjs-emscripten and on
 * Node. Issue #14's target: under 1 s of boot time.
 *
 * The records are shaped like Windows': $STANDARD_INFORMATION, $FILE_NAME, and an unnamed
 * $DATA that is non-resident with one run (70 %), three runs (10 %), or resident (20 %,
 * small files); every 8th record a directory with a non-resident $INDEX_ALLOCATION. The
 * target is an image file in 1,000 fragments. The word-reading scan is measured against
 * the byte-by-byte reader (the scan before it) in the same run. Only the scan is timed
 * here (the records are in memory): reading the $MFT itself is one sequential read of
 * 1 KiB per record, whose time is the disk's; the boot-time cost printed is the read at
 * a disk's speed plus the native QuickJS CPU time (no overlap assumed).
 *
 * exFAT's proof (ExfatVolume.proveOwnership: the allocation bitmap, then every directory
 * entry of the volume) is measured on a model volume in the same run (bench/lib/exfat-model.ts):
 * 1 TiB at 128 KiB clusters, 200,000 files in 2,000 directories, a 64 GiB image contiguous
 * and in 1,000 FAT-chained pieces.
 *
 *   npx tsx bench/ntfs-owners.ts [RECORDS] [--no-emscripten] [--no-node] [--no-exfat]
 */
import * as path from 'node:path';
import { RECORD, scanAll } from './lib/ntfs-owners-core.ts';
import { runNative } from './lib/native-quickjs.ts';
import type { ExfatModelOptions } from './lib/exfat-model.ts';

const repo = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');

function cpuMs(since: NodeJS.CpuUsage): number {
  const c = process.cpuUsage(since);
  return Math.round((c.user + c.system) / 1000);
}

async function inEmscripten(records: number, clusters: number, fragments: number, bytewise: boolean): Promise<number> {
  const { build } = await import('esbuild');
  const { getQuickJS } = await import('quickjs-emscripten');
  const bundle = await build({
    stdin: {
      contents: `import { scanAll } from './bench/lib/ntfs-owners-core.ts';\nglobalThis.run = (r, c, f, b) => JSON.stringify(scanAll(r, c, f, b));`,
      resolveDir: repo,
      loader: 'ts',
    },
    bundle: true, format: 'iife', write: false, target: 'es2022', platform: 'neutral',
  });
  const QuickJS = await getQuickJS();
  const rt = QuickJS.newRuntime();
  rt.setMemoryLimit(512 * 1024 * 1024);
  const vm = rt.newContext();
  try {
    vm.unwrapResult(vm.evalCode(bundle.outputFiles[0]!.text)).dispose();
    const c0 = process.cpuUsage();
    const res = vm.unwrapResult(vm.evalCode(`run(${records}, ${clusters}, ${fragments}, ${bytewise})`));
    const cpu = cpuMs(c0);
    const out = JSON.parse(vm.getString(res)) as { conflicts: number };
    res.dispose();
    if (out.conflicts !== 0) throw new Error(`emscripten: ${out.conflicts} conflicts in a volume without any`);
    return cpu;
  } finally {
    vm.dispose();
    rt.dispose();
  }
}

/** CPU ms of the scan on the native QuickJS (the synthetic chunks are made before the clock starts), or why it could not run. */
async function inNative(records: number, clusters: number, fragments: number, bytewise: boolean): Promise<number | string> {
  const r = await runNative(
    `import { scanAll } from './bench/lib/ntfs-owners-core.ts';\nconst r = scanAll(${records}, ${clusters}, ${fragments}, ${bytewise});\nprint(JSON.stringify(r));`,
    repo,
  );
  if ('missing' in r) return `not run: ${r.missing}`;
  const out = JSON.parse(r.out) as { conflicts: number };
  if (out.conflicts !== 0) throw new Error(`native: ${out.conflicts} conflicts in a volume without any`);
  return r.cpuMs;
}

const isMain = typeof process !== 'undefined' && process.argv?.[1]?.endsWith('bench/ntfs-owners.ts');
if (isMain) {
  const records = Number(process.argv.slice(2).find((a) => !a.startsWith('--')) ?? 1_000_000);
  const clusters = 2 ** 28; // 1 TiB at 4 KiB clusters
  const fragments = 1000;
  const mib = (records * RECORD) / 1024 / 1024;
  const perSec = (ms: number) => `${((records / ms) * 1000 / 1e6).toFixed(2)} M records/s`;
  process.stdout.write(`NTFS ownership proof: ${records} in-use MFT records (${mib.toFixed(0)} MiB of $MFT), an image in ${fragments} fragments, a 1 TiB volume\n`);
  const rows: [string, number | string, number | string][] = [];
  const nWord = await inNative(records, clusters, fragments, false);
  const nByte = await inNative(records, clusters, fragments, true);
  rows.push(['QuickJS (native, as /init)', nWord, nByte]);
  if (!process.argv.includes('--no-emscripten')) rows.push(['QuickJS (quickjs-emscripten)', await inEmscripten(records, clusters, fragments, false), await inEmscripten(records, clusters, fragments, true)]);
  if (!process.argv.includes('--no-node')) {
    const c0 = process.cpuUsage();
    scanAll(records, clusters, fragments, false);
    const w = cpuMs(c0);
    const c1 = process.cpuUsage();
    scanAll(records, clusters, fragments, true);
    rows.push([`Node ${process.version}`, w, cpuMs(c1)]);
  }
  for (const [name, w, b] of rows) {
    const fmt = (x: number | string) => (typeof x === 'number' ? `${x} ms CPU (${perSec(x)})` : x);
    const ratio = typeof w === 'number' && typeof b === 'number' ? `, ${(b / w).toFixed(2)}x faster` : '';
    process.stdout.write(`  ${name}: word scan ${fmt(w)}; byte-by-byte reader ${fmt(b)}${ratio}\n`);
  }
  const cpu = typeof nWord === 'number' ? nWord / 1000 : NaN;
  for (const [disk, mbs] of [['SATA SSD', 500], ['NVMe', 2000], ['NVMe gen4', 5000]] as const) {
    const io = (mib * 1.048576) / mbs;
    process.stdout.write(`  boot-time cost, ${disk} at ${mbs} MB/s: reading the $MFT ${io.toFixed(2)} s + scan ${cpu.toFixed(2)} s = ${(io + cpu).toFixed(2)} s (${Math.max(io, cpu).toFixed(2)} s were the read and the scan overlapped)\n`);
  }
  if (!process.argv.includes('--no-exfat')) {
    const cases: [string, ExfatModelOptions][] = [
      ['contiguous', { files: 200_000, perDir: 100, imageBytes: 64 * 2 ** 30, fragments: 1 }],
      ['1,000 FAT-chained pieces', { files: 200_000, perDir: 100, imageBytes: 64 * 2 ** 30, fragments: 1000 }],
    ];
    process.stdout.write(`exFAT ownership proof: a 1 TiB volume at 128 KiB clusters, 200,000 files in 2,000 directories (256 MiB of directory clusters read), a 64 GiB image\n`);
    for (const [name, o] of cases) {
      const code = `import { exfatModel } from './bench/lib/exfat-model.ts';\nimport { openExfat } from './src/formats/exfat.ts';\n` +
        `const m = exfatModel(${JSON.stringify(o)});\nconst v = openExfat(m.reader);\nconst f = v.lookup(m.imagePath);\nconst t0 = Date.now();\nv.proveOwnership([f]);\nprint(Date.now() - t0);`;
      const q = await runNative(code, repo);
      process.stdout.write(`  image ${name}: QuickJS (native) ${'missing' in q ? `not run: ${q.missing}` : `${q.out.trim()} ms`} (directory reads from memory)\n`);
    }
  }
}
