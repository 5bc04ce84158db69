//! Child processes and scratch directories that clean up after themselves.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// A scratch directory under the system temp dir, removed on drop.
///
/// Set `LEGATE_KEEP_TMP=1` to keep it for a post-mortem.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates a fresh, uniquely named directory whose name starts with `prefix`.
    pub fn new(prefix: &str) -> Result<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "legate-tests-{prefix}-{}-{n}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("creating temp dir {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("LEGATE_KEEP_TMP").is_some() {
            eprintln!("keeping {}", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A running child process with stdout and stderr captured to files.
///
/// On drop the child is killed and reaped; if the current thread is panicking (a failed
/// assertion) its captured output is printed so the failure can be diagnosed.
#[derive(Debug)]
pub struct ProcessGuard {
    name: String,
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl ProcessGuard {
    /// Spawns `program args...` with output captured under `dir` as `<name>.stdout` and
    /// `<name>.stderr`.
    pub fn spawn(name: &str, program: &Path, args: &[String], dir: &Path) -> Result<Self> {
        let stdout = dir.join(format!("{name}.stdout"));
        let stderr = dir.join(format!("{name}.stderr"));
        let out =
            File::create(&stdout).with_context(|| format!("creating {}", stdout.display()))?;
        let err =
            File::create(&stderr).with_context(|| format!("creating {}", stderr.display()))?;
        let child = Command::new(program)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("spawning {} {}", program.display(), args.join(" ")))?;
        Ok(Self {
            name: name.to_string(),
            child,
            stdout,
            stderr,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the child has already exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// What the child has written so far, stdout then stderr, for error messages.
    pub fn output(&self) -> String {
        let out = std::fs::read_to_string(&self.stdout).unwrap_or_default();
        let err = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        format!(
            "----- {name} stdout -----\n{out}----- {name} stderr -----\n{err}----- end {name} -----",
            name = self.name
        )
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("{}", self.output());
        }
    }
}

/// The result of running a command to completion.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `program args...` to completion (killing it after `timeout`) and returns its output.
pub fn run_to_completion(
    program: &Path,
    args: &[String],
    dir: &Path,
    timeout: Duration,
) -> Result<Finished> {
    let mut guard = ProcessGuard::spawn("run", program, args, dir)?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = guard.exited() {
            return Ok(Finished {
                status,
                stdout: std::fs::read_to_string(&guard.stdout).unwrap_or_default(),
                stderr: std::fs::read_to_string(&guard.stderr).unwrap_or_default(),
            });
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "{} did not exit within {timeout:?}\n{}",
                program.display(),
                guard.output()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
