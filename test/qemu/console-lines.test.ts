import { describe, expect, it } from 'vitest';
import { takeConsoleLines } from '../../qemu/harness.ts';

describe('the harness splits the serial console into lines', () => {
  it('a kernel message printed into the middle of a vdboot line becomes its own line, and the interrupted line is whole again', () => {
    const text = 'vdboot: [   5.179] starting the rescue she[    5.208058] ata2: PATA max MWDMA2 cmd 0x170\nll; type "reboot -f"\n[    5.300000] next\nvdboot# ';
    const { lines, rest } = takeConsoleLines(text, 7);
    expect(lines.map((l) => l.text)).toEqual([
      '[    5.208058] ata2: PATA max MWDMA2 cmd 0x170',
      'vdboot: [   5.179] starting the rescue shell; type "reboot -f"',
      '[    5.300000] next',
    ]);
    expect(lines[0]!.kernelTime).toBe(5.208058);
    expect(lines[1]!.kernelTime).toBeUndefined();
    expect(rest).toBe('vdboot# ');
  });

  it('lines that start with a kernel timestamp, and vdboot\'s own three-decimal stamps, are left as they are', () => {
    const { lines, rest } = takeConsoleLines('[    1.000000] a [    1.000001] b\nvdboot: [   1.002] c\nhalf', 0);
    expect(lines.map((l) => l.text)).toEqual(['[    1.000000] a [    1.000001] b', 'vdboot: [   1.002] c']);
    expect(rest).toBe('half');
  });
});
