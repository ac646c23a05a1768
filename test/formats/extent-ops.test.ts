import { describe, expect, it } from 'vitest';
import { isFormatError } from '../../src/formats/block-reader.ts';
import type { Extent, ExtentMap } from '../../src/formats/extent-map.ts';
import {
  composeMap, dmTable, findExtent, mergeExtents, sliceMap, summarizeMap, validateComposed, validateExtents, validateMap, type FileExtent,
} from '../../src/formats/extent-ops.ts';

const d = (start: number, length: number, file: number, offset: number): Extent => ({ kind: 'data', start, length, file, offset });
const z = (start: number, length: number, why: 'unallocated' | 'zeroed' | 'uninitialized' = 'unallocated'): Extent => ({ kind: 'zero', start, length, why });

function thrown(f: () => unknown): Error {
  try {
    f();
  } catch (e) {
    expect(isFormatError(e), String(e)).toBe(true);
    return e as Error;
  }
  throw new Error('expected a FormatError');
}

describe('mergeExtents', () => {
  it('joins neighbours contiguous on both sides, keeps the rest apart', () => {
    const merged = mergeExtents([d(0, 512, 0, 1024), d(512, 512, 0, 1536), d(1024, 512, 0, 4096), d(1536, 512, 1, 4608), z(2048, 512), z(2560, 512), z(3072, 512, 'zeroed')]);
    expect(merged).toEqual([d(0, 1024, 0, 1024), d(1024, 512, 0, 4096), d(1536, 512, 1, 4608), z(2048, 1024), z(3072, 512, 'zeroed')]);
  });

  it('drops empty extents and does not modify its input', () => {
    const input = [d(0, 512, 0, 0), z(512, 0), d(512, 512, 0, 512)];
    expect(mergeExtents(input)).toEqual([d(0, 1024, 0, 0)]);
    expect(input[0]!.length).toBe(512);
  });
});

describe('validateExtents', () => {
  it('accepts a sorted, gap-free map inside its files', () => {
    validateExtents('t', 2048, [d(0, 1024, 0, 4096), z(1024, 1024)], { fileSizes: [8192] });
  });
  it('refuses a gap, an overlap, and a short or long cover', () => {
    expect(thrown(() => validateExtents('t', 2048, [d(0, 1024, 0, 0), z(1536, 512)])).message).toMatch(/not contiguous/);
    expect(thrown(() => validateExtents('t', 2048, [d(0, 1024, 0, 0), z(512, 1536)])).message).toMatch(/not contiguous/);
    expect(thrown(() => validateExtents('t', 2048, [d(0, 1024, 0, 0)])).message).toMatch(/covers 1024/);
  });
  it('refuses data past the end of its file', () => {
    expect(thrown(() => validateExtents('t', 1024, [d(0, 1024, 0, 7680)], { fileSizes: [8192] })).message).toMatch(/only 8192 bytes/);
  });
  it("refuses data on the layer's own metadata, naming it", () => {
    const e = thrown(() => validateExtents('t', 1024, [d(0, 1024, 0, 1024)], { metadata: [{ file: 0, offset: 1536, length: 512, what: 'BAT' }] }));
    expect(e.message).toMatch(/own BAT/);
    validateExtents('t', 1024, [d(0, 1024, 0, 1024)], { metadata: [{ file: 0, offset: 2048, length: 512, what: 'BAT' }, { file: 1, offset: 1024, length: 512, what: 'other file' }] });
  });
  it('refuses two virtual ranges on the same file bytes', () => {
    expect(thrown(() => validateExtents('t', 2048, [d(0, 1024, 0, 0), d(1024, 1024, 0, 512)])).message).toMatch(/same bytes/);
  });
  it('validateMap refuses a file index the map does not list', () => {
    expect(thrown(() => validateMap({ size: 512, files: ['a'], extents: [d(0, 512, 1, 0)] })).message).toMatch(/does not list/);
  });
});

describe('sliceMap and findExtent', () => {
  const map: ExtentMap = { size: 4096, files: ['img'], extents: [d(0, 1024, 0, 10240), z(1024, 1024), d(2048, 2048, 0, 20480)] };
  it('takes a partition range, rebased to 0, cutting extents at both ends', () => {
    expect(sliceMap(map, 512, 2048).extents).toEqual([d(0, 512, 0, 10752), z(512, 1024), d(1536, 512, 0, 20480)]);
  });
  it('refuses a range outside the disk', () => {
    expect(thrown(() => sliceMap(map, 4000, 512)).message).toMatch(/outside/);
  });
  it('finds the extent holding an offset', () => {
    expect([findExtent(map.extents, 0), findExtent(map.extents, 1024), findExtent(map.extents, 4095), findExtent(map.extents, 4096)]).toEqual([0, 1, 2, -1]);
  });
});

describe('composeMap (image map ∘ host file extents)', () => {
  const image: ExtentMap = { size: 8192, files: ['/VMs/a.vhd', '/VMs/base.vhd'], extents: [d(0, 4096, 0, 1024), z(4096, 2048), d(6144, 2048, 1, 0)] };
  const fileA: FileExtent[] = [
    { kind: 'data', fileOffset: 0, length: 2048, deviceOffset: 1_048_576 },
    { kind: 'data', fileOffset: 2048, length: 2048, deviceOffset: 5_242_880 },
    { kind: 'hole', fileOffset: 4096, length: 1024 },
    { kind: 'uninitialized', fileOffset: 5120, length: 4096 },
  ];
  it('splits data at file fragment boundaries and turns holes/uninitialized ranges into zero', () => {
    const out = composeMap(image, [{ device: '/dev/sda2', extents: fileA }, null]);
    expect(out.files).toEqual(['/dev/sda2', '/VMs/base.vhd']);
    expect(out.extents).toEqual([
      d(0, 1024, 0, 1_049_600),
      d(1024, 2048, 0, 5_242_880),
      z(3072, 1024, 'uninitialized'),
      z(4096, 2048),
      d(6144, 2048, 1, 0),
    ]);
  });
  it('merges fragments that are contiguous on the device', () => {
    const contiguous: FileExtent[] = [
      { kind: 'data', fileOffset: 0, length: 3072, deviceOffset: 65536 },
      { kind: 'data', fileOffset: 3072, length: 8192, deviceOffset: 65536 + 3072 },
    ];
    const out = composeMap(image, [{ device: '/dev/sda2', extents: contiguous }, { device: '/dev/sda2', extents: contiguous }]);
    expect(out.files).toEqual(['/dev/sda2']);
    expect(out.extents[0]).toEqual(d(0, 4096, 0, 65536 + 1024));
  });
  it('refuses a file whose extents do not cover the bytes the map uses', () => {
    expect(thrown(() => composeMap(image, [{ device: '/dev/sda2', extents: fileA.slice(0, 1) }, null])).message).toMatch(/not covered/);
  });
});

describe('dmTable', () => {
  const map: ExtentMap = { size: 8192, files: ['/dev/sda2'], extents: [d(0, 4096, 0, 1_048_576), z(4096, 4096)] };
  it('writes linear and zero lines in 512-byte sectors', () => {
    expect(dmTable(map)).toEqual(['0 8 linear /dev/sda2 2048', '8 8 zero']);
    expect(dmTable(map, { devices: ['/dev/loop0'] })[0]).toBe('0 8 linear /dev/loop0 2048');
  });
  it('refuses zero ranges for a writable table, naming the remedies', () => {
    expect(thrown(() => dmTable(map, { writable: true })).message).toMatch(/rd\.vdisk\.mode=snapshot/);
  });
  it('refuses unaligned extents and unmappable ranges', () => {
    expect(thrown(() => dmTable({ size: 1024, files: ['f'], extents: [d(0, 1024, 0, 100)] })).message).toMatch(/not aligned/);
    expect(thrown(() => dmTable({ size: 512, files: [], extents: [{ kind: 'unmappable', start: 0, length: 512, reason: 'zlib-compressed cluster' }] })).message).toMatch(/zlib-compressed/);
  });
  it('summarizeMap counts bytes per kind, per reason and per file', () => {
    const s = summarizeMap({ size: 8192, files: ['a', 'b'], extents: [d(0, 1024, 1, 0), z(1024, 1024, 'zeroed'), z(2048, 6144)] });
    expect(s).toMatchObject({ extents: 3, dataBytes: 1024, zeroBytes: 7168, zeroBytesByWhy: { zeroed: 1024, unallocated: 6144 }, dataBytesByFile: [0, 1024] });
  });
});

describe('validateComposed: the composed map checked once more on the device', () => {
  const MiB = 1 << 20;
  // two files of an image set, each 1 MiB, on /dev/sda2
  const map: ExtentMap = { size: 2 * MiB, files: ['a.raw', 'b.raw'], extents: [d(0, MiB, 0, 0), d(MiB, MiB, 1, 0)] };
  const at = (deviceOffset: number): FileExtent[] => [{ kind: 'data', fileOffset: 0, length: MiB, deviceOffset }];

  it('files on separate sectors pass', () => {
    const layouts = [{ device: '/dev/sda2', extents: at(0) }, { device: '/dev/sda2', extents: at(4 * MiB) }];
    expect(() => validateComposed('set', composeMap(map, layouts), layouts, [])).not.toThrow();
  });

  it('two files sharing sectors on the host (a cross-link the host reader did not see) are refused, naming the device', () => {
    const layouts = [{ device: '/dev/sda2', extents: at(0) }, { device: '/dev/sda2', extents: at(MiB / 2) }];
    const e = thrown(() => validateComposed('set', composeMap(map, layouts), layouts, []));
    expect(isFormatError(e)).toBe(true);
    expect(e.message).toContain('mapped onto the same bytes of /dev/sda2');
  });

  it('data on the sectors of another file\'s tables is refused, naming the table', () => {
    // b.raw lies right after a.raw's first 64 KiB, which hold a.raw's header (metadata of file 0)
    const small: ExtentMap = { size: MiB, files: ['a.raw', 'b.raw'], extents: [d(0, MiB / 2, 0, MiB / 2), d(MiB / 2, MiB / 2, 1, 0)] };
    const layouts = [{ device: '/dev/sda2', extents: at(0) }, { device: '/dev/sda2', extents: [{ kind: 'data' as const, fileOffset: 0, length: MiB / 2, deviceOffset: 0 }] }];
    const e = thrown(() => validateComposed('set', composeMap(small, layouts), layouts, [{ file: 0, offset: 0, length: 65536, what: 'header' }]));
    expect(e.message).toMatch(/header/);
  });
});
