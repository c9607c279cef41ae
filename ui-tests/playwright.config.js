// Playwright configuration for the UI test (`make ui-test`): Galata's defaults, Debian's chromium instead of a
// downloaded browser, and JupyterLab started from the repository's .venv as `make lab` configures it
// (see jupyter_server_test_config.py).
const fs = require('fs');
const path = require('path');
const base = require('@jupyterlab/galata/lib/playwright-config');

const REPO = path.resolve(__dirname, '..');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const VENV_BIN = process.env.VENV_BIN || path.join(REPO, '.venv', 'bin');
const PORT = process.env.UI_TEST_PORT || '8890';

if (!fs.existsSync(CHROMIUM)) {
  throw new Error(
    `No Chromium at ${CHROMIUM}. Install Debian's: 'apt-get install -y chromium' ` +
      `(or point CHROMIUM=/path/to/chromium at another one). No Playwright browser download is needed.`
  );
}
if (!fs.existsSync(path.join(VENV_BIN, 'jupyter'))) {
  throw new Error(`No ${path.join(VENV_BIN, 'jupyter')}. Run 'make ui-test' (it creates .venv) or 'make lab' once.`);
}

module.exports = {
  ...base,
  testDir: 'tests',
  outputDir: 'test-results',
  reporter: [['list']],
  workers: 1,
  retries: 0,
  timeout: 300000, // one test: start a kernel, run the whole notebook, move the slider (20 s idle, 2.5 min on a loaded 2-core box)
  globalTimeout: 540000, // below make ui-test's "timeout 600", so Playwright stops the server itself
  expect: { timeout: 30000 },
  use: {
    ...base.use,
    baseURL: `http://127.0.0.1:${PORT}`,
    viewport: { width: 1280, height: 900 },
    video: 'off', // Galata's default 'retain-on-failure' needs Playwright's ffmpeg download
    trace: 'off',
    screenshot: 'only-on-failure',
    launchOptions: {
      executablePath: CHROMIUM,
      args: [
        '--no-sandbox',
        '--disable-gpu',
        '--disable-quic',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync'
      ]
    }
  },
  webServer: {
    command: `${path.join(VENV_BIN, 'jupyter')} lab --config ui-tests/jupyter_server_test_config.py`,
    cwd: REPO,
    env: { ...process.env, UI_TEST_PORT: PORT },
    url: `http://127.0.0.1:${PORT}/lab`,
    timeout: 120000,
    reuseExistingServer: false
  }
};
