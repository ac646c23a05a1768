/**
 * The Debian mirror this machine's own apt sources use (the first non-security URI of a
 * deb822 `.sources` file, else of /etc/apt/sources.list), for tools such as debootstrap that
 * need one: vdboot's tests fetch from where the machine already does, and name no host.
 */
import fs from 'node:fs';
import path from 'node:path';

export function machineDebianMirror(etc = '/etc/apt'): string {
  const dir = path.join(etc, 'sources.list.d');
  const files = fs.existsSync(dir) ? fs.readdirSync(dir).filter((n) => n.endsWith('.sources')).sort() : [];
  for (const f of files) {
    for (const line of fs.readFileSync(path.join(dir, f), 'utf8').split('\n')) {
      const m = /^URIs:\s*(.*)$/.exec(line.trim());
      const uri = m?.[1]!.split(/\s+/).find((u) => u && !u.includes('security'));
      if (uri) return uri;
    }
  }
  const list = path.join(etc, 'sources.list');
  if (fs.existsSync(list)) {
    for (const line of fs.readFileSync(list, 'utf8').split('\n')) {
      const words = line.trim().split(/\s+/);
      if (words[0] !== 'deb' && words[0] !== 'deb-src') continue;
      const uri = words.slice(1).find((w) => /^[a-z+]+:\/\//.test(w));
      if (uri && !uri.includes('security')) return uri;
    }
  }
  throw new Error(`no Debian mirror found in ${dir}/*.sources or ${list}: debootstrap needs one`);
}
