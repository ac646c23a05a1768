// vdiskload I/O benchmark (issue 16): sequential and random throughput inside one guest on
// three copies of the same dynamic VHDX, side by side in the same run:
//   direct  attached by vdiskload: expanded in place, then device-mapper straight onto the
//           host partition's sectors (the host is vdboot's ext4 mount through vdhost; the
//           file is held immutable while attached)
//   loop    attached by vdiskload --map loop: device-mapper over a loop device of the file,
//           through the mounted ext4
//   nbd     served by qemu-nbd -c (the alternative a user has without vdiskload), through
//           the same mounted ext4
// io-probe (bench/io-probe.c) measures the three block devices in turns, each phase's passes
// interleaved (A B C A B C …) with O_DIRECT, so the machine's moments fall on all of them
// alike; ratios compare the medians over rounds of each round's ratio (paired).
// Targets: direct >= 3x nbd, loop >= 1x nbd (reads; writes are shown too).
// BENCH_IO_SEQ_MIB (64), BENCH_IO_RAND_OPS (2000), BENCH_IO_ROUNDS (3), BENCH_IO_MIN_SECONDS (2)
// size the work as in bench/vdisk-io.ts.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { sharedLibraries, writeInitramfs } from '../mkinitramfs/build.ts';
import { makeExt4, makePartitionedDisk } from '../qemu/disks.ts';
import { buildGuestRoot, guestFact, parseGuestFacts, GUEST_MARKER } from '../qemu/guest.ts';
import { bootVm, defaultKernel, kernelVersion, probeAccel } from '../qemu/harness.ts';

const here = path.dirname(fileURLToPath(import.meta.url));
const seqMiB = Math.max(1, Number(process.env.BENCH_IO_SEQ_MIB ?? 64) || 64);
const randOps = Math.max(1, Number(process.env.BENCH_IO_RAND_OPS ?? 2000) || 2000);
const rounds = Math.max(1, Number(process.env.BENCH_IO_ROUNDS ?? 3) || 3);
const minSeconds = Math.max(0, Number(process.env.BENCH_IO_MIN_SECONDS ?? 2) || 0);
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-bench-vdiskload-'));
const MiB = 1024 * 1024;
const ROOT_TYPE = '4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709';
const MEASURES = ['seq_read_mibs', 'rand_read_iops', 'seq_write_mibs', 'rand_write_iops'] as const;
type Measure = (typeof MEASURES)[number];
const LABELS: Record<Measure, string> = { seq_read_mibs: 'seq read MiB/s', rand_read_iops: 'rand read IOPS', seq_write_mibs: 'seq write MiB/s', rand_write_iops: 'rand write IOPS' };
const TARGETS = ['direct', 'loop', 'nbd'] as const;
const V = '/run/initramfs/vdiskload';
const IMG = '/run/vdboot/host/img';

const keyValues = (line: string): Record<string, string> => Object.fromEntries([...line.matchAll(/(\w+)=(\S+)/g)].map((m) => [m[1]!, m[2]!]));
const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

function sh(cmd: string, args: string[]): void {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  if (r.error || r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed: ${r.stderr ?? r.error}`);
}

try {
  const kernel = defaultKernel();
  const accel = await probeAccel(kernel);
  console.log(`kernel ${kernelVersion(kernel)}, accel ${accel}, ${os.cpus().length} CPUs, load average ${os.loadavg().map((l) => l.toFixed(1)).join(' ')}`);
  console.log(`work: ${rounds} round(s); each phase passes of ${seqMiB} MiB sequential (1 MiB blocks) or ${randOps} random 4 KiB operations, repeated for >= ${minSeconds} s, O_DIRECT, on each device in turns`);

  const initrd = path.join(work, 'initrd.img');
  writeInitramfs(initrd, { kernel, without: ['ntfs-3g'] });

  // The guest root: busybox, io-probe, qemu-nbd with its libraries, the nbd module.
  const rootDir = path.join(work, 'root');
  const probe = `/bench/io-probe ${seqMiB} ${randOps} ${rounds} ${minSeconds}`;
  buildGuestRoot(rootDir, {
    modules: { kernelVersion: kernelVersion(kernel), names: ['nbd'] },
    commands: [
      `out=$(${V} --name bd ${IMG}/direct.vhdx 2>&1) || echo "VDBOOT-IO error=vdiskload direct: $(echo "$out" | tr '\\n' ' ')"`,
      guestFact('direct', '$(echo "$out" | grep "data path" | head -1)'),
      `out=$(${V} --name bl --map loop ${IMG}/loop.vhdx 2>&1) || echo "VDBOOT-IO error=vdiskload loop: $(echo "$out" | tr '\\n' ' ')"`,
      guestFact('loop', '$(echo "$out" | grep "data path" | head -1)'),
      `/usr/bin/qemu-nbd --fork --socket /tmp/nbd0.sock -c /dev/nbd0 -f vhdx ${IMG}/nbd.vhdx || echo "VDBOOT-IO error=qemu-nbd -c failed"`,
      'for i in 1 2 3 4 5 6 7 8 9 10; do [ "$(cat /sys/block/nbd0/size)" != 0 ] && break; sleep 1; done',
      `${probe} direct=/dev/mapper/bd loop=/dev/mapper/bl nbd=/dev/nbd0`,
      '/usr/bin/qemu-nbd -d /dev/nbd0 >/dev/null',
      `${V} -d bd >/dev/null; ${V} -d bl >/dev/null`,
    ],
    then: { exec: '/run/initramfs/shutdown poweroff' },
  });
  fs.mkdirSync(path.join(rootDir, 'bench'), { recursive: true });
  const cc = spawnSync('musl-gcc', ['-static', '-O2', '-Wall', '-o', path.join(rootDir, 'bench/io-probe'), path.join(here, 'io-probe.c')], { encoding: 'utf8' });
  if (cc.error || cc.status !== 0) throw new Error(`Could not build bench/io-probe.c with musl-gcc (Debian package musl-tools): ${cc.stderr ?? cc.error}`);
  const qemuNbd = '/usr/bin/qemu-nbd';
  for (const f of [qemuNbd, ...sharedLibraries(qemuNbd)]) {
    const to = path.join(rootDir, f);
    fs.mkdirSync(path.dirname(to), { recursive: true });
    fs.copyFileSync(fs.realpathSync(f), to);
    fs.chmodSync(to, 0o755);
  }
  const rootFs = path.join(work, 'root.ext4');
  makeExt4(rootFs, { sizeMiB: 128, label: 'benchroot', fromDir: rootDir });
  const guestRaw = path.join(work, 'linux.img');
  makePartitionedDisk(guestRaw, { table: 'gpt', partitions: [{ image: rootFs, type: ROOT_TYPE, name: 'linux' }] });

  // Three copies of one dynamic VHDX (no block allocated), on an ext4 host partition.
  const vhdx = path.join(work, 'data.vhdx');
  sh('qemu-img', ['create', '-q', '-f', 'vhdx', '-o', 'block_size=1M', vhdx, `${seqMiB + 16}M`]);
  const hostFs = path.join(work, 'host.ext4');
  makeExt4(hostFs, {
    sizeMiB: 128 + 3 * (seqMiB + 24) + 64,
    label: 'benchhost',
    files: { '/img/linux.img': { hostFile: guestRaw }, '/img/direct.vhdx': { hostFile: vhdx }, '/img/loop.vhdx': { hostFile: vhdx }, '/img/nbd.vhdx': { hostFile: vhdx } },
  });
  const disk = path.join(work, 'host.img');
  makePartitionedDisk(disk, { table: 'gpt', partitions: [{ image: hostFs, name: 'benchhost' }] });
  for (const f of [rootFs, guestRaw, hostFs]) fs.rmSync(f);

  const vm = await bootVm({ name: 'bench-vdiskload', kernel, initrd, append: 'root=vdisk:LABEL=benchhost:/img/linux.img rd.vdisk.map=loop rw', disks: [{ file: disk, interface: 'virtio-blk' }], accel });
  let t: string;
  try {
    await vm.waitFor(new RegExp(`${GUEST_MARKER}|starting the rescue shell`), 3_600_000);
    t = vm.transcript();
    if (!t.includes(GUEST_MARKER)) throw new Error(`vdboot stopped: ${(/ERROR: (.*)/.exec(t)?.[1] ?? '').slice(0, 400)}`);
    await vm.waitExit(120_000);
  } finally {
    if (!vm.exited) await vm.kill();
  }
  const facts = parseGuestFacts(t).facts;
  const error = t.split('\n').find((l) => l.includes('VDBOOT-IO error='));
  if (error) throw new Error(error.slice(error.indexOf('error=')));
  console.log(`vdiskload direct: ${facts.direct ?? '?'}`);
  console.log(`vdiskload --map loop: ${facts.loop ?? '?'}`);
  if (!/data path: direct/.test(facts.direct ?? '')) throw new Error('vdiskload did not take the direct path for direct.vhdx');

  const lines = t.split('\n').map((l) => l.replace(/\r$/, ''));
  const roundsOf = (target: string): Record<Measure, number>[] =>
    lines.filter((l) => l.includes('VDBOOT-IO-ROUND ') && keyValues(l).target === target).map((l) => {
      const kv = keyValues(l);
      return Object.fromEntries(MEASURES.map((m) => [m, Number(kv[m])])) as Record<Measure, number>;
    });
  const best = (target: string): Record<string, string> => {
    const l = lines.find((x) => x.includes('VDBOOT-IO ') && keyValues(x).target === target);
    if (!l) throw new Error(`io-probe printed no result for ${target}`);
    const kv = keyValues(l);
    if (kv.bad_blocks !== '0') throw new Error(`io-probe read back ${kv.bad_blocks} wrong block(s) on ${target}`);
    return kv;
  };
  const r = Object.fromEntries(TARGETS.map((x) => [x, roundsOf(x)])) as Record<(typeof TARGETS)[number], Record<Measure, number>[]>;
  console.log(`\n${'measure'.padEnd(18)}${TARGETS.map((x) => x.padStart(10)).join('')}   direct/nbd  loop/nbd   (best round; ratios: median of paired rounds)`);
  const verdicts: string[] = [];
  for (const m of MEASURES) {
    const b = TARGETS.map((x) => Number(best(x)[m]));
    const dn = median(r.direct.map((x, i) => x[m] / r.nbd[i]![m]));
    const ln = median(r.loop.map((x, i) => x[m] / r.nbd[i]![m]));
    console.log(`${LABELS[m].padEnd(18)}${b.map((v) => v.toFixed(1).padStart(10)).join('')}   ${`${dn.toFixed(2)}x`.padStart(10)}  ${`${ln.toFixed(2)}x`.padStart(8)}`);
    if (m.includes('read')) verdicts.push(`${LABELS[m]}: direct ${dn.toFixed(2)}x nbd (target 3x: ${dn >= 3 ? 'met' : 'NOT met'}), loop ${ln.toFixed(2)}x nbd (target 1x: ${ln >= 1 ? 'met' : 'NOT met'})`);
  }
  console.log(`\n${verdicts.join('\n')}`);
} finally {
  fs.rmSync(work, { recursive: true, force: true });
}
