// Unlock + activation benchmark (issue 11): Ubuntu's encrypted layout — GPT with an ESP, /boot
// and LUKS2 → LVM PV → VG "ubuntu-vg" → root LV (ext4) + swap LV — booted with the key file
// given, by vdboot and by Debian's initramfs-tools with its cryptsetup (cryptroot) and lvm2
// (udev rules) hooks, on the same disk, in the same run, interleaved. Two figures per boot:
// the uptime at which the guest's init starts, and the time from the initramfs's start
// ("Run /init as init process") to the root's mount ("EXT4-fs (dm-N): mounted"), both read
// from the guest's kernel log. One vdboot boot per run more with rd.vdboot.debug gives the
// breakdown of its own time (timings.ts).
//
// The key file is in the initramfs for both: initramfs-tools copies a crypttab key file that
// matches KEYFILE_PATTERN to /cryptroot/keyfiles/NAME.key; vdboot gets the same bytes in a
// cpio archive appended to its image and rd.luks.key=/keys/root.key. initramfs-tools is built
// with `mkinitramfs -d CONFDIR`: a copy of /etc/initramfs-tools plus one hook that writes the
// initramfs's /cryptroot/crypttab and key file exactly as cryptsetup's own hook does for a
// crypttab line with the `initramfs` option and a KEYFILE_PATTERN match (that hook reads
// only the machine's own /etc/crypttab and /etc/cryptsetup-initramfs/conf-hook, which are
// never changed here).
//
// The LUKS key slots use PBKDF2 with 1000 iterations (test/kit/stack-disk.ts): key derivation
// costs both the same (it runs in cryptsetup for both) and would only add a constant.
// BENCH_ITOOLS=0 leaves initramfs-tools out (its build takes minutes on a busy machine);
// BENCH_PACK=cryptsetup adds vdboot built with `--pack cryptsetup`;
// BENCH_RUNS=N (3) boots each N times; BENCH_ICOUNT=SHIFT (0) runs QEMU with
// `-icount shift=SHIFT,sleep=off`, so the guest's clock counts instructions and the figures
// survive a busy machine; BENCH_ICOUNT=off uses real time.
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { buildInitramfs, type ToolName } from '../mkinitramfs/build.ts';
import { makeExt4, makePartitionedDisk } from '../qemu/disks.ts';
import { buildGuestRoot, guestFact, parseGuestFacts } from '../qemu/guest.ts';
import { bootVm, defaultKernel, kernelVersion } from '../qemu/harness.ts';
import { writeCpio } from '../src/formats/cpio.ts';
import { makeLuks2, makeLvmPv } from '../test/kit/stack-disk.ts';

const runs = Math.max(1, Number(process.env.BENCH_RUNS ?? 3) || 3);
const icount = process.env.BENCH_ICOUNT ?? '0';
const extraArgs = /^\d+$/.test(icount) ? ['-icount', `shift=${icount},sleep=off`] : [];
const MiB = 1024 * 1024;
const LUKS_UUID = '0b5e1c2d-3f4a-4b6c-8d7e-9f0a1b2c3d4e';
const ROOT = '/dev/mapper/ubuntu--vg-root';

interface Candidate {
  name: string;
  image?: string;
  size?: number;
  buildSeconds?: number;
  append: string;
  uptimes: number[];
  /** "Run /init" to the root's ext4 mount, from the kernel log */
  toMount: number[];
  summaries: string[];
  failures: string[];
}
const candidate = (name: string, append: string): Candidate => ({ name, append, uptimes: [], toMount: [], summaries: [], failures: [] });

function canRun(): string | undefined {
  if (process.getuid?.() !== 0) return 'needs root (losetup for lvm2\'s tools, test/kit/lvm.ts)';
  for (const [tool, pkg] of [['lvm', 'lvm2'], ['cryptsetup', 'cryptsetup-bin'], ['mkinitramfs', 'initramfs-tools']] as const) {
    if (spawnSync('sh', ['-c', `command -v ${tool} || test -x /usr/sbin/${tool}`], { stdio: 'ignore' }).status !== 0) return `needs ${tool} (Debian package ${pkg})`;
  }
  if (!fs.existsSync('/usr/share/initramfs-tools/hooks/cryptroot')) return 'needs initramfs-tools\' cryptsetup hook (Debian package cryptsetup-initramfs)';
  if (!fs.existsSync('/usr/share/initramfs-tools/hooks/lvm2')) return 'needs initramfs-tools\' lvm2 hook (Debian package lvm2)';
  return undefined;
}

/** The guest's kernel-log time of the first line matching `pattern` (a basic regex for grep). */
const KTIME = '#!/bin/busybox sh\ndmesg | grep -m1 -e "$1" | sed -n "s/^\\[ *\\([0-9.]*\\)\\].*/\\1/p"\n';

/**
 * initramfs-tools for `version` with the disk's crypttab line and key file, built from a copy
 * of the machine's configuration (never the machine's own /etc).
 */
function buildInitramfsTools(work: string, version: string, keyFile: string): { image: string; seconds: number } {
  const conf = path.join(work, 'itools-conf');
  execFileSync('cp', ['-a', '/etc/initramfs-tools', conf]);
  fs.mkdirSync(path.join(conf, 'conf.d'), { recursive: true });
  fs.writeFileSync(path.join(conf, 'conf.d', 'resume'), 'RESUME=none\n');
  fs.mkdirSync(path.join(conf, 'hooks'), { recursive: true });
  // What hooks/cryptroot writes for "vda3_crypt UUID=… /etc/keys/root.key luks,discard,initramfs"
  // with KEYFILE_PATTERN="/etc/keys/*.key": the line, the key copied, mode 0600.
  const hook = [
    '#!/bin/sh',
    'PREREQ=""',
    'prereqs() { echo "$PREREQ"; }',
    'case "$1" in prereqs) prereqs; exit 0;; esac',
    'mkdir -p -m0700 "$DESTDIR/cryptroot/keyfiles"',
    `cp ${keyFile} "$DESTDIR/cryptroot/keyfiles/vda3_crypt.key"`,
    'chmod 0600 "$DESTDIR/cryptroot/keyfiles/vda3_crypt.key"',
    `echo "vda3_crypt UUID=${LUKS_UUID} /cryptroot/keyfiles/vda3_crypt.key luks,discard,initramfs" >> "$DESTDIR/cryptroot/crypttab"`,
    '',
  ].join('\n');
  fs.writeFileSync(path.join(conf, 'hooks', 'zz-bench-crypttab'), hook, { mode: 0o755 });
  const image = path.join(work, 'initramfs-tools.img');
  const t = process.hrtime.bigint();
  const r = spawnSync('mkinitramfs', ['-d', conf, '-o', image, version], { encoding: 'utf8', env: { ...process.env, UMASK: '0077' } });
  const seconds = Number(process.hrtime.bigint() - t) / 1e9;
  if (r.status !== 0) throw new Error(`mkinitramfs failed (${r.status}): ${(r.stderr ?? '').trim().split('\n').slice(-5).join(' | ')}`);
  const list = execFileSync('sh', ['-c', `unmkinitramfs ${image} ${path.join(work, 'itools-unpacked')} && find ${path.join(work, 'itools-unpacked')} -path '*cryptroot*' -o -name lvm -o -name 69-lvm.rules`], { encoding: 'utf8' });
  if (!/cryptroot\/crypttab/.test(list) || !/keyfiles\/vda3_crypt\.key/.test(list) || !/\/lvm\n/.test(list) || !/69-lvm\.rules/.test(list)) throw new Error(`initramfs-tools image lacks the crypttab, key file, lvm or its udev rules:\n${list}`);
  fs.rmSync(path.join(work, 'itools-unpacked'), { recursive: true, force: true });
  return { image, seconds };
}

/** vdboot's universal image for `kernel` with the key file appended as /keys/root.key. */
function buildVdboot(work: string, kernel: string, keyFile: string, pack: ToolName[] = []): { image: string; seconds: number } {
  const t = process.hrtime.bigint();
  const r = buildInitramfs({ kernel, pack });
  const seconds = Number(process.hrtime.bigint() - t) / 1e9;
  const keys = writeCpio([{ type: 'dir', path: 'keys', mode: 0o700 }, { type: 'file', path: 'keys/root.key', data: fs.readFileSync(keyFile), mode: 0o600 }]);
  // the kernel reads the next archive's header at a 4-byte boundary
  const pad = (4 - (r.image.length % 4)) % 4;
  const image = path.join(work, `vdboot${pack.map((p) => `-${p}`).join('')}.img`);
  fs.writeFileSync(image, Buffer.concat([r.image, Buffer.alloc(pad), keys]));
  return { image, seconds };
}

function buildDisk(work: string, keyFile: string): string {
  const rootDir = path.join(work, 'root');
  buildGuestRoot(rootDir, {
    files: { 'bin/ktime': KTIME },
    commands: [
      'chmod 755 /bin/ktime',
      guestFact('runinit', '$(ktime "Run /init as init process")'),
      guestFact('rootmount', '$(ktime "EXT4-fs (dm-[0-9]*): mounted")'),
      guestFact('mapper', '$(ls /dev/mapper | tr "\\n" " ")'),
    ],
  });
  const rootFs = path.join(work, 'root.ext4');
  makeExt4(rootFs, { sizeMiB: 32, label: 'root', fromDir: rootDir });
  const swap = path.join(work, 'swap.img');
  fs.writeFileSync(swap, '');
  fs.truncateSync(swap, 8 * MiB);
  execFileSync('mkswap', ['-q', swap]);
  const lvm = makeLvmPv(work, 48, 'ubuntu-vg', [{ name: 'root', sizeMiB: 32, image: rootFs }, { name: 'swap_1', sizeMiB: 8, image: swap }]);
  const luks = makeLuks2(work, lvm.pv, keyFile, 'not used', LUKS_UUID);
  const boot = path.join(work, 'boot.ext4');
  makeExt4(boot, { sizeMiB: 8, label: 'boot' });
  const disk = path.join(work, 'disk.img');
  makePartitionedDisk(disk, { table: 'gpt', partitions: [{ sizeMiB: 2, type: 'uefi', name: 'esp' }, { image: boot, name: 'boot' }, { image: luks.file, name: 'cryptroot' }] });
  for (const f of [rootFs, swap, lvm.pv, luks.file, boot]) fs.rmSync(f);
  return disk;
}

const median = (xs: number[]): number | undefined => {
  if (!xs.length) return undefined;
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};
const fmt = (v: number | undefined, unit: string): string => (v === undefined ? '—' : `${v.toFixed(2)} ${unit}`);
const ratioOf = (a: number | undefined, b: number | undefined): number | undefined => (a === undefined || b === undefined || b === 0 ? undefined : a / b);

const why = canRun();
if (why) {
  console.log(`bench/stack.ts skipped: ${why}`);
  process.exit(0);
}
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-bench-stack-'));
try {
  const kernel = defaultKernel();
  const version = kernelVersion(kernel);
  const keyFile = path.join(work, 'root.key');
  fs.writeFileSync(keyFile, Buffer.from('a 64-byte key file for the benchmark, with a newline or two\n\n..'));
  fs.chmodSync(keyFile, 0o600);
  const disk = buildDisk(work, keyFile);

  const itools = candidate('initramfs-tools', `root=${ROOT} rw quiet`);
  const vdboot = candidate('vdboot', `root=${ROOT} rw quiet rd.luks.key=/keys/root.key`);
  const debug = candidate('vdboot debug', `root=${ROOT} rw loglevel=4 rd.vdboot.debug rd.luks.key=/keys/root.key`);
  if (process.env.BENCH_ITOOLS !== '0') {
    try {
      const r = buildInitramfsTools(work, version, keyFile);
      Object.assign(itools, { image: r.image, size: fs.statSync(r.image).size, buildSeconds: r.seconds });
    } catch (e) {
      itools.failures.push((e as Error).message);
    }
  }
  {
    const r = buildVdboot(work, kernel, keyFile);
    Object.assign(vdboot, { image: r.image, size: fs.statSync(r.image).size, buildSeconds: r.seconds });
    Object.assign(debug, { image: r.image, size: fs.statSync(r.image).size });
  }
  const all = [itools, vdboot, debug];
  const pack = (process.env.BENCH_PACK ?? '').split(',').map((t) => t.trim()).filter(Boolean) as ToolName[];
  if (pack.length) {
    const packed = candidate(`vdboot packed ${pack.join(',')}`, vdboot.append);
    const packedDebug = candidate(`vdboot packed ${pack.join(',')} debug`, debug.append);
    const r = buildVdboot(work, kernel, keyFile, pack);
    Object.assign(packed, { image: r.image, size: fs.statSync(r.image).size, buildSeconds: r.seconds });
    Object.assign(packedDebug, { image: r.image, size: fs.statSync(r.image).size });
    all.push(packed, packedDebug);
  }
  console.log(`kernel ${version}; disk: GPT (ESP, /boot, LUKS2 → PV → ubuntu-vg → root ext4 + swap_1), key file in the initramfs; accel tcg${extraArgs.length ? ` ${extraArgs.join(' ')} (guest time counts instructions)` : ' (real time)'}; ${runs} boot(s) each; load average ${os.loadavg().map((l) => l.toFixed(1)).join(' ')}`);

  for (let run = 1; run <= runs; run++) {
    for (const c of all) {
      if (!c.image) continue;
      const vm = await bootVm({
        name: `bench-stack-${c.name.replace(/\W+/g, '-')}`,
        kernel,
        initrd: c.image,
        append: c.append,
        disks: [{ file: disk, snapshot: true }],
        accel: 'tcg',
        ...(extraArgs.length ? { extraArgs } : {}),
      });
      try {
        await vm.waitFor('VDBOOT-GUEST-OK', 400_000);
        const text = vm.transcript();
        const facts = parseGuestFacts(text);
        if (!facts.facts.mapper?.includes('ubuntu--vg-root')) throw new Error(`the root LV is not in /dev/mapper (${facts.facts.mapper})`);
        c.uptimes.push(facts.uptime);
        const runInit = Number(facts.facts.runinit);
        const mounted = Number(facts.facts.rootmount);
        const span = facts.facts.runinit && facts.facts.rootmount ? mounted - runInit : undefined;
        if (span !== undefined) c.toMount.push(span);
        if (c.append.includes('rd.vdboot.debug')) {
          const summary = text.split('\n').find((l) => l.includes('(debug) timings: '));
          c.summaries.push(summary ? summary.slice(summary.indexOf('timings: ')) : '(no timings line)');
        }
        await vm.waitExit(60_000);
        console.log(`  run ${run}: ${c.name.padEnd(18)} guest init at ${facts.uptime.toFixed(2)} s; /init at ${fmt(runInit, 's')}, root mounted at ${fmt(mounted, 's')} (${fmt(span, 's')} between)`);
      } catch (e) {
        c.failures.push(`run ${run}: ${(e as Error).message.split('\n')[0]} (log: ${vm.logFile})`);
        console.log(`  run ${run}: ${c.name.padEnd(18)} FAILED (log: ${vm.logFile})`);
      } finally {
        await vm.kill();
      }
    }
  }

  console.log('');
  console.log(`${'initramfs'.padEnd(18)}${'size'.padStart(12)}${'build'.padStart(10)}${'guest init at'.padStart(26)}${'/init → root mounted'.padStart(26)}`);
  for (const c of all) {
    const spread = (xs: number[]) => (xs.length > 1 ? ` (${Math.min(...xs).toFixed(2)}–${Math.max(...xs).toFixed(2)})` : '');
    console.log(`${c.name.padEnd(18)}${fmt(c.size === undefined ? undefined : c.size / MiB, 'MiB').padStart(12)}${fmt(c.buildSeconds, 's').padStart(10)}` +
      `${`${fmt(median(c.uptimes), 's')}${spread(c.uptimes)}`.padStart(26)}${`${fmt(median(c.toMount), 's')}${spread(c.toMount)}`.padStart(26)}`);
  }
  const r1 = ratioOf(median(vdboot.uptimes), median(itools.uptimes));
  const r2 = ratioOf(median(vdboot.toMount), median(itools.toMount));
  console.log('');
  console.log('target (issue 11): vdboot ≤ 0.8× initramfs-tools (cryptsetup + lvm2 hooks), medians:');
  console.log(`  guest init at:          ${r1 === undefined ? '—' : `${r1.toFixed(2)}× ${r1 <= 0.8 ? 'met' : 'NOT met'}`}`);
  console.log(`  /init → root mounted:   ${r2 === undefined ? '—' : `${r2.toFixed(2)}× ${r2 <= 0.8 ? 'met' : 'NOT met'}`}`);
  for (const c of all.filter((x) => x.summaries.length)) {
    console.log(`\n${c.name}, where its time went (rd.vdboot.debug, ms):`);
    for (const s of c.summaries) console.log(`  ${s}`);
  }
  const failures = all.flatMap((c) => c.failures.map((f) => `${c.name}: ${f}`));
  if (failures.length) {
    console.log('\nfailures:');
    for (const f of failures) console.log(`  ${f}`);
  }
  if ((itools.image && !itools.uptimes.length) || !vdboot.uptimes.length) process.exitCode = 1;
} finally {
  if (!process.env.BENCH_KEEP) fs.rmSync(work, { recursive: true, force: true });
  else console.log(`kept ${work}`);
}
