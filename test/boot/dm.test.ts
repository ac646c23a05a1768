/** device-mapper structures against linux/dm-ioctl.h, compiled with the real header. */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { decodeDev, DM_CMD, DM_IOCTL_SIZE, DM_TARGET_SPEC_SIZE, dmRequest, encodeDev, packDmIoctl, unpackDmIoctl, unpackDmTable } from '../../src/boot/dm.ts';

function headerFacts(): Record<string, number> {
  const dir = mkdtempSync(join(tmpdir(), 'vdboot-dm-'));
  const src = join(dir, 'facts.c');
  writeFileSync(src, `#include <stdio.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <linux/dm-ioctl.h>
#define P(n, v) printf("%s %lu\\n", n, (unsigned long)(v))
int main(void) {
  P("size", sizeof(struct dm_ioctl)); P("spec", sizeof(struct dm_target_spec));
  P("data_size", offsetof(struct dm_ioctl, data_size)); P("data_start", offsetof(struct dm_ioctl, data_start));
  P("target_count", offsetof(struct dm_ioctl, target_count)); P("flags", offsetof(struct dm_ioctl, flags));
  P("event_nr", offsetof(struct dm_ioctl, event_nr)); P("dev", offsetof(struct dm_ioctl, dev));
  P("name", offsetof(struct dm_ioctl, name)); P("uuid", offsetof(struct dm_ioctl, uuid));
  P("spec_next", offsetof(struct dm_target_spec, next)); P("spec_type", offsetof(struct dm_target_spec, target_type));
  P("DM_DEV_CREATE", DM_DEV_CREATE); P("DM_TABLE_LOAD", DM_TABLE_LOAD); P("DM_DEV_SUSPEND", DM_DEV_SUSPEND);
  P("DM_DEV_REMOVE", DM_DEV_REMOVE); P("DM_VERSION", DM_VERSION); P("DM_TABLE_STATUS", DM_TABLE_STATUS);
  return 0;
}
`);
  execFileSync('gcc', ['-o', join(dir, 'facts'), src]);
  const out = execFileSync(join(dir, 'facts'), { encoding: 'utf8' });
  return Object.fromEntries(out.trim().split('\n').map((l) => { const [k, v] = l.split(' '); return [k!, Number(v)]; }));
}

describe('device-mapper ioctl structures', () => {
  const facts = headerFacts();

  it('has the sizes and request numbers of the kernel header', () => {
    expect(DM_IOCTL_SIZE).toBe(facts.size);
    expect(DM_TARGET_SPEC_SIZE).toBe(facts.spec);
    expect(dmRequest(DM_CMD.DEV_CREATE)).toBe(facts.DM_DEV_CREATE);
    expect(dmRequest(DM_CMD.TABLE_LOAD)).toBe(facts.DM_TABLE_LOAD);
    expect(dmRequest(DM_CMD.DEV_SUSPEND)).toBe(facts.DM_DEV_SUSPEND);
    expect(dmRequest(DM_CMD.DEV_REMOVE)).toBe(facts.DM_DEV_REMOVE);
    expect(dmRequest(DM_CMD.VERSION)).toBe(facts.DM_VERSION);
    expect(dmRequest(DM_CMD.TABLE_STATUS)).toBe(facts.DM_TABLE_STATUS);
  });

  it('packs fields at the header\'s offsets and targets 8-aligned after the struct', () => {
    const buf = packDmIoctl({ name: 'vdisk0', uuid: 'VDBOOT-vdisk0', flags: 1, dev: { major: 253, minor: 300 } }, [
      { start: 0, length: 2048, type: 'linear', params: '/dev/vda1 4096' },
      { start: 2048, length: 8, type: 'zero', params: '' },
    ]);
    const v = new DataView(buf);
    const text = (off: number) => String.fromCharCode(...new Uint8Array(buf, off, 16)).replace(/\0.*$/, '');
    expect(v.getUint32(facts.data_size!, true)).toBe(buf.byteLength);
    expect(v.getUint32(facts.data_start!, true)).toBe(facts.size);
    expect(v.getUint32(facts.target_count!, true)).toBe(2);
    expect(v.getUint32(facts.flags!, true)).toBe(1);
    expect(text(facts.name!)).toBe('vdisk0');
    expect(text(facts.uuid!)).toBe('VDBOOT-vdisk0');
    const first = facts.size!;
    expect(Number(v.getBigUint64(first + 8, true))).toBe(2048);
    expect(text(first + facts.spec_type!)).toBe('linear');
    const next = v.getUint32(first + facts.spec_next!, true);
    expect(next % 8).toBe(0);
    expect(String.fromCharCode(...new Uint8Array(buf, first + facts.spec!, 14))).toBe('/dev/vda1 4096');
    expect(text(first + next + facts.spec_type!)).toBe('zero');
    expect(Number(v.getBigUint64(first + next, true))).toBe(2048);
    expect(unpackDmIoctl(buf)).toMatchObject({ name: 'vdisk0', uuid: 'VDBOOT-vdisk0', targetCount: 2, dev: { major: 253, minor: 300 } });
  });

  it('encodes device numbers as the kernel does, minors above 255 included', () => {
    for (const [maj, min] of [[253, 0], [253, 255], [253, 256], [259, 70000], [8, 17]] as const) {
      expect(decodeDev(encodeDev(maj, min))).toEqual({ major: maj, minor: min });
    }
    expect(encodeDev(8, 17)).toBe(0x811);
  });

  it('refuses names longer than the kernel allows', () => {
    expect(() => packDmIoctl({ name: 'x'.repeat(128) })).toThrow(/longer than 127 bytes/);
  });
});

describe('DM_TABLE_STATUS replies', () => {
  /** A reply laid out as the kernel's retrieve_status writes it: each spec's next is its successor's offset from data_start. */
  function reply(targets: Array<{ start: number; length: number; type: string; params: string }>, opts: { next?: (i: number, rel: number) => number; dataSize?: number } = {}): ArrayBuffer {
    const buf = packDmIoctl({ name: 'bitlk-x' }, [], 4096);
    const v = new DataView(buf);
    const b = new Uint8Array(buf);
    let rel = 0;
    for (const [i, t] of targets.entries()) {
      const at = DM_IOCTL_SIZE + rel;
      v.setBigUint64(at, BigInt(t.start), true);
      v.setBigUint64(at + 8, BigInt(t.length), true);
      b.set(Buffer.from(t.type), at + 24);
      b.set(Buffer.from(`${t.params}\0`), at + DM_TARGET_SPEC_SIZE);
      const next = (rel + DM_TARGET_SPEC_SIZE + t.params.length + 1 + 7) & ~7;
      v.setUint32(at + 20, opts.next ? opts.next(i, next) : next, true);
      rel = next;
    }
    v.setUint32(12, opts.dataSize ?? DM_IOCTL_SIZE + rel, true);
    v.setUint32(20, targets.length, true);
    return buf;
  }
  const bitlk = [
    { start: 0, length: 16, type: 'crypt', params: 'aes-xts-plain64 :32:logon:cryptsetup:x 0 252:1 0' },
    { start: 16, length: 128, type: 'zero', params: '' },
    { start: 144, length: 204656, type: 'crypt', params: 'aes-xts-plain64 :32:logon:cryptsetup:x 144 252:1 144' },
  ];

  it('gives every target with its sectors, type and parameters', () => {
    const buf = reply(bitlk);
    expect(unpackDmTable(buf, unpackDmIoctl(buf))).toEqual(bitlk);
  });

  it('refuses a next offset that does not move forward, and a target past the reply', () => {
    const loop = reply(bitlk, { next: (i, n) => (i === 1 ? 0 : n) });
    expect(() => unpackDmTable(loop, unpackDmIoctl(loop))).toThrow(/target 1's next offset 0 does not move forward/);
    const short = reply(bitlk, { dataSize: DM_IOCTL_SIZE + 60 });
    expect(() => unpackDmTable(short, unpackDmIoctl(short))).toThrow(/target 1 lies past the reply/);
  });
});
