// One headless Chromium page, driven by pytest over JSON lines (tests/browser/driver.py).
//
//   node tests/browser/driver.mjs        (AGENTID_CHROMIUM: the browser, /usr/bin/chromium if unset)
//
// Each line on stdin is a command, {"id": 1, "op": "goto", "url": "..."}; each line on stdout
// the answer with the same id, {"id": 1, "ok": true, "value": ...} or
// {"id": 1, "ok": false, "error": "..."}. Commands run one at a time, in order. The browser
// closes when stdin ends. The page's console errors, uncaught exceptions and failed requests are
// kept, as are the dialogs (accepted); the "log" command returns them (pytest prints them when
// a test fails).
//
// Chromium runs without its sandbox (playwright-core's chromiumSandbox: false, which passes
// --no-sandbox): CI runs as root, where Chromium refuses to start with the sandbox on ("Running
// as root without --no-sandbox is not supported"), and containers often lack the user namespaces
// it needs. The pages loaded are the tests' own servers on 127.0.0.1.

import { createInterface } from 'node:readline';

import { chromium } from 'playwright-core';

const TIMEOUT_MS = Number(process.env.AGENTID_BROWSER_TIMEOUT_MS ?? 10_000);
const MAX_ERROR_CHARS = 4000;

const browser = await chromium.launch({
  executablePath: process.env.AGENTID_CHROMIUM || '/usr/bin/chromium',
  headless: true,
  chromiumSandbox: false,
  // /dev/shm is 64 MB in many containers: Chromium then crashes on large pages.
  args: ['--disable-dev-shm-usage'],
  timeout: 30_000,
});
const context = await browser.newContext({ viewport: { width: 1100, height: 800 } });
const page = await context.newPage();
page.setDefaultTimeout(TIMEOUT_MS);

const log = [];
page.on('console', (message) => {
  const where = message.location().url ?? '';
  if (where.endsWith('/favicon.ico')) return; // no page here has one; Chromium asks anyway
  if (message.type() === 'error' || message.type() === 'warning') {
    log.push(`console.${message.type()}: ${message.text()} (${where})`);
  }
});
// A confirm() ("Revoke every session?") is answered yes, as the person clicking means it; its
// text is kept.
page.on('dialog', (dialog) => {
  log.push(`dialog ${dialog.type()} accepted: ${dialog.message()}`);
  dialog.accept().catch(() => {});
});
page.on('pageerror', (error) => log.push(`page error: ${error.message}`));
page.on('requestfailed', (request) => {
  log.push(`request failed: ${request.method()} ${request.url()} ${request.failure()?.errorText ?? ''}`);
});

// Documents loaded so far: a click that submits a form (and the redirects after it) ends with
// the next one.
let loads = 0;
page.on('load', () => {
  loads += 1;
});

async function nextLoad(before, ms) {
  const deadline = Date.now() + ms;
  while (loads === before) {
    if (Date.now() > deadline) throw new Error(`no page loaded within ${ms} ms of the click`);
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
}

const timeout = (command) => (command.timeout_ms === undefined ? TIMEOUT_MS : command.timeout_ms);

// What each op does; `command` is the whole line (its own fields: url, selector, ...).
const ops = {
  async goto(command) {
    const response = await page.goto(command.url, { timeout: timeout(command) });
    return { status: response ? response.status() : 0, url: page.url() };
  },
  async reload(command) {
    const response = await page.reload({ timeout: timeout(command) });
    return { status: response ? response.status() : 0, url: page.url() };
  },
  async url() {
    return page.url();
  },
  async wait_for_url(command) {
    // The URL begins with `prefix` (the page then loaded).
    await page.waitForURL((url) => url.href.startsWith(command.prefix), { timeout: timeout(command) });
    return page.url();
  },
  async fill(command) {
    await page.locator(command.selector).fill(command.value, { timeout: timeout(command) });
    return null;
  },
  async click(command) {
    // navigates: the click loads a page (a link, a form's submit); wait for it to load.
    const before = loads;
    await page.locator(command.selector).click({ timeout: timeout(command) });
    if (command.navigates) await nextLoad(before, timeout(command));
    return page.url();
  },
  async wait_for(command) {
    // state: "visible" (the default), "hidden", "attached" or "detached"
    await page
      .locator(command.selector)
      .first()
      .waitFor({ state: command.state ?? 'visible', timeout: timeout(command) });
    return null;
  },
  async count(command) {
    return page.locator(command.selector).count();
  },
  async text(command) {
    return page.locator(command.selector).first().innerText({ timeout: timeout(command) });
  },
  async attribute(command) {
    return page.locator(command.selector).first().getAttribute(command.name, { timeout: timeout(command) });
  },
  async evaluate(command) {
    return page.evaluate(command.expression);
  },
  async cookies() {
    return context.cookies();
  },
  async screenshot(command) {
    await page.screenshot({ path: command.path, fullPage: true, timeout: timeout(command) });
    return command.path;
  },
  async log() {
    return log.splice(0);
  },
};

function answer(message) {
  process.stdout.write(`${JSON.stringify(message)}\n`);
}

const lines = createInterface({ input: process.stdin, crlfDelay: Infinity });
for await (const line of lines) {
  if (!line.trim()) continue;
  let command;
  try {
    command = JSON.parse(line);
  } catch {
    answer({ id: null, ok: false, error: `not JSON: ${line.slice(0, 200)}` });
    continue;
  }
  const op = Object.hasOwn(ops, command.op) ? ops[command.op] : undefined;
  if (!op) {
    answer({ id: command.id, ok: false, error: `unknown op ${JSON.stringify(command.op)}` });
    continue;
  }
  try {
    answer({ id: command.id, ok: true, value: (await op(command)) ?? null });
  } catch (error) {
    answer({ id: command.id, ok: false, error: String(error?.message ?? error).slice(0, MAX_ERROR_CHARS) });
  }
}
await browser.close();
