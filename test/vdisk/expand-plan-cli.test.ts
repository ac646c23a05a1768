/**
 * `vdboot plan` for a dynamic image booted read-write: the init expands it in place before
 * mapping, so the dry run shows that step (with the growth) instead of a failure.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { command as planCommand } from '../../src/cli/plan.ts';
import { makeNtfs, makePartitionedDisk } from '../../qemu/disks.ts';
import { tmpDir } from './helpers.ts';

let dir: string;
let disk: string;

beforeAll(() => {
  dir = tmpDir();
  const vhd = path.join(dir, 'dynamic.vhd');
  const r = spawnSync('qemu-img', ['create', '-q', '-f', 'vpc', '-o', 'subformat=dynamic', vhd, '16M'], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`qemu-img create failed: ${r.stderr}`);
  const ntfs = path.join(dir, 'host.ntfs');
  makeNtfs(ntfs, { sizeMiB: 48, label: 'Windows', files: { '/VMs/dynamic.vhd': { hostFile: vhd } } });
  disk = path.join(dir, 'disk.img');
  makePartitionedDisk(disk, { table: 'gpt', partitions: [{ image: ntfs, name: 'Windows' }] });
}, 60_000);

afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

async function plan(cmdline: string): Promise<{ code: number; out: string; err: string }> {
  let out = '';
  let err = '';
  const code = await planCommand.run(['--cmdline', cmdline, '--disk', disk], { stdout: (t: string) => { out += t; }, stderr: (t: string) => { err += t; } } as never);
  return { code, out, err };
}

describe('vdboot plan: a dynamic image booted read-write', () => {
  it('shows the expansion in place the init does first, with the growth; not a failure', async () => {
    const r = await plan('root=vdisk:LABEL=Windows:/VMs/dynamic.vhd rw');
    expect(r.err).toBe('');
    expect(r.code).toBe(0);
    expect(r.out).toMatch(/at boot, before mapping: \/VMs\/dynamic\.vhd cannot be mapped read-write: .* vdboot first expands it in place \(9 blocks of 2\.0 MiB allocated and zero-filled; the file grows from .* then plans again and maps it directly/);
    // (qemu-img rounds 16M up to whole CHS cylinders: 16781312 bytes, nine 2 MiB blocks)
  });

  it('with rd.vdisk.expand=0 the dry run fails as the boot would, naming the remedies', async () => {
    const r = await plan('root=vdisk:LABEL=Windows:/VMs/dynamic.vhd rw rd.vdisk.expand=0');
    expect(r.code).toBe(1);
    expect(r.err).toMatch(/the boot would fail here:[\s\S]*rd\.vdisk\.expand=0 forbids expanding it in place[\s\S]*rd\.vdisk\.mode=snapshot/);
  });
});
