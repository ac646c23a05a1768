/** `vdboot attach | detach | list` run the static binary as vdiskload (build/init, started as "init vdiskload …"). */
import { spawnSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';

function vdboot(args: string[]) {
  return spawnSync(process.execPath, ['bin/vdboot.mjs', ...args], { encoding: 'utf8' });
}

describe('vdboot attach, detach, list', () => {
  it('list --json: what vdiskload -l --json prints (this machine has no vdboot devices: an empty list)', () => {
    const r = vdboot(['list', '--json']);
    expect(r.status, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toEqual([]);
  });

  it('attach with a bad --map: vdiskload\'s usage error, exit 2, nothing done', () => {
    const r = vdboot(['attach', '--map', 'fast', 'x.vhdx']);
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/^vdiskload: --map fast: choose auto, direct, loop or nbd\nusage: vdiskload /);
  });

  it('detach of a name nothing has: one line saying so (after the root check, which passes only as root)', () => {
    const r = vdboot(['detach', 'no-such-disk']);
    expect(r.status).toBe(1);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/^vdiskload: (nothing is attached as no-such-disk|device-mapper is not available .*modprobe dm_mod|device-mapper and loop devices need root)/);
  });
});
