/** POSIX path helpers for image sets (no node:path: this runs on QuickJS too). */

export function normalizePath(path: string): string {
  const abs = path.startsWith('/');
  const parts: string[] = [];
  for (const p of path.split('/')) {
    if (p === '' || p === '.') continue;
    if (p === '..') {
      if (parts.length > 0 && parts[parts.length - 1] !== '..') parts.pop();
      else if (!abs) parts.push('..');
    } else parts.push(p);
  }
  const s = parts.join('/');
  return abs ? `/${s}` : s === '' ? '.' : s;
}

export function dirName(path: string): string {
  const i = path.lastIndexOf('/');
  if (i < 0) return '.';
  if (i === 0) return '/';
  return path.slice(0, i);
}

export function joinPath(dir: string, path: string): string {
  if (path.startsWith('/')) return normalizePath(path);
  return normalizePath(`${dir}/${path}`);
}

/** A Windows absolute path of another machine: "C:\VMs\base.vhdx", "C:/VMs/base.vhdx", "\\server\share\base.vhdx". */
export function isWindowsAbsolute(name: string): boolean {
  return /^[A-Za-z]:[\\/]/.test(name) || name.startsWith('\\\\');
}

/**
 * Where a file named by an image (an extent, a data file, a parent, a partition image)
 * is looked for: relative names beside the image; a Windows absolute path of another
 * machine by its last name in the image's folder, as parents are found.
 */
export function resolveImageName(dir: string, name: string): string {
  if (isWindowsAbsolute(name)) return joinPath(dir, name.slice(Math.max(name.lastIndexOf('/'), name.lastIndexOf('\\')) + 1));
  return joinPath(dir, name);
}

/** True when the normalized `path` is `dir` itself or lies below it (both normalized the same way). */
export function isInside(dir: string, path: string): boolean {
  if (dir === '/') return path.startsWith('/');
  if (dir === '.') return !path.startsWith('/') && path !== '..' && !path.startsWith('../');
  return path === dir || path.startsWith(`${dir}/`);
}
