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
