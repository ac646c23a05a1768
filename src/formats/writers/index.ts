/**
 * Every image writer by output format. `raw` writes the data ranges at their own offsets
 * and leaves the rest as a hole.
 */
import { checkSource, eachDataBlock, touchedBlocks, type ImageSink, type SparseSource, type WriteOptions, type WriteResult } from './sparse.ts';
import { writeVhdDynamic, writeVhdFixed } from './write-vhd.ts';
import { writeVhdx } from './write-vhdx.ts';
import { writeVdi } from './write-vdi.ts';
import { writeVmdk } from './write-vmdk.ts';
import { writeQcow2 } from './write-qcow2.ts';

export type OutputFormat = 'raw' | 'vhd' | 'vhd-fixed' | 'vhdx' | 'vdi' | 'vmdk' | 'qcow2';
export const OUTPUT_FORMATS: readonly OutputFormat[] = ['raw', 'vhd', 'vhd-fixed', 'vhdx', 'vdi', 'vmdk', 'qcow2'];

/** The format an output file name asks for, by its extension (`.img` and anything unknown: raw). */
export function formatFromFileName(name: string): OutputFormat {
  const ext = /\.([a-z0-9]+)$/i.exec(name)?.[1]?.toLowerCase();
  switch (ext) {
    case 'vhd': return 'vhd';
    case 'vhdx': return 'vhdx';
    case 'vdi': return 'vdi';
    case 'vmdk': return 'vmdk';
    case 'qcow2': case 'qcow': return 'qcow2';
    default: return 'raw';
  }
}

export function writeRaw(src: SparseSource, sink: ImageSink, opts: WriteOptions): WriteResult {
  checkSource(src, 'raw', Number.MAX_SAFE_INTEGER);
  const chunk = 1024 * 1024;
  const blocks = touchedBlocks(src.ranges, chunk);
  eachDataBlock(src, chunk, blocks, opts.progress, (b, bytes) => {
    sink.write(b * chunk, bytes.subarray(0, Math.min(chunk, src.size - b * chunk)));
  });
  sink.setSize(src.size);
  return { fileSize: src.size, blocksWritten: blocks.length, blockSize: chunk };
}

/** Writes `src` as `format`; `fileName` is the output's base name (a VMDK's descriptor names it). */
export function writeImage(format: OutputFormat, src: SparseSource, sink: ImageSink, opts: WriteOptions & { fileName: string }): WriteResult {
  switch (format) {
    case 'raw': return writeRaw(src, sink, opts);
    case 'vhd': return writeVhdDynamic(src, sink, opts);
    case 'vhd-fixed': return writeVhdFixed(src, sink, opts);
    case 'vhdx': return writeVhdx(src, sink, opts);
    case 'vdi': return writeVdi(src, sink, opts);
    case 'vmdk': return writeVmdk(src, sink, opts);
    case 'qcow2': return writeQcow2(src, sink, opts);
  }
}
