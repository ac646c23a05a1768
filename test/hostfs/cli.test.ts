import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { main } from '../../src/cli/main.ts';
import { pseudoRandom, run, tmpDir } from './helpers.ts';
import { mkntfs, ntfscat, ntfscp } from './ntfs-oracle.ts';

let dir: string;
beforeAll(() => { dir = tmpDir(); });
afterAll(() => { fs.rmSync(dir, { recursive: true, force: true }); });

async function vdboot(args: string[]): Promise<{ code: number; out: string; bytes: Buffer; err: string }> {
  let out = '';
  let err = '';
  const chunks: Buffer[] = [];
  const code = await main(args, {
    stdout: (t) => { out += t; },
    stderr: (t) => { err += t; },
    stdoutBytes: async (b) => { chunks.push(Buffer.from(b)); },
  });
  return { code, out, err, bytes: Buffer.concat(chunks) };
}

it('vdboot hostfs: lists an NTFS partition inside a GPT disk, shows a file\'s extents, and cats it like ntfscat', async () => {
  const part = path.join(dir, 'part.img');
  mkntfs(part, 24, 4096, 'Daten');
  ntfscp(part, { 'My Linux.vhdx': pseudoRandom(300_000, 3) }, dir);
  // a GPT disk with the partition at 1 MiB
  const disk = path.join(dir, 'disk.img');
  fs.writeFileSync(disk, Buffer.alloc(0));
  fs.truncateSync(disk, 32 << 20);
  run('sfdisk', ['-q', disk], { input: 'label: gpt\nstart=2048, size=49152, type=EBD0A0A2-B9E5-4433-87C0-68B9B6B7C0EB\n' });
  run('dd', [`if=${part}`, `of=${disk}`, 'bs=1M', 'seek=1', 'conv=notrunc', 'status=none']);

  const ls = await vdboot(['hostfs', disk, '--partition', '1', '/']);
  expect(ls.code).toBe(0);
  expect(ls.out).toContain('ntfs "Daten", 4096-byte clusters; clean');
  expect(ls.out).toMatch(/file\s+300000 {2}My Linux\.vhdx/);

  const stat = await vdboot(['hostfs', disk, '--partition', '1', '/my linux.vhdx']);
  expect(stat.out).toContain('/My Linux.vhdx: 300000 bytes');
  expect(stat.out).toMatch(/file 0\.\.299999 {2}data {2}at partition byte \d+/);

  const cat = await vdboot(['hostfs', disk, '--partition', '1', '--cat', '/My Linux.vhdx']);
  expect(cat.bytes.equals(ntfscat(part, '/My Linux.vhdx'))).toBe(true);

  await expect(vdboot(['hostfs', disk, '/'])).rejects.toThrow(/add --partition N/);
});
