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
    // The same /init with bytecode stripped of debug info, for --hostonly images (mkinitramfs
    // picks it when present): 0.13 MiB smaller zstd-compressed, stack traces without lines.
    execFileSync('make', ['-s', '-C', 'init', `OUT=${root}build/init-stripped`, 'QJSC_FLAGS=-s'], { stdio: 'inherit' });
    // build/init-aarch64 for arm64 machines, with Debian's cross compiler and musl for arm64
    // (init/Makefile). Without the cross compiler, or when it fails, the x86-64 build stands
    // and this says why; the package build (prepack: VDBOOT_ALL_ARCHES=1) fails instead.
    const all = process.env.VDBOOT_ALL_ARCHES === '1';
    let cross = true;
    try {
      execFileSync('aarch64-linux-gnu-gcc', ['--version'], { stdio: 'ignore' });
    } catch {
      cross = false;
    }
    const skip = (why) => {
      if (all) throw new Error(`build/init-aarch64: ${why}`);
      process.stderr.write(`init: build/init-aarch64 not built: ${why}\n`);
    };
    if (!cross) skip('aarch64-linux-gnu-gcc is missing (Debian package gcc-aarch64-linux-gnu; scripts/ensure-deps.sh installs it)');
    else {
      try {
        execFileSync('make', ['-s', `-j${os.availableParallelism()}`, '-C', 'init', 'ARCH=aarch64'], { stdio: 'inherit' });
      } catch (e) {
        skip(`the cross build failed (${e.message.split('\n')[0]}); run "make -C init ARCH=aarch64" to see why`);
      }
    }
  }
}
