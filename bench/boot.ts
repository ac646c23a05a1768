// Boot benchmark (issues 2 and 13): image size, build time, and the kernel uptime at which the
// guest's init starts, for Debian's initramfs-tools (6.1, the installed kernel), the hand-written
// busybox floor and vdboot, on the same ext4 root disk, on kernel 6.1 and on 6.12 (when
// .cache/kernels has it), all measured side by side in this run. Each vdboot boot is also
// repeated with rd.vdboot.debug, which gives vdboot's own time (from its first statement to
// the guest's init) and the per-step breakdown of timings.ts.
// BENCH_RUNS=N boots each N times (3); BENCH_KERNELS=6.1,6.12 picks the kernels;
// BENCH_ITOOLS=0 leaves initramfs-tools out (its build takes minutes on a busy machine);
// BENCH_BASELINE_INIT=PATH adds vdboot images whose /init is that binary (another build of
// vdboot, e.g. main's build/init), booted in the same run: before and after a change;
// BENCH_WITHOUT=TOOL[,TOOL…] adds vdboot images built with `--without TOOL` (e.g. cryptsetup),
// booted in the same run: what a default program costs a boot that does not use it;
// BENCH_PACK=TOOL[,TOOL…] adds vdboot images built with `--pack TOOL` (the program in a squashfs
// image mounted when run, not unpacked by the kernel at every boot);
// Every vdboot image's figures come from the same run: the universal image's size on each
// kernel, the host-only image's (`--hostonly` for this machine: its storage drivers and
// root filesystem; booted like the others when this machine's disk is virtio, as in CI VMs),
// and the targets of issue 13 at the end (the tar unpacking figure is bench/tmpfs.ts's).
// BENCH_HOT=MOD[,MOD…] adds images whose modules MOD are stored decompressed in the zstd
// archive (mkinitramfs's decompressModules), with a debug twin: in-kernel xz vs zstd.
// BENCH_HOSTONLY_COMPRESS=xz[,…] adds host-only images with that outer compression.
// BENCH_ICOUNT=SHIFT runs QEMU with `-icount shift=SHIFT,sleep=off` (TCG only): the guest's
// clock counts instructions (2^SHIFT ns each), so its uptimes no longer depend on what
// else the machine runs: for a busy machine, where real-time medians drift by seconds.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { makeExt4 } from '../qemu/disks.ts';
import { writeInitramfs, type Compression } from '../mkinitramfs/build.ts';
import { loadModuleIndex } from '../mkinitramfs/kmod.ts';
import { buildFloorInitramfs } from '../qemu/floor-initramfs.ts';
import { buildGuestRoot, parseGuestFacts } from '../qemu/guest.ts';
import { bootVm, cachedKernel, defaultKernel, kernelVersion, probeAccel } from '../qemu/harness.ts';

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const runs = Math.max(1, Number(process.env.BENCH_RUNS ?? 3) || 3);
const wantedKernels = (process.env.BENCH_KERNELS ?? '6.1,6.12').split(',').map((s) => s.trim());
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-bench-'));
const MiB = 1024 * 1024;
const icount = process.env.BENCH_ICOUNT;
const extraArgs = icount !== undefined && /^\d+$/.test(icount) ? ['-icount', `shift=${icount},sleep=off`] : [];

interface Candidate {
  name: string;
  kernel: string;
  image?: string;
  size?: number;
  buildSeconds?: number;
  append: string;
  uptimes: number[];
  /** debug boots only: vdboot's own time (guest init uptime − vdboot's start) and the summary lines */
  ownTimes: number[];
  summaries: string[];
  failures: string[];
}

interface KernelSet {
  series: string;
  kernel: string;
  version: string;
  itools?: Candidate;
  floor: Candidate;
  vdboot: Candidate;
  vdbootDebug: Candidate;
  baseline?: Candidate;
  /** vdboot built --without each BENCH_WITHOUT program, --pack each BENCH_PACK program */
  without: Candidate[];
  /** what --hostonly found on this machine: its disks and their drivers */
  hostonlyStorage?: string;
  /** --hostonly for this machine (zstd -19, the default), then each BENCH_HOSTONLY_COMPRESS */
  hostonly: Candidate[];
  /** BENCH_HOT: those modules decompressed into the main archive, and its debug twin */
  hot?: Candidate;
  hotDebug?: Candidate;
}

function timed(cmd: string, args: string[], env?: NodeJS.ProcessEnv): { seconds: number; ok: boolean; output: string } {
  const t = process.hrtime.bigint();
  const r = spawnSync(cmd, args, { cwd: repo, encoding: 'utf8', env: { ...process.env, ...env }, maxBuffer: 64 * MiB });
  const seconds = Number(process.hrtime.bigint() - t) / 1e9;
  return { seconds, ok: r.status === 0, output: `${r.stdout ?? ''}${r.stderr ?? ''}${r.error ? String(r.error) : ''}` };
}

const candidate = (name: string, kernel: string, append: string): Candidate => ({ name, kernel, append, uptimes: [], ownTimes: [], summaries: [], failures: [] });

/** The kernel a series names: 6.1 the installed default, 6.12 the one scripts/fetch-kernel.sh unpacked. */
function kernelFor(series: string): string | undefined {
  if (series === '6.1') return defaultKernel();
  return cachedKernel(series);
}

/** The images for one kernel: initramfs-tools (installed kernels only), the floor, vdboot. */
function buildSet(series: string, kernel: string): KernelSet {
  const version = kernelVersion(kernel);
  const installed = fs.existsSync(path.join('/lib/modules', version));
  // modules of a kernel unpacked into .cache/kernels/RELEASE live beside its boot/
  const modulesDir = installed ? '/lib/modules' : path.join(path.dirname(path.dirname(kernel)), 'lib', 'modules');
  const set: KernelSet = {
    series, kernel, version,
    floor: candidate(`floor ${series}`, kernel, 'root=/dev/vda rw quiet'),
    vdboot: candidate(`vdboot ${series}`, kernel, 'root=/dev/vda rw quiet'),
    vdbootDebug: candidate(`vdboot ${series} debug`, kernel, 'root=/dev/vda rw loglevel=4 rd.vdboot.debug'),
    without: [],
    hostonly: [],
  };
  // (a) Debian's initramfs-tools, as `update-initramfs` would build it (needs the kernel installed)
  if (installed && process.env.BENCH_ITOOLS !== '0') {
    const itools = candidate(`initramfs-tools ${series}`, kernel, 'root=/dev/vda rw quiet');
    const image = path.join(work, `initramfs-tools-${series}.img`);
    const r = timed('mkinitramfs', ['-o', image, version]);
    if (r.ok) Object.assign(itools, { image, size: fs.statSync(image).size, buildSeconds: r.seconds });
    else itools.failures.push(`mkinitramfs failed: ${r.output.trim().split('\n').slice(-3).join(' | ')}`);
    set.itools = itools;
  }
  // (b) the floor: busybox + virtio_blk/ext4 modules as the kernel ships them + a 30-line /init
  {
    const image = path.join(work, `floor-${series}.img`);
    // Build times: the fastest of `runs` builds, the usual guard against a busy machine.
    let best = Infinity;
    let size = 0;
    for (let i = 0; i < runs; i++) {
      const t = process.hrtime.bigint();
      size = buildFloorInitramfs(image, { kernelVersion: version, modulesDir });
      best = Math.min(best, Number(process.hrtime.bigint() - t) / 1e9);
    }
    Object.assign(set.floor, { image, size, buildSeconds: best });
  }
  // (c) vdboot, the universal image (the default of `vdboot mkinitramfs`)
  {
    const image = path.join(work, `vdboot-${series}.img`);
    const args = [path.join(repo, 'bin/vdboot.mjs'), 'mkinitramfs', '--kernel', installed ? version : kernel, '-o', image];
    let r = timed(process.execPath, args);
    let best = r.seconds;
    for (let i = 1; i < runs && r.ok; i++) {
      r = timed(process.execPath, args);
      best = Math.min(best, r.seconds);
    }
    if (r.ok && fs.existsSync(image)) {
      Object.assign(set.vdboot, { image, size: fs.statSync(image).size, buildSeconds: best });
      Object.assign(set.vdbootDebug, { image, size: fs.statSync(image).size });
    } else {
      console.log(`vdboot ${series}: not built`);
      set.vdboot.failures.push(`vdboot mkinitramfs failed: ${r.output.trim().split('\n').slice(-3).join(' | ')}`);
    }
  }
  // (c') the universal image less a default program, for what that program costs
  const variants = [['without', '-', process.env.BENCH_WITHOUT], ['pack', 'packed ', process.env.BENCH_PACK]] as const;
  for (const [flag, label, list] of variants) {
    for (const tool of (list ?? '').split(',').map((t) => t.trim()).filter(Boolean)) {
      const c = candidate(`vdboot ${series} ${label}${tool}`, kernel, 'root=/dev/vda rw quiet');
      const image = path.join(work, `vdboot-${series}-${flag}-${tool}.img`);
      const r = timed(process.execPath, [path.join(repo, 'bin/vdboot.mjs'), 'mkinitramfs', '--kernel', installed ? version : kernel, `--${flag}`, tool, '-o', image]);
      if (r.ok && fs.existsSync(image)) Object.assign(c, { image, size: fs.statSync(image).size, buildSeconds: r.seconds });
      else c.failures.push(`vdboot mkinitramfs --${flag} ${tool} failed: ${r.output.trim().split('\n').slice(-3).join(' | ')}`);
      set.without.push(c);
    }
  }
  // (c'') host-only for this machine, in the default compression and in BENCH_HOSTONLY_COMPRESS
  for (const how of [undefined, ...(process.env.BENCH_HOSTONLY_COMPRESS ?? '').split(',').map((t) => t.trim()).filter(Boolean)] as (Compression | undefined)[]) {
    const c = candidate(`vdboot ${series} host-only${how ? ` ${how}` : ''}`, kernel, 'root=/dev/vda rw quiet');
    const image = path.join(work, `vdboot-${series}-hostonly-${how ?? 'default'}.img`);
    try {
      const t = process.hrtime.bigint();
      const r = writeInitramfs(image, { kernel: installed ? version : kernel, hostonly: {}, ...(how ? { compress: how } : {}) });
      Object.assign(c, { image, size: r.image.length, buildSeconds: Number(process.hrtime.bigint() - t) / 1e9 });
      const storage = r.manifest.build.hostonly?.storage ?? {};
      set.hostonlyStorage = Object.entries(storage).map(([d, m]) => `${d} (${m.join(', ') || 'built in'})`).join(', ');
      // booted on QEMU's virtio disk: only an image for a machine whose disks are virtio has its driver
      if (!Object.values(storage).some((m) => m.includes('virtio_blk'))) {
        c.failures.push(`not booted: this machine's disks are ${set.hostonlyStorage || 'none'}, the benchmark VM's is virtio`);
        c.image = undefined;
      }
    } catch (e) {
      c.failures.push(`--hostonly image failed: ${(e as Error).message}`);
    }
    set.hostonly.push(c);
  }
  // (c''') BENCH_HOT: the modules a boot loads first, decompressed into the zstd archive
  const hotModules = (process.env.BENCH_HOT ?? '').split(',').map((t) => t.trim()).filter(Boolean);
  // (only where the kernel ships them compressed: 6.1's are plain .ko already)
  const index = hotModules.length ? loadModuleIndex(path.join(modulesDir, version)) : undefined;
  if (hotModules.length && hotModules.some((m) => /\.ko\.(xz|zst|gz)$/.test(index?.files.get(m) ?? ''))) {
    const hot = candidate(`vdboot ${series} hot`, kernel, 'root=/dev/vda rw quiet');
    const hotDebug = candidate(`vdboot ${series} hot debug`, kernel, 'root=/dev/vda rw loglevel=4 rd.vdboot.debug');
    const image = path.join(work, `vdboot-${series}-hot.img`);
    try {
      const t = process.hrtime.bigint();
      const r = writeInitramfs(image, { kernel: installed ? version : kernel, decompressModules: hotModules });
      Object.assign(hot, { image, size: r.image.length, buildSeconds: Number(process.hrtime.bigint() - t) / 1e9 });
      Object.assign(hotDebug, { image, size: r.image.length });
    } catch (e) {
      hot.failures.push(`image with ${hotModules.join(',')} decompressed failed: ${(e as Error).message}`);
    }
    Object.assign(set, { hot, hotDebug });
  }
  // (d) the same image with another /init, for before/after comparisons
  const baseInit = process.env.BENCH_BASELINE_INIT;
  if (baseInit) {
    const base = candidate(`baseline ${series}`, kernel, 'root=/dev/vda rw quiet');
    const image = path.join(work, `baseline-${series}.img`);
    try {
      writeInitramfs(image, { kernel: installed ? version : kernel, initBinary: baseInit });
      Object.assign(base, { image, size: fs.statSync(image).size });
    } catch (e) {
      base.failures.push(`baseline image failed: ${(e as Error).message}`);
    }
    set.baseline = base;
  }
  return set;
}

const median = (xs: number[]): number | undefined => {
  if (!xs.length) return undefined;
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};
const fmt = (v: number | undefined, unit: string, digits = 2): string => (v === undefined ? '—' : `${v.toFixed(digits)} ${unit}`);
const ratioOf = (a: number | undefined, b: number | undefined): number | undefined => (a === undefined || b === undefined || b === 0 ? undefined : a / b);
const ratio = (a: number | undefined, b: number | undefined): string => {
  const r = ratioOf(a, b);
  return r === undefined ? '—' : `${r >= 0.1 ? r.toFixed(2) : r.toPrecision(2)}×`;
};

try {
  const sets: KernelSet[] = [];
  for (const series of wantedKernels) {
    const kernel = kernelFor(series);
    if (!kernel) {
      console.log(`kernel ${series}: not found (scripts/fetch-kernel.sh unpacks 6.12 into .cache/kernels); skipped`);
      continue;
    }
    sets.push(buildSet(series, kernel));
  }
  if (!sets.length) throw new Error('no kernel to boot');
  const accel = await probeAccel(sets[0]!.kernel);
  const loadBefore = os.loadavg().map((l) => l.toFixed(1)).join(' ');
  console.log(`kernels ${sets.map((s) => s.version).join(', ')}; accel ${extraArgs.length ? `tcg ${extraArgs.join(' ')} (guest time counts instructions)` : accel}; ${runs} boot(s) each; ${os.cpus().length} CPUs; load average ${loadBefore}`);

  // The same guest root for every candidate; each boot writes to a throw-away overlay.
  const rootDir = path.join(work, 'root');
  buildGuestRoot(rootDir, {});
  const rootImg = path.join(work, 'root.ext4');
  makeExt4(rootImg, { sizeMiB: 32, fromDir: rootDir, label: 'benchroot' });

  const all = sets.flatMap((s) => [s.itools, s.floor, s.vdboot, s.vdbootDebug, s.baseline, ...s.without, ...s.hostonly, s.hot, s.hotDebug].filter((c): c is Candidate => c !== undefined));
  // Boots interleaved (a b c a b c …), so load from other work on the machine hits all alike.
  for (let run = 1; run <= runs; run++) {
    for (const c of all) {
      if (!c.image) continue;
      const vm = await bootVm({
        name: `bench-${c.name.replace(/\W+/g, '-')}`,
        kernel: c.kernel,
        initrd: c.image,
        append: c.append,
        disks: [{ file: rootImg, snapshot: true }],
        accel: extraArgs.length ? 'tcg' : accel,
        ...(extraArgs.length ? { extraArgs } : {}),
      });
      try {
        await vm.waitFor('VDBOOT-GUEST-OK', 300_000);
        const text = vm.transcript();
        const facts = parseGuestFacts(text);
        c.uptimes.push(facts.uptime);
        let own = '';
        const started = /vdboot started at ([\d.]+) s of uptime/.exec(text);
        if (c.append.includes('rd.vdboot.debug') && started) {
          c.ownTimes.push(facts.uptime - Number(started[1]));
          own = `, vdboot's own time ${(facts.uptime - Number(started[1])).toFixed(2)} s`;
          const summary = text.split('\n').find((l) => l.includes('(debug) timings: '));
          c.summaries.push(summary ? summary.slice(summary.indexOf('timings: ')) : '(no timings line)');
        }
        await vm.waitExit(60_000);
        console.log(`  run ${run}: ${c.name.padEnd(24)} guest init at ${facts.uptime.toFixed(2)} s uptime${own}`);
      } catch (e) {
        c.failures.push(`run ${run}: ${(e as Error).message.split('\n')[0]} (log: ${vm.logFile})`);
        console.log(`  run ${run}: ${c.name.padEnd(24)} FAILED (log: ${vm.logFile})`);
      } finally {
        await vm.kill();
      }
    }
  }
  console.log(`load average after: ${os.loadavg().map((l) => l.toFixed(1)).join(' ')}`);

  console.log('');
  console.log(`${'initramfs'.padEnd(26)}${'image size'.padStart(12)}${'build time'.padStart(12)}${'guest init at (median uptime)'.padStart(34)}`);
  for (const c of all) {
    const up = median(c.uptimes);
    const spread = c.uptimes.length > 1 ? ` (${Math.min(...c.uptimes).toFixed(2)}–${Math.max(...c.uptimes).toFixed(2)})` : '';
    console.log(
      `${c.name.padEnd(26)}${fmt(c.size === undefined ? undefined : c.size / MiB, 'MiB').padStart(12)}` +
        `${fmt(c.buildSeconds, 's').padStart(12)}${`${fmt(up, 's')}${spread} n=${c.uptimes.length}`.padStart(34)}`,
    );
  }
  console.log('');
  console.log(`${'ratios'.padEnd(44)}${'size'.padStart(10)}${'build'.padStart(10)}${'init at'.padStart(10)}`);
  for (const s of sets) {
    const pairs: [Candidate, Candidate][] = [[s.vdboot, s.floor]];
    if (s.baseline) pairs.push([s.baseline, s.floor], [s.vdboot, s.baseline]);
    for (const w of s.without) pairs.push([w, s.floor], [s.vdboot, w]);
    for (const h of s.hostonly) pairs.push([h, s.floor], [h, s.vdboot]);
    if (s.hot) pairs.push([s.hot, s.floor], [s.hot, s.vdboot]);
    if (s.itools) pairs.unshift([s.itools, s.floor], [s.vdboot, s.itools]);
    for (const [c, base] of pairs) {
      console.log(
        `${`${c.name} / ${base.name}`.padEnd(44)}${ratio(c.size, base.size).padStart(10)}` +
          `${ratio(c.buildSeconds, base.buildSeconds).padStart(10)}${ratio(median(c.uptimes), median(base.uptimes)).padStart(10)}`,
      );
    }
  }

  console.log('');
  console.log('targets (issue 13):');
  const limits: Record<string, number> = { '6.12': 1.15, '6.1': 1.25 };
  const sizeLimits: Record<string, number> = { '6.12': 4, '6.1': 6 };
  const best = (xs: number[]): number | undefined => (xs.length ? Math.min(...xs) : undefined);
  const sizeTarget = (what: string, size: number | undefined, limit: number) => {
    if (size !== undefined) console.log(`  ${what} ≤ ${limit} MiB: ${(size / MiB).toFixed(2)} MiB ${size <= limit * MiB ? 'met' : `NOT met (${((size - limit * MiB) / MiB).toFixed(2)} MiB over)`}`);
  };
  for (const s of sets) {
    const limit = sizeLimits[s.series];
    if (limit !== undefined) sizeTarget(`${s.series}: universal image${s.series === '6.1' ? ' (with ntfs-3g: no ntfs3)' : ''}`, s.vdboot.size, limit);
    const ho = s.hostonly[0];
    if (ho) sizeTarget(`${s.series}: host-only image (this machine: ${s.hostonlyStorage || 'no disks found'})`, ho.size, 2);
    for (const h of s.hostonly.slice(1)) sizeTarget(`${s.series}: ${h.name.replace(/^vdboot [\d.]+ /, '')}`, h.size, 2);
  }
  for (const s of sets) {
    const r = ratioOf(median(s.vdboot.uptimes), median(s.floor.uptimes));
    const limit = limits[s.series];
    if (r !== undefined && limit !== undefined) {
      // With -icount a boot is only ever slowed (a wait for I/O that real time drew out): the best boots compare too.
      const rb = ratioOf(best(s.vdboot.uptimes), best(s.floor.uptimes));
      console.log(`  ${s.series}: guest init vs the busybox floor ≤ ${limit}×: ${r.toFixed(2)}× ${r <= limit ? 'met' : 'NOT met'} (medians; best boots ${rb!.toFixed(2)}×)`);
    }
    const own = median(s.vdbootDebug.ownTimes);
    if (own !== undefined) console.log(`  ${s.series}: vdboot's own time, its start to the guest's init ≤ 0.5 s: ${own.toFixed(2)} s ${own <= 0.5 ? 'met' : 'NOT met'}`);
    const hotOwn = s.hotDebug ? median(s.hotDebug.ownTimes) : undefined;
    if (hotOwn !== undefined) console.log(`  ${s.series}: the same with ${process.env.BENCH_HOT} decompressed in the zstd archive: ${hotOwn.toFixed(2)} s ${hotOwn <= 0.5 ? 'met' : 'NOT met'}`);
    // The floor's /init does part of that work too (the same modules): what vdboot adds on top.
    const v = median(s.vdboot.uptimes);
    const f = median(s.floor.uptimes);
    if (v !== undefined && f !== undefined) console.log(`  ${s.series}: the guest's init later than with the floor by ${(v - f).toFixed(2)} s (the modules both load are in both)`);
  }
  for (const c of sets.flatMap((s) => [s.vdbootDebug, s.hotDebug])) {
    if (!c?.summaries.length) continue;
    console.log(`\n${c.name.replace(/ debug$/, '')}, where its time went (rd.vdboot.debug, ms; the boot of the median own time):`);
    const own = c.ownTimes;
    const mid = [...own.keys()].sort((a, b) => own[a]! - own[b]!)[Math.floor((own.length - 1) / 2)] ?? 0;
    console.log(`  ${c.summaries[mid] ?? c.summaries[0]}`);
  }
  const failures = all.flatMap((c) => c.failures.map((f) => `${c.name}: ${f}`));
  if (failures.length) {
    console.log('\nfailures:');
    for (const f of failures) console.log(`  ${f}`);
  }
  // The benchmark itself fails only when the references it compares against could not run.
  if (sets.some((s) => s.floor.uptimes.length === 0) || sets.some((s) => s.itools && s.itools.uptimes.length === 0)) process.exitCode = 1;
} finally {
  fs.rmSync(work, { recursive: true, force: true });
}
