/**
 * The resume record (src/formats/resume-record.ts): round trip, every kind of damage, the
 * differences a later boot names, and the swap signatures, against a swap page made by
 * util-linux's mkswap on this machine.
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { mapHash } from '../../src/formats/overlay.ts';
import { encodeResumeRecord, readBootBits, resumeDifferences, RESUME_RECORD_BYTES, swapState, type ResumeIdentity } from '../../src/formats/resume-record.ts';

const dir = mkdtempSync(join(tmpdir(), 'vdboot-resume-record-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const ID: ResumeIdentity = {
  image: '/Users/Jörg/VMs/My Linux.vhdx',
  host: 'PARTUUID=2f0c7e0a-1b7e-4c1f-9a53-0c4c1a8b9d10',
  chain: 'vhdx dynamic 21474836480',
  tables: mapHash({ size: 1 << 30, extents: [{ kind: 'data', start: 0, length: 1 << 20, file: 0, offset: 4 << 20 }, { kind: 'zero', start: 1 << 20, length: (1 << 30) - (1 << 20) }] }),
  writeIds: ['6f1e1c0e-9a4b-4e43-8f3a-1d2c3b4a5f60'],
};

function mkswapPage(): Uint8Array {
  const f = join(dir, 'swap');
  writeFileSync(f, '');
  truncateSync(f, 1 << 20);
  execFileSync('mkswap', ['-q', f]);
  return new Uint8Array(readFileSync(f).subarray(0, 4096));
}

describe('resume record', () => {
  it('round-trips, and mkswap leaves boot bits a record may take', () => {
    const page = mkswapPage();
    expect(swapState(page)).toBe('swap');
    expect(readBootBits(page.subarray(0, RESUME_RECORD_BYTES))).toEqual({ kind: 'empty' });
    page.set(encodeResumeRecord(ID), 0);
    expect(swapState(page)).toBe('swap');
    expect(readBootBits(page.subarray(0, RESUME_RECORD_BYTES))).toEqual({ kind: 'record', id: ID });
  });

  it('tells a hibernated swap, a swap and neither apart by the signature the kernel writes', () => {
    const page = mkswapPage();
    for (const sig of ['S1SUSPEND\0', 'S2SUSPEND\0', 'LINHIB0001']) {
      page.set(new TextEncoder().encode(sig), 4086);
      expect(swapState(page)).toBe('hibernated');
    }
    page.set(new TextEncoder().encode('EXT4-OTHER'), 4086);
    expect(swapState(page)).toBe('none');
    expect(swapState(page.subarray(0, 1024))).toBe('none');
  });

  it('names damage instead of trusting it', () => {
    const good = encodeResumeRecord(ID);
    const flip = good.slice();
    flip[40] ^= 1;
    expect(readBootBits(flip)).toEqual({ kind: 'damaged', why: 'its checksum does not match' });
    const long = good.slice();
    new DataView(long.buffer).setUint32(16, 5000, true);
    expect(readBootBits(long)).toMatchObject({ kind: 'damaged', why: 'its length field says 5000 bytes' });
    const other = good.slice();
    other[0] = 0xeb; // a boot sector's jump
    expect(readBootBits(other)).toEqual({ kind: 'other' });
    expect(readBootBits(good.subarray(0, 100))).toMatchObject({ kind: 'damaged' });
    // every single-byte change in the header or text is caught or read as something else, never as another record
    for (let i = 0; i < 24 + 64; i++) {
      const b = good.slice();
      b[i] ^= 0x5a;
      const r = readBootBits(b);
      expect(r.kind === 'record' && JSON.stringify(r.id) === JSON.stringify(ID), `byte ${i}`).toBe(false);
    }
    expect(() => encodeResumeRecord({ ...ID, image: `/${'x'.repeat(1000)}` })).toThrow(/more than 1000 fit in the swap's boot bits/);
  });

  it('says what differs: another host, a moved file, a layer written by another program', () => {
    expect(resumeDifferences(ID, ID)).toEqual([]);
    expect(resumeDifferences(ID, { ...ID, host: 'PARTUUID=00000000-0000-0000-0000-000000000001' })).toEqual(['its host is PARTUUID=00000000-0000-0000-0000-000000000001, was PARTUUID=2f0c7e0a-1b7e-4c1f-9a53-0c4c1a8b9d10']);
    const moved = mapHash({ size: 1 << 30, extents: [{ kind: 'data', start: 0, length: 1 << 20, file: 0, offset: 8 << 20 }, { kind: 'zero', start: 1 << 20, length: (1 << 30) - (1 << 20) }] });
    expect(moved).not.toBe(ID.tables);
    expect(resumeDifferences(ID, { ...ID, tables: moved })[0]).toMatch(/its file lies elsewhere on the host now/);
    expect(resumeDifferences(ID, { ...ID, writeIds: ['11111111-2222-3333-4444-555555555555'] })).toEqual(['layer 1 was written by another program since (write id 11111111-2222-3333-4444-555555555555, was 6f1e1c0e-9a4b-4e43-8f3a-1d2c3b4a5f60)']);
    expect(resumeDifferences(ID, { ...ID, chain: 'vhdx fixed 21474836480' })).toEqual(['it is vhdx fixed 21474836480, was vhdx dynamic 21474836480']);
  });
});
