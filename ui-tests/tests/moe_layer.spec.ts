// notebooks/02_moe_layer.ipynb in a real JupyterLab: run every cell, move the capacity-factor slider of the
// `interact(show_capacity, ...)` widget (section 8) one step with the keyboard, and check that the plot is
// redrawn for the new factor. Leaves the notebook file untouched (autosave off; the server is read-only).
import { expect, galata, test as base } from '@jupyterlab/galata';
import { execFileSync } from 'child_process';
import { createHash } from 'crypto';
import * as fs from 'fs';
import * as path from 'path';

const REPO = path.resolve(__dirname, '..', '..');
const NOTEBOOK = 'notebooks/02_moe_layer.ipynb';
const PYTHON = path.join(process.env.VENV_BIN || path.join(REPO, '.venv', 'bin'), 'python');
const SCREENSHOT = path.join(__dirname, '..', 'results', '02_moe_layer.png');
// The widget's defaults in the notebook, and one keyboard step (FloatSlider step 0.25) to the right.
const WIDGET = { n_experts: 8, top_k: 2, skew: 1.0, tokens: 2048 };
const BEFORE = 1.25;
const AFTER = 1.5;

// Start in notebooks/ like `make lab` (Galata would make and delete a test folder in the server root).
const test = base.extend<{}>({
  tmpPath: async ({}, use) => {
    await use('notebooks');
  }
});

test.use({
  mockSettings: {
    ...galata.DEFAULT_SETTINGS,
    '@jupyterlab/docmanager-extension:plugin': { autosave: false },
    // Keep every cell in the DOM, so the widget far down the notebook can be found and read.
    '@jupyterlab/notebook-extension:tracker': { windowingMode: 'none' }
  }
});

/** What the plot's title and legend must say for a capacity factor, computed by moelab outside the browser. */
function expected(capacityFactor: number): { title: string; capacity: string } {
  const code = [
    'import json, sys',
    'from moelab.dispatch import capacity_report',
    'from moelab.router import skewed_routing',
    'n, k, skew, T, cf = json.loads(sys.argv[1])',
    'r = capacity_report(skewed_routing(T, n, k, skew), n, cf)',
    'print(json.dumps({"title": f"dropped {r[\'dropped\']:.1%}", "capacity": f"capacity = {r[\'capacity\']}"}))'
  ].join('\n');
  const args = JSON.stringify([WIDGET.n_experts, WIDGET.top_k, WIDGET.skew, WIDGET.tokens, capacityFactor]);
  return JSON.parse(execFileSync(PYTHON, ['-c', code, args], { encoding: 'utf-8' }));
}

const sha256 = (data: string | Buffer) => createHash('sha256').update(data).digest('hex');
/** A short fingerprint of an <img> src (a data: URL of a PNG), so that failures print 64 characters, not 25 kB. */
const fingerprint = (src: string) => sha256(src.replace(/\s/g, ''));

test('02_moe_layer: the capacity-factor slider redraws the plot', async ({ page }) => {
  const notebookFile = path.join(REPO, NOTEBOOK);
  const hashBefore = sha256(fs.readFileSync(notebookFile));
  const want = { [BEFORE]: expected(BEFORE), [AFTER]: expected(AFTER) };
  expect(want[BEFORE].title).not.toEqual(want[AFTER].title);

  /** Render show_capacity(capacity_factor=cf) in the notebook's own kernel, as its plt.show() would display it,
   *  outside any output area; returns the figure's title, legend and PNG (base64), and the slider value the
   *  kernel holds now (for the failure message). */
  const renderInKernel = async (cf: number) => {
    const code = [
      'import json as _json, unittest.mock as _mock',
      '_before = set(plt.get_fignums())',
      'with _mock.patch.object(plt, "show"):',
      `    show_capacity(capacity_factor=${cf})`,
      '_fig = plt.figure(max(set(plt.get_fignums()) - _before))',
      '_ax = _fig.axes[0]',
      'print(_json.dumps({"title": _ax.get_title(),',
      '                   "legend": [t.get_text() for t in _ax.get_legend().get_texts()],',
      '                   "png": get_ipython().display_formatter.format(_fig)[0]["image/png"]}))',
      'plt.close(_fig)',
      'print(_json.dumps(repr(show_capacity.widget.kwargs["capacity_factor"])))'
    ].join('\n');
    const reply = await page.evaluate(async (code: string) => {
      const panel = (window as any).galata.app.shell.currentWidget;
      const kernel = panel.sessionContext.session.kernel;
      const future = kernel.requestExecute({ code, store_history: false }, true);
      let stdout = '';
      let error = '';
      future.onIOPub = (msg: any) => {
        if (msg.header.msg_type === 'stream') stdout += msg.content.text;
        if (msg.header.msg_type === 'error') error += `${msg.content.ename}: ${msg.content.evalue}`;
      };
      await future.done;
      return { stdout, error };
    }, code);
    expect(reply.error).toBe('');
    const [figure, widgetValue] = reply.stdout.trim().split('\n');
    const result = { ...JSON.parse(figure), widget_value: JSON.parse(widgetValue) };
    result.png = result.png.replace(/\s/g, '');
    return result as { title: string; legend: string[]; png: string; widget_value: string };
  };

  await expect(page.getByRole('region', { name: 'File Browser Section' })).toContainText('02_moe_layer.ipynb');
  expect(await page.notebook.openByPath(NOTEBOOK)).toBe(true);
  await page.notebook.activate('02_moe_layer.ipynb');
  await page.notebook.run();

  const widget = page.locator('.widget-interact');
  const slider = widget
    .locator('.widget-slider')
    .filter({ has: page.locator('.widget-label', { hasText: /^capacity_factor$/ }) });
  const readout = slider.locator('.widget-readout');
  const plot = widget.locator('.jp-OutputArea-output img');
  await expect(slider).toBeVisible();
  await expect(readout).toHaveText(BEFORE.toFixed(2));
  await expect(plot).toBeVisible();
  const srcBefore = (await plot.getAttribute('src')) ?? '';

  const figBefore = await renderInKernel(BEFORE);
  expect(figBefore.title).toBe(want[BEFORE].title); // "dropped 7.8%"
  expect(figBefore.legend).toContain(want[BEFORE].capacity); // "capacity = 640"
  expect(fingerprint(srcBefore), 'the plot shown at first must be show_capacity(capacity_factor=1.25)').toBe(
    fingerprint(`data:image/png;base64,${figBefore.png}`)
  );

  // One step right with the keyboard on the slider's handle.
  await slider.locator('.noUi-handle').focus();
  await page.keyboard.press('ArrowRight');
  await expect(readout).toHaveText(AFTER.toFixed(2));
  await expect.poll(async () => (await plot.getAttribute('src')) ?? '', { timeout: 30000 }).not.toBe(srcBefore);
  await expect(page.locator('#jp-main-statusbar')).toContainText('Idle');

  // The screenshot first, so that it exists (showing what went wrong) when an assertion below fails.
  await page.evaluate(() => document.querySelector('.widget-interact')?.scrollIntoView({ block: 'center' }));
  fs.mkdirSync(path.dirname(SCREENSHOT), { recursive: true });
  await page.screenshot({ path: SCREENSHOT });

  const figAfter = await renderInKernel(AFTER);
  expect(figAfter.title).toBe(want[AFTER].title); // "dropped 1.5%"
  expect(figAfter.legend).toContain(want[AFTER].capacity); // "capacity = 768"
  expect(figAfter.png).not.toBe(figBefore.png);
  const srcAfter = (await plot.getAttribute('src')) ?? '';
  expect(
    fingerprint(srcAfter),
    `the plot shown for readout ${AFTER.toFixed(2)} must be show_capacity(capacity_factor=${AFTER}) ` +
      `(title "${want[AFTER].title}", legend "${want[AFTER].capacity}"); the kernel received ` +
      `capacity_factor=${figAfter.widget_value}`
  ).toBe(fingerprint(`data:image/png;base64,${figAfter.png}`));

  // Close without saving; the file on disk must be byte-for-byte what it was.
  await page.notebook.close(true);
  expect(sha256(fs.readFileSync(notebookFile))).toBe(hashBefore);
});
