/**
 * Runs engine-neutral benchmark code on the native QuickJS the init is built from (the
 * `build/native/host` objects of `npm run build`, -O2 like the init's own), not only on
 * Node or quickjs-emscripten: the boot's figures are this interpreter's. The runner
 * (bench/lib/qjs-run.c) is compiled once into build/native/qjs-run.
 *
 *   runNative(source, resolveDir): { out, cpuMs }   source: a TypeScript module whose
 *       code calls print(...); its stdout is returned, with the CPU time of the script.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const objDir = path.join(repo, 'build/native/host');
const srcDir = path.join(repo, '.cache/quickjs/src');
const runner = path.join(repo, 'build/native/qjs-run');

/** The runner's path, or why it cannot be built (no `npm run build` yet, no gcc). */
export function nativeRunner(): string | { missing: string } {
  const objs = ['quickjs', 'libregexp', 'libunicode', 'cutils', 'dtoa', 'quickjs-libc'].map((o) => path.join(objDir, `${o}.o`));
  const missing = objs.find((o) => !fs.existsSync(o));
  if (missing) return { missing: `${missing} (run npm run build first)` };
  const src = path.join(repo, 'bench/lib/qjs-run.c');
  if (!fs.existsSync(runner) || fs.statSync(runner).mtimeMs < fs.statSync(src).mtimeMs) {
    execFileSync('gcc', ['-O2', '-I', srcDir, '-o', runner, src, ...objs, '-lm', '-lpthread'], { stdio: 'inherit' });
  }
  return runner;
}

export async function runNative(source: string, resolveDir: string): Promise<{ out: string; cpuMs: number } | { missing: string }> {
  const r = nativeRunner();
  if (typeof r !== 'string') return r;
  const { build } = await import('esbuild');
  const bundle = await build({
    stdin: { contents: source, resolveDir, loader: 'ts' },
    bundle: true, format: 'iife', write: false, target: 'es2022', platform: 'neutral',
  });
  const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-qjs-')), 'bench.js');
  try {
    fs.writeFileSync(file, bundle.outputFiles[0]!.text);
    const p = spawnSync(r, [file], { encoding: 'utf8', maxBuffer: 64 * 1024 * 1024 });
    if (p.status !== 0) throw new Error(`native QuickJS: exit ${p.status ?? p.signal}: ${p.stderr}`);
    const m = /cpu_ms (\d+)/.exec(p.stderr);
    return { out: p.stdout, cpuMs: m ? Number(m[1]) : NaN };
  } finally {
    fs.rmSync(path.dirname(file), { recursive: true, force: true });
  }
}
