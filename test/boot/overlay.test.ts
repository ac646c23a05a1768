/**
 * rd.vdisk.overlay: the command-line grammar, the overlay record, what an overlay device is
 * taken for (blank, vdboot's, or someone's data), and the base image's identity, computed
 * by the planner over images made by qemu-img and changed by the tools that change images
 * (qemu-io, tune2fs): the same image keeps its identity, a changed one does not.
 */
import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { planBoot, PlanError, parseOverlaySpec } from '../../src/boot/plan.ts';
import { planVdisk } from '../../src/boot/vdisk.ts';
import type { ImageHost } from '../../src/boot/image-host.ts';
import { bytesReader } from '../../src/formats/block-reader.ts';
import {
  classifyOverlay, encodeOverlayRecord, identityDifferences, OVERLAY_STORE_OFFSET, parseOverlayRecord, SNAP_MAGIC, storeUsage, type BaseIdentity,
} from '../../src/formats/overlay.ts';
import { nodeChainHost, openFileReader } from '../../src/sys/node-reader.ts';
import { convertImage, makeExt4 } from '../../qemu/disks.ts';

let dir: string;
beforeAll(() => { dir = mkdtempSync(join(tmpdir(), 'vdboot-overlay-')); });
afterAll(() => { if (dir) rmSync(dir, { recursive: true, force: true }); });

describe('rd.vdisk.overlay= on the command line', () => {
  it('a device spec, or DEVICE:/PATH for a file', () => {
    expect(parseOverlaySpec('PARTLABEL=vdboot-overlay')).toEqual({ device: { by: 'partlabel', value: 'vdboot-overlay' } });
    expect(parseOverlaySpec('/dev/sdb3')).toEqual({ device: { by: 'path', value: '/dev/sdb3' } });
    expect(parseOverlaySpec('LABEL=DATA:/vdboot/client.cow')).toEqual({ device: { by: 'label', value: 'DATA' }, path: '/vdboot/client.cow' });
    expect(parseOverlaySpec('LABEL=DATA:/vdboot\\client.cow')).toMatchObject({ path: '/vdboot/client.cow' });
    expect(parseOverlaySpec('client.cow')).toMatch(/is not a device .* nor DEVICE:\/PATH/);
    expect(parseOverlaySpec('nonsense:/x.cow')).toMatch(/"nonsense" is not a device spec/);
    expect(parseOverlaySpec('LABEL=DATA:/vdboot/')).toMatch(/names a folder/);
  });

  it('a network image with an overlay boots as a snapshot onto it; init=1 and reset are read; no unknown-option warning', () => {
    const p = planBoot('root=vdisk:nbd://10.0.2.100/disk.vhdx rd.vdisk.overlay=PARTUUID=0a1b2c3d-01 rd.vdisk.overlay.init=1');
    expect(p.vdisk.mode).toBe('snapshot');
    expect(p.vdisk.overlay).toEqual({ device: { by: 'partuuid', value: '0a1b2c3d-01' }, init: 'blank', text: 'PARTUUID=0a1b2c3d-01' });
    expect(p.warnings).toEqual([]);
    expect(planBoot('root=vdisk:nbd://10.0.2.100/d rd.vdisk.overlay=/dev/vdb rd.vdisk.overlay.init=reset').vdisk.overlay?.init).toBe('reset');
    expect(planBoot('root=vdisk:nbd://10.0.2.100/d rd.vdisk.overlay=/dev/vdb rd.vdisk.overlay.init=0').vdisk.overlay?.init).toBe('no');
  });

  it('a local image with an overlay is a snapshot too, not a read-write boot of the image', () => {
    const p = planBoot('root=vdisk:LABEL=Windows:/VMs/fleet.vhdx rd.vdisk.overlay=LABEL=Windows:/VMs/pc7.cow rw');
    expect(p.vdisk.mode).toBe('snapshot');
    expect(p.vdisk.overlay).toMatchObject({ device: { by: 'label', value: 'Windows' }, path: '/VMs/pc7.cow' });
  });

  it('what cannot be honoured stops the boot (writes would silently go to RAM, or to the image)', () => {
    expect(() => planBoot('root=vdisk:nbd://1.2.3.4/d rd.vdisk.overlay=client.cow')).toThrow(PlanError);
    expect(() => planBoot('root=vdisk:nbd://1.2.3.4/d rd.vdisk.overlay=client.cow')).toThrow(/lost at power-off/);
    expect(() => planBoot('root=vdisk:nbd://1.2.3.4/d rd.vdisk.overlay=/dev/vdb rd.vdisk.mode=rw')).toThrow(/rd\.vdisk\.mode=rw asks to write the image itself\. Remove one/);
    expect(() => planBoot('root=vdisk:nbd://1.2.3.4/d rd.vdisk.overlay=/dev/vdb rd.vdisk.mode=ro')).toThrow(/to write nothing/);
    expect(() => planBoot('root=vdisk:nbd://1.2.3.4/d rd.vdisk.overlay=/dev/vdb rd.vdisk.overlay.init=wipe')).toThrow(/is not 0, 1 or reset/);
  });

  it('warnings: no image to overlay, overlay.size beside it, init without an overlay, several images', () => {
    expect(planBoot('root=UUID=1234 rd.vdisk.overlay=/dev/vdb').warnings.join('\n')).toMatch(/rd\.vdisk\.overlay=\/dev\/vdb is ignored: no image/);
    expect(planBoot('root=vdisk:nbd://1.2.3.4/d rd.vdisk.overlay=/dev/vdb rd.vdisk.overlay.size=1G').warnings.join('\n')).toMatch(/overlay\.size=1G is ignored/);
    expect(planBoot('root=vdisk:nbd://1.2.3.4/d rd.vdisk.overlay.init=1').warnings.join('\n')).toMatch(/overlay\.init=1 is ignored: there is no rd\.vdisk\.overlay=/);
    expect(planBoot('root=vdisk:nbd://1.2.3.4/d rd.vdisk.attach=nbd://1.2.3.4/e rd.vdisk.overlay=/dev/vdb').warnings.join('\n')).toMatch(/first image \(vdisk0\) only/);
  });
});

const identity = (over: Partial<BaseIdentity> = {}): BaseIdentity => ({
  source: '/disk.vhdx', size: 64 << 20, layers: [{ format: 'vhdx', subformat: 'dynamic', size: 64 << 20, id: 'a-b', writeId: 'w1' }], tables: '00ff', content: 'abcd', ...over,
});

describe('the overlay record', () => {
  it('round-trips, and any damaged byte of it is reported, never taken', () => {
    const rec = { version: 1, storeOffset: OVERLAY_STORE_OFFSET, chunkSectors: 128, base: identity() };
    const bytes = encodeOverlayRecord(rec);
    expect(bytes.length).toBe(4096);
    expect(parseOverlayRecord(bytes)).toEqual(rec);
    const flipped = bytes.slice();
    flipped[70] ^= 1;
    expect(() => parseOverlayRecord(flipped)).toThrow(/checksum does not match/);
    const longer = bytes.slice();
    new DataView(longer.buffer).setUint32(28, 5000, true);
    expect(() => parseOverlayRecord(longer)).toThrow(/does not fit in 4096 bytes/);
    const chunk = bytes.slice();
    new DataView(chunk.buffer).setUint32(24, 100, true);
    expect(() => parseOverlayRecord(chunk)).toThrow(/chunk size 100/);
    expect(parseOverlayRecord(new Uint8Array(4096))).toBeNull();
  });

  it('identity differences name what changed; another export name is another image', () => {
    expect(identityDifferences(identity(), identity())).toEqual([]);
    expect(identityDifferences(identity(), identity({ source: '/fleet-v2.vhdx' }))).toEqual(['it is /fleet-v2.vhdx, was /disk.vhdx']);
    expect(identityDifferences(identity(), identity({ layers: [{ format: 'vhdx', subformat: 'dynamic', size: 64 << 20, id: 'a-b', writeId: 'w2' }] })))
      .toEqual(['layer 1 was written since (DataWriteGuid w2, was w1)']);
    expect(identityDifferences(identity(), identity({ size: 128 << 20, tables: '11' })).join('; ')).toMatch(/size is 134217728 bytes, was 67108864; its allocation tables changed/);
    expect(identityDifferences(identity(), identity({ layers: [{ format: 'qcow2', subformat: 'v3', size: 64 << 20 }] }))[0]).toMatch(/it is qcow2 v3, was vhdx dynamic/);
  });
});

describe('a persistent store\'s usage', () => {
  it('counts exceptions across full areas to the first unused entry; a chunk past the store is an error', () => {
    // dm-snap-persistent.c's layout with 4 KiB chunks: 256 exceptions per area, area k at chunk 1 + 257k.
    const chunk = 4096;
    const store = new Uint8Array(600 * chunk);
    const v = new DataView(store.buffer);
    v.setUint32(0, SNAP_MAGIC, true);
    let next = 2;
    const put = (area: number, i: number) => {
      const at = (1 + area * 257) * chunk + i * 16;
      v.setBigUint64(at, BigInt(1000 + next), true);
      v.setBigUint64(at + 8, BigInt(next++), true);
      if (next === 258) next = 259;
    };
    for (let i = 0; i < 256; i++) put(0, i);
    for (let i = 0; i < 3; i++) put(1, i);
    expect(storeUsage(bytesReader('store', store), 8)).toEqual({ exceptions: 259, usedChunks: 1 + 2 + 259, totalChunks: 600, chunkBytes: chunk });
    expect(storeUsage(bytesReader('empty', new Uint8Array(600 * chunk)), 8)).toMatchObject({ exceptions: 0, usedChunks: 2 });
    v.setBigUint64((1 + 257) * chunk + 2 * 16 + 8, 9999n, true);
    expect(() => storeUsage(bytesReader('bad', store), 8)).toThrow(/exception 258 names chunk 9999, past its 600 chunks/);
    expect(() => storeUsage(bytesReader('bad', store), 12)).toThrow(/chunk size 12/);
  });
});

describe('what an overlay device holds', () => {
  const MiB = 1 << 20;
  it('blank zeros; vdboot\'s record with its store; ext4, a GPT, a bare snapshot store, non-zero data, an image: foreign; a damaged record', () => {
    const blank = new Uint8Array(8 * MiB);
    expect(classifyOverlay(bytesReader('blank', blank))).toEqual({ kind: 'blank' });

    const ours = blank.slice();
    ours.set(encodeOverlayRecord({ version: 1, storeOffset: OVERLAY_STORE_OFFSET, chunkSectors: 8, base: identity() }), 0);
    new DataView(ours.buffer).setUint32(OVERLAY_STORE_OFFSET, SNAP_MAGIC, true);
    new DataView(ours.buffer).setUint32(OVERLAY_STORE_OFFSET + 4, 1, true);
    const c = classifyOverlay(bytesReader('ours', ours));
    expect(c.kind).toBe('overlay');
    if (c.kind === 'overlay') expect(c.store).toMatchObject({ magic: SNAP_MAGIC, valid: 1 });
    const damaged = ours.slice();
    damaged[100] ^= 0xff;
    expect(classifyOverlay(bytesReader('damaged', damaged))).toMatchObject({ kind: 'damaged', why: expect.stringMatching(/checksum/) });

    const ext4 = join(dir, 'ext4.img');
    makeExt4(ext4, { sizeMiB: 8, label: 'home' });
    const r = openFileReader(ext4);
    expect(classifyOverlay(r)).toEqual({ kind: 'foreign', what: expect.stringMatching(/^a filesystem of type ext4, LABEL=home, UUID=/) });
    r.close();

    const gpt = join(dir, 'gpt.img');
    writeFileSync(gpt, new Uint8Array(8 * MiB));
    execFileSync('sfdisk', ['-q', gpt], { input: 'label: gpt\n,2M\n,\n' });
    const g = openFileReader(gpt);
    expect(classifyOverlay(g)).toEqual({ kind: 'foreign', what: 'a GPT partition table with 2 partitions' });
    g.close();

    const bare = blank.slice();
    new DataView(bare.buffer).setUint32(OVERLAY_STORE_OFFSET, SNAP_MAGIC, true);
    expect(classifyOverlay(bytesReader('bare', bare))).toMatchObject({ kind: 'foreign', what: expect.stringMatching(/record was erased/) });
    expect(() => classifyOverlay(bytesReader('tiny', new Uint8Array(MiB)))).toThrow(/needs at least 4 MiB/);

    // No signature, but not zeros where the record or the store's first chunk would go: someone's data.
    for (const at of [100, OVERLAY_STORE_OFFSET + 60_000]) {
      const data = blank.slice();
      data[at] = 1;
      expect(classifyOverlay(bytesReader('data', data))).toMatchObject({ kind: 'foreign', what: expect.stringMatching(/^data with no signature vdboot recognises/) });
    }
    const past = blank.slice();
    past[OVERLAY_STORE_OFFSET + 64 * 1024] = 1;
    expect(classifyOverlay(bytesReader('past', past))).toEqual({ kind: 'blank' });

    // An image file named by mistake (the served image itself, say).
    const vhdx = join(dir, 'mistake.vhdx');
    execFileSync('qemu-img', ['create', '-q', '-f', 'vhdx', vhdx, '64M']);
    const v = openFileReader(vhdx);
    expect(classifyOverlay(v)).toEqual({ kind: 'foreign', what: 'a VHDX image' });
    v.close();
  });
});

describe('the base image\'s identity, by the planner', () => {
  const host: ImageHost = { description: 'test files', device: '/dev/null', chain: nodeChainHost({ allowOutside: true }), layout: () => null, writeBlocker: null };
  const identityOf = (file: string) => {
    const vp = planVdisk({ index: 0, path: file, mode: 'snapshot', map: 'auto', expand: false, persistentOverlay: true }, host);
    expect(vp.devices.find((d) => d.name === 'vdisk0')!.targets[0]!.params).toBe('/dev/mapper/vdisk0-base $COW P 8');
    expect(vp.cowBytes).toBeUndefined();
    return vp.baseIdentity!;
  };

  it('a dynamic VHDX: a copy keeps its identity; written by qemu-io, its DataWriteGuid and tables change', () => {
    const fsImg = join(dir, 'fs.ext4');
    makeExt4(fsImg, { sizeMiB: 24, label: 'root', files: { 'etc/hostname': 'kiosk\n' } });
    const vhdx = join(dir, 'base.vhdx');
    convertImage(fsImg, vhdx, 'vhdx', ['subformat=dynamic', 'block_size=1048576']);
    const first = identityOf(vhdx);
    expect(first.layers[0]).toMatchObject({ format: 'vhdx', subformat: 'dynamic', writeId: expect.stringMatching(/^[0-9a-f-]{36}$/) });
    const copy = join(dir, 'copy.vhdx');
    copyFileSync(vhdx, copy);
    expect(identityDifferences(first, { ...identityOf(copy), source: first.source })).toEqual([]);
    execFileSync('qemu-io', ['-f', 'vhdx', '-c', 'write -P 0x5a 20M 64k', copy], { stdio: 'ignore' });
    const diffs = identityDifferences(first, identityOf(copy));
    expect(diffs.join('; ')).toMatch(/layer 1 was written since \(DataWriteGuid [0-9a-f-]+, was [0-9a-f-]+\)/);
    expect(diffs.join('; ')).toMatch(/its allocation tables changed/);
  });

  it('a raw image whose ext4 superblock changed (tune2fs) is another image; the unchanged one is not', () => {
    const raw = join(dir, 'base.raw');
    makeExt4(raw, { sizeMiB: 16, label: 'root' });
    const first = identityOf(raw);
    expect(identityDifferences(first, identityOf(raw))).toEqual([]);
    execFileSync('tune2fs', ['-L', 'changed', raw], { stdio: 'ignore' });
    expect(identityDifferences(first, identityOf(raw))).toEqual(['its partition table or a filesystem superblock changed']);
  });
});
