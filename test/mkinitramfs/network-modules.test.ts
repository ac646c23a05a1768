/**
 * The universal image carries the wired network drivers of common PCs and VMs and nbd, for
 * roots served over NBD: on the installed 6.1 (plain .ko) and on Debian 12's 6.12 (.ko.xz kept
 * as shipped), each with its dependencies from the kernel's own modules.dep; and the alias
 * table resolves the network cards QEMU and PCs report to the same modules as modprobe does.
 */
import { execFileSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { readCpio } from '../../src/formats/cpio.ts';
import { matchModalias, moduleKey } from '../../src/formats/manifest.ts';
import { buildInitramfs, moduleClosure, UNIVERSAL_NETWORK, type MkinitramfsResult } from '../../mkinitramfs/build.ts';
import { loadModuleIndex } from '../../mkinitramfs/kmod.ts';
import { cachedKernel } from '../../qemu/harness.ts';
import { initBinary, installedRelease, universalBuild } from './helpers.ts';

const release = installedRelease();
const kernel612 = cachedKernel('6.12');

/** Modalias strings of network cards as the kernel reports them (QEMU's models and PC chips). */
const NICS: Array<[string, string]> = [
  ['virtio:d00000001v00001AF4', 'virtio_net'], // virtio-net (the virtio device behind virtio-pci)
  ['pci:v00008086d0000100Esv00001AF4sd00001100bc02sc00i00', 'e1000'], // QEMU's e1000 (82540EM)
  ['pci:v00008086d000010D3sv00001AF4sd00001100bc02sc00i00', 'e1000e'], // QEMU's e1000e (82574L)
  ['pci:v00008086d000010C9sv00008086sd0000A03Cbc02sc00i00', 'igb'], // 82576 (QEMU's igb, servers)
  ['pci:v00008086d000015F3sv00001043sd000087D2bc02sc00i00', 'igc'], // I225-V 2.5G onboard
  ['pci:v000010ECd00008168sv00001043sd00008677bc02sc00i00', 'r8169'], // RTL8111 onboard
  ['pci:v00008086d000010FBsv00008086sd0000000Cbc02sc00i00', 'ixgbe'], // 82599 10G
  ['pci:v000014E4d00001687sv0000103Csd0000225Abc02sc00i00', 'tg3'], // BCM5762 (office PCs)
];

function modprobeResolve(kernelRelease: string, alias: string, dir?: string): string[] {
  try {
    const base = dir ? ['-d', dir] : [];
    return execFileSync('modprobe', [...base, '-S', kernelRelease, '-R', alias], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).split('\n').filter(Boolean).map(moduleKey);
  } catch {
    return [];
  }
}

/** Every module file path in the image's archives. */
function archivePaths(r: MkinitramfsResult): Set<string> {
  const names = readCpio(r.cpio).map((e) => e.name);
  if (r.modulesCpio.length > 0) names.push(...readCpio(r.modulesCpio).map((e) => e.name));
  return new Set(names.map((n) => n.replace(/^\/+/, '')));
}

function checkNetworkSet(r: MkinitramfsResult, modulesDir: string): void {
  const index = loadModuleIndex(modulesDir);
  const wanted = moduleClosure(index, [...UNIVERSAL_NETWORK, 'nbd'].filter((m) => index.files.has(m)));
  // the kernel's closure of the network set: the drivers and what they depend on (libphy,
  // mdio, dca, failover, the realtek PHY r8169 asks for), each in the manifest and in an archive
  expect(wanted.size).toBeGreaterThan(UNIVERSAL_NETWORK.length + 1);
  const paths = archivePaths(r);
  for (const m of wanted) {
    const entry = r.manifest.modules[m];
    expect(entry, m).toBeDefined();
    expect(paths.has(entry!.path.slice(1)), entry!.path).toBe(true);
  }
  for (const m of [...UNIVERSAL_NETWORK, 'nbd']) expect(r.manifest.modules[m] ?? r.manifest.builtin.includes(m), m).toBeTruthy();
  // each driver's load order comes from the kernel's own modules.dep
  expect(r.manifest.modules.virtio_net!.deps).toEqual(expect.arrayContaining(['failover', 'net_failover']));
  expect(r.manifest.modules.r8169!.softPre).toContain('realtek');
}

describe(`network drivers and nbd in the universal image (kernel ${release}, plain .ko)`, () => {
  it('every driver of the network set, its dependencies and nbd are in the image', () => {
    const r = universalBuild();
    checkNetworkSet(r, `/lib/modules/${release}`);
  });

  it('network cards resolve to the same included modules as modprobe --resolve-alias', () => {
    const { manifest } = universalBuild();
    const included = new Set(Object.keys(manifest.modules));
    for (const [alias, driver] of NICS) {
      const expected = [...new Set(modprobeResolve(release, alias).filter((m) => included.has(m)))].sort();
      expect(expected, `${alias}: modprobe`).toContain(driver);
      expect(matchModalias(manifest, alias), alias).toEqual(expected);
    }
    expect(matchModalias(manifest, 'virtio:d00000001v00001AF4')).toEqual(['virtio_net']);
    // nbd has no alias: the init loads it by name when it attaches an export
    expect(matchModalias(manifest, 'nbd')).toEqual(['nbd']);
  });
});

describe.skipIf(!kernel612)('network drivers and nbd in the universal image on 6.12 (.ko.xz kept as shipped)', () => {
  it('every driver, its dependencies and nbd are in the appended segment; a virtio-net card resolves to virtio_net', () => {
    const r = buildInitramfs({ kernel: kernel612!, initBinary: initBinary(), compress: 'none' });
    const modulesDir = r.manifest.build.modulesDir;
    checkNetworkSet(r, modulesDir);
    expect(r.manifest.modules.virtio_net!.path).toMatch(/virtio_net\.ko\.xz$/);
    const kernelRelease = r.manifest.kernelRelease;
    // modprobe reads the unpacked package's tree (DIR/lib/modules/RELEASE) with -d DIR
    const root = modulesDir.replace(/\/lib\/modules\/[^/]+\/?$/, '');
    const included = new Set(Object.keys(r.manifest.modules));
    for (const [alias, driver] of NICS) {
      const expected = [...new Set(modprobeResolve(kernelRelease, alias, root).filter((m) => included.has(m)))].sort();
      expect(expected, `${alias}: modprobe`).toContain(driver);
      expect(matchModalias(r.manifest, alias), alias).toEqual(expected);
    }
  });
});
