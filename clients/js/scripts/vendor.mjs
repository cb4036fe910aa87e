// Builds the vendored copies from node_modules (run `npm run vendor` after an upgrade):
// - fast-json-patch.js: fast-json-patch's ES module build (helpers.mjs, then core.mjs),
//   joined into one file so the client loads with no build step and no import map;
// - ../../src/http/assets/uPlot.*: the dashboard's chart library, embedded in the binary.
// test/vendor.test.js checks that the committed files are exactly what this produces.
import { readFileSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { dirname, join } from 'node:path';

const here = dirname(dirname(fileURLToPath(import.meta.url)));
const modules = join(here, 'node_modules');
const assets = join(here, '..', '..', 'src', 'http', 'assets');

export function jsonPatchBundle() {
  const pkg = JSON.parse(readFileSync(join(modules, 'fast-json-patch', 'package.json'), 'utf8'));
  const license = readFileSync(join(modules, 'fast-json-patch', 'LICENSE.txt'), 'utf8');
  const helpers = readFileSync(join(modules, 'fast-json-patch', 'module', 'helpers.mjs'), 'utf8');
  const core = readFileSync(join(modules, 'fast-json-patch', 'module', 'core.mjs'), 'utf8')
    .replace(/^import .* from '\.\/helpers\.mjs';\n/m, '');
  const header = `/*! fast-json-patch ${pkg.version} (module/helpers.mjs + module/core.mjs), vendored by\n` +
    ` * clients/js/scripts/vendor.mjs. ${license.trim().split('\n').join('\n * ')}\n */\n`;
  return header + helpers + '\n' + core;
}

export function uplotFiles() {
  const dist = join(modules, 'uplot', 'dist');
  return {
    'uPlot.iife.min.js': readFileSync(join(dist, 'uPlot.iife.min.js'), 'utf8'),
    'uPlot.min.css': readFileSync(join(dist, 'uPlot.min.css'), 'utf8'),
    'LICENSE-uPlot': readFileSync(join(modules, 'uplot', 'LICENSE'), 'utf8'),
  };
}

export const paths = {
  jsonPatch: join(here, 'fast-json-patch.js'),
  license: join(here, 'LICENSE-fast-json-patch'),
  assets,
};

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  writeFileSync(paths.jsonPatch, jsonPatchBundle());
  writeFileSync(paths.license, readFileSync(join(modules, 'fast-json-patch', 'LICENSE.txt'), 'utf8'));
  for (const [name, body] of Object.entries(uplotFiles())) {
    writeFileSync(join(assets, name), body);
  }
  console.log('vendored fast-json-patch and uPlot');
}
