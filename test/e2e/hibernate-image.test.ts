/**
 * End to end: resume= inside a dynamic VHDX on NTFS, with a real hibernation on the default
 * kernel (test/kit/hibernate.ts hibernateInImage; test:full runs it on 6.12 too): the tables
 * recorded in the swap's boot bits, the hibernated guest restored with its token, and the
 * same image moved on another NTFS refused, started afresh, its record cleared.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, it } from 'vitest';
import { defaultKernel, type Vm } from '../../qemu/harness.ts';
import { hibernateInImage } from '../kit/hibernate.ts';

const dir = mkdtempSync(join(tmpdir(), 'vdboot-e2e-hibernate-image-'));
const vms: Vm[] = [];
afterAll(async () => {
  for (const vm of vms) if (!vm.exited) await vm.kill();
  if (!process.env.VDBOOT_KEEP) rmSync(dir, { recursive: true, force: true });
});

describe('resume= inside a dynamic VHDX on NTFS, with a real hibernation', { timeout: 1_500_000 }, () => {
  it('boot 1 records the tables and hibernates; boot 2 resumes; the image moved on another NTFS is not resumed and its record is cleared', async () => {
    await hibernateInImage(defaultKernel(), dir, vms);
  });
});
