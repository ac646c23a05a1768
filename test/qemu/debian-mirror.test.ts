import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { machineDebianMirror } from '../../qemu/debian-mirror.ts';

function etcWith(files: Record<string, string>): string {
  const etc = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-apt-'));
  fs.mkdirSync(path.join(etc, 'sources.list.d'));
  for (const [name, text] of Object.entries(files)) fs.writeFileSync(path.join(etc, name), text);
  return etc;
}

describe('the Debian mirror for debootstrap comes from the machine\'s own apt sources', () => {
  it('deb822 .sources: the first URI that is not the security archive', () => {
    const etc = etcWith({ 'sources.list.d/debian.sources': 'Types: deb\nURIs: http://security.example/debian-security\n\nTypes: deb\n# a comment\nURIs: http://mirror.example/debian http://other.example/debian\nSuites: bookworm\n' });
    expect(machineDebianMirror(etc)).toBe('http://mirror.example/debian');
  });

  it('one-line sources.list, with options in brackets; no sources at all is an error naming both places', () => {
    const etc = etcWith({ 'sources.list': '# deb http://commented.example/debian bookworm main\ndeb [arch=amd64] http://mirror.example/debian bookworm main\n' });
    expect(machineDebianMirror(etc)).toBe('http://mirror.example/debian');
    expect(() => machineDebianMirror(etcWith({}))).toThrow(/no Debian mirror found in .*sources\.list\.d\/\*\.sources or .*sources\.list/);
  });
});
