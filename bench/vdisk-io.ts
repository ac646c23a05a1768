// root=vdisk I/O benchmark (issue 4): sequential and random read/write throughput inside the
// guest, with O_DIRECT on a preallocated scratch file of its root filesystem, for the same
// ext4 root
//   raw     on a plain partition of the host disk (the limit)
//   direct  in a fixed VHD on the NTFS partition of that disk, mapped by device-mapper
//           straight onto the partition's sectors (rd.vdisk.map=auto picks it)
//   loop    the same image through ntfs-3g and a loop device (rd.vdisk.map=loop)
//   nbd     the same image served by qemu-nbd through ntfs-3g (rd.vdisk.map=nbd)
// all on one virtio-blk disk (a fresh copy per boot, qemu's default cache mode).
// Under TCG on a shared machine the absolute numbers swing widely from boot to boot, so the
// comparison with raw is paired: every vdisk boot also mounts the plain partition 2 of the
// same disk (the same ext4 copy, with the root's mount options) and io-probe measures both
// scratch files in turns, each phase's passes interleaved (A B A B …), so both sides share the
// machine's moments alike; a round's ratio compares the two sides of that round. A boot's ratio
// path / raw for a measure is the median over its rounds of each round's ratio; the table
// shows the median of those over boots, and the absolute numbers beside them. Vdisk paths
// are compared with each other through their ratios to raw. A plain-partition boot (raw
// alone) still runs as a reference and for the kernel uptime at which the guest's init
// starts (vdisk boot vs plain-partition boot).
// The direct boots also measure a control: the same filesystem on partition 3, through one
// dm-linear target over the whole partition made in the guest by bench/dm-linear.c — the
// least any device-mapper path can be — so "control / raw" is what device-mapper itself costs
// on this machine, and "direct / control" what vdboot's path adds to it.
// Targets: direct >= 0.95 x raw and >= 3 x nbd on every measure; init at <= 1.3 x.
// BENCH_RUNS=N boots each case N times (1), interleaved; medians over boots are shown.
// BENCH_IO_SEQ_MIB (64) and BENCH_IO_RAND_OPS (2000) size one pass of each phase; a phase
// repeats its pass until it has run BENCH_IO_MIN_SECONDS (2), so fast paths are timed over
// more than a few milliseconds; each boot runs the phases BENCH_IO_ROUNDS times (3) on each
// side; the absolute numbers are each side's best round (the least disturbed by other work).
import { spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { writeInitramfs } from '../mkinitramfs/build.ts';
import { convertImage, makeExt4, makeNtfs, makePartitionedDisk } from '../qemu/disks.ts';
import { buildGuestRoot, guestFact, parseGuestFacts, GUEST_MARKER } from '../qemu/guest.ts';
import { bootVm, defaultKernel, kernelVersion, probeAccel } from '../qemu/harness.ts';

const here = path.dirname(fileURLToPath(import.meta.url));
const runs = Math.max(1, Number(process.env.BENCH_RUNS ?? 1) || 1);
const seqMiB = Math.max(1, Number(process.env.BENCH_IO_SEQ_MIB ?? 64) || 64);
const randOps = Math.max(1, Number(process.env.BENCH_IO_RAND_OPS ?? 2000) || 2000);
const rounds = Math.max(1, Number(process.env.BENCH_IO_ROUNDS ?? 3) || 3);
const minSeconds = Math.max(0, Number(process.env.BENCH_IO_MIN_SECONDS ?? 2) || 0);
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-bench-vdisk-io-'));
const MiB = 1024 * 1024;
const BASIC_DATA = 'EBD0A0A2-B9E5-4433-87C0-68B6B72699C7';
const ROOT_TYPE = '4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709';
// A fixed VHD, as Windows' native VHD boot uses. (qemu-img's fixed VHDX marks the blocks it
// did not write as zero blocks in its table, which a read-write mapping must not cover.)
const IMAGE = '/VMs/My Linux.vhd';
const MEASURES = ['seq_write_mibs', 'seq_read_mibs', 'rand_write_iops', 'rand_read_iops'] as const;
type Measure = (typeof MEASURES)[number];
const LABELS: Record<Measure, string> = {
  seq_write_mibs: 'seq write MiB/s',
  seq_read_mibs: 'seq read MiB/s',
  rand_write_iops: 'rand write IOPS',
  rand_read_iops: 'rand read IOPS',
};

/** What io-probe measured on one target in one boot: its best round, and every round. */
interface Probe {
  best: Record<Measure, number>;
  rounds: Record<Measure, number>[];
}

/** One boot of a vdisk case: the root (the path under test) and the plain partition, measured in turns. */
interface PairedBoot {
  path: Probe;
  raw: Probe;
  /** path / raw per measure: the median over rounds of each round's ratio (its two sides ran back to back) */
  ratio: Record<Measure, number>;
  /** the direct case: the dm-linear control over partition 3, and control / raw */
  control?: Probe;
  controlRatio?: Record<Measure, number>;
}

interface Case {
  name: 'raw' | 'direct' | 'loop' | 'nbd';
  append: string;
  initrd: string;
  /** the console line that shows vdboot took the path this case measures */
  expect?: RegExp;
  /** the guest's root device */
  device: string;
  /** the raw case's boots: the plain partition as root, alone (reference numbers and init uptime) */
  alone: Probe[];
  /** a vdisk case's boots */
  paired: PairedBoot[];
  uptimes: number[];
  /** seconds vdboot itself took, from its "starting /sbin/init (vdboot took X s)" line */
  initrdSeconds: number[];
  failures: string[];
}

/** A bench/*.c guest tool, compiled static with musl-gcc (the guest has no C library). */
function buildTool(source: string, out: string): void {
  const r = spawnSync('musl-gcc', ['-static', '-O2', '-Wall', '-o', out, path.join(here, source)], { encoding: 'utf8' });
  if (r.error || r.status !== 0) throw new Error(`Could not build bench/${source} with musl-gcc (Debian package musl-tools): ${r.stderr ?? r.error}`);
}

const keyValues = (line: string): Record<string, string> => Object.fromEntries([...line.matchAll(/(\w+)=(\S+)/g)].map((m) => [m[1]!, m[2]!]));

function measures(kv: Record<string, string>, line: string): Record<Measure, number> {
  const out = {} as Record<Measure, number>;
  for (const m of MEASURES) {
    const v = Number(kv[m]);
    if (!Number.isFinite(v) || v <= 0) throw new Error(`io-probe: no ${m} in "${line}"`);
    out[m] = v;
  }
  return out;
}

/** What io-probe printed for each target, as numbers; throws on its error line, bad blocks, or a missing target. */
function parseProbe(transcript: string, targets: string[]): Record<string, Probe> {
  const lines = transcript.split('\n').map((l) => l.replace(/\r$/, ''));
  const error = lines.find((l) => /VDBOOT-IO error=/.test(l));
  if (error) throw new Error(`io-probe: ${error.slice(error.indexOf('error='))}`);
  const out: Record<string, Probe> = {};
  for (const target of targets) {
    const final = lines.find((l) => l.includes('VDBOOT-IO ') && keyValues(l).target === target);
    if (!final) throw new Error(`io-probe printed no VDBOOT-IO line for ${target}`);
    const kv = keyValues(final);
    if (kv.bad_blocks !== '0') throw new Error(`io-probe read back ${kv.bad_blocks} block(s) of ${target} that do not hold what was written`);
    const rounds = lines
      .filter((l) => l.includes('VDBOOT-IO-ROUND ') && keyValues(l).target === target)
      .map((l) => measures(keyValues(l), l));
    if (rounds.length !== Number(kv.rounds)) throw new Error(`io-probe printed ${rounds.length} round(s) for ${target}, not ${kv.rounds}`);
    out[target] = { best: measures(kv, final), rounds };
  }
  return out;
}

const median = (xs: number[]): number | undefined => {
  if (!xs.length) return undefined;
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};
const ratio = (a: number | undefined, b: number | undefined): number | undefined => (a === undefined || b === undefined || b === 0 ? undefined : a / b);
const fmtRatio = (r: number | undefined): string => (r === undefined ? '—' : `${r >= 0.1 ? r.toFixed(2) : r.toPrecision(2)}×`);
const fmt = (v: number | undefined, digits = 1): string => (v === undefined ? '—' : v.toFixed(digits));

/** path / raw per measure for one paired boot: each round's two sides ran back to back, so their ratio is the paired one. */
function pairedRatio(p: Probe, raw: Probe): Record<Measure, number> {
  const out = {} as Record<Measure, number>;
  for (const m of MEASURES) out[m] = median(p.rounds.map((r, i) => r[m] / raw.rounds[i]![m]))!;
  return out;
}

try {
  const kernel = defaultKernel();
  const accel = await probeAccel(kernel);
  console.log(
    `kernel ${kernelVersion(kernel)}, accel ${accel}, ${runs} boot(s) per case, ${os.cpus().length} CPUs, load average ${os.loadavg().map((l) => l.toFixed(1)).join(' ')}`,
  );
  console.log(
    `work per boot: ${rounds} round(s), each phase passes of ${seqMiB} MiB sequential (1 MiB blocks) or ${randOps} random 4 KiB operations repeated for ≥ ${minSeconds} s, O_DIRECT, on a ${seqMiB} MiB scratch file of the root and, in turns, of the plain partition; absolute numbers: best round`,
  );

  // Three initramfs images, as a user would build them for each path.
  const initrd = path.join(work, 'initrd.img');
  const initrdNtfs3g = path.join(work, 'initrd-ntfs3g.img');
  const initrdNbd = path.join(work, 'initrd-nbd.img');
  writeInitramfs(initrd, { kernel, without: ['ntfs-3g'] }); // the direct path with no NTFS driver at all
  writeInitramfs(initrdNtfs3g, { kernel, tools: ['ntfs-3g'] });
  writeInitramfs(initrdNbd, { kernel, tools: ['ntfs-3g', 'qemu-nbd'] });

  // The guest root: busybox, io-probe, and a scratch file of random bytes (allocated, not sparse).
  const rootDir = path.join(work, 'root');
  // A vdisk boot measures its root and, in turns with it, the same file on the plain partition
  // 2 of the same disk (a copy of this filesystem that such a boot leaves alone), mounted with
  // the root's own options; the plain-partition boot measures its root alone.
  const probe = `/bench/io-probe ${seqMiB} ${randOps} ${rounds} ${minSeconds}`;
  buildGuestRoot(rootDir, {
    commands: [
      "if grep -q '^/dev/vda2 / ' /proc/mounts; then",
      `  ${probe} root=/bench/scratch`,
      'else',
      `  o=$(awk '$2 == "/" { o = $4 } END { print o }' /proc/mounts)`,
      '  if mount -t ext4 -o "$o" /dev/vda2 /mnt/raw; then',
      `    ${guestFact('rawmount', "$(grep ' /mnt/raw ' /proc/mounts)")}`,
      '    control=',
      "    if grep -q 'bench.dmctl=1' /proc/cmdline; then",
      '      if /bench/dm-linear dmctl /dev/vda3 && mount -t ext4 -o "$o" /dev/mapper/dmctl /mnt/dm; then',
      `        ${guestFact('dmmount', "$(grep ' /mnt/dm ' /proc/mounts)")}`,
      '        control=dm=/mnt/dm/bench/scratch',
      '      else',
      '        echo "VDBOOT-IO error=could not make or mount the dm-linear control over /dev/vda3"',
      '      fi',
      '    fi',
      `    ${probe} root=/bench/scratch raw=/mnt/raw/bench/scratch $control`,
      '    [ -n "$control" ] && umount /mnt/dm',
      '    umount /mnt/raw',
      '  else',
      '    echo "VDBOOT-IO error=could not mount the plain partition /dev/vda2 at /mnt/raw with options $o"',
      '  fi',
      'fi',
    ],
  });
  fs.mkdirSync(path.join(rootDir, 'bench'));
  fs.mkdirSync(path.join(rootDir, 'mnt/raw'), { recursive: true });
  fs.mkdirSync(path.join(rootDir, 'mnt/dm'), { recursive: true });
  buildTool('io-probe.c', path.join(rootDir, 'bench/io-probe'));
  buildTool('dm-linear.c', path.join(rootDir, 'bench/dm-linear'));
  fs.writeFileSync(path.join(rootDir, 'bench/scratch'), crypto.randomBytes(seqMiB * MiB));
  const rootFs = path.join(work, 'root.ext4');
  makeExt4(rootFs, { sizeMiB: seqMiB + 32, label: 'benchroot', fromDir: rootDir });

  // The guest disk as a fixed VHD on NTFS, and the same filesystem on a plain partition next to it.
  const guestRaw = path.join(work, 'guest.raw');
  makePartitionedDisk(guestRaw, { table: 'gpt', partitions: [{ image: rootFs, type: ROOT_TYPE, name: 'linux' }] });
  const vhd = path.join(work, 'guest.vhd');
  convertImage(guestRaw, vhd, 'vpc', ['subformat=fixed']);
  const ntfs = path.join(work, 'host.ntfs');
  makeNtfs(ntfs, { sizeMiB: Math.ceil(fs.statSync(vhd).size / MiB) + 40, label: 'Windows', files: { [IMAGE]: { hostFile: vhd } } });
  const hostDisk = path.join(work, 'host.img');
  makePartitionedDisk(hostDisk, {
    table: 'gpt',
    partitions: [
      { image: ntfs, type: BASIC_DATA, name: 'Basic data partition' },
      { image: rootFs, type: 'linux', name: 'plainroot' },
      { image: rootFs, type: 'linux', name: 'dmcontrol' },
    ],
  });
  console.log(`host disk: NTFS ${(fs.statSync(ntfs).size / MiB).toFixed(0)} MiB holding ${IMAGE} (fixed VHD, ${(fs.statSync(vhd).size / MiB).toFixed(0)} MiB), then the same ext4 root (${seqMiB + 32} MiB) on partitions 2 (plain) and 3 (under the dm-linear control)`);
  for (const f of [guestRaw, vhd, ntfs]) fs.rmSync(f);

  const root = `"root=vdisk:LABEL=Windows:${IMAGE}" rw`;
  const mk = (name: Case['name'], append: string, rd: string, device: string, expect?: RegExp): Case => ({
    name,
    append,
    initrd: rd,
    device,
    expect,
    alone: [],
    paired: [],
    uptimes: [],
    initrdSeconds: [],
    failures: [],
  });
  const cases: Case[] = [
    mk('raw', 'root=PARTLABEL=plainroot rw', initrd, '/dev/vda2'),
    mk('direct', `${root} bench.dmctl=1`, initrd, '/dev/mapper/vdisk0p1', /direct: the image is fully mappable/),
    mk('loop', `${root} rd.vdisk.map=loop`, initrdNtfs3g, '/dev/mapper/vdisk0p1', /loop \(asked for\)/),
    mk('nbd', `${root} rd.vdisk.map=nbd`, initrdNbd, '/dev/mapper/vdisk0p1', /nbd \(asked for\)/),
  ];
  const line = (p: Record<Measure, number>): string => MEASURES.map((m) => `${LABELS[m]} ${fmt(p[m])}`).join(', ');
  const ratioLine = (r: Record<Measure, number>): string => MEASURES.map((m) => `${LABELS[m]} ${fmtRatio(r[m])}`).join(', ');

  // Boots interleaved (raw direct loop nbd raw …); within a vdisk boot the pairing does the rest.
  for (let run = 1; run <= runs; run++) {
    for (const c of cases) {
      const disk = path.join(work, `disk-${c.name}.img`);
      fs.copyFileSync(hostDisk, disk); // a fresh copy: every boot starts from the same bytes
      const vm = await bootVm({ name: `bench-io-${c.name}`, kernel, initrd: c.initrd, append: c.append, disks: [{ file: disk, interface: 'virtio-blk' }], accel });
      try {
        // A boot that stops in vdboot's rescue shell fails at once instead of at the timeout.
        const seen = await vm.waitFor(new RegExp(`${GUEST_MARKER}|starting the rescue shell`), 1_800_000);
        const t = vm.transcript();
        if (!seen.includes(GUEST_MARKER)) {
          throw new Error(`vdboot stopped: ${(/ERROR: (.*)/.exec(t)?.[1] ?? seen).slice(0, 400)}`);
        }
        const facts = parseGuestFacts(t);
        if (facts.root.device !== c.device) throw new Error(`root is ${facts.root.device}, expected ${c.device}`);
        if (c.expect && !c.expect.test(t)) throw new Error(`vdboot did not take the ${c.name} path (no ${String(c.expect)} on the console)`);
        const took = /starting \S+ \(vdboot took ([\d.]+) s\)/.exec(t);
        const head = `  run ${run}: ${c.name.padEnd(7)} init at ${facts.uptime.toFixed(2)} s (vdboot ${took ? took[1] : '?'} s)`;
        if (c.name === 'raw') {
          const r = parseProbe(t, ['root']).root!;
          c.alone.push(r);
          console.log(`${head}; ${line(r.best)}`);
        } else {
          // both sides on the same filesystem type with the same mount options
          const rawMount = (facts.facts.rawmount ?? '').split(/\s+/);
          if (rawMount[0] !== '/dev/vda2' || rawMount[2] !== facts.root.fstype || rawMount[3] !== facts.root.options.join(',')) {
            throw new Error(`the plain partition is mounted as "${facts.facts.rawmount ?? ''}", not like the root (${facts.root.fstype} ${facts.root.options.join(',')})`);
          }
          const withControl = c.name === 'direct';
          const p = parseProbe(t, withControl ? ['root', 'raw', 'dm'] : ['root', 'raw']);
          const boot: PairedBoot = { path: p.root!, raw: p.raw!, ratio: pairedRatio(p.root!, p.raw!) };
          if (withControl) {
            boot.control = p.dm!;
            boot.controlRatio = pairedRatio(p.dm!, p.raw!);
          }
          c.paired.push(boot);
          console.log(
            `${head}\n      ${c.name}: ${line(boot.path.best)}\n      raw:    ${line(boot.raw.best)}\n      ${c.name} / raw (paired): ${ratioLine(boot.ratio)}` +
              (boot.control ? `\n      control: ${line(boot.control.best)}\n      control / raw (paired): ${ratioLine(boot.controlRatio!)}` : ''),
          );
        }
        c.uptimes.push(facts.uptime);
        if (took) c.initrdSeconds.push(Number(took[1]));
        await vm.waitExit(120_000).catch(() => undefined);
      } catch (e) {
        c.failures.push(`run ${run}: ${(e as Error).message.split('\n')[0]} (log: ${vm.logFile})`);
        console.log(`  run ${run}: ${c.name.padEnd(7)} FAILED (log: ${vm.logFile})`);
      } finally {
        await vm.kill();
        fs.rmSync(disk, { force: true });
      }
    }
  }

  const byName = Object.fromEntries(cases.map((c) => [c.name, c])) as Record<Case['name'], Case>;
  /** the median over boots of a case's paired ratio path / raw */
  const pr = (c: Case, m: Measure): number | undefined => median(c.paired.map((b) => b.ratio[m]));
  const n = (c: Case): number => c.alone.length + c.paired.length;

  console.log('');
  console.log('absolute numbers, medians over boots of each boot\'s best round:');
  console.log(`${'path'.padEnd(22)}${MEASURES.map((m) => LABELS[m].padStart(17)).join('')}${'init at s'.padStart(11)}${'vdboot s'.padStart(10)}${'n'.padStart(4)}`);
  const absRow = (label: string, probes: Probe[], c?: Case): void =>
    console.log(
      `${label.padEnd(22)}${MEASURES.map((m) => fmt(median(probes.map((p) => p.best[m]))).padStart(17)).join('')}` +
        (c ? `${fmt(median(c.uptimes), 2).padStart(11)}${fmt(median(c.initrdSeconds), 2).padStart(10)}${String(n(c)).padStart(4)}` : `${''.padStart(21)}${String(probes.length).padStart(4)}`),
    );
  absRow('raw (alone)', byName.raw.alone, byName.raw);
  for (const c of cases.filter((c) => c.name !== 'raw')) {
    absRow(c.name, c.paired.map((b) => b.path), c);
    absRow(`  raw, same boots`, c.paired.map((b) => b.raw));
  }

  console.log('');
  console.log('ratios, medians over boots of the paired ratio in each boot (its path and the plain partition in turns):');
  console.log(`${'ratios'.padEnd(22)}${MEASURES.map((m) => LABELS[m].padStart(17)).join('')}${'init at'.padStart(11)}`);
  const uptimeVsRaw = (c: Case): number | undefined => ratio(median(c.uptimes), median(byName.raw.uptimes));
  for (const c of cases.filter((c) => c.name !== 'raw')) {
    console.log(`${`${c.name} / raw`.padEnd(22)}${MEASURES.map((m) => fmtRatio(pr(c, m)).padStart(17)).join('')}${fmtRatio(uptimeVsRaw(c)).padStart(11)}`);
  }
  // The device-mapper control of the direct boots: one dm-linear target, nothing of vdboot's.
  const ctl = (m: Measure): number | undefined => median(byName.direct.paired.flatMap((b) => (b.controlRatio ? [b.controlRatio[m]] : [])));
  console.log(`${'dm-linear ctl / raw'.padEnd(22)}${MEASURES.map((m) => fmtRatio(ctl(m)).padStart(17)).join('')}`);
  console.log(`${'direct / dm-linear ctl'.padEnd(22)}${MEASURES.map((m) => fmtRatio(ratio(pr(byName.direct, m), ctl(m))).padStart(17)).join('')}`);
  // Between two vdisk paths: each measured against the plain partition of its own boots.
  const via = (a: Case, b: Case, m: Measure): number | undefined => ratio(pr(a, m), pr(b, m));
  const cross: [Case['name'], Case['name']][] = [['direct', 'loop'], ['direct', 'nbd']];
  for (const [a, b] of cross) {
    console.log(
      `${`${a} / ${b} (via raw)`.padEnd(22)}${MEASURES.map((m) => fmtRatio(via(byName[a], byName[b], m)).padStart(17)).join('')}` +
        `${fmtRatio(ratio(median(byName[a].uptimes), median(byName[b].uptimes))).padStart(11)}`,
    );
  }
  console.log('(init at: vdisk boots against the plain-partition boots; "via raw": (a / raw) / (b / raw))');

  console.log('');
  console.log('targets (issue 4):');
  const verdict = (rs: (number | undefined)[], ok: (r: number) => boolean): string =>
    rs.some((r) => r === undefined) ? 'not measured' : rs.every((r) => ok(r!)) ? 'met' : 'NOT met';
  const vsRaw = MEASURES.map((m) => pr(byName.direct, m));
  const vsNbd = MEASURES.map((m) => via(byName.direct, byName.nbd, m));
  const worst = (rs: (number | undefined)[]): string => (rs.some((r) => r === undefined) ? '—' : fmtRatio(Math.min(...(rs as number[]))));
  console.log(`  direct ≥ 0.95 × raw (every measure, paired):  worst ${worst(vsRaw)} ${verdict(vsRaw, (r) => r >= 0.95)}`);
  const floor = MEASURES.map((m) => ctl(m));
  console.log(`    (one dm-linear target alone, the control: worst ${worst(floor)} of raw; direct against it: worst ${worst(MEASURES.map((m) => ratio(pr(byName.direct, m), ctl(m))))})`);
  console.log(`  direct ≥ 3 × qemu-nbd (every measure, via raw): worst ${worst(vsNbd)} ${verdict(vsNbd, (r) => r >= 3)}`);
  const up = uptimeVsRaw(byName.direct);
  console.log(`  init at, vdisk ≤ 1.3 × plain partition: ${fmtRatio(up)} ${up === undefined ? 'not measured' : up <= 1.3 ? 'met' : 'NOT met'}`);

  const failures = cases.flatMap((c) => c.failures.map((f) => `${c.name}: ${f}`));
  if (failures.length) {
    console.log('\nfailures:');
    for (const f of failures) console.log(`  ${f}`);
  }
  // The benchmark itself fails only when the path it is about could not be compared at all.
  if (byName.direct.paired.length === 0) process.exitCode = 1;
} finally {
  fs.rmSync(work, { recursive: true, force: true });
}
