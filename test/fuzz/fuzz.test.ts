/**
 * Seeded fuzzing with independent checkers (see engine.ts): multi-file image sets and root
 * archives. `npm test` runs a few hundred cases per target; `npm run fuzz` 10,000
 * (FUZZ_CASES). A failure names the target, seed and case, and the case's recipe.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cleanupTmpDirs, makeTmpDir } from '../kit/oracle.ts';
import { fuzzCases, runFuzz } from './engine.ts';
import { archiveCase, buildArchiveSeeds, type ArchiveSeed } from './archives.ts';
import { buildImageSetSeeds, imageSetCase, type ImageSetSeeds } from './image-set.ts';

const CASES = fuzzCases(300);

describe('fuzz with independent checkers', { timeout: 3_600_000 }, () => {
  let seeds: ImageSetSeeds;
  let archives: ArchiveSeed[];
  beforeAll(() => {
    seeds = buildImageSetSeeds(makeTmpDir());
    archives = buildArchiveSeeds(makeTmpDir());
  });
  afterAll(cleanupTmpDirs);

  it('image sets (VMDK extents and parents, qcow2 data and backing files, aliases): every accepted map is inside its files, off their metadata, without shared bytes', async () => {
    const o = await runFuzz('image-set', CASES, (r, label) => imageSetCase(seeds, r, label));
    expect(o.ok + o.refused).toBe(CASES);
    // both outcomes happen: the generator reaches accepted sets as well as refusals
    expect(o.ok).toBeGreaterThan(0);
    expect(o.refused).toBeGreaterThan(0);
  });

  it('root archives (tar, cpio; names, links, types mutated): nothing is created outside the root or through a symbolic link', async () => {
    const o = await runFuzz('archives', CASES, (r, label) => archiveCase(archives, r, label));
    expect(o.ok + o.refused).toBe(CASES);
    expect(o.ok).toBeGreaterThan(0);
    expect(o.refused).toBeGreaterThan(0);
  });
});
