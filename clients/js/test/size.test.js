// The vendored files are exactly what scripts/vendor.mjs makes from node_modules (no
// drift, no hand edits), and the client stays within the size docs/CLIENT.md states.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { jsonPatchBundle, uplotFiles, paths } from '../scripts/vendor.mjs';
import { measure } from '../scripts/size.mjs';

test('vendored fast-json-patch and uPlot match their npm packages', () => {
  assert.equal(readFileSync(paths.jsonPatch, 'utf8'), jsonPatchBundle());
  for (const [name, body] of Object.entries(uplotFiles())) {
    assert.equal(readFileSync(join(paths.assets, name), 'utf8'), body, name);
  }
});

test('client size: minified and gzipped within the documented bound', async () => {
  const size = await measure();
  console.log(`client size: ${JSON.stringify(size)}`);
  // docs/CLIENT.md states about 10 KiB for both files (7.2 + 2.9 when measured).
  assert.ok(size.total.gzipped < 11 * 1024, `${size.total.gzipped} bytes gzipped`);
});
