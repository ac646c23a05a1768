import { describe, expect, it } from 'vitest';
import { walkArgs } from '../../src/cli/args.ts';
import { parseKitArgs } from '../../src/cli/kit.ts';
import { parseMkinitramfsArgs } from '../../src/cli/mkinitramfs.ts';

describe('the argument walk the commands share', () => {
  it('takes values as "--flag VALUE" and "--flag=VALUE", and names the flag whose value is missing', () => {
    const seen: [string, string | undefined][] = [];
    walkArgs(['--a', 'one', '--b=two=2', '-q', '--c'], (flag, value) => {
      seen.push([flag, flag === '-q' ? undefined : flag === '--c' ? (() => { try { return value(); } catch (e) { return `error: ${(e as Error).message}`; } })() : value()]);
    }, (flag) => new Error(`${flag} needs a value`));
    expect(seen).toEqual([['--a', 'one'], ['--b', 'two=2'], ['-q', undefined], ['--c', 'error: --c needs a value']]);
  });

  it('each command keeps its own messages', () => {
    expect(() => parseKitArgs(['--image'])).toThrow('--image needs a value; see vdboot kit --help');
    expect(() => parseKitArgs(['--bogus'])).toThrow('unknown argument "--bogus"');
    expect(parseMkinitramfsArgs(['--kernel=6.1.0-56-amd64', '-o', 'out.img', '--with', 'zstd']).output).toBe('out.img');
    expect(() => parseMkinitramfsArgs(['-o'])).toThrow('-o needs a value; see vdboot mkinitramfs --help');
    expect(parseMkinitramfsArgs(['--hostonly', '--root', 'vdisk:LABEL=Windows:/VMs/a.vhdx']).options.hostonly).toEqual({ root: 'vdisk:LABEL=Windows:/VMs/a.vhdx' });
    expect(parseMkinitramfsArgs(['--hostonly']).options.hostonly).toEqual({});
    expect(() => parseMkinitramfsArgs(['--root', 'UUID=1'])).toThrow('--root SPEC goes with --hostonly');
  });
});
