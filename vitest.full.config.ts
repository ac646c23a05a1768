import { defineConfig } from 'vitest/config';

// npm run test:full: the whole matrices (every rw path × host driver × kernel × sparse or
// whole copy), too long for npm test, which runs one representative boot of each.
export default defineConfig({
  test: {
    include: ['test/full/**/*.full.ts'],
    testTimeout: 900_000,
    hookTimeout: 600_000,
    maxWorkers: 2,
    minWorkers: 1,
  },
});
