#!/usr/bin/env node
/**
 * `npm run deps`: vdboot's import graph. Reads every import and re-export (type-only ones
 * too, and dynamic imports of a fixed relative path) in src/, mkdisk/, mkinitramfs/,
 * qemu/ and bin/, prints how often each folder imports each other folder and which files
 * cross folders, and fails naming the files when imports go round in a circle. The
 * command table in src/cli/ loads every command and is a registry by design, so a circle
 * that passes through src/cli/ is not counted; one among other files always is.
 */
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const SCANNED = ['src', 'mkdisk', 'mkinitramfs', 'qemu', 'bin'];
const SOURCE = /\.(ts|mts|mjs|js)$/;
const EXEMPT = 'src/cli/';

// `import x from '…'`, `import type { … } from '…'`, `export * from '…'`, `export { … } from '…'`
const STATIC = /(?:^|[\n;])\s*(?:import|export)\s+(?:type\s+)?(?:[\w$]+\s*,\s*)?(?:\{[^}]*\}|\*(?:\s+as\s+[\w$]+)?|[\w$]+)\s+from\s+['"]([^'"]+)['"]/g;
// `import '…'` for its side effects
const BARE = /(?:^|[\n;])\s*import\s+['"]([^'"]+)['"]/g;
// `await import('./x.ts')`
const DYNAMIC = /\bimport\(\s*['"]([^'"]+)['"]\s*\)/g;

function walk(dir, out) {
  for (const name of readdirSync(join(ROOT, dir)).sort()) {
    if (name === 'node_modules' || name.startsWith('.')) continue;
    const rel = `${dir}/${name}`;
    if (statSync(join(ROOT, rel)).isDirectory()) walk(rel, out);
    else if (SOURCE.test(name) && !name.endsWith('.d.ts')) out.push(rel);
  }
  return out;
}

/** The repository path a relative specifier names, or undefined for packages and modules. */
function resolveSpecifier(from, spec) {
  if (!spec.startsWith('.')) return undefined;
  const base = join(dirname(join(ROOT, from)), spec);
  for (const candidate of [base, `${base}.ts`, join(base, 'index.ts')]) {
    if (existsSync(candidate) && statSync(candidate).isFile()) return relative(ROOT, candidate).split('\\').join('/');
  }
  return undefined;
}

function stripComments(text) {
  return text.replace(/\/\*[\s\S]*?\*\//g, '').replace(/^\s*\/\/.*$/gm, '');
}

const files = SCANNED.flatMap((d) => (existsSync(join(ROOT, d)) ? walk(d, []) : []));
const edges = new Map(); // file -> Set(file)
const unresolved = [];
for (const file of files) {
  const text = stripComments(readFileSync(join(ROOT, file), 'utf8'));
  const targets = new Set();
  for (const re of [STATIC, BARE, DYNAMIC]) {
    for (const m of text.matchAll(re)) {
      const spec = m[1];
      if (!spec.startsWith('.')) continue;
      const target = resolveSpecifier(file, spec);
      if (target) targets.add(target);
      else unresolved.push(`${file}: ${spec}`);
    }
  }
  edges.set(file, targets);
}

const folderOf = (f) => dirname(f);

// Folder → folder, with how many file-level imports make up each arrow.
const folderEdges = new Map();
const crossing = [];
for (const [from, targets] of edges) {
  for (const to of targets) {
    const a = folderOf(from);
    const b = folderOf(to);
    if (a === b) continue;
    const key = `${a} -> ${b}`;
    folderEdges.set(key, (folderEdges.get(key) ?? 0) + 1);
    crossing.push(`${from} -> ${to}`);
  }
}

console.log(`import graph: ${files.length} files, ${[...edges.values()].reduce((n, s) => n + s.size, 0)} imports`);
console.log('\nfolders (imports):');
for (const key of [...folderEdges.keys()].sort()) console.log(`  ${key} (${folderEdges.get(key)})`);
console.log('\nfiles importing across folders:');
for (const line of crossing.sort()) console.log(`  ${line}`);

// Circles among the files outside src/cli/ (Tarjan's strongly connected components).
const nodes = [...edges.keys()].filter((f) => !f.startsWith(EXEMPT));
const next = (f) => [...(edges.get(f) ?? [])].filter((t) => !t.startsWith(EXEMPT) && edges.has(t)).sort();
const index = new Map();
const low = new Map();
const stack = [];
const onStack = new Set();
const components = [];
let counter = 0;
function connect(v) {
  index.set(v, counter);
  low.set(v, counter);
  counter++;
  stack.push(v);
  onStack.add(v);
  for (const w of next(v)) {
    if (!index.has(w)) {
      connect(w);
      low.set(v, Math.min(low.get(v), low.get(w)));
    } else if (onStack.has(w)) {
      low.set(v, Math.min(low.get(v), index.get(w)));
    }
  }
  if (low.get(v) === index.get(v)) {
    const component = [];
    let w;
    do {
      w = stack.pop();
      onStack.delete(w);
      component.push(w);
    } while (w !== v);
    if (component.length > 1 || next(v).includes(v)) components.push(component.sort());
  }
}
for (const v of nodes.sort()) if (!index.has(v)) connect(v);

/** One concrete circle inside a component: a shortest path from its first file back to it. */
function circleIn(component) {
  const inside = new Set(component);
  const start = component[0];
  const before = new Map([[start, undefined]]);
  const queue = [start];
  while (queue.length) {
    const v = queue.shift();
    for (const w of next(v)) {
      if (!inside.has(w)) continue;
      if (w === start) {
        const path = [start];
        for (let u = v; u !== start; u = before.get(u)) path.splice(1, 0, u);
        return [...path, start];
      }
      if (!before.has(w)) {
        before.set(w, v);
        queue.push(w);
      }
    }
  }
  return [...component, start];
}

if (unresolved.length) {
  console.log('\nrelative imports that name no file:');
  for (const u of unresolved) console.log(`  ${u}`);
}
if (components.length) {
  console.error(`\nimport circles (${components.length}):`);
  for (const c of components) console.error(`  ${circleIn(c).join(' -> ')}${c.length > 2 ? `  (${c.length} files take part: ${c.join(', ')})` : ''}`);
  process.exit(1);
}
if (unresolved.length) process.exit(1);
console.log('\nno import circles outside src/cli/');
