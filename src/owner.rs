//! OWNER: who owns what the agent places in DEST (`--owner USER[:GROUP]`),
//! for example the web server's user, so that an application that writes
//! into its own tree (a cache directory) can. Off by default: files are
//! the agent's (root's), 0644 and 0755, which every user can read.
//!
//! Resolved once, before anything is placed, through the system's user
//! database (getpwnam_r and getgrnam_r: /etc/passwd, and LDAP or SSSD
//! where the node uses them), or given as numbers (`33:33`). Applied at
//! placement: each new file and directory is chowned before it gets its
//! final name, so no reader ever sees it with the wrong owner.
//!
//! The owner can then write the code it owns. The agent's drift check
//! (size and mtime against what it placed) catches accidents, not a writer
//! that sets the mtime back: give a user the files only where that trade
//! is meant (`root:GROUP` gives a group the tree without write access:
//! files stay 0644, directories 0755).

use crate::error::{Error, Result};

/// A resolved owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl Owner {
    /// `USER[:GROUP]`, each a name or a number; without GROUP, the user's
    /// primary group.
    pub fn parse(spec: &str) -> Result<Owner> {
        let bad =
            |why: String| Error::Config(format!("--owner {spec:?}: {why} (give USER[:GROUP], names or numbers, e.g. www-data or 33:33)"));
        let (user, group) = match spec.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (spec, None),
        };
        if user.is_empty() || group.is_some_and(str::is_empty) {
            return Err(bad("a user, and a group after the colon, are needed".into()));
        }
        let (uid, primary) = match user.parse::<u32>() {
            Ok(uid) => (uid, None),
            Err(_) => {
                let (uid, gid) = lookup_user(user).map_err(&bad)?.ok_or_else(|| bad(format!("no user {user} on this node")))?;
                (uid, Some(gid))
            }
        };
        let gid = match group {
            Some(g) => match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => lookup_group(g).map_err(&bad)?.ok_or_else(|| bad(format!("no group {g} on this node")))?,
            },
            None => primary.ok_or_else(|| bad("a numeric user needs a group too (UID:GID)".into()))?,
        };
        // -1 means "leave as is" to chown(2), never an owner.
        if uid == u32::MAX || gid == u32::MAX {
            return Err(bad("4294967295 (-1) is not an id".into()));
        }
        // Checked now, not after the first download: only root may give
        // files away (CAP_CHOWN), or set a group it is not in.
        let euid = rustix::process::geteuid().as_raw();
        if euid != 0 && (uid != euid || gid != rustix::process::getegid().as_raw()) {
            return Err(bad(format!("the agent runs as uid {euid}, and only root may give files to another owner: run it as root")));
        }
        Ok(Owner { uid, gid })
    }
}

/// Largest buffer a lookup may take: a group with thousands of members
/// (LDAP, SSSD) needs more than the usual 16 KiB.
const MAX_BUFFER: usize = 1 << 20;

/// Calls a `get*nam_r` function with a buffer that doubles on ERANGE.
/// `Ok(None)`: no such entry (which some NSS modules say with ENOENT,
/// ESRCH, EBADF or EPERM rather than a null result).
fn lookup<T>(what: &str, mut call: impl FnMut(&mut [u8]) -> (i32, Option<T>)) -> std::result::Result<Option<T>, String> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match call(&mut buf) {
            (0, found) => return Ok(found),
            (libc::ERANGE, _) if buf.len() < MAX_BUFFER => buf = vec![0u8; buf.len() * 2],
            (libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM, _) => return Ok(None),
            (e, _) => return Err(format!("looking up {what}: {}", std::io::Error::from_raw_os_error(e))),
        }
    }
}

/// (uid, primary gid) of `name`; `None` when there is no such user.
fn lookup_user(name: &str) -> std::result::Result<Option<(u32, u32)>, String> {
    let cname = std::ffi::CString::new(name).map_err(|_| "a NUL in the name".to_string())?;
    lookup(&format!("user {name}"), |buf| {
        // SAFETY: getpwnam_r writes into `pwd` and `buf`, both ours and as
        // long as it is told; `result` is null or points at `pwd`.
        unsafe {
            let mut pwd: libc::passwd = std::mem::zeroed();
            let mut result: *mut libc::passwd = std::ptr::null_mut();
            let rc = libc::getpwnam_r(cname.as_ptr(), &mut pwd, buf.as_mut_ptr().cast(), buf.len(), &mut result);
            (rc, (!result.is_null()).then_some((pwd.pw_uid, pwd.pw_gid)))
        }
    })
}

/// The gid of group `name`; `None` when there is no such group.
fn lookup_group(name: &str) -> std::result::Result<Option<u32>, String> {
    let cname = std::ffi::CString::new(name).map_err(|_| "a NUL in the name".to_string())?;
    lookup(&format!("group {name}"), |buf| {
        // SAFETY: as in lookup_user, for getgrnam_r.
        unsafe {
            let mut grp: libc::group = std::mem::zeroed();
            let mut result: *mut libc::group = std::ptr::null_mut();
            let rc = libc::getgrnam_r(cname.as_ptr(), &mut grp, buf.as_mut_ptr().cast(), buf.len(), &mut result);
            (rc, (!result.is_null()).then_some(grp.gr_gid))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_resolve_and_bad_specs_say_how() {
        assert_eq!(Owner::parse("0:0").unwrap(), Owner { uid: 0, gid: 0 });
        assert_eq!(Owner::parse("root").unwrap(), Owner { uid: 0, gid: 0 });
        assert_eq!(Owner::parse("root:0").unwrap(), Owner { uid: 0, gid: 0 });
        for bad in ["", ":", "root:", ":root", "33", "4294967295:0", "no-such-user-fleetsync", "root:no-such-group-fleetsync"] {
            let e = Owner::parse(bad).unwrap_err().to_string();
            assert!(e.contains("--owner") && e.contains("USER[:GROUP]"), "{bad}: {e}");
        }
    }
}
