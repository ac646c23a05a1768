import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 120_000,
    hookTimeout: 300_000,
    // Two cores: end-to-end QEMU boots and qemu-img oracles are CPU-bound.
    maxWorkers: 2,
    minWorkers: 1,
  },
});
