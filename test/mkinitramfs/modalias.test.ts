import { describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { buildAliasIndex, fnmatch, matchModalias, moduleKey } from '../../src/formats/manifest.ts';
import { installedRelease, universalBuild } from './helpers.ts';

const release = installedRelease();

function modprobeResolve(alias: string): string[] {
  try {
    return execFileSync('modprobe', ['-S', release, '-R', alias], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).split('\n').filter(Boolean).map(moduleKey);
  } catch {
    return []; // modprobe exits non-zero when nothing matches
  }
}

/** modalias files of this machine's devices. */
function sysModaliases(): string[] {
  const found: string[] = [];
  const walk = (dir: string, depth: number): void => {
    if (depth > 12) return;
    let names: fs.Dirent[];
    try {
      names = fs.readdirSync(dir, { withFileTypes: true });
    } catch {
      return;
    }
    for (const d of names) {
      const p = path.join(dir, d.name);
      if (d.name === 'modalias' && d.isFile()) {
        try {
          const v = fs.readFileSync(p, 'utf8').trim();
          if (v) found.push(v);
        } catch {
          /* unreadable attribute */
        }
      } else if (d.isDirectory() && !d.isSymbolicLink()) walk(p, depth + 1);
    }
  };
  walk('/sys/devices', 0);
  return [...new Set(found)];
}

/** A concrete string an alias pattern matches: wildcards filled in, alternately empty and not. */
function instantiate(pattern: string, n: number): string | undefined {
  if (/\[[!^]/.test(pattern)) return undefined;
  return pattern
    .replace(/\[(.)[^\]]*\]/g, '$1')
    .replace(/\?/g, '7')
    .replace(/\*/g, n % 2 ? '' : 'Z9');
}

/** Modalias strings of the devices the universal set is for, as QEMU and real machines report them. */
const KNOWN_DEVICES = [
  'virtio:d00000002v00001AF4', // virtio-blk
  'virtio:d00000008v00001AF4', // virtio-scsi
  'virtio:d00000003v00001AF4', // virtio-console
  'pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00', // virtio-blk PCI transport
  'pci:v00008086d00002922sv00001AF4sd00001100bc01sc06i01', // ICH9 AHCI (QEMU q35)
  'pci:v00008086d00007010sv00001AF4sd00001100bc01sc01i80', // PIIX3 IDE (QEMU pc)
  'pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02', // QEMU NVMe
  'pci:v00001B36d0000000Dsv00001AF4sd00001100bc0Csc03i30', // QEMU xHCI
  'pci:v00008086d000024CDsv00001AF4sd00001100bc0Csc03i20', // ICH4 EHCI
  'pci:v00008086d00002934sv00001AF4sd00001100bc0Csc03i00', // ICH9 UHCI
  'usb:v46F4p0001d0000dc00dsc00dp00ic08isc06ip50in00', // QEMU usb-storage (bulk-only)
  'usb:v46F4p0001d0000dc00dsc00dp00ic08isc06ip62in00', // usb-storage speaking UAS
  'usb:v0627p0001d0000dc00dsc00dp00ic03isc01ip01in00', // QEMU USB keyboard
  'hid:b0003g0001v00000627p00000001', // HID keyboard behind usbhid
  'scsi:t-0x00', // SCSI disk
  'scsi:t-0x05', // SCSI CD-ROM
  'mmc:block',
  'acpi:PNP0303:', // i8042 keyboard controller
  'fs-ext2',
  'fs-vfat',
  'ext4',
  'dm-mod',
  'char-major-10-236', // /dev/mapper/control
  'block-major-7-0', // loop
  'devname:fuse',
];

describe('matchModalias against modprobe --resolve-alias', () => {
  it('known storage, USB and keyboard devices resolve to the same included modules', () => {
    const { manifest } = universalBuild();
    const included = new Set(Object.keys(manifest.modules));
    let nonEmpty = 0;
    for (const s of KNOWN_DEVICES) {
      const expected = modprobeResolve(s).filter((m) => included.has(m)).sort();
      expect(matchModalias(manifest, s), s).toEqual([...new Set(expected)]);
      if (expected.length) nonEmpty++;
    }
    expect(nonEmpty).toBeGreaterThan(KNOWN_DEVICES.length / 2);
    expect(matchModalias(manifest, 'virtio:d00000002v00001AF4')).toContain('virtio_blk');
    expect(matchModalias(manifest, 'pci:v00008086d00002922sv00001AF4sd00001100bc01sc06i01')).toContain('ahci');
    expect(matchModalias(manifest, 'dm_mod')).toEqual(['dm_mod']);
  });

  it("this machine's /sys/devices modalias strings resolve to the same included modules", () => {
    const { manifest } = universalBuild();
    const included = new Set(Object.keys(manifest.modules));
    const strings = sysModaliases();
    expect(strings.length).toBeGreaterThan(0);
    for (const s of strings.slice(0, 300)) {
      const expected = [...new Set(modprobeResolve(s).filter((m) => included.has(m)))].sort();
      expect(matchModalias(manifest, s), s).toEqual(expected);
    }
  });

  it('strings made from a sample of real modules.alias patterns resolve to the same included modules', () => {
    const { manifest } = universalBuild();
    const included = new Set(Object.keys(manifest.modules));
    const lines = fs.readFileSync(`/lib/modules/${release}/modules.alias`, 'utf8').split('\n').filter((l) => l.startsWith('alias '));
    const ours = lines.filter((l) => included.has(moduleKey(l.split(' ')[2])));
    const others = lines.filter((l) => !included.has(moduleKey(l.split(' ')[2])));
    const pick = (list: string[], count: number) => list.filter((_, i) => i % Math.max(1, Math.floor(list.length / count)) === 0).slice(0, count);
    const sample = [...pick(ours, 150), ...pick(others, 60)];
    let hits = 0;
    sample.forEach((line, n) => {
      const s = instantiate(line.split(' ')[1], n);
      if (!s) return;
      const expected = [...new Set(modprobeResolve(s).filter((m) => included.has(m)))].sort();
      expect(matchModalias(manifest, s), `${s} (from ${line})`).toEqual(expected);
      if (expected.length) hits++;
    });
    expect(hits).toBeGreaterThan(100);
  });

  it('the precomputed alias index in the manifest (read back from JSON) matches exactly as one built at boot', () => {
    const { manifest } = universalBuild();
    expect(manifest.aliasIndex).toBeDefined();
    const fromJson = JSON.parse(JSON.stringify(manifest)) as typeof manifest;
    expect(fromJson.aliasIndex).toEqual(JSON.parse(JSON.stringify(buildAliasIndex(manifest.aliases))));
    const withoutIndex = { ...fromJson, aliasIndex: undefined };
    const strings = [...KNOWN_DEVICES, ...sysModaliases().slice(0, 100)];
    for (const s of strings) expect(matchModalias(fromJson, s), s).toEqual(matchModalias(withoutIndex, s));
    // every pattern is in exactly one bucket, under its own literal prefix
    const seen = Object.values(fromJson.aliasIndex!.byPrefix).flat().sort((a, b) => a - b);
    expect(seen).toEqual(manifest.aliases.map((_, i) => i));
  });

  it('carries the alias table only for included modules', () => {
    const { manifest } = universalBuild();
    expect(manifest.aliases.length).toBeGreaterThan(100);
    for (const [, mods] of manifest.aliases) for (const m of mods) expect(manifest.modules, m).toHaveProperty(m);
  });

  it('fnmatch handles classes, ranges, negation, ? and backtracking *', () => {
    expect(fnmatch('usb:v13FDp3940d0[0-2]*dc*', 'usb:v13FDp3940d0100dc00')).toBe(true);
    expect(fnmatch('usb:v13FDp3940d0[0-2]*dc*', 'usb:v13FDp3940d0300dc00')).toBe(false);
    expect(fnmatch('a[!b]c', 'axc')).toBe(true);
    expect(fnmatch('a[!b]c', 'abc')).toBe(false);
    expect(fnmatch('a?c', 'abc')).toBe(true);
    expect(fnmatch('a?c', 'ac')).toBe(false);
    expect(fnmatch('*bc*bc', 'xbcybcbc')).toBe(true);
    expect(fnmatch('*bc*bd', 'xbcybcbc')).toBe(false);
    expect(fnmatch('a\\*', 'a*')).toBe(true);
    expect(fnmatch('a\\*', 'ab')).toBe(false);
    expect(fnmatch('[]]x', ']x')).toBe(true);
  });
});
