/**
 * Run by native.test.ts as an ordinary process: utimensat and lsetxattr of the static
 * host on the files named in argv, printing what happened as one JSON line.
 */
import * as native from 'sys';
import { quickjsSys } from '../../src/sys/quickjs.ts';

const sys = quickjsSys(native);
const [file, link] = native.args.slice(1);
const out: Record<string, unknown> = {};
const attempt = (name: string, f: () => unknown): void => {
  try {
    out[name] = f() ?? 'ok';
  } catch (e) {
    const err = e as { name?: string; code?: string; message?: string };
    out[name] = `${err.name} ${err.code ?? err.message}`;
  }
};
attempt('fileTime', () => sys.utimensat(file!, 1_600_000_000, 123_456_789, true));
attempt('linkTime', () => sys.utimensat(link!, 1_500_000_000, 0, true));
attempt('xattr', () => sys.lsetxattr(file!, 'user.vdboot', new Uint8Array([0x68, 0x69, 0x00, 0xff])));
attempt('capability', () => sys.lsetxattr(file!, 'security.capability', new Uint8Array([1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])));
attempt('missing', () => sys.utimensat(`${file}.missing`, 0, 0, true));
attempt('badNsec', () => sys.utimensat(file!, 0, 1_000_000_000, true));
sys.print(`TMPFS-NATIVE ${JSON.stringify(out)}`);
sys.exit(0);
