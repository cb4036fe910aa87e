// The client's size as a page loads it: tidings.js and the vendored fast-json-patch.js,
// minified with terser and gzipped (level 9). `npm run size`; test/size.test.js keeps the
// bound stated in docs/CLIENT.md.
import { readFileSync } from 'node:fs';
import { gzipSync } from 'node:zlib';
import { fileURLToPath } from 'node:url';
import { dirname, join } from 'node:path';
import { minify } from 'terser';

const here = dirname(dirname(fileURLToPath(import.meta.url)));

export async function measure() {
  const out = {};
  for (const file of ['tidings.js', 'fast-json-patch.js']) {
    const source = readFileSync(join(here, file), 'utf8');
    const min = (await minify(source, { module: true, compress: true, mangle: true, format: { comments: false } })).code;
    out[file] = { source: source.length, minified: min.length, gzipped: gzipSync(min, { level: 9 }).length };
  }
  out.total = {
    minified: out['tidings.js'].minified + out['fast-json-patch.js'].minified,
    gzipped: out['tidings.js'].gzipped + out['fast-json-patch.js'].gzipped,
  };
  return out;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  console.log(JSON.stringify(await measure(), null, 2));
}
