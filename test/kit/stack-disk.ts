/**
 * Ubuntu's encrypted layout, built without device-mapper: LUKS2 → LVM PV → VG → a root LV
 * holding an ext4 image and a swap LV. lvm2's own tools write the PV label and metadata on
 * a loop device (`--driverloaded n`, test/kit/lvm.ts); the filesystems go where `lvs`
 * says the LVs' extents are; cryptsetup writes the LUKS2 header with a volume key chosen
 * here (`--volume-key-file`), so the payload is encrypted in Node: aes-xts-plain64, 512-byte
 * sectors, the IV the sector number (little-endian) counted from the data segment.
 */
import { execFileSync } from 'node:child_process';
import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { LvmLab } from './lvm.ts';

const MiB = 1024 * 1024;

export interface LvmLayout {
  /** the PV image (plaintext) */
  pv: string;
  vg: string;
  vgUuid: string;
  pvUuid: string;
  /** LV name → its byte offset in the PV and size */
  lvs: Record<string, { offset: number; size: number; uuid: string }>;
}

/**
 * A PV image of `sizeMiB` with VG `vg` and one linear LV per entry of `lvs` (name → MiB),
 * each filled from its image when given (a filesystem made beforehand).
 */
export function makeLvmPv(dir: string, sizeMiB: number, vg: string, lvs: { name: string; sizeMiB: number; image?: string }[]): LvmLayout {
  const lab = new LvmLab(path.join(dir, 'lvm-lab'));
  const pv = path.join(dir, `${vg}.pv`);
  try {
    const dev = lab.attach(pv, sizeMiB);
    lab.lvm('pvcreate', '-q', dev);
    lab.lvm('vgcreate', '-q', '-s', '1m', vg, dev);
    for (const lv of lvs) lab.lvm('lvcreate', '-q', '-an', '-Zn', '-n', lv.name, '-L', `${lv.sizeMiB}m`, vg);
    const pvRow = lab.report('pvs', 'pv_uuid,pe_start,vg_uuid')[0]!;
    const rows = lab.report('lvs', 'lv_name,lv_uuid,seg_pe_ranges,lv_size,vg_extent_size');
    const out: LvmLayout = { pv, vg, vgUuid: pvRow.vg_uuid!, pvUuid: pvRow.pv_uuid!, lvs: {} };
    for (const r of rows) {
      const m = /:(\d+)-(\d+)$/.exec(r.seg_pe_ranges!)!;
      out.lvs[r.lv_name!] = { offset: (Number(pvRow.pe_start) + Number(m[1]) * Number(r.vg_extent_size)) * 512, size: Number(r.lv_size) * 512, uuid: r.lv_uuid! };
    }
    lab.close();
    const fd = fs.openSync(pv, 'r+');
    try {
      for (const lv of lvs) {
        if (!lv.image) continue;
        const bytes = fs.readFileSync(lv.image);
        if (bytes.length > out.lvs[lv.name]!.size) throw new Error(`${lv.image} is larger than LV ${lv.name}`);
        fs.writeSync(fd, bytes, 0, bytes.length, out.lvs[lv.name]!.offset);
      }
    } finally {
      fs.closeSync(fd);
    }
    return out;
  } finally {
    lab.close();
  }
}

export interface LuksImage {
  file: string;
  uuid: string;
  dataOffset: number;
  /** the volume key: the test reads the plaintext back with it (decryptRange) */
  volumeKey: Buffer;
}

/** aes-xts-plain64 with 512-byte sectors, as dm-crypt does it; `sector` counts from the data segment. */
function xts(encrypt: boolean, key: Buffer, data: Buffer, sector: number): Buffer {
  const out = Buffer.alloc(data.length);
  const iv = Buffer.alloc(16);
  for (let s = 0; s < data.length; s += 512) {
    iv.fill(0);
    iv.writeBigUInt64LE(BigInt(sector + s / 512), 0);
    const c = encrypt ? createCipheriv('aes-256-xts', key, iv) : createDecipheriv('aes-256-xts', key, iv);
    c.setAutoPadding(false);
    Buffer.concat([c.update(data.subarray(s, s + 512)), c.final()]).copy(out, s);
  }
  return out;
}

/**
 * The plaintext of `length` bytes at `plainOffset` of a LUKS2 volume (aes-xts-plain64, 512-byte
 * sectors) that starts at byte `volumeOffset` of `file`, written to `out`.
 */
export function decryptRange(file: string, volumeOffset: number, luks: Pick<LuksImage, 'dataOffset' | 'volumeKey'>, plainOffset: number, length: number, out: string): string {
  const fd = fs.openSync(file, 'r');
  const outFd = fs.openSync(out, 'w');
  try {
    const chunk = Buffer.alloc(MiB);
    for (let off = 0; off < length; off += MiB) {
      const n = Math.min(MiB, length - off);
      fs.readSync(fd, chunk, 0, n, volumeOffset + luks.dataOffset + plainOffset + off);
      fs.writeSync(outFd, xts(false, luks.volumeKey, chunk.subarray(0, n), (plainOffset + off) / 512));
    }
  } finally {
    fs.closeSync(fd);
    fs.closeSync(outFd);
  }
  return out;
}

/**
 * `payload` encrypted in a LUKS2 container: key slot 0 opens with `keyFile`'s bytes, slot 1
 * with `passphrase`. PBKDF2 with few iterations, so unlocking under emulation stays quick.
 */
export function makeLuks2(dir: string, payload: string, keyFile: string, passphrase: string, uuid: string): LuksImage {
  const file = path.join(dir, `${path.basename(payload)}.luks`);
  const vk = randomBytes(64);
  const vkFile = path.join(dir, 'volume.key');
  fs.writeFileSync(vkFile, vk);
  const plain = fs.statSync(payload).size;
  const headerBytes = 16 * MiB;
  fs.writeFileSync(file, '');
  fs.truncateSync(file, headerBytes + plain);
  const fast = ['--pbkdf', 'pbkdf2', '--pbkdf-force-iterations', '1000'];
  execFileSync('cryptsetup', ['luksFormat', '-q', '--type', 'luks2', '--uuid', uuid, '--cipher', 'aes-xts-plain64', '--key-size', '512', '--sector-size', '512',
    '--volume-key-file', vkFile, '--key-file', keyFile, ...fast, '--offset', String(headerBytes / 512), file]);
  const passFile = path.join(dir, 'passphrase');
  fs.writeFileSync(passFile, passphrase);
  execFileSync('cryptsetup', ['luksAddKey', '-q', '--key-file', keyFile, ...fast, file, passFile]);
  fs.rmSync(passFile);
  const dump = execFileSync('cryptsetup', ['luksDump', file], { encoding: 'utf8' });
  const dataOffset = Number(/^\toffset:\s*(\d+) \[bytes\]/m.exec(dump)![1]);
  if (!/^\tsector:\s*512 \[bytes\]/m.test(dump) || !/^\tcipher:\s*aes-xts-plain64/m.test(dump)) throw new Error(`unexpected LUKS2 segment:\n${dump}`);
  // Encrypt the payload sector by sector (plain64: the IV is the sector number, LE, zero-padded).
  const inFd = fs.openSync(payload, 'r');
  const outFd = fs.openSync(file, 'r+');
  try {
    const chunk = Buffer.alloc(MiB);
    for (let off = 0; off < plain; off += chunk.length) {
      const n = fs.readSync(inFd, chunk, 0, Math.min(chunk.length, plain - off), off);
      fs.writeSync(outFd, xts(true, vk, chunk.subarray(0, n), off / 512), 0, n, dataOffset + off);
    }
  } finally {
    fs.closeSync(inFd);
    fs.closeSync(outFd);
    fs.rmSync(vkFile);
  }
  return { file, uuid, dataOffset, volumeKey: vk };
}
