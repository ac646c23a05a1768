#!/usr/bin/env node
// Runs the bundled host command (build/cli.mjs, made by `npm run build`).
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const bundle = fileURLToPath(new URL('../build/cli.mjs', import.meta.url));
if (!existsSync(bundle)) {
  process.stderr.write('vdboot: build/cli.mjs is missing; run "bash scripts/ensure-deps.sh && npm run build" in the checkout first.\n');
  process.exit(2);
}
const { runCli } = await import(bundle);
process.exitCode = await runCli(process.argv.slice(2));
