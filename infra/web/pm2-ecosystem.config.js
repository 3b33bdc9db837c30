// PM2 in front of a Node app in fleetsync's release mode: here DEST is
// /var/www/app and the app's entry point is the release's server.js. Keep
// this file outside the releases (e.g. /etc/fleetsync/pm2.config.js) and
// change the line marked `fleetsync:`.
//
// A Node process loads its code when it starts: the switch alone changes
// nothing for it. Once the first release is live, start the app and let
// PM2's own systemd unit bring it back at boot:
//
//   pm2 start /etc/fleetsync/pm2.config.js && pm2 save && pm2 startup
//
// then reload it after each switch, from agent.toml:
//
//   after-switch = "systemctl reload pm2-root"
//   rollback-on-failure = true
//
// (pm2-USER for another user.) The unit's reload is `pm2 reload all`:
// the cluster's workers are replaced one at a time (no dropped
// connection); each new one starts in `cwd`, which the kernel resolves
// through `current` to the release live now, and Node loads server.js by
// its real path, so every require() stays in that release. Through
// systemctl, not `pm2` itself: a pull the agent's own unit runs (at boot,
// on its timer) cannot reach PM2's home (ProtectHome=) and would have a
// daemon it started stopped with it. A pull, a rollback and the switch
// back after a failed health check all run the command.
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
