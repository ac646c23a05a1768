// Size benchmark (issue 13): the universal image `vdboot mkinitramfs` builds with no flags on
// Debian 12's 6.12 (its .ko.xz modules kept as shipped, in an uncompressed segment after the
// zstd archive) and on the installed 6.1 (plain .ko modules, compressed with the rest), with
// ntfs-3g in both by default (sparse NTFS image files are written through it), against the
// targets: 6.12 ≤ 4 MiB, 6.1 ≤ 6 MiB. Then the breakdown from the build's own list of files,
// and what the image would weigh with the obvious cuts, and --hostonly for the recorded
// machine of test/kit/sysfs.ts (an AHCI and a virtio disk, ext4 root, an NTFS host).
import { readCpio } from '../src/formats/cpio.ts';
import { buildInitramfs, compress, type MkinitramfsOptions, type MkinitramfsResult } from '../mkinitramfs/build.ts';
import { cachedKernel, defaultKernel } from '../qemu/harness.ts';
import { recordedMounts, recordedSysfs } from '../test/kit/sysfs.ts';

const MiB = 1024 * 1024;
const mib = (n: number) => `${(n / MiB).toFixed(2)} MiB`;
const kib = (n: number) => `${Math.round(n / 1024)} KiB`;

function breakdown(r: MkinitramfsResult): void {
  const data = new Map(readCpio(r.cpio).map((e) => [e.name, e.data]));
  const alone = (paths: string[]) => {
    const bytes = paths.map((p) => data.get(p)).filter((b): b is Uint8Array => b !== undefined);
    if (bytes.length === 0) return 0;
    const all = new Uint8Array(bytes.reduce((a, b) => a + b.length, 0));
    let o = 0;
    for (const b of bytes) all.set(b, (o += b.length) - b.length);
    return compress(all, r.compression).length;
  };
  const groups: Array<[string, typeof r.parts]> = [
    ['init (QuickJS + bundle)', r.parts.filter((p) => p.part === 'init')],
    ['busybox', r.parts.filter((p) => p.part === 'busybox')],
    ...[...new Set(r.parts.flatMap((p) => (p.tool ? [p.tool] : [])))].map((t): [string, typeof r.parts] => [`${t} + libraries`, r.parts.filter((p) => p.tool === t)]),
    ['modules (plain .ko)', r.parts.filter((p) => p.part === 'modules')],
    ['manifest, modules.dep/alias', r.parts.filter((p) => p.part === 'manifest')],
    ['other', r.parts.filter((p) => p.part === 'other')],
  ];
  console.log(`  ${'part'.padEnd(30)}${'files'.padStart(6)}${'unpacked'.padStart(12)}${`${r.compression} alone`.padStart(14)}`);
  for (const [name, parts] of groups) {
    if (parts.length === 0) continue;
    const bytes = parts.reduce((a, p) => a + p.bytes, 0);
    console.log(`  ${name.padEnd(30)}${String(parts.length).padStart(6)}${kib(bytes).padStart(12)}${kib(alone(parts.map((p) => p.path))).padStart(14)}`);
  }
  const kept = r.parts.filter((p) => p.part === 'modules-compressed');
  if (kept.length) console.log(`  ${'modules kept compressed'.padEnd(30)}${String(kept.length).padStart(6)}${''.padStart(12)}${kib(kept.reduce((a, p) => a + p.bytes, 0)).padStart(14)}  (as shipped, not compressed again)`);
  // modules by size class, as stored (a .ko.xz as shipped, a .ko unpacked)
  const mods = r.parts.filter((p) => p.part === 'modules' || p.part === 'modules-compressed');
  const classes: Array<[string, number]> = [['< 16 KiB', 16 * 1024], ['16-64 KiB', 64 * 1024], ['64-256 KiB', 256 * 1024], ['≥ 256 KiB', Infinity]];
  let lo = 0;
  console.log(`  modules by size as stored (${mods.length}):`);
  for (const [label, hi] of classes) {
    const inClass = mods.filter((m) => m.bytes >= lo && m.bytes < hi).sort((a, b) => b.bytes - a.bytes);
    const name = (p: string) => p.split('/').pop()!;
    const big = hi === Infinity || label === '64-256 KiB' ? `  ${inClass.slice(0, 8).map((m) => `${name(m.path)} ${kib(m.bytes)}`).join(', ')}${inClass.length > 8 ? ', …' : ''}` : '';
    console.log(`    ${label.padEnd(12)}${String(inClass.length).padStart(4)} modules ${kib(inClass.reduce((a, m) => a + m.bytes, 0)).padStart(9)}${big}`);
    lo = hi;
  }
}

function line(label: string, r: MkinitramfsResult, target?: number): string {
  const parts = r.modulesCpio.length ? ` = ${r.compression} archive ${mib(r.modulesOffset)} + modules segment ${mib(r.modulesCpio.length)}` : ` (${r.compression})`;
  const t = target === undefined ? '' : `   target ≤ ${target} MiB: ${r.image.length <= target * MiB ? 'met' : `NOT met (${mib(r.image.length - target * MiB)} over)`}`;
  return `${label.padEnd(38)}${mib(r.image.length).padStart(10)}${parts}, ${r.modules} modules, ${(r.milliseconds / 1000).toFixed(2)} s${t}`;
}

const kernels: Array<[string, string | undefined, number]> = [
  ['6.12', cachedKernel('6.12'), 4],
  ['6.1', defaultKernel(), 6],
];
for (const [series, kernel, target] of kernels) {
  if (!kernel) {
    console.log(`kernel ${series}: not available (scripts/fetch-kernel.sh fetches 6.12)`);
    continue;
  }
  const base: MkinitramfsOptions = { kernel, sourceDateEpoch: 0 };
  const r = buildInitramfs(base);
  console.log(`\nkernel ${r.manifest.kernelRelease} (${kernel}); with ${r.tools.join(', ') || 'no extra programs'}; modules: ${Object.entries(r.moduleLoading).map(([f, how]) => `.ko.${f} → ${how}`).join(', ') || 'plain .ko'}`);
  console.log(line('universal image, no flags', r, target));
  breakdown(r);
  console.log('  with cuts:');
  const variants: Array<[string, MkinitramfsOptions]> = [
    ['--omit-module btrfs,xfs', { omitModules: ['btrfs', 'xfs'] }],
    ['--without ntfs-3g', { without: ['ntfs-3g'] }],
    ['--without cryptsetup', { without: ['cryptsetup'] }],
    ['--level 19', { level: 19 }],
    ['all three', { omitModules: ['btrfs', 'xfs'], without: ['ntfs-3g'], level: 19 }],
    ['--hostonly (AHCI+virtio, ext4+ntfs)', { hostonly: { sysfs: recordedSysfs(), mounts: recordedMounts() } }],
  ];
  for (const [label, extra] of variants) console.log(`    ${line(label, buildInitramfs({ ...base, ...extra }), target)}`);
}
