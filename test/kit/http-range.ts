/**
 * A static file server with byte ranges (what nbdkit's curl plugin asks for: HEAD for the
 * size, then GET with Range), listening on 127.0.0.1 only, on a free port.
 */
import fs from 'node:fs';
import http from 'node:http';
import type net from 'node:net';
import path from 'node:path';

export interface RangeServer {
  port: number;
  /** requests answered so far */
  requests(): number;
  close(): void;
}

export function rangeServer(root: string): Promise<RangeServer> {
  let count = 0;
  const server = http.createServer((req, res) => {
    count++;
    const file = path.join(root, decodeURIComponent((req.url ?? '/').split('?')[0]!).replace(/^\/+/, ''));
    if (!file.startsWith(root + path.sep) || !fs.existsSync(file)) {
      res.writeHead(404).end();
      return;
    }
    const size = fs.statSync(file).size;
    const range = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? '');
    const start = range ? Number(range[1]) : 0;
    const end = range && range[2] ? Math.min(Number(range[2]), size - 1) : size - 1;
    res.writeHead(range ? 206 : 200, { 'Content-Length': end - start + 1, 'Accept-Ranges': 'bytes', ...(range ? { 'Content-Range': `bytes ${start}-${end}/${size}` } : {}) });
    if (req.method === 'HEAD') res.end();
    else fs.createReadStream(file, { start, end }).pipe(res);
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve({ port: (server.address() as net.AddressInfo).port, close: () => server.close(), requests: () => count })));
}
