import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { bytesReader, FormatError } from '../../src/formats/block-reader.ts';
import { describeLuks, parseLuksHeader, type LuksHeader } from '../../src/formats/luks.ts';

const can = spawnSync('cryptsetup', ['--version'], { stdio: 'ignore' }).status === 0;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdboot-luks-'));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));
const pass = path.join(dir, 'pass');
fs.writeFileSync(pass, 'correct horse');

function format(name: string, ...args: string[]): string {
  const file = path.join(dir, name);
  fs.writeFileSync(file, '');
  fs.truncateSync(file, 24 << 20);
  execFileSync('cryptsetup', ['luksFormat', '-q', '--key-file', pass, ...args, file]);
  return file;
}

/** What `cryptsetup luksDump` says, in the fields LuksHeader has. */
function luksDump(file: string): Omit<LuksHeader, 'notes' | 'headerUsed'> {
  const t = execFileSync('cryptsetup', ['luksDump', file], { encoding: 'utf8' });
  const field = (re: RegExp): string => re.exec(t)![1]!.trim();
  const version = Number(field(/^Version:\s*(\d+)/m)) as 1 | 2;
  if (version === 1) {
    const keyBits = Number(field(/^MK bits:\s*(\d+)/m));
    return {
      version, uuid: field(/^UUID:\s*(\S+)/m), cipher: `${field(/^Cipher name:\s*(\S+)/m)}-${field(/^Cipher mode:\s*(\S+)/m)}`,
      keyBits, dataOffset: Number(field(/^Payload offset:\s*(\d+)/m)) * 512, sectorSize: 512,
      keySlots: [...t.matchAll(/^Key Slot (\d): ENABLED\n\tIterations:\s*(\d+)/gm)].map((m) => ({ slot: Number(m[1]), kdf: 'pbkdf2', iterations: Number(m[2]), keyBits })),
    };
  }
  const slotsText = t.slice(t.indexOf('Keyslots:'), t.indexOf('Tokens:'));
  const keySlots = [...slotsText.matchAll(/^ {2}(\d+): luks2\n([\s\S]*?)(?=^ {2}\d+:|$(?![\s\S]))/gm)].map((m) => {
    const b = m[2]!;
    const s: LuksHeader['keySlots'][number] = { slot: Number(m[1]), kdf: /PBKDF:\s*(\S+)/.exec(b)![1]!, keyBits: Number(/Key:\s*(\d+) bits/.exec(b)![1]) };
    const it = /Iterations:\s*(\d+)/.exec(b) ?? /Time cost:\s*(\d+)/.exec(b);
    if (it) s.iterations = Number(it[1]);
    const mem = /Memory:\s*(\d+)/.exec(b);
    if (mem) s.memoryKiB = Number(mem[1]);
    return s;
  });
  const out: Omit<LuksHeader, 'notes' | 'headerUsed'> = {
    version, uuid: field(/^UUID:\s*(\S+)/m), cipher: field(/^\tcipher:\s*(\S+)/m), keyBits: keySlots[0]!.keyBits,
    dataOffset: Number(field(/^\toffset:\s*(\d+) \[bytes\]/m)), sectorSize: Number(field(/^\tsector:\s*(\d+) \[bytes\]/m)), keySlots,
  };
  const label = field(/^Label:\s*(.*)$/m);
  if (label !== '(no label)') out.label = label;
  return out;
}

function read(file: string, bytes = new Uint8Array(fs.readFileSync(file))): LuksHeader {
  return parseLuksHeader(bytesReader(file, bytes));
}

describe.skipIf(!can)('LUKS headers read by vdboot vs cryptsetup luksDump', () => {
  const cases: [string, string[]][] = [
    ['luks1-cbc-essiv', ['--type', 'luks1', '-c', 'aes-cbc-essiv:sha256', '-s', '256', '--pbkdf-force-iterations', '1000']],
    ['luks1-xts', ['--type', 'luks1', '--pbkdf-force-iterations', '1000']],
    ['luks2-pbkdf2', ['--type', 'luks2', '--pbkdf', 'pbkdf2', '--pbkdf-force-iterations', '1000', '--label', 'cryptroot', '--sector-size', '512']],
    ['luks2-argon2id', ['--type', 'luks2', '--pbkdf', 'argon2id', '--pbkdf-memory', '64', '--pbkdf-force-iterations', '4', '--pbkdf-parallel', '1']],
    ['luks2-aes256-4k', ['--type', 'luks2', '-c', 'aes-xts-plain64', '-s', '256', '--pbkdf', 'pbkdf2', '--pbkdf-force-iterations', '1000', '--sector-size', '4096', '--luks2-metadata-size', '64k', '--luks2-keyslots-size', '2m']],
  ];
  for (const [name, args] of cases) {
    it(`${name}: version, uuid, label, cipher, key size, data offset, sector size and key slots`, () => {
      const file = format(name, ...args);
      execFileSync('cryptsetup', ['luksAddKey', '-q', '--key-file', pass, '--key-slot', '3', '--pbkdf-force-iterations', '1000', ...(name.startsWith('luks2') ? ['--pbkdf', 'pbkdf2'] : []), file, pass]);
      const h = read(file);
      const { notes, headerUsed, ...rest } = h;
      expect(rest).toEqual(luksDump(file));
      expect(notes).toEqual([]);
      expect(h.keySlots.map((s) => s.slot)).toEqual([0, 3]);
      expect(describeLuks(h)).toContain(`LUKS${h.version} ${h.cipher}`);
      if (h.version === 2) expect(headerUsed).toBe('primary');
    });
  }

  it('LUKS2: a damaged primary header falls back to the secondary, and says so', () => {
    const file = format('luks2-damaged', '--type', 'luks2', '--pbkdf', 'pbkdf2', '--pbkdf-force-iterations', '1000');
    const bytes = new Uint8Array(fs.readFileSync(file));
    bytes[4096 + 20] ^= 1; // inside the primary's JSON
    const h = read(file, bytes);
    expect(h.headerUsed).toBe('secondary');
    expect(h.notes.join()).toMatch(/primary header at byte 0: fails its SHA-256 checksum/);
    expect(h.uuid).toBe(luksDump(file).uuid);
    fs.writeFileSync(file, bytes);
    expect(execFileSync('cryptsetup', ['luksDump', file], { encoding: 'utf8' })).toContain(h.uuid); // cryptsetup agrees the volume is readable
    const both = new Uint8Array(bytes);
    both[16384 + 4096 + 20] ^= 1;
    expect(() => read(file, both)).toThrow(/neither LUKS2 header is valid/);
  });

  it('bounds: a truncated device and a payload past the end are refused', () => {
    const file = format('luks1-short', '--type', 'luks1', '--pbkdf-force-iterations', '1000');
    const bytes = new Uint8Array(fs.readFileSync(file));
    expect(() => read(file, bytes.subarray(0, 1024 * 1024))).toThrow(/payload offset \d+ sectors lies outside the device/);
    const v = new DataView(bytes.buffer);
    v.setUint32(104, 0xffffffff, false);
    expect(() => read(file, bytes)).toThrow(FormatError);
    const f2 = format('luks2-short', '--type', 'luks2', '--pbkdf', 'pbkdf2', '--pbkdf-force-iterations', '1000');
    expect(() => read(f2, new Uint8Array(fs.readFileSync(f2)).subarray(0, 8 << 20))).toThrow(/data offset \d+ lies outside the device/);
    expect(() => read('zeros', new Uint8Array(8192))).toThrow(/no LUKS header/);
  });
});
