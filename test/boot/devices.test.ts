/**
 * DeviceScanner (src/boot/devices.ts) against the fake kernel with a real GPT disk made by
 * sfdisk: a device whose /dev node cannot be opened yet (devtmpfs creates it a moment after
 * the /sys entry appears) is probed again at the next scan, not remembered without its
 * partition table — once, a boot waited 30 s for a PARTUUID that was there.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { ConsoleLog } from '../../src/boot/console.ts';
import { DeviceScanner } from '../../src/boot/devices.ts';
import { FakeKernel, type FakeMachine } from '../../src/sys/fake.ts';
import { SysError } from '../../src/sys/sys.ts';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-devices-'));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

const PARTUUID = '41e05667-f0fa-4c5a-ace8-43a520a6f9c8';

function gptDisk(): Uint8Array {
  const f = path.join(dir, 'disk.img');
  execFileSync('truncate', ['-s', '8M', f]);
  execFileSync('sfdisk', ['-q', f], { input: `label: gpt\nstart=2048, size=8192, type=linux, uuid=${PARTUUID}\n` });
  return new Uint8Array(fs.readFileSync(f));
}

/** The fake kernel, with `/dev/NAME` failing to open (ENOENT) the first `misses` times. */
function kernelWithLateNode(name: string, misses: number): { k: FakeKernel; opens: () => number } {
  const machine: FakeMachine = {
    cmdline: '',
    disks: [{ name: 'vda', bytes: gptDisk(), major: 254, minor: 0, partitions: [{ name: 'vda1', number: 1, start: 2048 * 512, size: 8192 * 512 }] }],
    initramfs: {},
  };
  const k = new FakeKernel(machine);
  for (const [fstype, at] of [['sysfs', '/sys'], ['devtmpfs', '/dev']] as const) {
    try { k.mkdir(at, 0o755); } catch { /* there already */ }
    k.mount(fstype, at, fstype, 0, '');
  }
  const open = k.open.bind(k);
  let tries = 0;
  k.open = (p: string, flags: number, mode?: number) => {
    if (p === `/dev/${name}`) {
      tries++;
      if (tries <= misses) throw new SysError('ENOENT', 2, `open ${p}`);
    }
    return open(p, flags, mode);
  };
  return { k, opens: () => tries };
}

describe('DeviceScanner', () => {
  it('a disk whose node is not there yet: its partitions get their PARTUUID at the next scan', () => {
    const { k } = kernelWithLateNode('vda', 3); // the table read, the disk's probe, the partition's table read
    const scanner = new DeviceScanner(k, new ConsoleLog(k));
    const first = scanner.scan();
    expect(first.find((d) => d.name === 'vda1')?.partuuid).toBeUndefined();
    const second = scanner.scan();
    expect(second.find((d) => d.name === 'vda')?.table).toBe('gpt');
    expect(second.find((d) => d.name === 'vda1')?.partuuid).toBe(PARTUUID);
  });

  it('a disk read once is not read again while its size stays the same', () => {
    const { k, opens } = kernelWithLateNode('vda', 0);
    const scanner = new DeviceScanner(k, new ConsoleLog(k));
    for (let i = 0; i < 3; i++) expect(scanner.scan().find((d) => d.name === 'vda1')?.partuuid).toBe(PARTUUID);
    // the table once, the whole disk's filesystem probe once
    expect(opens()).toBe(2);
  });
});
