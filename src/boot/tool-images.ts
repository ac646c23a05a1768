/**
 * Programs kept in squashfs images (`/usr/lib/vdboot/TOOL.sqfs`, mkinitramfs's packed tools:
 * cryptsetup, lvm): the kernel copies the image with the initramfs but never unpacks it, so a
 * boot without LUKS or such LVs pays nothing for them. Before the init runs one, it mounts
 * the image read-only at /run/vdboot/tools/TOOL on a loop device (the program's path holds a
 * wrapper that runs it from there); before switching root every such mount is taken down
 * again with its loop device, so the booted system inherits neither. (Not LO_FLAGS_AUTOCLEAR
 * at attach: the loop would be cleared as soon as attachLoop closes it, before the mount.)
 */
import { findModule } from '../formats/manifest.ts';
import { MS, type Sys } from '../sys/sys.ts';
import { BootFailure, type InitContext } from './context.ts';
import type { ConsoleLog } from './console.ts';
import { exists, mkdirs, readTextOr } from './fsutil.ts';
import { attachLoop, detachLoop } from './loop.ts';

const IMAGE_DIR = '/usr/lib/vdboot';
const MOUNT_DIR = '/run/vdboot/tools';
const MNT_DETACH = 2;

/**
 * Mounts TOOL's image when this initramfs keeps TOOL packed and it is not mounted yet
 * (loading loop and squashfs first). A tool that is not packed needs nothing.
 */
export function mountToolImage(ctx: InitContext, tool: string): void {
  const { sys } = ctx;
  const image = `${IMAGE_DIR}/${tool}.sqfs`;
  const dir = `${MOUNT_DIR}/${tool}`;
  if (!exists(sys, image) || mountedAt(sys).includes(dir)) return;
  ctx.log.timed(`mount ${tool}`, () => {
    ctx.modules.reportFailures(ctx.modules.load(['loop', 'squashfs'].filter((m) => findModule(ctx.manifest, m))));
    mkdirs(sys, dir);
    const loop = attachLoop(sys, image, { readOnly: true });
    try {
      sys.mount(loop, dir, 'squashfs', MS.RDONLY, '');
    } catch (e) {
      try { detachLoop(sys, loop); } catch { /* left attached: harmless, read-only */ }
      throw new BootFailure(`${image} could not be mounted on ${dir} (${(e as Error).message}): the initramfs is damaged, or the kernel lacks squashfs with zstd; rebuild it with "vdboot mkinitramfs"`);
    }
  });
}

/** The tool images mounted now: mount point and the device under it. */
function toolMounts(sys: Sys): { dir: string; device: string }[] {
  return (readTextOr(sys, '/proc/mounts') ?? '').split('\n').map((l) => l.split(' ')).filter((f) => (f[1] ?? '').startsWith(`${MOUNT_DIR}/`)).map((f) => ({ dir: f[1]!, device: f[0]! }));
}

function mountedAt(sys: Sys): string[] {
  return toolMounts(sys).map((m) => m.dir);
}

/**
 * Unmounts every tool image and detaches its loop device. Best effort: a mount still busy is
 * detached lazily, with a warning, rather than stopping the boot (its loop then stays).
 */
export function releaseToolImages(sys: Sys, log: ConsoleLog): void {
  for (const { dir, device } of toolMounts(sys).reverse()) {
    try {
      sys.umount2(dir, 0);
    } catch (e) {
      log.warn(`${dir} is still in use (${(e as Error).message}); detached lazily`);
      try { sys.umount2(dir, MNT_DETACH); } catch { /* reported above */ }
      continue;
    }
    if (/^\/dev\/loop\d+$/.test(device)) {
      try { detachLoop(sys, device); } catch (e) { log.warn(`${device} (under ${dir}) could not be detached: ${(e as Error).message}`); }
    }
  }
}
