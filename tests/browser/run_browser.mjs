// Drives headless Chromium (Debian's /usr/bin/chromium) through the DevTools protocol with
// playwright-core: opens page.html against tether's WebSocket port, prints SUBSCRIBED once the
// page has subscribed, then RESULT <topic> <payload> once it shows a message.
// Usage: node run_browser.mjs PORT TOPIC
import { chromium } from 'playwright-core';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const [port, topic] = process.argv.slice(2);
const here = path.dirname(fileURLToPath(import.meta.url));
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
try {
  const page = await browser.newPage();
  const url = `file://${here}/page.html?port=${port}&topic=${encodeURIComponent(topic)}`;
  await page.goto(url);
  await page.waitForFunction(() => document.getElementById('status').textContent === 'subscribed',
                             null, { timeout: 15000 });
  console.log('SUBSCRIBED');
  await page.waitForFunction(() => document.getElementById('result').textContent !== '',
                             null, { timeout: 15000 });
  console.log('RESULT ' + await page.textContent('#result'));
} catch (e) {
  console.log('FAILED ' + e.message);
  process.exitCode = 1;
} finally {
  await browser.close();
}
