// Compressed modules at boot (issue 13), on Debian 12's 6.12 under QEMU: the kernel uptime at
// which the guest's init starts on a virtio ext4 root, for the three ways vdboot can carry
// .ko.xz modules: kept as shipped and decompressed by the kernel (the default), kept and
// decompressed by busybox into a memfd (a kernel without MODULE_DECOMPRESS), and unpacked at
// build time into the zstd archive (the layout before). Boots interleaved; BENCH_RUNS=N (3).
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { writeInitramfs, type MkinitramfsOptions } from '../mkinitramfs/build.ts';
import { makeExt4 } from '../qemu/disks.ts';
import { buildGuestRoot, parseGuestFacts } from '../qemu/guest.ts';
import { bootVm, cachedKernel, probeAccel } from '../qemu/harness.ts';

const kernel = cachedKernel('6.12');
const runs = Math.max(1, Number(process.env.BENCH_RUNS ?? 3) || 3);
const MiB = 1024 * 1024;
if (!kernel) {
  console.log('6.12 is not in .cache/kernels (scripts/fetch-kernel.sh): skipped');
  process.exit(0);
}
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-bench-612-'));
try {
  const accel = await probeAccel(kernel);
  const rootDir = path.join(work, 'root');
  buildGuestRoot(rootDir);
  const rootImg = path.join(work, 'root.ext4');
  makeExt4(rootImg, { sizeMiB: 32, fromDir: rootDir, label: 'benchroot' });
  const variants: Array<{ name: string; options: MkinitramfsOptions; image?: string; size?: number; build?: number; uptimes: number[] }> = [
    { name: 'kernel decompresses', options: {}, uptimes: [] },
    { name: 'busybox → memfd', options: { kernelDecompresses: [] }, uptimes: [] },
    { name: 'unpacked at build', options: { unpackModules: true }, uptimes: [] },
  ];
  for (const v of variants) {
    v.image = path.join(work, `${v.name.split(' ')[0]}.img`);
    const r = writeInitramfs(v.image, { kernel, ...v.options });
    v.size = r.image.length;
    v.build = r.milliseconds / 1000;
  }
  console.log(`kernel ${path.basename(kernel)}, accel ${accel}, ${runs} boot(s) each, load average ${os.loadavg().map((l) => l.toFixed(1)).join(' ')}`);
  for (let run = 1; run <= runs; run++) {
    for (const v of variants) {
      const vm = await bootVm({ name: 'bench-612', kernel, initrd: v.image!, append: 'root=/dev/vda rw quiet', disks: [{ file: rootImg, snapshot: true }], accel });
      try {
        await vm.waitFor('VDBOOT-GUEST-OK', 240_000);
        const up = parseGuestFacts(vm.transcript()).uptime;
        v.uptimes.push(up);
        await vm.waitExit(60_000);
        console.log(`  run ${run}: ${v.name.padEnd(22)} guest init at ${up.toFixed(2)} s uptime`);
      } catch (e) {
        console.log(`  run ${run}: ${v.name.padEnd(22)} FAILED: ${(e as Error).message.split('\n')[0]} (log: ${vm.logFile})`);
      } finally {
        await vm.kill();
      }
    }
  }
  const median = (xs: number[]) => (xs.length ? [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)]! : NaN);
  console.log(`\n${'modules'.padEnd(24)}${'image'.padStart(11)}${'build'.padStart(9)}${'guest init at (median)'.padStart(26)}`);
  for (const v of variants) console.log(`${v.name.padEnd(24)}${`${(v.size! / MiB).toFixed(2)} MiB`.padStart(11)}${`${v.build!.toFixed(2)} s`.padStart(9)}${`${median(v.uptimes).toFixed(2)} s`.padStart(26)}`);
} finally {
  fs.rmSync(work, { recursive: true, force: true });
}
