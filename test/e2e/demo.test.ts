/**
 * `vdboot demo` (what `npm run demo` runs) shows the headline and proves it: a dynamic VHDX
 * at a path with spaces and a non-ASCII name on NTFS, booted read-write with the initramfs
 * built with no flags, expanded in place and mapped directly, a file written, the shutdown
 * hand-off, then on the host NTFS clean, qemu-img check passing and the file in the image.
 */
import { describe, expect, it } from 'vitest';
import { DEMO_IMAGE } from '../../src/cli/demo.ts';
import { main, type CliIO } from '../../src/cli/main.ts';

describe('vdboot demo', () => {
  it('boots the demo VHDX on NTFS rw and passes every check on the host afterwards', async () => {
    let out = '';
    let err = '';
    const io: CliIO = { stdout: (s: string) => { out += s; }, stderr: (s: string) => { err += s; } } as CliIO;
    const rc = await main(['demo'], io);
    expect(rc, `${out}\n${err}`).toBe(0);
    expect(DEMO_IMAGE).toBe('/Users/Jörg/VMs/My Linux.vhdx');
    expect(out).toMatch(/[ ,]ntfs-3g \(by default/);
    expect(out).toMatch(/root \/dev\/mapper\/vdisk0p2 \(ext4, rw\)/);
    expect(out).toMatch(/^ {2}ok {3}NTFS is clean/m);
    expect(out).toMatch(/^ {2}ok {3}qemu-img check \/Users\/Jörg\/VMs\/My Linux\.vhdx$/m);
    expect(out).toMatch(/^ {2}ok {3}the guest's \/home\/note\.txt is in the image$/m);
    expect(out).not.toMatch(/FAIL/);
  }, 600_000);
});
