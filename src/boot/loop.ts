/**
 * Loop devices through LOOP_CTL_GET_FREE and LOOP_CONFIGURE (one ioctl: file, offset,
 * size limit, flags), packed here after linux/loop.h; test/boot/loop.test.ts checks the
 * layout against the C header.
 */
import { utf8Encode } from '../formats/text.ts';
import { O, type Sys } from '../sys/sys.ts';

export const LOOP = {
  SET_FD: 0x4c00,
  CLR_FD: 0x4c01,
  CONFIGURE: 0x4c0a,
  CTL_GET_FREE: 0x4c82,
} as const;

export const LO_FLAGS = { READ_ONLY: 1, AUTOCLEAR: 4, PARTSCAN: 8, DIRECT_IO: 16 } as const;

/** sizeof(struct loop_info64) and sizeof(struct loop_config) */
export const LOOP_INFO64_SIZE = 232;
export const LOOP_CONFIG_SIZE = 304;

export interface LoopConfig {
  /** the backing file's open fd */
  fd: number;
  offset?: number;
  sizeLimit?: number;
  readOnly?: boolean;
  autoclear?: boolean;
  partscan?: boolean;
  directIo?: boolean;
  /** shown in /sys/block/loopN/loop/backing_file only when the kernel cannot find it; informational */
  fileName?: string;
  blockSize?: number;
}

export function packLoopConfig(c: LoopConfig): ArrayBuffer {
  const buf = new ArrayBuffer(LOOP_CONFIG_SIZE);
  const v = new DataView(buf);
  v.setUint32(0, c.fd, true);
  v.setUint32(4, c.blockSize ?? 0, true);
  const info = 8;
  v.setBigUint64(info + 24, BigInt(c.offset ?? 0), true);
  v.setBigUint64(info + 32, BigInt(c.sizeLimit ?? 0), true);
  const flags = (c.readOnly ? LO_FLAGS.READ_ONLY : 0) | (c.autoclear ? LO_FLAGS.AUTOCLEAR : 0) | (c.partscan ? LO_FLAGS.PARTSCAN : 0) | (c.directIo ? LO_FLAGS.DIRECT_IO : 0);
  v.setUint32(info + 52, flags, true);
  const name = utf8Encode(c.fileName ?? '').subarray(0, 63);
  new Uint8Array(buf, info + 56, 64).set(name);
  return buf;
}

/**
 * Attaches `path` to a free loop device and returns the device's path. The backing
 * file is opened read-only for read-only loops, so a mistake cannot write to it.
 */
export function attachLoop(sys: Sys, path: string, opts: Omit<LoopConfig, 'fd'>): string {
  const control = sys.open('/dev/loop-control', O.RDWR | O.CLOEXEC);
  let n: number;
  try {
    n = sys.ioctlInt(control, LOOP.CTL_GET_FREE, 0);
  } finally {
    sys.close(control);
  }
  const device = `/dev/loop${n}`;
  const file = sys.open(path, (opts.readOnly ? O.RDONLY : O.RDWR) | O.CLOEXEC);
  try {
    const loop = sys.open(device, (opts.readOnly ? O.RDONLY : O.RDWR) | O.CLOEXEC);
    try {
      sys.ioctl(loop, LOOP.CONFIGURE, packLoopConfig({ ...opts, fd: file, fileName: opts.fileName ?? path }));
    } finally {
      sys.close(loop);
    }
  } finally {
    // The loop device holds its own reference to the file.
    sys.close(file);
  }
  return device;
}

export function detachLoop(sys: Sys, device: string): void {
  const fd = sys.open(device, O.RDONLY | O.CLOEXEC);
  try {
    sys.ioctlInt(fd, LOOP.CLR_FD, 0);
  } finally {
    sys.close(fd);
  }
}
