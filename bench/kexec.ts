// kexec benchmark (issue 10): the extra time of starting the root's own kernel. The same
// plain-root disk (6.12 in /boot with its modules, none for 6.1) booted by vdboot's
// initramfs for 6.1, with the jump (the default) and without it (rd.vdboot.kexec=0),
// interleaved in one run. "guest init at" is kernel uptime: with the jump, the first
// kernel's uptime at the jump plus the second kernel's uptime at the guest's init (the
// purgatory's checksum pass between them is in neither); the wall-clock column, from qemu's
// start to the guest's marker, has everything. BENCH_RUNS=N boots each N times (2).
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { writeInitramfs } from '../mkinitramfs/build.ts';
import { GUEST_MARKER, parseGuestFacts } from '../qemu/guest.ts';
import { bootVm, cachedKernel, defaultKernel, kernelVersion, probeAccel } from '../qemu/harness.ts';
import { makeKexecGuestDisk } from '../test/kit/guest-disk.ts';

const runs = Math.max(1, Number(process.env.BENCH_RUNS ?? 2) || 2);
const kernel = defaultKernel();
const newKernel = cachedKernel('6.12');
const debug = process.env.BENCH_DEBUG === '1';
if (!newKernel) {
  console.log('no 6.12 kernel in .cache/kernels (scripts/fetch-kernel.sh): kexec benchmark skipped');
  process.exit(0);
}
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-bench-kexec-'));

interface Case {
  name: string; append: string; uptimes: number[]; walls: number[]; stages: string[];
  /** kernel uptime when vdboot started: the first kernel's, and the kexec'd kernel's */
  firstKernel: number[]; secondKernel: number[];
  /** from "kexec: starting" to "kexec: jumping" (assembly, kexec_file_load, teardown) */
  jumpCost: number[];
  /** the kexec'd kernel's uptime at the guest's init */
  secondInit: number[];
}

try {
  const accel = await probeAccel(kernel);
  console.log(`kernel ${kernelVersion(kernel)} → ${kernelVersion(newKernel)}, accel ${accel}, ${runs} boot(s) each, ${os.cpus().length} CPUs, load average ${os.loadavg().map((l) => l.toFixed(1)).join(' ')}`);
  const initrd = path.join(work, 'initrd.img');
  const built = writeInitramfs(initrd, { kernel });
  const disk = makeKexecGuestDisk(work, newKernel, built.manifest, {}, 'benchroot');
  const cases: Case[] = [
    { name: 'no jump (kexec=0)', append: 'rd.vdboot.kexec=0', uptimes: [], walls: [], stages: [], firstKernel: [], secondKernel: [], jumpCost: [], secondInit: [] },
    { name: 'kexec to 6.12', append: '', uptimes: [], walls: [], stages: [], firstKernel: [], secondKernel: [], jumpCost: [], secondInit: [] },
  ];
  for (let run = 1; run <= runs; run++) {
    for (const c of cases) {
      const vm = await bootVm({ name: 'bench-kexec', kernel, initrd, append: `root=LABEL=benchroot ${debug ? 'rd.vdboot.debug' : ''} ${c.append}`.trim(), disks: [{ file: disk, interface: 'virtio-blk', snapshot: true }], memoryMiB: 1024, accel });
      try {
        const marker = await vm.waitForLine(GUEST_MARKER, 600_000);
        const t = vm.transcript();
        const facts = parseGuestFacts(t);
        const jump = /vdboot: \[\s*([\d.]+)\] kexec: jumping to/.exec(t);
        const uptime = facts.uptime + (jump ? Number(jump[1]) : 0);
        c.uptimes.push(uptime);
        c.walls.push(marker.hostMs / 1000);
        const started = [...t.matchAll(/vdboot started at ([\d.]+) s of uptime/g)].map((m) => Number(m[1]));
        if (started[0] !== undefined) c.firstKernel.push(started[0]);
        if (started[1] !== undefined) c.secondKernel.push(started[1]);
        const starting = /vdboot: \[\s*([\d.]+)\] kexec: starting/.exec(t);
        if (starting && jump) c.jumpCost.push(Number(jump[1]) - Number(starting[1]));
        if (jump) c.secondInit.push(facts.uptime);
        const assembled = /assembled an initramfs for \S+: (.*)$/m.exec(t);
        if (assembled) c.stages.push(assembled[1]!);
        if (debug) for (const l of t.split('\n').filter((x) => /kexec/.test(x))) console.log(`    ${l}`);
        console.log(`  run ${run}: ${c.name.padEnd(18)} guest init at ${uptime.toFixed(2)} s uptime${jump ? ` (${jump[1]} + ${facts.uptime.toFixed(2)})` : ''}, marker after ${(marker.hostMs / 1000).toFixed(1)} s wall clock`);
        await vm.waitExit(60_000);
      } catch (e) {
        console.log(`  run ${run}: ${c.name} FAILED: ${(e as Error).message.split('\n')[0]} (log: ${vm.logFile})`);
        process.exitCode = 1;
      } finally {
        await vm.kill();
      }
    }
  }
  const median = (xs: number[]): number => {
    const s = [...xs].sort((a, b) => a - b);
    return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
  };
  const [off, on] = cases as [Case, Case];
  if (off.uptimes.length && on.uptimes.length) {
    const r = median(on.uptimes) / median(off.uptimes);
    const w = median(on.walls) / median(off.walls);
    console.log('');
    console.log(`guest init, median uptime: ${median(off.uptimes).toFixed(2)} s without the jump, ${median(on.uptimes).toFixed(2)} s with it: ${r.toFixed(2)}× (+${(median(on.uptimes) - median(off.uptimes)).toFixed(2)} s)`);
    console.log(`wall clock to the guest's marker: ${median(off.walls).toFixed(1)} s vs ${median(on.walls).toFixed(1)} s: ${w.toFixed(2)}×`);
    if (on.stages.length) console.log(`initramfs assembled at boot: ${on.stages.at(-1)}`);
    if (on.jumpCost.length) console.log(`from the decision to the jump (assembly, kexec_file_load, teardown): median ${median(on.jumpCost).toFixed(2)} s`);
    if (on.secondKernel.length && off.firstKernel.length) {
      console.log(`kernel start to vdboot: ${median(off.firstKernel).toFixed(2)} s cold (6.1, firmware-less -kernel boot), ${median(on.secondKernel).toFixed(2)} s after kexec (6.12); guest init ${median(off.uptimes).toFixed(2)} s cold`);
      const floor = median(off.uptimes) + median(on.secondInit);
      console.log(`the second kernel to the guest's init: median ${median(on.secondInit).toFixed(2)} s after kexec; with a jump that cost nothing the boot would still take ${floor.toFixed(2)} s: ${(floor / median(off.uptimes)).toFixed(2)}× the boot without it`);
    }
    console.log(`target (issue 10) ≤ 1.6×: ${r <= 1.6 ? 'met' : 'NOT met'}`);
  }
} finally {
  fs.rmSync(work, { recursive: true, force: true });
}
