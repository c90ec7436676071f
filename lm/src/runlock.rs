//! One process at a time owns a run directory: `train` and `sweep` take `<run>/lock`
//! (the holder's pid, host and start time) before they delete or write anything there.
//!
//! A second process refuses with the holder's name. A lock whose holder is gone (a dead pid
//! on this host) is taken over, and says so. A child of the holder (the `train` a `sweep`
//! runs for the run it holds) goes ahead without taking the lock.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// What the lock file says.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Holder {
    pub pid: u32,
    pub host: String,
    /// Seconds since the Unix epoch when the lock was taken.
    pub since: u64,
    /// The command that holds it (train, sweep).
    pub command: String,
    /// `$SLURM_JOB_ID` of the holder, when it ran under Slurm: a requeued attempt of the same
    /// job (Slurm ends one attempt before it starts the next) takes the lock over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slurm_job: Option<String>,
}

/// This machine's name (Linux: the kernel's; else $HOSTNAME).
pub fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}

/// Whether `pid` runs on this host: /proc/<pid> on Linux; without /proc, assumed alive.
fn alive(pid: u32) -> bool {
    let proc = Path::new("/proc");
    !proc.is_dir() || proc.join(pid.to_string()).exists()
}

/// A held lock; dropping it removes the file (when this process took it).
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
    owned: bool,
    /// The run directory did not exist before: removed again when left empty.
    created: Option<PathBuf>,
}

impl RunLock {
    /// The lock file of a run directory.
    pub fn path(run_dir: &Path) -> PathBuf {
        run_dir.join("lock")
    }

    /// Takes `<run_dir>/lock` for `command` (creating the directory), or refuses when another
    /// live process holds it.
    pub fn acquire(run_dir: &Path, command: &str) -> Result<Self> {
        let created = (!run_dir.exists()).then(|| run_dir.to_path_buf());
        std::fs::create_dir_all(run_dir)
            .with_context(|| format!("cannot create {}", run_dir.display()))?;
        let path = Self::path(run_dir);
        let me = Holder {
            pid: std::process::id(),
            host: host(),
            since: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            command: command.to_string(),
            slurm_job: std::env::var("SLURM_JOB_ID").ok().filter(|j| !j.is_empty()),
        };
        // Two tries: the second after removing a stale lock.
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    f.write_all(serde_json::to_string(&me)?.as_bytes())
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    return Ok(Self {
                        path,
                        owned: true,
                        created,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot create {}", path.display()))
                }
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let Ok(holder) = serde_json::from_str::<Holder>(&text) else {
                bail!(
                    "{} exists but does not name its holder ({text:?}): if no process uses {}, delete the lock",
                    path.display(),
                    run_dir.display()
                );
            };
            let parent = std::os::unix::process::parent_id();
            if holder.host == me.host && holder.pid == parent {
                // The sweep that runs us holds the run for us.
                return Ok(Self {
                    path,
                    owned: false,
                    created: None,
                });
            }
            let gone = holder.host == me.host && !alive(holder.pid);
            let requeued = holder.slurm_job.is_some() && holder.slurm_job == me.slurm_job;
            if gone || requeued {
                let why = if gone {
                    "gone"
                } else {
                    "an earlier attempt of this Slurm job"
                };
                eprintln!(
                    "{}: taking over the lock of {} (pid {} on {}, {why})",
                    run_dir.display(),
                    holder.command,
                    holder.pid,
                    holder.host
                );
                let _ = std::fs::remove_file(&path);
                continue;
            }
            bail!(
                "{} is in use by {} (pid {} on {}, since {} s after the epoch): wait for it, or \
                 choose another run name; if that process is gone, delete {}",
                run_dir.display(),
                holder.command,
                holder.pid,
                holder.host,
                holder.since,
                path.display()
            );
        }
        bail!("{}: cannot take the lock", path.display())
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        if self.owned {
            let _ = std::fs::remove_file(&self.path);
        }
        if let Some(dir) = &self.created {
            // Only when nothing was written there (a run that failed before its first file).
            let _ = std::fs::remove_dir(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_holder(dir: &Path, h: &Holder) {
        std::fs::write(RunLock::path(dir), serde_json::to_string(h).unwrap()).unwrap();
    }

    #[test]
    fn a_live_holder_is_refused_a_dead_one_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("r");
        let lock = RunLock::acquire(&run, "train").unwrap();
        let held: Holder =
            serde_json::from_str(&std::fs::read_to_string(RunLock::path(&run)).unwrap()).unwrap();
        assert_eq!(
            (held.pid, held.command.as_str()),
            (std::process::id(), "train")
        );
        // Another process on another host holds it: refused, naming it.
        drop(lock);
        assert!(
            !RunLock::path(&run).exists(),
            "dropping the lock removes it"
        );
        assert!(
            !run.exists(),
            "a run directory it made and nothing filled goes too"
        );
        std::fs::create_dir_all(&run).unwrap();
        let other = Holder {
            pid: 4242,
            host: "elsewhere".into(),
            since: 1,
            command: "sweep".into(),
            slurm_job: None,
        };
        write_holder(&run, &other);
        let e = RunLock::acquire(&run, "train").unwrap_err().to_string();
        assert!(
            e.contains("in use by sweep (pid 4242 on elsewhere") && e.contains("delete"),
            "{e}"
        );
        // On this host with a pid that does not run: taken over.
        let dead = Holder {
            host: host(),
            pid: u32::MAX - 1,
            ..other
        };
        write_holder(&run, &dead);
        let lock = RunLock::acquire(&run, "train").unwrap();
        assert!(lock.owned);
        // On this host, alive (this test's own pid stands for a running process).
        drop(lock);
        write_holder(
            &run,
            &Holder {
                pid: std::process::id(),
                ..dead
            },
        );
        assert!(RunLock::acquire(&run, "train").is_err());
    }
}
