import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { BTRFS_SUPER_OFFSET, BTRFS_SUPER_SIZE, parseBtrfsSuperblock, readBtrfsSuperblock } from '../../src/formats/btrfs.ts';
import { bytesReader, FormatError } from '../../src/formats/block-reader.ts';

const can = spawnSync('mkfs.btrfs', ['--version'], { stdio: 'ignore' }).status === 0;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-btrfs-'));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

/** What `btrfs inspect-internal dump-super` says about a member. */
function dumpSuper(file: string): Record<string, string> {
  const t = execFileSync('btrfs', ['inspect-internal', 'dump-super', file], { encoding: 'utf8' });
  const out: Record<string, string> = {};
  for (const m of t.matchAll(/^(\S+)\t+(.*)$/gm)) out[m[1]!] ??= m[2]!.trim();
  return out;
}

function superOf(file: string): Uint8Array {
  const fd = fs.openSync(file, 'r');
  try {
    const b = Buffer.alloc(BTRFS_SUPER_SIZE);
    fs.readSync(fd, b, 0, b.length, BTRFS_SUPER_OFFSET);
    return new Uint8Array(b);
  } finally {
    fs.closeSync(fd);
  }
}

describe.skipIf(!can)('btrfs superblock', () => {
  const files = ['m1', 'm2', 'm3'].map((n) => path.join(dir, n));
  for (const f of files) {
    fs.writeFileSync(f, '');
    fs.truncateSync(f, 120 << 20);
  }
  if (can) execFileSync('mkfs.btrfs', ['-q', '-f', '-L', 'Fedora data', '-m', 'raid1', '-d', 'single', ...files], { stdio: 'ignore' });

  it('each member of a three-device btrfs: fsid, devid, device UUID, num_devices and label as dump-super says', () => {
    const devids = new Set<number>();
    for (const f of files) {
      const d = dumpSuper(f);
      const head = new Uint8Array(BTRFS_SUPER_OFFSET + BTRFS_SUPER_SIZE);
      head.set(superOf(f), BTRFS_SUPER_OFFSET);
      const sb = readBtrfsSuperblock(bytesReader(f, head));
      expect(sb).toMatchObject({ fsid: d.fsid, numDevices: Number(d.num_devices), label: d.label, generation: Number(d.generation), csumType: 'crc32c', checksumOk: true });
      expect(sb.devid).toBe(Number(/devid\s+(\d+)/.exec(execFileSync('btrfs', ['inspect-internal', 'dump-super', f], { encoding: 'utf8' }))![1]));
      expect(sb.deviceUuid).toBe(execFileSync('blkid', ['-p', '-s', 'UUID_SUB', '-o', 'value', f], { encoding: 'utf8' }).trim());
      devids.add(sb.devid);
    }
    expect([...devids].sort()).toEqual([1, 2, 3]);
  });

  it('a flipped byte fails the crc32c; a wrong magic, a zero num_devices and a short buffer are refused', () => {
    const sb = superOf(files[0]!);
    const bad = sb.slice();
    bad[0x200] ^= 1;
    expect(parseBtrfsSuperblock(bad).checksumOk).toBe(false);
    const noMagic = sb.slice();
    noMagic[0x40] = 0;
    expect(() => parseBtrfsSuperblock(noMagic)).toThrow(/no _BHRfS_M magic/);
    const zero = sb.slice();
    zero.fill(0, 0x88, 0x90);
    expect(() => parseBtrfsSuperblock(zero)).toThrow(/num_devices 0 is out of range/);
    expect(() => parseBtrfsSuperblock(sb.subarray(0, 100))).toThrow(FormatError);
    expect(() => readBtrfsSuperblock(bytesReader('tiny', new Uint8Array(4096)))).toThrow(/too small for a btrfs superblock/);
  });
});
