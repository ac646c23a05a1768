import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { main, type CliIO } from '../../src/cli/main.ts';
import { keyFromFile } from '../../src/boot/bitlocker.ts';
import { isFormatError } from '../../src/formats/block-reader.ts';
import { type BitLockerProtectorKind, bitLockerKeyNeed, describeBitLocker, FVE_METADATA_AREA, readBitLocker } from '../../src/formats/bitlocker.ts';
import { crc32 } from '../../src/formats/crc.ts';
import { blkidTags, probeFilesystem } from '../../src/formats/probe.ts';
import { openFileReader } from '../../src/sys/node-reader.ts';
import { bitlkDump, hasCryptsetup, readImagesConf, unpackBitLockerImages } from '../kit/bitlocker.ts';
import { cleanupTmpDirs, makeTmpDir, patchFile } from '../kit/oracle.ts';

let dir: string;
let images: string;
beforeAll(() => {
  dir = makeTmpDir();
  images = unpackBitLockerImages(dir);
});
afterAll(cleanupTmpDirs);

function read(file: string) {
  const r = openFileReader(file);
  try { return readBitLocker(r); } finally { r.close(); }
}

/** cryptsetup's words for each protection (lib/bitlk/bitlk.c get_vmk_protection_string). */
const CRYPTSETUP_PROTECTION: Record<string, BitLockerProtectorKind> = {
  'VMK protected with passphrase': 'password',
  'VMK protected with recovery passphrase': 'recovery-password',
  'VMK protected with startup key': 'startup-key',
  'VMK protected with clear key': 'clear-key',
  'VMK protected with smart card': 'smart-card',
  'VMK protected with TPM': 'tpm',
  'VMK protected with TPM and PIN': 'tpm-and-pin',
};
const CONF_VMK: Record<string, BitLockerProtectorKind> = {
  PW_VMK_GUID: 'password', RP_VMK_GUID: 'recovery-password', RP2_VMK_GUID: 'recovery-password',
  SK_VMK_GUID: 'startup-key', SC_VMK_GUID: 'smart-card', CLEARKEY_VMK_GUID: 'clear-key',
};

/** `blkid -p -o export` as a record, without DEVNAME (the oracle for the probe). */
function blkid(file: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of execFileSync('blkid', ['-p', '-o', 'export', file], { encoding: 'utf8' }).split('\n')) {
    const i = line.indexOf('=');
    if (i > 0 && !line.startsWith('DEVNAME=')) out[line.slice(0, i)] = line.slice(i + 1);
  }
  return out;
}

describe('BitLocker metadata of volumes made by Windows', () => {
  it('every image: GUID, description, cipher, sizes and protectors as cryptsetup bitlkDump and images.conf say', () => {
    const conf = readImagesConf(images);
    const names = fs.readdirSync(images).filter((f) => f.endsWith('.img')).sort();
    expect(names.length).toBe(conf.size);
    for (const file of names) {
      const name = file.replace(/\.img$/, '');
      const c = conf.get(name)!;
      expect(c, name).toBeDefined();
      const vol = read(path.join(images, file));
      // images.conf: the volume GUID, the cipher and every protector's VMK GUID with its kind.
      expect(vol.guid, name).toBe(c.GUID);
      expect(vol.encryption.cipher, name).toBe(c.CIPHER);
      for (const [key, kind] of Object.entries(CONF_VMK)) {
        if (!c[key]) continue;
        expect(vol.protectors.find((p) => p.guid === c[key]), `${name} ${key}`).toMatchObject({ kind });
      }
      expect(vol.variant, name).toBe(name.includes('togo') ? 'to-go' : 'bitlocker');
      const tags = blkidTags(probeFilesystem(openFileReader(path.join(images, file)))!);
      expect(tags, name).toEqual(blkid(path.join(images, file)));
      // The crc image's first two metadata copies fail their CRC-32: cryptsetup 2.6 reads the
      // first one anyway (its description is garbled); the third copy is the volume
      // bitlk-aes-xts-128 is, so that image's dump is the oracle.
      const dump = bitlkDump(path.join(images, name === 'bitlk-aes-xts-128-crc' ? 'bitlk-aes-xts-128.img' : file));
      if (!dump) continue;
      expect(vol.variant === 'to-go', name).toBe(dump.toGo);
      expect(vol.version, name).toBe(dump.version);
      expect(vol.guid, name).toBe(dump.guid);
      expect(vol.sectorSize, name).toBe(dump.sectorSize);
      expect(vol.volumeSize, name).toBe(dump.volumeSize);
      expect(vol.description, name).toBe(dump.description);
      expect(vol.encryption.cipher, name).toBe(dump.cipher);
      expect(vol.encryption.keyBits, name).toBe(dump.keyBits);
      expect(vol.copies.map((x) => x.offset), name).toEqual(dump.metadataOffsets);
      expect(vol.volumeHeader, name).toEqual(dump.volumeHeader);
      expect(vol.protectors.map((p) => ({ guid: p.guid, kind: p.kind, ...(p.name !== undefined ? { name: p.name } : {}) })), name)
        .toEqual(dump.vmks.map((v) => ({ guid: v.guid, kind: CRYPTSETUP_PROTECTION[v.protection] ?? v.protection, ...(v.name !== undefined ? { name: v.name } : {}) })));
      if (name === 'bitlk-aes-xts-128-crc') {
        expect(vol.used).toBe(2);
        expect(vol.copies[0]!.damage).toMatch(/CRC-32 mismatch/);
        expect(vol.copies[1]!.damage).toMatch(/CRC-32 mismatch/);
        expect(describeBitLocker(vol).join('\n')).toMatch(/metadata copy 1 at 35213312 is damaged \(CRC-32 mismatch.*copy 3 used instead/);
      } else {
        expect(vol.used, name).toBe(0);
        expect(vol.copies.every((x) => x.damage === undefined), name).toBe(true);
      }
    }
  });

  it('the key a boot asks for: recovery password / password / startup key, nothing for a clear key', () => {
    expect(bitLockerKeyNeed(read(path.join(images, 'bitlk-aes-xts-128.img')), 'sda2')).toEqual({ kind: 'secret', accepts: ['recovery-password', 'password'] });
    expect(bitLockerKeyNeed(read(path.join(images, 'bitlk-aes-xts-128-startup-key.img')), 'sda2')).toEqual({ kind: 'secret', accepts: ['recovery-password', 'password', 'startup-key'] });
    expect(bitLockerKeyNeed(read(path.join(images, 'bitlk-aes-xts-128-smart-card.img')), 'sda2')).toEqual({ kind: 'secret', accepts: ['recovery-password'] });
    expect(bitLockerKeyNeed(read(path.join(images, 'bitlk-aes-xts-128-clearkey-only.img')), 'sda2')).toEqual({ kind: 'clear-key' });
  });

  it.runIf(hasCryptsetup())('cryptsetup accepts each image\'s password and recovery password, and refuses a wrong one', () => {
    // --test-passphrase checks the key without device-mapper. Two images, one CBC, one XTS
    // with a startup key (.BEK given as the key file): each key derivation costs about a second.
    const conf = readImagesConf(images);
    const test = (img: string, key: string | Buffer, keyFile?: string) => {
      try {
        // As the boot runs it: the key on stdin as a key file (no newline), or the .BEK file.
        const args = ['open', '--test-passphrase', '--type', 'bitlk', '--key-file', keyFile ?? '-', path.join(images, `${img}.img`)];
        execFileSync('cryptsetup', args, { input: key, stdio: ['pipe', 'pipe', 'pipe'] });
        return 'ok';
      } catch (e) {
        return String((e as { stderr?: Buffer }).stderr);
      }
    };
    expect(test('bitlk-aes-cbc-128', conf.get('bitlk-aes-cbc-128')!.PW!)).toBe('ok');
    expect(test('bitlk-aes-cbc-128', conf.get('bitlk-aes-cbc-128')!.RP!)).toBe('ok');
    const sk = conf.get('bitlk-aes-xts-128-startup-key')!;
    expect(test('bitlk-aes-xts-128-startup-key', sk.RP!)).toBe('ok');
    // The startup key's file is named after its VMK's GUID, as Windows saves it.
    const vol = read(path.join(images, 'bitlk-aes-xts-128-startup-key.img'));
    const bek = `${vol.protectors.find((p) => p.kind === 'startup-key')!.guid.toUpperCase()}.BEK`;
    expect(test('bitlk-aes-xts-128-startup-key', '', path.join(images, bek))).toBe('ok');
    expect(test('bitlk-aes-cbc-128', 'not-the-password')).toMatch(/No key available with this passphrase/);
    // The .BEK bytes on stdin open it too (the boot reads the file with its own FAT/NTFS reader).
    expect(test('bitlk-aes-xts-128-startup-key', fs.readFileSync(path.join(images, bek)))).toBe('ok');
    // An encrypt-on-write volume: the reader says so; cryptsetup refuses whatever the key (the boot passes its message on).
    expect(describeBitLocker(read(path.join(images, 'bitlk-aes-xts-128-eow.img'))).join('\n')).toMatch(/encrypt-on-write/);
    expect(test('bitlk-aes-xts-128-eow', conf.get('bitlk-aes-xts-128-eow')!.PW!)).toMatch(/cannot be activated/);
  });
});

describe('BitLocker metadata: damage and bounds', () => {
  const base = () => path.join(images, 'bitlk-aes-xts-128.img');
  function copyOf(src: string): string {
    const out = path.join(dir, `damaged-${Math.random().toString(36).slice(2)}.img`);
    execFileSync('cp', ['--sparse=always', src, out]);
    return out;
  }
  /** Applies `edit` to the metadata block at `offset` and stores a CRC-32 that matches again. */
  function editBlock(file: string, offset: number, edit: (area: Uint8Array, dv: DataView) => void): void {
    const fd = fs.openSync(file, 'r+');
    const area = new Uint8Array(FVE_METADATA_AREA);
    fs.readSync(fd, area, 0, area.length, offset);
    const dv = new DataView(area.buffer);
    edit(area, dv);
    const blockSize = dv.getUint16(8, true) * 16;
    dv.setUint32(blockSize + 4, crc32(area.subarray(0, blockSize)), true);
    fs.writeSync(fd, area, 0, area.length, offset);
    fs.closeSync(fd);
  }
  const offsets = () => read(base()).copies.map((c) => c.offset);

  it('a copy failing its CRC-32: the next copy is used and the damage named', () => {
    const f = copyOf(base());
    patchFile(f, offsets()[0]! + 200, [0x55]);
    const vol = read(f);
    expect(vol.used).toBe(1);
    expect(vol.copies[0]!.damage).toMatch(/^CRC-32 mismatch \(stored [0-9a-f]{8}, computed [0-9a-f]{8}\)$/);
    expect(vol.guid).toBe(read(base()).guid);
  });

  it('all three copies damaged: refused, each copy and its reason named', () => {
    const f = copyOf(base());
    const [a, b, c] = offsets() as [number, number, number];
    patchFile(f, a, [0]); // signature
    editBlock(f, b, (area, dv) => { dv.setUint16(112, 0xfff0, true); }); // first entry's size past the end
    editBlock(f, c, (area, dv) => { dv.setUint32(64, 0x20000, true); dv.setUint32(76, 0x20000, true); }); // metadata size
    let err: unknown;
    try { read(f); } catch (e) { err = e; }
    expect(isFormatError(err)).toBe(true);
    const msg = (err as Error).message;
    expect(msg).toContain(`copy 1 at ${a}: no "-FVE-FS-" signature`);
    expect(msg).toContain(`copy 2 at ${b}: entry at metadata offset 48 has size 65520, past the metadata's end`);
    expect(msg).toContain(`copy 3 at ${c}: metadata size 131072 does not fit the block size 880`);
    expect(msg).toMatch(/manage-bde -status/);
  });

  it('metadata offsets outside the volume: refused without reading past the end', () => {
    const f = copyOf(base());
    fs.truncateSync(f, 40 * 1024 * 1024); // the second and third copies are past 40 MiB
    patchFile(f, offsets()[0]! + 200, [0x55]);
    expect(() => read(f)).toThrow(/copy 2 at 46256128: offset 46256128 is not a sector inside the 41943040-byte volume/);
    const g = copyOf(base());
    patchFile(g, 176, [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
    expect(read(g).used).toBe(1);
    expect(read(g).copies[0]!.damage).toMatch(/offset -1 is not a sector/);
  });

  it('a TPM-only volume is refused with the manage-bde advice; Vista and non-BitLocker are named', () => {
    const f = copyOf(base());
    for (const off of offsets()) {
      editBlock(f, off, (area, dv) => {
        // Every VMK entry (type 2, value type 8) becomes TPM-protected (protection at data+26).
        for (let p = 112; p < 64 + dv.getUint32(64, true);) {
          const size = dv.getUint16(p, true);
          if (size === 0) break;
          if (dv.getUint16(p + 2, true) === 2 && dv.getUint16(p + 4, true) === 8) dv.setUint16(p + 8 + 26, 0x0100, true);
          p += size;
        }
      });
    }
    const vol = read(f);
    expect(vol.protectors.map((p) => p.kind)).toEqual(['tpm', 'tpm']);
    const need = bitLockerKeyNeed(vol, '/dev/sda3');
    expect(need.kind).toBe('refused');
    expect(need.kind === 'refused' && need.message).toMatch(/^\/dev\/sda3 is BitLocker-encrypted with protectors vdboot cannot use \(TPM\).*manage-bde -protectors -add C: -RecoveryPassword/);

    const guid = copyOf(base());
    patchFile(guid, 160, new Uint8Array(16));
    expect(() => read(guid)).toThrow(/unknown GUID 00000000-0000-0000-0000-000000000000 at byte 160/);
    expect(blkidTags(probeFilesystem(openFileReader(guid))!)).toEqual(blkid(guid));
    const vista = copyOf(base());
    patchFile(vista, 0, [0xeb, 0x52, 0x90]);
    expect(() => read(vista)).toThrow(/Windows Vista: not supported/);
    expect(probeFilesystem(openFileReader(vista))).toEqual({ type: 'BitLocker', usage: 'crypto' });
    const plain = copyOf(base());
    patchFile(plain, 3, [...'NTFS    '].map((c) => c.charCodeAt(0)));
    expect(() => read(plain)).toThrow(/not a BitLocker volume/);
  });
});

describe('vdboot inspect and plan on a disk whose partition is BitLocker', () => {
  async function vdboot(args: string[]): Promise<{ code: number; out: string; err: string }> {
    let out = '';
    let err = '';
    const io: CliIO = { stdout: (t) => { out += t; }, stderr: (t) => { err += t; }, stdoutBytes: async () => {} };
    const code = await main(args, io);
    return { code, out, err };
  }
  /** A GPT disk: partition 1 (PARTLABEL Windows) holds the BitLocker volume `image`. */
  function diskWith(image: string): string {
    const disk = path.join(dir, `disk-${path.basename(image)}`);
    fs.writeFileSync(disk, '');
    fs.truncateSync(disk, 2048 * 512 + fs.statSync(image).size + 1024 * 1024);
    execFileSync('sfdisk', ['-q', disk], { input: `label: gpt\nstart=2048, size=${fs.statSync(image).size / 512}, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, name="Windows"\n` });
    execFileSync('dd', [`if=${image}`, `of=${disk}`, 'bs=1M', 'seek=1', 'conv=notrunc,sparse', 'status=none']);
    return disk;
  }

  it('inspect names the volume, its protectors and the key the boot asks for; plan stops before the image, saying what it would ask', async () => {
    const conf = readImagesConf(images).get('bitlk-aes-xts-128-startup-key')!;
    const disk = diskWith(path.join(images, 'bitlk-aes-xts-128-startup-key.img'));
    const ins = await vdboot(['inspect', disk]);
    expect(ins.code).toBe(0);
    expect(ins.out).toContain(`BitLocker volume ${conf.GUID} "DESKTOP-LG39GVP E: 15/09/2020"`);
    expect(ins.out).toContain(`protector ${conf.SK_VMK_GUID}: startup key (.BEK file)`);
    expect(ins.out).toContain(`protector ${conf.RP_VMK_GUID}: recovery password (48 digits)`);
    expect(ins.out).toMatch(/at boot: asks for the recovery password \(48 digits\) or password on the console \(echo off, 3 tries\), or takes the startup key file given by rd.vdisk.bitlocker.key/);
    const json = JSON.parse((await vdboot(['inspect', '--json', disk])).out) as { bitlocker: Record<string, { guid: string }> };
    expect(json.bitlocker['1']!.guid).toBe(conf.GUID);

    const plan = await vdboot(['plan', '--cmdline', 'root=vdisk:PARTLABEL=Windows:/VMs/linux.vhdx rd.vdisk.bitlocker.key=/4381F759-C4F8-4DE0-BB61-FC33A831BDA5.BEK:LABEL=KEYS', '--disk', disk]);
    expect(plan.code).toBe(0);
    expect(plan.out).toContain('/VMs/linux.vhdx is on /dev/sda1, a BitLocker volume');
    expect(plan.out).toContain('at boot: reads the key from /4381F759-C4F8-4DE0-BB61-FC33A831BDA5.BEK on LABEL=KEYS (rd.vdisk.bitlocker.key)');
    expect(plan.out).toContain(`cryptsetup unlocks it as /dev/mapper/bitlk-${conf.GUID}`);
    // Searching every partition does not unlock one: the message says how to name it.
    const search = await vdboot(['plan', '--cmdline', 'root=vdisk:/VMs/linux.vhdx', '--disk', disk]);
    expect(search.code).toBe(1);
    expect(search.err).toMatch(/BitLocker partitions \(\/dev\/sda1\) are unlocked and searched only when named: root=vdisk:PARTUUID=[0-9a-f-]{36}:\/VMs\/linux.vhdx/);
    // A malformed key option is a warning; the key is then asked for.
    expect((await vdboot(['plan', '--cmdline', 'root=vdisk:PARTLABEL=Windows:/VMs/linux.vhdx rd.vdisk.bitlocker.key=key.txt', '--disk', disk])).out)
      .toMatch(/warning: rd.vdisk.bitlocker.key=key.txt: the key file's path must start with \/.*asked on the console instead/);
  });

  it('plan refuses a TPM-only host with the manage-bde advice', async () => {
    const img = path.join(dir, 'tpm-only.img');
    execFileSync('cp', ['--sparse=always', path.join(images, 'bitlk-aes-xts-128.img'), img]);
    const vol = read(img);
    for (const c of vol.copies) {
      const fd = fs.openSync(img, 'r+');
      const area = new Uint8Array(FVE_METADATA_AREA);
      fs.readSync(fd, area, 0, area.length, c.offset);
      const dv = new DataView(area.buffer);
      for (let p = 112; p < 64 + dv.getUint32(64, true);) {
        const size = dv.getUint16(p, true);
        if (size === 0) break;
        if (dv.getUint16(p + 2, true) === 2 && dv.getUint16(p + 4, true) === 8) dv.setUint16(p + 8 + 26, 0x0100, true);
        p += size;
      }
      const blockSize = dv.getUint16(8, true) * 16;
      dv.setUint32(blockSize + 4, crc32(area.subarray(0, blockSize)), true);
      fs.writeSync(fd, area, 0, area.length, c.offset);
      fs.closeSync(fd);
    }
    const disk = diskWith(img);
    const plan = await vdboot(['plan', '--cmdline', 'root=vdisk:PARTLABEL=Windows:/VMs/linux.vhdx', '--disk', disk]);
    expect(plan.code).toBe(1);
    expect(plan.err).toMatch(/the boot would fail here:\n\/dev\/sda1 is BitLocker-encrypted with protectors vdboot cannot use \(TPM\).*manage-bde -protectors -add C: -RecoveryPassword/);
  });
});

describe('BitLocker key files (rd.vdisk.bitlocker.key)', () => {
  it('a .BEK file goes to cryptsetup as it is; a text file gives its first line, from UTF-8, UTF-8 with BOM or Notepad\'s UTF-16', () => {
    const bek = fs.readFileSync(path.join(images, '4381F759-C4F8-4DE0-BB61-FC33A831BDA5.BEK'));
    const k = keyFromFile(new Uint8Array(bek));
    expect(k.kind).toBe('startup-key');
    expect(Buffer.from(k.key).equals(bek)).toBe(true);
    const rp = '363770-230505-096371-652674-567006-579150-291038-408111';
    const want = { key: Uint8Array.from(Buffer.from(rp)), kind: 'text' };
    expect(keyFromFile(Buffer.from(`${rp}\r\n`))).toEqual(want);
    expect(keyFromFile(Buffer.from(`\n${rp}  \nsecond line\n`))).toEqual(want);
    expect(keyFromFile(Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), Buffer.from(rp)]))).toEqual(want);
    expect(keyFromFile(Buffer.concat([Buffer.from([0xff, 0xfe]), Buffer.from(`${rp}\r\n`, 'utf16le')]))).toEqual(want);
    expect(keyFromFile(Buffer.from('anaconda£\n')).key).toEqual(Uint8Array.from(Buffer.from('anaconda£')));
  });
});
