// The harness's own promises: a panic ends the VM, waits time out and kill, nothing outlives Node.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { expect, it } from 'vitest';
import { bootVm, probeAccel } from '../../qemu/harness.ts';

/** Whether any process of the VM's process group (qemu and its timeout(1) wrapper) is alive. */
function groupAlive(pid: number): boolean {
  try {
    process.kill(-pid, 0);
    return true;
  } catch {
    return false;
  }
}

it('a boot without a root disk panics, qemu exits by itself, and waitFor rejects at once naming the exit', async () => {
  const vm = await bootVm({ name: 'no-root' });
  try {
    const started = Date.now();
    await expect(vm.waitFor('VDBOOT-GUEST-OK', 90_000)).rejects.toThrow(/qemu exited \(code 0/);
    const exit = await vm.waitExit(10_000);
    expect(exit).toEqual({ code: 0, signal: null, killed: false, lifetimeExceeded: false });
    expect(Date.now() - started).toBeLessThan(90_000);
    expect(vm.transcript()).toMatch(/Kernel panic - not syncing: VFS: Unable to mount root fs/);
    const panic = vm.lines().find((l) => l.text.includes('Kernel panic'))!;
    expect(panic.kernelTime).toBe(Number(/^\[\s*([\d.]+)\]/.exec(panic.text)![1]));
    expect(panic.kernelTime).toBeGreaterThan(0);
    expect(vm.lines().filter((l) => l.kernelTime !== undefined).length).toBeGreaterThan(10);
    expect(fs.readFileSync(vm.logFile, 'utf8')).toMatch(/Kernel panic/);
    expect(groupAlive(vm.pid)).toBe(false);
  } finally {
    await vm.kill();
  }
});

it('waitFor times out with the log path, waitExit kills a VM that keeps running', async () => {
  // -S: the CPU never starts, so the console stays silent and qemu never exits by itself
  const vm = await bootVm({ name: 'stopped', extraArgs: ['-S'] });
  try {
    await expect(vm.waitFor('never printed', 300)).rejects.toThrow(new RegExp(`within 0.3 s[^]*${vm.logFile}`));
    expect(vm.exited).toBe(false);
    await expect(vm.waitExit(300)).rejects.toThrow(/still running after 0.3 s; killed it/);
    expect(vm.exited).toBe(true);
    expect(groupAlive(vm.pid)).toBe(false);
    expect(() => vm.send('x')).toThrow(/qemu has exited/);
  } finally {
    await vm.kill();
  }
});

it('a VM left running is killed when the Node process exits', () => {
  const harness = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../qemu/harness.ts');
  const script = `import { bootVm } from ${JSON.stringify(harness)};
const vm = await bootVm({ name: 'orphan', extraArgs: ['-S'], accel: 'tcg' });
console.log(vm.pid);
process.exit(0);`;
  const r = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { encoding: 'utf8' });
  expect(r.status).toBe(0);
  const pid = Number(r.stdout.trim());
  expect(pid).toBeGreaterThan(1);
  // killed processes may linger a moment until their new parent reaps them
  for (let i = 0; i < 50 && groupAlive(pid); i++) spawnSync('sleep', ['0.1']);
  expect(groupAlive(pid)).toBe(false);
});

it('the acceleration decision is made once per process', async () => {
  const first = await probeAccel();
  expect(['kvm', 'tcg']).toContain(first);
  expect(await probeAccel()).toBe(first);
});
