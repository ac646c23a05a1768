// root=tmpfs benchmark (issue 5): unpack throughput of vdboot inside the guest vs
// `busybox tar -x` of the same archive from the same device, in the same boot: vdboot
// unpacks the archive as the root, then the guest's init mounts the same ext4 host,
// drops the page cache and times busybox tar extracting it into another tmpfs.
// Target: vdboot / busybox >= 0.9. Load-proof: QEMU runs with a fixed instruction count
// clock (-icount shift=3,sleep=off: every guest instruction is 8 ns of guest time, idle
// waits skip ahead), so both timings count the guest's own work and not the host's load;
// each boot times both, and the ratio reported is the median of the per-boot ratios.
// BENCH_ICOUNT=off measures in real time instead (as before), BENCH_ICOUNT=N sets the shift.
// Cases: gzip and none, a root with busybox and Python's library (1041 entries, 40 MiB:
// mostly copying); small, uncompressed, a root with 12000 small files (the per-entry cost:
// the case that shows the unpacker's own work, issue 13), with the time per entry.
// BENCH_RUNS=N boots each case N times (3); BENCH_FILES=N small files (12000);
// BENCH_CASES=gzip,none,small picks the cases; BENCH_DEBUG=1 adds rd.vdboot.debug (time split);
// BENCH_APPEND adds words to the kernel command line.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { execSync } from 'node:child_process';
import { writeInitramfs } from '../mkinitramfs/build.ts';
import { makeExt4 } from '../qemu/disks.ts';
import { buildGuestRoot, guestFact, parseGuestFacts } from '../qemu/guest.ts';
import { bootVm, defaultKernel, probeAccel } from '../qemu/harness.ts';
import { buildSmallFileTree } from './lib/small-tree.ts';

const runs = Math.max(1, Number(process.env.BENCH_RUNS ?? 3) || 3);
const icount = process.env.BENCH_ICOUNT === 'off' ? undefined : Number(process.env.BENCH_ICOUNT ?? 3);
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-bench-tmpfs-'));
const MiB = 1024 * 1024;

interface Case {
  name: string;
  file: string;
  /** busybox tar's decompression flag */
  flag: string;
  /** the root it archives */
  root: string;
}

try {
  const kernel = defaultKernel();
  const accel = await probeAccel(kernel);
  console.log(`accel ${accel}, ${os.cpus().length} CPUs, load average ${os.loadavg().map((l) => l.toFixed(1)).join(' ')}`);
  const initrd = path.join(work, 'initrd.img');
  writeInitramfs(initrd, { kernel, without: ['ntfs-3g'] });

  // A root with the shape of a real one: busybox, and a library tree of many small files.
  const root = path.join(work, 'root');
  const only = process.env.BENCH_CASES?.split(',');
  const smallRoot = path.join(work, 'root-small');
  const cases: Case[] = [
    { name: 'gzip', file: 'root.tar.gz', flag: 'z', root },
    { name: 'none', file: 'root.tar', flag: '', root },
    { name: 'small', file: 'small.tar', flag: '', root: smallRoot },
  ].filter((c) => !only || only.includes(c.name));
  const commands = (c: Case): string[] => [
    'mkdir -p /mnt/h /tmp/x',
    'mount -t tmpfs -o size=400M tmpfs /tmp/x',
    'mount -o ro /dev/vda /mnt/h',
    'sync; echo 3 > /proc/sys/vm/drop_caches',
    'read -r t0 _ < /proc/uptime',
    `busybox tar -x${c.flag}f /mnt/h/${c.file} -C /tmp/x`,
    'read -r t1 _ < /proc/uptime',
    guestFact('busybox_seconds', '$(awk "BEGIN { print $t1 - $t0 }")'),
    guestFact('busybox_files', '$(find /tmp/x | wc -l)'),
  ];
  buildGuestRoot(root, {});
  fs.cpSync('/usr/lib/python3.11', path.join(root, 'usr/lib/python3.11'), { recursive: true, verbatimSymlinks: true, filter: (s) => !s.includes('__pycache__') && !s.includes('/test') });
  if (cases.some((c) => c.root === smallRoot)) {
    buildGuestRoot(smallRoot, {});
    buildSmallFileTree(smallRoot, Math.max(100, Number(process.env.BENCH_FILES ?? 12000) || 12000));
  }
  const host = path.join(work, 'host');
  fs.mkdirSync(host);
  const results: { name: string; size: number; vdboot: number[]; busybox: number[]; split: string[] }[] = [];
  // One host holds both archives, each with an init that times busybox on itself.
  for (const c of cases) {
    buildGuestRoot(c.root, { commands: commands(c) });
    const tarPath = path.join(host, `build-${c.name}.tar`);
    execSync(`tar -C ${c.root} -cf ${tarPath} .`);
    if (c.flag === 'z') execSync(`gzip -6 -c ${tarPath} > ${path.join(host, c.file)} && rm ${tarPath}`);
    else fs.renameSync(tarPath, path.join(host, c.file));
  }
  const sizes = Object.fromEntries(cases.map((c) => [c.name, fs.statSync(path.join(host, c.file)).size]));
  const hostImg = path.join(work, 'host.ext4');
  const need = Object.values(sizes).reduce((a, b) => a + b, 0);
  makeExt4(hostImg, { sizeMiB: Math.ceil((need * 1.2) / MiB) + 16, label: 'benchhost', fromDir: host });
  const entriesOf = (c: Case): number => Number(execSync(`find ${c.root} | wc -l`, { encoding: 'utf8' }).trim());
  const entries = Object.fromEntries(cases.map((c) => [c.name, entriesOf(c)]));
  console.log(`archives: ${cases.map((c) => `${c.file} ${entries[c.name]} entries, ${(sizes[c.name]! / MiB).toFixed(1)} MiB`).join('; ')}`);

  for (const c of cases) {
    const r = { name: c.name, size: sizes[c.name]!, vdboot: [] as number[], busybox: [] as number[], split: [] as string[] };
    for (let i = 0; i < runs; i++) {
      const vm = await bootVm({ initrd, append: `root=tmpfs:/dev/vda:/${c.file}${process.env.BENCH_DEBUG ? ' rd.vdboot.debug' : ''}${process.env.BENCH_APPEND ? ` ${process.env.BENCH_APPEND}` : ''}`, disks: [{ file: hostImg, snapshot: true }], name: `bench-tmpfs-${c.name}`, memoryMiB: 1024, ...(icount !== undefined && accel === 'tcg' ? { extraArgs: ['-icount', `shift=${icount},sleep=off`] } : {}) });
      try {
        await vm.waitFor('VDBOOT-GUEST-OK', 600_000);
        const t = vm.transcript();
        const m = /unpacked \d+ entries .* in ([\d.]+) s/.exec(t);
        const facts = parseGuestFacts(t).facts;
        if (!m || !facts.busybox_seconds) throw new Error(`no timings in the console (log: ${vm.logFile})`);
        r.vdboot.push(Number(m[1]));
        r.busybox.push(Number(facts.busybox_seconds));
        const split = /unpack time: (.*)/.exec(t);
        if (split) r.split.push(split[1]!.trim());
        await vm.waitExit(60_000);
      } finally {
        await vm.kill();
      }
    }
    results.push(r);
  }
  const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
  console.log(`\nclock: ${icount !== undefined && accel === 'tcg' ? `guest instructions (-icount shift=${icount},sleep=off)` : 'real time'}; ${runs} boot(s) per case, each timing both`);
  console.log('case   archive    vdboot s  MiB/s  µs/entry  busybox tar s  MiB/s  µs/entry   ratio: median of per-boot ratios [min..max] (busybox time / vdboot time, target >= 0.9)');
  let worst = Infinity;
  for (const r of results) {
    const v = median(r.vdboot);
    const b = median(r.busybox);
    const ratios = r.vdboot.map((t, i) => r.busybox[i]! / t);
    const ratio = median(ratios);
    worst = Math.min(worst, ratio);
    const n = entries[r.name]!;
    console.log(
      `${r.name.padEnd(6)} ${(r.size / MiB).toFixed(1).padStart(6)} MiB ${v.toFixed(2).padStart(8)} ${(r.size / MiB / v).toFixed(1).padStart(6)} ${((v * 1e6) / n).toFixed(0).padStart(9)} ${b.toFixed(2).padStart(14)} ${(r.size / MiB / b).toFixed(1).padStart(6)} ${((b * 1e6) / n).toFixed(0).padStart(9)}   ${ratio.toFixed(2)} [${Math.min(...ratios).toFixed(2)}..${Math.max(...ratios).toFixed(2)}]`,
    );
    console.log(`       per boot: vdboot ${r.vdboot.map((x) => x.toFixed(2)).join(' ')} s; busybox tar ${r.busybox.map((x) => x.toFixed(2)).join(' ')} s${r.split.length ? `; vdboot's split: ${r.split.join(' | ')}` : ''}`);
  }
  console.log(`\nworst ratio ${worst.toFixed(2)} (${worst >= 0.9 ? 'meets' : 'misses'} the 0.9 target)`);
} finally {
  fs.rmSync(work, { recursive: true, force: true });
}
