// Boot benchmark (issue 2): image size, build time, and the kernel uptime at which the guest's
// init starts, for Debian's initramfs-tools, the hand-written floor, and vdboot, on the same
// ext4 root disk, measured side by side in this run. BENCH_RUNS=N boots each N times (3).
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { makeExt4 } from '../qemu/disks.ts';
import { buildFloorInitramfs } from '../qemu/floor-initramfs.ts';
import { buildGuestRoot, parseGuestFacts } from '../qemu/guest.ts';
import { bootVm, defaultKernel, kernelVersion, probeAccel } from '../qemu/harness.ts';

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const runs = Math.max(1, Number(process.env.BENCH_RUNS ?? 3) || 3);
const kernel = defaultKernel();
const version = kernelVersion(kernel);
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-bench-'));
const MiB = 1024 * 1024;

interface Candidate {
  name: string;
  image?: string;
  size?: number;
  buildSeconds?: number;
  uptimes: number[];
  failures: string[];
}

function timed(cmd: string, args: string[], env?: NodeJS.ProcessEnv): { seconds: number; ok: boolean; output: string } {
  const t = process.hrtime.bigint();
  const r = spawnSync(cmd, args, { cwd: repo, encoding: 'utf8', env: { ...process.env, ...env }, maxBuffer: 64 * MiB });
  const seconds = Number(process.hrtime.bigint() - t) / 1e9;
  return { seconds, ok: r.status === 0, output: `${r.stdout ?? ''}${r.stderr ?? ''}${r.error ? String(r.error) : ''}` };
}

try {
  const accel = await probeAccel(kernel);
  const load = os.loadavg().map((l) => l.toFixed(1)).join(' ');
  console.log(`kernel ${version}, accel ${accel}, ${runs} boot(s) each, ${os.cpus().length} CPUs, load average ${load}`);

  // The same guest root for every candidate; each boot writes to a throw-away overlay.
  const rootDir = path.join(work, 'root');
  buildGuestRoot(rootDir, {});
  const rootImg = path.join(work, 'root.ext4');
  makeExt4(rootImg, { sizeMiB: 32, fromDir: rootDir, label: 'benchroot' });

  const candidates: Candidate[] = [];

  // (a) Debian's initramfs-tools, as `update-initramfs` would build it
  const itools: Candidate = { name: 'initramfs-tools', uptimes: [], failures: [] };
  {
    const image = path.join(work, 'initramfs-tools.img');
    const r = timed('mkinitramfs', ['-o', image, version]);
    if (r.ok) Object.assign(itools, { image, size: fs.statSync(image).size, buildSeconds: r.seconds });
    else itools.failures.push(`mkinitramfs failed: ${r.output.trim().split('\n').slice(-3).join(' | ')}`);
  }
  candidates.push(itools);

  // (b) the floor: busybox + virtio_blk/ext4 modules + a 30-line /init
  const floor: Candidate = { name: 'floor (busybox)', uptimes: [], failures: [] };
  {
    const image = path.join(work, 'floor.img');
    // Build times: the fastest of `runs` builds, the usual guard against a busy machine.
    let best = Infinity;
    let size = 0;
    for (let i = 0; i < runs; i++) {
      const t = process.hrtime.bigint();
      size = buildFloorInitramfs(image, { kernelVersion: version });
      best = Math.min(best, Number(process.hrtime.bigint() - t) / 1e9);
    }
    Object.assign(floor, { image, size, buildSeconds: best });
  }
  candidates.push(floor);

  // (c) vdboot
  const vdboot: Candidate = { name: 'vdboot', uptimes: [], failures: [] };
  {
    const image = path.join(work, 'vdboot.img');
    let r = timed(process.execPath, [path.join(repo, 'bin/vdboot.mjs'), 'mkinitramfs', '--kernel', version, '-o', image]);
    let best = r.seconds;
    for (let i = 1; i < runs && r.ok; i++) {
      r = timed(process.execPath, [path.join(repo, 'bin/vdboot.mjs'), 'mkinitramfs', '--kernel', version, '-o', image]);
      best = Math.min(best, r.seconds);
    }
    if (r.ok && fs.existsSync(image)) {
      Object.assign(vdboot, { image, size: fs.statSync(image).size, buildSeconds: best });
    } else {
      console.log('vdboot: not built');
      vdboot.failures.push(`vdboot mkinitramfs failed: ${r.output.trim().split('\n').slice(-3).join(' | ')}`);
    }
  }
  candidates.push(vdboot);

  // Boots interleaved (a b c a b c …), so load from other work on the machine hits all alike.
  for (let run = 1; run <= runs; run++) {
    for (const c of candidates) {
      if (!c.image) continue;
      const vm = await bootVm({
        name: `bench-${c.name.split(' ')[0]}`,
        kernel,
        initrd: c.image,
        append: 'root=/dev/vda rw quiet',
        disks: [{ file: rootImg, snapshot: true }],
        accel,
      });
      try {
        await vm.waitFor('VDBOOT-GUEST-OK', 240_000);
        const facts = parseGuestFacts(vm.transcript());
        c.uptimes.push(facts.uptime);
        await vm.waitExit(60_000);
        console.log(`  run ${run}: ${c.name.padEnd(16)} guest init at ${facts.uptime.toFixed(2)} s uptime`);
      } catch (e) {
        c.failures.push(`run ${run}: ${(e as Error).message.split('\n')[0]} (log: ${vm.logFile})`);
        console.log(`  run ${run}: ${c.name.padEnd(16)} FAILED (log: ${vm.logFile})`);
      } finally {
        await vm.kill();
      }
    }
  }

  // The median: one boot slowed by the machine's other work moves it least.
  const median = (xs: number[]): number | undefined => {
    if (!xs.length) return undefined;
    const s = [...xs].sort((a, b) => a - b);
    return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
  };
  const fmt = (v: number | undefined, unit: string, digits = 2): string => (v === undefined ? '—' : `${v.toFixed(digits)} ${unit}`);
  const ratio = (a: number | undefined, b: number | undefined): string => {
    if (a === undefined || b === undefined || b === 0) return '—';
    const r = a / b;
    return `${r >= 0.1 ? r.toFixed(2) : r.toPrecision(2)}×`;
  };

  console.log('');
  console.log(`${'initramfs'.padEnd(18)}${'image size'.padStart(12)}${'build time'.padStart(12)}${'guest init at (median uptime)'.padStart(34)}`);
  for (const c of candidates) {
    const up = median(c.uptimes);
    const spread = c.uptimes.length > 1 ? ` (${Math.min(...c.uptimes).toFixed(2)}–${Math.max(...c.uptimes).toFixed(2)})` : '';
    console.log(
      `${c.name.padEnd(18)}${fmt(c.size === undefined ? undefined : c.size / MiB, 'MiB').padStart(12)}` +
        `${fmt(c.buildSeconds, 's').padStart(12)}${`${fmt(up, 's')}${spread} n=${c.uptimes.length}`.padStart(34)}`,
    );
  }
  console.log('');
  console.log(`${'ratios'.padEnd(36)}${'size'.padStart(10)}${'build'.padStart(10)}${'init at'.padStart(10)}`);
  const pairs: [Candidate, Candidate][] = [[itools, floor], [floor, itools], [vdboot, itools], [vdboot, floor]];
  for (const [c, base] of pairs) {
    console.log(
      `${`${c.name} / ${base.name}`.padEnd(36)}${ratio(c.size, base.size).padStart(10)}` +
        `${ratio(c.buildSeconds, base.buildSeconds).padStart(10)}${ratio(median(c.uptimes), median(base.uptimes)).padStart(10)}`,
    );
  }
  if (vdboot.image) {
    const up = median(vdboot.uptimes);
    const floorUp = median(floor.uptimes);
    console.log('');
    console.log('targets (issue 2):');
    console.log(`  image ≤ 4 MiB:            ${fmt(vdboot.size! / MiB, 'MiB')} ${vdboot.size! <= 4 * MiB ? 'met' : 'NOT met'}`);
    console.log(`  build ≤ 1 s:              ${fmt(vdboot.buildSeconds, 's')} ${vdboot.buildSeconds! <= 1 ? 'met' : 'NOT met'}`);
    if (up !== undefined && floorUp !== undefined) {
      console.log(`  init within 10% of floor: ${ratio(up, floorUp)} ${up <= floorUp * 1.1 ? 'met' : 'NOT met'}`);
    }
  }
  const failures = candidates.flatMap((c) => c.failures.map((f) => `${c.name}: ${f}`));
  if (failures.length) {
    console.log('\nfailures:');
    for (const f of failures) console.log(`  ${f}`);
  }
  // The benchmark itself fails only when the references it compares against could not run.
  if (itools.uptimes.length === 0 || floor.uptimes.length === 0) process.exitCode = 1;
} finally {
  fs.rmSync(work, { recursive: true, force: true });
}
