// PM2 in front of a Node app in fleetsync's release mode: here DEST is
// /var/www/app and the app's entry point is the release's server.js. Keep
// this file outside the releases (e.g. /etc/fleetsync/pm2.config.js) and
// change the line marked `fleetsync:`.
//
// A Node process loads its code when it starts: the switch alone changes
// nothing for it. Restart it once the release is live, from agent.toml:
//
//   after-switch = "pm2 startOrReload /etc/fleetsync/pm2.config.js --update-env"
//   rollback-on-failure = true
//
// `reload` replaces the cluster's workers one at a time (no dropped
// connection); each new worker starts in `cwd`, which the kernel resolves
// through `current` to the new release, and Node loads server.js by its
// real path, so every require() stays in that release. If the reload
// fails, --rollback-on-failure makes the previous release live again.
// (Run PM2 as the app's user: `sudo -u app pm2 ...` in after-switch.)
module.exports = {
  apps: [
    {
      name: "app",
      cwd: "/var/www/app/current", // fleetsync: cwd
      script: "server.js",
      exec_mode: "cluster",
      instances: "max",
      // Workers get this long to finish their requests on a reload.
      kill_timeout: 5000,
    },
  ],
};
