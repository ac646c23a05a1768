/** `vdboot inspect | map | cat` run in-process through the CLI dispatcher. */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { main, type CliIO } from '../../src/cli/main.ts';
import { validateMap } from '../../src/formats/extent-ops.ts';
import type { ExtentMap } from '../../src/formats/extent-map.ts';
import { cleanupTmpDirs, expectSameBytes, makeTmpDir, qemuImg, qemuIo, qemuRaw, run } from '../kit/oracle.ts';

afterAll(cleanupTmpDirs);

const MiB = 1024 * 1024;

async function vdboot(args: string[]): Promise<{ code: number; out: string; bytes: Buffer; err: string }> {
  let out = '';
  let err = '';
  const chunks: Buffer[] = [];
  const io: CliIO = {
    stdout: (t) => { out += t; },
    stderr: (t) => { err += t; },
    stdoutBytes: async (b) => { chunks.push(Buffer.from(b)); },
  };
  const code = await main(args, io);
  return { code, out, bytes: Buffer.concat(chunks), err };
}

describe('vdboot inspect, map, cat', () => {
  const dir = makeTmpDir();
  // a partitioned disk: MBR with two partitions, turned into a dynamic VHD with data in both
  const raw = path.join(dir, 'disk.raw');
  fs.writeFileSync(raw, Buffer.alloc(0));
  fs.truncateSync(raw, 24 * MiB);
  run('sfdisk', ['-q', raw], { input: 'label: dos\nstart=2048, size=8192, type=83\nstart=12288, size=20480, type=c\n' });
  const fat = path.join(dir, 'fat.img');
  run('mkfs.vfat', ['-C', '-n', 'VDBOOTTEST', fat, String(20480 / 2)]);
  run('dd', [`if=${fat}`, `of=${raw}`, 'bs=512', 'seek=12288', 'conv=notrunc', 'status=none']);
  const image = path.join(dir, 'disk.vhd');
  qemuImg('convert', '-q', '-f', 'raw', '-O', 'vpc', '-o', 'force_size=on', raw, image);
  qemuIo(image, 'vpc', ['write -P 0x61 1M 4M', 'write -P 0x62 14M 512k', 'write -P 0x63 20M 1M']);
  const table = JSON.parse(run('sfdisk', ['--json', raw]).toString()).partitiontable as { partitions: { start: number; size: number }[] };

  it('cat streams the whole virtual disk, equal to qemu-img convert', async () => {
    const r = await vdboot(['cat', image]);
    expect(r.code).toBe(0);
    expectSameBytes(r.bytes, qemuRaw(image), image);
  });

  it('cat --partition N streams one partition, at the offsets sfdisk reports', async () => {
    const whole = qemuRaw(image);
    for (const [i, p] of table.partitions.entries()) {
      const r = await vdboot(['cat', image, '--partition', String(i + 1)]);
      expectSameBytes(r.bytes, whole.subarray(p.start * 512, (p.start + p.size) * 512), `partition ${i + 1}`);
    }
  });

  it('cat --partition of a partition that does not exist says which ones do', async () => {
    await expect(vdboot(['cat', image, '--partition', '7'])).rejects.toThrow(/no partition 7.*partitions: 1, 2/);
  });

  it('map --json prints a valid ExtentMap; map --dm prints its device-mapper table', async () => {
    const m = JSON.parse((await vdboot(['map', image, '--json'])).out) as ExtentMap;
    validateMap(m, { fileSizes: [fs.statSync(image).size] });
    expect(m.size).toBe(24 * MiB);
    const dm = (await vdboot(['map', image, '--dm'])).out.trim().split('\n');
    expect(dm.length).toBe(m.extents.length);
    let sector = 0;
    for (const line of dm) {
      const [start, count, target] = line.split(' ');
      expect(Number(start)).toBe(sector);
      expect(['linear', 'zero']).toContain(target);
      sector += Number(count);
    }
    expect(sector).toBe((24 * MiB) / 512);
    const text = (await vdboot(['map', image])).out;
    expect(text).toMatch(/data +.*disk\.vhd @ \d+/);
  });

  it('inspect --json names format, size, partitions and why a read-write mapping is refused', async () => {
    const info = JSON.parse((await vdboot(['inspect', image, '--json'])).out);
    expect(info).toMatchObject({ format: 'vhd', subformat: 'dynamic', size: 24 * MiB });
    expect(info.chain).toHaveLength(1);
    expect(info.partitions.kind).toBe('mbr');
    expect(info.partitions.partitions.map((p: { start: number }) => p.start)).toEqual(table.partitions.map((p) => p.start * 512));
    expect(info.mapping.readOnly.ok).toBe(true);
    expect(info.mapping.readWrite.ok).toBe(false);
    expect(info.mapping.readWrite.reason).toMatch(/not allocated/);
    const text = (await vdboot(['inspect', image])).out;
    expect(text).toMatch(/format: +vhd \(dynamic\)/);
    expect(text).toMatch(/MBR/);
    // the filesystems of the partitions (the disk was formatted: partition 2 is FAT)
    expect(info.filesystems['2']).toMatchObject({ type: 'vfat', label: 'VDBOOTTEST' });
    expect(text).toMatch(/vfat LABEL="VDBOOTTEST"/);
  });

  it('inspect of an overlay: the chain is listed and a read-write mapping is refused (writes would reach the parent)', async () => {
    const overlay = path.join(dir, 'overlay.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'disk.vhd', '-F', 'vpc', overlay);
    qemuIo(overlay, 'qcow2', ['write -P 0x71 0 64k']);
    const info = JSON.parse((await vdboot(['inspect', overlay, '--json'])).out);
    expect(info.chain.map((l: { format: string }) => l.format)).toEqual(['qcow2', 'vhd']);
    expect(info.mapping.readWrite.ok).toBe(false);
    expect(info.mapping.readWrite.reason).toMatch(/parent image .*disk\.vhd/);
  });

  it('a missing image and a missing argument are errors for the user, not crashes', async () => {
    await expect(vdboot(['inspect', path.join(dir, 'nope.vhd')])).rejects.toMatchObject({ name: 'FormatError', message: expect.stringMatching(/nope\.vhd/) });
    await expect(vdboot(['map'])).rejects.toMatchObject({ name: 'UsageError' });
    await expect(vdboot(['cat', image, '--bogus'])).rejects.toMatchObject({ name: 'UsageError' });
  });
});
