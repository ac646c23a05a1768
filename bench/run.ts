// `npm run bench`: runs every benchmark in bench/ (each *.ts but this one), in name order,
// each in its own Node process, and fails when one of them fails.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const benchDir = path.dirname(fileURLToPath(import.meta.url));
const self = path.basename(fileURLToPath(import.meta.url));
const benches = fs
  .readdirSync(benchDir)
  .filter((f) => f.endsWith('.ts') && !f.endsWith('.d.ts') && f !== self)
  .sort();

const failed: string[] = [];
for (const bench of benches) {
  process.stdout.write(`\n=== bench/${bench} ===\n`);
  const r = spawnSync(process.execPath, ['--import', 'tsx', path.join(benchDir, bench)], { stdio: 'inherit' });
  if (r.status !== 0) failed.push(`${bench} (${r.signal ?? `exit ${r.status}`})`);
}
if (failed.length) {
  process.stderr.write(`\nbench: failed: ${failed.join(', ')}\n`);
  process.exit(1);
}
process.stdout.write(`\nbench: ${benches.length} benchmark(s) done\n`);
