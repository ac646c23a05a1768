/**
 * The BitLocker volumes Windows made (test/data/bitlocker/bitlk-images.tar.xz), unpacked for
 * a test, with what their images.conf and `cryptsetup bitlkDump` say about them (the oracles).
 *
 *   unpackBitLockerImages(dir): string          unpacks once into dir; returns the images' folder
 *   readImagesConf(folder): Map<name, BitLockerConf>   images.conf, one section per image
 *   bitlkDump(image): BitlkDump | null          cryptsetup bitlkDump parsed (null: no cryptsetup)
 */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BITLOCKER_DIR } from './data.ts';

export function unpackBitLockerImages(dir: string): string {
  const out = path.join(dir, 'bitlk-images');
  if (!fs.existsSync(path.join(out, 'images.conf'))) {
    execFileSync('tar', ['-xJf', path.join(BITLOCKER_DIR, 'bitlk-images.tar.xz'), '-C', dir]);
  }
  return out;
}

/** One [section] of images.conf: keys as written (CIPHER, GUID, PW, RP, *_VMK_GUID, SHA256SUM, …). */
export type BitLockerConf = Record<string, string>;

export function readImagesConf(folder: string): Map<string, BitLockerConf> {
  const out = new Map<string, BitLockerConf>();
  let cur: BitLockerConf | undefined;
  for (const line of fs.readFileSync(path.join(folder, 'images.conf'), 'utf8').split('\n')) {
    const sec = /^\[(.+)\]$/.exec(line.trim());
    if (sec) { cur = {}; out.set(sec[1]!, cur); continue; }
    const kv = /^([A-Z0-9_]+)=(.*)$/.exec(line.trim());
    if (kv && cur) cur[kv[1]!] = kv[2]!;
  }
  return out;
}

export interface BitlkDump {
  toGo: boolean;
  version: number;
  guid: string;
  sectorSize: number;
  volumeSize: number;
  description: string;
  cipher: string;
  keyBits: number;
  /** VMK keyslots: GUID and cryptsetup's protection text ("VMK protected with passphrase"). */
  vmks: { guid: string; protection: string; name?: string }[];
  metadataOffsets: number[];
  volumeHeader: { offset: number; size: number };
}

export function hasCryptsetup(): boolean {
  return spawnSync('sh', ['-c', 'command -v cryptsetup']).status === 0;
}

export function bitlkDump(image: string): BitlkDump | null {
  if (!hasCryptsetup()) return null;
  const text = execFileSync('cryptsetup', ['bitlkDump', image], { encoding: 'utf8' });
  const field = (name: string): string => {
    const m = new RegExp(`^${name}:\\s*(.*)$`, 'm').exec(text);
    if (!m) throw new Error(`bitlkDump ${image}: no "${name}:" line in\n${text}`);
    return m[1]!.trim();
  };
  const vmks: BitlkDump['vmks'] = [];
  for (const m of text.matchAll(/^ *\d+: VMK\n(?:\s*Name:\s*(.*)\n)?\s*GUID:\s*(\S+)\n\s*Protection:\s*(.+)$/gm)) {
    vmks.push({ guid: m[2]!, protection: m[3]!.trim(), ...(m[1] !== undefined ? { name: m[1].trim() } : {}) });
  }
  const metadataOffsets = [...text.matchAll(/FVE metadata area\n\s*Offset:\s*(\d+)/g)].map((m) => Number(m[1]));
  const vh = /Volume header\n\s*Offset:\s*(\d+) \[bytes\]\n\s*Size:\s*(\d+)/.exec(text);
  return {
    toGo: /^Info for BITLK To Go device/m.test(text),
    version: Number(field('Version')),
    guid: field('GUID'),
    sectorSize: parseInt(field('Sector size'), 10),
    volumeSize: parseInt(field('Volume size'), 10),
    description: field('Description'),
    cipher: `${field('Cipher name')}-${field('Cipher mode')}`,
    keyBits: parseInt(field('Cipher key'), 10),
    vmks,
    metadataOffsets,
    volumeHeader: vh ? { offset: Number(vh[1]), size: Number(vh[2]) } : { offset: -1, size: -1 },
  };
}
