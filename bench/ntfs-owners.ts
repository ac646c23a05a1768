/**
 * Benchmark: the NTFS ownership proof (src/formats/ntfs-owners.ts) over a synthetic $MFT
 * of 1,000,000 in-use records (a 1 TB-class volume with a million files), on Node and
 * inside QuickJS (quickjs-emscripten). Issue #14's target: under 1 s of boot time.
 *
 * The records are shaped like Windows': $STANDARD_INFORMATION, $FILE_NAME, and an unnamed
 * $DATA that is non-resident with one run (70 %), three runs (10 %), or resident (20 %,
 * small files); every 8th record a directory with a non-resident $INDEX_ALLOCATION. The
 * target is an image file in 1,000 fragments. Only the scan is timed here (the records
 * are in memory): reading the $MFT itself is one sequential read of 1 GiB, whose time is
 * the disk's (printed for 500 MB/s and 2 GB/s).
 *
 *   npx tsx bench/ntfs-owners.ts [RECORDS] [--no-quickjs]
 */
import * as path from 'node:path';
import { RECORD, scanAll } from './lib/ntfs-owners-core.ts';

function cpuMs(since: NodeJS.CpuUsage): number {
  const c = process.cpuUsage(since);
  return Math.round((c.user + c.system) / 1000);
}

async function inQuickJS(records: number, clusters: number, fragments: number): Promise<{ ms: number; cpuMs: number; conflicts: number }> {
  const { build } = await import('esbuild');
  const { getQuickJS } = await import('quickjs-emscripten');
  const bundle = await build({
    stdin: {
      contents: `import { scanAll } from './bench/lib/ntfs-owners-core.ts';\nglobalThis.run = (r, c, f) => JSON.stringify(scanAll(r, c, f));`,
      resolveDir: path.resolve(path.dirname(new URL(import.meta.url).pathname), '..'),
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
    const res = vm.unwrapResult(vm.evalCode(`run(${records}, ${clusters}, ${fragments})`));
    const cpu = cpuMs(c0);
    const out = JSON.parse(vm.getString(res)) as { ms: number; conflicts: number };
    res.dispose();
    return { ...out, cpuMs: cpu };
  } finally {
    vm.dispose();
    rt.dispose();
  }
}

const isMain = typeof process !== 'undefined' && process.argv?.[1]?.endsWith('bench/ntfs-owners.ts');
if (isMain) {
  const records = Number(process.argv.slice(2).find((a) => !a.startsWith('--')) ?? 1_000_000);
  const clusters = 2 ** 28; // 1 TiB at 4 KiB clusters
  const fragments = 1000;
  const c0 = process.cpuUsage();
  const node = scanAll(records, clusters, fragments);
  const nodeCpu = cpuMs(c0);
  process.stdout.write(
    `NTFS ownership proof: ${records} in-use MFT records (${(records / 1024).toFixed(0)} MiB of $MFT), an image in ${fragments} fragments, a 1 TiB volume\n` +
      `  Node ${process.version}: scan ${node.ms} ms wall, ${nodeCpu} ms CPU (${node.conflicts} conflicts)\n`,
  );
  if (!process.argv.includes('--no-quickjs')) {
    const q = await inQuickJS(records, clusters, fragments);
    process.stdout.write(`  QuickJS (quickjs-emscripten): scan ${q.ms} ms wall, ${q.cpuMs} ms CPU with the bundle's setup (${q.conflicts} conflicts)\n`);
  }
  const mib = (records * RECORD) / 1024 / 1024;
  process.stdout.write(`  reading the $MFT: ${mib.toFixed(0)} MiB, ${(mib / 500).toFixed(1)} s at 500 MB/s (SATA SSD), ${(mib / 2000).toFixed(2)} s at 2 GB/s (NVMe)\n`);
}
