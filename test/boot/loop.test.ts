/** loop_config against linux/loop.h, compiled with the real header. */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { LO_FLAGS, LOOP, LOOP_CONFIG_SIZE, LOOP_INFO64_SIZE, packLoopConfig } from '../../src/boot/loop.ts';

function headerFacts(): Record<string, number> {
  const dir = mkdtempSync(join(tmpdir(), 'vdboot-loop-'));
  const src = join(dir, 'facts.c');
  writeFileSync(src, `#include <stdio.h>
#include <stddef.h>
#include <linux/loop.h>
#define P(n, v) printf("%s %lu\\n", n, (unsigned long)(v))
int main(void) {
  P("config", sizeof(struct loop_config)); P("info", sizeof(struct loop_info64));
  P("fd", offsetof(struct loop_config, fd)); P("block_size", offsetof(struct loop_config, block_size));
  P("info_off", offsetof(struct loop_config, info));
  P("lo_offset", offsetof(struct loop_info64, lo_offset)); P("lo_sizelimit", offsetof(struct loop_info64, lo_sizelimit));
  P("lo_flags", offsetof(struct loop_info64, lo_flags)); P("lo_file_name", offsetof(struct loop_info64, lo_file_name));
  P("LOOP_CONFIGURE", LOOP_CONFIGURE); P("LOOP_CTL_GET_FREE", LOOP_CTL_GET_FREE); P("LOOP_CLR_FD", LOOP_CLR_FD); P("LOOP_SET_FD", LOOP_SET_FD);
  P("RO", LO_FLAGS_READ_ONLY); P("AUTOCLEAR", LO_FLAGS_AUTOCLEAR); P("PARTSCAN", LO_FLAGS_PARTSCAN); P("DIRECT_IO", LO_FLAGS_DIRECT_IO);
  return 0;
}
`);
  execFileSync('gcc', ['-o', join(dir, 'facts'), src]);
  const out = execFileSync(join(dir, 'facts'), { encoding: 'utf8' });
  return Object.fromEntries(out.trim().split('\n').map((l) => { const [k, v] = l.split(' '); return [k!, Number(v)]; }));
}

describe('loop device structures', () => {
  const f = headerFacts();

  it('has the kernel header\'s sizes, request numbers and flags', () => {
    expect([LOOP_CONFIG_SIZE, LOOP_INFO64_SIZE]).toEqual([f.config, f.info]);
    expect([LOOP.CONFIGURE, LOOP.CTL_GET_FREE, LOOP.CLR_FD, LOOP.SET_FD]).toEqual([f.LOOP_CONFIGURE, f.LOOP_CTL_GET_FREE, f.LOOP_CLR_FD, f.LOOP_SET_FD]);
    expect([LO_FLAGS.READ_ONLY, LO_FLAGS.AUTOCLEAR, LO_FLAGS.PARTSCAN, LO_FLAGS.DIRECT_IO]).toEqual([f.RO, f.AUTOCLEAR, f.PARTSCAN, f.DIRECT_IO]);
  });

  it('packs fd, offset, size limit, flags and name at the header\'s offsets', () => {
    const buf = packLoopConfig({ fd: 7, blockSize: 4096, offset: 2 ** 40, sizeLimit: 12345 * 512, readOnly: true, partscan: true, fileName: '/run/vdboot/host/a.img' });
    const v = new DataView(buf);
    const info = f.info_off!;
    expect(v.getUint32(f.fd!, true)).toBe(7);
    expect(v.getUint32(f.block_size!, true)).toBe(4096);
    expect(Number(v.getBigUint64(info + f.lo_offset!, true))).toBe(2 ** 40);
    expect(Number(v.getBigUint64(info + f.lo_sizelimit!, true))).toBe(12345 * 512);
    expect(v.getUint32(info + f.lo_flags!, true)).toBe(f.RO! | f.PARTSCAN!);
    expect(String.fromCharCode(...new Uint8Array(buf, info + f.lo_file_name!, 22))).toBe('/run/vdboot/host/a.img');
  });
});
