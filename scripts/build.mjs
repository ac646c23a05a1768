// Builds vdboot: the host command (build/cli.mjs), the init bundle (build/init.js) and,
// when the boot entry exists, the static /init host with that bundle embedded (init/).
import { build } from 'esbuild';
import { existsSync, mkdirSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import os from 'node:os';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('..', import.meta.url));
process.chdir(root);
mkdirSync('build', { recursive: true });

await build({
  entryPoints: ['src/cli/node-entry.ts'],
  outfile: 'build/cli.mjs',
  bundle: true,
  platform: 'node',
  format: 'esm',
  target: 'node20',
  sourcemap: 'linked',
  logLevel: 'warning',
  banner: { js: "import { createRequire as __vdbootRequire } from 'node:module'; const require = __vdbootRequire(import.meta.url);" },
});

if (existsSync('src/boot/main.ts')) {
  // The init bundle runs on QuickJS: one ES module, the native `sys` module left external.
  await build({
    entryPoints: ['src/boot/main.ts'],
    outfile: 'build/init.js',
    bundle: true,
    platform: 'neutral',
    format: 'esm',
    target: 'es2022',
    external: ['sys'],
    minifySyntax: true,
    legalComments: 'none',
    logLevel: 'warning',
  });
  if (existsSync('init/Makefile')) {
    // -j: QuickJS is compiled twice (gcc for qjsc, musl-gcc for /init), side by side.
    execFileSync('make', ['-s', `-j${os.availableParallelism()}`, '-C', 'init'], { stdio: 'inherit' });
  }
}
