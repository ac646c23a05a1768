import { defineConfig } from 'vitest/config';

// npm run fuzz: every seeded fuzzer at FUZZ_CASES cases per target (10,000 by the script):
// image formats, multi-file image sets and disk definitions, root archives, MBR/GPT,
// NTFS/FAT/exFAT metadata. npm test runs the same files with a few hundred to 1,500.
export default defineConfig({
  test: {
    include: ['test/fuzz/**/*.test.ts', 'test/formats/fuzz.test.ts', 'test/formats/partitions.test.ts', 'test/hostfs/corrupt.test.ts'],
    testNamePattern: /fuzz|malformed|random damage/,
    testTimeout: 3_600_000,
    hookTimeout: 600_000,
    maxWorkers: 2,
    minWorkers: 1,
  },
});
