// root=tmpfs, the unpacker's own cost (issue 13), on the build machine without QEMU: an
// uncompressed tar of many small files (so the per-entry cost dominates, not the copying)
// unpacked into a tmpfs by vdboot's unpacker running in its static host (the init's own
// QuickJS, -O2, and native `sys` module), against `busybox tar -xf` of the same archive
// into the same tmpfs, alternating, each round on a fresh directory. The clock is CPU
// time (user + system: the interpreter and the kernel's work for it), so the machine's
// other load changes it less than wall time. Also: the same unpacker reading the archive
// without creating anything (`parse`), which splits the cost between the reader and the
// file creation. Prints the median ratio busybox / vdboot with its range (target >= 0.9).
// BENCH_RUNS=N rounds (5); BENCH_FILES=N files in the archive (12000).
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';
import { buildSmallFileTree } from './lib/small-tree.ts';

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const runs = Math.max(1, Number(process.env.BENCH_RUNS ?? 5) || 5);
const fileCount = Math.max(100, Number(process.env.BENCH_FILES ?? 12000) || 12000);
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-bench-unpack-'));
const mnt = path.join(work, 'mnt');

function median(xs: number[]): number {
  return [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
}

try {
  const tree = path.join(work, 'tree');
  buildSmallFileTree(tree, fileCount);
  const tar = path.join(work, 'root.tar');
  execFileSync('tar', ['-C', tree, '-cf', tar, '.']);
  fs.rmSync(tree, { recursive: true, force: true });
  const entries = Number(execFileSync('sh', ['-c', `tar -tf ${tar} | wc -l`], { encoding: 'utf8' }).trim());
  const js = path.join(work, 'entry.js');
  await build({
    entryPoints: [path.join(repo, 'bench/lib/unpack-entry.ts')], outfile: js, bundle: true, platform: 'neutral',
    format: 'esm', target: 'es2022', external: ['sys'], minifySyntax: true, legalComments: 'none', logLevel: 'warning',
  });
  const init = path.join(work, 'unpack.init');
  execFileSync('make', ['-s', '-j2', '-C', path.join(repo, 'init'), 'deps'], { stdio: ['ignore', 'pipe', 'inherit'] });
  execFileSync('make', ['-s', '-j2', '-C', path.join(repo, 'init'), `ENTRY=${js}`, `OUT=${init}`], { stdio: ['ignore', 'pipe', 'inherit'] });
  fs.mkdirSync(mnt);
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=1G', 'tmpfs', mnt]);
  console.log(`${os.cpus().length} CPUs, load average ${os.loadavg().map((l) => l.toFixed(1)).join(' ')}; archive: ${entries} entries, ${(fs.statSync(tar).size / 2 ** 20).toFixed(1)} MiB, uncompressed`);

  const vdboot = (mode: string, dir: string): { cpuMs: number; userMs: number; entries: number } => {
    const r = spawnSync(init, [tar, dir, mode], { encoding: 'utf8', timeout: 600_000 });
    const m = /UNPACK-NATIVE (.*)/.exec(r.stdout);
    if (!m) throw new Error(`vdboot's unpacker: exit ${r.status ?? r.signal}: ${r.stdout}${r.stderr}`);
    return JSON.parse(m[1]!);
  };
  const busybox = (dir: string): number => {
    const r = spawnSync('/usr/bin/time', ['-f', 'TIME %U %S', 'busybox', 'tar', '-xf', tar, '-C', dir], { encoding: 'utf8' });
    const m = /TIME ([\d.]+) ([\d.]+)/.exec(r.stderr);
    if (r.status !== 0 || !m) throw new Error(`busybox tar: exit ${r.status}: ${r.stderr}`);
    return (Number(m[1]) + Number(m[2])) * 1000;
  };
  const v: number[] = [];
  const b: number[] = [];
  const p: number[] = [];
  const u: number[] = [];
  for (let i = 0; i < runs; i++) {
    const dv = path.join(mnt, `v${i}`);
    const db = path.join(mnt, `b${i}`);
    fs.mkdirSync(dv);
    fs.mkdirSync(db);
    const got = vdboot('unpack', dv);
    if (got.entries !== entries) throw new Error(`vdboot unpacked ${got.entries} entries, tar lists ${entries}`);
    v.push(got.cpuMs);
    u.push(got.userMs);
    b.push(busybox(db));
    p.push(vdboot('parse', '').cpuMs);
    // the two trees agree (names, types, sizes, modes, times)
    // (busybox tar leaves directories and symbolic links with the time of the unpack: only files' times are compared)
    const list = (d: string): string => execFileSync('sh', ['-c', `cd ${d} && find . \\( -type f -printf '%p f %s %m %T@\\n' \\) -o -printf '%p %y %m %l\\n' | sort`], { encoding: 'utf8', maxBuffer: 64 << 20 });
    if (i === 0 && list(dv) !== list(db)) throw new Error('vdboot and busybox tar unpacked different trees');
    fs.rmSync(dv, { recursive: true, force: true });
    fs.rmSync(db, { recursive: true, force: true });
  }
  const ratios = v.map((t, i) => b[i]! / t);
  console.log(`CPU ms per run (${runs} rounds): vdboot ${v.join(' ')} (in the interpreter ${u.join(' ')}); its reader alone ${p.join(' ')}; busybox tar ${b.map((x) => Math.round(x)).join(' ')}`);
  console.log(`per entry: vdboot ${((median(v) * 1000) / entries).toFixed(1)} µs (reading the archive ${((median(p) * 1000) / entries).toFixed(1)} µs), busybox tar ${((median(b) * 1000) / entries).toFixed(1)} µs`);
  const ratio = median(ratios);
  console.log(`ratio busybox / vdboot (CPU time): median ${ratio.toFixed(2)} [${Math.min(...ratios).toFixed(2)}..${Math.max(...ratios).toFixed(2)}] (${ratio >= 0.9 ? 'meets' : 'misses'} the 0.9 target)`);
} finally {
  spawnSync('umount', [mnt]);
  fs.rmSync(work, { recursive: true, force: true });
}
